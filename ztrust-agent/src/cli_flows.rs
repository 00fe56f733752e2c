//! `ztrust-agent flows`: read the agent's flow log (JSON lines), filter, and print for people or scripts.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::flows::{Flow, render_line};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Compact,
    Json,
    Jsonl,
}

#[derive(Args, Debug, Clone)]
pub struct FlowsArgs {
    /// The agent's flow log (`run --flow-log`).
    #[arg(long, env = "ZTRUST_FLOW_LOG", default_value = "/var/run/ztrust/flows.jsonl")]
    pub flow_log: PathBuf,
    /// Only dropped (and would-drop) flows.
    #[arg(long)]
    pub denied: bool,
    /// Only flows with this verdict: forwarded, dropped, would-drop.
    #[arg(long)]
    pub verdict: Option<String>,
    /// Only flows with a source or destination in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only flows from or to this pod (`namespace/name`).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only flows from this pod (`namespace/name`).
    #[arg(long)]
    pub from_pod: Option<String>,
    /// Only flows to this pod (`namespace/name`).
    #[arg(long)]
    pub to_pod: Option<String>,
    /// Only flows to this destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only flows of this protocol (TCP, UDP, SCTP, ICMP).
    #[arg(long)]
    pub protocol: Option<String>,
    /// Only the last N matching flows (before following).
    #[arg(long)]
    pub last: Option<usize>,
    /// Keep printing flows as they come.
    #[arg(short, long)]
    pub follow: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Compact)]
    pub output: Output,
}

impl FlowsArgs {
    pub fn matches(&self, f: &Flow) -> bool {
        let name = |e: &crate::flows::Endpoint| e.display_name();
        let in_ns = |ns: &str| {
            f.source.namespace.as_deref() == Some(ns) || f.destination.namespace.as_deref() == Some(ns)
        };
        (!self.denied || f.is_drop())
            && self.verdict.as_ref().is_none_or(|v| v.eq_ignore_ascii_case(&f.verdict))
            && self.namespace.as_deref().is_none_or(in_ns)
            && self.pod.as_ref().is_none_or(|p| &name(&f.source) == p || &name(&f.destination) == p)
            && self.from_pod.as_ref().is_none_or(|p| &name(&f.source) == p)
            && self.to_pod.as_ref().is_none_or(|p| &name(&f.destination) == p)
            && self.port.is_none_or(|p| f.destination.port == Some(p))
            && self.protocol.as_ref().is_none_or(|p| p.eq_ignore_ascii_case(&f.protocol))
    }
}

fn print(flows: &[Flow], output: Output, header: bool) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(flows)?),
        Output::Jsonl => {
            for f in flows {
                println!("{}", serde_json::to_string(f)?);
            }
        }
        Output::Compact => {
            for f in flows {
                println!("{}", render_line(f));
            }
        }
        Output::Table => {
            if header {
                println!(
                    "{:<24} {:<10} {:<28} {:<34} {:<6} {:<20} POLICIES",
                    "TIME", "VERDICT", "SOURCE", "DESTINATION", "PROTO", "REASON"
                );
            }
            for f in flows {
                let dst = match f.destination.port {
                    Some(p) => format!("{}:{p}", f.destination.display_name()),
                    None => f.destination.display_name(),
                };
                let why = if f.is_drop() {
                    f.policies.join(",")
                } else {
                    f.allowed_by.as_ref().map(|a| format!("{} (rule {})", a.policy, a.rule)).unwrap_or_default()
                };
                println!(
                    "{:<24} {:<10} {:<28} {:<34} {:<6} {:<20} {}",
                    f.time,
                    f.verdict,
                    f.source.display_name(),
                    dst,
                    f.protocol,
                    f.reason,
                    why
                );
            }
        }
    }
    Ok(())
}

pub fn read_flows(path: &std::path::Path) -> std::io::Result<Vec<Flow>> {
    let file = std::fs::File::open(path)?;
    Ok(BufReader::new(file).lines().map_while(Result::ok).filter_map(|l| serde_json::from_str(&l).ok()).collect())
}

pub fn run(args: &FlowsArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut file = std::fs::File::open(&args.flow_log)
        .with_context(|| format!("opening flow log {} (is the agent running with --flow-log?)", args.flow_log.display()))?;
    let mut reader = BufReader::new(&mut file);
    let mut flows: Vec<Flow> = Vec::new();
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        if let Ok(f) = serde_json::from_str::<Flow>(&line)
            && args.matches(&f)
        {
            flows.push(f);
        }
        line.clear();
    }
    if let Some(n) = args.last {
        let skip = flows.len().saturating_sub(n);
        flows.drain(..skip);
    }
    print(&flows, args.output, true)?;
    if !args.follow {
        return Ok(());
    }
    let mut pos = reader.stream_position()?;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let mut f = std::fs::File::open(&args.flow_log)?;
        let len = f.metadata()?.len();
        if len < pos {
            pos = 0; // rotated or truncated
        }
        f.seek(SeekFrom::Start(pos))?;
        let mut r = BufReader::new(f);
        let mut batch = Vec::new();
        loop {
            line.clear();
            let n = r.read_line(&mut line)?;
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            pos += n as u64;
            if let Ok(fl) = serde_json::from_str::<Flow>(&line)
                && args.matches(&fl)
            {
                batch.push(fl);
            }
        }
        print(&batch, args.output, false)?;
    }
}
