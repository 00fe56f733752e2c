//! Each end's judgment: from the compiled state where this agent enforces the pod, from the policy
//! objects everywhere, and their differences.

use std::net::IpAddr;

use ztrust_common::{Direction, Reason, Verdict, dir, identity};

use super::rules::{ObjectsSay, Remote, objects_say};
use super::{
    BackendHop, BackendVerdict, End, ExplainError, Mode, Query, RuleMatch, ServiceHop, Side, State, Target,
    isolated_in,
};
use crate::datapath::keys::allowing_rule;
use crate::model::Pod;
use crate::policy::services::{Slices, each_frontend};
use crate::policy::{Frontend, IpcacheIndex};

/// The two ends' addresses: a pod's of the family the other end has (IPv4 first).
pub(super) fn resolve(state: &State<'_>, query: &Query) -> Result<(Side, Side), ExplainError> {
    let ips = |t: &Target| -> Result<(Vec<IpAddr>, Option<&Pod>), ExplainError> {
        match t {
            Target::Address(ip) => Ok((vec![*ip], None)),
            Target::Pod(r) => {
                let pod = state
                    .cluster
                    .pods
                    .get(r)
                    .ok_or_else(|| ExplainError::UnknownPod(r.clone()))?;
                if pod.ips.is_empty() {
                    return Err(ExplainError::NoAddress(r.clone()));
                }
                let mut ips = pod.ips.clone();
                ips.sort_by_key(|ip| !ip.is_ipv4());
                Ok((ips, Some(pod)))
            }
        }
    };
    let (from_ips, from_pod) = ips(&query.from)?;
    let (to_ips, to_pod) = ips(&query.to)?;
    let (from_ip, to_ip) = from_ips
        .iter()
        .find_map(|a| {
            to_ips
                .iter()
                .find(|b| a.is_ipv4() == b.is_ipv4())
                .map(|b| (*a, *b))
        })
        .ok_or_else(|| ExplainError::NoCommonFamily {
            from: query.from.to_string(),
            to: query.to.to_string(),
        })?;
    let side = |target: &Target, ip: IpAddr, pod: Option<&Pod>| {
        let host = pod.map_or_else(|| state.is_host(ip), |p| p.host_network);
        let pod = match pod {
            Some(p) => Some(p.object_ref()),
            None => state.pod_at(ip).map(Pod::object_ref),
        };
        Side {
            target: target.clone(),
            ip,
            pod,
            host,
        }
    };
    Ok((
        side(&query.from, from_ip, from_pod),
        side(&query.to, to_ip, to_pod),
    ))
}

/// The Service(s) whose frontend `frontend` is, with the backends the node translates it to.
pub(super) fn service_hop(state: &State<'_>, frontend: &Frontend) -> Option<ServiceHop> {
    if !state.desired.services.contains_key(frontend) {
        return None;
    }
    let slices = Slices::new(state.cluster);
    let mut services = Vec::new();
    let mut backends: Vec<BackendHop> = Vec::new();
    for (svc, port, f) in each_frontend(state.cluster) {
        if f != *frontend {
            continue;
        }
        let r = crate::model::ObjectRef::new(&svc.namespace, &svc.name);
        if !services.contains(&r) {
            services.push(r);
        }
        for (ip, port) in slices.backends(svc, port) {
            if ip.is_ipv4() != frontend.addr.is_ipv4()
                || backends.iter().any(|b| b.ip == ip && b.port == port)
            {
                continue;
            }
            backends.push(BackendHop {
                ip,
                port,
                pod: state.pod_at(ip).map(Pod::object_ref),
            });
        }
    }
    backends.sort_by_key(|b| (b.ip, b.port));
    Some(ServiceHop { services, backends })
}

fn verdict_of(reason: Reason, mode: Mode) -> Verdict {
    match reason {
        Reason::AllowedByPolicy | Reason::NotIsolated | Reason::FromHost => Verdict::Forwarded,
        _ if mode == Mode::Audit => Verdict::WouldDrop,
        _ => Verdict::Dropped,
    }
}

/// The objects' reason for a hook (no Service): the node's traffic on ingress, not isolated, a rule, none.
fn objects_reason(state: &State<'_>, said: &ObjectsSay, direction: u8, remote_ip: IpAddr) -> Reason {
    if direction == dir::INGRESS && state.sent_by_node(remote_ip) {
        Reason::FromHost
    } else if said.isolating.is_empty() {
        Reason::NotIsolated
    } else if said.matches.is_empty() {
        Reason::PolicyDenied
    } else {
        Reason::AllowedByPolicy
    }
}

/// An end with what every hook's judgment starts from.
fn new_end(state: &State<'_>, pod: &Pod, direction: u8, remote_ip: IpAddr, port: u16) -> End {
    End {
        pod: pod.object_ref(),
        direction: Direction::from_code(direction),
        node: pod.node_name.clone(),
        here: state.here(pod),
        remote_ip,
        port,
        remote: String::new(),
        remote_identity: None,
        mode: state.mode(&pod.namespace),
        isolated: false,
        isolating: Vec::new(),
        verdict: Verdict::Unknown,
        reason: Reason::Unknown,
        allowed_by: None,
        rule_id: 0,
        not_allowed_by: Vec::new(),
        backends: Vec::new(),
        kernel: None,
        disagreements: Vec::new(),
    }
}

/// The compiled state's rule for (`pod`, `direction`, remote identity, port), as the kernel would find
/// it, and the match the objects give for that rule (or, when they have none, the first they match).
fn compiled_rule(
    state: &State<'_>,
    pod: &Pod,
    direction: u8,
    remote_id: u32,
    port: u16,
    protocol: u8,
) -> Option<u32> {
    let ep = state.desired.endpoints.get(&pod.object_ref())?;
    allowing_rule(ep, remote_id, direction, protocol, port)
}

/// Fills `end` from what the objects say and, where this agent enforces the pod, from the compiled
/// state; notes where the two differ.
fn settle(
    state: &State<'_>,
    end: &mut End,
    said: ObjectsSay,
    objects: Reason,
    compiled: Option<(Reason, Option<u32>)>,
) {
    if said.audited {
        end.mode = Mode::Audit;
    }
    end.isolating = said.isolating.clone();
    end.isolated = !said.isolating.is_empty();
    let reason =
        match compiled {
            None => objects,
            Some((reason, rule_id)) => {
                if reason != objects {
                    end.disagreements.push(format!(
                        "the agent's compiled state says {reason}, the policy objects say {objects}"
                    ));
                }
                if let Some(id) = rule_id.filter(|id| *id != 0) {
                    end.rule_id = id;
                    match state.desired.rules.get(&id) {
                        Some(rule) => match said
                            .matches
                            .iter()
                            .find(|m| m.policy == rule.policy && m.index == rule.index)
                        {
                            Some(m) => end.allowed_by = Some(m.clone()),
                            None => {
                                end.disagreements.push(format!(
                                "the compiled allow entry names {} {}[{}], which the policy objects do not \
                                 match",
                                rule.policy,
                                if rule.direction == dir::INGRESS { "ingress" } else { "egress" },
                                rule.index
                            ));
                                end.allowed_by = Some(RuleMatch {
                                    policy: rule.policy.clone(),
                                    index: rule.index,
                                    peer: "?".into(),
                                    port: "?".into(),
                                });
                            }
                        },
                        None => end.disagreements.push(format!(
                            "the compiled allow entry names rule id {id}, which no policy has"
                        )),
                    }
                }
                reason
            }
        };
    if end.allowed_by.is_none() && reason == Reason::AllowedByPolicy {
        end.allowed_by = said.matches.first().cloned();
    }
    if !matches!(
        reason,
        Reason::AllowedByPolicy | Reason::NotIsolated | Reason::FromHost
    ) {
        end.not_allowed_by = said.misses;
    }
    end.reason = reason;
    end.verdict = verdict_of(reason, end.mode);
}

/// Where this agent enforces the pod: the compiled isolation is the end's, compared with the objects'.
fn compiled_isolation(end: &mut End, ep: Option<&crate::policy::EndpointPolicy>, direction: u8) {
    let Some(ep) = ep else { return };
    let (isolated, audited, by) = if direction == dir::INGRESS {
        (ep.isolated_ingress, ep.audit_ingress, &ep.ingress_policies)
    } else {
        (ep.isolated_egress, ep.audit_egress, &ep.egress_policies)
    };
    if audited {
        end.mode = Mode::Audit;
        end.verdict = verdict_of(end.reason, end.mode);
    }
    let mut by = by.clone();
    by.sort();
    if by != end.isolating {
        end.disagreements.push(format!(
            "the compiled state has {} isolated by [{}], the policy objects by [{}]",
            end.pod,
            by.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            end.isolating
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    end.isolated = isolated;
    end.isolating = by;
}

/// The source pod's egress hook.
pub(super) fn egress_end(
    state: &State<'_>,
    index: &IpcacheIndex,
    pod: &Pod,
    to: &Side,
    query: &Query,
    service: Option<&ServiceHop>,
) -> End {
    let mut end = new_end(state, pod, dir::EGRESS, to.ip, query.port);
    let to_pod = to.pod.as_ref().and_then(|p| state.cluster.pods.get(p));
    let remote = Remote {
        ip: to.ip,
        pod: to_pod.filter(|p| !p.host_network),
        port: query.port,
        protocol: query.protocol,
        port_owner: to_pod.filter(|p| !p.host_network),
    };
    let said = objects_say(state.cluster, pod, dir::EGRESS, &remote);
    let remote_id = index.identity(to.ip);
    end.remote = state.describe_identity(remote_id, to.ip);
    let proto = query.protocol.number();
    let ep = state
        .desired
        .endpoints
        .get(&pod.object_ref())
        .filter(|_| end.here);
    if end.here {
        end.remote_identity = Some(remote_id);
    }
    let isolated = ep.map_or(!said.isolating.is_empty(), |ep| isolated_in(ep, dir::EGRESS));
    let frontend = Frontend {
        addr: to.ip,
        port: query.port,
        protocol: query.protocol,
    };
    if let Some(hop) = service {
        end.remote = format!("a frontend of Service {}", super::render::list(&hop.services));
    }
    if let (true, Some(hop)) = (isolated, service) {
        // Judged by the backends the node translates to, before it picks one.
        let (mut matches, mut misses) = (Vec::new(), Vec::new());
        for b in &hop.backends {
            let backend_pod = b.pod.as_ref().and_then(|p| state.cluster.pods.get(p));
            let r = Remote {
                ip: b.ip,
                pod: backend_pod,
                port: b.port,
                protocol: query.protocol,
                port_owner: backend_pod,
            };
            let s = objects_say(state.cluster, pod, dir::EGRESS, &r);
            end.backends.push(BackendVerdict {
                ip: b.ip,
                port: b.port,
                pod: b.pod.clone(),
                allowed: !s.matches.is_empty() || s.isolating.is_empty(),
                allowed_by: s.matches.first().cloned(),
            });
            matches.extend(s.matches);
            let name = b
                .pod
                .as_ref()
                .map_or_else(|| b.ip.to_string(), ToString::to_string);
            misses.extend(s.misses.into_iter().map(|mut m| {
                m.why = format!("to backend {name} at port {}: {}", b.port, m.why);
                m
            }));
        }
        let overflow = state
            .desired
            .services
            .get(&frontend)
            .is_some_and(|c| c.len() > ztrust_common::SERVICE_CLASSES);
        let objects = if overflow {
            Reason::ServiceBackendsDiffer
        } else {
            classes_reason(end.backends.iter().map(|b| b.allowed))
        };
        let compiled = ep.map(|ep| {
            let classes = state.desired.services.get(&frontend).cloned().unwrap_or_default();
            let rules: Vec<Option<u32>> = classes
                .iter()
                .map(|(id, port)| allowing_rule(ep, *id, dir::EGRESS, proto, *port))
                .collect();
            if classes.len() > ztrust_common::SERVICE_CLASSES {
                // The kernel judges at most this many one by one, and drops the rest (`explain` says so).
                return (Reason::ServiceBackendsDiffer, None);
            }
            let reason = classes_reason(rules.iter().map(Option::is_some));
            (reason, rules.first().copied().flatten())
        });
        let mut said = said;
        // Which rule allows, or why none does, is per backend (above); the end names the first backend's
        // rule, as the kernel does. The frontend's address is no backend's identity.
        said.matches = matches;
        said.misses = misses;
        end.remote_identity = None;
        settle(state, &mut end, said, objects, compiled);
        compiled_isolation(&mut end, ep, dir::EGRESS);
        return end;
    }
    let in_ranges = state.desired.service_cidrs.iter().any(|n| n.contains(&to.ip));
    if isolated && in_ranges && service.is_none() {
        // An address of the Service ranges that no Service has: the kernel drops it at once.
        let mut said = said;
        said.matches.clear();
        settle(
            state,
            &mut end,
            said,
            Reason::UnknownService,
            ep.map(|_| (Reason::UnknownService, None)),
        );
        end.not_allowed_by.clear();
        compiled_isolation(&mut end, ep, dir::EGRESS);
        return end;
    }
    let objects = objects_reason(state, &said, dir::EGRESS, to.ip);
    let compiled = ep.map(|ep| {
        if !isolated_in(ep, dir::EGRESS) {
            (Reason::NotIsolated, None)
        } else {
            match compiled_rule(state, pod, dir::EGRESS, remote_id, query.port, proto) {
                Some(rule) => (Reason::AllowedByPolicy, Some(rule)),
                None => (Reason::PolicyDenied, None),
            }
        }
    });
    settle(state, &mut end, said, objects, compiled);
    compiled_isolation(&mut end, ep, dir::EGRESS);
    end
}

/// The kernel's rule for a frontend: every class admitted, none, or some (not guessed); no class at all
/// is a frontend without backends.
fn classes_reason(admitted: impl Iterator<Item = bool>) -> Reason {
    let (mut yes, mut no) = (0, 0);
    for a in admitted {
        if a { yes += 1 } else { no += 1 }
    }
    match (yes, no) {
        (0, 0) => Reason::UnknownService,
        (_, 0) => Reason::AllowedByPolicy,
        (0, _) => Reason::PolicyDenied,
        _ => Reason::ServiceBackendsDiffer,
    }
}

/// A destination pod's ingress hook, for a connection from `from` to its `port`.
pub(super) fn ingress_end(
    state: &State<'_>,
    index: &IpcacheIndex,
    pod: &Pod,
    from: &Side,
    port: u16,
    protocol: crate::model::Protocol,
) -> End {
    let mut end = new_end(state, pod, dir::INGRESS, from.ip, port);
    let from_pod = from.pod.as_ref().and_then(|p| state.cluster.pods.get(p));
    let remote = Remote {
        ip: from.ip,
        pod: from_pod.filter(|p| !p.host_network),
        port,
        protocol,
        port_owner: Some(pod),
    };
    let said = objects_say(state.cluster, pod, dir::INGRESS, &remote);
    let remote_id = index.identity(from.ip);
    end.remote = state.describe_identity(remote_id, from.ip);
    let objects = objects_reason(state, &said, dir::INGRESS, from.ip);
    let ep = state
        .desired
        .endpoints
        .get(&pod.object_ref())
        .filter(|_| end.here);
    if end.here {
        end.remote_identity = Some(remote_id);
    }
    let compiled = ep.map(|ep| {
        if remote_id == identity::HOST && state.sent_by_node(from.ip) {
            (Reason::FromHost, None)
        } else if !isolated_in(ep, dir::INGRESS) {
            (Reason::NotIsolated, None)
        } else {
            match compiled_rule(state, pod, dir::INGRESS, remote_id, port, protocol.number()) {
                Some(rule) => (Reason::AllowedByPolicy, Some(rule)),
                None => (Reason::PolicyDenied, None),
            }
        }
    });
    settle(state, &mut end, said, objects, compiled);
    compiled_isolation(&mut end, ep, dir::INGRESS);
    end
}
