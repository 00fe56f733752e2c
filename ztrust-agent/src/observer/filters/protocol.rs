//! `protocol`: TCP, UDP, SCTP, ICMP, ICMPv6 (case-insensitive).

use super::{Error, FilterFn, Result, any};
use crate::observer::proto::FlowFilter;

pub fn build(ff: &FlowFilter) -> Result<Option<FilterFn>> {
    any(
        &ff.protocol,
        |p: &String| {
            let p = p.trim();
            if p.is_empty() {
                Err(Error::Empty("protocol"))
            } else {
                Ok(p.to_owned())
            }
        },
        |p: &String, f| f.protocol.eq_ignore_ascii_case(p),
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
    }
}
