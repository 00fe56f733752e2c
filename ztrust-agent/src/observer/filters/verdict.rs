//! `verdict`: FORWARDED, DROPPED, WOULD_DROP.

use super::{Error, FilterFn, Result, any};
use crate::observer::convert;
use crate::observer::proto::{FlowFilter, Verdict};

pub fn build(ff: &FlowFilter) -> Result<Option<FilterFn>> {
    any(
        &ff.verdict,
        |v| match Verdict::try_from(*v) {
            Ok(Verdict::Unknown) | Err(_) => Err(Error::Enum {
                field: "verdict",
                value: *v,
            }),
            Ok(v) => Ok(convert::verdict_from_proto(v)),
        },
        |v: &crate::flows::Verdict, f| f.verdict == *v,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{allowed, denied};

    fn filter(v: &[Verdict]) -> FilterFn {
        build(&FlowFilter {
            verdict: v.iter().map(|v| *v as i32).collect(),
            ..Default::default()
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn matches_the_verdict() {
        assert!(filter(&[Verdict::Dropped])(&denied()));
        assert!(!filter(&[Verdict::Dropped])(&allowed()));
        assert!(filter(&[Verdict::Forwarded])(&allowed()));
        let mut audit = denied();
        audit.verdict = crate::flows::Verdict::WouldDrop;
        assert!(!filter(&[Verdict::Dropped])(&audit));
        assert!(
            filter(&[Verdict::Dropped, Verdict::WouldDrop])(&audit),
            "values OR together"
        );
    }

    #[test]
    fn unset_and_invalid() {
        assert!(build(&FlowFilter::default()).unwrap().is_none());
        assert!(
            build(&FlowFilter {
                verdict: vec![0],
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            build(&FlowFilter {
                verdict: vec![99],
                ..Default::default()
            })
            .is_err()
        );
    }
}
