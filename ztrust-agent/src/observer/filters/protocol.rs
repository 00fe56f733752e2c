//! `protocol`: TCP, UDP, SCTP, ICMP, ICMPv6 (case-insensitive), or `IP/<number>`.

use super::{Error, FilterFn, Result, any};
use crate::flows::IpProtocol;
use crate::observer::proto::FlowFilter;

pub fn build(ff: &FlowFilter) -> Result<Option<FilterFn>> {
    any(
        &ff.protocol,
        |p: &String| {
            let p = p.trim();
            if p.is_empty() {
                Err(Error::Empty("protocol"))
            } else {
                Ok(p.parse::<IpProtocol>()?)
            }
        },
        |p: &IpProtocol, f| f.protocol == *p,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{allowed, denied};

    #[test]
    fn matches_case_insensitively() {
        let f = build(&FlowFilter {
            protocol: vec!["tcp".into()],
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert!(f(&denied()));
        assert!(!f(&allowed()));
        let f = build(&FlowFilter {
            protocol: vec!["TCP".into(), "Udp".into()],
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert!(f(&allowed()));
        assert!(
            build(&FlowFilter {
                protocol: vec![" ".into()],
                ..Default::default()
            })
            .is_err()
        );
        // A name that is no protocol is an error, not a filter that matches nothing.
        assert!(matches!(
            build(&FlowFilter {
                protocol: vec!["TPC".into()],
                ..Default::default()
            }),
            Err(Error::Protocol(_))
        ));
        let gre = build(&FlowFilter {
            protocol: vec!["ip/47".into()],
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        let mut f = denied();
        assert!(!gre(&f));
        f.protocol = IpProtocol(47);
        assert!(gre(&f));
    }
}
