//! Address allocation for pods whose manifest gives no `status.podIP`.
//!
//! IPv4 from 10.244.0.0/24 (from .10 upward; .1 is the node), IPv6 from fd00:10:244::/64 with the same
//! host number, so `10.244.0.12` and `fd00:10:244::c` are the same pod at a glance.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1);
/// The link-local gateway every pod routes through (Calico's choice): it exists on every node-side
/// interface, so no address of the pod network is spent on gateways.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const FIRST_HOST: u32 = 10;
const LAST_HOST: u32 = 254;

/// Hands out pod addresses that are not in use.
#[derive(Clone, Debug)]
pub struct Allocator {
    used: BTreeSet<IpAddr>,
}

impl Allocator {
    /// `used`: addresses already taken (pods with given addresses, pods of a running lab).
    pub fn new(used: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut used: BTreeSet<IpAddr> = used.into_iter().collect();
        used.insert(IpAddr::V4(NODE_V4));
        used.insert(IpAddr::V6(NODE_V6));
        Self { used }
    }

    /// The next free pair (IPv4, IPv6) with the same host number, or `None` when the /24 is full.
    pub fn next_pair(&mut self) -> Option<(Ipv4Addr, Ipv6Addr)> {
        for host in FIRST_HOST..=LAST_HOST {
            let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) | host);
            let v6 =
                Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0)) | host as u128);
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
            a.next_pair(),
            Some((Ipv4Addr::new(10, 244, 0, 10), "fd00:10:244::a".parse().unwrap()))
        );
        assert_eq!(
            a.next_pair(),
            Some((Ipv4Addr::new(10, 244, 0, 11), "fd00:10:244::b".parse().unwrap()))
        );
    }

    #[test]
    fn skips_used_addresses_of_either_family() {
        let mut a = Allocator::new(["10.244.0.10".parse().unwrap(), "fd00:10:244::b".parse().unwrap()]);
        assert_eq!(a.next_pair().unwrap().0, Ipv4Addr::new(10, 244, 0, 12));
        a.mark_used("10.244.0.13".parse().unwrap());
        assert_eq!(a.next_pair().unwrap().0, Ipv4Addr::new(10, 244, 0, 14));
    }

    #[test]
    fn runs_out() {
        let mut a = Allocator::new([]);
        assert_eq!((0..245).filter_map(|_| a.next_pair()).count(), 245);
        assert_eq!(a.next_pair(), None);
    }

    #[test]
    fn never_hands_out_the_node() {
        let mut a = Allocator::new([]);
        while let Some((v4, v6)) = a.next_pair() {
            assert_ne!(v4, NODE_V4);
            assert_ne!(v6, NODE_V6);
        }
    }
}
