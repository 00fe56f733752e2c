//! `ztrust-agent what-if -f DRAFT`: recorded flows replayed against the cluster's policies as they are
//! and as a draft would make them (policies added, changed or deleted), each connection judged as
//! `explain` judges it from the objects and the compiled state; which connections change verdict, grouped
//! by source → destination:port with their flow counts. Nothing is written anywhere: the kernel keeps
//! enforcing what it enforces.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use serde::Serialize;

use crate::datapath::sync::audit_namespaces;
use crate::explain::{ExplainError, Query, State, Target, explain};
use crate::flows::{Flow, JudgedAt, Reason, Verdict, as_string, named};
use crate::model::{Cluster, ObjectRef, Protocol};
use crate::policy::Engine;
use crate::source::LoadError;

/// What the draft does to the cluster's policies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DraftSummary {
    #[serde(with = "crate::flows::as_strings")]
    pub added: Vec<ObjectRef>,
    #[serde(with = "crate::flows::as_strings")]
    pub changed: Vec<ObjectRef>,
    #[serde(with = "crate::flows::as_strings")]
    pub deleted: Vec<ObjectRef>,
}

#[derive(Debug, thiserror::Error)]
pub enum DraftError {
    #[error("reading the draft {}", .path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the draft is not what it should be:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<LoadError>),
    #[error("the draft holds no NetworkPolicy (only NetworkPolicies are drafted; --delete removes one)")]
    Empty,
    #[error("--delete {0}: the cluster has no such NetworkPolicy")]
    NoSuchPolicy(ObjectRef),
}

/// `cluster` with the draft's NetworkPolicies (read from `path`, a file or a directory, as the directory
/// source reads manifests) added or replacing those of their name, and `delete` removed. Any problem
/// the draft's objects have is an error (a what-if of a policy the agent would read otherwise than its
/// author meant answers nothing); so is a draft of no policy, or a deletion of a policy that is not there.
pub fn apply_draft(
    cluster: &Cluster,
    path: Option<&Path>,
    delete: &[ObjectRef],
) -> Result<(Cluster, DraftSummary), DraftError> {
    let mut after = cluster.clone();
    let mut summary = DraftSummary::default();
    if let Some(path) = path {
        let loaded = crate::source::dir::load_dir(path).map_err(|source| DraftError::Read {
            path: path.to_owned(),
            source,
        })?;
        if !loaded.errors.is_empty() {
            return Err(DraftError::Invalid(loaded.errors));
        }
        if loaded.cluster.policies.is_empty() {
            return Err(DraftError::Empty);
        }
        for (r, p) in loaded.cluster.policies {
            match after.policies.insert(r.clone(), p) {
                None => summary.added.push(r),
                Some(old) if old != after.policies[&r] => summary.changed.push(r),
                Some(_) => {}
            }
        }
    }
    for r in delete {
        if after.policies.remove(r).is_none() {
            return Err(DraftError::NoSuchPolicy(r.clone()));
        }
        summary.deleted.push(r.clone());
    }
    Ok((after, summary))
}

/// A connection whose verdict the draft changes, with the flows recorded of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Changed {
    /// The source: its pod, or its address.
    pub from: String,
    pub to: String,
    pub port: u16,
    #[serde(with = "as_string")]
    pub protocol: Protocol,
    #[serde(with = "named")]
    pub before: Verdict,
    #[serde(with = "named")]
    pub after: Verdict,
    /// Why, with the draft (`policy-denied`, `allowed-by-policy`, …), at the end that decides.
    #[serde(with = "named")]
    pub reason: Reason,
    /// The policies that decide it with the draft (the allowing rule's, or the isolating ones).
    #[serde(with = "crate::flows::as_strings")]
    pub policies: Vec<ObjectRef>,
    pub flows: usize,
}

/// The outcome of a replay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Replay {
    pub draft: DraftSummary,
    /// Flows read, and those replayed (a connection's opening or a drop: packets of an established
    /// connection, and protocols without ports, are not).
    pub flows_read: usize,
    pub flows_replayed: usize,
    /// Replayed flows that went through (allowed, or would-drop): without them (an agent without `run
    /// --log-allowed` records drops only) a draft's new drops cannot show.
    pub flows_allowed: usize,
    /// Distinct connections (source address, destination address, port, protocol) replayed.
    pub connections: usize,
    pub changed: Vec<Changed>,
    /// Flows whose recorded verdict is not what the current policies give at the hook that recorded them
    /// (the policies changed since).
    pub recorded_otherwise: usize,
    /// The first few such connections, as `from → to:port/protocol: recorded V, now W`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recorded_otherwise_examples: Vec<String>,
    /// Connections that could not be judged (an address no longer any pod's is judged as an address;
    /// this counts the others), with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unjudged: Vec<String>,
}

impl Replay {
    pub fn newly_dropped(&self) -> usize {
        self.changed
            .iter()
            .filter(|c| c.after == Verdict::Dropped)
            .count()
    }
}

/// The connection a flow records, if it records a connection's opening (allowed, denied or a
/// would-drop): not a packet of an established connection (the later packets of a would-drop
/// connection, reported as would-drops too, are not new), a reply, or a segment without a conntrack
/// entry, nor a protocol without ports.
pub(crate) fn connection(f: &Flow) -> Option<(IpAddr, IpAddr, u16, Protocol)> {
    if !f.new_connection
        || matches!(
            f.reason,
            Reason::Reply | Reason::Established | Reason::NoCtEntry | Reason::CtRecovered
        )
    {
        return None;
    }
    let protocol = Protocol::from_number(f.protocol.0)?;
    let port = f.destination.port.filter(|p| *p != 0)?;
    Some((f.source.ip, f.destination.ip, port, protocol))
}

/// The node the flows were recorded on (an agent's flows are its node's): whose host-network pods'
/// traffic is the node's own.
pub(crate) fn node_of(flows: &[Flow]) -> Option<&str> {
    flows.first().map(|f| f.node.as_str()).filter(|n| !n.is_empty())
}

fn judged(x: &crate::explain::Explanation) -> (Verdict, Reason, Vec<ObjectRef>) {
    // The end that decides: the first that does not let it through, else the last.
    let decisive = x
        .ends
        .iter()
        .find(|e| e.verdict != Verdict::Forwarded)
        .or(x.ends.last());
    match decisive {
        None => (x.verdict, Reason::NotIsolated, Vec::new()),
        Some(e) => {
            let policies = match &e.allowed_by {
                Some(m) => vec![m.policy.clone()],
                None => e.isolating.clone(),
            };
            (x.verdict, e.reason, policies)
        }
    }
}

fn name(ip: IpAddr, cluster: &Cluster) -> String {
    cluster
        .pod_at(ip)
        .map_or_else(|| ip.to_string(), |p| p.object_ref().to_string())
}

/// Replays `flows` against `before` and `after` (the cluster as it is, and with the draft).
pub fn replay(before: &Cluster, after: &Cluster, draft: DraftSummary, flows: &[Flow]) -> Replay {
    let compile = |c: &Cluster| (Engine::new().compile(c), audit_namespaces(c));
    let (desired_before, audit_before) = compile(before);
    let (desired_after, audit_after) = compile(after);
    let node = node_of(flows);
    let state = |cluster, desired, audit| State {
        cluster,
        desired,
        node,
        audit_namespaces: audit,
        audit_all: false,
    };
    let now = state(before, &desired_before, &audit_before);
    let then = state(after, &desired_after, &audit_after);
    let mut out = Replay {
        draft,
        flows_read: flows.len(),
        ..Replay::default()
    };
    // Each distinct connection once, with the flows of it and their recorded verdicts.
    let mut seen: BTreeMap<(IpAddr, IpAddr, u16, Protocol), Vec<&Flow>> = BTreeMap::new();
    for f in flows {
        if let Some(c) = connection(f) {
            out.flows_replayed += 1;
            out.flows_allowed += usize::from(f.verdict != Verdict::Dropped);
            seen.entry(c).or_default().push(f);
        }
    }
    out.connections = seen.len();
    let mut grouped: BTreeMap<(String, String, u16, Protocol, Verdict, Verdict), Changed> = BTreeMap::new();
    let mut unjudged = BTreeSet::new();
    for ((src, dst, port, protocol), recorded) in &seen {
        let query = Query {
            from: Target::Address(*src),
            to: Target::Address(*dst),
            port: *port,
            protocol: *protocol,
        };
        let (a, b) = match (explain(&now, &query, None), explain(&then, &query, None)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                unjudged.insert(why_unjudged(&query, &e));
                continue;
            }
        };
        let (before_verdict, ..) = judged(&a);
        let (after_verdict, reason, policies) = judged(&b);
        // Each flow against the hook that recorded it (a connection's flows are one per hook it passed).
        let otherwise: Vec<(&Flow, Verdict)> = recorded
            .iter()
            .filter_map(|f| {
                let JudgedAt::Pod(pod) = &f.endpoint else {
                    return None;
                };
                let end = a
                    .ends
                    .iter()
                    .find(|e| &e.pod == pod && e.direction == f.direction)?;
                (end.verdict != f.verdict).then_some((*f, end.verdict))
            })
            .collect();
        out.recorded_otherwise += otherwise.len();
        if let Some((f, now)) = otherwise.first()
            && out.recorded_otherwise_examples.len() < 5
        {
            out.recorded_otherwise_examples.push(format!(
                "{} → {}:{}/{} at the {} of {}: recorded {}, now {now}",
                name(*src, before),
                name(*dst, before),
                port,
                protocol,
                f.direction,
                f.endpoint,
                f.verdict
            ));
        }
        if before_verdict == after_verdict {
            continue;
        }
        let (from, to) = (name(*src, after), name(*dst, after));
        grouped
            .entry((
                from.clone(),
                to.clone(),
                *port,
                *protocol,
                before_verdict,
                after_verdict,
            ))
            .and_modify(|c| c.flows += recorded.len())
            .or_insert(Changed {
                from,
                to,
                port: *port,
                protocol: *protocol,
                before: before_verdict,
                after: after_verdict,
                reason,
                policies,
                flows: recorded.len(),
            });
    }
    out.changed = grouped.into_values().collect();
    out.unjudged = unjudged.into_iter().collect();
    out
}

fn why_unjudged(q: &Query, e: &ExplainError) -> String {
    format!("{} → {}:{}/{}: {e}", q.from, q.to, q.port, q.protocol)
}

/// The human form: a line per changed connection, then the counts.
pub fn render(r: &Replay) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let list = |v: &[ObjectRef]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    let mut parts = Vec::new();
    for (what, v) in [
        ("adds", &r.draft.added),
        ("changes", &r.draft.changed),
        ("deletes", &r.draft.deleted),
    ] {
        if !v.is_empty() {
            parts.push(format!("{what} {}", list(v)));
        }
    }
    let _ = writeln!(
        out,
        "Draft: {}",
        if parts.is_empty() {
            "changes nothing".to_owned()
        } else {
            parts.join("; ")
        }
    );
    if !r.changed.is_empty() {
        let rows: Vec<[String; 5]> = r
            .changed
            .iter()
            .map(|c| {
                [
                    c.from.clone(),
                    format!("{}:{}/{}", c.to, c.port, c.protocol),
                    format!("{} → {}", c.before, c.after),
                    c.flows.to_string(),
                    format!("{} ({})", c.reason, list(&c.policies)),
                ]
            })
            .collect();
        let head = ["FROM", "TO", "VERDICT", "FLOWS", "WHY (WITH THE DRAFT)"];
        let w = |i: usize| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        };
        let (w0, w1, w2, w3) = (w(0), w(1), w(2), w(3));
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:w0$}  {:w1$}  {:w2$}  {:w3$}  {}",
            head[0], head[1], head[2], head[3], head[4]
        );
        for row in &rows {
            let _ = writeln!(
                out,
                "{:w0$}  {:w1$}  {:w2$}  {:>w3$}  {}",
                row[0], row[1], row[2], row[3], row[4]
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{} flows read, {} replayed ({} connections): {} change verdict, {} of them newly dropped",
        r.flows_read,
        r.flows_replayed,
        r.connections,
        r.changed.len(),
        r.newly_dropped()
    );
    if r.flows_replayed > 0 && r.flows_allowed == 0 {
        let _ = writeln!(
            out,
            "note: no recorded flow went through, so no new drop can show: the agent records allowed connections with `run --log-allowed`"
        );
    }
    if r.recorded_otherwise > 0 {
        let _ = writeln!(
            out,
            "note: {} flows were judged otherwise when recorded than the current policies judge them (the policies changed since)",
            r.recorded_otherwise
        );
        for e in &r.recorded_otherwise_examples {
            let _ = writeln!(out, "  {e}");
        }
    }
    for u in &r.unjudged {
        let _ = writeln!(out, "note: not judged: {u}");
    }
    out
}

#[cfg(test)]
mod tests;
