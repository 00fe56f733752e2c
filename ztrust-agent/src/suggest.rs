//! `ztrust-agent suggest --namespace NS`: least-privilege NetworkPolicies for a namespace, written from
//! the connections its pods were seen to make and take (allowed, or would-drop in audit mode; what was
//! dropped stays out). A default deny for both directions, the cluster's DNS for every pod, and one
//! policy per workload (pods of one set of labels, the per-pod ones left out) with an egress rule per
//! destination and an ingress rule per source: pods by their labels (and namespace), other addresses as
//! /32 or /128 ipBlocks, Services by the backends they reach and the ports those listen on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::datapath::sync::audit_namespaces;
use crate::explain::{Query, State, Target, explain};
use crate::flows::{Flow, Verdict};
use crate::model::{Cluster, Labels, Pod, Protocol};
use crate::policy::Engine;

/// Labels a controller sets per pod: a workload is its pods' other labels.
const PER_POD_LABELS: [&str; 7] = [
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    // A Job's run.
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
];

fn workload_labels(pod: &Pod) -> Labels {
    pod.labels
        .iter()
        .filter(|(k, _)| !PER_POD_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A peer as a rule names it: pods by labels (in a namespace), or an address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Peer {
    Pods { namespace: String, labels: Labels },
    Address(IpAddr),
}

/// One direction's rules of a workload: peer → (protocol, port) set.
type Rules = BTreeMap<Peer, BTreeSet<(Protocol, u16)>>;

#[derive(Default)]
struct Workload {
    egress: Rules,
    ingress: Rules,
}

/// What `suggest` wrote, and what it left out.
#[derive(Debug, Default)]
pub struct Suggestion {
    /// The policies, in the order written.
    pub policies: Vec<NetworkPolicy>,
    /// Connections seen and used.
    pub connections: usize,
    /// Why some flows were left out (dropped ones, pods without labels, …), with counts.
    pub left_out: BTreeMap<String, usize>,
}

impl Suggestion {
    /// The policies as one multi-document YAML text, with a header saying where they come from.
    pub fn to_yaml(&self, namespace: &str) -> Result<String, serde_yaml::Error> {
        let mut out = format!(
            "# Suggested by `ztrust-agent suggest --namespace {namespace}` from {} observed connections.\n\
             # Roll out in audit mode first (annotation ztrust.io/mode: audit on the Namespace or on each policy),\n\
             # then read `ztrust-agent flows --verdict would-drop` before enforcing.\n",
            self.connections
        );
        for (why, n) in &self.left_out {
            let s = if *n == 1 { "" } else { "s" };
            out.push_str(&format!("# Left out: {n} flow{s} ({why}).\n"));
        }
        for p in &self.policies {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(p)?);
        }
        Ok(out)
    }
}

fn selector(labels: &Labels) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels.clone()),
        match_expressions: None,
    }
}

fn policy(
    namespace: &str,
    name: String,
    pod_selector: LabelSelector,
    spec: NetworkPolicySpec,
) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_owned()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "ztrust-suggest".to_owned(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(pod_selector),
            ..spec
        }),
    }
}

fn peer(from: &str, p: &Peer) -> NetworkPolicyPeer {
    match p {
        Peer::Address(ip) => NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: ipnet::IpNet::from(*ip).to_string(),
                except: None,
            }),
            ..Default::default()
        },
        Peer::Pods { namespace, labels } => NetworkPolicyPeer {
            pod_selector: Some(selector(labels)),
            namespace_selector: (namespace != from)
                .then(|| selector(&[("kubernetes.io/metadata.name".to_owned(), namespace.clone())].into())),
            ip_block: None,
        },
    }
}

fn ports(set: &BTreeSet<(Protocol, u16)>) -> Vec<NetworkPolicyPort> {
    set.iter()
        .map(|(protocol, port)| NetworkPolicyPort {
            protocol: Some(protocol.as_str().to_owned()),
            port: Some(IntOrString::Int(i32::from(*port))),
            end_port: None,
        })
        .collect()
}

/// A name for a workload's policy: its `app` (or `app.kubernetes.io/name`) label, else its labels.
fn workload_name(labels: &Labels) -> String {
    let base = labels
        .get("app")
        .or_else(|| labels.get("app.kubernetes.io/name"))
        .cloned()
        .unwrap_or_else(|| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}-{v}"))
                .collect::<Vec<_>>()
                .join("-")
        });
    let clean: String = base
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(50)
        .collect();
    // A DNS-1123 subdomain: starts and ends with an alphanumeric character.
    let clean = clean.trim_matches('-');
    if clean.is_empty() {
        "workload".to_owned()
    } else {
        clean.to_owned()
    }
}

/// Policies for `namespace` from `flows`, judged against `cluster` (the pods, the Services and the DNS
/// pods they name).
pub fn suggest(cluster: &Cluster, namespace: &str, flows: &[Flow]) -> Suggestion {
    let desired = Engine::new().compile(cluster);
    let audit = audit_namespaces(cluster);
    let state = State {
        cluster,
        desired: &desired,
        node: crate::whatif::node_of(flows),
        audit_namespaces: &audit,
        audit_all: false,
    };
    let mut out = Suggestion::default();
    let mut skip = |why: &str| *out.left_out.entry(why.to_owned()).or_default() += 1;
    let mut workloads: BTreeMap<Labels, Workload> = BTreeMap::new();
    // Where a connection goes after the node's translation: a Service's backends at the ports they listen
    // on, else its own destination.
    let targets = |src: IpAddr, dst: IpAddr, port: u16, protocol: Protocol| -> Vec<(IpAddr, u16)> {
        let query = Query {
            from: Target::Address(src),
            to: Target::Address(dst),
            port,
            protocol,
        };
        match explain(&state, &query, None).ok().and_then(|x| x.service) {
            Some(s) => s.backends.iter().map(|b| (b.ip, b.port)).collect(),
            None => vec![(dst, port)],
        }
    };
    // A connection passes every hook on its way: one that a hook dropped (its source's egress may have
    // let it out, and recorded that; through a Service, the backend's ingress records the backend) was
    // blocked, and stays so.
    let dropped: BTreeSet<(IpAddr, IpAddr, u16, Protocol)> = flows
        .iter()
        .filter(|f| f.verdict == Verdict::Dropped)
        .filter_map(crate::whatif::connection)
        .flat_map(|(src, dst, port, protocol)| {
            targets(src, dst, port, protocol)
                .into_iter()
                .map(move |(ip, port)| (src, ip, port, protocol))
        })
        .collect();
    let mut seen = BTreeSet::new();
    for f in flows {
        let Some(key) = crate::whatif::connection(f) else {
            if f.new_connection && Protocol::from_number(f.protocol.0).is_none() {
                skip("no port (ICMP and other protocols): a rule with ports cannot name them");
            }
            continue;
        };
        if f.verdict == Verdict::Dropped {
            skip("of connections a hook dropped: what policy blocks now stays blocked");
            continue;
        }
        if !seen.insert(key) {
            continue;
        }
        let (src_ip, dst_ip, port, protocol) = key;
        let backends: Vec<(IpAddr, u16)> = targets(src_ip, dst_ip, port, protocol)
            .into_iter()
            .filter(|(ip, port)| {
                let blocked = dropped.contains(&(src_ip, *ip, *port, protocol));
                if blocked {
                    skip("of connections a hook dropped: what policy blocks now stays blocked");
                }
                !blocked
            })
            .collect();
        let src_in = cluster.pod_at(src_ip).filter(|p| p.namespace == namespace);
        let peer_of = |ip: IpAddr| match cluster.pod_at(ip) {
            Some(p) => {
                let labels = workload_labels(p);
                // No labels: a selector could only be every pod of the namespace.
                (!labels.is_empty()).then(|| Peer::Pods {
                    namespace: p.namespace.clone(),
                    labels,
                })
            }
            None => Some(Peer::Address(ip)),
        };
        let mut used = false;
        if let Some(s) = src_in {
            for (ip, port) in &backends {
                let Some(peer) = peer_of(*ip) else {
                    skip("to pods without labels: no selector names them alone");
                    continue;
                };
                workloads
                    .entry(workload_labels(s))
                    .or_default()
                    .egress
                    .entry(peer)
                    .or_default()
                    .insert((protocol, *port));
                used = true;
            }
        }
        for (ip, port) in &backends {
            let Some(d) = cluster.pod_at(*ip).filter(|p| p.namespace == namespace) else {
                continue;
            };
            if state.sent_by_node(src_ip) {
                // The node's own traffic is let in whatever policy says.
                continue;
            }
            let Some(peer) = peer_of(src_ip) else {
                skip("from pods without labels: no selector names them alone");
                continue;
            };
            workloads
                .entry(workload_labels(d))
                .or_default()
                .ingress
                .entry(peer)
                .or_default()
                .insert((protocol, *port));
            used = true;
        }
        // Neither end the namespace's: another namespace's traffic, not counted.
        out.connections += usize::from(used);
    }
    out.policies.push(policy(
        namespace,
        "default-deny".into(),
        LabelSelector::default(),
        NetworkPolicySpec {
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ..Default::default()
        },
    ));
    out.policies.push(dns_policy(cluster, namespace));
    let mut names: BTreeSet<String> = ["default-deny".to_owned(), "allow-dns".to_owned()].into();
    for (labels, w) in &workloads {
        if labels.is_empty() {
            // An empty selector would be every pod of the namespace.
            continue;
        }
        let base = workload_name(labels);
        let mut name = base.clone();
        let mut n = 1;
        while !names.insert(name.clone()) {
            n += 1;
            name = format!("{base}-{n}");
        }
        // DNS is the namespace-wide policy's.
        let dns = |peer: &Peer, set: &BTreeSet<(Protocol, u16)>| {
            matches!(peer, Peer::Pods { labels, .. } if is_dns(labels)) && set.iter().all(|(_, p)| *p == 53)
        };
        let egress: Vec<NetworkPolicyEgressRule> = w
            .egress
            .iter()
            .filter(|(p, set)| !dns(p, set))
            .map(|(p, set)| NetworkPolicyEgressRule {
                to: Some(vec![peer(namespace, p)]),
                ports: Some(ports(set)),
            })
            .collect();
        let ingress: Vec<NetworkPolicyIngressRule> = w
            .ingress
            .iter()
            .map(|(p, set)| NetworkPolicyIngressRule {
                from: Some(vec![peer(namespace, p)]),
                ports: Some(ports(set)),
            })
            .collect();
        if egress.is_empty() && ingress.is_empty() {
            continue;
        }
        let mut types = Vec::new();
        if !ingress.is_empty() {
            types.push("Ingress".to_owned());
        }
        if !egress.is_empty() {
            types.push("Egress".to_owned());
        }
        out.policies.push(policy(
            namespace,
            name,
            selector(labels),
            NetworkPolicySpec {
                policy_types: Some(types),
                ingress: (!ingress.is_empty()).then_some(ingress),
                egress: (!egress.is_empty()).then_some(egress),
                ..Default::default()
            },
        ));
    }
    out
}

/// Whether pods of `labels` are the cluster's DNS (CoreDNS / kube-dns), which `allow-dns` admits.
fn is_dns(labels: &Labels) -> bool {
    labels.get("k8s-app").is_some_and(|v| v == "kube-dns")
}

/// Every pod of `namespace` to the cluster's DNS pods on port 53 (UDP and TCP): the DNS pods as the
/// cluster has them (`k8s-app: kube-dns` in `kube-system` when it has none).
fn dns_policy(cluster: &Cluster, namespace: &str) -> NetworkPolicy {
    let dns = cluster
        .pods
        .values()
        .find(|p| p.labels.get("k8s-app").is_some_and(|v| v == "kube-dns"))
        .map(|p| {
            (
                p.namespace.clone(),
                [("k8s-app".to_owned(), "kube-dns".to_owned())].into(),
            )
        })
        .unwrap_or_else(|| {
            (
                "kube-system".to_owned(),
                [("k8s-app".to_owned(), "kube-dns".to_owned())].into(),
            )
        });
    let to = peer(
        namespace,
        &Peer::Pods {
            namespace: dns.0,
            labels: dns.1,
        },
    );
    policy(
        namespace,
        "allow-dns".into(),
        LabelSelector::default(),
        NetworkPolicySpec {
            policy_types: Some(vec!["Egress".into()]),
            egress: Some(vec![NetworkPolicyEgressRule {
                to: Some(vec![to]),
                ports: Some(ports(&[(Protocol::Udp, 53), (Protocol::Tcp, 53)].into())),
            }]),
            ..Default::default()
        },
    )
}

#[cfg(test)]
mod tests;
