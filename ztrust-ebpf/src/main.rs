//! ztrust datapath: TC programs on the host side of each pod's interface.
//!
//! `zt_from_pod` runs on the host interface's ingress (packets the pod sends: the pod's egress);
//! `zt_to_pod` on its egress (packets delivered to the pod: the pod's ingress). Both run the same
//! pipeline: parse → conntrack → identity of the remote address → policy lookup → verdict, counters and
//! (rate-limited) events. Every error path drops: the datapath fails closed.
#![no_std]
#![no_main]

mod maps;
mod parse;

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED, TC_ACT_OK, TC_ACT_SHOT,
        bpf_fib_lookup as FibLookup,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use ztrust_common::{
    Config, CounterKey, CounterValue, CtKey, CtValue, EndpointInfo, EventWindow, FlowEvent, IpcacheKey,
    PolicyKey, SERVICE_CLASSES, ServiceKey, ServiceValue, SlotCounters, addr_words, ct_timeout, dir, encap,
    ep_flags, event_flags, identity, node_ports, proto, reason, stat,
    tcp_flags::{ACK as TCP_ACK, FIN as TCP_FIN, RST as TCP_RST, SYN as TCP_SYN},
    verdict,
};

use crate::{
    maps::{
        CONFIG, CONNTRACK, COUNTERS, ENDPOINTS, EVENT_BUDGET, EVENT_RATE, EVENTS, IPCACHE, IPCACHE_HOSTS,
        NODE_LOCAL, POLICY, POLICY_EXACT, REVISION, SERVICE_RANGES, SERVICES, SLOT_COUNTERS, STATS,
    },
    parse::{Packet, Parsed},
};

/// The `skb->mark` bit with which a sending endpoint's interface tells the receiving endpoint's interface
/// on this node that both have admitted the packet's TCP connection (0: never). Set by the agent when it
/// loads the programs (`--peer-mark`): a constant to the verifier.
#[unsafe(no_mangle)]
static PEER_MARK: u32 = 0;

#[inline(always)]
fn peer_mark() -> u32 {
    // SAFETY: a plain read of a static; volatile so that the compiler does not fold the 0 it was built
    // with (the loader writes the real value into the object's read-only data).
    unsafe { core::ptr::read_volatile(&PEER_MARK) }
}

#[classifier]
pub fn zt_from_pod(ctx: TcContext) -> i32 {
    handle(&ctx, dir::EGRESS)
}

#[classifier]
pub fn zt_to_pod(ctx: TcContext) -> i32 {
    handle(&ctx, dir::INGRESS)
}

/// Passes every packet and does nothing else. The agent never attaches it: benchmarks attach it where
/// the two programs above go, to tell what the hook itself costs from what the pipeline costs.
#[classifier]
pub fn zt_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

/// What the pipeline decided about one packet.
struct Decision {
    verdict: u8,
    reason: u8,
    remote_identity: u32,
    rule_id: u32,
    new_flow: bool,
    /// The receiving endpoint's interface (0: none) when it has admitted the packet's TCP connection too:
    /// see [`CtValue::peer_ifindex`].
    peer: u32,
    /// The packet carries the peer mark of the sending endpoint's interface, which judged and counted it
    /// for this one: it passes uncounted.
    peer_judged: bool,
    /// Judged now by the backends of a Service frontend ([`event_flags::SERVICE`]).
    via_service: bool,
}

impl Decision {
    #[inline(always)]
    fn new(verdict: u8, reason: u8, remote_identity: u32, rule_id: u32, new_flow: bool) -> Decision {
        Decision {
            verdict,
            reason,
            remote_identity,
            rule_id,
            new_flow,
            peer: 0,
            peer_judged: false,
            via_service: false,
        }
    }
}

#[inline(always)]
fn handle(ctx: &TcContext, direction: u8) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*skb).ifindex };
    let peer_mark = peer_mark();
    // The mark is taken off whatever follows: it means something only between two of ztrust's hooks, and
    // only where `decide` finds the connection it vouches for.
    let mut marked = false;
    if peer_mark != 0 {
        // SAFETY: as above; `mark` is readable and writable by TC programs.
        let mark = unsafe { (*skb).mark };
        if mark & peer_mark != 0 {
            // SAFETY: as above.
            unsafe { (*skb).mark = mark & !peer_mark };
            marked = true;
        }
    }
    let mut pkt = MaybeUninit::<Packet>::uninit();
    let parsed = parse::parse(skb, &mut pkt, direction);
    // SAFETY: `parse` writes the whole packet, whatever it returns.
    let pkt = unsafe { pkt.assume_init_ref() };
    // Read in place, not copied: an update of the entry replaces the whole element (the hash map's
    // elements are swapped, never written in place), so what is read here is one version of it.
    // SAFETY: the reference does not outlive the program run.
    let ep = unsafe { ENDPOINTS.get(ifindex) };
    // SAFETY: the context pointer is valid for the whole program run.
    let from = unsafe { (*skb).ingress_ifindex };
    let d = match (parsed, ep) {
        (Parsed::Ip, Some(ep)) => {
            if direction == dir::EGRESS && !own_source(ep, &pkt.saddr, pkt.family) {
                Decision::new(verdict::DROPPED, reason::SPOOFED_SOURCE, 0, 0, false)
            } else if direction == dir::EGRESS
                && encap::carries_packet(pkt.protocol, u16::from_be(pkt.dport_be))
                && (ep.flags | CONFIG.get(0).map_or(0, |c| c.flags)) & ep_flags::ALLOW_ENCAPSULATION == 0
            {
                // Whatever policy says of the outer packet: the inner one would be judged at its
                // destination as coming from whoever its source names.
                Decision::new(
                    verdict::DROPPED,
                    reason::ENCAPSULATED,
                    remote_identity(&pkt.daddr),
                    0,
                    true,
                )
            } else {
                decide(skb, ifindex, direction, from, marked, ep, pkt)
            }
        }
        // ARP and link-local neighbour discovery carry nothing off the link; they pass even before the
        // endpoint is known, so that a pod's neighbour cache is not poisoned by the fail-closed window.
        // Once it is known, a pod names only itself (or nobody yet) as their sender.
        (Parsed::Link, Some(ep))
            if direction == dir::EGRESS
                && !own_source(ep, &pkt.saddr, pkt.family)
                && !parse::is_unspecified(&pkt.saddr)
                && !parse::is_link_local(&pkt.saddr) =>
        {
            Decision::new(verdict::DROPPED, reason::SPOOFED_SOURCE, 0, 0, false)
        }
        (Parsed::Link, _) => Decision::new(verdict::FORWARDED, reason::NOT_IP, 0, 0, false),
        (Parsed::Ip, None) => {
            // The interface carries the program but the agent has not described the endpoint (yet): fail
            // closed.
            Decision::new(verdict::DROPPED, reason::UNKNOWN_ENDPOINT, 0, 0, false)
        }
        (Parsed::Fragment, _) => Decision::new(verdict::DROPPED, reason::FRAGMENT, 0, 0, false),
        (Parsed::SourceRouted, _) => Decision::new(verdict::DROPPED, reason::SOURCE_ROUTED, 0, 0, false),
        (Parsed::Malformed, _) => Decision::new(verdict::DROPPED, reason::MALFORMED, 0, 0, false),
        (Parsed::Unsupported, _) => Decision::new(verdict::DROPPED, reason::UNSUPPORTED_FRAME, 0, 0, false),
    };
    if d.peer_judged {
        // The sending endpoint's interface judged this packet for this one and counted it.
        stat_inc(stat::PEER_JUDGED);
        return TC_ACT_OK as i32;
    }
    let (ep_identity, slot, ep_flags) = match ep {
        Some(ep) => (ep.identity, ep.slot, ep.flags),
        None => (0, NO_SLOT, 0),
    };
    let mut v = d.verdict;
    // The settings matter only for a drop or a new connection: a packet of an established one does not
    // read them (every map a packet touches is a likely cache miss while a stream sweeps the caches).
    let config = if v != verdict::FORWARDED || d.new_flow {
        CONFIG.get(0).copied().unwrap_or_default()
    } else {
        Config::default()
    };
    // Audit mode reports what policy would drop (Service judgments included); what cannot be judged
    // (malformed, fragments, unknown endpoints) and forged sources are dropped in every mode.
    if v == verdict::DROPPED
        && matches!(
            d.reason,
            reason::POLICY_DENIED
                | reason::NO_CT_ENTRY
                | reason::SERVICE_BACKENDS_DIFFER
                | reason::UNKNOWN_SERVICE
        )
        && (ep_flags | config.flags) & ep_flags::AUDIT != 0
    {
        v = verdict::WOULD_DROP;
    }
    count(ifindex, slot, direction, v, d.reason, ctx.len());
    // The receiving endpoint is still there (its interface is not gone, its address not yet anyone
    // else's): it is told that the packet is judged, and the packet is counted for it as its own hook
    // would have counted it.
    if d.peer != 0
        && v == verdict::FORWARDED
        && let Some(peer) = unsafe { ENDPOINTS.get(d.peer) }
    {
        count(d.peer, peer.slot, dir::INGRESS, v, d.reason, ctx.len());
        // SAFETY: the context pointer is valid for the whole program run.
        unsafe { (*skb).mark |= peer_mark };
    }
    if v != verdict::FORWARDED || (d.new_flow && config.log_allowed != 0) {
        emit(
            ctx,
            &flow_key(ifindex, direction, pkt),
            ep_identity,
            pkt,
            &d,
            v,
            config.event_interval_ns,
        );
    }
    if v == verdict::DROPPED {
        TC_ACT_SHOT as i32
    } else {
        TC_ACT_OK as i32
    }
}

/// Is `saddr` (of a packet of `family`) the endpoint's own address? The agent writes each family's
/// address, or zeros where the pod has none, which no packet of that family carries as its source
/// (IPv4 is mapped, so never zero; an IPv6 packet from `::` is not the pod's).
#[inline(always)]
fn own_source(ep: &EndpointInfo, saddr: &[u8; 16], family: u8) -> bool {
    let s = addr_words(saddr);
    if family == 4 {
        s == addr_words(&ep.addr4)
    } else {
        s == addr_words(&ep.addr6) && (s[0] | s[1]) != 0
    }
}

#[inline(always)]
fn opposite(direction: u8) -> u8 {
    if direction == dir::INGRESS {
        dir::EGRESS
    } else {
        dir::INGRESS
    }
}

/// The packet's own tuple at this hook (not canonical): what its event and its event rate limit name.
#[inline(always)]
fn flow_key(ifindex: u32, direction: u8, pkt: &Packet) -> CtKey {
    CtKey {
        ifindex,
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport_be,
        dport: pkt.dport_be,
        protocol: pkt.protocol,
        direction,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn remote_identity(addr: &[u8; 16]) -> u32 {
    // SAFETY: the value is copied out at once.
    if let Some(v) = unsafe { IPCACHE_HOSTS.get(&IpcacheKey { addr: *addr }) } {
        return v.identity;
    }
    let key = Key::new(IpcacheKey::PREFIX_HOST, IpcacheKey { addr: *addr });
    match IPCACHE.get(&key) {
        Some(v) => v.identity,
        None => identity::WORLD,
    }
}

/// Looks up the allow entries of `ep` for traffic with `remote` in `direction` to `port`: first for the
/// remote's own identity, then for the "any peer" wildcard (unless the endpoint has no such entry in
/// that direction). Returns the rule id.
#[inline(always)]
fn policy_lookup(ep: &EndpointInfo, remote: u32, direction: u8, protocol: u8, port: u16) -> Option<u32> {
    // Entries wider than one port are in the trie; an endpoint without any for this direction and
    // protocol (the common case: ports are named one by one) never walks it.
    let wide = ep.flags & ep_flags::no_wide(direction, protocol) == 0;
    if let Some(rule) = allowed(ep.endpoint_id, remote, direction, protocol, port, wide) {
        return Some(rule);
    }
    let no_any = if direction == dir::INGRESS {
        ep_flags::NO_ANY_PEER_INGRESS
    } else {
        ep_flags::NO_ANY_PEER_EGRESS
    };
    if ep.flags & no_any != 0 {
        return None;
    }
    allowed(ep.endpoint_id, identity::ANY, direction, protocol, port, wide)
}

/// The allow entry for exactly this (endpoint, remote, direction, protocol, port), else (when `wide`)
/// the longest entry of the trie that contains it. An exact entry is the longest match there can be, so
/// this is the answer one trie of all entries would give.
#[inline(always)]
fn allowed(endpoint: u32, remote: u32, direction: u8, protocol: u8, port: u16, wide: bool) -> Option<u32> {
    let key = PolicyKey::new(endpoint, remote, direction, protocol, port);
    // SAFETY: the value is copied out at once.
    if let Some(v) = unsafe { POLICY_EXACT.get(&key) } {
        return Some(v.rule_id);
    }
    if !wide {
        return None;
    }
    POLICY
        .get(&Key::new(PolicyKey::PREFIX_FULL, key))
        .map(|v| v.rule_id)
}

/// Would `ep` admit a new connection in `direction` with `remote` to `port`?
/// Returns (reason, rule id) when it would.
#[inline(always)]
fn admits(ep: &EndpointInfo, remote: u32, direction: u8, protocol: u8, port: u16) -> Option<(u8, u32)> {
    // Kubernetes: a pod cannot block traffic from its own node (kubelet health checks).
    if direction == dir::INGRESS && remote == identity::HOST {
        return Some((reason::FROM_HOST, 0));
    }
    admits_peer(ep, remote, direction, protocol, port)
}

/// [`admits`] for a packet that entered the node on `from` (0: the node sent it). The node's address on
/// a packet the node did not send is forged, or translated on the way: not the node, so judged by policy
/// as any other peer.
#[inline(always)]
fn admits_from(
    ep: &EndpointInfo,
    remote: u32,
    direction: u8,
    protocol: u8,
    port: u16,
    from: u32,
) -> Option<(u8, u32)> {
    if from != 0 && direction == dir::INGRESS && remote == identity::HOST {
        admits_peer(ep, remote, direction, protocol, port)
    } else {
        admits(ep, remote, direction, protocol, port)
    }
}

/// [`admits`] without the node's exemption.
#[inline(always)]
fn admits_peer(ep: &EndpointInfo, remote: u32, direction: u8, protocol: u8, port: u16) -> Option<(u8, u32)> {
    let isolated = if direction == dir::INGRESS {
        ep.flags & ep_flags::ISOLATED_INGRESS != 0
    } else {
        ep.flags & ep_flags::ISOLATED_EGRESS != 0
    };
    if !isolated {
        return Some((reason::NOT_ISOLATED, 0));
    }
    policy_lookup(ep, remote, direction, protocol, port).map(|rule| (reason::ALLOWED_BY_POLICY, rule))
}

/// Whether a conntrack entry still admits its flow. `original_dir` and `port` describe the connection as it
/// was opened (for re-judging it under a newer policy revision).
#[inline(always)]
fn ct_admits(
    skb: *mut __sk_buff,
    ct: *mut CtValue,
    ep: &EndpointInfo,
    pkt: &Packet,
    remote_addr: &[u8; 16],
    original_dir: u8,
    port: u16,
    now: u64,
) -> Option<u32> {
    // SAFETY: pointer from a successful lookup; LRU values are plain data and may be written in place.
    let (last_seen, ct_rev, rule_id) = unsafe { ((*ct).last_seen_ns, (*ct).revision, (*ct).rule_id) };
    let timeout = if pkt.protocol == proto::TCP {
        ct_timeout::TCP_NS
    } else {
        ct_timeout::OTHER_NS
    };
    if now.wrapping_sub(last_seen) > timeout {
        return None;
    }
    let mut rule = rule_id;
    // Connectionless flows have no opening packet that policy could judge again: after a revision that
    // may have narrowed policy, the flow is judged again (TCP connections keep their admission; a new TCP
    // connection always starts with a SYN, which is judged).
    if pkt.protocol != proto::TCP {
        let revision = current_revision();
        if ct_rev != revision {
            // As the opening packet was judged: with the interface it entered on (a reply's is its
            // own endpoint's, which would make a masqueraded or node-sent flow look like the pod's own).
            // SAFETY: pointer from a successful lookup.
            let opened_from = unsafe { (*ct).peer_ifindex };
            let mut via_service = false;
            let (_, r, _) = judge(
                skb,
                ep,
                remote_addr,
                original_dir,
                pkt.protocol,
                port,
                opened_from,
                &mut via_service,
            )
            .ok()?;
            rule = r;
            unsafe {
                (*ct).revision = revision;
                (*ct).rule_id = r;
            }
        }
    }
    if now.wrapping_sub(last_seen) > ct_timeout::REFRESH_NS {
        unsafe { (*ct).last_seen_ns = now };
    }
    Some(rule)
}

/// `from` is the interface the packet entered the node on (`ingress_ifindex`, 0 when the node itself
/// sent it); `marked`, whether it carried the peer mark.
#[inline(always)]
fn decide(
    skb: *mut __sk_buff,
    ifindex: u32,
    direction: u8,
    from: u32,
    marked: bool,
    ep: &EndpointInfo,
    pkt: &Packet,
) -> Decision {
    // The coarse clock (the last tick's time): conntrack ages in seconds, and reading the precise clock
    // costs a clock-source read on every packet.
    // SAFETY: helper call without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let remote_addr = if direction == dir::INGRESS {
        &pkt.saddr
    } else {
        &pkt.daddr
    };
    let dport = u16::from_be(pkt.dport_be);
    let sport = u16::from_be(pkt.sport_be);
    // One key for the packets of both directions: one lookup per packet, whichever way it goes.
    let mut key = CtKey::new(
        ifindex,
        direction,
        &pkt.saddr,
        &pkt.daddr,
        pkt.sport_be,
        pkt.dport_be,
        pkt.protocol,
    );
    // A TCP SYN opens a connection: it is judged by policy even if an entry with its tuple exists (a
    // reused port must not inherit what an earlier connection was allowed).
    let opening_syn = pkt.protocol == proto::TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if !opening_syn && let Some(ct) = CONNTRACK.get_ptr_mut(&key) {
        // The peer mark vouches for a TCP packet only where this endpoint's entry for the connection
        // names the interface the packet came from as the peer that admitted it with this one: a mark
        // set by anything else on the node opens nothing.
        // SAFETY: pointer from a successful lookup.
        if marked
            && direction == dir::INGRESS
            && pkt.protocol == proto::TCP
            && from != 0
            && unsafe { (*ct).peer_ifindex } == from
        {
            let mut d = Decision::new(verdict::FORWARDED, reason::ESTABLISHED, 0, 0, false);
            d.peer_judged = true;
            return d;
        }
        // SAFETY: pointer from a successful lookup.
        let own = unsafe { (*ct).origin } == direction;
        // A packet of the connection's own direction is judged (again) as the opening packet was; a reply
        // as what it replies to.
        let (opened_dir, port, why) = if own {
            (direction, dport, reason::ESTABLISHED)
        } else {
            (opposite(direction), sport, reason::REPLY)
        };
        if let Some(rule_id) = ct_admits(skb, ct, ep, pkt, remote_addr, opened_dir, port, now) {
            // A TCP connection between two endpoints of this node that both have admitted: the packet
            // leaving one is judged for the other too. (Only TCP: its admission holds across policy
            // revisions at both ends, so neither end's judgment can go stale while the other's holds.)
            let mut d = Decision::new(verdict::FORWARDED, why, 0, rule_id, false);
            if pkt.protocol == proto::TCP && pkt.tcp_flags & TCP_RST != 0 {
                // The connection ends here: its entry goes now rather than when the full table evicts it
                // (eviction costs every new connection more). The RST passes each end's own hook, which
                // forgets its own entry; a stray segment after it is judged by policy (CT_RECOVERED).
                let _ = CONNTRACK.remove(&key);
            } else if direction == dir::EGRESS && pkt.protocol == proto::TCP && peer_mark() != 0 {
                // SAFETY: pointer from a successful lookup.
                d.peer = unsafe { (*ct).peer_ifindex };
            }
            return d;
        }
    }

    // Read before policy is: an entry admitted under a policy that a concurrent update narrows carries
    // the revision from before the update, so its flow is judged again at its next packet.
    let revision = current_revision();
    let mut via_service = false;
    let judged = judge(
        skb,
        ep,
        remote_addr,
        direction,
        pkt.protocol,
        dport,
        from,
        &mut via_service,
    );
    let mut d = decided(judged, pkt, opening_syn, &mut key, direction, from, now, revision);
    d.via_service = via_service;
    d
}

/// The decision on a packet without a conntrack entry that admits it, from its judgment; makes the entry
/// of an admitted one.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decided(
    judged: Result<(u8, u32, u32), (u8, u32)>,
    pkt: &Packet,
    opening_syn: bool,
    key: &mut CtKey,
    direction: u8,
    from: u32,
    now: u64,
    revision: u32,
) -> Decision {
    if !(pkt.protocol == proto::TCP && !opening_syn) {
        return match judged {
            Ok((why, rule_id, remote)) => {
                // TCP: the linked peer's interface, if any; other protocols: the interface the opening
                // packet entered on, which their re-judgments use.
                let peer = if pkt.protocol != proto::TCP {
                    from
                } else if direction == dir::INGRESS && opening_syn && peer_mark() != 0 {
                    link_peer(key, from)
                } else {
                    0
                };
                ct_create(key, direction, rule_id, now, revision, peer);
                Decision::new(verdict::FORWARDED, why, remote, rule_id, true)
            }
            Err((why, remote)) => Decision::new(verdict::DROPPED, why, remote, 0, true),
        };
    }

    // A TCP segment that is not an opening SYN and has no conntrack entry (its entry may have been
    // evicted from the LRU table, or it opens nothing) is judged in its own direction, as a SYN of the
    // same tuple would be: never in the reverse one, which the packet would choose by its ports. When
    // policy allows it, the entry is made again (so the other end's segments find it), except for RST and
    // FIN, which end connections rather than carry them. An evicted connection heals at the next segment
    // its opening side sends.
    match judged {
        Ok((_, rule_id, remote)) => {
            // Making the entry again opens the connection here as a SYN would: it is reported as new.
            let opens = pkt.tcp_flags & (TCP_RST | TCP_FIN) == 0;
            if opens {
                ct_create(key, direction, rule_id, now, revision, 0);
            }
            Decision::new(verdict::FORWARDED, reason::CT_RECOVERED, remote, rule_id, opens)
        }
        Err((why, remote)) => {
            let why = if why == reason::POLICY_DENIED {
                reason::NO_CT_ENTRY
            } else {
                why
            };
            Decision::new(verdict::DROPPED, why, remote, 0, false)
        }
    }
}

/// The judgment of a new flow in `direction` with the remote end at `remote_addr` and `port` (the
/// destination port of the flow's opening packet): `Ok((reason, rule id, remote identity))` when it is
/// admitted, else `Err((reason, remote identity))`.
///
/// A pod's egress to a Service frontend is judged by the backends the node will translate it to (this
/// hook runs before the node's DNAT): admitted when policy admits every class of backend, denied when it
/// admits none, and not guessed otherwise. With node ports on every local address
/// ([`node_ports::ANY_LOCAL`]), a node port at an address one of the node's `local` routes covers is such a
/// frontend too, whichever address it is. `via_service` is set when the judgment is a frontend's.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn judge(
    skb: *mut __sk_buff,
    ep: &EndpointInfo,
    remote_addr: &[u8; 16],
    direction: u8,
    protocol: u8,
    port: u16,
    from: u32,
    via_service: &mut bool,
) -> Result<(u8, u32, u32), (u8, u32)> {
    // Egress of an isolated endpoint to a Service is judged by its backends. (Not isolated: whatever the
    // destination, a Service and whichever backend the node picks included, it is admitted below.)
    // No frontend has the unspecified address (the node drops a packet to it): its key is the one of
    // node ports on any local address, which is looked up only for local addresses.
    if direction == dir::EGRESS
        && ep.flags & ep_flags::ISOLATED_EGRESS != 0
        && !parse::is_unspecified(remote_addr)
    {
        let mut key = ServiceKey {
            addr: *remote_addr,
            port_be: port.to_be(),
            protocol,
            _pad: 0,
        };
        // SAFETY: the reference does not outlive the program run.
        if let Some(svc) = unsafe { SERVICES.get(&key) } {
            *via_service = true;
            return service_verdict(ep, svc, protocol);
        }
        if CONFIG.get(0).map_or(0, |c| c.node_ports) == node_ports::ANY_LOCAL {
            // The unspecified address of the destination's family (IPv4 mapped: only the mapping prefix).
            key.addr = [0; 16];
            if parse::is_mapped(remote_addr) {
                key.addr[10] = 0xff;
                key.addr[11] = 0xff;
            }
            // SAFETY: as above.
            if let Some(svc) = unsafe { SERVICES.get(&key) } {
                match node_local(skb, remote_addr) {
                    Locality::Local => {
                        *via_service = true;
                        return service_verdict(ep, svc, protocol);
                    }
                    Locality::Unknown => return Err((reason::UNKNOWN_SERVICE, remote_identity(remote_addr))),
                    Locality::Elsewhere => {}
                }
            }
        }
        if SERVICE_RANGES
            .get(&Key::new(
                IpcacheKey::PREFIX_HOST,
                IpcacheKey { addr: *remote_addr },
            ))
            .is_some()
        {
            return Err((reason::UNKNOWN_SERVICE, remote_identity(remote_addr)));
        }
    }
    let mut remote = remote_identity(remote_addr);
    if direction == dir::INGRESS && remote == identity::HOST && from != 0 {
        // The node's address on a packet that entered through one of the node's interfaces: translated on
        // the way (kube-proxy masquerades a pod's connections to node ports and load-balancer addresses,
        // and hairpin ones). Through a pod's interface it is that pod's, whose source was checked there.
        // SAFETY: the value is copied out at once.
        if let Some(sender) = unsafe { ENDPOINTS.get(from) } {
            remote = sender.identity;
        }
    }
    match admits_from(ep, remote, direction, protocol, port, from) {
        Some((why, rule)) => Ok((why, rule, remote)),
        None => Err((reason::POLICY_DENIED, remote)),
    }
}

/// [`judge`]'s answer for a new connection to the Service frontend `svc`.
#[inline(always)]
fn service_verdict(ep: &EndpointInfo, svc: &ServiceValue, protocol: u8) -> Result<(u8, u32, u32), (u8, u32)> {
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
enum Locality {
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
fn node_local(skb: *mut __sk_buff, addr: &[u8; 16]) -> Locality {
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
fn judge_service(ep: &EndpointInfo, svc: &ServiceValue, protocol: u8) -> u64 {
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

/// A TCP connection opened from another endpoint of this node (`from`, the interface the SYN entered on)
/// and admitted here (`key`, this interface's entry): when the sender's interface admitted it too (its
/// entry for the connection exists, opened as its egress, written by that SYN), each entry learns the
/// other's interface. Returns the sender's interface, or 0. A SYN from elsewhere finds no entry under the
/// interface it entered on.
#[inline(always)]
fn link_peer(key: &mut CtKey, from: u32) -> u32 {
    let ifindex = key.ifindex;
    if from == 0 || from == ifindex {
        return 0;
    }
    // The sender's key differs from ours in the interface and in the direction the packet had there.
    // (Changed in place and restored: another key would not fit the stack.)
    let ours = key.direction;
    key.ifindex = from;
    key.direction = opposite(ours);
    let theirs = CONNTRACK.get_ptr_mut(&*key);
    key.ifindex = ifindex;
    key.direction = ours;
    let Some(theirs) = theirs else { return 0 };
    // SAFETY: pointer from a successful lookup; plain data written in place.
    unsafe {
        if (*theirs).origin != dir::EGRESS {
            return 0;
        }
        (*theirs).peer_ifindex = ifindex;
    }
    from
}

#[inline(always)]
fn ct_create(key: &CtKey, origin: u8, rule_id: u32, now: u64, revision: u32, peer_ifindex: u32) {
    let value = CtValue {
        last_seen_ns: now,
        rule_id,
        revision,
        origin,
        _pad: [0; 3],
        peer_ifindex,
    };
    if CONNTRACK.insert(key, &value, 0).is_err() {
        stat_inc(stat::CT_INSERT_FAILED);
    }
}

/// The policy revision the agent last published (read only where it matters: a TCP connection keeps its
/// admission across revisions, so its established packets never read it).
#[inline(always)]
fn current_revision() -> u32 {
    REVISION.get(0).copied().unwrap_or(0)
}

#[inline(always)]
fn stat_inc(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// [`EndpointInfo::slot`] of no slot: the packet is counted in the hash.
const NO_SLOT: u32 = EndpointInfo::NO_SLOT;

/// Counts a packet for the endpoint of `ifindex`: in its slot when it has one and the packet is of the
/// kind slots count (forwarded, of an established connection), else in the hash.
#[inline(always)]
fn count(ifindex: u32, slot: u32, direction: u8, verdict: u8, reason: u8, len: u32) {
    if slot != NO_SLOT
        && SlotCounters::counts(verdict, reason)
        && let Some(p) = SLOT_COUNTERS.get_ptr_mut(slot)
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        && let Some(c) = unsafe { (*p).get_mut(direction, verdict, reason) }
    {
        c.packets += 1;
        c.bytes += len as u64;
        return;
    }
    let key = CounterKey {
        ifindex,
        direction,
        verdict,
        reason,
        _pad: 0,
    };
    if let Some(p) = COUNTERS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*p).packets += 1;
            (*p).bytes += len as u64;
        }
    } else {
        let _ = COUNTERS.insert(
            &key,
            &CounterValue {
                packets: 1,
                bytes: len as u64,
            },
            0,
        );
    }
}

/// Sends one event, unless the flow already had one within the configured interval (drops only: new
/// allowed connections are already once per connection).
#[inline(always)]
fn emit(
    ctx: &TcContext,
    flow: &CtKey,
    ep_identity: u32,
    pkt: &Packet,
    d: &Decision,
    v: u8,
    interval_ns: u64,
) {
    // SAFETY: helper call without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut last = None;
    if v != verdict::FORWARDED {
        // A flood of denied packets costs one lookup each, not an event each.
        last = EVENT_RATE.get_ptr_mut(flow);
        // SAFETY: pointer from a successful lookup.
        if let Some(l) = last
            && now.wrapping_sub(unsafe { *l }) < interval_ns
        {
            stat_inc(stat::EVENTS_RATE_LIMITED);
            return;
        }
    }
    if !within_budget(flow.ifindex, now) {
        stat_inc(stat::EVENTS_OVER_BUDGET);
        return;
    }
    // Stamped only for an event that is sent: one left out for the budget is sent at the flow's next
    // packet once the budget allows, not an interval later.
    if v != verdict::FORWARDED {
        match last {
            // SAFETY: pointer from a successful lookup; plain data written in place.
            Some(l) => unsafe { *l = now },
            None => {
                let _ = EVENT_RATE.insert(flow, &now, 0);
            }
        }
    }
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        stat_inc(stat::EVENTS_LOST);
        return;
    };
    // Written field by field in place: a FlowEvent built on the stack would not fit the 512-byte frame.
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved, writable FlowEvent-sized record.
    unsafe {
        (*e).ts_ns = now;
        (*e).ifindex = flow.ifindex;
        (*e).endpoint_identity = ep_identity;
        (*e).remote_identity = d.remote_identity;
        (*e).rule_id = d.rule_id;
        (*e).saddr = pkt.saddr;
        (*e).daddr = pkt.daddr;
        (*e).sport = u16::from_be(pkt.sport_be);
        (*e).dport = u16::from_be(pkt.dport_be);
        (*e).family = pkt.family;
        (*e).protocol = pkt.protocol;
        (*e).direction = flow.direction;
        (*e).verdict = v;
        (*e).reason = d.reason;
        (*e).tcp_flags = pkt.tcp_flags;
        (*e).flags = if d.new_flow { event_flags::NEW_FLOW } else { 0 }
            | if d.via_service { event_flags::SERVICE } else { 0 };
        (*e)._pad = 0;
        (*e).pkt_len = ctx.len();
    }
    entry.submit(0);
}

/// Takes one event from the interface's budget for the current one-second window (the configured
/// number per window; 0: no limit). A flood of distinct denied flows from one pod costs that pod's
/// budget only. (Updates from two CPUs at once may both count as one: the budget is approximate, never
/// shared between interfaces.)
#[inline(always)]
fn within_budget(ifindex: u32, now: u64) -> bool {
    let budget = CONFIG.get(0).map_or(0, |c| c.event_budget);
    if budget == 0 {
        return true;
    }
    if let Some(w) = EVENT_BUDGET.get_ptr_mut(&ifindex) {
        // SAFETY: pointer from a successful lookup; plain data written in place.
        unsafe {
            if now.wrapping_sub((*w).start_ns) >= 1_000_000_000 {
                (*w).start_ns = now;
                (*w).events = 1;
                return true;
            }
            if (*w).events >= budget {
                return false;
            }
            (*w).events += 1;
        }
        return true;
    }
    let _ = EVENT_BUDGET.insert(
        &ifindex,
        &EventWindow {
            start_ns: now,
            events: 1,
            _pad: 0,
        },
        0,
    );
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
