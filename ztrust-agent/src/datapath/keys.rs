//! The kernel's key layout: allow entries → policy-map keys (exact or LPM), ipcache prefixes → ipcache
//! keys (the mapped space of [`crate::policy::ipcache`] as bytes), and a simulation of the kernel's
//! lookups over a [`Desired`] state, against which the engine is tested.

use std::net::IpAddr;

use ipnet::IpNet;
use ztrust_common::{IpcacheKey, PolicyKey, dir, identity, proto};

use crate::model::ObjectRef;
use crate::policy::ipcache::{mapped, mapped_net, remote_identity, unmapped_net};
use crate::policy::{AllowKey, Desired, EndpointPolicy};

/// The LPM-trie entries `(prefix length, key)` of one allow entry of endpoint `endpoint_id`.
///
/// Protocol 0 is a `PREFIX_ANY_PROTO` entry (any protocol and port); a full port range is a
/// `PREFIX_ANY_PORT` entry; any other range is split into the minimal set of aligned power-of-two port
/// blocks, each of prefix `PREFIX_FULL - log2(block size)`, because the trie matches bit prefixes only.
pub fn policy_keys(endpoint_id: u32, key: &AllowKey) -> Vec<(u32, PolicyKey)> {
    let new = |protocol, port| PolicyKey::new(endpoint_id, key.remote, key.direction, protocol, port);
    if key.protocol == proto::ANY {
        return vec![(PolicyKey::PREFIX_ANY_PROTO, new(proto::ANY, 0))];
    }
    if key.port_lo > key.port_hi {
        return Vec::new();
    }
    if key.port_lo == 0 && key.port_hi == u16::MAX {
        return vec![(PolicyKey::PREFIX_ANY_PORT, new(key.protocol, 0))];
    }
    let mut out = Vec::new();
    let mut lo = u32::from(key.port_lo);
    let hi = u32::from(key.port_hi);
    while lo <= hi {
        // Largest block aligned at `lo` that does not pass `hi`.
        let mut k = if lo == 0 { 16 } else { lo.trailing_zeros().min(16) };
        while lo + (1 << k) - 1 > hi {
            k -= 1;
        }
        // lo < 65536 here: the loop only continues while lo <= hi <= 65535.
        out.push((PolicyKey::PREFIX_FULL - k, new(key.protocol, lo as u16)));
        lo += 1 << k;
    }
    out
}

/// An ipcache key in the trie's format: IPv4 is stored IPv4-mapped with its prefix length + 96.
pub fn ipcache_key(net: &IpNet) -> (u32, IpcacheKey) {
    let (prefix, network) = mapped_net(net);
    (
        prefix,
        IpcacheKey {
            addr: network.to_be_bytes(),
        },
    )
}

/// Inverse of [`ipcache_key`].
pub fn ipcache_net(prefix: u32, key: &IpcacheKey) -> Option<IpNet> {
    unmapped_net(prefix, u128::from_be_bytes(key.addr))
}

/// An address as the datapath keys it: IPv4 IPv4-mapped.
pub fn ip_to_mapped(ip: IpAddr) -> [u8; 16] {
    mapped(ip).to_be_bytes()
}

fn bits(k: &PolicyKey) -> u128 {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&k.endpoint);
    b[4..8].copy_from_slice(&k.identity);
    b[8] = k.direction;
    b[9] = k.protocol;
    b[10..12].copy_from_slice(&k.port);
    u128::from_be_bytes(b)
}

/// Simulates whether the kernel lets a new connection's first packet pass at `endpoint`'s hook in
/// `direction` (admitted, or a would-drop where only audited policies isolate): the remote is `src` on
/// ingress, `dst` on egress. Traffic from the node is always
/// allowed on ingress; a non-isolated direction allows everything; otherwise the policy LPM trie is
/// looked up with the remote's identity, then with [`identity::ANY`]. An unknown endpoint is dropped,
/// as the kernel drops traffic of an interface it has no endpoint entry for, and so is an IPv6 packet
/// with an IPv4-mapped address (the datapath drops it as malformed: it would be judged as IPv4).
pub fn lookup(
    desired: &Desired,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    dport: u16,
    endpoint: &ObjectRef,
    direction: u8,
) -> bool {
    let Some(ep) = desired.endpoints.get(endpoint) else {
        return false;
    };
    let mapped = |a: IpAddr| matches!(a, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
    if mapped(src) || mapped(dst) {
        return false;
    }
    let remote = remote_identity(desired, if direction == dir::INGRESS { src } else { dst });
    if direction == dir::INGRESS && remote == identity::HOST {
        return true;
    }
    // Isolated by audited policies only: a denial is a would-drop, which passes.
    let audited = if direction == dir::INGRESS {
        ep.audit_ingress
    } else {
        ep.audit_egress
    };
    audited || admits_remote(ep, remote, direction, protocol, dport)
}

/// Simulates the kernel's `admits_peer`: whether `ep` admits a new connection in `direction` with a
/// remote of identity `remote` to `port` (a non-isolated direction admits everything; otherwise the
/// policy entries of `remote`, then of [`identity::ANY`]).
pub fn admits_remote(ep: &EndpointPolicy, remote: u32, direction: u8, protocol: u8, port: u16) -> bool {
    let isolated = if direction == dir::INGRESS {
        ep.isolated_ingress
    } else {
        ep.isolated_egress
    };
    !isolated || allowing_rule(ep, remote, direction, protocol, port).is_some()
}

/// The rule id the kernel's lookup finds among `ep`'s allow entries for a new connection in `direction`
/// with a remote of identity `remote` to `port`: the longest entry for `remote`, else for
/// [`identity::ANY`]; of equally long entries, the first in allow order (the one the sync writes).
/// Isolation is the caller's to check.
pub fn allowing_rule(
    ep: &EndpointPolicy,
    remote: u32,
    direction: u8,
    protocol: u8,
    port: u16,
) -> Option<u32> {
    const EP: u32 = 1;
    [remote, identity::ANY].iter().find_map(|id| {
        let want = bits(&PolicyKey::new(EP, *id, direction, protocol, port));
        let mut best: Option<(u32, u32)> = None;
        for (key, rule) in &ep.allow {
            for (plen, k) in policy_keys(EP, key) {
                let shift = 128 - plen;
                if (bits(&k) >> shift) == (want >> shift) && best.is_none_or(|(p, _)| plen > p) {
                    best = Some((plen, *rule));
                }
            }
        }
        best.map(|(_, rule)| rule)
    })
}
