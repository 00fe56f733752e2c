//! Flow records: kernel events decoded and enriched with what the agent knows (pods, labels, the
//! policies that isolate an endpoint, the rule that allowed a connection).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use ztrust_common::{FlowEvent, dir, event_flags, proto, verdict};

use crate::model::{Labels, ObjectRef};

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "EndpointJson", into = "EndpointJson")]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: Option<u16>,
    /// The pod that has the address, if the agent knows one.
    pub pod: Option<ObjectRef>,
    pub labels: Labels,
    pub identity: u32,
}

impl Endpoint {
    /// `ns/pod`, or the address for hosts outside the cluster.
    pub fn display_name(&self) -> String {
        match &self.pod {
            Some(pod) => pod.to_string(),
            None => self.ip.to_string(),
        }
    }

    pub fn namespace(&self) -> Option<&str> {
        self.pod.as_ref().map(|p| p.namespace.as_str())
    }
}

/// [`Endpoint`] as JSON has it (flow logs, `flows -o json`): the pod as `namespace` and `pod`.
#[derive(Serialize, Deserialize)]
struct EndpointJson {
    ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    labels: Labels,
    identity: u32,
}

impl From<EndpointJson> for Endpoint {
    fn from(j: EndpointJson) -> Self {
        Endpoint {
            ip: j.ip,
            port: j.port,
            pod: match (j.namespace, j.pod) {
                (Some(ns), Some(pod)) => Some(ObjectRef::new(ns, pod)),
                _ => None,
            },
            labels: j.labels,
            identity: j.identity,
        }
    }
}

impl From<Endpoint> for EndpointJson {
    fn from(e: Endpoint) -> Self {
        let (namespace, pod) = e.pod.map(|p| (p.namespace, p.name)).unzip();
        EndpointJson {
            ip: e.ip,
            port: e.port,
            namespace,
            pod,
            labels: e.labels,
            identity: e.identity,
        }
    }
}

/// The IP protocol of a flow, by number; shown (and written in JSON) by name: `TCP`, `UDP`, `SCTP`,
/// `ICMP`, `ICMPv6`, or `IP/<number>` for the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpProtocol(pub u8);

impl IpProtocol {
    pub const TCP: Self = Self(proto::TCP);
    pub const UDP: Self = Self(proto::UDP);
    pub const SCTP: Self = Self(proto::SCTP);
    const NAMES: [(u8, &'static str); 5] = [
        (proto::TCP, "TCP"),
        (proto::UDP, "UDP"),
        (proto::SCTP, "SCTP"),
        (proto::ICMP, "ICMP"),
        (proto::ICMPV6, "ICMPv6"),
    ];

    /// Whether its packets have ports (and a flow of it a source and destination port).
    pub fn has_ports(self) -> bool {
        matches!(self.0, proto::TCP | proto::UDP | proto::SCTP)
    }
}

impl std::fmt::Display for IpProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match Self::NAMES.iter().find(|(n, _)| *n == self.0) {
            Some((_, name)) => f.write_str(name),
            None => write!(f, "IP/{}", self.0),
        }
    }
}

/// A name (any case) or `IP/<number>`.
impl std::str::FromStr for IpProtocol {
    type Err = InvalidProtocol;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some((n, _)) = Self::NAMES.iter().find(|(_, name)| name.eq_ignore_ascii_case(s)) {
            return Ok(Self(*n));
        }
        s.get(..3)
            .filter(|p| p.eq_ignore_ascii_case("ip/"))
            .and_then(|_| s[3..].parse().ok())
            .map(Self)
            .ok_or_else(|| InvalidProtocol(s.to_owned()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is no IP protocol (TCP, UDP, SCTP, ICMP, ICMPv6 or IP/<number>)")]
pub struct InvalidProtocol(pub String);

pub use ztrust_common::{Direction, Reason, Verdict};

/// The policy rule that allowed a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowedBy {
    #[serde(with = "as_string")]
    pub policy: ObjectRef,
    #[serde(with = "named")]
    pub direction: Direction,
    pub rule: usize,
}

/// Where a packet was judged: the pod behind the interface, or the interface when the agent has no pod
/// for it (shown as `ifindex/N`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum JudgedAt {
    Pod(ObjectRef),
    Interface(u32),
}

impl JudgedAt {
    pub fn pod(&self) -> Option<&ObjectRef> {
        match self {
            JudgedAt::Pod(p) => Some(p),
            JudgedAt::Interface(_) => None,
        }
    }
}

impl std::fmt::Display for JudgedAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JudgedAt::Pod(p) => write!(f, "{p}"),
            JudgedAt::Interface(i) => write!(f, "ifindex/{i}"),
        }
    }
}

impl std::str::FromStr for JudgedAt {
    type Err = crate::model::InvalidObjectRef;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(i) = s.strip_prefix("ifindex/").and_then(|i| i.parse().ok()) {
            return Ok(JudgedAt::Interface(i));
        }
        s.parse().map(JudgedAt::Pod)
    }
}

/// Serde for the kernel's named codes: as their stable names.
pub(crate) mod named {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub trait Named: Sized + Copy {
        fn name(self) -> &'static str;
        fn from_name(s: &str) -> Option<Self>;
    }

    macro_rules! named {
        ($($t:ty),*) => {$(
            impl Named for $t {
                fn name(self) -> &'static str {
                    <$t>::name(self)
                }
                fn from_name(s: &str) -> Option<Self> {
                    <$t>::from_name(s)
                }
            }
        )*};
    }
    named!(super::Verdict, super::Direction, super::Reason);

    pub fn serialize<T: Named, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.name())
    }

    pub fn deserialize<'de, T: Named, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        // A name this build does not know (a newer agent's flow log) reads as `unknown`.
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        T::from_name(&s)
            .or_else(|| T::from_name("unknown"))
            .ok_or_else(|| D::Error::custom(format!("unknown name `{s}`")))
    }
}

/// Serde for values written as their `Display` and read with `FromStr` (object references).
pub(crate) mod as_string {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
        D: Deserializer<'de>,
    {
        <std::borrow::Cow<'de, str>>::deserialize(d)?
            .parse()
            .map_err(D::Error::custom)
    }
}

/// Serde for a list of [`as_string`] values.
pub(crate) mod as_strings {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _, ser::SerializeSeq as _};

    pub fn serialize<T: std::fmt::Display, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for x in v {
            seq.serialize_element(&x.to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Vec<T>, D::Error>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
        D: Deserializer<'de>,
    {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| s.parse().map_err(D::Error::custom))
            .collect()
    }
}

/// Serde for a time as RFC 3339 (UTC, milliseconds).
mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s).map_err(D::Error::custom)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// When the kernel saw the packet (RFC 3339, UTC, in JSON).
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    pub node: String,
    #[serde(with = "named")]
    pub verdict: Verdict,
    /// Relative to `endpoint`: `ingress` (towards it) or `egress` (from it).
    #[serde(with = "named")]
    pub direction: Direction,
    #[serde(with = "named")]
    pub reason: Reason,
    /// The pod whose hook judged the packet.
    #[serde(with = "as_string")]
    pub endpoint: JudgedAt,
    #[serde(with = "as_string")]
    pub protocol: IpProtocol,
    pub source: Endpoint,
    pub destination: Endpoint,
    /// A TCP packet's flags (none for other protocols); `SYN|ACK` in JSON.
    #[serde(skip_serializing_if = "TcpFlags::is_empty", default, with = "as_string")]
    pub tcp_flags: TcpFlags,
    /// For drops: the policies that isolate `endpoint` in `direction` (none allowed the packet).
    #[serde(skip_serializing_if = "Vec::is_empty", default, with = "as_strings")]
    pub policies: Vec<ObjectRef>,
    /// For allowed new connections: the policy rule that allowed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_by: Option<AllowedBy>,
    pub new_connection: bool,
    pub bytes: u32,
    /// A connection to a Service: which one, and its backends (judged by them; the node picks one).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub service: Option<ServiceRef>,
}

/// A flow as the observer keeps it and the detector holds it as evidence (shared, not copied): the
/// record, its time, and its sequence number in the observer's ring.
#[derive(Debug)]
pub struct Observed {
    pub seq: u64,
    pub time: SystemTime,
    pub flow: Flow,
}

/// The Service a flow addressed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRef {
    /// `namespace/name` in JSON.
    #[serde(with = "as_string")]
    pub name: ObjectRef,
    /// Its backends (of the frontend's family).
    #[serde(skip_serializing_if = "Vec::is_empty", default, with = "as_strings")]
    pub backends: Vec<Backend>,
}

/// A backend of a Service: the pod that has the address (`namespace/name`), or the address where no
/// pod of the cluster has it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Backend {
    Pod(ObjectRef),
    Address(IpAddr),
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Pod(p) => write!(f, "{p}"),
            Backend::Address(a) => write!(f, "{a}"),
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = crate::model::InvalidObjectRef;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse() {
            Ok(a) => Ok(Backend::Address(a)),
            Err(_) => s.parse().map(Backend::Pod),
        }
    }
}

impl Flow {
    pub fn is_drop(&self) -> bool {
        self.verdict != Verdict::Forwarded
    }
}

/// TCP header flags as the kernel reported them; shown as `SYN|ACK` (the six that matter to a
/// connection's state; others are not shown).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    const NAMES: [(u8, &'static str); 6] = {
        use ztrust_common::tcp_flags::{ACK, FIN, PSH, RST, SYN, URG};
        [
            (SYN, "SYN"),
            (ACK, "ACK"),
            (FIN, "FIN"),
            (RST, "RST"),
            (PSH, "PSH"),
            (URG, "URG"),
        ]
    };

    /// No flag that is shown.
    pub fn is_empty(&self) -> bool {
        Self::NAMES.iter().all(|(bit, _)| self.0 & bit == 0)
    }
}

impl std::fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (_, name) in Self::NAMES.iter().filter(|(bit, _)| self.0 & bit != 0) {
            if !first {
                f.write_str("|")?;
            }
            f.write_str(name)?;
            first = false;
        }
        Ok(())
    }
}

/// `SYN|ACK` (any case), or empty for none.
impl std::str::FromStr for TcpFlags {
    type Err = InvalidTcpFlags;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split('|')
            .filter(|n| !n.is_empty())
            .try_fold(0u8, |acc, n| {
                Self::NAMES
                    .iter()
                    .find(|(_, name)| name.eq_ignore_ascii_case(n.trim()))
                    .map(|(bit, _)| acc | bit)
                    .ok_or_else(|| InvalidTcpFlags(s.to_owned()))
            })
            .map(Self)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` are no TCP flags (SYN, ACK, FIN, RST, PSH, URG joined by `|`)")]
pub struct InvalidTcpFlags(pub String);

fn addr(bytes: [u8; 16], family: u8) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match (family, v6.to_ipv4_mapped()) {
        (4, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    }
}

#[derive(Clone, Debug, Default)]
pub struct PodView {
    pub pod: ObjectRef,
    pub labels: Labels,
}

#[derive(Clone, Debug, Default)]
pub struct EndpointView {
    pub pod: ObjectRef,
    pub ingress_policies: Vec<ObjectRef>,
    pub egress_policies: Vec<ObjectRef>,
}

/// What the agent knows, for enrichment. Rebuilt after every compile.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub node: String,
    pub pods_by_ip: HashMap<IpAddr, PodView>,
    pub endpoints: HashMap<u32, EndpointView>,
    /// rule id → (policy, direction, index)
    pub rules: BTreeMap<u32, AllowedBy>,
    /// Service frontends (address, port, protocol number) → the Service.
    pub services: HashMap<(IpAddr, u16, u8), ServiceRef>,
}

/// CLOCK_MONOTONIC (what `bpf_ktime_get_ns` reads) → wall clock.
pub fn monotonic_to_system(ts_ns: u64) -> SystemTime {
    Clock::now().system_time(ts_ns)
}

/// The two clocks read once, to convert the kernel timestamps of a batch of events: an event's age is
/// the monotonic now minus its timestamp, and its wall-clock time the wall-clock now minus that age.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    mono: Duration,
    wall: SystemTime,
}

impl Clock {
    pub fn now() -> Self {
        let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
            .unwrap_or_default();
        Self {
            mono,
            wall: SystemTime::now(),
        }
    }

    pub fn system_time(&self, ts_ns: u64) -> SystemTime {
        self.wall - self.mono.saturating_sub(Duration::from_nanos(ts_ns))
    }
}

impl View {
    fn endpoint(&self, ip: IpAddr, port: Option<u16>, identity: u32) -> Endpoint {
        let pod = self.pods_by_ip.get(&ip);
        Endpoint {
            ip,
            port,
            pod: pod.map(|p| p.pod.clone()),
            labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
            identity,
        }
    }

    /// The Service of a flow. The pod's end of a Service connection names the frontend: the destination
    /// of its own packets, the source of the answers (after the node's reverse translation). A node port
    /// on any local address (`run --nodeport-addresses all`) is named only where the kernel says it judged
    /// the packet by that frontend ([`event_flags::SERVICE`]): whether an address is the node's is the
    /// node's routing's answer at that moment, which the event carries.
    fn service(&self, ev: &FlowEvent, src_ip: IpAddr, dst_ip: IpAddr) -> Option<ServiceRef> {
        let (ip, port) = if ev.direction == dir::EGRESS {
            (dst_ip, ev.dport)
        } else {
            (src_ip, ev.sport)
        };
        if ip.is_unspecified() {
            return None;
        }
        if let Some(s) = self.services.get(&(ip, port, ev.protocol)) {
            return Some(s.clone());
        }
        if ev.direction != dir::EGRESS || ev.flags & event_flags::SERVICE == 0 {
            return None;
        }
        let any_local = if ip.is_ipv4() {
            crate::policy::services::ANY_LOCAL_V4
        } else {
            crate::policy::services::ANY_LOCAL_V6
        };
        self.services.get(&(any_local, port, ev.protocol)).cloned()
    }

    pub fn enrich(&self, ev: &FlowEvent) -> Flow {
        self.enrich_at(ev, monotonic_to_system(ev.ts_ns))
    }

    /// [`Self::enrich`] with the event's wall-clock time already known (see [`Clock`]).
    pub fn enrich_at(&self, ev: &FlowEvent, time: SystemTime) -> Flow {
        let protocol = IpProtocol(ev.protocol);
        let has_ports = protocol.has_ports();
        let src_ip = addr(ev.saddr, ev.family);
        let dst_ip = addr(ev.daddr, ev.family);
        let ep = self.endpoints.get(&ev.ifindex);
        let (src_id, dst_id) = if ev.direction == dir::INGRESS {
            (ev.remote_identity, ev.endpoint_identity)
        } else {
            (ev.endpoint_identity, ev.remote_identity)
        };
        let policies = match (ep, ev.verdict != verdict::FORWARDED) {
            (Some(e), true) if ev.direction == dir::INGRESS => e.ingress_policies.clone(),
            (Some(e), true) => e.egress_policies.clone(),
            _ => Vec::new(),
        };
        Flow {
            time,
            node: self.node.clone(),
            verdict: Verdict::from_code(ev.verdict),
            direction: Direction::from_code(ev.direction),
            reason: Reason::from_code(ev.reason),
            endpoint: ep.map_or(JudgedAt::Interface(ev.ifindex), |e| JudgedAt::Pod(e.pod.clone())),
            protocol,
            source: self.endpoint(src_ip, has_ports.then_some(ev.sport), src_id),
            destination: self.endpoint(dst_ip, has_ports.then_some(ev.dport), dst_id),
            tcp_flags: TcpFlags(if protocol == IpProtocol::TCP {
                ev.tcp_flags
            } else {
                0
            }),
            policies,
            allowed_by: if ev.verdict == verdict::FORWARDED {
                self.rules.get(&ev.rule_id).cloned()
            } else {
                None
            },
            new_connection: ev.flags & event_flags::NEW_FLOW != 0,
            bytes: ev.pkt_len,
            service: self.service(ev, src_ip, dst_ip),
        }
    }
}

/// Drop lines per second in the log. A line per drop costs more than everything else the pipeline
/// does for a flow (formatting, the write to stderr); at tens of thousands of drops per second it is
/// also unreadable. Beyond this many in a second, drops are counted and one summary line says how
/// many were not logged; every flow still reaches the flow API, the flow log and the metrics.
pub const DROP_LOG_PER_SECOND: u32 = 20;

/// Which drops get a log line: at most [`DROP_LOG_PER_SECOND`] per one-second window, and a summary of
/// the others when the window ends.
#[derive(Debug)]
pub struct DropLog {
    window: Instant,
    logged: u32,
    suppressed: u64,
}

impl Default for DropLog {
    fn default() -> Self {
        Self::new()
    }
}

impl DropLog {
    pub fn new() -> Self {
        Self {
            window: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// Starts a new one-second window once the current one is over, after summing it up.
    pub fn roll(&mut self, now: Instant) {
        if now.duration_since(self.window) < Duration::from_secs(1) {
            return;
        }
        if self.suppressed > 0 {
            tracing::info!(
                target: "ztrust::flows",
                suppressed = self.suppressed,
                "{} more denied flows not logged (at most {DROP_LOG_PER_SECOND} lines per second); \
                 `ztrust-agent flows --denied` and ztrust_drop_events_total have them all",
                self.suppressed
            );
        }
        *self = Self {
            window: now,
            logged: 0,
            suppressed: 0,
        };
    }

    /// Whether this drop gets its line.
    pub fn admit(&mut self) -> bool {
        if self.logged < DROP_LOG_PER_SECOND {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// A one-line, human-readable rendering: `time verdict src -> dst proto/port reason [policies]`.
pub fn render_line(f: &Flow) -> String {
    let port = f.destination.port.map(|p| format!(":{p}")).unwrap_or_default();
    let why = if f.is_drop() {
        if f.policies.is_empty() {
            format!("{} ({} {})", f.reason, f.endpoint, f.direction)
        } else {
            format!(
                "{} ({} {} isolated by {})",
                f.reason,
                f.endpoint,
                f.direction,
                f.policies
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    } else {
        match &f.allowed_by {
            Some(a) => format!("{} ({} {} rule {})", f.reason, a.policy, a.direction, a.rule),
            None => f.reason.to_string(),
        }
    };
    // A connection to a Service: the Service and the pods it translates to.
    let service = f.service.as_ref().map_or_else(String::new, |s| {
        if s.backends.is_empty() {
            format!(" (service {}, no backend)", s.name)
        } else {
            let backends: Vec<String> = s.backends.iter().map(ToString::to_string).collect();
            format!(" (service {} -> {})", s.name, backends.join(", "))
        }
    });
    format!(
        "{}  {:<10} {} -> {}{}{} {} {}",
        humantime::format_rfc3339_millis(f.time),
        f.verdict.name().to_uppercase(),
        f.source.display_name(),
        f.destination.display_name(),
        port,
        service,
        f.protocol,
        why
    )
}

#[cfg(test)]
mod tests;

#[cfg(test)]
pub(crate) mod testing;
