//! `source_pod`, `destination_pod`, `pod` (either end): `namespace/name`, or a prefix of it
//! (`payments/` for the namespace, `payments/web-` for every replica of a Deployment), as Hubble's
//! pod filter does.

use super::{Error, FilterFn, Result, all_of, any};
use crate::flows::{Endpoint, Flow};
use crate::observer::proto::FlowFilter;

pub(super) fn parse(p: &str) -> Result<String> {
    if p.is_empty() || !p.contains('/') {
        Err(Error::Empty("pod (use namespace/name)"))
    } else {
        Ok(p.to_owned())
    }
}

/// Does `namespace`/`name` match `prefix` (`namespace/` or `namespace/name-prefix`)?
pub(super) fn named(namespace: &str, name: &str, prefix: &str) -> bool {
    let (want_ns, want_name) = prefix.split_once('/').unwrap_or((prefix, ""));
    namespace == want_ns && name.starts_with(want_name)
}

fn is(e: &Endpoint, prefix: &str) -> bool {
    e.pod
        .as_ref()
        .is_some_and(|p| named(&p.namespace, &p.name, prefix))
}

pub fn build(ff: &FlowFilter) -> Result<Option<FilterFn>> {
    Ok(all_of([
        any(
            &ff.source_pod,
            |v: &String| parse(v),
            |p: &String, f: &Flow| is(&f.source, p),
        )?,
        any(
            &ff.destination_pod,
            |v: &String| parse(v),
            |p: &String, f: &Flow| is(&f.destination, p),
        )?,
        any(
            &ff.pod,
            |v: &String| parse(v),
            |p: &String, f: &Flow| is(&f.source, p) || is(&f.destination, p),
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
    fn exact_and_prefix() {
        assert!(f(FlowFilter {
            source_pod: vec!["payments/frontend-7d9".into()],
            ..Default::default()
        })(&denied()));
        assert!(f(FlowFilter {
            source_pod: vec!["payments/frontend".into()],
            ..Default::default()
        })(&denied()));
        assert!(f(FlowFilter {
            source_pod: vec!["payments/".into()],
            ..Default::default()
        })(&denied()));
        assert!(!f(FlowFilter {
            source_pod: vec!["payments/database".into()],
            ..Default::default()
        })(&denied()));
        // The namespace part is never a prefix: `pay/` is not `payments/`.
        assert!(!f(FlowFilter {
            source_pod: vec!["pay/".into()],
            ..Default::default()
        })(&denied()));
        assert!(f(FlowFilter {
            destination_pod: vec!["payments/database-0".into()],
            ..Default::default()
        })(&denied()));
    }

    #[test]
    fn either_end_and_external_addresses() {
        let web = f(FlowFilter {
            pod: vec!["shop/web".into()],
            ..Default::default()
        });
        assert!(web(&allowed()) && !web(&denied()));
        // 8.8.8.8 is no pod.
        assert!(!f(FlowFilter {
            destination_pod: vec!["shop/".into()],
            ..Default::default()
        })(&allowed()));
        assert!(
            build(&FlowFilter {
                pod: vec!["no-slash".into()],
                ..Default::default()
            })
            .is_err()
        );
    }
}
