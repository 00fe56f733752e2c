//! What a decision leaves behind: the drop statistics, the packet counters (per slot or in the hash)
//! and the rate-limited flow events within the per-interface budget.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use ztrust_common::{
    CounterKey, CounterValue, CtKey, EndpointInfo, EventWindow, FlowEvent, SlotCounters, event_flags, stat,
    verdict,
};

use crate::{
    Decision,
    maps::{CONFIG, COUNTERS, EVENT_BUDGET, EVENT_RATE, EVENTS, SLOT_COUNTERS, STATS},
    parse::Packet,
};

#[inline(always)]
pub(crate) fn stat_inc(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// [`EndpointInfo::slot`] of no slot: the packet is counted in the hash.
pub(crate) const NO_SLOT: u32 = EndpointInfo::NO_SLOT;

/// Counts a packet for the endpoint of `ifindex`: in its slot when it has one and the packet is of the
/// kind slots count (forwarded, of an established connection), else in the hash.
#[inline(always)]
pub(crate) fn count(ifindex: u32, slot: u32, direction: u8, verdict: u8, reason: u8, len: u32) {
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
pub(crate) fn emit(
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
        if let Some(l) = last
            // SAFETY: pointer from a successful lookup; a plain read.
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
pub(crate) fn within_budget(ifindex: u32, now: u64) -> bool {
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
