//! What the kernel holds for the desired state: an endpoint's policy entries by allow group, the
//! flags that say which lookups it needs, and the Service table's keys and values.

use super::*;

/// The kernel's key of a Service frontend.
pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: ip_to_mapped(f.addr),
        port_be: f.port.to_be(),
        protocol: f.protocol.number(),
        _pad: 0,
    }
}

/// The kernel's value for a frontend with `classes` (the first [`ztrust_common::SERVICE_CLASSES`] of
/// them, and how many there are).
pub fn service_value(classes: &[crate::policy::BackendClass]) -> ServiceValue {
    let mut v = ServiceValue {
        classes: classes.len() as u32,
        ..Default::default()
    };
    for (slot, (identity, port)) in v.class.iter_mut().zip(classes) {
        *slot = BackendClass {
            identity: *identity,
            port: *port,
            _pad: 0,
        };
    }
    v
}

/// The policy entries of `allow` for endpoint `ifindex`: all groups, or only `only` (each listed group
/// present, empty if it has no entries now).
pub(super) fn entries_for(
    ifindex: u32,
    allow: &BTreeMap<AllowKey, u32>,
    only: Option<&BTreeSet<AllowGroup>>,
) -> Grouped {
    let mut out = Grouped::new();
    let add = |out: &mut Grouped, key: &AllowKey, rule: u32| {
        let group = out.entry(key.group()).or_default();
        for (prefix, pk) in policy_keys(ifindex, key) {
            group.entry((prefix, pk)).or_insert(PolicyValue {
                rule_id: rule,
                _pad: 0,
            });
        }
    };
    match only {
        None => {
            for (key, rule) in allow {
                add(&mut out, key, *rule);
            }
        }
        Some(groups) => {
            for &(direction, remote, protocol) in groups {
                out.entry((direction, remote, protocol)).or_default();
                let lo = AllowKey {
                    direction,
                    remote,
                    protocol,
                    port_lo: 0,
                    port_hi: 0,
                };
                let hi = AllowKey {
                    direction,
                    remote,
                    protocol,
                    port_lo: u16::MAX,
                    port_hi: u16::MAX,
                };
                for (key, rule) in allow.range(lo..=hi) {
                    add(&mut out, key, *rule);
                }
            }
        }
    }
    out
}

pub(super) const ISOLATION: u32 = ep_flags::ISOLATED_INGRESS | ep_flags::ISOLATED_EGRESS;

/// [`ep_flags::NO_ANY_PEER_INGRESS`] / `_EGRESS` for an allow set (a range query per direction: the
/// set is ordered by direction, then remote, and [`identity::ANY`] is the lowest remote).
pub(super) fn no_any_peer_flags(allow: &BTreeMap<AllowKey, u32>) -> u32 {
    let mut flags = 0;
    for (direction, flag) in [
        (dir::INGRESS, ep_flags::NO_ANY_PEER_INGRESS),
        (dir::EGRESS, ep_flags::NO_ANY_PEER_EGRESS),
    ] {
        let lo = AllowKey {
            direction,
            remote: identity::ANY,
            protocol: 0,
            port_lo: 0,
            port_hi: 0,
        };
        let hi = AllowKey {
            direction,
            remote: identity::ANY,
            protocol: u8::MAX,
            port_lo: u16::MAX,
            port_hi: u16::MAX,
        };
        if allow.range(lo..=hi).next().is_none() {
            flags |= flag;
        }
    }
    flags
}

/// Whether `key` is written as entries wider than one port, into the policy trie (see [`policy_keys`]):
/// any protocol, or more than one port. (An empty range writes nothing; it counts as wide, which only
/// costs a trie walk.)
pub(super) fn is_wide(key: &AllowKey) -> bool {
    key.protocol == proto::ANY || key.port_lo != key.port_hi
}

/// The `NO_WIDE_*` flags for an allow set: one for each direction and protocol class (TCP, UDP, any
/// other) that no wide entry serves. An entry for any protocol serves them all.
pub(super) fn no_wide_flags(allow: &BTreeMap<AllowKey, u32>) -> u32 {
    let mut wide = 0;
    for key in allow.keys().filter(|k| is_wide(k)) {
        wide |= if key.protocol == proto::ANY {
            [proto::TCP, proto::UDP, proto::ICMP]
                .iter()
                .fold(0, |f, &p| f | ep_flags::no_wide(key.direction, p))
        } else {
            ep_flags::no_wide(key.direction, key.protocol)
        };
    }
    ep_flags::ALL_NO_WIDE & !wide
}

/// The endpoint entry to write during the narrowing step: isolated wherever the old or the new state is,
/// in audit mode only where both are (audit never drops, so it is the open side); a direction isolated
/// by audited policies only (`AUDIT_INGRESS`/`AUDIT_EGRESS`) on one side and not isolated, or audited,
/// on the other stays audited (both sides pass it). The "no any-peer
/// entry" and "no wide entry" flags too are kept only where both have them: such an entry is still looked
/// up while it may exist, and the final write sets them once the entries are gone. (These flags only
/// skip lookups: a stale one can hide an entry, never open anything.)
pub(super) fn narrowest(old: &EndpointInfo, new: &EndpointInfo) -> EndpointInfo {
    let per_direction = ISOLATION | ep_flags::AUDIT_INGRESS | ep_flags::AUDIT_EGRESS;
    let mut flags = old.flags & new.flags & !per_direction;
    for (isolated, audit) in [
        (ep_flags::ISOLATED_INGRESS, ep_flags::AUDIT_INGRESS),
        (ep_flags::ISOLATED_EGRESS, ep_flags::AUDIT_EGRESS),
    ] {
        let enforces = |f: u32| f & isolated != 0 && f & audit == 0;
        if old.flags & isolated != 0 || new.flags & isolated != 0 {
            flags |= isolated;
        }
        // A direction one side enforces is enforced; one that only audited policies isolate on either
        // side stays audited (it passes everything on both sides: isolating it for real would drop).
        if !enforces(old.flags) && !enforces(new.flags) && (old.flags | new.flags) & audit != 0 {
            flags |= audit;
        }
    }
    EndpointInfo { flags, ..*new }
}
