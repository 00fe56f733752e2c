//! ztrust datapath: TC programs on the host side of each pod's interface.
//!
//! `zt_from_pod` runs on the host interface's ingress (packets the pod sends: the pod's egress);
//! `zt_to_pod` on its egress (packets delivered to the pod: the pod's ingress). Both run the same
//! pipeline: parse → conntrack → identity of the remote address → policy lookup → verdict, counters and
//! (rate-limited) events. Every error path drops: the datapath fails closed.
#![no_std]
#![no_main]
// Clippy checks this crate for the host (`cargo xtask test`: the BPF toolchain has no clippy), where two
// lints see what the BPF target does not need: aya's bindings have other integer types on the host
// (`TC_ACT_OK as i32` is a cast there only), and a map key passed by value rather than by reference
// would be one more copy on the 512-byte BPF stack.
#![allow(clippy::unnecessary_cast, clippy::needless_borrows_for_generic_args)]

mod conntrack;
mod judge;
mod maps;
mod parse;
mod policy;
mod report;
mod services;

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use ztrust_common::{Config, CtKey, EndpointInfo, addr_words, dir, encap, ep_flags, reason, stat, verdict};

use crate::{
    judge::decide,
    maps::{CONFIG, ENDPOINTS},
    parse::{Packet, Parsed},
    policy::remote_identity,
    report::{NO_SLOT, count, emit, stat_inc},
};

/// The `skb->mark` bit with which a sending endpoint's interface tells the receiving endpoint's interface
/// on this node that both have admitted the packet's TCP connection (0: never). Set by the agent when it
/// loads the programs (`--peer-mark`): a constant to the verifier.
#[unsafe(no_mangle)]
static PEER_MARK: u32 = 0;

#[inline(always)]
pub(crate) fn peer_mark() -> u32 {
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
pub(crate) struct Decision {
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
    let (ep_identity, slot) = match ep {
        Some(ep) => (ep.identity, ep.slot),
        None => (0, NO_SLOT),
    };
    // Audit (`judge::audits`) has made what policy would drop a would-drop already.
    let v = d.verdict;
    // The settings matter only for a drop or a new connection: a packet of an established one does not
    // read them (every map a packet touches is a likely cache miss while a stream sweeps the caches;
    // those of a connection only audit lets pass do: they are reported).
    let config = if v != verdict::FORWARDED || d.new_flow {
        CONFIG.get(0).copied().unwrap_or_default()
    } else {
        Config::default()
    };
    count(ifindex, slot, direction, v, d.reason, ctx.len());
    // The receiving endpoint is still there (its interface is not gone, its address not yet anyone
    // else's): it is told that the packet is judged, and the packet is counted for it as its own hook
    // would have counted it.
    if d.peer != 0
        && v == verdict::FORWARDED
        // SAFETY: the value is only read, at once.
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
pub(crate) fn own_source(ep: &EndpointInfo, saddr: &[u8; 16], family: u8) -> bool {
    let s = addr_words(saddr);
    if family == 4 {
        s == addr_words(&ep.addr4)
    } else {
        s == addr_words(&ep.addr6) && (s[0] | s[1]) != 0
    }
}

#[inline(always)]
pub(crate) fn opposite(direction: u8) -> u8 {
    if direction == dir::INGRESS {
        dir::EGRESS
    } else {
        dir::INGRESS
    }
}

/// The packet's own tuple at this hook (not canonical): what its event and its event rate limit name.
#[inline(always)]
pub(crate) fn flow_key(ifindex: u32, direction: u8, pkt: &Packet) -> CtKey {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
