//! The policy objects' answer for one hook: which policies isolate the pod, which rules (with which
//! peer and port) allow the connection, and why each of the others does not. Read as the API text says,
//! with the engine's own selector and namespace tests.

use std::net::IpAddr;

use ztrust_common::dir;

use super::{RuleMatch, RuleMiss};
use crate::model::{
    Cluster, LabelSelector, NetworkPolicy, ObjectRef, Peer, Pod, PortRef, PortSpec, Protocol, Rule,
};
use crate::policy::{matches, namespace_matches};

/// What the policy objects say of one hook.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectsSay {
    /// The policies that select the pod and isolate it in the direction, in name order.
    pub isolating: Vec<ObjectRef>,
    /// Every rule of them that allows the connection, in policy then rule order.
    pub matches: Vec<RuleMatch>,
    /// Every other rule of them, with why it does not.
    pub misses: Vec<RuleMiss>,
    /// Only audited policies (`ztrust.io/mode: audit`) isolate the direction: they decide it, and a
    /// denial is a would-drop. (Where an enforced policy isolates it, the audited ones are left out.)
    pub audited: bool,
}

/// The remote end of a hook's judgment: its address, the pod that has it (off the host network), and
/// whose named ports apply (the judged pod on ingress, the destination pod on egress).
pub struct Remote<'a> {
    pub ip: IpAddr,
    pub pod: Option<&'a Pod>,
    pub port: u16,
    pub protocol: Protocol,
    pub port_owner: Option<&'a Pod>,
}

/// The policies of `pod`'s namespace that select it and isolate it in `direction`, and each of their
/// rules checked against `remote`.
pub fn objects_say(cluster: &Cluster, pod: &Pod, direction: u8, remote: &Remote<'_>) -> ObjectsSay {
    let mut out = ObjectsSay::default();
    let ingress = direction == dir::INGRESS;
    let isolating: Vec<&NetworkPolicy> = cluster
        .policies
        .values()
        .filter(|p| {
            let isolates = if ingress {
                p.isolates_ingress
            } else {
                p.isolates_egress
            };
            p.namespace == pod.namespace && isolates && matches(&p.pod_selector, &pod.labels)
        })
        .collect();
    out.audited = !isolating.is_empty() && isolating.iter().all(|p| p.audit);
    for policy in isolating.into_iter().filter(|p| p.audit == out.audited) {
        out.isolating.push(policy.object_ref());
        let rules = if ingress { &policy.ingress } else { &policy.egress };
        for (index, rule) in rules.iter().enumerate() {
            match check_rule(cluster, policy, rule, ingress, remote) {
                Ok((peer, port)) => out.matches.push(RuleMatch {
                    policy: policy.object_ref(),
                    index,
                    peer,
                    port,
                }),
                Err(why) => out.misses.push(RuleMiss {
                    policy: policy.object_ref(),
                    index,
                    why,
                }),
            }
        }
    }
    out
}

/// The matching peer and port of `rule` as text, or why it does not match.
fn check_rule(
    cluster: &Cluster,
    policy: &NetworkPolicy,
    rule: &Rule,
    ingress: bool,
    remote: &Remote<'_>,
) -> Result<(String, String), String> {
    let field = if ingress { "from" } else { "to" };
    let peer = if rule.peers.is_empty() {
        Ok(format!("any peer (no `{field}`)"))
    } else {
        rule.peers
            .iter()
            .position(|p| peer_matches(cluster, policy, p, remote))
            .map(|i| format!("{field}[{i}]: {}", describe_peer(policy, &rule.peers[i])))
            .ok_or_else(|| {
                let listed: Vec<String> = rule
                    .peers
                    .iter()
                    .enumerate()
                    .map(|(i, p)| format!("{field}[{i}]: {}", describe_peer(policy, p)))
                    .collect();
                format!(
                    "{} is none of its peers ({})",
                    describe_remote(remote),
                    listed.join("; ")
                )
            })
    };
    let port = if rule.ports.is_empty() {
        Ok("any port (no `ports`)".to_owned())
    } else {
        rule.ports
            .iter()
            .position(|spec| port_matches(spec, remote))
            .map(|i| format!("ports[{i}]: {}", describe_port(&rule.ports[i], remote.port_owner)))
            .ok_or_else(|| {
                let listed: Vec<String> = rule
                    .ports
                    .iter()
                    .enumerate()
                    .map(|(i, s)| format!("ports[{i}]: {}", describe_port(s, remote.port_owner)))
                    .collect();
                format!(
                    "port {}/{} is none of its ports ({})",
                    remote.port,
                    remote.protocol,
                    listed.join("; ")
                )
            })
    };
    match (peer, port) {
        (Ok(peer), Ok(port)) => Ok((peer, port)),
        (Err(a), Err(b)) => Err(format!("{a}, and {b}")),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
    }
}

fn peer_matches(cluster: &Cluster, policy: &NetworkPolicy, peer: &Peer, remote: &Remote<'_>) -> bool {
    match peer {
        Peer::IpBlock { cidr, except } => {
            cidr.contains(&remote.ip) && !except.iter().any(|e| e.contains(&remote.ip))
        }
        Peer::Pods {
            namespace_selector,
            pod_selector,
        } => remote.pod.is_some_and(|pod| {
            let labels = cluster.namespaces.get(&pod.namespace).map(|n| &n.labels);
            namespace_matches(
                namespace_selector,
                &Some(policy.namespace.clone()),
                &pod.namespace,
                labels,
            ) && pod_selector.as_ref().is_none_or(|s| matches(s, &pod.labels))
        }),
    }
}

fn port_matches(spec: &PortSpec, remote: &Remote<'_>) -> bool {
    spec.protocol == remote.protocol
        && match &spec.port {
            None => true,
            Some(PortRef::Number(n)) => *n <= remote.port && remote.port <= spec.end_port.unwrap_or(*n),
            Some(PortRef::Name(name)) => {
                named_port(remote.port_owner, name, spec.protocol) == Some(remote.port)
            }
        }
}

/// The number `owner` declares for the container port `name` of `protocol`.
fn named_port(owner: Option<&Pod>, name: &str, protocol: Protocol) -> Option<u16> {
    owner?
        .ports
        .iter()
        .find(|c| c.name.as_deref() == Some(name) && c.protocol == protocol)
        .map(|c| c.port)
}

fn describe_remote(remote: &Remote<'_>) -> String {
    match remote.pod {
        Some(pod) => format!(
            "pod {} (labels {})",
            pod.object_ref(),
            labels_text(pod.labels.iter())
        ),
        None => format!("{} (no pod's address)", remote.ip),
    }
}

fn labels_text<'a>(labels: impl Iterator<Item = (&'a String, &'a String)>) -> String {
    let s: Vec<String> = labels.map(|(k, v)| format!("{k}={v}")).collect();
    if s.is_empty() {
        "none".to_owned()
    } else {
        s.join(",")
    }
}

/// A selector as `kubectl` writes one: `app=web,tier In (a,b)`; `{}` selects everything.
pub fn describe_selector(sel: &LabelSelector) -> String {
    let mut parts: Vec<String> = sel.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for r in &sel.match_expressions {
        let values: Vec<&str> = r.values.iter().map(String::as_str).collect();
        parts.push(match r.operator {
            crate::model::Operator::In => format!("{} in ({})", r.key, values.join(",")),
            crate::model::Operator::NotIn => format!("{} notin ({})", r.key, values.join(",")),
            crate::model::Operator::Exists => r.key.clone(),
            crate::model::Operator::DoesNotExist => format!("!{}", r.key),
        });
    }
    if parts.is_empty() {
        "{}".to_owned()
    } else {
        parts.join(",")
    }
}

fn describe_peer(policy: &NetworkPolicy, peer: &Peer) -> String {
    match peer {
        Peer::IpBlock { cidr, except } if except.is_empty() => format!("ipBlock {cidr}"),
        Peer::IpBlock { cidr, except } => format!(
            "ipBlock {cidr} except {}",
            except
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        Peer::Pods {
            namespace_selector,
            pod_selector,
        } => {
            let pods = match pod_selector {
                Some(s) => format!("pods {}", describe_selector(s)),
                None => "every pod".to_owned(),
            };
            match namespace_selector {
                None => format!("{pods} of namespace {}", policy.namespace),
                Some(n) => format!("{pods} of namespaces {}", describe_selector(n)),
            }
        }
    }
}

fn describe_port(spec: &PortSpec, owner: Option<&Pod>) -> String {
    match &spec.port {
        None => format!("every {} port", spec.protocol),
        Some(PortRef::Number(n)) => match spec.end_port {
            Some(end) if end != *n => format!("{n}-{end}/{}", spec.protocol),
            _ => format!("{n}/{}", spec.protocol),
        },
        Some(PortRef::Name(name)) => match (owner, named_port(owner, name, spec.protocol)) {
            (Some(pod), Some(n)) => format!("{name} ({n}/{} on {})", spec.protocol, pod.object_ref()),
            (Some(pod), None) => format!(
                "{name}/{} ({} declares no such port)",
                spec.protocol,
                pod.object_ref()
            ),
            (None, _) => format!(
                "{name}/{} (named: only a pod's own ports have names)",
                spec.protocol
            ),
        },
    }
}
