//! `policy`: a NetworkPolicy, `namespace/name` or just `name`, that either allowed the flow
//! (`allowed_by`) or isolates its endpoint (`policies`, for drops).

use super::{Error, FilterFn, Result, any};
use crate::flows::Flow;
use crate::model::ObjectRef;
use crate::observer::proto::FlowFilter;

fn is(candidate: &ObjectRef, wanted: &str) -> bool {
    match wanted.split_once('/') {
        Some((namespace, name)) => candidate.namespace == namespace && candidate.name == name,
        None => candidate.name == wanted,
    }
}

pub fn build(ff: &FlowFilter) -> Result<Option<FilterFn>> {
    any(
        &ff.policy,
        |p: &String| {
            if p.is_empty() {
                Err(Error::Empty("policy"))
            } else {
                Ok(p.clone())
            }
        },
        |p: &String, f: &Flow| {
            f.policies.iter().any(|c| is(c, p)) || f.allowed_by.as_ref().is_some_and(|a| is(&a.policy, p))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{allowed, denied};

    fn f(p: &[&str]) -> FilterFn {
        build(&FlowFilter {
            policy: p.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn isolating_or_allowing_policy() {
        assert!(f(&["payments/default-deny-all"])(&denied()));
        assert!(f(&["backend-to-database"])(&denied()));
        assert!(!f(&["shop/backend-to-database"])(&denied()));
        assert!(f(&["shop/allow-dns"])(&allowed()));
        assert!(f(&["allow-dns"])(&allowed()));
        assert!(!f(&["allow"])(&allowed()), "names are not prefixes");
        assert!(
            build(&FlowFilter {
                policy: vec![String::new()],
                ..Default::default()
            })
            .is_err()
        );
    }
}
