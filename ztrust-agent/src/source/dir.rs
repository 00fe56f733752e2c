//! Directory source: Kubernetes manifests (YAML or JSON, multi-document, `kind: List`) read from files.
//!
//! Objects go through the k8s-openapi types first, so that a manifest is read exactly as the API server
//! would decode it, then through the `convert_*` functions, which validate them as the API server would
//! and turn them into the [`crate::model`]. The `convert_*` functions know nothing about files: the
//! Kubernetes API source reuses them, and [`ObjectError::in_file`] adds the file as context here.
//!
//! Invalid input never makes anything more open (see [`convert_policy`]): the part that is invalid is
//! dropped in the direction that allows less, and a [`LoadError`] names the file, the object, the field
//! path and the problem.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

use crate::model;

/// Everything read from one file (or merged from several).
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// Namespaces, pods, policies, Services and EndpointSlices; `node_ips` and `service_cidrs` are left
    /// empty (the agent knows its node and cluster, files do not).
    pub cluster: model::Cluster,
    pub errors: Vec<LoadError>,
    /// Objects of the lab's own API group (`lab.ztrust.io/*`), untouched.
    pub lab_objects: Vec<serde_json::Value>,
}

/// What is wrong with one field of one object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("cannot parse the document: {0}")]
    Syntax(String),
    #[error("not a Kubernetes object (no apiVersion/kind)")]
    NotAnObject,
    #[error("unsupported kind {api_version} {kind}, ignored")]
    UnsupportedKind { api_version: String, kind: String },
    #[error("does not match the {kind} schema ({message}); object ignored")]
    Schema { kind: &'static str, message: String },
    #[error(
        "does not match the NetworkPolicy schema ({0}); the policy isolates the pods it selects and allows nothing"
    )]
    PolicySchemaFailClosed(String),
    #[error("required field is missing")]
    Missing,
    #[error("invalid IP address {0:?}")]
    BadIp(String),
    #[error("invalid CIDR {0:?} (expected address/prefix-length)")]
    BadCidr(String),
    #[error("except {except} is not of the same address family as cidr {cidr}")]
    ExceptFamily { cidr: IpNet, except: IpNet },
    #[error("except {except} is not a strict subset of cidr {cidr}")]
    ExceptOutside { cidr: IpNet, except: IpNet },
    #[error("port number {0} is outside 1..=65535")]
    PortRange(i64),
    #[error(
        "invalid port name {0:?} (IANA_SVC_NAME: at most 15 characters, lowercase letters, digits and '-', at least one letter, no leading, trailing or double '-')"
    )]
    PortName(String),
    #[error("unsupported protocol {0:?} (TCP, UDP or SCTP)")]
    Protocol(String),
    #[error("endPort is only allowed with a numeric port")]
    EndPortWithoutNumber,
    #[error("endPort {end} is less than port {port}")]
    EndPortBelow { port: u16, end: i64 },
    #[error("unknown operator {0:?} (In, NotIn, Exists, DoesNotExist)")]
    Operator(String),
    #[error("operator {0} needs a non-empty values list")]
    ValuesRequired(&'static str),
    #[error("operator {0} must have no values")]
    ValuesForbidden(&'static str),
    #[error("a peer must set exactly one of ipBlock or podSelector/namespaceSelector")]
    PeerKind,
    #[error("unknown policy type {0:?} (Ingress or Egress); the policy isolates both directions")]
    PolicyType(String),
    #[error("invalid selector: the policy cannot tell which pods it selects")]
    InvalidPodSelector,
    #[error("duplicate object; the one read later replaces the one read earlier")]
    Duplicate,
    /// Not a fault of the object: a limit of where ztrust enforces (reported as an Event, not counted
    /// as a source error).
    #[error(
        "selects host-network pod {pod} on node {node}: its traffic crosses no pod interface, so ztrust does \
         not enforce this policy for it"
    )]
    SelectsHostNetworkPod { pod: model::ObjectRef, node: String },
}

/// Describes what happened to the part of the object that is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond what the problem says.
    None,
    /// The object was ignored.
    ObjectDropped,
    /// The peer was dropped: it matches nothing (a rule left without valid peers allows nothing).
    PeerDropped,
    /// The port entry was dropped (a rule left without valid ports allows nothing).
    PortDropped,
    /// The value was ignored (e.g. one address or container port of a pod).
    ValueDropped,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::None => "",
            Effect::ObjectDropped => "; object ignored",
            Effect::PeerDropped => "; peer dropped, it matches nothing (fail closed)",
            Effect::PortDropped => "; port dropped, it matches nothing (fail closed)",
            Effect::ValueDropped => "; value ignored",
        })
    }
}

/// A problem in one object, independent of where the object came from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {problem}{effect}")]
pub struct ObjectError {
    /// `Kind namespace/name` (or `Kind name` for cluster-scoped objects).
    pub object: String,
    /// Field path as in the API, e.g. `spec.ingress[0].from[1].ipBlock.cidr`.
    pub field: String,
    pub problem: Problem,
    pub effect: Effect,
}

impl ObjectError {
    pub fn in_file(self, file: &str) -> LoadError {
        LoadError {
            file: file.to_owned(),
            object: self.object,
            field: self.field,
            problem: self.problem,
            effect: self.effect,
        }
    }
}

/// A problem in a file: the file, the object (`Kind namespace/name`), the field path and the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct LoadError {
    pub file: String,
    pub object: String,
    pub field: String,
    pub problem: Problem,
    pub effect: Effect,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.object)?;
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}{}", self.problem, self.effect)
    }
}

/// The result of converting one object: the object (unless it had to be dropped) and its problems.
#[derive(Clone, Debug)]
pub struct Converted<T> {
    pub value: Option<T>,
    pub errors: Vec<ObjectError>,
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file under `path`, recursively, in sorted order.
///
/// Only a failure to list or read the directory is an `Err`; problems in files are [`Loaded::errors`].
pub fn load_dir(path: &Path) -> std::io::Result<Loaded> {
    let mut files = Vec::new();
    collect_files(path, &mut files)?;
    files.sort();
    let mut out = Loaded::default();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        merge(&mut out, parse_str(&file.display().to_string(), &text));
    }
    Ok(out)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|x| x.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

/// Parses one file's text: multi-document YAML (JSON is YAML too), `kind: List` expanded.
pub fn parse_str(file: &str, text: &str) -> Loaded {
    let mut out = Loaded::default();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_json::Value::deserialize(document) {
            Ok(v) => v,
            Err(e) => {
                out.errors.push(LoadError {
                    file: file.to_owned(),
                    object: format!("document #{}", index + 1),
                    field: String::new(),
                    problem: Problem::Syntax(e.to_string()),
                    effect: Effect::None,
                });
                // serde_yaml cannot resume after a syntax error in a stream.
                break;
            }
        };
        add_value(&mut out, file, &format!("document #{}", index + 1), value);
    }
    out
}

/// Adds `other` to `into`. An object defined twice keeps the later definition and records an error.
pub fn merge(into: &mut Loaded, other: Loaded) {
    let Loaded {
        cluster,
        errors,
        lab_objects,
    } = other;
    merge_kind(
        &mut into.cluster.namespaces,
        cluster.namespaces,
        "Namespace",
        &mut into.errors,
    );
    merge_kind(&mut into.cluster.pods, cluster.pods, "Pod", &mut into.errors);
    merge_kind(
        &mut into.cluster.policies,
        cluster.policies,
        "NetworkPolicy",
        &mut into.errors,
    );
    merge_kind(
        &mut into.cluster.services,
        cluster.services,
        "Service",
        &mut into.errors,
    );
    merge_kind(
        &mut into.cluster.endpoint_slices,
        cluster.endpoint_slices,
        "EndpointSlice",
        &mut into.errors,
    );
    into.cluster.node_ips.extend(cluster.node_ips);
    into.errors.extend(errors);
    into.lab_objects.extend(lab_objects);
}

/// Adds the objects of one kind to `into`; one already there is replaced, with a [`Problem::Duplicate`].
fn merge_kind<K: Ord + fmt::Display, V>(
    into: &mut BTreeMap<K, V>,
    other: BTreeMap<K, V>,
    kind: &str,
    errors: &mut Vec<LoadError>,
) {
    for (key, value) in other {
        let shown = format!("{kind} {key}");
        if into.insert(key, value).is_some() {
            errors.push(duplicate("", &shown));
        }
    }
}

fn duplicate(file: &str, object: &str) -> LoadError {
    LoadError {
        file: if file.is_empty() {
            "(merged)".to_owned()
        } else {
            file.to_owned()
        },
        object: object.to_owned(),
        field: String::new(),
        problem: Problem::Duplicate,
        effect: Effect::None,
    }
}

fn add_value(out: &mut Loaded, file: &str, where_: &str, value: serde_json::Value) {
    if value.is_null() {
        return; // an empty document (`---` at the end of a file)
    }
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let kind = value
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let err = |object: String, problem: Problem| LoadError {
        file: file.to_owned(),
        object,
        field: String::new(),
        problem,
        effect: Effect::None,
    };
    if api_version.is_empty() || kind.is_empty() {
        out.errors.push(err(where_.to_owned(), Problem::NotAnObject));
        return;
    }
    if api_version.starts_with("lab.ztrust.io/") {
        out.lab_objects.push(value);
        return;
    }
    let name = describe(&value);
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = match value.get("items") {
                Some(serde_json::Value::Array(items)) => items.clone(),
                None | Some(serde_json::Value::Null) => Vec::new(),
                Some(_) => {
                    out.errors.push(LoadError {
                        field: "items".into(),
                        ..err(
                            format!("List in {where_}"),
                            Problem::Schema {
                                kind: "List",
                                message: "items is not a list".into(),
                            },
                        )
                    });
                    return;
                }
            };
            for (i, item) in items.into_iter().enumerate() {
                add_value(out, file, &format!("{where_} items[{i}]"), item);
            }
        }
        ("v1", "Namespace") => add_object(
            out,
            file,
            "Namespace",
            &name,
            value,
            convert_namespace,
            |c, ns| c.namespaces.insert(ns.name.clone(), ns).is_some(),
        ),
        ("v1", "Pod") => add_object(out, file, "Pod", &name, value, convert_pod, |c, pod| {
            c.pods.insert(pod.object_ref(), pod).is_some()
        }),
        ("v1", "Service") => add_object(
            out,
            file,
            "Service",
            &name,
            value,
            super::services::convert_service,
            |c, svc| c.services.insert(svc.object_ref(), svc).is_some(),
        ),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            add_object(
                out,
                file,
                "EndpointSlice",
                &name,
                value,
                super::services::convert_endpoint_slice,
                |c, slice| c.endpoint_slices.insert(slice.object_ref(), slice).is_some(),
            );
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let object = format!("NetworkPolicy {name}");
            let c = match serde_json::from_value::<NetworkPolicy>(value.clone()) {
                Ok(np) => convert_policy(&np),
                Err(e) => fail_closed_policy(&value, &object, e.to_string()),
            };
            out.errors.extend(c.errors.into_iter().map(|e| e.in_file(file)));
            if let Some(p) = c.value
                && out.cluster.policies.insert(p.object_ref(), p).is_some()
            {
                out.errors.push(duplicate(file, &object));
            }
        }
        _ => out.errors.push(err(
            if name.is_empty() {
                format!("{kind} in {where_}")
            } else {
                format!("{kind} {name}")
            },
            Problem::UnsupportedKind { api_version, kind },
        )),
    }
}

/// Decodes `value` as a `K`, converts it and inserts it into the cluster (`insert` says whether it
/// replaced one read before); every problem is an error in `file`.
fn add_object<K: serde::de::DeserializeOwned, M>(
    out: &mut Loaded,
    file: &str,
    kind: &'static str,
    name: &str,
    value: serde_json::Value,
    convert: fn(&K) -> Converted<M>,
    insert: impl FnOnce(&mut model::Cluster, M) -> bool,
) {
    let object = format!("{kind} {name}");
    match serde_json::from_value::<K>(value) {
        Ok(k) => {
            let c = convert(&k);
            out.errors.extend(c.errors.into_iter().map(|e| e.in_file(file)));
            if let Some(m) = c.value
                && insert(&mut out.cluster, m)
            {
                out.errors.push(duplicate(file, &object));
            }
        }
        Err(e) => out.errors.push(LoadError {
            file: file.to_owned(),
            object,
            field: String::new(),
            problem: Problem::Schema {
                kind,
                message: e.to_string(),
            },
            effect: Effect::ObjectDropped,
        }),
    }
}

/// `namespace/name` of a raw object, for messages; `default` when the namespace is absent.
fn describe(value: &serde_json::Value) -> String {
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or("<no name>");
    if value.get("kind").and_then(|v| v.as_str()) == Some("Namespace") {
        return name.to_owned();
    }
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    format!("{ns}/{name}")
}

/// A NetworkPolicy that does not even decode still selects pods: if its `spec.podSelector` and
/// `spec.policyTypes` can be read, it becomes a policy with no rules, which isolates the pods it selects
/// and allows nothing (fail closed; directions it may affect are all isolated).
fn fail_closed_policy(
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
        }),
        errors,
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
mod tests {
    use super::*;
    use crate::model::ObjectRef;
    use crate::model::{Peer, PortRef, Protocol};
    use crate::policy::{Engine, lookup};

    fn policy(yaml: &str) -> (Option<model::NetworkPolicy>, Vec<LoadError>) {
        let l = parse_str("np.yaml", yaml);
        (l.cluster.policies.values().next().cloned(), l.errors)
    }

    fn np(spec: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np, namespace: prod}}\nspec:\n{spec}"
        )
    }

    #[test]
    fn multi_document_list_lab_and_unsupported() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: blue}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: web, labels: {app: web}}
  spec:
    nodeName: n1
    containers:
    - name: c
      ports: [{containerPort: 8080, name: http}, {containerPort: 53, protocol: UDP}]
  status: {podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: deny, namespace: prod}
  spec: {podSelector: {}}
---
apiVersion: lab.ztrust.io/v1
kind: Probe
metadata: {name: p}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: s, namespace: prod}
---
"#;
        let l = parse_str("all.yaml", text);
        let ns = &l.cluster.namespaces["prod"];
        assert_eq!(ns.labels.get("team").map(String::as_str), Some("blue"));
        assert_eq!(
            ns.labels.get(NAMESPACE_NAME_LABEL).map(String::as_str),
            Some("prod")
        );
        let pod = &l.cluster.pods[&ObjectRef::new("default", "web")];
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(pod.node_name.as_deref(), Some("n1"));
        assert_eq!(
            pod.ports[0],
            model::ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(pod.ports[1].protocol, Protocol::Udp);
        assert!(!pod.host_network);
        assert!(l.cluster.policies.contains_key(&ObjectRef::new("prod", "deny")));
        assert_eq!(l.lab_objects.len(), 1);
        assert_eq!(l.errors.len(), 1, "{:?}", l.errors);
        let msg = l.errors[0].to_string();
        assert!(
            msg.contains("all.yaml") && msg.contains("Deployment prod/s") && msg.contains("unsupported kind"),
            "{msg}"
        );
    }

    #[test]
    fn json_and_syntax_errors() {
        let l = parse_str(
            "p.json",
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"x","namespace":"a"},"spec":{"containers":[],"hostNetwork":true},"status":{"podIP":"10.0.0.9"}}"#,
        );
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        let pod = &l.cluster.pods[&ObjectRef::new("a", "x")];
        assert!(pod.host_network);
        assert_eq!(pod.ips, vec!["10.0.0.9".parse::<IpAddr>().expect("ip")]);
        let l = parse_str("bad.yaml", "kind: [unclosed");
        assert!(
            l.errors[0]
                .to_string()
                .starts_with("bad.yaml: document #1: cannot parse"),
            "{}",
            l.errors[0]
        );
    }

    #[test]
    fn pod_validation_drops_only_the_bad_values() {
        let l = parse_str(
            "pod.yaml",
            r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: a}
spec:
  containers:
  - ports: [{containerPort: 0}, {containerPort: 80, name: HTTP}, {containerPort: 81, protocol: ICMP}, {containerPort: 82, name: web}]
status: {podIPs: [{ip: 10.0.0.300}, {ip: 10.0.0.3}]}
"#,
        );
        let pod = &l.cluster.pods[&ObjectRef::new("a", "web")];
        assert_eq!(pod.ips, vec!["10.0.0.3".parse::<IpAddr>().expect("ip")]);
        assert_eq!(pod.ports.len(), 1);
        let msgs: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
        assert_eq!(msgs.len(), 4, "{msgs:#?}");
        assert!(
            msgs.iter()
                .any(|m| m.contains("pod.yaml: Pod a/web: status.podIPs[0].ip: invalid IP address")),
            "{msgs:#?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("spec.containers[0].ports[0].containerPort")),
            "{msgs:#?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("spec.containers[0].ports[1].name")),
            "{msgs:#?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("spec.containers[0].ports[2].protocol")),
            "{msgs:#?}"
        );
    }

    #[test]
    fn policy_types_are_defaulted_as_the_api_server_does() {
        let (p, e) = policy(&np("  podSelector: {}\n"));
        let p = p.expect("policy");
        assert!(e.is_empty());
        assert_eq!(p.namespace, "prod");
        assert!(p.isolates_ingress && !p.isolates_egress, "Ingress always");
        let (p, _) = policy(&np("  podSelector: {}\n  egress: [{}]\n"));
        let p = p.expect("policy");
        assert!(
            p.isolates_ingress && p.isolates_egress,
            "an egress rule adds Egress"
        );
        let (p, _) = policy(&np("  podSelector: {}\n  egress: []\n"));
        assert!(
            !p.expect("policy").isolates_egress,
            "an empty egress list has no egress rule"
        );
        let (p, _) = policy(&np(
            "  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n",
        ));
        let p = p.expect("policy");
        assert!(!p.isolates_ingress && p.isolates_egress);
        let (p, e) = policy(&np("  podSelector: {}\n  policyTypes: [Ingres]\n"));
        let p = p.expect("policy");
        assert!(
            p.isolates_ingress && p.isolates_egress,
            "unknown type: isolate both"
        );
        assert!(e[0].to_string().contains("spec.policyTypes[0]"));
    }

    #[test]
    fn empty_versus_absent() {
        let (p, _) = policy(&np("  podSelector: {}\n  ingress: [{}]\n"));
        let p = p.expect("policy");
        assert_eq!(
            p.ingress,
            vec![model::Rule::default()],
            "an empty rule allows everything"
        );
        let (p, _) = policy(&np("  podSelector: {}\n  ingress: [{from: [], ports: []}]\n"));
        assert_eq!(
            p.expect("policy").ingress,
            vec![model::Rule::default()],
            "empty lists = absent lists"
        );
        let (p, _) = policy(&np("  podSelector: {}\n  ingress: []\n"));
        let p = p.expect("policy");
        assert!(p.ingress.is_empty() && p.isolates_ingress, "no rules: deny all");
    }

    #[test]
    fn peers_and_ports() {
        let (p, e) = policy(&np(r#"
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: web}}
      namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [blue]}]}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    - ipBlock: {cidr: "fd00::/64"}
    ports:
    - {port: 5432}
    - {port: http, protocol: TCP}
    - {port: 32000, endPort: 32768, protocol: UDP}
    - {protocol: SCTP}
"#));
        assert!(e.is_empty(), "{e:?}");
        let r = &p.expect("policy").ingress[0];
        assert!(
            matches!(&r.peers[0], Peer::Pods { namespace_selector: Some(n), pod_selector: Some(_) } if n.match_expressions.len() == 1)
        );
        assert!(matches!(&r.peers[1], Peer::IpBlock { except, .. } if except.len() == 1));
        assert_eq!(r.ports[0].port, Some(PortRef::Number(5432)));
        assert_eq!(r.ports[0].protocol, Protocol::Tcp, "protocol defaults to TCP");
        assert_eq!(r.ports[1].port, Some(PortRef::Name("http".into())));
        assert_eq!(
            (r.ports[2].protocol, r.ports[2].end_port),
            (Protocol::Udp, Some(32768))
        );
        assert_eq!((r.ports[3].protocol, &r.ports[3].port), (Protocol::Sctp, &None));
    }

    /// Every validation error names the file, the object and the field.
    #[test]
    fn errors_name_file_object_and_field() {
        let cases = [
            (
                "  ingress: [{from: [{podSelector: {}}, {ipBlock: {cidr: 10.0.0.1}}]}]",
                "spec.ingress[0].from[1].ipBlock.cidr",
            ),
            (
                "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.1.0.0/25]}}]}]",
                "spec.ingress[0].from[0].ipBlock.except[0]",
            ),
            (
                "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24, except: [\"fd00::/120\"]}}]}]",
                "spec.ingress[0].from[0].ipBlock.except[0]",
            ),
            (
                "  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24}, podSelector: {}}]}]",
                "spec.egress[0].to[0]",
            ),
            ("  egress: [{to: [{}]}]", "spec.egress[0].to[0]"),
            (
                "  ingress: [{ports: [{port: 0}]}]",
                "spec.ingress[0].ports[0].port",
            ),
            (
                "  ingress: [{ports: [{port: 70000}]}]",
                "spec.ingress[0].ports[0].port",
            ),
            (
                "  ingress: [{ports: [{port: \"80\"}]}]",
                "spec.ingress[0].ports[0].port",
            ),
            (
                "  ingress: [{ports: [{port: Http}]}]",
                "spec.ingress[0].ports[0].port",
            ),
            (
                "  ingress: [{ports: [{port: a-very-long-port-name}]}]",
                "spec.ingress[0].ports[0].port",
            ),
            (
                "  ingress: [{ports: [{port: http, endPort: 90}]}]",
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                "  ingress: [{ports: [{endPort: 90}]}]",
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                "  ingress: [{ports: [{port: 100, endPort: 90}]}]",
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                "  ingress: [{ports: [{port: 100, protocol: ICMP}]}]",
                "spec.ingress[0].ports[0].protocol",
            ),
            (
                "  ingress: [{from: [{podSelector: {matchExpressions: [{key: a, operator: In}]}}]}]",
                "spec.ingress[0].from[0].podSelector.matchExpressions[0].values",
            ),
            (
                "  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}}]}]",
                "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values",
            ),
            (
                "  ingress: [{from: [{podSelector: {matchExpressions: [{key: a, operator: Equals, values: [x]}]}}]}]",
                "spec.ingress[0].from[0].podSelector.matchExpressions[0].operator",
            ),
        ];
        for (spec, field) in cases {
            let (p, e) = policy(&np(&format!("  podSelector: {{}}\n{spec}\n")));
            assert!(p.is_some(), "{spec}: the policy is kept");
            assert!(!e.is_empty(), "{spec}: an error");
            let msg = e[0].to_string();
            assert!(
                msg.starts_with(&format!("np.yaml: NetworkPolicy prod/np: {field}: ")),
                "{spec}: {msg}"
            );
        }
    }

    #[test]
    fn invalid_peer_or_port_fails_closed() {
        // Only invalid peers: the rule goes (it must not become "from everyone").
        let (p, e) = policy(&np(
            "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: bogus}}]}]\n",
        ));
        let p = p.expect("policy");
        assert_eq!(
            p.ingress,
            vec![matches_nothing()],
            "the rule is kept (indices), matching nothing"
        );
        assert!(p.isolates_ingress);
        assert!(e[0].to_string().contains("fail closed"), "{}", e[0]);
        // A valid and an invalid peer: the valid one stays.
        let (p, _) = policy(&np(
            "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: bogus}}, {podSelector: {}}]}]\n",
        ));
        assert_eq!(p.expect("policy").ingress[0].peers.len(), 1);
        // Only invalid ports: the rule goes (it must not become "all ports").
        let (p, _) = policy(&np(
            "  podSelector: {}\n  ingress: [{ports: [{port: 0}]}, {ports: [{port: 80}]}]\n",
        ));
        let p = p.expect("policy");
        assert_eq!(p.ingress[0], matches_nothing());
        assert_eq!(p.ingress[1].ports.len(), 1, "the next rule keeps its index");
        // An invalid except drops its peer: leaving the except out would allow what it excludes.
        let (p, _) = policy(&np(
            "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.1.0/24]}}]}]\n",
        ));
        assert_eq!(p.expect("policy").ingress, vec![matches_nothing()]);
        // An except equal to the cidr is not a strict subset.
        let (p, e) = policy(&np(
            "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.0/24]}}]}]\n",
        ));
        assert_eq!(p.expect("policy").ingress, vec![matches_nothing()]);
        assert!(e[0].to_string().contains("strict subset"), "{}", e[0]);
        // An invalid podSelector drops the policy.
        let (p, e) = policy(&np(
            "  podSelector: {matchExpressions: [{key: a, operator: In}]}\n",
        ));
        assert!(p.is_none());
        assert!(e.iter().any(|e| {
            e.to_string()
                .contains("spec.podSelector.matchExpressions[0].values")
        }));
    }

    #[test]
    fn undecodable_policy_still_isolates() {
        let (p, e) = policy(&np(
            "  podSelector: {matchLabels: {app: db}}\n  ingress: [{ports: [{port: [1]}]}]\n",
        ));
        let p = p.expect("fail-closed policy");
        assert!(p.isolates_ingress && p.isolates_egress && p.ingress.is_empty() && p.egress.is_empty());
        assert!(e[0].to_string().contains("allows nothing"), "{}", e[0]);
    }

    /// From files to verdicts: the invalid peer denies instead of allowing everyone.
    #[test]
    fn loaded_policy_enforces_fail_closed() {
        let text = format!(
            "{}\n---\n{}\n---\n{}",
            np("  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.2}}]}]\n"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: prod}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.1}",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: prod}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.2}",
        );
        let l = parse_str("x.yaml", &text);
        let d = Engine::new().compile(&l.cluster);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        assert!(!lookup(
            &d,
            b,
            a,
            ztrust_common::proto::TCP,
            80,
            &ObjectRef::new("prod", "a"),
            ztrust_common::dir::INGRESS
        ));
    }

    #[test]
    fn load_dir_reads_recursively_in_order_and_reports_duplicates() {
        let root = std::env::temp_dir().join(format!("ztrust-dir-test-{}", std::process::id()));
        let sub = root.join("sub");
        std::fs::create_dir_all(&sub).expect("mkdir");
        let pod = |ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {{containers: []}}\nstatus: {{podIP: {ip}}}\n"
            )
        };
        std::fs::write(root.join("a.yaml"), pod("10.0.0.1")).expect("write");
        std::fs::write(sub.join("b.yml"), pod("10.0.0.2")).expect("write");
        std::fs::write(root.join("ignored.txt"), "not: read").expect("write");
        std::fs::write(
            root.join("c.json"),
            r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"default"}}"#,
        )
        .expect("write");
        let l = load_dir(&root);
        let _ = std::fs::remove_dir_all(&root);
        let l = l.expect("load");
        // a.yaml < c.json < sub/b.yml: the later one wins and the duplicate is reported.
        assert_eq!(
            l.cluster.pods[&ObjectRef::new("default", "p")].ips,
            vec!["10.0.0.2".parse::<IpAddr>().expect("ip")]
        );
        assert!(l.cluster.namespaces.contains_key("default"));
        assert_eq!(l.errors.len(), 1, "{:?}", l.errors);
        assert_eq!(l.errors[0].problem, Problem::Duplicate);
    }

    fn k8s_selector(s: &model::LabelSelector) -> LabelSelector {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
        LabelSelector {
            match_labels: (!s.match_labels.is_empty()).then(|| s.match_labels.clone()),
            match_expressions: (!s.match_expressions.is_empty()).then(|| {
                s.match_expressions
                    .iter()
                    .map(|r| LabelSelectorRequirement {
                        key: r.key.clone(),
                        operator: format!("{:?}", r.operator),
                        values: (!r.values.is_empty()).then(|| r.values.iter().cloned().collect()),
                    })
                    .collect()
            }),
        }
    }

    /// The model policy written as the API object it came from (with explicit policyTypes).
    fn to_k8s(p: &model::NetworkPolicy) -> NetworkPolicy {
        use k8s_openapi::api::networking::v1::{
            IPBlock, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicySpec,
        };
        let peer = |peer: &Peer| match peer {
            Peer::Pods {
                namespace_selector,
                pod_selector,
            } => NetworkPolicyPeer {
                namespace_selector: namespace_selector.as_ref().map(k8s_selector),
                pod_selector: pod_selector.as_ref().map(k8s_selector),
                ip_block: None,
            },
            Peer::IpBlock { cidr, except } => NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: cidr.to_string(),
                    except: Some(except.iter().map(ToString::to_string).collect()),
                }),
                ..Default::default()
            },
        };
        let port = |p: &model::PortSpec| NetworkPolicyPort {
            protocol: Some(p.protocol.as_str().to_owned()),
            port: p.port.as_ref().map(|r| match r {
                PortRef::Number(n) => IntOrString::Int((*n).into()),
                PortRef::Name(s) => IntOrString::String(s.clone()),
            }),
            end_port: p.end_port.map(i32::from),
        };
        let mut types = Vec::new();
        if p.isolates_ingress {
            types.push("Ingress".to_owned());
        }
        if p.isolates_egress {
            types.push("Egress".to_owned());
        }
        NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(p.name.clone()),
                namespace: Some(p.namespace.clone()),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(k8s_selector(&p.pod_selector)),
                policy_types: Some(types),
                ingress: Some(
                    p.ingress
                        .iter()
                        .map(|r| NetworkPolicyIngressRule {
                            from: Some(r.peers.iter().map(peer).collect()),
                            ports: Some(r.ports.iter().map(port).collect()),
                        })
                        .collect(),
                ),
                egress: Some(
                    p.egress
                        .iter()
                        .map(|r| NetworkPolicyEgressRule {
                            to: Some(r.peers.iter().map(peer).collect()),
                            ports: Some(r.ports.iter().map(port).collect()),
                        })
                        .collect(),
                ),
            }),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// A valid policy converts back to exactly itself (through JSON, as a file would be read); an
        /// invalid one converts with errors into a policy that isolates the same pods and in which
        /// every rule is either unchanged, stripped of invalid entries, or matches nothing.
        #[test]
        fn policy_conversion_round_trips(p in crate::policy::proptests::policy(0)) {
            proptest::prop_assume!(p.isolates_ingress || p.isolates_egress);
            let json = serde_json::to_value(to_k8s(&p)).expect("serializes");
            let back: NetworkPolicy = serde_json::from_value(json).expect("deserializes");
            let c = convert_policy(&back);
            let Some(got) = c.value else {
                // Only an invalid podSelector drops the policy.
                proptest::prop_assert!(c.errors.iter().any(|e| e.field.starts_with("spec.podSelector")));
                return Ok(());
            };
            if c.errors.is_empty() {
                proptest::prop_assert_eq!(got, p);
            } else {
                proptest::prop_assert_eq!((got.isolates_ingress, got.isolates_egress), (p.isolates_ingress, p.isolates_egress));
                for (mine, orig) in got.ingress.iter().chain(&got.egress).zip(p.ingress.iter().chain(&p.egress)) {
                    let subset = mine.peers.iter().all(|x| orig.peers.contains(x))
                        && mine.ports.iter().all(|x| orig.ports.contains(x))
                        && (mine.peers.is_empty() == orig.peers.is_empty())
                        && (mine.ports.is_empty() == orig.ports.is_empty());
                    proptest::prop_assert!(subset || *mine == matches_nothing(), "{:?} from {:?}", mine, orig);
                }
            }
        }
    }
}
