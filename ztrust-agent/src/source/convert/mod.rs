//! Kubernetes objects into the [`crate::model`], validated as the API server would validate them.
//!
//! Objects come in as the k8s-openapi types, decoded exactly as the API server decodes them; both
//! sources (files and the API) and the lab convert them here. The functions know nothing about where an
//! object came from: they return the model value and [`ObjectError`]s, to which the source adds its
//! [`super::Origin`].
//!
//! Invalid input never makes anything more open (see [`convert_policy`]): the part that is invalid is
//! dropped in the direction that allows less, and the error names the object, the field path and the
//! problem.

pub mod services;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::problem::{Converted, Effect, ObjectError, Problem};
use crate::model;

/// A NetworkPolicy that does not even decode still selects pods: if its `spec.podSelector` and
/// `spec.policyTypes` can be read, it becomes a policy with no rules, which isolates the pods it selects
/// and allows nothing (fail closed; directions it may affect are all isolated).
pub fn fail_closed_policy(
    value: &serde_json::Value,
    object: &str,
    message: String,
) -> Converted<model::NetworkPolicy> {
    let mut errors = Vec::new();
    let meta = value
        .get("metadata")
        .cloned()
        .and_then(|m| serde_json::from_value::<ObjectMeta>(m).ok());
    let spec = value.get("spec");
    let selector = match spec.and_then(|s| s.get("podSelector")) {
        None | Some(serde_json::Value::Null) => Some(LabelSelector::default()),
        Some(v) => serde_json::from_value::<LabelSelector>(v.clone()).ok(),
    };
    let name = meta.as_ref().and_then(|m| m.name.clone());
    let (Some(name), Some(selector)) = (name, selector) else {
        errors.push(ObjectError {
            object: object.to_owned(),
            field: String::new(),
            problem: Problem::Schema {
                kind: "NetworkPolicy",
                message,
            },
            effect: Effect::None,
        });
        return Converted { value: None, errors };
    };
    let namespace = meta
        .and_then(|m| m.namespace)
        .unwrap_or_else(|| "default".to_owned());
    let pod_selector = match convert_selector(&selector, object, "spec.podSelector") {
        Ok(s) => s,
        Err(mut e) => {
            errors.append(&mut e);
            return Converted { value: None, errors };
        }
    };
    errors.push(ObjectError {
        object: object.to_owned(),
        field: String::new(),
        problem: Problem::PolicySchemaFailClosed(message),
        effect: Effect::None,
    });
    let types: Option<Vec<String>> = spec
        .and_then(|s| s.get("policyTypes"))
        .and_then(|v| serde_json::from_value(v.clone()).ok());
    let (isolates_ingress, isolates_egress) = match types.as_deref() {
        Some(t) if !t.is_empty() && t.iter().all(|t| t == "Ingress" || t == "Egress") => {
            (t.iter().any(|t| t == "Ingress"), t.iter().any(|t| t == "Egress"))
        }
        _ => (true, true),
    };
    Converted {
        value: Some(model::NetworkPolicy {
            namespace,
            name,
            pod_selector,
            isolates_ingress,
            isolates_egress,
            ingress: Vec::new(),
            egress: Vec::new(),
            // A policy that does not decode is enforced, whatever its annotations say (fail closed).
            audit: false,
        }),
        errors,
    }
}

pub(crate) fn object_name(kind: &str, meta: &ObjectMeta, namespaced: bool) -> String {
    let name = meta.name.as_deref().unwrap_or("<no name>");
    if namespaced {
        format!("{kind} {}/{name}", meta.namespace.as_deref().unwrap_or("default"))
    } else {
        format!("{kind} {name}")
    }
}

fn labels(map: &Option<BTreeMap<String, String>>) -> model::Labels {
    map.clone().unwrap_or_default()
}

/// The label the API server puts on every namespace since Kubernetes 1.21 (GA in 1.22), with the
/// namespace's name as value; policies select namespaces by name with it.
/// <https://kubernetes.io/docs/reference/labels-annotations-taints/#kubernetes-io-metadata-name>
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Converts a Namespace. Adds [`NAMESPACE_NAME_LABEL`] as the API server does, so that files written by
/// hand behave like objects read from a cluster.
pub fn convert_namespace(ns: &Namespace) -> Converted<model::Namespace> {
    let object = object_name("Namespace", &ns.metadata, false);
    let Some(name) = ns.metadata.name.clone() else {
        return Converted {
            value: None,
            errors: vec![ObjectError {
                object,
                field: "metadata.name".into(),
                problem: Problem::Missing,
                effect: Effect::ObjectDropped,
            }],
        };
    };
    let mut labels = labels(&ns.metadata.labels);
    labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.clone());
    Converted {
        value: Some(model::Namespace {
            name,
            labels,
            annotations: ns.metadata.annotations.clone().unwrap_or_default(),
        }),
        errors: Vec::new(),
    }
}

/// Converts a Pod. An invalid address or container port is ignored (with an error): fewer addresses
/// and fewer named ports can only match less.
pub fn convert_pod(pod: &Pod) -> Converted<model::Pod> {
    let object = object_name("Pod", &pod.metadata, true);
    let mut errors = Vec::new();
    let Some(name) = pod.metadata.name.clone() else {
        errors.push(ObjectError {
            object,
            field: "metadata.name".into(),
            problem: Problem::Missing,
            effect: Effect::ObjectDropped,
        });
        return Converted { value: None, errors };
    };
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Some(status) = &pod.status {
        // `podIPs[0]` equals `podIP` when both are set; podIPs is the complete (dual-stack) list.
        let listed: Vec<(String, &str)> = match status.pod_ips.as_deref() {
            Some(list) if !list.is_empty() => list
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("status.podIPs[{i}].ip"), p.ip.as_str()))
                .collect(),
            _ => status
                .pod_ip
                .iter()
                .map(|p| ("status.podIP".to_owned(), p.as_str()))
                .collect(),
        };
        for (field, text) in listed {
            match text.parse::<IpAddr>() {
                Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                Ok(_) => {}
                Err(_) => errors.push(ObjectError {
                    object: object.clone(),
                    field,
                    problem: Problem::BadIp(text.to_owned()),
                    effect: Effect::ValueDropped,
                }),
            }
        }
    }
    let mut ports = Vec::new();
    if let Some(spec) = &pod.spec {
        let lists: [(&str, &[Container]); 2] = [
            ("spec.containers", &spec.containers),
            (
                "spec.initContainers",
                spec.init_containers.as_deref().unwrap_or(&[]),
            ),
        ];
        for (list_name, containers) in lists {
            for (ci, c) in containers.iter().enumerate() {
                for (pi, p) in c.ports.iter().flatten().enumerate() {
                    let field = format!("{list_name}[{ci}].ports[{pi}]");
                    let mut fail = |suffix: &str, problem: Problem| {
                        errors.push(ObjectError {
                            object: object.clone(),
                            field: format!("{field}.{suffix}"),
                            problem,
                            effect: Effect::ValueDropped,
                        });
                    };
                    let Some(port) = u16::try_from(p.container_port).ok().filter(|p| *p != 0) else {
                        fail("containerPort", Problem::PortRange(p.container_port.into()));
                        continue;
                    };
                    let Some(protocol) = protocol(p.protocol.as_deref()) else {
                        fail(
                            "protocol",
                            Problem::Protocol(p.protocol.clone().unwrap_or_default()),
                        );
                        continue;
                    };
                    if let Some(n) = &p.name
                        && !is_port_name(n)
                    {
                        fail("name", Problem::PortName(n.clone()));
                        continue;
                    }
                    ports.push(model::ContainerPort {
                        name: p.name.clone(),
                        port,
                        protocol,
                    });
                }
            }
        }
    }
    let spec = pod.spec.as_ref();
    Converted {
        value: Some(model::Pod {
            namespace,
            name,
            labels: labels(&pod.metadata.labels),
            annotations: labels(&pod.metadata.annotations),
            ips,
            ports,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            node_name: spec.and_then(|s| s.node_name.clone()),
        }),
        errors,
    }
}

/// `protocol` defaults to TCP in both ContainerPort and NetworkPolicyPort.
pub(crate) fn protocol(p: Option<&str>) -> Option<model::Protocol> {
    match p {
        None | Some("TCP") => Some(model::Protocol::Tcp),
        Some("UDP") => Some(model::Protocol::Udp),
        Some("SCTP") => Some(model::Protocol::Sctp),
        Some(_) => None,
    }
}

/// IANA_SVC_NAME as Kubernetes validates it (`validation.IsValidPortName`, RFC 6335 §5.1): 1–15
/// characters of `a-z`, `0-9` and `-`, at least one letter, no `-` at either end, no `--`.
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// Converts a label selector; every invalid requirement is an error (the caller decides what an invalid
/// selector means: a policy without a valid podSelector is dropped, an invalid peer matches nothing).
pub fn convert_selector(
    sel: &LabelSelector,
    object: &str,
    field: &str,
) -> Result<model::LabelSelector, Vec<ObjectError>> {
    let mut errors = Vec::new();
    let mut out = model::LabelSelector {
        match_labels: labels(&sel.match_labels),
        match_expressions: Vec::new(),
    };
    for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
        let values: BTreeSet<String> = req.values.iter().flatten().cloned().collect();
        let mut fail = |suffix: &str, problem: Problem| {
            errors.push(ObjectError {
                object: object.to_owned(),
                field: format!("{field}.matchExpressions[{i}].{suffix}"),
                problem,
                effect: Effect::None,
            });
        };
        // https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/label-selector/:
        // "If the operator is In or NotIn, the values array must be non-empty. If the operator is Exists
        // or DoesNotExist, the values array must be empty."
        let (operator, name) = match req.operator.as_str() {
            "In" => (model::Operator::In, "In"),
            "NotIn" => (model::Operator::NotIn, "NotIn"),
            "Exists" => (model::Operator::Exists, "Exists"),
            "DoesNotExist" => (model::Operator::DoesNotExist, "DoesNotExist"),
            other => {
                fail("operator", Problem::Operator(other.to_owned()));
                continue;
            }
        };
        let needs_values = matches!(operator, model::Operator::In | model::Operator::NotIn);
        if needs_values && values.is_empty() {
            fail("values", Problem::ValuesRequired(name));
            continue;
        }
        if !needs_values && !values.is_empty() {
            fail("values", Problem::ValuesForbidden(name));
            continue;
        }
        if req.key.is_empty() {
            fail("key", Problem::Missing);
            continue;
        }
        out.match_expressions.push(model::Requirement {
            key: req.key.clone(),
            operator,
            values,
        });
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

/// Converts a NetworkPolicy exactly as the API defines it
/// (<https://kubernetes.io/docs/reference/kubernetes-api/policy-resources/network-policy-v1/>).
///
/// Fail closed: when `spec.podSelector` is valid the policy is kept and isolates what it selects; an
/// invalid peer or port entry is dropped with an error, and a rule whose every peer (or every port) is
/// invalid becomes [`matches_nothing`] — it must not turn into "all peers" / "all ports", which is what
/// an empty list means. Only an invalid `podSelector` drops the
/// whole policy.
pub fn convert_policy(np: &NetworkPolicy) -> Converted<model::NetworkPolicy> {
    let object = object_name("NetworkPolicy", &np.metadata, true);
    let mut errors = Vec::new();
    let Some(name) = np.metadata.name.clone() else {
        errors.push(ObjectError {
            object,
            field: "metadata.name".into(),
            problem: Problem::Missing,
            effect: Effect::ObjectDropped,
        });
        return Converted { value: None, errors };
    };
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let spec = np.spec.clone().unwrap_or_default();
    // "podSelector ... An empty podSelector selects all pods in this namespace." (optional since 1.33)
    let pod_selector = match convert_selector(
        &spec.pod_selector.unwrap_or_default(),
        &object,
        "spec.podSelector",
    ) {
        Ok(s) => s,
        Err(mut e) => {
            errors.append(&mut e);
            errors.push(ObjectError {
                object,
                field: "spec.podSelector".into(),
                problem: Problem::InvalidPodSelector,
                effect: Effect::ObjectDropped,
            });
            return Converted { value: None, errors };
        }
    };

    // policyTypes: "If this field is not specified, it will default based on the existence of ingress
    // or egress rules; policies that contain an egress section are assumed to affect egress, and all
    // policies (whether or not they contain an ingress section) are assumed to affect ingress." The API
    // server's defaulting (SetDefaults_NetworkPolicy) tests `len(spec.policyTypes) == 0` and
    // `len(spec.egress) != 0`: an explicitly empty `egress: []` holds no egress rule and so does not make
    // the policy affect egress, and an empty `policyTypes: []` is defaulted like an absent one.
    let egress_rules = spec.egress.as_deref().unwrap_or(&[]);
    let ingress_rules = spec.ingress.as_deref().unwrap_or(&[]);
    let (isolates_ingress, isolates_egress) = match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            let mut ingress = false;
            let mut egress = false;
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress = true,
                    "Egress" => egress = true,
                    other => {
                        // Unknown type: isolate both, the closed choice.
                        errors.push(ObjectError {
                            object: object.clone(),
                            field: format!("spec.policyTypes[{i}]"),
                            problem: Problem::PolicyType(other.to_owned()),
                            effect: Effect::None,
                        });
                        ingress = true;
                        egress = true;
                    }
                }
            }
            (ingress, egress)
        }
        _ => (true, !egress_rules.is_empty()),
    };

    let ingress = ingress_rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            convert_rule(
                r.from.as_deref(),
                r.ports.as_deref(),
                &object,
                &format!("spec.ingress[{i}]"),
                "from",
                &mut errors,
            )
        })
        .collect();
    let egress = egress_rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            convert_rule(
                r.to.as_deref(),
                r.ports.as_deref(),
                &object,
                &format!("spec.egress[{i}]"),
                "to",
                &mut errors,
            )
        })
        .collect();
    Converted {
        value: Some(model::NetworkPolicy {
            namespace,
            name,
            pod_selector,
            isolates_ingress,
            isolates_egress,
            ingress,
            egress,
            audit: policy_audit(&np.metadata, &object, &mut errors),
        }),
        errors,
    }
}

/// The policy's `ztrust.io/mode` annotation: `audit` (any case), or enforced (absent, `enforce`, or a
/// value that is neither: an error, and enforced, so that a typo never stops enforcement).
fn policy_audit(meta: &ObjectMeta, object: &str, errors: &mut Vec<ObjectError>) -> bool {
    let key = crate::datapath::sync::AUDIT_ANNOTATION;
    match meta.annotations.as_ref().and_then(|a| a.get(key)) {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("audit") => true,
        Some(v) if v.eq_ignore_ascii_case("enforce") => false,
        Some(v) => {
            errors.push(ObjectError {
                object: object.to_owned(),
                field: format!("metadata.annotations[{key}]"),
                problem: Problem::Mode(v.clone()),
                effect: Effect::None,
            });
            false
        }
    }
}

/// The marker key of [`matches_nothing`].
pub const MATCHES_NOTHING_KEY: &str = "ztrust.io/invalid-rule";

/// A rule that matches no traffic: its only peer selects pods with a label value in an empty set.
///
/// It stands for a rule whose every peer (or every port) is invalid. Leaving such a rule out would
/// change the index of the rules after it (flows name rules by index), and emptying its lists would make
/// it match everything (an empty list means "all" in the API), so it is kept, matching nothing.
pub fn matches_nothing() -> model::Rule {
    let never = model::LabelSelector {
        match_labels: model::Labels::new(),
        match_expressions: vec![model::Requirement {
            key: MATCHES_NOTHING_KEY.to_owned(),
            operator: model::Operator::In,
            values: BTreeSet::new(),
        }],
    };
    model::Rule {
        peers: vec![model::Peer::Pods {
            namespace_selector: None,
            pod_selector: Some(never),
        }],
        ports: Vec::new(),
    }
}

/// One rule; [`matches_nothing`] when all its peers or all its ports are invalid.
fn convert_rule(
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    object: &str,
    field: &str,
    peers_name: &str,
    errors: &mut Vec<ObjectError>,
) -> model::Rule {
    let peers = peers.unwrap_or(&[]);
    let ports = ports.unwrap_or(&[]);
    let mut rule = model::Rule::default();
    for (i, p) in peers.iter().enumerate() {
        match convert_peer(p, object, &format!("{field}.{peers_name}[{i}]")) {
            Ok(peer) => rule.peers.push(peer),
            Err(e) => errors.extend(e),
        }
    }
    for (i, p) in ports.iter().enumerate() {
        match convert_port(p, object, &format!("{field}.ports[{i}]")) {
            Ok(port) => rule.ports.push(port),
            Err(e) => errors.push(e),
        }
    }
    // "If this field is empty or missing, this rule matches all sources/destinations" / "all ports" —
    // but only when the list was empty to begin with, not when we emptied it.
    let peers_lost = !peers.is_empty() && rule.peers.is_empty();
    let ports_lost = !ports.is_empty() && rule.ports.is_empty();
    if peers_lost || ports_lost {
        matches_nothing()
    } else {
        rule
    }
}

fn convert_peer(p: &NetworkPolicyPeer, object: &str, field: &str) -> Result<model::Peer, Vec<ObjectError>> {
    let err = |suffix: &str, problem: Problem| ObjectError {
        object: object.to_owned(),
        field: if suffix.is_empty() {
            field.to_owned()
        } else {
            format!("{field}.{suffix}")
        },
        problem,
        effect: Effect::PeerDropped,
    };
    let selectors = p.pod_selector.is_some() || p.namespace_selector.is_some();
    match (&p.ip_block, selectors) {
        (Some(block), false) => {
            let cidr = parse_cidr(&block.cidr)
                .ok_or_else(|| vec![err("ipBlock.cidr", Problem::BadCidr(block.cidr.clone()))])?;
            let mut except = Vec::new();
            let mut errors = Vec::new();
            for (i, e) in block.except.iter().flatten().enumerate() {
                let f = format!("ipBlock.except[{i}]");
                match parse_cidr(e) {
                    None => errors.push(err(&f, Problem::BadCidr(e.clone()))),
                    Some(e) if !same_family(&cidr, &e) => {
                        errors.push(err(&f, Problem::ExceptFamily { cidr, except: e }))
                    }
                    // ValidateIPBlock: an except "must be a strict subset of `cidr`".
                    Some(e) if !cidr.contains(&e) || e.prefix_len() <= cidr.prefix_len() => {
                        errors.push(err(&f, Problem::ExceptOutside { cidr, except: e }))
                    }
                    Some(e) => except.push(e),
                }
            }
            // An invalid except cannot simply be left out (that would allow what it meant to exclude):
            // the whole peer goes.
            if errors.is_empty() {
                Ok(model::Peer::IpBlock { cidr, except })
            } else {
                Err(errors)
            }
        }
        (None, true) => {
            let mut errors = Vec::new();
            let mut conv = |s: &Option<LabelSelector>, name: &str| {
                s.as_ref().and_then(
                    |s| match convert_selector(s, object, &format!("{field}.{name}")) {
                        Ok(s) => Some(s),
                        Err(e) => {
                            errors.extend(e.into_iter().map(|e| ObjectError {
                                effect: Effect::PeerDropped,
                                ..e
                            }));
                            None
                        }
                    },
                )
            };
            let pod_selector = conv(&p.pod_selector, "podSelector");
            let namespace_selector = conv(&p.namespace_selector, "namespaceSelector");
            if errors.is_empty() {
                Ok(model::Peer::Pods {
                    namespace_selector,
                    pod_selector,
                })
            } else {
                Err(errors)
            }
        }
        _ => Err(vec![err("", Problem::PeerKind)]),
    }
}

fn same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}

/// `address/prefix-length`; host bits are cleared as Go's `net.ParseCIDR` does for the API server.
fn parse_cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().ok().map(|n| n.trunc())
}

fn convert_port(p: &NetworkPolicyPort, object: &str, field: &str) -> Result<model::PortSpec, ObjectError> {
    let err = |suffix: &str, problem: Problem| ObjectError {
        object: object.to_owned(),
        field: format!("{field}.{suffix}"),
        problem,
        effect: Effect::PortDropped,
    };
    let protocol = protocol(p.protocol.as_deref()).ok_or_else(|| {
        err(
            "protocol",
            Problem::Protocol(p.protocol.clone().unwrap_or_default()),
        )
    })?;
    let port = match &p.port {
        None => None,
        Some(IntOrString::Int(n)) => Some(model::PortRef::Number(
            u16::try_from(*n)
                .ok()
                .filter(|n| *n != 0)
                .ok_or_else(|| err("port", Problem::PortRange((*n).into())))?,
        )),
        Some(IntOrString::String(s)) if is_port_name(s) => Some(model::PortRef::Name(s.clone())),
        Some(IntOrString::String(s)) => return Err(err("port", Problem::PortName(s.clone()))),
    };
    // "endPort ... cannot be defined if the port field is not defined or if the port field is defined as
    // a named (string) port. The endPort must be equal or greater than port."
    let end_port = match (p.end_port, &port) {
        (None, _) => None,
        (Some(end), Some(model::PortRef::Number(start))) => {
            let end16 = u16::try_from(end)
                .ok()
                .filter(|e| *e != 0)
                .ok_or_else(|| err("endPort", Problem::PortRange(end.into())))?;
            if end16 < *start {
                return Err(err(
                    "endPort",
                    Problem::EndPortBelow {
                        port: *start,
                        end: end.into(),
                    },
                ));
            }
            Some(end16)
        }
        (Some(_), _) => return Err(err("endPort", Problem::EndPortWithoutNumber)),
    };
    Ok(model::PortSpec {
        protocol,
        port,
        end_port,
    })
}

#[cfg(test)]
mod tests;
