//! The agent's [`Flow`] record ↔ the protobuf `Flow`. Names are the stable strings of `flows.rs`
//! (`dropped`, `policy-denied`, ...); numbers are the kernel's (`ztrust_common`).

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::flows::{self, AllowedBy, Endpoint, Flow};
use crate::observer::proto;
use crate::observer::proto::{Reason, TrafficDirection, Verdict};

pub fn verdict_str(v: Verdict) -> &'static str {
    match v {
        Verdict::Forwarded => "forwarded",
        Verdict::Dropped => "dropped",
        Verdict::WouldDrop => "would-drop",
        Verdict::Unknown => "unknown",
    }
}

pub fn verdict_from_str(s: &str) -> Verdict {
    // The agent's own names first, without allocating (this runs for every flow sent).
    match s {
        "forwarded" => return Verdict::Forwarded,
        "dropped" => return Verdict::Dropped,
        "would-drop" => return Verdict::WouldDrop,
        _ => {}
    }
    match s.to_ascii_lowercase().replace('_', "-").as_str() {
        "forwarded" => Verdict::Forwarded,
        "dropped" => Verdict::Dropped,
        "would-drop" => Verdict::WouldDrop,
        _ => Verdict::Unknown,
    }
}

pub fn direction_str(d: TrafficDirection) -> &'static str {
    match d {
        TrafficDirection::Ingress => "ingress",
        TrafficDirection::Egress => "egress",
        TrafficDirection::Unknown => "unknown",
    }
}

pub fn direction_from_str(s: &str) -> TrafficDirection {
    match s {
        "ingress" => return TrafficDirection::Ingress,
        "egress" => return TrafficDirection::Egress,
        _ => {}
    }
    match s.to_ascii_lowercase().as_str() {
        "ingress" => TrafficDirection::Ingress,
        "egress" => TrafficDirection::Egress,
        _ => TrafficDirection::Unknown,
    }
}

/// The proto numbers are the kernel's, so the names come from `flows::reason_name`.
pub fn reason_str(r: Reason) -> &'static str {
    flows::reason_name(u8::try_from(r as i32).unwrap_or(0))
}

pub fn reason_from_str(s: &str) -> Reason {
    // Built once from `flows::reason_name` (this runs for every flow sent).
    static BY_NAME: std::sync::OnceLock<std::collections::HashMap<&'static str, Reason>> =
        std::sync::OnceLock::new();
    let by_name = BY_NAME.get_or_init(|| {
        (1..=u8::MAX)
            .filter_map(|n| Some((flows::reason_name(n), Reason::try_from(i32::from(n)).ok()?)))
            .filter(|(name, _)| *name != "unknown")
            .collect()
    });
    by_name.get(s).copied().unwrap_or(Reason::Unknown)
}

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub fn system_time(t: &prost_types::Timestamp) -> SystemTime {
    if t.seconds < 0 {
        return UNIX_EPOCH;
    }
    UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos.clamp(0, 999_999_999) as u32)
}

/// The time of a flow record (RFC 3339); now when it does not parse.
pub fn flow_time(f: &Flow) -> SystemTime {
    humantime::parse_rfc3339_weak(&f.time).unwrap_or_else(|_| SystemTime::now())
}

fn endpoint_to_proto(e: &Endpoint) -> proto::Endpoint {
    proto::Endpoint {
        ip: e.ip.to_string(),
        port: e.port.map_or(0, u32::from),
        namespace: e.namespace.clone().unwrap_or_default(),
        pod_name: e.pod.clone().unwrap_or_default(),
        labels: e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        identity: e.identity,
    }
}

fn endpoint_from_proto(e: &proto::Endpoint, has_ports: bool) -> Endpoint {
    Endpoint {
        ip: e.ip.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        port: has_ports.then(|| u16::try_from(e.port).unwrap_or(0)),
        namespace: (!e.namespace.is_empty()).then(|| e.namespace.clone()),
        pod: (!e.pod_name.is_empty()).then(|| e.pod_name.clone()),
        labels: e
            .labels
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map_or((kv.clone(), String::new()), |(k, v)| (k.into(), v.into()))
            })
            .collect(),
        identity: e.identity,
    }
}

/// A detector's alert as the flow API serves it, raised on `node`.
pub fn alert_to_proto(a: &crate::detector::Alert, node: &str) -> proto::Alert {
    proto::Alert {
        time: Some(timestamp(a.time)),
        node_name: node.to_owned(),
        kind: alert_kind_to_proto(a.kind) as i32,
        source: a.source.clone(),
        summary: a.summary.clone(),
        distinct_destinations: a.distinct_destinations,
        denied_flows: a.denied_flows,
        window_start: a.window_start.map(timestamp),
        evidence: a
            .evidence
            .iter()
            .map(|o| flow_to_proto(&o.flow, o.time))
            .collect(),
    }
}

fn alert_kind_to_proto(kind: crate::detector::AlertKind) -> proto::AlertKind {
    match kind {
        crate::detector::AlertKind::Scan => proto::AlertKind::Scan,
        crate::detector::AlertKind::SensitiveTier => proto::AlertKind::SensitiveTier,
    }
}

/// The stable name of an alert kind read from the wire (`unknown` for a kind this build does not know).
pub fn alert_kind_name(kind: proto::AlertKind) -> &'static str {
    match kind {
        proto::AlertKind::Scan => crate::detector::AlertKind::Scan.name(),
        proto::AlertKind::SensitiveTier => crate::detector::AlertKind::SensitiveTier.name(),
        proto::AlertKind::Unknown => "unknown",
    }
}

pub fn flow_to_proto(f: &Flow, time: SystemTime) -> proto::Flow {
    proto::Flow {
        time: Some(timestamp(time)),
        node_name: f.node.clone(),
        verdict: verdict_from_str(&f.verdict) as i32,
        traffic_direction: direction_from_str(&f.direction) as i32,
        reason: reason_from_str(&f.reason) as i32,
        endpoint: f.endpoint.clone(),
        protocol: f.protocol.to_string(),
        source: Some(endpoint_to_proto(&f.source)),
        destination: Some(endpoint_to_proto(&f.destination)),
        tcp_flags: f.tcp_flags.clone(),
        isolating_policies: f.policies.clone(),
        allowed_by: f.allowed_by.as_ref().map(|a| proto::AllowedBy {
            policy: a.policy.clone(),
            direction: a.direction.clone(),
            rule: u32::try_from(a.rule).unwrap_or(u32::MAX),
        }),
        new_connection: f.new_connection,
        bytes: f.bytes,
        service: f.service.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
        service_backends: f.service.as_ref().map(|s| s.backends.clone()).unwrap_or_default(),
    }
}

pub fn flow_from_proto(p: &proto::Flow) -> Flow {
    let has_ports = matches!(p.protocol.as_str(), "TCP" | "UDP" | "SCTP");
    let time = p.time.as_ref().map_or_else(SystemTime::now, system_time);
    Flow {
        time: humantime::format_rfc3339_millis(time).to_string(),
        node: p.node_name.clone(),
        verdict: verdict_str(p.verdict()).into(),
        direction: direction_str(p.traffic_direction()).into(),
        reason: reason_str(p.reason()).into(),
        endpoint: p.endpoint.clone(),
        protocol: p.protocol.clone().into(),
        source: endpoint_from_proto(
            p.source.as_ref().unwrap_or(&proto::Endpoint::default()),
            has_ports,
        ),
        destination: endpoint_from_proto(
            p.destination.as_ref().unwrap_or(&proto::Endpoint::default()),
            has_ports,
        ),
        tcp_flags: p.tcp_flags.clone(),
        policies: p.isolating_policies.clone(),
        allowed_by: p.allowed_by.as_ref().map(|a| AllowedBy {
            policy: a.policy.clone(),
            direction: a.direction.clone(),
            rule: a.rule as usize,
        }),
        new_connection: p.new_connection,
        bytes: p.bytes,
        service: (!p.service.is_empty()).then(|| crate::flows::ServiceRef {
            name: p.service.clone(),
            backends: p.service_backends.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{allowed, denied};

    #[test]
    fn round_trip() {
        for f in [denied(), allowed()] {
            let t = flow_time(&f);
            let p = flow_to_proto(&f, t);
            assert_eq!(flow_from_proto(&p), f);
        }
    }

    /// Every reason the datapath has gets a name and a proto value, and nothing else does.
    #[test]
    fn every_reason_name_has_a_proto_value() {
        for n in 1..=u8::MAX {
            let name = flows::reason_name(n);
            let known = ztrust_common::reason::ALL.contains(&n);
            assert_eq!(name != "unknown", known, "reason {n} ({name})");
            if known {
                let r = reason_from_str(name);
                assert_eq!(r as i32, i32::from(n), "{name}");
                assert_eq!(reason_str(r), name);
            }
        }
        assert_eq!(verdict_from_str("would-drop"), Verdict::WouldDrop);
        assert_eq!(verdict_from_str("DROPPED"), Verdict::Dropped);
    }
}
