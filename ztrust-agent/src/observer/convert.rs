//! The agent's [`Flow`] record ↔ the protobuf `Flow`. Names are the stable strings of `flows.rs`
//! (`dropped`, `policy-denied`, ...); numbers are the kernel's (`ztrust_common`).

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::flows::{self, AllowedBy, Endpoint, Flow};
use crate::model::ObjectRef;
use crate::observer::proto;
use crate::observer::proto::backend::Kind as BackendKind;
use crate::observer::proto::flow::JudgedAt;
use crate::observer::proto::{Reason, TrafficDirection, Verdict};

/// The proto's verdict numbers are the kernel's codes (0 is unknown).
pub fn verdict_to_proto(v: flows::Verdict) -> Verdict {
    Verdict::try_from(i32::from(v.code())).unwrap_or(Verdict::Unknown)
}

pub fn verdict_from_proto(v: Verdict) -> flows::Verdict {
    u8::try_from(v as i32).map_or(flows::Verdict::Unknown, flows::Verdict::from_code)
}

pub fn direction_to_proto(d: flows::Direction) -> TrafficDirection {
    match d {
        flows::Direction::Ingress => TrafficDirection::Ingress,
        flows::Direction::Egress => TrafficDirection::Egress,
        flows::Direction::Unknown => TrafficDirection::Unknown,
    }
}

pub fn direction_from_proto(d: TrafficDirection) -> flows::Direction {
    match d {
        TrafficDirection::Ingress => flows::Direction::Ingress,
        TrafficDirection::Egress => flows::Direction::Egress,
        TrafficDirection::Unknown => flows::Direction::Unknown,
    }
}

/// The proto's reason numbers are the kernel's codes (0 is unknown).
pub fn reason_to_proto(r: flows::Reason) -> Reason {
    Reason::try_from(i32::from(r.code())).unwrap_or(Reason::Unknown)
}

pub fn reason_from_proto(r: Reason) -> flows::Reason {
    u8::try_from(r as i32).map_or(flows::Reason::Unknown, flows::Reason::from_code)
}

/// A name the CLI was given (`dropped`, `WOULD_DROP`, `Policy-Denied` …), as the proto value; `Unknown`
/// for a name that is none.
fn loose_name(s: &str) -> String {
    s.to_ascii_lowercase().replace('_', "-")
}

pub fn verdict_from_str(s: &str) -> Verdict {
    flows::Verdict::from_name(&loose_name(s)).map_or(Verdict::Unknown, verdict_to_proto)
}

pub fn direction_from_str(s: &str) -> TrafficDirection {
    flows::Direction::from_name(&loose_name(s)).map_or(TrafficDirection::Unknown, direction_to_proto)
}

pub fn reason_from_str(s: &str) -> Reason {
    flows::Reason::from_name(&loose_name(s)).map_or(Reason::Unknown, reason_to_proto)
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

fn endpoint_to_proto(e: &Endpoint) -> proto::Endpoint {
    proto::Endpoint {
        ip: e.ip.to_string(),
        port: e.port.map_or(0, u32::from),
        namespace: e.pod.as_ref().map(|p| p.namespace.clone()).unwrap_or_default(),
        pod_name: e.pod.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
        labels: e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        identity: e.identity,
    }
}

fn endpoint_from_proto(e: &proto::Endpoint, has_ports: bool) -> Endpoint {
    Endpoint {
        ip: e.ip.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        port: has_ports.then(|| u16::try_from(e.port).unwrap_or(0)),
        pod: (!e.namespace.is_empty() && !e.pod_name.is_empty())
            .then(|| ObjectRef::new(&e.namespace, &e.pod_name)),
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
            .map(|o| observed_to_proto(o, Text::Also))
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

/// What a flow on the wire carries besides its typed fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Text {
    /// The text forms too, for readers of the API's first version.
    Also,
    /// Typed fields only (`GetFlowsRequest.typed_only`).
    Omitted,
}

/// A flow the hub keeps, with its number.
pub fn observed_to_proto(o: &crate::flows::Observed, text: Text) -> proto::Flow {
    proto::Flow {
        id: o.seq,
        ..flow_to_proto(&o.flow, o.time, text)
    }
}

pub fn flow_to_proto(f: &Flow, time: SystemTime, text: Text) -> proto::Flow {
    let mut p = proto::Flow {
        time: Some(timestamp(time)),
        node_name: f.node.clone(),
        verdict: verdict_to_proto(f.verdict) as i32,
        traffic_direction: direction_to_proto(f.direction) as i32,
        reason: reason_to_proto(f.reason) as i32,
        source: Some(endpoint_to_proto(&f.source)),
        destination: Some(endpoint_to_proto(&f.destination)),
        allowed_by: f.allowed_by.as_ref().map(|a| proto::AllowedBy {
            rule: u32::try_from(a.rule).unwrap_or(u32::MAX),
            policy_ref: Some(ref_to_proto(&a.policy)),
            list: direction_to_proto(a.direction) as i32,
            ..Default::default()
        }),
        new_connection: f.new_connection,
        bytes: f.bytes,
        judged_at: Some(match &f.endpoint {
            flows::JudgedAt::Pod(p) => JudgedAt::JudgedPod(ref_to_proto(p)),
            flows::JudgedAt::Interface(i) => JudgedAt::JudgedIfindex(*i),
        }),
        ip_protocol: Some(u32::from(f.protocol.0)),
        tcp_flag_bits: Some(u32::from(f.tcp_flags.0)),
        isolating: f.policies.iter().map(ref_to_proto).collect(),
        service_ref: f.service.as_ref().map(|s| ref_to_proto(&s.name)),
        backends: f
            .service
            .as_ref()
            .map(|s| s.backends.iter().map(backend_to_proto).collect())
            .unwrap_or_default(),
        ..Default::default()
    };
    if text == Text::Also {
        p.endpoint = f.endpoint.to_string();
        p.protocol = f.protocol.to_string();
        p.tcp_flags = f.tcp_flags.to_string();
        p.isolating_policies = f.policies.iter().map(ToString::to_string).collect();
        if let (Some(by), Some(a)) = (&mut p.allowed_by, &f.allowed_by) {
            by.policy = a.policy.to_string();
            by.direction = a.direction.name().to_owned();
        }
        if let Some(s) = &f.service {
            p.service = s.name.to_string();
            p.service_backends = s.backends.iter().map(ToString::to_string).collect();
        }
    }
    p
}

pub(crate) fn ref_to_proto(r: &ObjectRef) -> proto::ObjectRef {
    proto::ObjectRef {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
    }
}

/// `None` for a reference without a namespace or a name: no object has one.
pub(crate) fn ref_from_proto(r: &proto::ObjectRef) -> Option<ObjectRef> {
    (!r.namespace.is_empty() && !r.name.is_empty()).then(|| ObjectRef::new(&r.namespace, &r.name))
}

fn backend_to_proto(b: &flows::Backend) -> proto::Backend {
    proto::Backend {
        kind: Some(match b {
            flows::Backend::Pod(p) => BackendKind::Pod(ref_to_proto(p)),
            flows::Backend::Address(ip) => BackendKind::Address(ip.to_string()),
        }),
    }
}

fn backend_from_proto(b: &proto::Backend) -> Option<flows::Backend> {
    match b.kind.as_ref()? {
        BackendKind::Pod(p) => ref_from_proto(p).map(flows::Backend::Pod),
        BackendKind::Address(a) => a.parse().ok().map(flows::Backend::Address),
    }
}

/// A flow from the wire: its typed fields where the sender set them, else (an agent of the first version
/// of the API) the text fields. What does not parse is kept as the agent cannot judge it: an unknown verdict,
/// direction or reason is `Unknown`, an endpoint that is no `namespace/pod` nor `ifindex/N` is
/// interface 0, a protocol that is no name is `IP/255`, TCP flags that are no names are none, and a policy, Service or backend name that is no
/// `namespace/name` (a backend: nor an address) is left out.
pub fn flow_from_proto(p: &proto::Flow) -> Flow {
    // A protocol that is no number of 0-255, or no name nor `IP/<number>`, reads as 255 (reserved):
    // shown, never a real one.
    let protocol = match p.ip_protocol {
        Some(n) => flows::IpProtocol(u8::try_from(n).unwrap_or(255)),
        None => p.protocol.parse().unwrap_or(flows::IpProtocol(255)),
    };
    let has_ports = protocol.has_ports();
    Flow {
        time: p.time.as_ref().map_or_else(SystemTime::now, system_time),
        node: p.node_name.clone(),
        verdict: verdict_from_proto(p.verdict()),
        direction: direction_from_proto(p.traffic_direction()),
        reason: reason_from_proto(p.reason()),
        endpoint: match &p.judged_at {
            Some(JudgedAt::JudgedPod(r)) => {
                ref_from_proto(r).map_or(flows::JudgedAt::Interface(0), flows::JudgedAt::Pod)
            }
            Some(JudgedAt::JudgedIfindex(i)) => flows::JudgedAt::Interface(*i),
            None => p.endpoint.parse().unwrap_or(flows::JudgedAt::Interface(0)),
        },
        protocol,
        source: endpoint_from_proto(
            p.source.as_ref().unwrap_or(&proto::Endpoint::default()),
            has_ports,
        ),
        destination: endpoint_from_proto(
            p.destination.as_ref().unwrap_or(&proto::Endpoint::default()),
            has_ports,
        ),
        // Flag bits beyond the six named ones are not kept.
        tcp_flags: match p.tcp_flag_bits {
            Some(bits) => flows::TcpFlags(u8::try_from(bits & 0x3f).unwrap_or(0)),
            None => p.tcp_flags.parse().unwrap_or_default(),
        },
        policies: if p.isolating.is_empty() {
            p.isolating_policies
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect()
        } else {
            p.isolating.iter().filter_map(ref_from_proto).collect()
        },
        allowed_by: p.allowed_by.as_ref().and_then(|a| {
            let (policy, direction) = match &a.policy_ref {
                Some(r) => (ref_from_proto(r)?, direction_from_proto(a.list())),
                None => (
                    a.policy.parse().ok()?,
                    flows::Direction::from_name(&a.direction).unwrap_or(flows::Direction::Unknown),
                ),
            };
            Some(AllowedBy {
                policy,
                direction,
                rule: a.rule as usize,
            })
        }),
        new_connection: p.new_connection,
        bytes: p.bytes,
        // A Service or backend that does not parse is left out, as policies are.
        service: match &p.service_ref {
            Some(r) => ref_from_proto(r).map(|name| crate::flows::ServiceRef {
                name,
                backends: p.backends.iter().filter_map(backend_from_proto).collect(),
            }),
            None => p.service.parse().ok().map(|name| crate::flows::ServiceRef {
                name,
                backends: p.service_backends.iter().filter_map(|b| b.parse().ok()).collect(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{allowed, denied};

    /// Flows of every shape: denied with isolating policies, allowed by a rule, to a Service with a pod
    /// and an address as backends, judged at an unbound interface.
    fn shapes() -> Vec<Flow> {
        let mut service = allowed();
        service.service = Some(flows::ServiceRef {
            name: ObjectRef::new("shop", "api"),
            backends: vec![
                flows::Backend::Pod(ObjectRef::new("shop", "api-0")),
                flows::Backend::Address("10.9.8.7".parse().unwrap()),
            ],
        });
        let mut unbound = denied();
        unbound.endpoint = flows::JudgedAt::Interface(7);
        vec![denied(), allowed(), service, unbound]
    }

    #[test]
    fn round_trip() {
        for f in shapes() {
            for text in [Text::Also, Text::Omitted] {
                let p = flow_to_proto(&f, f.time, text);
                assert_eq!(flow_from_proto(&p), f, "{text:?}");
            }
        }
    }

    /// `typed_only` leaves every text form empty; without it each is filled.
    #[test]
    fn typed_only_leaves_the_text_forms_empty() {
        let f = &shapes()[2];
        let text = |p: &proto::Flow| {
            let by = p.allowed_by.clone().unwrap_or_default();
            [
                p.endpoint.is_empty(),
                p.protocol.is_empty(),
                p.tcp_flags.is_empty(),
                by.policy.is_empty(),
                by.direction.is_empty(),
                p.service.is_empty(),
                p.service_backends.is_empty(),
            ]
        };
        assert_eq!(text(&flow_to_proto(f, f.time, Text::Omitted)), [true; 7]);
        // The allowed flow has no TCP flags (UDP): its text form is empty either way.
        assert_eq!(
            text(&flow_to_proto(f, f.time, Text::Also)),
            [false, false, true, false, false, false, false]
        );
        let d = denied();
        let p = flow_to_proto(&d, d.time, Text::Omitted);
        assert!(p.isolating_policies.is_empty() && !p.isolating.is_empty());
        assert!(
            !flow_to_proto(&d, d.time, Text::Also)
                .isolating_policies
                .is_empty()
        );
    }

    /// A sender of the API's first version set only the text fields: read the same.
    #[test]
    fn text_fields_alone_read_the_same() {
        for f in shapes() {
            let mut p = flow_to_proto(&f, f.time, Text::Also);
            p.judged_at = None;
            p.ip_protocol = None;
            p.tcp_flag_bits = None;
            p.isolating.clear();
            p.service_ref = None;
            p.backends.clear();
            if let Some(a) = &mut p.allowed_by {
                a.policy_ref = None;
                a.list = 0;
            }
            assert_eq!(flow_from_proto(&p), f);
        }
    }

    /// The typed fields are what a reader believes; out-of-range or empty ones read as the agent cannot
    /// judge them, never as another real value.
    #[test]
    fn typed_fields_win_and_bad_ones_read_as_unknown() {
        let f = denied();
        assert!(!f.policies.is_empty() && f.protocol == flows::IpProtocol::TCP);
        let mut p = flow_to_proto(&f, f.time, Text::Also);
        p.protocol = "UDP".into();
        p.endpoint = "other/pod".into();
        p.isolating_policies = vec!["other/policy".into()];
        let read = flow_from_proto(&p);
        assert_eq!(
            (read.protocol, read.endpoint.clone()),
            (f.protocol, f.endpoint.clone())
        );
        assert_eq!(read.policies, f.policies);

        p.ip_protocol = Some(300);
        p.tcp_flag_bits = Some(0x1ff);
        p.judged_at = Some(JudgedAt::JudgedPod(proto::ObjectRef {
            namespace: "shop".into(),
            name: String::new(),
        }));
        let read = flow_from_proto(&p);
        assert_eq!(read.protocol, flows::IpProtocol(255));
        assert_eq!(read.tcp_flags, flows::TcpFlags(0x3f));
        assert_eq!(read.endpoint, flows::JudgedAt::Interface(0));
    }

    /// Every reason the datapath has gets a proto value of the same number, and back.
    #[test]
    fn every_reason_has_its_proto_value() {
        for r in flows::Reason::ALL {
            let p = reason_to_proto(*r);
            assert_eq!(p as i32, i32::from(r.code()), "{r}");
            assert_eq!(reason_from_proto(p), *r);
            assert_eq!(reason_from_str(r.name()), p);
        }
        for v in flows::Verdict::ALL {
            assert_eq!(verdict_from_proto(verdict_to_proto(*v)), *v);
        }
        assert_eq!(reason_to_proto(flows::Reason::Unknown), Reason::Unknown);
        assert_eq!(verdict_from_str("would-drop"), Verdict::WouldDrop);
        assert_eq!(verdict_from_str("DROPPED"), Verdict::Dropped);
        assert_eq!(verdict_from_str("WOULD_DROP"), Verdict::WouldDrop);
        assert_eq!(direction_from_str("Ingress"), TrafficDirection::Ingress);
        assert_eq!(verdict_from_str("nonsense"), Verdict::Unknown);
    }
}
