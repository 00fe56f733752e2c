//! Conntrack entries: making one (with the same-node peer link) and the policy revision they record.
//! What an existing entry still admits is part of the decision (`judge::ct_admits`).

use ztrust_common::{CtKey, CtValue, ct_flags, dir, stat};

use crate::{
    maps::{CONNTRACK, REVISION},
    opposite,
    report::stat_inc,
};

/// A TCP connection opened from another endpoint of this node (`from`, the interface the SYN entered on)
/// and admitted here (`key`, this interface's entry): when the sender's interface admitted it too (its
/// entry for the connection exists, opened as its egress, written by that SYN, and not only audited),
/// each entry learns the other's interface. Returns the sender's interface, or 0. A SYN from elsewhere finds no entry under the
/// interface it entered on.
#[inline(always)]
pub(crate) fn link_peer(key: &mut CtKey, from: u32) -> u32 {
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
        // A connection the sender only audits is judged by each end (and again at each revision):
        // never linked.
        if (*theirs).origin != dir::EGRESS || (*theirs).flags & ct_flags::AUDITED != 0 {
            return 0;
        }
        (*theirs).peer_ifindex = ifindex;
    }
    from
}

/// `audit_reason`: 0 for a connection policy admits; for one only audit lets pass, the reason
/// enforcement would drop it for ([`ct_flags::AUDITED`]).
#[inline(always)]
pub(crate) fn ct_create(
    key: &CtKey,
    origin: u8,
    rule_id: u32,
    now: u64,
    revision: u32,
    peer_ifindex: u32,
    audit_reason: u8,
) {
    let value = CtValue {
        last_seen_ns: now,
        rule_id,
        revision,
        origin,
        flags: if audit_reason != 0 { ct_flags::AUDITED } else { 0 },
        audit_reason,
        _pad: 0,
        peer_ifindex,
    };
    if CONNTRACK.insert(key, &value, 0).is_err() {
        stat_inc(stat::CT_INSERT_FAILED);
    }
}

/// The policy revision the agent last published (read only where it matters: a TCP connection keeps its
/// admission across revisions, so its established packets never read it).
#[inline(always)]
pub(crate) fn current_revision() -> u32 {
    REVISION.get(0).copied().unwrap_or(0)
}
