//! `ztrust-lab probe`: every pod tries every pod and external host, on each port, and a [`Matrix`] says what got
//! through.
//!
//! A probe runs on a worker thread that has joined the source pod's network namespace (`setns(2)` moves
//! only the calling thread, and a socket stays in the namespace it was created in), so hundreds of probes
//! run at once and a full matrix takes about one timeout, not one timeout per denied probe.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{ErrorKind, Read as _};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsFd as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use serde::{Deserialize, Serialize};

use super::serve::reply_line;
use super::state::{LabState, align};
use super::{Error, Result, net};
use ztrust_agent::model::{Cluster, Protocol};
use ztrust_agent::policy::reference::reference_allowed;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    #[default]
    V4,
    V6,
    Both,
}

impl Family {
    fn wants(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::Both, _) | (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

impl std::str::FromStr for Family {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "4" | "v4" | "ipv4" => Ok(Family::V4),
            "6" | "v6" | "ipv6" => Ok(Family::V6),
            "both" | "46" | "dual" => Ok(Family::Both),
            _ => Err(Error::BadArgument {
                what: "address family",
                value: s.to_owned(),
                expected: "4, 6 or both",
            }),
        }
    }
}

/// Parses `tcp`, `UDP`, `sctp`.
pub fn parse_protocol(s: &str) -> Result<Protocol> {
    match s.to_ascii_uppercase().as_str() {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        _ => Err(Error::BadArgument {
            what: "protocol",
            value: s.to_owned(),
            expected: "tcp, udp or sctp",
        }),
    }
}

#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Probe these ports instead of each target's container ports.
    pub ports: Option<Vec<u16>>,
    /// Probe only these protocols (with `ports`: these protocols on each port; default TCP).
    pub protocols: Option<Vec<Protocol>>,
    pub family: Family,
    /// Connect (TCP) or reply (UDP, per attempt) timeout.
    pub timeout: Duration,
    /// Only from these sources (`ns/pod`); all when empty.
    pub from: Vec<String>,
    /// Only to these targets (`ns/pod` or `external/<name>`); all when empty.
    pub to: Vec<String>,
    /// Probes in flight at once.
    pub parallelism: usize,
    /// Reach the pods through the lab's Services' cluster IPs (the node translates) instead of their own
    /// addresses. A pod is not probed through a Service it is a backend of (hairpin: kube-proxy
    /// masquerades it, and NetworkPolicy leaves what applies to it undefined).
    pub via_service: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            ports: None,
            protocols: None,
            family: Family::V4,
            timeout: Duration::from_millis(500),
            from: Vec::new(),
            to: Vec::new(),
            parallelism: 256,
            via_service: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    Denied,
    /// The lab cannot test it (SCTP: this kernel has no SCTP sockets).
    Unsupported,
}

impl Verdict {
    pub fn symbol(self) -> char {
        match self {
            Verdict::Allowed => '✓',
            Verdict::Denied => '✗',
            Verdict::Unsupported => '?',
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Unsupported => "unsupported",
        })
    }
}

mod protocol_upper {
    use serde::{Deserialize, Deserializer, Serializer};

    use ztrust_agent::model::Protocol;

    pub fn serialize<S: Serializer>(p: &Protocol, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_protocol(&text).map_err(serde::de::Error::custom)
    }
}

/// One attempt: `from` → `to` at `to_ip`:`port`/`protocol`. Through a Service (`via`), `to`, `to_ip` and
/// `port` are the backend's (the pod that answered, or the only one), the Service's address and port are
/// in `via`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub from: String,
    /// `namespace/name` of the pod (or `external/<name>`); through a Service whose backend is unknown
    /// (several, none answered), `service:<namespace>/<name>`.
    pub to: String,
    pub to_ip: IpAddr,
    pub port: u16,
    #[serde(with = "protocol_upper")]
    pub protocol: Protocol,
    pub result: Verdict,
    /// Why: `ok`, `timeout`, `refused`, `reset`, `unreachable`, `unexpected reply …`, `no SCTP …`.
    pub detail: String,
    pub latency_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Via>,
}

/// The Service a probe went through: what the source connected to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Via {
    /// `namespace/name`.
    pub service: String,
    pub address: IpAddr,
    pub port: u16,
}

impl Probe {
    fn family(&self) -> u8 {
        if self.to_ip.is_ipv4() { 4 } else { 6 }
    }

    /// What makes two probes the same question: the answer's address is left out, so an expected matrix
    /// need not know which address the lab gave a pod.
    fn question(&self) -> (String, String, u8, u16, Protocol) {
        (
            self.from.clone(),
            self.to.clone(),
            self.family(),
            self.port,
            self.protocol,
        )
    }
}

/// The answers of one `probe`, sorted by (from, to, address, protocol, port).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Matrix {
    pub probes: Vec<Probe>,
}

impl Matrix {
    pub fn new(mut probes: Vec<Probe>) -> Self {
        probes.sort_by(|a, b| {
            (&a.from, &a.to, a.to_ip, a.protocol, a.port).cmp(&(&b.from, &b.to, b.to_ip, b.protocol, b.port))
        });
        Self { probes }
    }

    /// The `-o json` form: an array of probe records.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.probes).expect("probes serialize")
    }

    pub fn from_json(value: serde_json::Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(value).map(Self::new)
    }

    /// The verdict of `from` → `to` on `port`/`protocol` (IPv4 if probed, else IPv6).
    pub fn verdict(&self, from: &str, to: &str, port: u16, protocol: Protocol) -> Option<Verdict> {
        let mut hits: Vec<&Probe> = self
            .probes
            .iter()
            .filter(|p| p.from == from && p.to == to && p.port == port && p.protocol == protocol)
            .collect();
        hits.sort_by_key(|p| p.family());
        hits.first().map(|p| p.result)
    }

    /// The same questions with the answers `expect` gives: how tests write an expected matrix.
    /// SCTP stays `unsupported` whatever `expect` says, as the lab cannot test it.
    pub fn expected_with(&self, mut expect: impl FnMut(&Probe) -> Verdict) -> Matrix {
        let probes = self
            .probes
            .iter()
            .map(|p| {
                let result = if p.protocol == Protocol::Sctp {
                    Verdict::Unsupported
                } else {
                    expect(p)
                };
                Probe {
                    result,
                    detail: "expected".into(),
                    latency_ms: 0.0,
                    via: None,
                    ..p.clone()
                }
            })
            .collect();
        Matrix::new(probes)
    }

    /// The same questions answered by the policies of `cluster`, through the reference evaluator
    /// ([`ztrust_agent::policy::reference::reference_allowed`]): what an enforcing agent should make of this
    /// matrix. A source's address is its address of the probed family; a pod reaching itself never leaves
    /// its namespace, so no policy applies to it.
    pub fn expected_by_reference(&self, state: &LabState, cluster: &Cluster) -> Matrix {
        self.expected_with(|p| {
            if p.from == p.to {
                return Verdict::Allowed;
            }
            let src = state
                .pod(&p.from)
                .and_then(|s| s.ips.iter().find(|ip| ip.is_ipv4() == p.to_ip.is_ipv4()));
            match src {
                Some(src) if reference_allowed(cluster, *src, p.to_ip, p.protocol.number(), p.port) => {
                    Verdict::Allowed
                }
                _ => Verdict::Denied,
            }
        })
    }

    /// Counts per verdict.
    pub fn counts(&self) -> BTreeMap<Verdict, usize> {
        let mut c = BTreeMap::new();
        for p in &self.probes {
            *c.entry(p.result).or_default() += 1;
        }
        c
    }

    /// Where this matrix (actual) differs from `expected`: probes with another verdict, probes one side
    /// has and the other lacks.
    pub fn diff(&self, expected: &Matrix) -> MatrixDiff {
        let actual: HashMap<_, &Probe> = self.probes.iter().map(|p| (p.question(), p)).collect();
        let wanted: HashMap<_, &Probe> = expected.probes.iter().map(|p| (p.question(), p)).collect();
        let mut rows = Vec::new();
        for e in &expected.probes {
            match actual.get(&e.question()) {
                Some(a) if a.result == e.result => {}
                Some(a) => rows.push(Mismatch {
                    probe: (*a).clone(),
                    expected: Some(e.result),
                    actual: Some(a.result),
                }),
                None => rows.push(Mismatch {
                    probe: e.clone(),
                    expected: Some(e.result),
                    actual: None,
                }),
            }
        }
        for a in &self.probes {
            if !wanted.contains_key(&a.question()) {
                rows.push(Mismatch {
                    probe: a.clone(),
                    expected: None,
                    actual: Some(a.result),
                });
            }
        }
        rows.sort_by(|a, b| {
            (&a.probe.from, &a.probe.to, a.probe.to_ip, a.probe.port).cmp(&(
                &b.probe.from,
                &b.probe.to,
                b.probe.to_ip,
                b.probe.port,
            ))
        });
        MatrixDiff {
            mismatches: rows,
            compared: expected.probes.len(),
        }
    }

    /// `-o table`: rows are sources, columns targets; a cell is `✓` when every probe was allowed, `✗` when
    /// every probe was denied, else each port, e.g. `80/TCP✓ 81/TCP✗`. A legend follows.
    pub fn render_table(&self) -> String {
        let mut froms: Vec<&str> = Vec::new();
        let mut tos: Vec<String> = Vec::new();
        let mut cells: BTreeMap<(&str, String), Vec<&Probe>> = BTreeMap::new();
        for p in &self.probes {
            // Through a Service: a column per Service (its backends vary from one connection to the next).
            let to = p
                .via
                .as_ref()
                .map_or_else(|| p.to.clone(), |v| format!("svc {}", v.service));
            if !froms.contains(&p.from.as_str()) {
                froms.push(&p.from);
            }
            if !tos.contains(&to) {
                tos.push(to.clone());
            }
            cells.entry((&p.from, to)).or_default().push(p);
        }
        // Pods first, external hosts last.
        tos.sort_by_key(|t| (t.starts_with("external/"), t.clone()));
        froms.sort();
        let mut rows: Vec<Vec<String>> = Vec::new();
        let mut header = vec!["FROM \\ TO".to_owned()];
        header.extend(tos.iter().cloned());
        rows.push(header);
        for f in &froms {
            let mut row = vec![(*f).to_owned()];
            for t in &tos {
                row.push(
                    cells
                        .get(&(*f, t.clone()))
                        .map(|ps| cell(ps))
                        .unwrap_or_else(|| ".".into()),
                );
            }
            rows.push(row);
        }
        let mut out = align_rows(&rows);
        let counts = self.counts();
        let _ = writeln!(
            out,
            "\n✓ allowed  ✗ denied  ? unsupported (no SCTP in this kernel)  . not probed   ({} probes: {} allowed, {} denied, {} unsupported)",
            self.probes.len(),
            counts.get(&Verdict::Allowed).unwrap_or(&0),
            counts.get(&Verdict::Denied).unwrap_or(&0),
            counts.get(&Verdict::Unsupported).unwrap_or(&0),
        );
        out
    }
}

/// One cell of the table.
fn cell(probes: &[&Probe]) -> String {
    let verdicts: BTreeSet<Verdict> = probes.iter().map(|p| p.result).collect();
    if verdicts.len() == 1 {
        return verdicts.first().expect("one").symbol().to_string();
    }
    // Per port/protocol; where the families disagree, per family too.
    let mut per: BTreeMap<(Protocol, u16), BTreeMap<u8, Verdict>> = BTreeMap::new();
    for p in probes {
        per.entry((p.protocol, p.port))
            .or_default()
            .insert(p.family(), p.result);
    }
    per.iter()
        .map(|((proto, port), fams)| {
            let vs: BTreeSet<Verdict> = fams.values().copied().collect();
            if vs.len() == 1 {
                format!("{port}/{proto}{}", vs.first().expect("one").symbol())
            } else {
                let each: Vec<String> = fams.iter().map(|(f, v)| format!("v{f}{}", v.symbol())).collect();
                format!("{port}/{proto}({})", each.join(","))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn align_rows(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; n];
    for row in rows {
        for (i, c) in row.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, c) in row.iter().enumerate() {
            line.push_str(c);
            line.extend(std::iter::repeat_n(' ', widths[i] - c.chars().count() + 2));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One difference between an actual and an expected matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    /// The actual probe (or the expected one, when it was not probed).
    pub probe: Probe,
    /// `None`: probed but not expected.
    pub expected: Option<Verdict>,
    /// `None`: expected but not probed.
    pub actual: Option<Verdict>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct MatrixDiff {
    pub mismatches: Vec<Mismatch>,
    pub compared: usize,
}

impl MatrixDiff {
    pub fn is_empty(&self) -> bool {
        self.mismatches.is_empty()
    }

    pub fn render(&self) -> String {
        if self.is_empty() {
            return format!("all {} probes as expected\n", self.compared);
        }
        let mut rows = vec![[
            "FROM".to_owned(),
            "TO".into(),
            "ADDRESS".into(),
            "PORT".into(),
            "EXPECTED".into(),
            "ACTUAL".into(),
            "DETAIL".into(),
        ]];
        let show = |v: Option<Verdict>| v.map(|v| v.to_string()).unwrap_or_else(|| "(not probed)".into());
        for m in &self.mismatches {
            rows.push([
                m.probe.from.clone(),
                m.probe.to.clone(),
                m.probe.to_ip.to_string(),
                format!("{}/{}", m.probe.port, m.probe.protocol),
                show(m.expected),
                show(m.actual),
                if m.actual.is_some() {
                    m.probe.detail.clone()
                } else {
                    String::new()
                },
            ]);
        }
        format!(
            "{} of {} probes differ from what was expected:\n{}",
            self.mismatches.len(),
            self.compared,
            align(&rows)
        )
    }
}

impl std::fmt::Display for MatrixDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

/// One probe to run.
#[derive(Clone, Debug)]
struct Job {
    netns: String,
    from: String,
    /// Who may answer: `namespace/name`, address, port (through a Service: its backends).
    answers: Vec<(String, IpAddr, u16)>,
    /// The address and port connected to.
    to_ip: IpAddr,
    port: u16,
    protocol: Protocol,
    via: Option<Via>,
}

/// Which probes `opts` asks for in `state`, before running any.
fn plan(state: &LabState, opts: &ProbeOptions) -> Result<Vec<Job>> {
    if opts.via_service {
        return plan_services(state, opts);
    }
    struct Target<'a> {
        key: String,
        ips: &'a [IpAddr],
        ports: Vec<(u16, Protocol)>,
    }
    let mut targets: Vec<Target> = state
        .pods
        .iter()
        .map(|p| Target {
            key: p.key(),
            ips: &p.ips,
            ports: p.ports.iter().map(|c| (c.port, c.protocol)).collect(),
        })
        .collect();
    targets.extend(state.externals.iter().map(|x| Target {
        key: x.key(),
        ips: &x.ips,
        ports: x.ports.iter().map(|c| (c.port, c.protocol)).collect(),
    }));
    let mut jobs = Vec::new();
    for src in &state.pods {
        if !opts.from.is_empty() && !opts.from.contains(&src.key()) {
            continue;
        }
        for t in &targets {
            if !opts.to.is_empty() && !opts.to.contains(&t.key) {
                continue;
            }
            let mut ports: Vec<(u16, Protocol)> = match (&opts.ports, &opts.protocols) {
                (Some(ports), protos) => {
                    let protos = protos.clone().unwrap_or_else(|| vec![Protocol::Tcp]);
                    ports
                        .iter()
                        .flat_map(|p| protos.iter().map(move |pr| (*p, *pr)))
                        .collect()
                }
                (None, Some(protos)) => t
                    .ports
                    .iter()
                    .copied()
                    .filter(|(_, pr)| protos.contains(pr))
                    .collect(),
                (None, None) => t.ports.clone(),
            };
            ports.sort();
            ports.dedup();
            // A source without an address of the family has no route of it: nothing to learn from a probe.
            let src_has = |ip: &IpAddr| src.ips.iter().any(|s| s.is_ipv4() == ip.is_ipv4());
            for ip in t.ips.iter().filter(|ip| opts.family.wants(ip) && src_has(ip)) {
                for (port, protocol) in &ports {
                    jobs.push(Job {
                        netns: src.netns.clone(),
                        from: src.key(),
                        answers: vec![(t.key.clone(), *ip, *port)],
                        to_ip: *ip,
                        port: *port,
                        protocol: *protocol,
                        via: None,
                    });
                }
            }
        }
    }
    Ok(jobs)
}

/// The probes through Services: every source pod to every cluster IP and port of the lab's Services
/// (`opts.ports` and `opts.protocols` filter the Service's ports; `opts.to` names Services or backends).
fn plan_services(state: &LabState, opts: &ProbeOptions) -> Result<Vec<Job>> {
    let frontends = super::services::frontends(state)?;
    let mut jobs = Vec::new();
    for src in &state.pods {
        if !opts.from.is_empty() && !opts.from.contains(&src.key()) {
            continue;
        }
        let src_has = |ip: &IpAddr| src.ips.iter().any(|s| s.is_ipv4() == ip.is_ipv4());
        for f in frontends
            .iter()
            .filter(|f| !f.node_port && opts.family.wants(&f.ip) && src_has(&f.ip))
        {
            let named = |k: &String| *k == f.service || f.backends.iter().any(|(b, _, _)| b == k);
            let port_ok = opts.ports.as_ref().is_none_or(|ps| ps.contains(&f.port))
                && opts.protocols.as_ref().is_none_or(|ps| ps.contains(&f.protocol));
            // Hairpin (a pod through its own Service) is left out, as `ProbeOptions::via_service` says.
            let hairpin = f.backends.iter().any(|(b, _, _)| *b == src.key());
            if (!opts.to.is_empty() && !opts.to.iter().any(named)) || !port_ok || hairpin {
                continue;
            }
            jobs.push(Job {
                netns: src.netns.clone(),
                from: src.key(),
                answers: f.backends.clone(),
                to_ip: f.ip,
                port: f.port,
                protocol: f.protocol,
                via: Some(Via {
                    service: f.service.clone(),
                    address: f.ip,
                    port: f.port,
                }),
            });
        }
    }
    Ok(jobs)
}

/// Probes the running lab in `state_dir`.
pub fn probe(state_dir: &Path, opts: &ProbeOptions) -> Result<Matrix> {
    let state = LabState::load_running(state_dir)?;
    let jobs = plan(&state, opts)?;
    let mut fds: HashMap<String, Arc<File>> = HashMap::new();
    for j in &jobs {
        if !fds.contains_key(&j.netns) {
            fds.insert(j.netns.clone(), Arc::new(net::open_netns(&j.netns)?));
        }
    }
    let fds = Arc::new(fds);
    let queue = Arc::new(Mutex::new(jobs.into_iter().rev().collect::<Vec<_>>()));
    let results = Arc::new(Mutex::new(Vec::new()));
    let workers = opts
        .parallelism
        .max(1)
        .min(queue.lock().expect("not poisoned").len().max(1));
    let timeout = opts.timeout;
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (queue, results, fds) = (queue.clone(), results.clone(), fds.clone());
        handles.push(std::thread::spawn(move || -> Result<()> {
            let mut current: Option<String> = None;
            loop {
                let Some(job) = queue.lock().expect("not poisoned").pop() else {
                    return Ok(());
                };
                if current.as_deref() != Some(job.netns.as_str()) {
                    setns(fds[&job.netns].as_fd(), CloneFlags::CLONE_NEWNET)
                        .map_err(|e| super::io_err(format!("joining netns {}", job.netns))(e.into()))?;
                    current = Some(job.netns.clone());
                }
                let probe = run_one(&job, timeout);
                results.lock().expect("not poisoned").push(probe);
            }
        }));
    }
    for h in handles {
        h.join().expect("probe worker does not panic")?;
    }
    let probes = std::mem::take(&mut *results.lock().expect("not poisoned"));
    Ok(Matrix::new(probes))
}

mod send;

use self::send::*;

#[cfg(test)]
mod tests;
