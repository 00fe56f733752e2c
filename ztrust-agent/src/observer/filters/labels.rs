//! `source_label`, `destination_label`: Kubernetes-style equality selectors on the pod labels.
//!
//! One string is a selector of comma-separated requirements that must all hold (as in
//! `kubectl get -l`): `key=value` (or `key==value`), `key!=value`, `key` (exists), `!key` (absent).
//! Several strings are alternatives.

use super::{Error, FilterFn, Result, all_of, any};
use crate::flows::Flow;
use crate::model::Labels;
use crate::observer::proto::FlowFilter;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

/// A parsed label selector. Also used by the detector for its sensitive tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

impl std::str::FromStr for Selector {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let err = || Error::Label(s.to_owned());
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim) {
            let req = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::Absent(k.trim().to_owned())
            } else {
                Requirement::Exists(part.to_owned())
            };
            let key = match &req {
                Requirement::Equals(k, _)
                | Requirement::NotEquals(k, _)
                | Requirement::Exists(k)
                | Requirement::Absent(k) => k,
            };
            if !valid_key(key) {
                return Err(err());
            }
            reqs.push(req);
        }
        Ok(Self(reqs))
    }
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
        })
    }
}

pub fn build(ff: &FlowFilter) -> Result<Option<FilterFn>> {
    let parse = |s: &String| s.parse::<Selector>();
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
    use crate::observer::filters::testing::{allowed, denied};

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

    #[test]
    fn invalid_selectors() {
        for bad in ["", "=x", "a b=c", "x,,y", "!"] {
            assert!(bad.parse::<Selector>().is_err(), "{bad:?}");
        }
    }
}
