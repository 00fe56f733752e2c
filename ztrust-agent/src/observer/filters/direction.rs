//! `traffic_direction`: INGRESS (towards the judged pod) or EGRESS (from it).

use super::{Error, FilterFn, Result, any};
use crate::observer::convert;
use crate::observer::proto::{FlowFilter, TrafficDirection};

pub fn build(ff: &FlowFilter) -> Result<Option<FilterFn>> {
    any(
        &ff.traffic_direction,
        |v| match TrafficDirection::try_from(*v) {
            Ok(TrafficDirection::Unknown) | Err(_) => Err(Error::Enum {
                field: "traffic_direction",
                value: *v,
            }),
            Ok(d) => Ok(convert::direction_from_proto(d)),
        },
        |d: &crate::flows::Direction, f| f.direction == *d,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{allowed, denied};

    #[test]
    fn matches_the_direction() {
        let ingress = build(&FlowFilter {
            traffic_direction: vec![TrafficDirection::Ingress as i32],
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert!(ingress(&denied()));
        assert!(!ingress(&allowed()));
        assert!(build(&FlowFilter::default()).unwrap().is_none());
        assert!(
            build(&FlowFilter {
                traffic_direction: vec![7],
                ..Default::default()
            })
            .is_err()
        );
    }
}
