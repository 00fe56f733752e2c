//! `destination_service`: the Service (`namespace/name`, or a prefix of it as for pods) whose frontend
//! a flow addressed.

use super::pod::{named, parse};
use super::{FilterFn, Result, any};
use crate::flows::Flow;
use crate::observer::proto::FlowFilter;

fn is(f: &Flow, prefix: &str) -> bool {
    f.service
        .as_ref()
        .is_some_and(|s| named(&s.name.namespace, &s.name.name, prefix))
}

pub fn build(ff: &FlowFilter) -> Result<Option<FilterFn>> {
    any(
        &ff.destination_service,
        |v: &String| parse(v),
        |p: &String, f: &Flow| is(f, p),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::ServiceRef;
    use crate::flows::testing::{allowed, denied};

    #[test]
    fn by_service_name_or_prefix() {
        let f = |v: &str| {
            build(&FlowFilter {
                destination_service: vec![v.into()],
                ..Default::default()
            })
            .unwrap()
            .unwrap()
        };
        let mut to_db = denied();
        to_db.service = Some(ServiceRef {
            name: "payments/database".parse().unwrap(),
            backends: vec!["payments/database-0".parse().unwrap()],
        });
        assert!(f("payments/database")(&to_db));
        assert!(f("payments/")(&to_db));
        assert!(!f("payments/backend")(&to_db));
        assert!(!f("shop/database")(&to_db));
        // A flow to a pod address names no Service.
        assert!(!f("payments/")(&denied()));
        assert!(!f("shop/")(&allowed()));
        assert!(
            build(&FlowFilter {
                destination_service: vec!["database".into()],
                ..Default::default()
            })
            .is_err()
        );
    }
}
