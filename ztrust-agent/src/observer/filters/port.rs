//! `destination_port`: `5432` or `8000-8080` (inclusive, like NetworkPolicy `port`/`endPort`). Flows
//! of protocols without ports (ICMP) never match.

use super::{Error, FilterFn, Result, any};
use crate::flows::Flow;
use crate::observer::proto::FlowFilter;

fn parse(s: &str) -> Result<(u16, u16)> {
    let err = || Error::Port(s.to_owned());
    let one = |p: &str| p.trim().parse::<u16>().map_err(|_| err());
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (one(lo)?, one(hi)?),
        None => (one(s)?, one(s)?),
    };
    if lo > hi { Err(err()) } else { Ok((lo, hi)) }
}

pub fn build(ff: &FlowFilter) -> Result<Option<FilterFn>> {
    any(
        &ff.destination_port,
        |v: &String| parse(v),
        |(lo, hi): &(u16, u16), f: &Flow| f.destination.port.is_some_and(|p| (*lo..=*hi).contains(&p)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{allowed, denied};

    fn f(p: &[&str]) -> FilterFn {
        build(&FlowFilter {
            destination_port: p.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn ports_and_ranges() {
        assert!(f(&["5432"])(&denied()));
        assert!(!f(&["5433"])(&denied()));
        assert!(f(&["5000-6000"])(&denied()));
        assert!(f(&["80", "53"])(&allowed()));
        let mut icmp = denied();
        icmp.destination.port = None;
        assert!(!f(&["0-65535"])(&icmp));
    }

    #[test]
    fn invalid() {
        for bad in ["", "x", "70000", "90-80", "1-2-3"] {
            assert!(
                build(&FlowFilter {
                    destination_port: vec![bad.into()],
                    ..Default::default()
                })
                .is_err(),
                "{bad}"
            );
        }
    }
}
