//! The one address space in which the ipcache matches both families, as the datapath does: an IPv4
//! address is the IPv4-mapped IPv6 address `::ffff:a.b.c.d`, an IPv4 prefix of length `n` is the prefix
//! of length `n + 96` there. The engine must know it to find the identity the kernel finds for an
//! address (an IPv6 prefix that covers `::ffff:0:0/96` also covers every IPv4 address); the kernel's
//! key layout itself is the datapath's (`crate::datapath::keys`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;
use ztrust_common::identity;

use super::Desired;

/// An address in the ipcache's space.
pub fn mapped(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// A prefix in the ipcache's space: its length there and its network address.
pub fn mapped_net(net: &IpNet) -> (u32, u128) {
    match net {
        IpNet::V4(n) => (
            u32::from(n.prefix_len()) + 96,
            u128::from(n.network().to_ipv6_mapped()),
        ),
        IpNet::V6(n) => (u32::from(n.prefix_len()), u128::from(n.network())),
    }
}

/// Inverse of [`mapped_net`]; `None` for a length over 128.
pub fn unmapped_net(prefix: u32, network: u128) -> Option<IpNet> {
    let v6 = Ipv6Addr::from(network);
    match v6.to_ipv4_mapped() {
        Some(v4) if prefix >= 96 => ipnet::Ipv4Net::new(v4, (prefix - 96) as u8).ok().map(IpNet::V4),
        _ => ipnet::Ipv6Net::new(v6, u8::try_from(prefix).ok()?)
            .ok()
            .map(IpNet::V6),
    }
}

/// The identity the kernel finds for `addr`: matched against the ipcache as the kernel holds it — one
/// value per prefix of the mapped space, the last one a full sync writes (ipcache prefixes in order) —
/// taking the longest prefix that contains it over all 129 lengths, whatever family the entry came
/// from (the single addresses of the hash are the /128s); [`identity::WORLD`] when no entry contains it.
pub fn remote_identity(desired: &Desired, addr: IpAddr) -> u32 {
    IpcacheIndex::new(desired).identity(addr)
}

/// The ipcache as the kernel matches it, for many lookups: longest-prefix match over the mapped
/// addresses, [`identity::WORLD`] where nothing matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpcacheIndex(BTreeMap<(u32, u128), u32>);

impl IpcacheIndex {
    pub fn new(desired: &Desired) -> Self {
        Self(
            desired
                .ipcache
                .iter()
                .map(|(net, id)| (mapped_net(net), *id))
                .collect(),
        )
    }

    /// Brings the entries of `changed` (prefixes of `desired`'s ipcache that appeared, went or changed
    /// identity) up to date: afterwards the index is what [`IpcacheIndex::new`] builds from `desired`.
    pub fn update<'a>(&mut self, desired: &Desired, changed: impl IntoIterator<Item = &'a IpNet>) {
        for net in changed {
            let at = mapped_net(net);
            // The prefixes that map to `at`: the IPv6 one and, in the IPv4-mapped range, the IPv4 one.
            // Of two, the index keeps the later in the ipcache's order, the IPv6 one.
            let v6 = ipnet::Ipv6Net::new(Ipv6Addr::from(at.1), at.0 as u8)
                .ok()
                .map(IpNet::V6);
            let v4 = unmapped_net(at.0, at.1).filter(|n| matches!(n, IpNet::V4(_)));
            match v6
                .and_then(|n| desired.ipcache.get(&n))
                .or_else(|| v4.and_then(|n| desired.ipcache.get(&n)))
            {
                Some(id) => self.0.insert(at, *id),
                None => self.0.remove(&at),
            };
        }
    }

    pub fn identity(&self, addr: IpAddr) -> u32 {
        let want = mapped(addr);
        (0..=128u32)
            .rev()
            .find_map(|prefix| {
                let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                self.0.get(&(prefix, want & mask)).copied()
            })
            .unwrap_or(identity::WORLD)
    }
}
