//! Service frontends judged before the node's DNAT: by the classes of backend policy admits, and node
//! ports at whichever local address.

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED, bpf_fib_lookup as FibLookup,
    },
    helpers::bpf_fib_lookup,
    maps::lpm_trie::Key,
};
use ztrust_common::{EndpointInfo, IpcacheKey, SERVICE_CLASSES, ServiceValue, dir, reason};

use crate::{maps::NODE_LOCAL, parse, policy::admits_peer};

/// [`judge`]'s answer for a new connection to the Service frontend `svc`.
#[inline(always)]
pub(crate) fn service_verdict(
    ep: &EndpointInfo,
    svc: &ServiceValue,
    protocol: u8,
) -> Result<(u8, u32, u32), (u8, u32)> {
    let j = judge_service(ep, svc, protocol);
    let (why, remote) = ((j & 0xff) as u8, svc.class[0].identity);
    if j & 0x100 != 0 {
        Ok((why, (j >> 32) as u32, remote))
    } else {
        Err((why, remote))
    }
}

/// Whether a packet to `addr` that entered on the packet's interface is the node's own, as kube-proxy
/// tells when it translates node ports at every local address.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Locality {
    /// The longest route of the node's local table that covers it is a `local` one ([`NODE_LOCAL`],
    /// mirrored by the agent): kube-proxy's "destination type local".
    Local,
    /// The longest such route is of another type (broadcast, anycast, multicast); or none covers it and
    /// the node forwards it (or drops it by a blackhole, unreachable or prohibit route); or it is
    /// multicast, the limited broadcast, or sent to a link-layer broadcast or multicast address: not
    /// translated as a node port.
    Elsewhere,
    /// No route of the mirror covers it, yet the node's routing does not forward it (an address added
    /// since the agent last mirrored the routes; no route; IPv6 link-local) — or the routing could not
    /// be asked. Not known.
    Unknown,
}

/// Tells [`Locality`] for `addr`: the mirror of the node's local table first, then the node's FIB for
/// what the mirror does not cover (forwarded: elsewhere; not forwarded: unknown, since only a `local`
/// route makes kube-proxy translate, and the mirror may be behind). Out of line: the lookup's
/// parameters (64 bytes) live in this frame only.
#[inline(never)]
pub(crate) fn node_local(skb: *mut __sk_buff, addr: &[u8; 16]) -> Locality {
    let mapped = parse::is_mapped(addr);
    if (mapped && (addr[12] & 0xf0 == 0xe0 || addr[12..16] == [0xff; 4])) || (!mapped && addr[0] == 0xff) {
        return Locality::Elsewhere;
    }
    // PACKET_BROADCAST (1), PACKET_MULTICAST (2): flooded on the link, not only to the node.
    // SAFETY: the context pointer is valid for the whole program run.
    let pkt_type = unsafe { (*skb).pkt_type };
    if pkt_type == 1 || pkt_type == 2 {
        return Locality::Elsewhere;
    }
    // The longest route of the node's local table that covers the address: of type `local` or not.
    match NODE_LOCAL.get(&Key::new(IpcacheKey::PREFIX_HOST, IpcacheKey { addr: *addr })) {
        Some(&1) => return Locality::Local,
        Some(_) => return Locality::Elsewhere,
        None => {}
    }
    // SAFETY: plain data; all zeros is a valid value of every field.
    let mut p: FibLookup = unsafe { core::mem::zeroed() };
    // SAFETY: the context pointer is valid for the whole program run.
    p.ifindex = unsafe { (*skb).ifindex };
    if mapped {
        p.family = 2; // AF_INET
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
    } else {
        p.family = 10; // AF_INET6
        let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
        p.__bindgen_anon_4.ipv6_dst = [w(0), w(4), w(8), w(12)];
    }
    // SAFETY: `skb` is the program's context, `p` a valid parameter block of the size given.
    let rc = unsafe { bpf_fib_lookup(skb.cast(), &mut p, core::mem::size_of::<FibLookup>() as i32, 0) };
    if rc < 0 || rc == i64::from(BPF_FIB_LKUP_RET_NOT_FWDED) || rc == i64::from(BPF_FIB_LKUP_RET_FWD_DISABLED)
    {
        Locality::Unknown
    } else {
        Locality::Elsewhere
    }
}

/// The judgment of a new connection to a Service frontend `svc`, packed in one register (a BPF-to-BPF
/// call cannot return a struct): the rule id in the high 32 bits, 1 in bit 8 when admitted, the reason
/// in the low 8 bits. Out of line, so that its loop's registers stay out of the verdict pipeline's.
#[inline(never)]
pub(crate) fn judge_service(ep: &EndpointInfo, svc: &ServiceValue, protocol: u8) -> u64 {
    let n = svc.classes as usize;
    if n == 0 {
        return u64::from(reason::UNKNOWN_SERVICE);
    }
    if n > SERVICE_CLASSES {
        return u64::from(reason::SERVICE_BACKENDS_DIFFER);
    }
    let first = svc.class[0];
    // Plain values, not an Option kept across the loop: the BPF backend would spill a `None`'s
    // undefined payload, which the verifier refuses to read.
    let (admitted, why, rule) = match admits_peer(ep, first.identity, dir::EGRESS, protocol, first.port) {
        Some((why, rule)) => (true, why, rule),
        None => (false, reason::POLICY_DENIED, 0),
    };
    for i in 1..SERVICE_CLASSES {
        if i < n {
            let c = svc.class[i];
            if admits_peer(ep, c.identity, dir::EGRESS, protocol, c.port).is_some() != admitted {
                return u64::from(reason::SERVICE_BACKENDS_DIFFER);
            }
        }
    }
    (u64::from(rule) << 32) | (u64::from(admitted) << 8) | u64::from(why)
}
