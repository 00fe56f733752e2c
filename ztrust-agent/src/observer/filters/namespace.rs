//! `source_namespace`, `destination_namespace`, `namespace` (either end).
//!
//! Three fields, three predicates: all that are set must hold.

use super::{Error, FilterFn, Result, all_of, any};
use crate::flows::{Endpoint, Flow};
use crate::observer::proto::FlowFilter;

fn parse(ns: &str) -> Result<String> {
    if ns.is_empty() {
        Err(Error::Empty("namespace"))
    } else {
        Ok(ns.to_owned())
    }
}

fn in_ns(e: &Endpoint, ns: &str) -> bool {
    e.namespace() == Some(ns)
}

pub fn build(ff: &FlowFilter) -> Result<Option<FilterFn>> {
    Ok(all_of([
        any(
            &ff.source_namespace,
            |v: &String| parse(v),
            |ns: &String, f: &Flow| in_ns(&f.source, ns),
        )?,
        any(
            &ff.destination_namespace,
            |v: &String| parse(v),
            |ns: &String, f: &Flow| in_ns(&f.destination, ns),
        )?,
        any(
            &ff.namespace,
            |v: &String| parse(v),
            |ns: &String, f: &Flow| in_ns(&f.source, ns) || in_ns(&f.destination, ns),
        )?,
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{allowed, denied};

    fn f(ff: FlowFilter) -> FilterFn {
        build(&ff).unwrap().unwrap()
    }

    #[test]
    fn source_destination_and_either() {
        assert!(f(FlowFilter {
            source_namespace: vec!["payments".into()],
            ..Default::default()
        })(&denied()));
        assert!(!f(FlowFilter {
            source_namespace: vec!["shop".into()],
            ..Default::default()
        })(&denied()));
        // The destination of `allowed` is outside the cluster: no namespace.
        assert!(!f(FlowFilter {
            destination_namespace: vec!["shop".into()],
            ..Default::default()
        })(&allowed()));
        let either = f(FlowFilter {
            namespace: vec!["shop".into(), "payments".into()],
            ..Default::default()
        });
        assert!(either(&denied()) && either(&allowed()));
        let both = f(FlowFilter {
            source_namespace: vec!["shop".into()],
            destination_namespace: vec!["payments".into()],
            ..Default::default()
        });
        assert!(!both(&denied()) && !both(&allowed()), "fields AND together");
        assert!(build(&FlowFilter::default()).unwrap().is_none());
        assert!(
            build(&FlowFilter {
                namespace: vec![String::new()],
                ..Default::default()
            })
            .is_err()
        );
    }
}
