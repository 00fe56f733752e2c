//! `source_ip`, `destination_ip`: an address or a CIDR. IPv4 written as IPv4 never matches an IPv6
//! address and the other way round (flows carry IPv4 unmapped, see `flows::addr`).

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Error, FilterFn, Result, all_of, any};
use crate::flows::Flow;
use crate::observer::proto::FlowFilter;

fn parse(s: &str) -> Result<IpNet> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| Error::Ip(s.to_owned()))
}

pub fn build(ff: &FlowFilter) -> Result<Option<FilterFn>> {
    Ok(all_of([
        any(
            &ff.source_ip,
            |v: &String| parse(v),
            |n: &IpNet, f: &Flow| n.contains(&f.source.ip),
        )?,
        any(
            &ff.destination_ip,
            |v: &String| parse(v),
            |n: &IpNet, f: &Flow| n.contains(&f.destination.ip),
        )?,
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{allowed, denied};

    fn f(src: &[&str], dst: &[&str]) -> FilterFn {
        build(&FlowFilter {
            source_ip: src.iter().map(|s| s.to_string()).collect(),
            destination_ip: dst.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn addresses_and_cidrs() {
        assert!(f(&["10.244.0.10"], &[])(&denied()));
        assert!(!f(&["10.244.0.11"], &[])(&denied()));
        assert!(f(&["10.244.0.0/24"], &[])(&denied()));
        assert!(f(&[], &["0.0.0.0/0"])(&allowed()));
        assert!(!f(&[], &["::/0"])(&allowed()), "an IPv6 CIDR never matches IPv4");
        assert!(f(&[], &["10.0.0.0/8", "8.8.8.8"])(&allowed()));
        assert!(
            !f(&["10.244.1.0/24"], &["10.0.0.0/8"])(&allowed()),
            "source and destination AND together"
        );
    }

    #[test]
    fn invalid() {
        for bad in ["", "10.0.0.300", "10.0.0.0/33", "host.example"] {
            assert!(
                build(&FlowFilter {
                    source_ip: vec![bad.into()],
                    ..Default::default()
                })
                .is_err(),
                "{bad}"
            );
        }
    }
}
