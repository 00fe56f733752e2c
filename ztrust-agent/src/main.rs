//! `ztrust-agent`: the node agent and its command line.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use ztrust_agent::{agent, cli_flows, datapath, lab, status, telemetry};

#[derive(Parser)]
#[command(name = "ztrust-agent", version, about = "eBPF zero-trust enforcement and flow observer for Kubernetes")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: watch the source, compile policies, keep the kernel maps in sync, report flows.
    Run(RunArgs),
    /// What the kernel enforces on this node (read from the pinned maps; works without a running agent).
    Status {
        #[arg(long, default_value = datapath::loader::DEFAULT_PIN_DIR)]
        pin_path: PathBuf,
        #[arg(short, long, value_enum, default_value_t = cli_flows::Output::Table)]
        output: cli_flows::Output,
    },
    /// Show flows from the agent's flow log.
    Flows(cli_flows::FlowsArgs),
    /// A Kubernetes node made of network namespaces, to try policies on.
    #[command(subcommand)]
    Lab(lab::cli::LabCommand),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Where cluster state comes from: `dir:<path>` (Namespace, Pod and NetworkPolicy YAML, re-read on change).
    #[arg(long, env = "ZTRUST_SOURCE")]
    source: Option<String>,
    /// bpffs directory of the pinned maps and links.
    #[arg(long, default_value = datapath::loader::DEFAULT_PIN_DIR)]
    pin_path: PathBuf,
    /// Attach to interfaces with these name prefixes as soon as they appear (fail closed until their pod
    /// is known). Comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "cali,lxc,ztl")]
    interface_prefix: Vec<String>,
    /// This node's name, for flows.
    #[arg(long, env = "NODE_NAME", default_value = "local")]
    node_name: String,
    /// This node's addresses (traffic from them is never blocked, as Kubernetes requires). Comma-separated.
    #[arg(long, value_delimiter = ',')]
    node_ip: Vec<IpAddr>,
    /// `audit`: drop nothing, report what enforcement would drop as `would-drop`.
    #[arg(long, value_enum, default_value_t = Mode::Enforce)]
    mode: Mode,
    /// Record new allowed connections too, not only drops.
    #[arg(long)]
    log_allowed: bool,
    /// At most one event per flow and this interval (milliseconds) for repeated drops.
    #[arg(long, default_value_t = 1000)]
    event_interval_ms: u64,
    /// Append every flow as a JSON line to this file.
    #[arg(long)]
    flow_log: Option<PathBuf>,
    /// How often the source and interfaces are checked (milliseconds).
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// Remove every pinned program, link and map this agent made, and exit.
    #[arg(long)]
    cleanup: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Enforce,
    Audit,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(matches!(cli.log_format, LogFormat::Json));
    match cli.command {
        Command::Run(args) => run(args),
        Command::Status { pin_path, output } => {
            let st = status::read(&pin_path).with_context(|| {
                format!("reading pinned maps under {} (is the agent installed on this node?)", pin_path.display())
            })?;
            match output {
                cli_flows::Output::Json | cli_flows::Output::Jsonl => println!("{}", serde_json::to_string_pretty(&st)?),
                _ => print!("{}", status::render(&st)),
            }
            Ok(())
        }
        Command::Flows(args) => cli_flows::run(&args),
        Command::Lab(cmd) => lab::cli::run(cmd),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.cleanup {
        datapath::loader::cleanup(&args.pin_path)
            .with_context(|| format!("removing {}", args.pin_path.display()))?;
        eprintln!("removed every pin under {}", args.pin_path.display());
        return Ok(());
    }
    let source = args.source.context("--source is required (e.g. --source dir:/etc/ztrust/manifests)")?;
    let opts = agent::Options {
        source: source.parse()?,
        pin_dir: args.pin_path,
        interface_prefixes: args.interface_prefix,
        node_name: args.node_name,
        node_ips: args.node_ip,
        audit: args.mode == Mode::Audit,
        log_allowed: args.log_allowed,
        event_interval: Duration::from_millis(args.event_interval_ms),
        flow_log: args.flow_log,
        poll: Duration::from_millis(args.poll_ms),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(agent::run(opts))
}
