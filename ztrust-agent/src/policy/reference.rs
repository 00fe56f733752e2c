//! A reference evaluator, written straight from the NetworkPolicy API text with no identities, no
//! caches and no cleverness, to check the engine against.
//! <https://kubernetes.io/docs/concepts/services-networking/network-policies/>

use std::net::IpAddr;

use ztrust_common::dir;

use crate::model::{Cluster, LabelSelector, Labels, NetworkPolicy, Operator, Peer, Pod, PortRef, Rule};

fn selector_matches(sel: &LabelSelector, labels: &Labels) -> bool {
    for (k, v) in &sel.match_labels {
        if labels.get(k) != Some(v) {
            return false;
        }
    }
    for r in &sel.match_expressions {
        let ok = match r.operator {
            Operator::In => labels.get(&r.key).is_some_and(|v| r.values.contains(v)),
            Operator::NotIn => !labels.get(&r.key).is_some_and(|v| r.values.contains(v)),
            Operator::Exists => labels.contains_key(&r.key),
            Operator::DoesNotExist => !labels.contains_key(&r.key),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// The pod (not on the host network) that has address `ip`.
fn pod_at(cluster: &Cluster, ip: IpAddr) -> Option<&Pod> {
    cluster
        .pods
        .values()
        .find(|p| !p.host_network && p.ips.contains(&ip))
}

/// Addresses of the node: its IPs and those of host-network pods.
fn is_host(cluster: &Cluster, ip: IpAddr) -> bool {
    cluster.node_ips.contains(&ip)
        || cluster
            .pods
            .values()
            .any(|p| p.host_network && p.ips.contains(&ip))
}

fn peer_matches(cluster: &Cluster, policy: &NetworkPolicy, peer: &Peer, remote: IpAddr) -> bool {
    match peer {
        Peer::IpBlock { cidr, except } => {
            cidr.contains(&remote) && !except.iter().any(|e| e.contains(&remote))
        }
        Peer::Pods {
            namespace_selector,
            pod_selector,
        } => {
            let Some(pod) = pod_at(cluster, remote) else {
                return false;
            };
            let ns_ok = match namespace_selector {
                None => pod.namespace == policy.namespace,
                Some(sel) => {
                    let labels = cluster
                        .namespaces
                        .get(&pod.namespace)
                        .map(|n| n.labels.clone())
                        .unwrap_or_default();
                    selector_matches(sel, &labels)
                }
            };
            ns_ok
                && pod_selector
                    .as_ref()
                    .is_none_or(|s| selector_matches(s, &pod.labels))
        }
    }
}

/// Whether `rule` admits the packet. `port_owner` is the pod whose named ports apply: the selected pod
/// on ingress, the destination pod (if any) on egress.
fn rule_matches(
    cluster: &Cluster,
    policy: &NetworkPolicy,
    rule: &Rule,
    remote: IpAddr,
    protocol: u8,
    dport: u16,
    port_owner: Option<&Pod>,
) -> bool {
    let peer_ok = rule.peers.is_empty()
        || rule
            .peers
            .iter()
            .any(|p| peer_matches(cluster, policy, p, remote));
    let port_ok = rule.ports.is_empty()
        || rule.ports.iter().any(|spec| {
            spec.protocol.number() == protocol
                && match &spec.port {
                    None => true,
                    Some(PortRef::Number(n)) => *n <= dport && dport <= spec.end_port.unwrap_or(*n),
                    Some(PortRef::Name(name)) => port_owner.is_some_and(|pod| {
                        pod.ports.iter().any(|c| {
                            c.name.as_deref() == Some(name.as_str())
                                && c.protocol == spec.protocol
                                && c.port == dport
                        })
                    }),
                }
        });
    peer_ok && port_ok
}

/// Whether `endpoint`'s `direction` hook alone lets the connection pass.
pub fn reference_direction(
    cluster: &Cluster,
    endpoint: &Pod,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    dport: u16,
    direction: u8,
) -> bool {
    let ingress = direction == dir::INGRESS;
    if ingress && is_host(cluster, src) {
        return true;
    }
    let remote = if ingress { src } else { dst };
    let selecting: Vec<&NetworkPolicy> = cluster
        .policies
        .values()
        .filter(|p| p.namespace == endpoint.namespace && selector_matches(&p.pod_selector, &endpoint.labels))
        .filter(|p| {
            if ingress {
                p.isolates_ingress
            } else {
                p.isolates_egress
            }
        })
        .collect();
    // `ztrust.io/mode: audit` (not Kubernetes, ztrust's): audited policies are left out where an enforced
    // one isolates the direction; where none does, whatever they deny is a would-drop, which passes.
    let selecting: Vec<&NetworkPolicy> = selecting.into_iter().filter(|p| !p.audit).collect();
    if selecting.is_empty() {
        return true;
    }
    let port_owner = if ingress {
        Some(endpoint)
    } else {
        pod_at(cluster, dst)
    };
    selecting.iter().any(|p| {
        let rules = if ingress { &p.ingress } else { &p.egress };
        rules
            .iter()
            .any(|r| rule_matches(cluster, p, r, remote, protocol, dport, port_owner))
    })
}

/// Whether a new connection from `src` to `dst` is allowed: by the egress side of `src`'s pod (if it
/// is a pod) and the ingress side of `dst`'s pod (if it is one).
pub fn reference_allowed(cluster: &Cluster, src: IpAddr, dst: IpAddr, protocol: u8, dport: u16) -> bool {
    let egress_ok = pod_at(cluster, src)
        .is_none_or(|p| reference_direction(cluster, p, src, dst, protocol, dport, dir::EGRESS));
    let ingress_ok = pod_at(cluster, dst)
        .is_none_or(|p| reference_direction(cluster, p, src, dst, protocol, dport, dir::INGRESS));
    egress_ok && ingress_ok
}
