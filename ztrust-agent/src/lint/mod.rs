//! `ztrust-agent lint`: the traps of NetworkPolicy that enforce what their author did not mean, found
//! in a directory of manifests or the live cluster. Each finding has a stable code, the object and
//! field, why it matters and the fix; the exit status says whether there were any (for CI).
//!
//! The checks read the model the agent enforces ([`crate::model::Cluster`]), so what they call a
//! policy's effect is the agent's: an object the source could not convert is a finding itself
//! (`ZT000`), with the source's own words for what was wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::model::{Cluster, NetworkPolicy, Peer, Pod, PortRef, PortSpec, Protocol, Rule};
use crate::policy::{matches, namespace_matches};
use crate::source::LoadError;

mod load;
#[cfg(test)]
mod tests;

pub use load::load_dir;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth a look: the policy may do what was meant.
    Warning,
    /// The policy does not do what it says, or leaves a path open that default deny is meant to close.
    Error,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One check: its stable code and name, how bad it is, why it matters and how to fix it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Check {
    pub code: &'static str,
    pub name: &'static str,
    pub severity: Severity,
    pub why: &'static str,
    pub fix: &'static str,
}

pub const INVALID: Check = Check {
    code: "ZT000",
    name: "invalid-object",
    severity: Severity::Error,
    why: "the agent cannot enforce the object as written; it enforces the closed reading described",
    fix: "correct the field named",
};
pub const NO_DEFAULT_DENY_INGRESS: Check = Check {
    code: "ZT001",
    name: "no-default-deny-ingress",
    severity: Severity::Error,
    why: "pods of this namespace that no policy selects accept connections from anywhere: allow policies only \
          restrict the pods they select",
    fix: "add a policy with `podSelector: {}` and `policyTypes: [Ingress]` (and no ingress rules) to the namespace",
};
pub const NO_DEFAULT_DENY_EGRESS: Check = Check {
    code: "ZT002",
    name: "no-default-deny-egress",
    severity: Severity::Warning,
    why: "pods of this namespace that no policy isolates for egress can connect anywhere, the first step of \
          lateral movement and exfiltration",
    fix: "add a policy with `podSelector: {}` and `policyTypes: [Egress]` to the namespace, with a DNS rule",
};
pub const NO_DNS: Check = Check {
    code: "ZT003",
    name: "egress-without-dns",
    severity: Severity::Error,
    why: "these pods' egress is isolated and no rule admits DNS (UDP port 53) to a server that can answer: name \
          lookups fail, and with them every connection by name",
    fix: "add an egress rule to the cluster's DNS pods on UDP and TCP 53 (namespaceSelector \
          kubernetes.io/metadata.name: kube-system, podSelector k8s-app: kube-dns)",
};
pub const DNS_TO_ANYWHERE: Check = Check {
    code: "ZT004",
    name: "dns-to-anywhere",
    severity: Severity::Warning,
    why: "the rule admits port 53 to every destination, not only the cluster's DNS: a compromised pod can tunnel \
          data out through any DNS server, or anything listening on port 53",
    fix: "add `to:` with the DNS pods (namespaceSelector kubernetes.io/metadata.name: kube-system, podSelector \
          k8s-app: kube-dns)",
};
pub const SELECTS_NO_POD: Check = Check {
    code: "ZT005",
    name: "selects-no-pod",
    severity: Severity::Warning,
    why: "the podSelector matches no pod of the namespace: the policy protects nothing (a typo in a label is the \
          usual cause)",
    fix: "correct the podSelector, or delete the policy",
};
pub const UNKNOWN_NAMED_PORT: Check = Check {
    code: "ZT006",
    name: "unknown-named-port",
    severity: Severity::Error,
    why: "no pod the port applies to declares a container port of this name and protocol: the port matches \
          nothing, and traffic meant for it is dropped",
    fix: "use the name (and protocol) of a containerPort of the pods, or the port number",
};
pub const IPBLOCK_COVERS_CLUSTER: Check = Check {
    code: "ZT007",
    name: "ipblock-covers-cluster",
    severity: Severity::Warning,
    why: "the ipBlock contains pod or Service addresses: ipBlock is for addresses outside the cluster, pods are \
          matched by their labels (and change address when they restart), and a Service is judged by the pods \
          behind it, not by its ClusterIP",
    fix: "select pods with podSelector/namespaceSelector, and carve the cluster's ranges out with `except`",
};
pub const REDUNDANT_RULE: Check = Check {
    code: "ZT008",
    name: "redundant-rule",
    severity: Severity::Warning,
    why: "another rule for the same pods admits everything this one does: it changes nothing, and its intent \
          (a narrower path) is not enforced",
    fix: "delete the rule, or narrow the one that covers it",
};
pub const IGNORED_EGRESS_RULES: Check = Check {
    code: "ZT009",
    name: "egress-rules-ignored",
    severity: Severity::Error,
    why: "the policy has egress rules but its explicit policyTypes has no `Egress`: the rules are ignored and \
          the policy does not isolate egress",
    fix: "add `Egress` to policyTypes (or remove the egress rules)",
};
pub const IGNORED_INGRESS_RULES: Check = Check {
    code: "ZT010",
    name: "ingress-rules-ignored",
    severity: Severity::Error,
    why: "the policy has ingress rules but its explicit policyTypes has no `Ingress`: the rules are ignored and \
          the policy does not isolate ingress",
    fix: "add `Ingress` to policyTypes (or remove the ingress rules)",
};

/// Every check, in code order.
pub const CHECKS: &[Check] = &[
    INVALID,
    NO_DEFAULT_DENY_INGRESS,
    NO_DEFAULT_DENY_EGRESS,
    NO_DNS,
    DNS_TO_ANYWHERE,
    SELECTS_NO_POD,
    UNKNOWN_NAMED_PORT,
    IPBLOCK_COVERS_CLUSTER,
    REDUNDANT_RULE,
    IGNORED_EGRESS_RULES,
    IGNORED_INGRESS_RULES,
];

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub code: &'static str,
    pub check: &'static str,
    pub severity: Severity,
    /// `Kind namespace/name` (`Namespace name`).
    pub object: String,
    /// The namespace the object is in (or is); empty for an object of no namespace.
    pub namespace: String,
    /// The field path in the object (`spec.egress[1]`); empty for the object as a whole.
    pub field: String,
    /// What was found, in this object's terms.
    pub message: String,
    pub why: &'static str,
    pub fix: &'static str,
}

fn finding(check: Check, object: String, field: impl Into<String>, message: String) -> Finding {
    // `Kind namespace/name` or `Namespace name`.
    let namespace = match object.split_once(' ') {
        Some(("Namespace", name)) => name.to_owned(),
        Some((_, rest)) => rest
            .split_once('/')
            .map(|(ns, _)| ns.to_owned())
            .unwrap_or_default(),
        None => String::new(),
    };
    Finding {
        code: check.code,
        check: check.name,
        severity: check.severity,
        object,
        namespace,
        field: field.into(),
        message,
        why: check.why,
        fix: check.fix,
    }
}

fn policy_object(p: &NetworkPolicy) -> String {
    format!("NetworkPolicy {}/{}", p.namespace, p.name)
}

/// What the cluster around the policies is known to be: with no pods (a directory of policies only),
/// the checks that need pods say nothing.
struct Lint<'a> {
    cluster: &'a Cluster,
    pods: Vec<&'a Pod>,
}

/// Every finding for `cluster`, the source's `errors` first, then by object and code.
pub fn lint(cluster: &Cluster, errors: &[LoadError]) -> Vec<Finding> {
    let mut out: Vec<Finding> = errors
        .iter()
        .map(|e| {
            let message = format!("{}{} ({})", e.problem, e.effect, e.origin);
            finding(INVALID, e.object.clone(), e.field.clone(), message)
        })
        .collect();
    let l = Lint {
        cluster,
        pods: cluster.pods.values().filter(|p| !p.host_network).collect(),
    };
    let mut found = Vec::new();
    l.default_deny(&mut found);
    for p in cluster.policies.values() {
        l.policy_types(p, &mut found);
        l.selects_no_pod(p, &mut found);
        l.dns_to_anywhere(p, &mut found);
        l.named_ports(p, &mut found);
        l.ipblocks(p, &mut found);
    }
    l.no_dns(&mut found);
    l.redundant(&mut found);
    // Stable: within an object and code, the order the checks found them in (rule order).
    found.sort_by(|a, b| (&a.object, a.code).cmp(&(&b.object, b.code)));
    out.extend(found);
    out
}

impl Lint<'_> {
    fn selects(&self, p: &NetworkPolicy, pod: &Pod) -> bool {
        pod.namespace == p.namespace && matches(&p.pod_selector, &pod.labels)
    }

    /// Whether `peer` of a rule of `p` can be `pod`.
    fn peer_is(&self, p: &NetworkPolicy, peer: &Peer, pod: &Pod) -> bool {
        match peer {
            Peer::Pods {
                namespace_selector,
                pod_selector,
            } => {
                let ns_labels = self.cluster.namespaces.get(&pod.namespace).map(|n| &n.labels);
                namespace_matches(
                    namespace_selector,
                    &Some(p.namespace.clone()),
                    &pod.namespace,
                    ns_labels,
                ) && pod_selector.as_ref().is_none_or(|s| matches(s, &pod.labels))
            }
            Peer::IpBlock { .. } => false,
        }
    }

    /// ZT001, ZT002: namespaces with pods that no policy isolates.
    fn default_deny(&self, out: &mut Vec<Finding>) {
        let mut namespaces: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
        for pod in &self.pods {
            namespaces.entry(pod.namespace.as_str()).or_default().push(pod);
        }
        for (ns, pods) in namespaces {
            for (check, isolates) in [
                (
                    NO_DEFAULT_DENY_INGRESS,
                    (|p: &NetworkPolicy| p.isolates_ingress) as fn(&NetworkPolicy) -> bool,
                ),
                (NO_DEFAULT_DENY_EGRESS, |p: &NetworkPolicy| p.isolates_egress),
            ] {
                let open: Vec<&str> = pods
                    .iter()
                    .filter(|pod| {
                        !self
                            .cluster
                            .policies
                            .values()
                            .any(|p| isolates(p) && self.selects(p, pod))
                    })
                    .map(|pod| pod.name.as_str())
                    .collect();
                if !open.is_empty() {
                    let message = format!(
                        "{} of {} pods isolated by no policy: {}",
                        open.len(),
                        pods.len(),
                        list(&open)
                    );
                    out.push(finding(check, format!("Namespace {ns}"), "", message));
                }
            }
        }
    }

    /// ZT009, ZT010: rules of a direction the policy does not affect.
    fn policy_types(&self, p: &NetworkPolicy, out: &mut Vec<Finding>) {
        if !p.isolates_egress && !p.egress.is_empty() {
            let message = format!("{} egress rules, policyTypes without Egress", p.egress.len());
            out.push(finding(
                IGNORED_EGRESS_RULES,
                policy_object(p),
                "spec.policyTypes",
                message,
            ));
        }
        if !p.isolates_ingress && !p.ingress.is_empty() {
            let message = format!("{} ingress rules, policyTypes without Ingress", p.ingress.len());
            out.push(finding(
                IGNORED_INGRESS_RULES,
                policy_object(p),
                "spec.policyTypes",
                message,
            ));
        }
    }

    /// ZT005, for namespaces with pods (a namespace whose pods are not in the source, or not created yet,
    /// says nothing).
    fn selects_no_pod(&self, p: &NetworkPolicy, out: &mut Vec<Finding>) {
        let in_ns = self
            .pods
            .iter()
            .filter(|pod| pod.namespace == p.namespace)
            .count();
        if in_ns == 0 || self.pods.iter().any(|pod| self.selects(p, pod)) {
            return;
        }
        let message = format!("no pod of namespace {} ({} pods) matches it", p.namespace, in_ns);
        out.push(finding(
            SELECTS_NO_POD,
            policy_object(p),
            "spec.podSelector",
            message,
        ));
    }

    /// ZT004: an egress rule to every destination with port 53 among its ports.
    fn dns_to_anywhere(&self, p: &NetworkPolicy, out: &mut Vec<Finding>) {
        if !p.isolates_egress {
            return;
        }
        for (i, rule) in p.egress.iter().enumerate() {
            let to_anywhere = rule.peers.is_empty()
                || rule
                    .peers
                    .iter()
                    .any(|peer| matches!(peer, Peer::IpBlock { cidr, .. } if cidr.prefix_len() == 0));
            let dns = !rule.ports.is_empty() && rule.ports.iter().any(|s| covers(s, 53));
            if to_anywhere && dns {
                let message = "port 53 to any address (no `to`, or an ipBlock of everything)".to_owned();
                out.push(finding(
                    DNS_TO_ANYWHERE,
                    policy_object(p),
                    format!("spec.egress[{i}]"),
                    message,
                ));
            }
        }
    }

    /// ZT006: named ports that no pod the port applies to declares (ingress: the selected pods; egress:
    /// the pods its peers select). Only when the source has pods.
    fn named_ports(&self, p: &NetworkPolicy, out: &mut Vec<Finding>) {
        if self.pods.is_empty() {
            return;
        }
        let selected: Vec<&Pod> = self
            .pods
            .iter()
            .copied()
            .filter(|pod| self.selects(p, pod))
            .collect();
        let sides = [("ingress", &p.ingress), ("egress", &p.egress)];
        for (direction, rules) in sides {
            for (i, rule) in rules.iter().enumerate() {
                let targets: Vec<&Pod> = if direction == "ingress" {
                    selected.clone()
                } else if rule.peers.is_empty() {
                    self.pods.clone()
                } else {
                    let pods = self.pods.iter().copied();
                    pods.filter(|pod| {
                        rule.peers
                            .iter()
                            .any(|peer| self.peer_is(p, peer, pod) || inside(peer, pod))
                    })
                    .collect()
                };
                for (j, spec) in rule.ports.iter().enumerate() {
                    let Some(PortRef::Name(name)) = &spec.port else {
                        continue;
                    };
                    let declared = targets.iter().any(|pod| {
                        pod.ports
                            .iter()
                            .any(|c| c.name.as_deref() == Some(name.as_str()) && c.protocol == spec.protocol)
                    });
                    if !declared {
                        let message = if targets.is_empty() && direction == "egress" {
                            format!(
                                "{}/{}: its peers are no pods (a named port never matches an address outside \
                                 the cluster)",
                                name,
                                spec.protocol.as_str()
                            )
                        } else {
                            format!(
                                "no pod it applies to ({} pods) declares {}/{}",
                                targets.len(),
                                name,
                                spec.protocol.as_str()
                            )
                        };
                        let field = format!("spec.{direction}[{i}].ports[{j}].port");
                        out.push(finding(UNKNOWN_NAMED_PORT, policy_object(p), field, message));
                    }
                }
            }
        }
    }

    /// ZT007: ipBlocks that contain pod or Service addresses (not carved out by an `except`).
    fn ipblocks(&self, p: &NetworkPolicy, out: &mut Vec<Finding>) {
        let pods: Vec<IpAddr> = self.pods.iter().flat_map(|pod| pod.ips.iter().copied()).collect();
        let services: Vec<IpAddr> = self
            .cluster
            .services
            .values()
            .flat_map(|s| s.cluster_ips.iter().copied())
            .collect();
        let sides = [("ingress", "from", &p.ingress), ("egress", "to", &p.egress)];
        for (direction, peers_field, rules) in sides {
            for (i, rule) in rules.iter().enumerate() {
                for (j, peer) in rule.peers.iter().enumerate() {
                    let Peer::IpBlock { cidr, except } = peer else {
                        continue;
                    };
                    if cidr.prefix_len() == 0 {
                        // "Everything" is meant to be everything (ZT004 speaks of it for DNS).
                        continue;
                    }
                    let inside = |a: &&IpAddr| in_block(cidr, except, a);
                    let (p_in, s_in) = (
                        pods.iter().filter(inside).count(),
                        services.iter().filter(inside).count(),
                    );
                    // The cluster's Service ranges (the live cluster's ServiceCIDRs): overlapping, and
                    // not carved out whole.
                    let ranges: Vec<String> = self
                        .cluster
                        .service_cidrs
                        .iter()
                        .filter(|r| {
                            (cidr.contains(&r.network()) || r.contains(&cidr.network()))
                                && !except
                                    .iter()
                                    .any(|e| e.contains(&r.network()) && e.prefix_len() <= r.prefix_len())
                        })
                        .map(ToString::to_string)
                        .collect();
                    if p_in + s_in > 0 || !ranges.is_empty() {
                        let mut message = format!("{cidr} contains {p_in} pod and {s_in} Service addresses");
                        if !ranges.is_empty() {
                            message
                                .push_str(&format!(", and overlaps the Service range {}", ranges.join(", ")));
                        }
                        let field = format!("spec.{direction}[{i}].{peers_field}[{j}].ipBlock");
                        out.push(finding(IPBLOCK_COVERS_CLUSTER, policy_object(p), field, message));
                    }
                }
            }
        }
    }

    /// ZT003: pods whose egress is isolated with no rule admitting UDP 53 (grouped by the policies that
    /// isolate them). Only when the source has pods.
    fn no_dns(&self, out: &mut Vec<Finding>) {
        // The policies isolating a pod's egress, by name → the pods.
        let mut groups: BTreeMap<Vec<(&str, &str)>, Isolated<'_>> = BTreeMap::new();
        for pod in &self.pods {
            let isolating: Vec<&NetworkPolicy> = self
                .cluster
                .policies
                .values()
                .filter(|p| p.isolates_egress && self.selects(p, pod))
                .collect();
            if isolating.is_empty() {
                continue;
            }
            let dns = isolating
                .iter()
                .any(|p| p.egress.iter().any(|rule| self.is_dns_path(p, rule)));
            if !dns {
                let key = isolating
                    .iter()
                    .map(|p| (p.namespace.as_str(), p.name.as_str()))
                    .collect();
                let group = groups.entry(key).or_insert_with(|| (isolating, Vec::new()));
                group.1.push(pod);
            }
        }
        for (policies, pods) in groups.into_values() {
            let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
            let by: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
            let message = format!(
                "{} pods ({}), egress isolated by {}",
                pods.len(),
                list(&names),
                by.join(", ")
            );
            // Named by the first policy that isolates them: the one to add the rule to, or beside.
            out.push(finding(
                NO_DNS,
                policy_object(policies[0]),
                "spec.egress",
                message,
            ));
        }
    }

    /// Whether `rule` (of `p`) can carry DNS: its ports admit UDP 53 (a named port: one a pod declares as
    /// UDP 53) and its peers can be a DNS server — every address, an ipBlock, pods that declare UDP
    /// 53, or pods the source does not have (the cluster's DNS pods are seldom in an application's
    /// manifests). A rule to known pods none of which serves DNS is no DNS path.
    fn is_dns_path(&self, p: &NetworkPolicy, rule: &Rule) -> bool {
        let serves_dns = |pod: &Pod| {
            pod.ports
                .iter()
                .any(|c| c.protocol == Protocol::Udp && c.port == 53)
        };
        let port_ok = rule.ports.is_empty()
            || rule.ports.iter().any(|s| {
                s.protocol == Protocol::Udp
                    && match &s.port {
                        Some(PortRef::Name(name)) => self.pods.iter().any(|pod| {
                            pod.ports.iter().any(|c| {
                                c.name.as_deref() == Some(name.as_str())
                                    && c.protocol == Protocol::Udp
                                    && c.port == 53
                            })
                        }),
                        _ => covers(s, 53),
                    }
            });
        let peer_ok = rule.peers.is_empty()
            || rule.peers.iter().any(|peer| match peer {
                Peer::IpBlock { .. } => true,
                Peer::Pods { .. } => {
                    let matched: Vec<&&Pod> = self.pods.iter().filter(|pod| self.peer_is(p, peer, pod)).collect();
                    let placeholder = matches!(peer, Peer::Pods { pod_selector: Some(s), .. }
                        if s.match_expressions.iter().any(|r| r.key == crate::source::convert::MATCHES_NOTHING_KEY));
                    !placeholder && (matched.is_empty() || matched.iter().any(|pod| serves_dns(pod)))
                }
            });
        port_ok && peer_ok
    }

    /// ZT008: a rule another rule of the same direction covers: its policy selects at least the same
    /// pods (the same podSelector, or `{}` in the namespace) and it admits at least the same peers on
    /// at least the same ports (every peer or port, or a superset of them, compared as sets). Of two
    /// equal rules the later is named.
    fn redundant(&self, out: &mut Vec<Finding>) {
        type Entry<'a> = (
            &'a NetworkPolicy,
            usize,
            &'a Rule,
            BTreeSet<String>,
            BTreeSet<String>,
        );
        let mut by_ns: BTreeMap<&str, Vec<&NetworkPolicy>> = BTreeMap::new();
        for p in self.cluster.policies.values() {
            by_ns.entry(p.namespace.as_str()).or_default().push(p);
        }
        let set = |items: Vec<String>| -> BTreeSet<String> { items.into_iter().collect() };
        for policies in by_ns.values() {
            for direction in ["ingress", "egress"] {
                let rules: Vec<Entry<'_>> = policies
                    .iter()
                    .filter(|p| {
                        if direction == "ingress" {
                            p.isolates_ingress
                        } else {
                            p.isolates_egress
                        }
                    })
                    .flat_map(|p| {
                        let rules = if direction == "ingress" {
                            &p.ingress
                        } else {
                            &p.egress
                        };
                        rules.iter().enumerate().map(move |(i, r)| {
                            let peers = set(r.peers.iter().map(|x| format!("{x:?}")).collect());
                            let ports = set(r.ports.iter().map(|x| format!("{x:?}")).collect());
                            (*p, i, r, peers, ports)
                        })
                    })
                    .collect();
                for (k, (p, i, rule, peers, ports)) in rules.iter().enumerate() {
                    let covering = rules.iter().enumerate().find(|(j, (q, _, r, q_peers, q_ports))| {
                        let equal = q_peers == peers
                            && q_ports == ports
                            && r.peers.is_empty() == rule.peers.is_empty();
                        *j != k
                            && (q.pod_selector == p.pod_selector || is_everything(&q.pod_selector))
                            && (r.peers.is_empty() || (!rule.peers.is_empty() && q_peers.is_superset(peers)))
                            && (r.ports.is_empty() || (!rule.ports.is_empty() && q_ports.is_superset(ports)))
                            // Of two that cover each other, the earlier stays.
                            && !(equal && q.pod_selector == p.pod_selector && *j > k)
                    });
                    if let Some((_, (q, qi, ..))) = covering {
                        let message = format!("covered by {}/{} spec.{direction}[{qi}]", q.namespace, q.name);
                        out.push(finding(
                            REDUNDANT_RULE,
                            policy_object(p),
                            format!("spec.{direction}[{i}]"),
                            message,
                        ));
                    }
                }
            }
        }
    }
}

/// Whether a selector selects every pod (`{}`).
fn is_everything(sel: &crate::model::LabelSelector) -> bool {
    sel.match_labels.is_empty() && sel.match_expressions.is_empty()
}

/// The policies isolating some pods' egress, and those pods.
type Isolated<'a> = (Vec<&'a NetworkPolicy>, Vec<&'a Pod>);

/// Whether the ipBlock `cidr` with `except` contains `addr`.
fn in_block(cidr: &IpNet, except: &[IpNet], addr: &IpAddr) -> bool {
    cidr.contains(addr) && !except.iter().any(|e| e.contains(addr))
}

/// Whether `peer` is an ipBlock containing one of `pod`'s addresses.
fn inside(peer: &Peer, pod: &Pod) -> bool {
    match peer {
        Peer::IpBlock { cidr, except } => pod.ips.iter().any(|a| in_block(cidr, except, a)),
        Peer::Pods { .. } => false,
    }
}

/// Whether a port spec admits `port` (of its protocol).
fn covers(spec: &PortSpec, port: u16) -> bool {
    match (&spec.port, spec.end_port) {
        (None, _) => true,
        (Some(PortRef::Number(n)), None) => *n == port,
        (Some(PortRef::Number(n)), Some(end)) => (*n..=end).contains(&port),
        (Some(PortRef::Name(_)), _) => false,
    }
}

/// The first names, then how many more.
fn list(names: &[&str]) -> String {
    const SHOWN: usize = 5;
    let mut s = names.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", and {} more", names.len() - SHOWN));
    }
    s
}

/// The findings as a table: one line each, then why and how to fix each code found.
pub fn render(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return "no findings\n".to_owned();
    }
    let mut out = format!(
        "{:<6} {:<8} {:<40} {:<28} {}\n",
        "CODE", "LEVEL", "OBJECT", "FIELD", "FINDING"
    );
    for f in findings {
        out.push_str(&format!(
            "{:<6} {:<8} {:<40} {:<28} {}\n",
            f.code,
            f.severity.name(),
            f.object,
            f.field,
            f.message
        ));
    }
    let codes: BTreeSet<&str> = findings.iter().map(|f| f.code).collect();
    out.push('\n');
    for check in CHECKS.iter().filter(|c| codes.contains(c.code)) {
        out.push_str(&format!(
            "{} {}: {}.\n  fix: {}.\n",
            check.code, check.name, check.why, check.fix
        ));
    }
    let errors = findings.iter().filter(|f| f.severity == Severity::Error).count();
    out.push_str(&format!(
        "\n{} findings: {} errors, {} warnings\n",
        findings.len(),
        errors,
        findings.len() - errors
    ));
    out
}
