//! [`crate::explain`]'s query and answer ↔ their protobuf messages. A reader takes what it can: an
//! unknown verdict or reason is `Unknown`, an unreadable entry of a list of objects is left out; a
//! missing or unreadable address, port or named object is an error naming the field (an answer that
//! lacks them explains nothing).

use std::net::IpAddr;

use super::convert::{
    direction_from_proto, direction_to_proto, reason_from_proto, reason_to_proto, ref_from_proto,
    ref_to_proto, verdict_from_proto, verdict_to_proto,
};
use super::proto;
use crate::explain::{
    BackendHop, BackendVerdict, End, Explanation, KernelCheck, Mode, Query, RuleMatch, RuleMiss, ServiceHop,
    Side, Target,
};
use crate::model::{ObjectRef, Protocol};

/// A message field that is missing or does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}: missing or invalid")]
pub struct Invalid(pub String);

fn target_to_proto(t: &Target) -> proto::Target {
    proto::Target {
        kind: Some(match t {
            Target::Pod(p) => proto::target::Kind::Pod(ref_to_proto(p)),
            Target::Address(a) => proto::target::Kind::Address(a.to_string()),
        }),
    }
}

fn target_from_proto(t: Option<&proto::Target>, field: &str) -> Result<Target, Invalid> {
    match t.and_then(|t| t.kind.as_ref()) {
        Some(proto::target::Kind::Pod(p)) => ref_from_proto(p).map(Target::Pod),
        Some(proto::target::Kind::Address(a)) => a.parse().ok().and_then(Target::address),
        None => None,
    }
    .ok_or_else(|| Invalid(field.to_owned()))
}

fn protocol_from_number(n: u32) -> Option<Protocol> {
    u8::try_from(n).ok().and_then(Protocol::from_number)
}

pub fn query_to_proto(q: &Query) -> proto::ExplainRequest {
    proto::ExplainRequest {
        from: Some(target_to_proto(&q.from)),
        to: Some(target_to_proto(&q.to)),
        port: u32::from(q.port),
        ip_protocol: u32::from(q.protocol.number()),
        flow_id: 0,
    }
}

/// A request for the connection of the kept flow `id`.
pub fn flow_query_to_proto(id: u64) -> proto::ExplainRequest {
    proto::ExplainRequest {
        flow_id: id,
        ..Default::default()
    }
}

pub fn query_from_proto(r: &proto::ExplainRequest) -> Result<Query, Invalid> {
    Ok(Query {
        from: target_from_proto(r.from.as_ref(), "from")?,
        to: target_from_proto(r.to.as_ref(), "to")?,
        port: u16::try_from(r.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Invalid("port (1–65535)".into()))?,
        protocol: protocol_from_number(r.ip_protocol)
            .ok_or_else(|| Invalid("ip_protocol (6, 17 or 132)".into()))?,
    })
}

fn ip(s: &str, field: &str) -> Result<IpAddr, Invalid> {
    s.parse().map_err(|_| Invalid(field.to_owned()))
}

fn object(r: Option<&proto::ObjectRef>, field: &str) -> Result<ObjectRef, Invalid> {
    r.and_then(ref_from_proto)
        .ok_or_else(|| Invalid(field.to_owned()))
}

fn objects(rs: &[proto::ObjectRef]) -> Vec<ObjectRef> {
    rs.iter().filter_map(ref_from_proto).collect()
}

fn side_to_proto(s: &Side) -> proto::ExplainSide {
    proto::ExplainSide {
        target: Some(target_to_proto(&s.target)),
        ip: s.ip.to_string(),
        pod: s.pod.as_ref().map(ref_to_proto),
        host: s.host,
    }
}

fn side_from_proto(s: Option<&proto::ExplainSide>, field: &str) -> Result<Side, Invalid> {
    let s = s.ok_or_else(|| Invalid(field.to_owned()))?;
    Ok(Side {
        target: target_from_proto(s.target.as_ref(), &format!("{field}.target"))?,
        ip: ip(&s.ip, &format!("{field}.ip"))?,
        pod: s.pod.as_ref().and_then(ref_from_proto),
        host: s.host,
    })
}

fn rule_to_proto(m: &RuleMatch) -> proto::ExplainRule {
    proto::ExplainRule {
        policy: Some(ref_to_proto(&m.policy)),
        index: m.index as u32,
        peer: m.peer.clone(),
        port: m.port.clone(),
    }
}

fn rule_from_proto(m: &proto::ExplainRule) -> Result<RuleMatch, Invalid> {
    Ok(RuleMatch {
        policy: object(m.policy.as_ref(), "allowed_by.policy (of an end or a backend)")?,
        index: m.index as usize,
        peer: m.peer.clone(),
        port: m.port.clone(),
    })
}

fn backend_to_proto(b: &BackendHop) -> proto::ExplainServiceBackend {
    proto::ExplainServiceBackend {
        ip: b.ip.to_string(),
        port: u32::from(b.port),
        pod: b.pod.as_ref().map(ref_to_proto),
    }
}

fn backend_from_proto(b: Option<&proto::ExplainServiceBackend>) -> Result<BackendHop, Invalid> {
    let b = b.ok_or_else(|| Invalid("backend".into()))?;
    Ok(BackendHop {
        ip: ip(&b.ip, "backend.ip")?,
        port: u16::try_from(b.port).map_err(|_| Invalid("backend.port".into()))?,
        pod: b.pod.as_ref().and_then(ref_from_proto),
    })
}

fn kernel_to_proto(k: &KernelCheck) -> proto::ExplainKernel {
    proto::ExplainKernel {
        ifindex: k.ifindex,
        verdict: verdict_to_proto(k.verdict) as i32,
        reason: reason_to_proto(k.reason) as i32,
        isolated: k.isolated,
        audit: k.audit,
        remote_identity: k.remote_identity,
        rule_id: k.rule_id,
        agrees: k.agrees,
    }
}

fn kernel_from_proto(k: &proto::ExplainKernel) -> KernelCheck {
    KernelCheck {
        ifindex: k.ifindex,
        verdict: verdict_from_proto(k.verdict()),
        reason: reason_from_proto(k.reason()),
        isolated: k.isolated,
        audit: k.audit,
        remote_identity: k.remote_identity,
        rule_id: k.rule_id,
        agrees: k.agrees,
    }
}

fn end_to_proto(e: &End) -> proto::ExplainEnd {
    proto::ExplainEnd {
        pod: Some(ref_to_proto(&e.pod)),
        direction: direction_to_proto(e.direction) as i32,
        node: e.node.clone().unwrap_or_default(),
        here: e.here,
        remote_ip: e.remote_ip.to_string(),
        port: u32::from(e.port),
        remote: e.remote.clone(),
        remote_identity: e.remote_identity,
        audit: e.mode == Mode::Audit,
        isolated: e.isolated,
        isolating: e.isolating.iter().map(ref_to_proto).collect(),
        verdict: verdict_to_proto(e.verdict) as i32,
        reason: reason_to_proto(e.reason) as i32,
        allowed_by: e.allowed_by.as_ref().map(rule_to_proto),
        rule_id: e.rule_id,
        not_allowed_by: e
            .not_allowed_by
            .iter()
            .map(|m| proto::ExplainRuleMiss {
                policy: Some(ref_to_proto(&m.policy)),
                index: m.index as u32,
                why: m.why.clone(),
            })
            .collect(),
        backends: e
            .backends
            .iter()
            .map(|b| proto::ExplainBackendVerdict {
                backend: Some(backend_to_proto(&BackendHop {
                    ip: b.ip,
                    port: b.port,
                    pod: b.pod.clone(),
                })),
                allowed: b.allowed,
                allowed_by: b.allowed_by.as_ref().map(rule_to_proto),
            })
            .collect(),
        kernel: e.kernel.as_ref().map(kernel_to_proto),
        disagreements: e.disagreements.clone(),
    }
}

fn end_from_proto(e: &proto::ExplainEnd) -> Result<End, Invalid> {
    Ok(End {
        pod: object(e.pod.as_ref(), "ends.pod")?,
        direction: direction_from_proto(e.direction()),
        node: (!e.node.is_empty()).then(|| e.node.clone()),
        here: e.here,
        remote_ip: ip(&e.remote_ip, "ends.remote_ip")?,
        port: u16::try_from(e.port).map_err(|_| Invalid("ends.port".into()))?,
        remote: e.remote.clone(),
        remote_identity: e.remote_identity,
        mode: if e.audit { Mode::Audit } else { Mode::Enforce },
        isolated: e.isolated,
        isolating: objects(&e.isolating),
        verdict: verdict_from_proto(e.verdict()),
        reason: reason_from_proto(e.reason()),
        allowed_by: e.allowed_by.as_ref().map(rule_from_proto).transpose()?,
        rule_id: e.rule_id,
        not_allowed_by: e
            .not_allowed_by
            .iter()
            .map(|m| {
                Ok(RuleMiss {
                    policy: object(m.policy.as_ref(), "not_allowed_by.policy")?,
                    index: m.index as usize,
                    why: m.why.clone(),
                })
            })
            .collect::<Result<_, Invalid>>()?,
        backends: e
            .backends
            .iter()
            .map(|b| {
                let hop = backend_from_proto(b.backend.as_ref())?;
                Ok(BackendVerdict {
                    ip: hop.ip,
                    port: hop.port,
                    pod: hop.pod,
                    allowed: b.allowed,
                    allowed_by: b.allowed_by.as_ref().map(rule_from_proto).transpose()?,
                })
            })
            .collect::<Result<_, Invalid>>()?,
        kernel: e.kernel.as_ref().map(kernel_from_proto),
        disagreements: e.disagreements.clone(),
    })
}

pub fn explanation_to_proto(x: &Explanation) -> proto::ExplainResponse {
    proto::ExplainResponse {
        from: Some(side_to_proto(&x.from)),
        to: Some(side_to_proto(&x.to)),
        port: u32::from(x.port),
        ip_protocol: u32::from(x.protocol.number()),
        verdict: verdict_to_proto(x.verdict) as i32,
        service: x.service.as_ref().map(|s| proto::ExplainService {
            services: s.services.iter().map(ref_to_proto).collect(),
            backends: s.backends.iter().map(backend_to_proto).collect(),
        }),
        ends: x.ends.iter().map(end_to_proto).collect(),
        notes: x.notes.clone(),
    }
}

pub fn explanation_from_proto(r: &proto::ExplainResponse) -> Result<Explanation, Invalid> {
    Ok(Explanation {
        from: side_from_proto(r.from.as_ref(), "from")?,
        to: side_from_proto(r.to.as_ref(), "to")?,
        port: u16::try_from(r.port).map_err(|_| Invalid("port".into()))?,
        protocol: protocol_from_number(r.ip_protocol).ok_or_else(|| Invalid("ip_protocol".into()))?,
        verdict: verdict_from_proto(r.verdict()),
        service: r
            .service
            .as_ref()
            .map(|s| {
                Ok(ServiceHop {
                    services: objects(&s.services),
                    backends: s
                        .backends
                        .iter()
                        .map(|b| backend_from_proto(Some(b)))
                        .collect::<Result<_, Invalid>>()?,
                })
            })
            .transpose()?,
        ends: r.ends.iter().map(end_from_proto).collect::<Result<_, _>>()?,
        notes: r.notes.clone(),
    })
}
