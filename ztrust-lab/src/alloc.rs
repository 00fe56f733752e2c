//! Address allocation: each node's pod address block, its own addresses, and the addresses of pods
//! whose manifest gives no `status.podIP`.
//!
//! Node `b` (its block number, from 0) has IPv4 10.244.b.0/24 and IPv6 fd00:10:244:b::/64; it is `.1`
//! of its block, its pods from `.10` upward with the same host number in both families, so
//! `10.244.0.12` and `fd00:10:244::c` are the same pod at a glance.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// The first node's addresses (the only node of a one-node lab).
pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1);
/// The link-local gateway every pod routes through (Calico's choice): it exists on every node-side
/// interface, so no address of the pod network is spent on gateways.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const FIRST_HOST: u32 = 10;
const LAST_HOST: u32 = 254;
/// Blocks (and so nodes) a lab can have.
pub const MAX_NODES: usize = 16;

fn host(block: u8, host: u32) -> (Ipv4Addr, Ipv6Addr) {
    let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, block, 0)) | host);
    let v6 = Ipv6Addr::from(
        u128::from(Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(block), 0, 0, 0, 0)) | u128::from(host),
    );
    (v4, v6)
}

/// The addresses of the node of `block`.
pub fn node_addrs(block: u8) -> (Ipv4Addr, Ipv6Addr) {
    host(block, 1)
}

/// The pod address block of node `block`.
pub fn block_cidrs(block: u8) -> (Ipv4Net, Ipv6Net) {
    let (v4, v6) = host(block, 0);
    (
        Ipv4Net::new(v4, 24).expect("a /24 is valid"),
        Ipv6Net::new(v6, 64).expect("a /64 is valid"),
    )
}

/// Hands out pod addresses that are not in use.
#[derive(Clone, Debug)]
pub struct Allocator {
    used: BTreeSet<IpAddr>,
}

impl Allocator {
    /// `used`: addresses already taken (the nodes', pods with given addresses, pods of a running lab).
    pub fn new(used: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut used: BTreeSet<IpAddr> = used.into_iter().collect();
        used.insert(IpAddr::V4(NODE_V4));
        used.insert(IpAddr::V6(NODE_V6));
        Self { used }
    }

    /// The next free pair (IPv4, IPv6) with the same host number in node `block`'s block, or `None`
    /// when it is full.
    pub fn next_pair(&mut self, block: u8) -> Option<(Ipv4Addr, Ipv6Addr)> {
        for n in FIRST_HOST..=LAST_HOST {
            let (v4, v6) = host(block, n);
            if !self.used.contains(&IpAddr::V4(v4)) && !self.used.contains(&IpAddr::V6(v6)) {
                self.used.insert(IpAddr::V4(v4));
                self.used.insert(IpAddr::V6(v6));
                return Some((v4, v6));
            }
        }
        None
    }

    pub fn mark_used(&mut self, ip: IpAddr) {
        self.used.insert(ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_ten_with_matching_v6() {
        let mut a = Allocator::new([]);
        assert_eq!(
            a.next_pair(0),
            Some((Ipv4Addr::new(10, 244, 0, 10), "fd00:10:244::a".parse().unwrap()))
        );
        assert_eq!(
            a.next_pair(0),
            Some((Ipv4Addr::new(10, 244, 0, 11), "fd00:10:244::b".parse().unwrap()))
        );
    }

    #[test]
    fn skips_used_addresses_of_either_family() {
        let mut a = Allocator::new(["10.244.0.10".parse().unwrap(), "fd00:10:244::b".parse().unwrap()]);
        assert_eq!(a.next_pair(0).unwrap().0, Ipv4Addr::new(10, 244, 0, 12));
        a.mark_used("10.244.0.13".parse().unwrap());
        assert_eq!(a.next_pair(0).unwrap().0, Ipv4Addr::new(10, 244, 0, 14));
    }

    #[test]
    fn runs_out() {
        let mut a = Allocator::new([]);
        assert_eq!((0..245).filter_map(|_| a.next_pair(0)).count(), 245);
        assert_eq!(a.next_pair(0), None);
    }

    #[test]
    fn each_node_has_its_block() {
        let mut a = Allocator::new([]);
        assert_eq!(
            a.next_pair(2),
            Some((Ipv4Addr::new(10, 244, 2, 10), "fd00:10:244:2::a".parse().unwrap()))
        );
        assert_eq!(
            node_addrs(2),
            (Ipv4Addr::new(10, 244, 2, 1), "fd00:10:244:2::1".parse().unwrap())
        );
        let (v4, v6) = block_cidrs(2);
        assert_eq!(
            (v4.to_string(), v6.to_string()),
            ("10.244.2.0/24".into(), "fd00:10:244:2::/64".into())
        );
        assert_eq!(a.next_pair(0).unwrap().0, Ipv4Addr::new(10, 244, 0, 10));
    }

    #[test]
    fn never_hands_out_the_node() {
        let mut a = Allocator::new([]);
        while let Some((v4, v6)) = a.next_pair(0) {
            assert_ne!(v4, NODE_V4);
            assert_ne!(v6, NODE_V6);
        }
    }
}
