//! `source_label`, `destination_label`: Kubernetes-style equality selectors on the pod labels.
//!
//! One string is a selector of comma-separated requirements that must all hold (as in
//! `kubectl get -l`): `key=value` (or `key==value`), `key!=value`, `key` (exists), `!key` (absent).
//! Several strings are alternatives.

use super::{Error, FilterFn, Result, all_of, any};
use crate::flows::Flow;
use crate::labels::Selector;
use crate::observer::proto::FlowFilter;

pub fn build(ff: &FlowFilter) -> Result<Option<FilterFn>> {
    let parse = |s: &String| s.parse::<Selector>().map_err(|e| Error::Label(e.0));
    Ok(all_of([
        any(&ff.source_label, parse, |s: &Selector, f: &Flow| {
            s.matches(&f.source.labels)
        })?,
        any(&ff.destination_label, parse, |s: &Selector, f: &Flow| {
            s.matches(&f.destination.labels)
        })?,
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{allowed, denied};

    fn dst(sel: &[&str]) -> FilterFn {
        build(&FlowFilter {
            destination_label: sel.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn requirements() {
        assert!(dst(&["tier=database"])(&denied()));
        assert!(dst(&["tier==database"])(&denied()));
        assert!(!dst(&["tier=web"])(&denied()));
        assert!(dst(&["tier!=web"])(&denied()));
        assert!(dst(&["tier"])(&denied()));
        assert!(!dst(&["!tier"])(&denied()));
        // An address outside the cluster has no labels: `!key` and `key!=v` hold, `key=v` does not.
        assert!(dst(&["!tier"])(&allowed()) && dst(&["tier!=database"])(&allowed()));
        assert!(!dst(&["tier=database"])(&allowed()));
    }

    #[test]
    fn comma_is_and_values_are_or() {
        assert!(dst(&["app=database,tier=database"])(&denied()));
        assert!(!dst(&["app=database,tier=web"])(&denied()));
        assert!(dst(&["app=web", "app=database"])(&denied()));
        let src = build(&FlowFilter {
            source_label: vec!["app=frontend".into()],
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert!(src(&denied()) && !src(&allowed()));
    }
}
