//! `ztrust-agent flows` and `ztrust-agent alerts`: clients of the agent's flow API
//! (`ztrust.observer.v1`, unix socket by default, TCP with mutual TLS with `--server`). `flows
//! --flow-log FILE` reads the JSON-lines flow log instead (`run --flow-log`), with the same filters.

use std::io::{BufRead, BufReader, IsTerminal as _, Seek, SeekFrom, Write as _};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::{Args, ValueEnum};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

use crate::flows::{Flow, render_line};
use crate::observer::client::{self, ClientTls};
use crate::observer::convert;
use crate::observer::filters::FlowFilters;
use crate::observer::proto::observer_client::ObserverClient;
use crate::observer::proto::{
    Alert, FlowFilter, GetAlertsRequest, GetFlowsRequest, LostEventSource, LostEvents, ServerStatusRequest,
    ServerStatusResponse, Verdict, get_alerts_response, get_flows_response,
};
use crate::observer::server::DEFAULT_SOCKET;

/// What can go wrong for a client of the flow API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no agent answers on {} (is `ztrust-agent run` running on this node? see --socket)",
        .socket.display()
    )]
    NoAgent {
        socket: PathBuf,
        #[source]
        source: client::Error,
    },
    #[error("--server needs --tls-ca, --tls-cert and --tls-key (the agent requires client certificates)")]
    TlsFilesMissing,
    #[error(transparent)]
    Connect(#[from] client::Error),
    #[error("the agent refused the request")]
    Rpc(#[from] tonic::Status),
    #[error("`{value}` is neither a duration (5m) nor a time (RFC 3339)")]
    When {
        value: String,
        #[source]
        source: humantime::TimestampError,
    },
    #[error("unknown {field} `{value}`")]
    UnknownValue { field: &'static str, value: String },
    #[error(transparent)]
    Filter(#[from] crate::observer::filters::Error),
    #[error("opening flow log {} (is the agent running with --flow-log?)", .path.display())]
    FlowLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the output")]
    Output(#[from] std::io::Error),
    #[error("encoding JSON")]
    Json(#[from] serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// One line per flow: `time verdict src -> dst proto reason (...)`.
    Compact,
    /// A JSON array (one object per flow while following).
    Json,
    /// One JSON object per line (the flow log format).
    Jsonl,
}

/// Where the agent's API is.
#[derive(Args, Debug, Clone)]
pub struct Connect {
    /// The agent's unix socket.
    #[arg(long, env = "ZTRUST_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Talk to an agent over TCP with mutual TLS instead (`host:port`); needs --tls-ca, --tls-cert, --tls-key.
    #[arg(long, env = "ZTRUST_SERVER")]
    pub server: Option<String>,
    /// CA certificate (PEM) that signed the agent's certificate.
    #[arg(long, requires = "server")]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM).
    #[arg(long, requires = "server")]
    pub tls_cert: Option<PathBuf>,
    /// This client's key (PEM).
    #[arg(long, requires = "server")]
    pub tls_key: Option<PathBuf>,
    /// Name to expect in the agent's certificate (default: the host of --server).
    #[arg(long, requires = "server")]
    pub tls_server_name: Option<String>,
}

impl Connect {
    pub async fn client(&self) -> Result<ObserverClient<Channel>> {
        match &self.server {
            None => client::connect_unix(&self.socket)
                .await
                .map_err(|source| Error::NoAgent {
                    socket: self.socket.clone(),
                    source,
                }),
            Some(addr) => {
                let (Some(ca), Some(cert), Some(key)) = (&self.tls_ca, &self.tls_cert, &self.tls_key) else {
                    return Err(Error::TlsFilesMissing);
                };
                let tls = ClientTls {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                    domain: self.tls_server_name.clone(),
                };
                Ok(client::connect_tls(addr, &tls).await?)
            }
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct FlowsArgs {
    #[command(flatten)]
    pub connect: Connect,
    /// Read this flow log (JSON lines, `run --flow-log`) instead of asking the agent.
    #[arg(long)]
    pub flow_log: Option<PathBuf>,
    /// Only dropped and would-drop flows.
    #[arg(long)]
    pub denied: bool,
    /// Only flows with this verdict: forwarded, dropped, would-drop (comma-separated: any of them).
    #[arg(long, value_delimiter = ',')]
    pub verdict: Vec<String>,
    /// Only flows with a source or destination in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only flows from or to this pod (`namespace/name`; a prefix such as `ns/web-` matches replicas).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only flows from this pod (`namespace/name`, prefix allowed).
    #[arg(long)]
    pub from_pod: Option<String>,
    /// Only flows to this pod (`namespace/name`, prefix allowed).
    #[arg(long)]
    pub to_pod: Option<String>,
    /// Only connections to this Service (`namespace/name`, prefix allowed): judged by its backends, they
    /// name the Service and its backend pods.
    #[arg(long)]
    pub to_service: Option<String>,
    /// Only flows from this address or CIDR.
    #[arg(long)]
    pub from_ip: Option<String>,
    /// Only flows to this address or CIDR.
    #[arg(long)]
    pub to_ip: Option<String>,
    /// Only flows from pods with these labels (`app=web,tier!=db`).
    #[arg(long)]
    pub from_label: Option<String>,
    /// Only flows to pods with these labels.
    #[arg(long)]
    pub to_label: Option<String>,
    /// Only flows to this destination port or range (`5432`, `8000-8080`).
    #[arg(long)]
    pub port: Option<String>,
    /// Only flows of this protocol (TCP, UDP, SCTP, ICMP, ICMPv6).
    #[arg(long)]
    pub protocol: Option<String>,
    /// Only flows in this direction relative to the judged pod: ingress, egress.
    #[arg(long)]
    pub direction: Option<String>,
    /// Only flows with this reason (`policy-denied`, `reply`, ...).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only flows allowed or isolated by this policy (`namespace/name` or `name`).
    #[arg(long)]
    pub policy: Option<String>,
    /// Only flows since this long ago (`30s`, `5m`, `2h`) or this time (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Only flows before this long ago or this time.
    #[arg(long)]
    pub until: Option<String>,
    /// The last N matching flows (default 20 unless --follow, --since or --all).
    #[arg(long)]
    pub last: Option<u64>,
    /// Every flow the agent still holds.
    #[arg(long, conflicts_with = "last")]
    pub all: bool,
    /// Keep printing flows as they happen.
    #[arg(short, long)]
    pub follow: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `30s`/`5m` ago, or an RFC 3339 time.
fn parse_when(s: &str) -> Result<SystemTime> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(SystemTime::now() - d);
    }
    humantime::parse_rfc3339_weak(s).map_err(|source| Error::When {
        value: s.to_owned(),
        source,
    })
}

fn enum_value(field: &'static str, value: &str, known: i32) -> Result<i32> {
    if known == 0 {
        return Err(Error::UnknownValue {
            field,
            value: value.to_owned(),
        });
    }
    Ok(known)
}

impl FlowsArgs {
    /// The request: one whitelist filter holding every option given (they all must match).
    pub fn request(&self) -> Result<GetFlowsRequest> {
        let one = |o: &Option<String>| o.iter().cloned().collect::<Vec<_>>();
        let mut verdict = Vec::new();
        if self.denied {
            verdict.extend([Verdict::Dropped as i32, Verdict::WouldDrop as i32]);
        }
        for v in &self.verdict {
            verdict.push(enum_value("verdict", v, convert::verdict_from_str(v) as i32)?);
        }
        let direction = match &self.direction {
            Some(d) => vec![enum_value("direction", d, convert::direction_from_str(d) as i32)?],
            None => vec![],
        };
        let reason = match &self.reason {
            Some(r) => vec![enum_value("reason", r, convert::reason_from_str(r) as i32)?],
            None => vec![],
        };
        let filter = FlowFilter {
            verdict,
            namespace: one(&self.namespace),
            pod: one(&self.pod),
            source_pod: one(&self.from_pod),
            destination_pod: one(&self.to_pod),
            destination_service: one(&self.to_service),
            source_ip: one(&self.from_ip),
            destination_ip: one(&self.to_ip),
            source_label: one(&self.from_label),
            destination_label: one(&self.to_label),
            destination_port: one(&self.port),
            protocol: one(&self.protocol),
            traffic_direction: direction,
            reason,
            policy: one(&self.policy),
            ..Default::default()
        };
        // Validate here, for a message naming the option rather than a server error.
        FlowFilters::new(std::slice::from_ref(&filter), &[])?;
        let mut since = self.since.as_deref().map(parse_when).transpose()?;
        let until = self.until.as_deref().map(parse_when).transpose()?;
        let number = match (self.last, self.all) {
            (Some(n), _) => n,
            (None, true) => {
                if self.follow {
                    // Everything kept, then follow: ask from the beginning of time.
                    since = since.or(Some(SystemTime::UNIX_EPOCH));
                }
                0
            }
            (None, false) if self.follow || since.is_some() => 0,
            (None, false) => 20,
        };
        let is_empty = filter == FlowFilter::default();
        Ok(GetFlowsRequest {
            number,
            follow: self.follow,
            whitelist: if is_empty { vec![] } else { vec![filter] },
            blacklist: vec![],
            since: since.map(convert::timestamp),
            until: until.map(convert::timestamp),
            typed_only: true,
        })
    }
}

/// Prints flows in the chosen format; table columns grow to fit and stay aligned.
struct Printer {
    output: Output,
    colour: bool,
    /// The flows have their agent's numbers (`explain --flow ID`): a first column, a JSON field.
    ids: bool,
    id_width: usize,
    /// Flows of several nodes: a NODE column (the compact line starts with the node).
    nodes: bool,
    node_width: usize,
    widths: [usize; 6],
    header_done: bool,
    json_first: bool,
}

const HEADERS: [&str; 7] = [
    "TIME",
    "VERDICT",
    "SOURCE",
    "DESTINATION",
    "PROTO",
    "REASON",
    "POLICY",
];

fn cells(f: &Flow) -> [String; 7] {
    let port = f.destination.port.map(|p| format!(":{p}")).unwrap_or_default();
    // A connection to a Service is judged by the backends it reaches: name the Service and them, not
    // the ClusterIP (the JSON outputs keep the address).
    let dst = match (&f.service, &f.destination.pod) {
        (Some(svc), None) => match svc.backends.as_slice() {
            [one] => format!("svc {}{port} → {one}", svc.name),
            many => format!("svc {}{port} ({} backends)", svc.name, many.len()),
        },
        _ => format!("{}{port}", f.destination.display_name()),
    };
    // The source port is ephemeral noise almost always; the JSON outputs keep it.
    let src = f.source.display_name();
    let why = if f.is_drop() {
        f.policies
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    } else {
        f.allowed_by
            .as_ref()
            .map(|a| format!("{} ({} rule {})", a.policy, a.direction, a.rule))
            .unwrap_or_default()
    };
    let flags = if f.tcp_flags.is_empty() {
        String::new()
    } else {
        format!(" {}", f.tcp_flags)
    };
    [
        humantime::format_rfc3339_millis(f.time).to_string(),
        f.verdict.name().to_uppercase(),
        src,
        dst,
        format!("{}{flags}", f.protocol),
        f.reason.to_string(),
        why,
    ]
}

fn paint(colour: bool, verdict: &str, padded: String) -> String {
    if !colour {
        return padded;
    }
    let code = match verdict {
        "DROPPED" => "31",
        "WOULD-DROP" => "33",
        "FORWARDED" => "32",
        _ => return padded,
    };
    format!("\x1b[{code}m{padded}\x1b[0m")
}

impl Printer {
    fn new(output: Output) -> Self {
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Self {
            output,
            colour,
            ids: false,
            id_width: 4,
            nodes: false,
            node_width: 4,
            widths: [24, 10, 24, 28, 9, 17],
            header_done: false,
            json_first: true,
        }
    }

    /// Flows from the agent: their numbers are shown.
    fn with_ids(mut self) -> Self {
        self.ids = true;
        self
    }

    /// `batch` is complete (not following): size the columns to it.
    fn fit(&mut self, batch: &[Flow]) {
        for f in batch {
            self.node_width = self.node_width.max(f.node.chars().count());
            for (w, c) in self.widths.iter_mut().zip(cells(f)) {
                *w = (*w).max(c.chars().count());
            }
        }
    }

    fn row(&self, node: &str, id: &str, c: &[String; 7]) -> String {
        let mut line = String::new();
        if self.nodes {
            line.push_str(&format!("{node:<w$}  ", w = self.node_width));
        }
        if self.ids {
            line.push_str(&format!("{id:<w$}  ", w = self.id_width));
        }
        for (i, cell) in c.iter().enumerate() {
            if i < 6 {
                let padded = format!("{cell:<w$}  ", w = self.widths[i]);
                line.push_str(&if i == 1 {
                    paint(self.colour, cell, padded)
                } else {
                    padded
                });
            } else {
                line.push_str(cell);
            }
        }
        line.trim_end().to_owned()
    }

    fn flow(&mut self, out: &mut impl std::io::Write, f: &Flow, id: Option<u64>) -> Result<()> {
        /// A flow with its agent's number, as the JSON outputs write it.
        #[derive(serde::Serialize)]
        struct Numbered<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            id: Option<u64>,
            #[serde(flatten)]
            flow: &'a Flow,
        }
        let numbered = Numbered { id, flow: f };
        match self.output {
            Output::Jsonl => writeln!(out, "{}", serde_json::to_string(&numbered)?)?,
            Output::Json => {
                let sep = if self.json_first { "[\n" } else { ",\n" };
                self.json_first = false;
                write!(out, "{sep}{}", serde_json::to_string_pretty(&numbered)?)?;
            }
            Output::Compact => {
                let mut line = match id {
                    Some(id) => format!("#{id} {}", render_line(f)),
                    None => render_line(f),
                };
                if self.nodes {
                    line = format!("{} {line}", f.node);
                }
                if self.colour && f.is_drop() {
                    writeln!(out, "\x1b[31m{line}\x1b[0m")?;
                } else {
                    writeln!(out, "{line}")?;
                }
            }
            Output::Table => {
                let id = id.map(|i| i.to_string()).unwrap_or_default();
                self.id_width = self.id_width.max(id.len());
                if !self.header_done {
                    self.header_done = true;
                    writeln!(out, "{}", self.row("NODE", "ID", &HEADERS.map(str::to_owned)))?;
                }
                let c = cells(f);
                for (w, cell) in self.widths.iter_mut().zip(&c) {
                    *w = (*w).max(cell.chars().count());
                }
                self.node_width = self.node_width.max(f.node.chars().count());
                writeln!(out, "{}", self.row(&f.node, &id, &c))?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut impl std::io::Write) -> Result<()> {
        if self.output == Output::Json {
            writeln!(out, "{}", if self.json_first { "[]" } else { "\n]" })?;
        }
        Ok(())
    }
}

fn report_lost(l: &LostEvents) {
    let why = match l.source() {
        LostEventSource::KernelRingBuffer => "the kernel's event ring buffer was full",
        LostEventSource::AgentRing => "the agent's flow buffer no longer holds them (--flow-buffer)",
        LostEventSource::SlowClient => "this client read too slowly",
        LostEventSource::Unknown => "unknown cause",
    };
    eprintln!("!! {} flow(s) lost: {why}", l.num_events_lost);
}

pub fn run(args: &FlowsArgs) -> Result<()> {
    let req = args.request()?;
    if let Some(path) = &args.flow_log {
        return run_file(args, &req, path);
    }
    nodes::stream(args, &req, std::slice::from_ref(&args.connect))
}

/// The flow log instead of the agent: same request, applied here.
fn run_file(args: &FlowsArgs, req: &GetFlowsRequest, path: &std::path::Path) -> Result<()> {
    let filters = FlowFilters::new(&req.whitelist, &req.blacklist)?;
    let since = req.since.as_ref().map(convert::system_time);
    let until = req.until.as_ref().map(convert::system_time);
    let wanted = |f: &Flow| {
        let t = f.time;
        since.is_none_or(|s| t >= s) && until.is_none_or(|u| t < u) && filters.matches(f)
    };
    let (mut flows, mut pos) = recorded::read_flow_log(path, wanted)?;
    let mut line = String::new();
    if req.number > 0 {
        let skip = flows
            .len()
            .saturating_sub(usize::try_from(req.number).unwrap_or(usize::MAX));
        flows.drain(..skip);
    } else if args.follow && since.is_none() && !args.all {
        flows.clear();
    }
    let mut printer = Printer::new(args.output);
    let stdout = std::io::stdout();
    if !args.follow {
        printer.fit(&flows);
    }
    for f in &flows {
        printer.flow(&mut stdout.lock(), f, None)?;
    }
    if !args.follow {
        return printer.finish(&mut stdout.lock());
    }
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let mut f = std::fs::File::open(path)?;
        if f.metadata()?.len() < pos {
            pos = 0; // rotated or truncated
        }
        f.seek(SeekFrom::Start(pos))?;
        let mut r = BufReader::new(f);
        loop {
            line.clear();
            let n = r.read_line(&mut line)?;
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            pos += n as u64;
            if let Ok(fl) = serde_json::from_str::<Flow>(&line)
                && wanted(&fl)
            {
                let mut out = stdout.lock();
                printer.flow(&mut out, &fl, None)?;
                out.flush()?;
            }
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct AlertsArgs {
    #[command(flatten)]
    pub connect: Connect,
    /// The last N alerts the agent holds (default: all it holds).
    #[arg(long)]
    pub last: Option<u64>,
    /// Keep printing alerts as they are raised.
    #[arg(short, long)]
    pub follow: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Compact)]
    pub output: Output,
}

fn alert_json(a: &Alert) -> serde_json::Value {
    let time = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .map(|t| humantime::format_rfc3339_millis(convert::system_time(t)).to_string())
    };
    serde_json::json!({
        "time": time(&a.time),
        "node": a.node_name,
        "kind": convert::alert_kind_name(a.kind()),
        "source": a.source,
        "summary": a.summary,
        "distinct_destinations": a.distinct_destinations,
        "denied_flows": a.denied_flows,
        "window_start": time(&a.window_start),
        "evidence": a.evidence.iter().map(convert::flow_from_proto).collect::<Vec<_>>(),
    })
}

fn print_alert(a: &Alert, output: Output) -> Result<()> {
    let v = alert_json(a);
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        Output::Jsonl => println!("{v}"),
        Output::Compact | Output::Table => {
            let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            let head = format!(
                "{}  {:<15} {}",
                v["time"].as_str().unwrap_or("-"),
                v["kind"].as_str().unwrap_or("-").to_uppercase(),
                a.summary
            );
            if colour {
                println!("\x1b[1;31m{head}\x1b[0m")
            } else {
                println!("{head}")
            }
            for f in &a.evidence {
                println!("    {}", render_line(&convert::flow_from_proto(f)));
            }
        }
    }
    Ok(())
}

pub fn run_alerts(args: &AlertsArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = args.connect.client().await?;
        let req = GetAlertsRequest {
            number: args.last.unwrap_or(0),
            follow: args.follow,
        };
        let mut stream = client.get_alerts(req).await?.into_inner();
        while let Some(r) = stream.next().await {
            match r?.response_types {
                Some(get_alerts_response::ResponseTypes::Alert(a)) => print_alert(&a, args.output)?,
                Some(get_alerts_response::ResponseTypes::LostEvents(l)) => report_lost(&l),
                None => {}
            }
        }
        Ok(())
    })
}

/// The running agent's observer counters (for `status --server`).
pub fn server_status(connect: &Connect) -> Result<ServerStatusResponse> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        Ok(connect
            .client()
            .await?
            .server_status(ServerStatusRequest {})
            .await?
            .into_inner())
    })
}

pub fn render_server_status(s: &ServerStatusResponse) -> String {
    let uptime = humantime::format_duration(Duration::from_secs(s.uptime_ns / 1_000_000_000));
    let mut out = format!(
        "Agent {} on node {} (up {uptime})\n\
         Endpoints enforced:   {}\n\
         Flows seen:           {}\n\
         Flow buffer:          {} / {}\n\
         Lost (kernel ring):   {}\n\
         Overwritten (buffer): {}\n\
         Lost (slow clients):  {}\n\
         API streams open:     {}\n\
         Alerts raised:        {}\n",
        s.version,
        s.node_name,
        s.endpoints_enforced,
        s.seen_flows,
        s.num_flows,
        s.max_flows,
        s.lost_kernel_ring_buffer,
        s.ring_overwritten,
        s.lost_slow_clients,
        s.subscribers,
        s.alerts_raised
    );
    if !s.otlp_endpoint.is_empty() {
        out.push_str(&format!(
            "OTLP export:          {} ({} exported, lost: {} queue full, {} export failed)\n",
            s.otlp_endpoint, s.otlp_exported, s.otlp_lost_queue_full, s.otlp_lost_export_failed
        ));
    }
    // Said as loudly as the counters: a pod that is not enforced must not pass for one that is.
    for p in &s.pods_not_enforced {
        out.push_str(&format!("Not enforced:         {} ({})\n", p.pod, p.reason));
    }
    out
}

pub fn server_status_json(s: &ServerStatusResponse) -> serde_json::Value {
    serde_json::json!({
        "node": s.node_name,
        "version": s.version,
        "uptime_ns": s.uptime_ns,
        "endpoints_enforced": s.endpoints_enforced,
        "seen_flows": s.seen_flows,
        "num_flows": s.num_flows,
        "max_flows": s.max_flows,
        "lost_kernel_ring_buffer": s.lost_kernel_ring_buffer,
        "ring_overwritten": s.ring_overwritten,
        "lost_slow_clients": s.lost_slow_clients,
        "subscribers": s.subscribers,
        "alerts_raised": s.alerts_raised,
        "otlp": (!s.otlp_endpoint.is_empty()).then(|| serde_json::json!({
            "endpoint": s.otlp_endpoint,
            "exported": s.otlp_exported,
            "lost_queue_full": s.otlp_lost_queue_full,
            "lost_export_failed": s.otlp_lost_export_failed,
        })),
        "pods_not_enforced": s
            .pods_not_enforced
            .iter()
            .map(|p| serde_json::json!({ "pod": p.pod, "reason": p.reason }))
            .collect::<Vec<_>>(),
    })
}

mod nodes;
mod recorded;

pub use nodes::run_nodes;
pub use recorded::recorded_flows;

#[cfg(test)]
mod tests;
