//! The decision on a packet: its conntrack entry, else the judgment of a new flow (by the Service
//! frontend's backends when it is one), and the entry an admitted flow makes.

use aya_ebpf::{bindings::__sk_buff, helpers::bpf_ktime_get_coarse_ns, maps::lpm_trie::Key};
use ztrust_common::{
    CtKey, CtValue, EndpointInfo, IpcacheKey, ServiceKey, ct_flags, ct_timeout, dir, ep_flags, identity,
    node_ports, proto, reason,
    tcp_flags::{ACK as TCP_ACK, FIN as TCP_FIN, RST as TCP_RST, SYN as TCP_SYN},
    verdict,
};

use crate::{
    Decision,
    conntrack::{ct_create, current_revision, link_peer},
    maps::{CONFIG, CONNTRACK, ENDPOINTS, SERVICE_RANGES, SERVICES},
    opposite,
    parse::{self, Packet},
    peer_mark,
    policy::{admits_from, remote_identity},
    services::{Locality, node_local, service_verdict},
};

/// `from` is the interface the packet entered the node on (`ingress_ifindex`, 0 when the node itself
/// sent it); `marked`, whether it carried the peer mark.
#[inline(always)]
pub(crate) fn decide(
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
            // SAFETY: `ct` is from the successful lookup above; plain field reads. (An audited entry
            // keeps the interface its connection entered on there, which vouches for nothing.)
            && unsafe { (*ct).peer_ifindex == from && (*ct).flags & ct_flags::AUDITED == 0 }
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
            // SAFETY: pointer from a successful lookup; plain field reads.
            let (audited, audit_reason) =
                unsafe { ((*ct).flags & ct_flags::AUDITED != 0, (*ct).audit_reason) };
            let rst = pkt.protocol == proto::TCP && pkt.tcp_flags & TCP_RST != 0;
            if rst {
                // The connection ends here: its entry goes now rather than when the full table evicts it
                // (eviction costs every new connection more). The RST passes each end's own hook, which
                // forgets its own entry; a stray segment after it is judged by policy (CT_RECOVERED).
                let _ = CONNTRACK.remove(&key);
            }
            if audited && own {
                // What enforcement would drop, as it would drop the opening packet: reported so.
                return Decision::new(
                    verdict::WOULD_DROP,
                    audit_reason,
                    remote_identity(remote_addr),
                    0,
                    false,
                );
            }
            // A TCP connection between two endpoints of this node that both have admitted: the packet
            // leaving one is judged for the other too. (Only TCP: its admission holds across policy
            // revisions at both ends, so neither end's judgment can go stale while the other's holds.
            // Not one only audit lets pass, which is judged again at each revision.)
            let mut d = Decision::new(verdict::FORWARDED, why, 0, rule_id, false);
            if !rst && !audited && direction == dir::EGRESS && pkt.protocol == proto::TCP && peer_mark() != 0
            {
                // SAFETY: pointer from a successful lookup.
                d.peer = unsafe { (*ct).peer_ifindex };
            }
            return d;
        }
        // Stale, or no longer admitted: the packet is judged as a new one, and the entry is not
        // looked at again (judged again at every packet) unless the judgment makes it anew.
        let _ = CONNTRACK.remove(&key);
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
    let mut d = decided(
        judged,
        pkt,
        opening_syn,
        &mut key,
        ep,
        direction,
        from,
        now,
        revision,
    );
    d.via_service = via_service;
    d
}

/// Whether a conntrack entry still admits its flow. `original_dir` and `port` describe the connection as it
/// was opened (for re-judging it under a newer policy revision).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn ct_admits(
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
    let (last_seen, ct_rev, rule_id, audited) = unsafe {
        (
            (*ct).last_seen_ns,
            (*ct).revision,
            (*ct).rule_id,
            (*ct).flags & ct_flags::AUDITED != 0,
        )
    };
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
    // connection always starts with a SYN, which is judged). So is a connection only audit lets pass,
    // whatever its protocol: enforcement, once it begins, ends it.
    if pkt.protocol != proto::TCP || audited {
        let revision = current_revision();
        if ct_rev != revision {
            // As the opening packet was judged: with the interface it entered on (a reply's is its
            // own endpoint's, which would make a masqueraded or node-sent flow look like the pod's own).
            // SAFETY: pointer from a successful lookup.
            let opened_from = unsafe { (*ct).peer_ifindex };
            let mut via_service = false;
            let (r, flags, why) = match judge(
                skb,
                ep,
                remote_addr,
                original_dir,
                pkt.protocol,
                port,
                opened_from,
                &mut via_service,
            ) {
                // Admitted now (an audited connection included: its opening direction now admits it).
                Ok((_, r, _)) => (r, 0, 0),
                // Still only audit lets it pass, for what is now the reason.
                Err((why, _)) if audited && audits(ep, original_dir, why) => (0, ct_flags::AUDITED, why),
                Err(_) => return None,
            };
            rule = r;
            // SAFETY: `ct` points at the map value of a successful lookup (the caller's); plain stores.
            unsafe {
                (*ct).revision = revision;
                (*ct).rule_id = r;
                (*ct).flags = flags;
                (*ct).audit_reason = why;
                if audited && flags == 0 && pkt.protocol == proto::TCP {
                    // An audited TCP connection keeps the interface it entered on here, which for an
                    // admitted one would name a linked peer: it has none.
                    (*ct).peer_ifindex = 0;
                }
            }
        }
    }
    if now.wrapping_sub(last_seen) > ct_timeout::REFRESH_NS {
        // SAFETY: as above, a plain store into the map value.
        unsafe { (*ct).last_seen_ns = now };
    }
    Some(rule)
}

/// The decision on a packet without a conntrack entry that admits it, from its judgment; makes the entry
/// of an admitted one, and of one only audit lets pass (a would-drop): its replies are then the
/// connection's, as they would be were it admitted, not judged by the other direction's policies.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn decided(
    judged: Result<(u8, u32, u32), (u8, u32)>,
    pkt: &Packet,
    opening_syn: bool,
    key: &mut CtKey,
    ep: &EndpointInfo,
    direction: u8,
    from: u32,
    now: u64,
    revision: u32,
) -> Decision {
    // A TCP segment that is not an opening SYN and has no conntrack entry (its entry may have been
    // evicted from the LRU table, or it opens nothing) is judged in its own direction, as a SYN of the
    // same tuple would be: never in the reverse one, which the packet would choose by its ports. When
    // policy allows it, the entry is made again (so the other end's segments find it), except for RST and
    // FIN, which end connections rather than carry them. An evicted connection heals at the next segment
    // its opening side sends.
    let opening = pkt.protocol != proto::TCP || opening_syn;
    let carries = opening || pkt.tcp_flags & (TCP_RST | TCP_FIN) == 0;
    // The entry to make: (rule id, peer, audit reason).
    let (d, entry) = match judged {
        Ok((why, rule_id, remote)) if opening => {
            // TCP: the linked peer's interface, if any; other protocols: the interface the opening
            // packet entered on, which their re-judgments use.
            let peer = if pkt.protocol != proto::TCP {
                from
            } else if direction == dir::INGRESS && peer_mark() != 0 {
                link_peer(key, from)
            } else {
                0
            };
            (
                Decision::new(verdict::FORWARDED, why, remote, rule_id, true),
                Some((rule_id, peer, 0)),
            )
        }
        // Making the entry again opens the connection here as a SYN would: it is reported as new.
        Ok((_, rule_id, remote)) => (
            Decision::new(verdict::FORWARDED, reason::CT_RECOVERED, remote, rule_id, carries),
            carries.then_some((rule_id, 0, 0)),
        ),
        Err((why, remote)) => {
            let why = if !opening && why == reason::POLICY_DENIED {
                reason::NO_CT_ENTRY
            } else {
                why
            };
            if audits(ep, direction, why) {
                // Only what opens a connection makes an audited entry: a TCP segment in the middle of
                // one (its entry gone, or enforcement begun in its own direction) would make the
                // direction it goes the connection's own, and the enforced side's packets its replies.
                // Never linked to a peer (`link_peer` leaves audited entries alone; each end judges
                // its packets): the interface the opening packet entered on, which its re-judgments use.
                (
                    Decision::new(verdict::WOULD_DROP, why, remote, 0, opening),
                    opening.then_some((0, from, why)),
                )
            } else {
                (Decision::new(verdict::DROPPED, why, remote, 0, opening), None)
            }
        }
    };
    if let Some((rule_id, peer, audit_reason)) = entry {
        ct_create(key, direction, rule_id, now, revision, peer, audit_reason);
    }
    d
}

/// Does audit let pass what enforcement would drop for `why` in `direction` of `ep`: audit mode
/// everywhere, the endpoint's namespace's, or this direction's when only audited policies isolate it?
/// Service judgments included; what cannot be judged (malformed, fragments, unknown endpoints) and
/// forged sources are dropped in every mode.
#[inline(always)]
pub(crate) fn audits(ep: &EndpointInfo, direction: u8, why: u8) -> bool {
    matches!(
        why,
        reason::POLICY_DENIED
            | reason::NO_CT_ENTRY
            | reason::SERVICE_BACKENDS_DIFFER
            | reason::UNKNOWN_SERVICE
    ) && (ep.flags | CONFIG.get(0).map_or(0, |c| c.flags)) & (ep_flags::AUDIT | ep_flags::audit_in(direction))
        != 0
}

/// The judgment of a new flow (see [`judge_flow`]), made by the global function [`zt_judge`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn judge(
    skb: *mut __sk_buff,
    ep: &EndpointInfo,
    remote_addr: &[u8; 16],
    direction: u8,
    protocol: u8,
    port: u16,
    from: u32,
    via_service: &mut bool,
) -> Result<(u8, u32, u32), (u8, u32)> {
    // Denied unless it says otherwise.
    let mut out = Judged {
        reason: reason::POLICY_DENIED,
        ..Judged::default()
    };
    let args =
        u64::from(direction) | (u64::from(protocol) << 8) | (u64::from(port) << 16) | (u64::from(from) << 32);
    zt_judge(skb, ep, remote_addr, args, &mut out);
    *via_service = out.via_service != 0;
    if out.admitted != 0 {
        Ok((out.reason, out.rule_id, out.remote))
    } else {
        Err((out.reason, out.remote))
    }
}

/// What [`zt_judge`] found.
#[repr(C)]
#[derive(Default)]
pub struct Judged {
    rule_id: u32,
    remote: u32,
    reason: u8,
    admitted: u8,
    via_service: u8,
    _pad: u8,
}

/// [`judge_flow`] as a global BPF function: the verifier checks it once, by itself, and its callers
/// with whatever it may return. (Inlined, each of its outcomes would be explored through the rest of
/// the pipeline, at each place that judges: the programs would exceed the verifier's budget.) The
/// linker exports it (`build.rs`), which is what makes it global. `args`: direction, protocol, port and
/// the interface the packet entered on, packed (a global function takes at most five arguments).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn zt_judge(
    skb: *mut __sk_buff,
    ep: *const EndpointInfo,
    remote_addr: *const [u8; 16],
    args: u64,
    out: *mut Judged,
) -> u32 {
    // The verifier knows pointer arguments only as possibly null.
    if ep.is_null() || remote_addr.is_null() || out.is_null() {
        return 0;
    }
    // SAFETY: non-null, and the verifier has checked at the call that each points at memory of its
    // type's size.
    let (ep, remote_addr, out) = unsafe { (&*ep, &*remote_addr, &mut *out) };
    let mut via_service = false;
    let judged = judge_flow(
        skb,
        ep,
        remote_addr,
        args as u8,
        (args >> 8) as u8,
        (args >> 16) as u16,
        (args >> 32) as u32,
        &mut via_service,
    );
    out.via_service = u8::from(via_service);
    match judged {
        Ok((why, rule, remote)) => {
            out.admitted = 1;
            out.reason = why;
            out.rule_id = rule;
            out.remote = remote;
        }
        Err((why, remote)) => {
            out.admitted = 0;
            out.reason = why;
            out.rule_id = 0;
            out.remote = remote;
        }
    }
    0
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
fn judge_flow(
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
