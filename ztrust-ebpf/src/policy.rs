//! Who the remote end is and what policy admits: the ipcache (host entries, then the longest prefix),
//! the exact and wide policy entries, the "any peer" wildcard and the same-node peer's verdict.

use aya_ebpf::maps::lpm_trie::Key;
use ztrust_common::{EndpointInfo, IpcacheKey, PolicyKey, dir, ep_flags, identity, reason};

use crate::maps::{IPCACHE, IPCACHE_HOSTS, POLICY, POLICY_EXACT};

#[inline(always)]
pub(crate) fn remote_identity(addr: &[u8; 16]) -> u32 {
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
pub(crate) fn policy_lookup(
    ep: &EndpointInfo,
    remote: u32,
    direction: u8,
    protocol: u8,
    port: u16,
) -> Option<u32> {
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
pub(crate) fn allowed(
    endpoint: u32,
    remote: u32,
    direction: u8,
    protocol: u8,
    port: u16,
    wide: bool,
) -> Option<u32> {
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
pub(crate) fn admits(
    ep: &EndpointInfo,
    remote: u32,
    direction: u8,
    protocol: u8,
    port: u16,
) -> Option<(u8, u32)> {
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
pub(crate) fn admits_from(
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
pub(crate) fn admits_peer(
    ep: &EndpointInfo,
    remote: u32,
    direction: u8,
    protocol: u8,
    port: u16,
) -> Option<(u8, u32)> {
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
