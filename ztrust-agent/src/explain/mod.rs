//! `ztrust-agent explain`: the verdict a new connection gets, and why, at each end that judges it.
//!
//! Three opinions are given and compared. The **agent's compiled state** (the [`Desired`] state the
//! engine made for this node's pods: isolation, the identity of the remote, the allow entry and the rule
//! it names) is the answer; the **policy objects** ([`rules`]: each rule of each policy that isolates the
//! end, read as the API text says) tell which peer and port of a rule match, or why no rule does; the
//! **kernel maps** ([`kernel`]: looked up as the programs look them up) tell what the datapath will do.
//! Where two of them differ, the explanation says so ([`End::disagreements`]).
//!
//! The agent answers over its flow API ([`ExplainCall`] into the reconcile loop, which owns the engine
//! and the maps); `render` is the table the CLI prints.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;
use ztrust_common::{Direction, Reason, Verdict, dir, identity};

use crate::flows::{as_string, as_strings, named};
use crate::model::{Cluster, ObjectRef, Pod, Protocol};
use crate::policy::{Desired, Frontend, IdentityInfo, IpcacheIndex};

mod judge;
pub mod kernel;
mod render;
pub mod rules;
#[cfg(test)]
pub(crate) mod tests;

pub use render::render;

/// One end of the connection as the user names it: a pod (`namespace/name`) or an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Pod(ObjectRef),
    Address(IpAddr),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pod(p) => p.fmt(f),
            Target::Address(a) => a.fmt(f),
        }
    }
}

impl Target {
    /// An address as a target: not an IPv4-mapped IPv6 address, which no packet carries (the datapath
    /// drops such a packet as malformed).
    pub fn address(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => None,
            ip => Some(Target::Address(ip)),
        }
    }
}

impl std::str::FromStr for Target {
    type Err = QueryError;
    fn from_str(s: &str) -> Result<Self, QueryError> {
        let bare = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(s);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Target::address(ip).ok_or_else(|| QueryError::Mapped(s.to_owned()));
        }
        s.parse()
            .map(Target::Pod)
            .map_err(|_| QueryError::Target(s.to_owned()))
    }
}

/// What `explain` is asked: a new connection from `from` to `to`'s `port` over `protocol`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub from: Target,
    pub to: Target,
    pub port: u16,
    pub protocol: Protocol,
}

/// A query that cannot be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("`{0}` is neither a pod (namespace/name) nor an IPv4 or IPv6 address")]
    Target(String),
    #[error(
        "`{0}` is an IPv4-mapped IPv6 address, which no packet carries (the datapath drops it as malformed): \
         write the IPv4 address"
    )]
    Mapped(String),
    #[error(
        "`{0}` has no port: the destination is TARGET:PORT[/PROTOCOL] (payments/database:5432/tcp, \
         10.96.0.10:53/udp, [fd00::5]:80)"
    )]
    NoPort(String),
    #[error("`{0}` is no port number (1–65535)")]
    Port(String),
    #[error("`{0}`: an IPv6 address with a port is written in brackets, [ADDRESS]:PORT")]
    Brackets(String),
    #[error("`{0}` is no protocol NetworkPolicy knows (tcp, udp, sctp)")]
    Protocol(String),
}

fn protocol_named(s: &str) -> Option<Protocol> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        "sctp" => Some(Protocol::Sctp),
        _ => None,
    }
}

impl Query {
    /// Reads `explain FROM TO:PORT[/PROTOCOL]` (TCP when no protocol is given).
    pub fn parse(from: &str, to: &str) -> Result<Self, QueryError> {
        let from: Target = from.parse()?;
        let (rest, protocol) = match to.rsplit_once('/') {
            Some((rest, p)) if protocol_named(p).is_some() => (rest, protocol_named(p).expect("checked")),
            // `…:PORT/WORD`: a protocol this does not know (not a pod's name after its namespace).
            Some((rest, p))
                if rest
                    .rsplit_once(':')
                    .is_some_and(|(_, n)| n.parse::<u16>().is_ok()) =>
            {
                return Err(QueryError::Protocol(p.to_owned()));
            }
            _ => (to, Protocol::Tcp),
        };
        let (target, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (addr, after) = inner
                .split_once(']')
                .ok_or_else(|| QueryError::Target(rest.to_owned()))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| QueryError::NoPort(to.to_owned()))?;
            (addr, port)
        } else {
            let (target, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| QueryError::NoPort(to.to_owned()))?;
            if target.contains(':') {
                return Err(QueryError::Brackets(to.to_owned()));
            }
            (target, port)
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(QueryError::Port(port.to_owned())),
        };
        Ok(Self {
            from,
            to: target.parse()?,
            port,
            protocol,
        })
    }
}

/// A query that names what the cluster does not have.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("pod {0}: no such pod in the cluster the agent watches")]
    UnknownPod(ObjectRef),
    #[error("pod {0}: status.podIPs is empty (not started yet?), so it has no address to connect with")]
    NoAddress(ObjectRef),
    #[error("{from} and {to} have no address family in common (one is IPv4 only, the other IPv6 only)")]
    NoCommonFamily { from: String, to: String },
    #[error("the agent has not read a whole snapshot of the cluster yet; ask again once it is ready")]
    NotReady,
}

/// One end of the connection as resolved: its address, and the pod that has it if any.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Side {
    #[serde(with = "as_string")]
    pub target: Target,
    pub ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_string")]
    pub pod: Option<ObjectRef>,
    /// A node address or a host-network pod's: its traffic passes no pod hook.
    pub host: bool,
}

/// The Service whose frontend the destination is: the node translates the connection to one of its
/// backends after the source's hook judged it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceHop {
    #[serde(with = "as_strings")]
    pub services: Vec<ObjectRef>,
    pub backends: Vec<BackendHop>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendHop {
    pub ip: IpAddr,
    /// The port the node translates to.
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_string")]
    pub pod: Option<ObjectRef>,
}

/// Enforce or audit (the namespace's `ztrust.io/mode: audit`, or `run --audit`): a denial is a
/// `would-drop`, and the packet passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Enforce,
    Audit,
}

/// The rule that allows the connection: the policy, the rule's index in `spec.ingress` / `spec.egress`,
/// and which of its peers and ports match (as the policy writes them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleMatch {
    #[serde(with = "as_string")]
    pub policy: ObjectRef,
    pub index: usize,
    pub peer: String,
    pub port: String,
}

/// A rule of an isolating policy that does not allow the connection, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleMiss {
    #[serde(with = "as_string")]
    pub policy: ObjectRef,
    pub index: usize,
    pub why: String,
}

/// A Service backend as the source's egress judges it (the kernel judges the frontend by all of them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendVerdict {
    pub ip: IpAddr,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_string")]
    pub pod: Option<ObjectRef>,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_by: Option<RuleMatch>,
}

/// What the live kernel maps say, looked up as the programs look them up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelCheck {
    /// The pod's host-side interface, whose hook judges.
    pub ifindex: u32,
    #[serde(with = "named")]
    pub verdict: Verdict,
    #[serde(with = "named")]
    pub reason: Reason,
    pub isolated: bool,
    pub audit: bool,
    pub remote_identity: u32,
    /// The rule id the allow entry found holds (0: none), and the rule it is.
    pub rule_id: u32,
    pub agrees: bool,
}

/// One hook's judgment of the connection: the source's egress, or a destination's ingress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct End {
    #[serde(with = "as_string")]
    pub pod: ObjectRef,
    #[serde(with = "named")]
    pub direction: Direction,
    /// The node the pod runs on, as its spec says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// This agent enforces the pod (it runs on this node, with an address off the host network).
    pub here: bool,
    /// What this hook sees: the remote address and the destination port.
    pub remote_ip: IpAddr,
    pub port: u16,
    /// What the remote's address stands for (`pod payments/backend`, `world`, …).
    pub remote: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_identity: Option<u32>,
    pub mode: Mode,
    pub isolated: bool,
    #[serde(with = "as_strings")]
    pub isolating: Vec<ObjectRef>,
    #[serde(with = "named")]
    pub verdict: Verdict,
    #[serde(with = "named")]
    pub reason: Reason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_by: Option<RuleMatch>,
    /// The rule id of the compiled allow entry (0: none), which the kernel's entry must hold too.
    #[serde(skip_serializing_if = "is_zero")]
    pub rule_id: u32,
    /// When no rule allows: each rule of the isolating policies, and why it does not.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_allowed_by: Vec<RuleMiss>,
    /// For a Service frontend at the source's egress: each backend's verdict.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendVerdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelCheck>,
    /// Where the compiled state, the policy objects and the kernel maps do not say the same.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disagreements: Vec<String>,
}

/// The answer to a [`Query`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub from: Side,
    pub to: Side,
    pub port: u16,
    #[serde(with = "as_string")]
    pub protocol: Protocol,
    /// What the connection gets: dropped if an end drops it, would-drop if an end in audit mode would.
    #[serde(with = "named")]
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceHop>,
    pub ends: Vec<End>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Explanation {
    /// Whether every end that was checked against the kernel agreed, and nothing disagreed.
    pub fn consistent(&self) -> bool {
        self.ends.iter().all(|e| e.disagreements.is_empty())
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Serde for an optional [`as_string`] value.
mod opt_string {
    use serde::Serializer;

    pub fn serialize<T: std::fmt::Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }
}

/// What an explanation is computed from: the agent's cluster and compiled state.
pub struct State<'a> {
    pub cluster: &'a Cluster,
    pub desired: &'a Desired,
    /// This node's name (`None`: every pod is this node's, as in a single-node lab without names).
    pub node: Option<&'a str>,
    /// Namespaces in audit mode.
    pub audit_namespaces: &'a BTreeSet<String>,
    /// `run --audit`: every endpoint audits.
    pub audit_all: bool,
}

impl State<'_> {
    fn is_host(&self, ip: IpAddr) -> bool {
        self.cluster.node_ips.contains(&ip)
            || self.cluster.host_local_addrs.contains(&ip)
            || self
                .cluster
                .pods
                .values()
                .any(|p| p.host_network && p.ips.contains(&ip))
    }

    /// Whether a packet from `ip` is the node's own, which the kernel lets into every pod (`from-host`):
    /// the node's addresses and this node's host-network pods'. Another node's host-network pod is the
    /// `host` identity too, but its packets enter on the uplink and are judged by policy.
    pub(crate) fn sent_by_node(&self, ip: IpAddr) -> bool {
        self.cluster.node_ips.contains(&ip)
            || self.cluster.host_local_addrs.contains(&ip)
            || self.cluster.pods.values().any(|p| {
                p.host_network
                    && p.ips.contains(&ip)
                    && self
                        .node
                        .is_none_or(|n| p.node_name.as_deref().is_none_or(|p| p == n))
            })
    }

    fn pod_at(&self, ip: IpAddr) -> Option<&Pod> {
        self.cluster.pod_at(ip)
    }

    fn here(&self, pod: &Pod) -> bool {
        !pod.host_network
            && self.desired.endpoints.contains_key(&pod.object_ref())
            && self
                .node
                .is_none_or(|n| pod.node_name.as_deref().is_none_or(|p| p == n))
    }

    fn mode(&self, namespace: &str) -> Mode {
        if self.audit_all || self.audit_namespaces.contains(namespace) {
            Mode::Audit
        } else {
            Mode::Enforce
        }
    }

    /// What identity `id` stands for, in words.
    fn describe_identity(&self, id: u32, ip: IpAddr) -> String {
        if let Some(pod) = self.pod_at(ip) {
            return format!("pod {}", pod.object_ref());
        }
        match self.desired.identities.get(&id) {
            Some(IdentityInfo::Reserved { name }) => (*name).to_owned(),
            Some(IdentityInfo::Pod { namespace, .. }) => format!("a pod of {namespace}"),
            Some(IdentityInfo::Cidr { prefix }) => format!("ipBlock {prefix}"),
            None if id == identity::WORLD => "world".to_owned(),
            None if id == identity::HOST => "host".to_owned(),
            None => format!("identity {id}"),
        }
    }
}

/// A request from the flow API to the loop that owns the engine and the maps.
pub struct ExplainCall {
    pub query: Query,
    pub reply: tokio::sync::oneshot::Sender<Result<Explanation, ExplainError>>,
}

/// Where the flow API sends [`ExplainCall`]s.
pub type Explainer = tokio::sync::mpsc::Sender<ExplainCall>;

/// The kernel maps to check against, and each pod's host-side interface.
pub type Kernel<'a> = (&'a dyn kernel::Lookup, &'a dyn Fn(&ObjectRef) -> Option<u32>);

/// Explains `query` from `state`; with `kernel`, each end of this node is also looked up in the maps.
pub fn explain(
    state: &State<'_>,
    query: &Query,
    kernel: Option<Kernel<'_>>,
) -> Result<Explanation, ExplainError> {
    let index = IpcacheIndex::new(state.desired);
    let (from, to) = judge::resolve(state, query)?;
    let frontend = Frontend {
        addr: to.ip,
        port: query.port,
        protocol: query.protocol,
    };
    let service = judge::service_hop(state, &frontend);
    let mut ends = Vec::new();
    let mut notes = Vec::new();
    if from.pod.is_some() && from.pod == to.pod {
        // Never leaves the pod: its own network namespace carries it over loopback.
        notes.push(format!(
            "{} connects to itself: the connection stays inside its network namespace, which no hook sees \
             (NetworkPolicy never applies to a pod's traffic with itself)",
            to.target
        ));
        return Ok(Explanation {
            from,
            to,
            port: query.port,
            protocol: query.protocol,
            verdict: Verdict::Forwarded,
            service,
            ends,
            notes,
        });
    }
    // A host-network pod's traffic passes no pod hook (its sockets are the node's).
    let hooked = |side: &Side| {
        side.pod
            .as_ref()
            .and_then(|p| state.cluster.pods.get(p))
            .filter(|p| !p.host_network)
    };
    let source_pod = hooked(&from);
    match source_pod {
        Some(pod) => ends.push(judge::egress_end(
            state,
            &index,
            pod,
            &to,
            query,
            service.as_ref(),
        )),
        None if from.host => notes.push(format!(
            "{} is the node's (or a host-network pod's): its traffic passes no pod's egress hook",
            from.ip
        )),
        None => notes.push(format!(
            "{} is no pod's address: no egress hook judges it on the way out",
            from.ip
        )),
    }
    match &service {
        Some(hop) => {
            for b in &hop.backends {
                match b.pod.as_ref().and_then(|p| state.cluster.pods.get(p)) {
                    Some(pod) => ends.push(judge::ingress_end(
                        state,
                        &index,
                        pod,
                        &from,
                        b.port,
                        query.protocol,
                    )),
                    None => notes.push(format!(
                        "backend {}:{} is no pod's address: no ingress hook judges it",
                        b.ip, b.port
                    )),
                }
            }
            if hop.backends.is_empty() {
                notes.push(format!(
                    "{} has no ready or serving backend: the node has nowhere to send the connection",
                    hop.services
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        None => match hooked(&to) {
            Some(pod) => ends.push(judge::ingress_end(
                state,
                &index,
                pod,
                &from,
                query.port,
                query.protocol,
            )),
            None if to.host => notes.push(format!(
                "{} is the node's (or a host-network pod's): no pod's ingress hook judges it",
                to.ip
            )),
            None => notes.push(format!(
                "{} is no pod's address: no ingress hook judges it",
                to.ip
            )),
        },
    }
    if let Some((maps, ifindex_of)) = kernel {
        for end in ends.iter_mut().filter(|e| e.here) {
            let node_sent = end.direction == Direction::Ingress && state.sent_by_node(end.remote_ip);
            kernel::check(maps, ifindex_of, end, query.protocol, node_sent);
            if end.kernel.is_none() && end.disagreements.is_empty() {
                notes.push(format!(
                    "{} has no host-side interface bound yet (starting?): no hook judges its traffic until it \
                     has one, and the kernel's answer is not known",
                    end.pod
                ));
            }
        }
    }
    if let Some(classes) = state.desired.services.get(&frontend)
        && classes.len() > ztrust_common::SERVICE_CLASSES
    {
        notes.push(format!(
            "{} has {} kinds of backend that policy tells apart, more than the kernel judges one by one ({}): \
             an isolated egress to it is dropped as service-backends-differ",
            to.ip,
            classes.len(),
            ztrust_common::SERVICE_CLASSES
        ));
    }
    if service.is_some() {
        let ingress: BTreeSet<Verdict> = ends
            .iter()
            .filter(|e| e.direction == Direction::Ingress)
            .map(|e| e.verdict)
            .collect();
        if ingress.len() > 1 {
            notes.push(
                "the backends' ingress verdicts differ: what the connection gets depends on the backend the node \
                 picks (the verdict above is the strictest)"
                    .into(),
            );
        }
    }
    for end in &ends {
        if !end.here {
            notes.push(format!(
                "{} runs on {}: its {} is judged by the agent there; shown from the policy objects",
                end.pod,
                end.node.as_deref().unwrap_or("no node yet"),
                end.direction
            ));
        }
    }
    let verdict = if ends.iter().any(|e| e.verdict == Verdict::Dropped) {
        Verdict::Dropped
    } else if ends.iter().any(|e| e.verdict == Verdict::WouldDrop) {
        Verdict::WouldDrop
    } else {
        Verdict::Forwarded
    };
    Ok(Explanation {
        from,
        to,
        port: query.port,
        protocol: query.protocol,
        verdict,
        service,
        ends,
        notes,
    })
}

/// `direction`'s isolation flag of an endpoint's policy.
fn isolated_in(ep: &crate::policy::EndpointPolicy, direction: u8) -> bool {
    if direction == dir::INGRESS {
        ep.isolated_ingress
    } else {
        ep.isolated_egress
    }
}
