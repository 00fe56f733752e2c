//! Flow filters, Hubble style (cilium `pkg/hubble/filters`): each field of a [`FlowFilter`] is turned
//! into a predicate by its own module; within one `FlowFilter` every set field must match (AND), the
//! values of one field are alternatives (OR); a flow passes a request when it matches any whitelist
//! filter (or there is none) and no blacklist filter.
//!
//! Predicates work on the agent's own [`Flow`] record, so the server filters without converting every
//! flow to protobuf first, and `flows --flow-log` applies exactly the same rules to a JSON-lines file.

pub mod direction;
pub mod ip;
pub mod labels;
pub mod namespace;
pub mod pod;
pub mod policy;
pub mod port;
pub mod protocol;
pub mod reason;
pub mod service;
pub mod verdict;

use crate::flows::Flow;
use crate::observer::proto::FlowFilter;

/// One predicate over a flow.
pub type FilterFn = Box<dyn Fn(&Flow) -> bool + Send + Sync>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("invalid IP address or CIDR `{0}`")]
    Ip(String),
    #[error("invalid port or port range `{0}` (use `80` or `8000-8080`)")]
    Port(String),
    #[error("invalid label selector `{0}` (use `key=value`, `key!=value`, `key` or `!key`)")]
    Label(String),
    #[error("invalid {field} value {value}")]
    Enum { field: &'static str, value: i32 },
    #[error("empty value in `{0}`")]
    Empty(&'static str),
    #[error(transparent)]
    Protocol(#[from] crate::flows::InvalidProtocol),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds the predicate of one field of a filter, or `None` when the field is not set.
type Builder = fn(&FlowFilter) -> Result<Option<FilterFn>>;

const BUILDERS: &[Builder] = &[
    verdict::build,
    direction::build,
    reason::build,
    namespace::build,
    pod::build,
    labels::build,
    ip::build,
    port::build,
    protocol::build,
    policy::build,
    service::build,
];

/// A compiled [`FlowFilter`]: all predicates must hold.
pub struct Compiled(Vec<FilterFn>);

impl Compiled {
    pub fn new(filter: &FlowFilter) -> Result<Self> {
        let mut preds = Vec::new();
        for build in BUILDERS {
            if let Some(p) = build(filter)? {
                preds.push(p);
            }
        }
        Ok(Self(preds))
    }

    pub fn matches(&self, flow: &Flow) -> bool {
        self.0.iter().all(|p| p(flow))
    }
}

/// The whitelist and blacklist of one request.
#[derive(Default)]
pub struct FlowFilters {
    whitelist: Vec<Compiled>,
    blacklist: Vec<Compiled>,
}

impl FlowFilters {
    pub fn new(whitelist: &[FlowFilter], blacklist: &[FlowFilter]) -> Result<Self> {
        Ok(Self {
            whitelist: whitelist.iter().map(Compiled::new).collect::<Result<_>>()?,
            blacklist: blacklist.iter().map(Compiled::new).collect::<Result<_>>()?,
        })
    }

    pub fn matches(&self, flow: &Flow) -> bool {
        (self.whitelist.is_empty() || self.whitelist.iter().any(|f| f.matches(flow)))
            && !self.blacklist.iter().any(|f| f.matches(flow))
    }
}

/// A predicate that holds when any of `values` (each parsed once by `parse`) satisfies `test`, or
/// `None` when there are no values (the field is not set).
pub(crate) fn any<V, I, P, F>(values: &[V], parse: P, test: F) -> Result<Option<FilterFn>>
where
    I: Send + Sync + 'static,
    P: Fn(&V) -> Result<I>,
    F: Fn(&I, &Flow) -> bool + Send + Sync + 'static,
{
    if values.is_empty() {
        return Ok(None);
    }
    let parsed = values.iter().map(parse).collect::<Result<Vec<I>>>()?;
    Ok(Some(Box::new(move |f: &Flow| parsed.iter().any(|v| test(v, f)))))
}

/// The AND of the fields a filter sets (`None` when it sets none of them).
pub(crate) fn all_of(preds: impl IntoIterator<Item = Option<FilterFn>>) -> Option<FilterFn> {
    let preds: Vec<FilterFn> = preds.into_iter().flatten().collect();
    match preds.len() {
        0 => None,
        _ => Some(Box::new(move |f: &Flow| preds.iter().all(|p| p(f)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{allowed, denied};
    use crate::observer::proto::Verdict;

    fn ff() -> FlowFilter {
        FlowFilter::default()
    }

    #[test]
    fn empty_filter_lists_pass_everything() {
        let f = FlowFilters::new(&[], &[]).unwrap();
        assert!(f.matches(&denied()) && f.matches(&allowed()));
        // An empty FlowFilter matches every flow.
        let f = FlowFilters::new(&[ff()], &[]).unwrap();
        assert!(f.matches(&denied()));
    }

    #[test]
    fn fields_of_one_filter_and_together() {
        let both = FlowFilter {
            verdict: vec![Verdict::Dropped as i32],
            protocol: vec!["UDP".into()],
            ..ff()
        };
        let f = FlowFilters::new(&[both], &[]).unwrap();
        assert!(!f.matches(&denied()), "dropped but TCP");
        assert!(!f.matches(&allowed()), "UDP but forwarded");
    }

    #[test]
    fn whitelist_filters_or_together_and_blacklist_wins() {
        let dropped = FlowFilter {
            verdict: vec![Verdict::Dropped as i32],
            ..ff()
        };
        let udp = FlowFilter {
            protocol: vec!["udp".into()],
            ..ff()
        };
        let f = FlowFilters::new(&[dropped.clone(), udp.clone()], &[]).unwrap();
        assert!(f.matches(&denied()) && f.matches(&allowed()));
        let f = FlowFilters::new(&[dropped, udp.clone()], &[udp]).unwrap();
        assert!(f.matches(&denied()) && !f.matches(&allowed()));
    }

    #[test]
    fn invalid_values_are_errors_not_silent_passes() {
        let bad = FlowFilter {
            source_ip: vec!["10.0.0.0/99".into()],
            ..ff()
        };
        assert!(matches!(FlowFilters::new(&[bad], &[]), Err(Error::Ip(_))));
        let bad = FlowFilter {
            verdict: vec![42],
            ..ff()
        };
        assert!(matches!(FlowFilters::new(&[], &[bad]), Err(Error::Enum { .. })));
    }
}
