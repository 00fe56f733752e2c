//! Plain-old-data types shared by the kernel programs (`ztrust-ebpf`) and user space (`ztrust-agent`).
//!
//! Every type here is `#[repr(C)]`, holds only integers and byte arrays, and has its size checked at
//! compile time: a layout change that would make the kernel and the agent disagree fails the build.
//! Multi-byte fields of LPM-trie keys are big-endian, because the kernel's trie compares keys bit by bit
//! from the most significant bit of the first byte.
#![cfg_attr(not(test), no_std)]

mod named;

pub use named::{Direction, Reason, Verdict};

/// Direction of a packet relative to the endpoint (pod) whose hook sees it.
pub mod dir {
    /// Towards the endpoint: seen by the TC egress hook of the pod's host-side interface.
    pub const INGRESS: u8 = 0;
    /// From the endpoint: seen by the TC ingress hook of the pod's host-side interface.
    pub const EGRESS: u8 = 1;
}

/// Reserved numeric identities. Pod and CIDR identities start at [`identity::FIRST_DYNAMIC`].
pub mod identity {
    /// Wildcard: in a policy key, any remote (including addresses outside the cluster).
    pub const ANY: u32 = 0;
    /// An address with no entry in the ipcache (outside every known pod and CIDR).
    pub const WORLD: u32 = 1;
    /// The node itself. Kubernetes does not let a pod block its own node (kubelet probes).
    pub const HOST: u32 = 2;
    /// First identity handed out by the agent's allocator.
    pub const FIRST_DYNAMIC: u32 = 256;
}

/// IP protocol numbers the datapath parses. `ANY` is the policy-key wildcard.
pub mod proto {
    pub const ANY: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// What a pod may not send unless the operator allows it (`run --pod-tunnels allow`): packets that a
/// node decapsulates and forwards as if they arrived from its tunnel, with whatever inner source the
/// sender wrote. A cluster's nodes decapsulate from any sender (a Calico IP-in-IP `tunl0`, a flannel or
/// Calico VXLAN device, a Cilium Geneve device): an inner packet "from" another pod would be judged at
/// its destination as that pod's.
pub mod encap {
    /// Does a packet of `protocol` to `dport` (host order; 0 for protocols without ports) carry a packet?
    /// IP protocols IPv4 in IP (4), IPv6 in IP (41), GRE (47), EtherIP (97), MPLS in IP (137); UDP to
    /// VXLAN (IANA 4789, and Linux's historic 8472 that flannel and Cilium use), VXLAN-GPE (4790) and
    /// Geneve (6081). Other UDP encapsulations (FOU, GUE) use ports the node's owner chooses.
    #[inline(always)]
    pub const fn carries_packet(protocol: u8, dport: u16) -> bool {
        match protocol {
            4 | 41 | 47 | 97 | 137 => true,
            super::proto::UDP => matches!(dport, 4789 | 4790 | 6081 | 8472),
            _ => false,
        }
    }
}

/// TCP header flag bits (RFC 9293 §3.1), as in [`FlowEvent::tcp_flags`].
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}

/// Bits of [`EndpointInfo::flags`].
pub mod ep_flags;

/// What happened to a packet.
pub mod verdict {
    pub const FORWARDED: u8 = 1;
    pub const DROPPED: u8 = 2;
    /// Enforcement would have dropped the packet, but the endpoint is in audit mode.
    pub const WOULD_DROP: u8 = 3;
}

/// Why. A stable, documented enumeration: values are never reused, only added.
pub mod reason {
    /// Forwarded: a new connection matched an allow entry.
    pub const ALLOWED_BY_POLICY: u8 = 1;
    /// Forwarded: no policy isolates the endpoint in this direction.
    pub const NOT_ISOLATED: u8 = 2;
    /// Forwarded: packet of a connection in the conntrack table, original direction.
    pub const ESTABLISHED: u8 = 3;
    /// Forwarded: reply of a connection in the conntrack table.
    pub const REPLY: u8 = 4;
    /// Forwarded: traffic from the node itself, which Kubernetes never lets a pod block.
    pub const FROM_HOST: u8 = 5;
    /// Forwarded: link control that addressing itself needs and that never leaves the link: well-formed
    /// ARP, and ICMPv6 neighbour discovery and multicast listener discovery as RFC 4861 and RFC 3810
    /// require them (hop limit, link-scope addresses). Anything else is judged, or dropped.
    pub const NOT_IP: u8 = 6;
    /// Forwarded: a TCP segment other than an opening SYN with no conntrack entry (e.g. evicted), that
    /// policy allows in the segment's own direction, as it would allow a SYN. (Never judged in the
    /// reverse direction: a packet does not choose the direction of its own judgment.)
    pub const CT_RECOVERED: u8 = 7;

    /// Dropped: the endpoint is isolated in this direction and no allow entry matches.
    pub const POLICY_DENIED: u8 = 64;
    /// Dropped: the interface carries the program but the agent has not (yet) described its endpoint.
    /// This is what makes a pod fail closed before its rules are in place.
    pub const UNKNOWN_ENDPOINT: u8 = 65;
    /// Dropped: the packet is too short or its headers are inconsistent.
    pub const MALFORMED: u8 = 66;
    /// Dropped: a TCP segment that is not an opening SYN, with no conntrack entry, that policy does not
    /// allow in its own direction.
    pub const NO_CT_ENTRY: u8 = 67;
    /// Dropped: IP fragment other than the first, whose ports cannot be known.
    pub const FRAGMENT: u8 = 68;
    /// Dropped: a packet a pod sent from an address that is not its own (another pod's, the node's, any
    /// other), or link control (ARP, neighbour discovery) naming another sender.
    pub const SPOOFED_SOURCE: u8 = 69;
    /// Dropped: a frame the datapath cannot judge: neither IPv4, IPv6 nor ARP (VLAN-tagged frames, other
    /// ethertypes). What cannot be judged is not passed.
    pub const UNSUPPORTED_FRAME: u8 = 70;
    /// Dropped: a pod sent a packet that carries another packet (IP in IP, GRE, VXLAN, Geneve: see
    /// [`super::encap`]), which a node would decapsulate and forward with the inner packet's source.
    pub const ENCAPSULATED: u8 = 71;
    /// Dropped: the sender chose the packet's route (an IPv4 loose or strict source route option, an
    /// IPv6 routing header with segments left): a node that honours it forwards the packet to an address
    /// other than the destination it was judged by.
    pub const SOURCE_ROUTED: u8 = 72;
    /// Dropped: a new connection from a pod to a Service frontend whose backends policy treats
    /// differently (some allowed, some not). The pod's interface judges before the node picks the
    /// backend, so it cannot give the verdict of the one that would be picked; it does not guess.
    pub const SERVICE_BACKENDS_DIFFER: u8 = 73;
    /// Dropped: a pod's packet to an address of the Service ranges (`run --service-cidr`) that is no known
    /// Service frontend, or to a frontend without backends (none ready, none serving while terminating):
    /// the translation is unknown, so the packet cannot be judged by the pod it would reach.
    pub const UNKNOWN_SERVICE: u8 = 74;

    /// First value meaning "dropped".
    pub const FIRST_DROP: u8 = 64;

    /// Every reason above (a new one goes here too: user space names each, and the tests check that).
    pub const ALL: [u8; 18] = [
        ALLOWED_BY_POLICY,
        NOT_ISOLATED,
        ESTABLISHED,
        REPLY,
        FROM_HOST,
        NOT_IP,
        CT_RECOVERED,
        POLICY_DENIED,
        UNKNOWN_ENDPOINT,
        MALFORMED,
        NO_CT_ENTRY,
        FRAGMENT,
        SPOOFED_SOURCE,
        UNSUPPORTED_FRAME,
        ENCAPSULATED,
        SOURCE_ROUTED,
        SERVICE_BACKENDS_DIFFER,
        UNKNOWN_SERVICE,
    ];
}

/// Bits of [`FlowEvent::flags`].
pub mod event_flags {
    /// The event is the first packet of a new connection (a SYN, or the first datagram of a flow).
    pub const NEW_FLOW: u8 = 1 << 0;
    /// The packet was judged by the backends of a Service frontend it is addressed to (not by its
    /// destination address): the flow names the Service even where its frontend is the node port's on
    /// any local address, which the destination alone does not tell.
    pub const SERVICE: u8 = 1 << 1;
}

/// Names of the pinned objects under the pin directory (default `/sys/fs/bpf/ztrust`).
pub mod names {
    pub const ENDPOINTS: &str = "ZT_ENDPOINTS";
    /// Address prefixes shorter than a single address (LPM trie).
    pub const IPCACHE: &str = "ZT_IPCACHE";
    /// Single addresses (hash): pods, the node, /32 and /128 ipBlocks.
    pub const IPCACHE_HOSTS: &str = "ZT_IPCACHE_HOSTS";
    /// Allow entries wider than one port (port ranges, any port, any protocol): LPM trie.
    pub const POLICY: &str = "ZT_POLICY";
    /// Allow entries for one port (prefix [`super::PolicyKey::PREFIX_FULL`]): hash, one lookup whatever
    /// the number of entries.
    pub const POLICY_EXACT: &str = "ZT_POLICY_EXACT";
    pub const CONNTRACK: &str = "ZT_CONNTRACK";
    pub const COUNTERS: &str = "ZT_COUNTERS";
    /// Per-CPU array of [`super::SlotCounters`], indexed by [`super::EndpointInfo::slot`]: the packets
    /// of established connections, counted without a hash lookup.
    pub const SLOT_COUNTERS: &str = "ZT_SLOT_COUNTERS";
    pub const EVENTS: &str = "ZT_EVENTS";
    pub const EVENT_RATE: &str = "ZT_EVENT_RATE";
    /// [`super::ServiceKey`] → [`super::ServiceValue`]: Service frontends (ClusterIPs, external and load
    /// balancer addresses, this node's addresses with node ports) and their backends' identities.
    pub const SERVICES: &str = "ZT_SERVICES";
    /// LPM trie of the Service address ranges (key as the ipcache's, value unused): a pod's new
    /// connection to an address in them that is no frontend is `UNKNOWN_SERVICE`.
    pub const SERVICE_RANGES: &str = "ZT_SERVICE_RANGES";
    /// LPM trie of the routes of the node's local routing table (key as the ipcache's; value 1 for a
    /// `local` route, 0 for another type): the addresses at which node ports are the Service's in
    /// [`super::node_ports::ANY_LOCAL`] mode.
    pub const NODE_LOCAL: &str = "ZT_NODE_LOCAL";
    /// Interface (u32) → [`super::EventWindow`]: the per-interface event budget.
    pub const EVENT_BUDGET: &str = "ZT_EVENT_BUDGET";
    pub const STATS: &str = "ZT_STATS";
    pub const CONFIG: &str = "ZT_CONFIG";
    /// Single u32: bumped by the agent whenever an update may have narrowed what is allowed.
    pub const REVISION: &str = "ZT_REVISION";
    pub const PROG_FROM_POD: &str = "zt_from_pod";
    pub const PROG_TO_POD: &str = "zt_to_pod";
    /// A program that passes every packet, for benchmarks (the cost of the hook alone).
    pub const PROG_PASS: &str = "zt_pass";
}

/// Capacities of the maps. The agent refuses updates past them rather than writing half a state.
pub mod capacity {
    pub const ENDPOINTS: u32 = 16_384;
    pub const IPCACHE: u32 = 524_288;
    pub const POLICY: u32 = 1_048_576;
    pub const CONNTRACK: u32 = 262_144;
    pub const COUNTERS: u32 = 65_536;
    pub const EVENT_RATE: u32 = 65_536;
    /// Service frontends (one per address, port and protocol).
    pub const SERVICES: u32 = 262_144;
    pub const SERVICE_RANGES: u32 = 64;
    /// The node's `local` routes (its addresses, loopback, AnyIP ranges).
    pub const NODE_LOCAL: u32 = 4_096;
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub const EVENTS_BYTES: u32 = 4 << 20;
}

/// Indices of the per-CPU [`names::STATS`] array.
pub mod stat {
    /// A flow event could not be reserved in the ring buffer (user space too slow).
    pub const EVENTS_LOST: u32 = 0;
    /// A conntrack entry could not be written.
    pub const CT_INSERT_FAILED: u32 = 1;
    /// Events suppressed by the per-flow rate limit.
    pub const EVENTS_RATE_LIMITED: u32 = 2;
    /// Packets an endpoint's interface passed on the peer mark of the sending endpoint's interface (a TCP
    /// connection between two endpoints of this node that both have admitted: judged once).
    pub const PEER_JUDGED: u32 = 3;
    /// Events not sent because their interface had used its budget of events for the second
    /// ([`super::Config::event_budget`]): one pod's flood of distinct denied flows cannot crowd the other
    /// pods' events out of the ring buffer. The packets are still counted.
    pub const EVENTS_OVER_BUDGET: u32 = 4;
    pub const COUNT: u32 = 5;
}

/// Value of the endpoint map, keyed by the `ifindex` (u32) of the pod's host-side interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Scopes the endpoint's entries in the policy map ([`PolicyKey::endpoint`]).
    pub endpoint_id: u32,
    /// Security identity of the pod itself.
    pub identity: u32,
    /// [`ep_flags`] bits.
    pub flags: u32,
    /// The endpoint's entry in [`names::SLOT_COUNTERS`] ([`EndpointInfo::NO_SLOT`]: none; its packets are
    /// all counted in [`names::COUNTERS`]). Handed out by the agent, unique among the endpoints.
    pub slot: u32,
    /// The pod's IPv4 address, IPv4-mapped as in the ipcache; all zeros when it has none (no IPv4 packet
    /// carries that source: its mapped form is never zero). The only IPv4 source the pod may send from.
    pub addr4: [u8; 16],
    /// The pod's IPv6 address; all zeros (`::`, never a valid source of IP traffic) when it has none.
    pub addr6: [u8; 16],
}

impl EndpointInfo {
    /// [`EndpointInfo::slot`] of an endpoint without a slot: its packets are all counted in the hash.
    pub const NO_SLOT: u32 = 0;

    /// The pod's addresses in the form [`EndpointInfo::addr4`] and [`EndpointInfo::addr6`] hold them
    /// (the first of each family; Kubernetes gives a pod at most one per family).
    #[cfg(feature = "user")]
    pub fn with_addrs(mut self, ips: &[core::net::IpAddr]) -> Self {
        use core::net::IpAddr;
        if let Some(v4) = ips.iter().find_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        }) {
            self.addr4 = v4.to_ipv6_mapped().octets();
        }
        if let Some(v6) = ips.iter().find_map(|ip| match ip {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        }) {
            self.addr6 = v6.octets();
        }
        self
    }
}

/// Data part of the ipcache LPM-trie key: an IPv6 address; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`,
/// prefix length + 96), so one trie serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheKey {
    pub addr: [u8; 16],
}

impl IpcacheKey {
    /// The prefix length of a single address (IPv4 is keyed IPv4-mapped): the ipcache's hash holds
    /// these, the programs look an address up at it.
    pub const PREFIX_HOST: u32 = 128;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    pub _pad: u32,
}

/// Data part of the policy LPM-trie key. Fields are big-endian and ordered so that a shorter prefix is a
/// wildcard: prefix [`PolicyKey::PREFIX_ANY_PROTO`] matches any protocol and port,
/// [`PolicyKey::PREFIX_ANY_PORT`] any port of one protocol, and a port range is a set of aligned port
/// blocks of prefix `PREFIX_FULL - k`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// [`EndpointInfo::endpoint_id`], big-endian.
    pub endpoint: [u8; 4],
    /// Remote identity, big-endian; [`identity::ANY`] for "any peer".
    pub identity: [u8; 4],
    pub direction: u8,
    pub protocol: u8,
    /// Destination port, big-endian (the pod's own port for ingress, the peer's for egress).
    pub port: [u8; 2],
}

impl PolicyKey {
    pub const PREFIX_FULL: u32 = 96;
    pub const PREFIX_ANY_PORT: u32 = 80;
    pub const PREFIX_ANY_PROTO: u32 = 72;

    pub const fn new(endpoint: u32, identity: u32, direction: u8, protocol: u8, port: u16) -> Self {
        Self {
            endpoint: endpoint.to_be_bytes(),
            identity: identity.to_be_bytes(),
            direction,
            protocol,
            port: port.to_be_bytes(),
        }
    }
}

/// What an allow entry says: which rule allowed the traffic (for attribution in flows).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// Agent-assigned rule reference; 0 = unknown.
    pub rule_id: u32,
    pub _pad: u32,
}

/// Conntrack key: one entry per connection and endpoint, found by the packets of both directions.
///
/// The tuple is in canonical order (the lower of source and destination address/port first, see
/// [`CtKey::new`]), and `direction` is the direction a packet in that order would have at the hook: a
/// packet and its reply give the same key, so every packet of a connection costs one lookup. Which way
/// the connection was opened is in the value ([`CtValue::origin`]). The entry belongs to the endpoint
/// (`ifindex`) whose hook admitted the connection: a connection between two local pods has one entry at
/// the client's interface and one at the server's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub ifindex: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports in network byte order as on the wire; for ICMP echo, the identifier in both.
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}

impl CtKey {
    /// The key of the connection a packet belongs to, whichever way the packet goes.
    #[inline(always)]
    pub fn new(
        ifindex: u32,
        direction: u8,
        saddr: &[u8; 16],
        daddr: &[u8; 16],
        sport: u16,
        dport: u16,
        protocol: u8,
    ) -> CtKey {
        if tuple_greater(saddr, sport, daddr, dport) {
            let direction = if direction == dir::INGRESS {
                dir::EGRESS
            } else {
                dir::INGRESS
            };
            CtKey {
                ifindex,
                saddr: *daddr,
                daddr: *saddr,
                sport: dport,
                dport: sport,
                protocol,
                direction,
                _pad: [0; 2],
            }
        } else {
            CtKey {
                ifindex,
                saddr: *saddr,
                daddr: *daddr,
                sport,
                dport,
                protocol,
                direction,
                _pad: [0; 2],
            }
        }
    }
}

/// `(a, a_port) > (b, b_port)` in some fixed total order (compared in words: the kernel programs have no
/// `memcmp` but a byte loop).
#[inline(always)]
fn tuple_greater(a: &[u8; 16], a_port: u16, b: &[u8; 16], b_port: u16) -> bool {
    let [a0, a1] = addr_words(a);
    let [b0, b1] = addr_words(b);
    if a0 != b0 {
        return a0 > b0;
    }
    if a1 != b1 {
        return a1 > b1;
    }
    a_port > b_port
}

/// An address as two native words (compared in words: the kernel programs have no `memcmp`, and a
/// byte-by-byte loop costs sixteen compares).
#[inline(always)]
pub fn addr_words(a: &[u8; 16]) -> [u64; 2] {
    // SAFETY: [u8; 16] and [u64; 2] have the same size and every bit pattern is valid for both; the copy
    // makes the alignment of `a` irrelevant.
    unsafe { core::mem::transmute(*a) }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// `CLOCK_MONOTONIC` at the last tick (`bpf_ktime_get_coarse_ns`) when a packet of the connection was
    /// last seen; refreshed at most once a second. An entry idle for longer than [`ct_timeout`] is stale.
    pub last_seen_ns: u64,
    pub rule_id: u32,
    /// The policy revision ([`names::REVISION`]) the connection was last judged under. Connectionless
    /// flows (everything but TCP), and connections only audit lets pass ([`ct_flags::AUDITED`]), are
    /// judged again after a revision that may have narrowed policy.
    pub revision: u32,
    /// The direction, at this hook, of the packet that opened the connection ([`dir`]): packets going
    /// that way are the connection's own, the others its replies.
    pub origin: u8,
    /// [`ct_flags`].
    pub flags: u8,
    /// With [`ct_flags::AUDITED`]: the reason enforcement would have dropped the connection's opening
    /// packet for, which its own packets are reported with.
    pub audit_reason: u8,
    pub _pad: u8,
    /// TCP between two endpoints of this node: the host-side interface of the other endpoint, once that
    /// endpoint has admitted the connection too (0: none). Packets this endpoint sends on the connection
    /// then carry the agent's peer mark (`skb->mark`), and the other endpoint's interface passes them
    /// without a second look: judged once. Learned by the receiving interface when it admits the SYN.
    /// (Written where earlier versions left padding, which they kept zero.)
    /// Other protocols, and connections only audit lets pass (never linked): the interface the flow's opening packet entered the node on
    /// (`ingress_ifindex`), with which the flow is judged again after a policy revision.
    pub peer_ifindex: u32,
}

/// What a conntrack entry records of how its connection was admitted ([`CtValue::flags`]; earlier
/// versions kept the byte zero).
pub mod ct_flags {
    /// Policy denies the connection and only audit lets it pass (a would-drop, made only by what opens
    /// a connection: a TCP SYN, a connectionless flow's first packet): its own packets are reported as
    /// would-drop, its replies pass as any connection's do, and it is judged again after every policy
    /// revision, so that enforcement of its opening direction, once it begins, ends it.
    pub const AUDITED: u8 = 1;
}

/// Idle timeouts of conntrack entries, in nanoseconds.
pub mod ct_timeout {
    /// An established TCP connection quiet for this long is forgotten (its next segment is judged anew).
    pub const TCP_NS: u64 = 6 * 3600 * 1_000_000_000;
    /// UDP, SCTP, ICMP and others.
    pub const OTHER_NS: u64 = 60 * 1_000_000_000;
    /// `last_seen_ns` is written at most this often (a write per packet would cost more than the lookup).
    pub const REFRESH_NS: u64 = 1_000_000_000;
}

/// Key of the per-CPU counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub ifindex: u32,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// One endpoint's counters of the packets every stream is made of: forwarded as part of an established
/// connection ([`reason::ESTABLISHED`], [`reason::REPLY`]), per direction. Read by an array index rather
/// than a hash lookup; what they count is never in [`names::COUNTERS`] too, so the two add up. One cache
/// line per endpoint and CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCounters {
    pub ingress_established: CounterValue,
    pub ingress_reply: CounterValue,
    pub egress_established: CounterValue,
    pub egress_reply: CounterValue,
}

impl SlotCounters {
    /// Whether packets with this `verdict` and `reason` are counted here (else in the hash).
    #[inline(always)]
    pub const fn counts(verdict: u8, reason: u8) -> bool {
        verdict == verdict::FORWARDED && (reason == reason::ESTABLISHED || reason == reason::REPLY)
    }

    /// The counter for packets with this `direction`, `verdict` and `reason`, if they are counted here.
    #[inline(always)]
    pub fn get_mut(&mut self, direction: u8, verdict: u8, reason: u8) -> Option<&mut CounterValue> {
        if !Self::counts(verdict, reason) {
            return None;
        }
        match (direction, reason) {
            (dir::INGRESS, reason::ESTABLISHED) => Some(&mut self.ingress_established),
            (dir::INGRESS, reason::REPLY) => Some(&mut self.ingress_reply),
            (dir::EGRESS, reason::ESTABLISHED) => Some(&mut self.egress_established),
            (dir::EGRESS, reason::REPLY) => Some(&mut self.egress_reply),
            _ => None,
        }
    }

    /// The sum of the CPUs' counters.
    pub fn total<'a>(per_cpu: impl IntoIterator<Item = &'a SlotCounters>) -> SlotCounters {
        let mut sum = SlotCounters::default();
        for cpu in per_cpu {
            for (mine, theirs) in [
                (&mut sum.ingress_established, &cpu.ingress_established),
                (&mut sum.ingress_reply, &cpu.ingress_reply),
                (&mut sum.egress_established, &cpu.egress_established),
                (&mut sum.egress_reply, &cpu.egress_reply),
            ] {
                mine.packets += theirs.packets;
                mine.bytes += theirs.bytes;
            }
        }
        sum
    }

    /// Each counter with the (direction, verdict, reason) it counts.
    pub fn entries(&self) -> [((u8, u8, u8), CounterValue); 4] {
        let fwd = verdict::FORWARDED;
        [
            ((dir::INGRESS, fwd, reason::ESTABLISHED), self.ingress_established),
            ((dir::INGRESS, fwd, reason::REPLY), self.ingress_reply),
            ((dir::EGRESS, fwd, reason::ESTABLISHED), self.egress_established),
            ((dir::EGRESS, fwd, reason::REPLY), self.egress_reply),
        ]
    }
}

/// Global settings written by the agent (single-entry array [`names::CONFIG`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Minimum interval between two events of the same flow and verdict, in nanoseconds.
    pub event_interval_ns: u64,
    /// Global [`ep_flags::AUDIT`] and friends, OR-ed into every endpoint's flags.
    pub flags: u32,
    /// Emit events for new allowed connections too (the connection log).
    pub log_allowed: u32,
    /// At most this many events per interface in any one-second window (0: no limit).
    pub event_budget: u32,
    /// Where node ports are frontends: [`node_ports::LISTED`] or [`node_ports::ANY_LOCAL`].
    pub node_ports: u32,
}

/// Values of [`Config::node_ports`]: at which of the node's addresses a pod's connection to a node port
/// is a connection to the Service (kube-proxy's `--nodeport-addresses`).
pub mod node_ports {
    /// At the addresses the agent writes frontends for (`run --node-ip`: kube-proxy's `primary`).
    pub const LISTED: u32 = 0;
    /// At every address the node's routing calls local (kube-proxy in iptables mode without
    /// `--nodeport-addresses`): the frontend is written under the unspecified address of its family
    /// (`0.0.0.0`, mapped, or `::`), looked up when no frontend has the address itself.
    pub const ANY_LOCAL: u32 = 1;
}

/// Key of [`names::SERVICES`]: a Service frontend as a pod's packet names it, before the node translates
/// it (IPv4 mapped, as in the ipcache).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    /// Big-endian, as on the wire.
    pub port_be: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// The backends of a frontend that policy can tell apart: their identity and the port the node
/// translates to (a Service's `targetPort`, which differs between backends when it is a named port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendClass {
    pub identity: u32,
    pub port: u16,
    pub _pad: u16,
}

/// At most this many [`BackendClass`]es are compared per frontend (a Deployment's pods share one, and a
/// rolling update whose two ReplicaSets' pods differ only in `pod-template-hash` makes two; each pod of
/// a StatefulSet is a class of its own, by its pod-name label).
pub const SERVICE_CLASSES: usize = 4;

/// Value of [`names::SERVICES`]. A new connection to the frontend is judged for each class: allowed when
/// all are, denied when none is, `SERVICE_BACKENDS_DIFFER` otherwise (and when `classes` is more than
/// [`SERVICE_CLASSES`]); no ready backend (`classes` 0) is `UNKNOWN_SERVICE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub classes: u32,
    pub _pad: u32,
    pub class: [BackendClass; SERVICE_CLASSES],
}

/// Value of [`names::EVENT_BUDGET`]: the events an interface sent since `start_ns`, the start of its
/// current one-second window (`bpf_ktime_get_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventWindow {
    pub start_ns: u64,
    pub events: u32,
    pub _pad: u32,
}

/// One record of the ring buffer: a new allowed connection, or a dropped (or would-drop) packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the hook.
    pub ts_ns: u64,
    pub ifindex: u32,
    pub endpoint_identity: u32,
    pub remote_identity: u32,
    pub rule_id: u32,
    /// Source and destination, IPv4-mapped for IPv4.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    /// 4 or 6.
    pub family: u8,
    pub protocol: u8,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub tcp_flags: u8,
    /// [`event_flags`] bits.
    pub flags: u8,
    pub _pad: u8,
    pub pkt_len: u32,
}

const _: () = {
    assert!(core::mem::size_of::<EndpointInfo>() == 48);
    assert!(core::mem::size_of::<SlotCounters>() == 64);
    assert!(core::mem::size_of::<IpcacheKey>() == 16);
    assert!(core::mem::size_of::<IpcacheValue>() == 8);
    assert!(core::mem::size_of::<PolicyKey>() * 8 == PolicyKey::PREFIX_FULL as usize);
    assert!(core::mem::offset_of!(PolicyKey, direction) * 8 == 64);
    assert!(core::mem::offset_of!(PolicyKey, port) * 8 == PolicyKey::PREFIX_ANY_PORT as usize);
    assert!(core::mem::offset_of!(PolicyKey, protocol) * 8 == PolicyKey::PREFIX_ANY_PROTO as usize);
    assert!(core::mem::size_of::<PolicyValue>() == 8);
    assert!(core::mem::size_of::<CtKey>() == 44);
    assert!(core::mem::size_of::<CtValue>() == 24);
    assert!(core::mem::size_of::<CounterKey>() == 8);
    assert!(core::mem::size_of::<CounterValue>() == 16);
    assert!(core::mem::size_of::<Config>() == 24);
    assert!(core::mem::size_of::<EventWindow>() == 16);
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<BackendClass>() == 8);
    assert!(core::mem::size_of::<ServiceValue>() == 40);
    assert!(core::mem::size_of::<FlowEvent>() == 72);
};

#[cfg(feature = "user")]
mod user {
    use super::*;

    /// `aya::Pod` for map keys and values read and written as raw bytes.
    macro_rules! pod {
        ($($t:ty),* $(,)?) => {
            $(
                // SAFETY: every one is #[repr(C)], made only of integers and byte arrays, with explicit
                // padding (checked by the size assertions above), so every bit pattern is valid.
                unsafe impl aya::Pod for $t {}
            )*
        };
    }

    pod!(
        EndpointInfo,
        IpcacheKey,
        IpcacheValue,
        PolicyKey,
        PolicyValue,
        CtKey,
        CtValue,
        CounterKey,
        CounterValue,
        SlotCounters,
        Config,
        EventWindow,
        ServiceKey,
        ServiceValue,
        FlowEvent,
    );
}

#[cfg(test)]
mod tests;
