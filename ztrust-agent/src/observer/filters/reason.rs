//! `reason`: the stable reason enumeration (`ztrust_common::reason`).

use super::{Error, FilterFn, Result, any};
use crate::observer::convert;
use crate::observer::proto::{FlowFilter, Reason};

pub fn build(ff: &FlowFilter) -> Result<Option<FilterFn>> {
    any(
        &ff.reason,
        |v| match Reason::try_from(*v) {
            Ok(Reason::Unknown) | Err(_) => Err(Error::Enum {
                field: "reason",
                value: *v,
            }),
            Ok(r) => Ok(convert::reason_from_proto(r)),
        },
        |r: &crate::flows::Reason, f| f.reason == *r,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{allowed, denied};

    #[test]
    fn matches_the_reason() {
        let f = |r: &[Reason]| {
            build(&FlowFilter {
                reason: r.iter().map(|r| *r as i32).collect(),
                ..Default::default()
            })
            .unwrap()
            .unwrap()
        };
        assert!(f(&[Reason::PolicyDenied])(&denied()));
        assert!(!f(&[Reason::PolicyDenied])(&allowed()));
        assert!(f(&[Reason::UnknownEndpoint, Reason::AllowedByPolicy])(&allowed()));
        assert!(
            build(&FlowFilter {
                reason: vec![63],
                ..Default::default()
            })
            .is_err()
        );
    }
}
