//! `ztrust-agent`: the node agent and its command line.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use ztrust_agent::{agent, cli_flows, datapath, status, telemetry};

#[derive(Parser)]
#[command(
    name = "ztrust-agent",
    version,
    about = "eBPF zero-trust enforcement and flow observer for Kubernetes"
)]
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
        /// Also ask the running agent for its observer counters (flows seen and lost, API clients).
        #[arg(long)]
        observer: bool,
        #[command(flatten)]
        connect: cli_flows::Connect,
    },
    /// Show flows the agent observed (from its flow API; `--flow-log FILE` reads a flow log instead).
    Flows(cli_flows::FlowsArgs),
    /// Show lateral-movement alerts raised by the agent's detector.
    Alerts(cli_flows::AlertsArgs),
    /// Find the NetworkPolicy traps in a directory of manifests or the live cluster (`--kube`): each
    /// finding with a stable code, the object and field, why it matters and the fix. Exit status: 0 none
    /// at or above `--fail-on`, 1 some, 2 the manifests or the cluster could not be read.
    Lint(LintArgs),
    /// The verdict a new connection gets, and why, at each hook that judges it (the source's egress, the
    /// destination's ingress): the policies that isolate each end, the rule that allows it or why none
    /// does, from the agent's compiled state and checked against the live kernel maps. Exit status: 0 it
    /// goes through, 1 it is dropped, 2 an error, 3 the kernel maps differ from the agent's state.
    Explain(ztrust_agent::cli_explain::ExplainArgs),
    /// Replays recorded flows (the agent's, or a flow log) against the cluster's policies and against them
    /// with a draft (NetworkPolicies added or changed by `-f`, removed by `--delete`): the connections
    /// whose verdict the draft changes. Nothing is applied. Exit status: 0 the draft drops no recorded
    /// connection that goes through now, 1 it does, 2 an error.
    WhatIf(WhatIfArgs),
    /// Least-privilege NetworkPolicies for a namespace from its recorded connections (allowed and
    /// would-drop; dropped ones stay out), as YAML on stdout: a default deny, DNS, and one policy per
    /// workload with its peers by labels. Check it with `what-if -f` and `lint` before applying.
    Suggest(SuggestArgs),
}

#[derive(clap::Args)]
struct WhatIfArgs {
    /// The draft: a file or directory of NetworkPolicies (one of the cluster's, by namespace and name, is
    /// replaced; any other is added).
    #[arg(short = 'f', long = "filename", required_unless_present = "delete")]
    draft: Option<PathBuf>,
    /// A NetworkPolicy (namespace/name) the draft deletes; repeatable.
    #[arg(long)]
    delete: Vec<ztrust_agent::model::ObjectRef>,
    #[command(flatten)]
    recorded: Recorded,
    #[arg(short, long, value_enum, default_value_t = cli_flows::Output::Table)]
    output: cli_flows::Output,
}

#[derive(clap::Args)]
struct SuggestArgs {
    /// The namespace to write policies for.
    #[arg(long, short = 'n')]
    namespace: String,
    #[command(flatten)]
    recorded: Recorded,
}

/// The cluster and the recorded flows `what-if` and `suggest` read.
#[derive(clap::Args)]
struct Recorded {
    /// The cluster as it is: a directory of manifests (as `run --source dir:`) …
    #[arg(long, conflicts_with = "kube", required_unless_present = "kube")]
    manifests: Option<PathBuf>,
    /// … or the live cluster (the Kubernetes API: in a pod its service account, else `--kubeconfig`).
    #[arg(long)]
    kube: bool,
    #[arg(long, requires = "kube")]
    kubeconfig: Option<PathBuf>,
    /// The node's addresses (as `run --node-ip`): their traffic into pods is the node's, always let in.
    #[arg(long, value_delimiter = ',')]
    node_ip: Vec<std::net::IpAddr>,
    /// Only flows since this long ago (`1h`) or this time (RFC 3339); default every flow there is.
    #[arg(long)]
    since: Option<String>,
    /// Read the flows from this flow log (`run --flow-log`) instead of the agent.
    #[arg(long)]
    flow_log: Option<PathBuf>,
    #[command(flatten)]
    connect: cli_flows::Connect,
}

/// `--otlp-metrics-interval`: a duration of at least a second.
fn metrics_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s}: {e}"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s}: at least 1s"));
    }
    Ok(d)
}

/// Says `e` and exits with status 2.
fn fail(e: anyhow::Error) -> ! {
    eprintln!("error: {e:#}");
    std::process::exit(2)
}

impl Recorded {
    /// The cluster (its objects' problems said as warnings) and the flows; exits with status 2 when
    /// either cannot be read.
    fn load(&self) -> (ztrust_agent::model::Cluster, Vec<ztrust_agent::flows::Flow>) {
        let (mut cluster, errors) = match &self.manifests {
            Some(dir) => {
                let loaded = ztrust_agent::source::dir::load_dir(dir)
                    .with_context(|| format!("reading {}", dir.display()))
                    .unwrap_or_else(|e| fail(e));
                (loaded.cluster, loaded.errors)
            }
            None => lint_kube(self.kubeconfig.as_deref()).unwrap_or_else(|e| fail(e)),
        };
        for e in &errors {
            eprintln!("warning: {e}");
        }
        cluster.node_ips.extend(self.node_ip.iter().copied());
        let flows = cli_flows::recorded_flows(&self.connect, self.flow_log.as_deref(), self.since.as_deref())
            .context("reading the recorded flows")
            .unwrap_or_else(|e| fail(e));
        (cluster, flows)
    }
}

#[derive(clap::Args)]
struct LintArgs {
    /// A directory (or file) of manifests: Namespaces, Pods, NetworkPolicies, Services.
    #[arg(required_unless_present = "kube", conflicts_with = "kube")]
    path: Option<PathBuf>,
    /// The live cluster (the Kubernetes API: in a pod its service account, else `--kubeconfig`,
    /// $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kube: bool,
    #[arg(long, requires = "kube")]
    kubeconfig: Option<PathBuf>,
    #[arg(short, long, value_enum, default_value_t = cli_flows::Output::Table)]
    output: cli_flows::Output,
    /// The lowest level that makes the exit status 1.
    #[arg(long, value_enum, default_value_t = ztrust_agent::lint::Severity::Warning)]
    fail_on: ztrust_agent::lint::Severity,
    /// Say nothing of these namespaces' objects (comma-separated; `--exclude-namespace ''` for none):
    /// the cluster's own, where a default deny is not the application owner's to add.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kube-system,kube-public,kube-node-lease"
    )]
    exclude_namespace: Vec<String>,
    /// Leave out these checks (codes, comma-separated: `--skip ZT002,ZT008`).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Capacity of the policy map (allow entries of all local endpoints).
    #[arg(long, default_value_t = ztrust_common::capacity::POLICY)]
    policy_max: u32,
    /// Capacity of the conntrack table (LRU: the least recently used connection goes when full).
    #[arg(long, default_value_t = ztrust_common::capacity::CONNTRACK)]
    conntrack_max: u32,
    /// The packet mark bit (`skb->mark`, e.g. 0x1000) with which the interface of a pod sending on a TCP
    /// connection that both ends, pods of this node, have admitted tells the receiving pod's interface
    /// so: the connection is then judged once on the node instead of twice. One bit that nothing else on
    /// the node uses (the CNI, kube-proxy); 0 turns this off.
    #[arg(long, default_value_t = Mark(datapath::loader::DEFAULT_PEER_MARK), value_parser = parse_mark)]
    peer_mark: Mark,
    /// Where cluster state comes from: `kube` (the Kubernetes API: in a pod its service account, else
    /// `--kubeconfig`, $KUBECONFIG or ~/.kube/config) or `dir:<path>` (Namespace, Pod and NetworkPolicy
    /// YAML, re-read on change).
    #[arg(long, env = "ZTRUST_SOURCE")]
    source: Option<String>,
    /// Kubeconfig for `--source kube` outside a cluster (default: $KUBECONFIG, then ~/.kube/config, then
    /// the pod's service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
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
    /// Where a pod's connection to a node port is judged as a connection to the Service, as kube-proxy's
    /// `--nodeport-addresses` says where it translates node ports: `primary`, at the `--node-ip`
    /// addresses (kube-proxy's `primary`, its nftables-mode default, or a CIDR list: name the node's
    /// addresses in it with `--node-ip`); `all`, at every address of type `local` in the node's local
    /// routing table (kube-proxy in iptables mode without `--nodeport-addresses`).
    #[arg(long, value_enum, default_value_t = NodePortAddresses::Primary)]
    nodeport_addresses: NodePortAddresses,
    /// The cluster's Service address ranges (the API server's `--service-cluster-ip-range`, e.g.
    /// 10.96.0.0/12). A pod's connection to an address in them that is no Service the agent knows (yet) is
    /// dropped as `unknown-service` rather than judged as the address. Comma-separated; none by default.
    #[arg(long, value_delimiter = ',')]
    service_cidr: Vec<ipnet::IpNet>,
    /// How long a backend a Service frontend lost (an EndpointSlice change) still counts as one of its
    /// backends: the node's proxy may translate to it until its rules catch up (kube-proxy applies them
    /// at most once per `minSyncPeriod`, 1 s by default). A new connection whose verdict would differ
    /// between the backends that stay and the one that left is dropped as `service-backends-differ`
    /// meanwhile, rather than judged by the backends that stay. `0s`: none.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    service_grace: Duration,
    /// `audit`: drop nothing, report what enforcement would drop as `would-drop`.
    #[arg(long, value_enum, default_value_t = Mode::Enforce)]
    mode: Mode,
    /// Record new allowed connections too, not only drops.
    #[arg(long)]
    log_allowed: bool,
    /// At most one event per flow and this interval (milliseconds) for repeated drops.
    #[arg(long, default_value_t = 1000)]
    event_interval_ms: u64,
    /// At most this many flow events per pod interface and second (0: no limit), so that one pod's flood
    /// of distinct denied flows cannot crowd other pods' events out; the packets are still counted, the
    /// events left out too (`status`: events over budget).
    #[arg(long, default_value_t = 1000)]
    event_budget: u32,
    /// `deny`: a pod may not send packets that carry packets (IP in IP, GRE, VXLAN, Geneve), which a
    /// node would decapsulate and forward with whatever inner source the pod wrote (`encapsulated`).
    /// `allow`: judge them by policy like any other packet.
    #[arg(long, value_enum, default_value_t = PodTunnels::Deny)]
    pod_tunnels: PodTunnels,
    /// Append every flow as a JSON line to this file.
    #[arg(long)]
    flow_log: Option<PathBuf>,
    /// The loop runs at least this often (milliseconds); the source, interface and route announcements
    /// wake it between.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// Remove every pinned program, link and map this agent made, and exit.
    #[arg(long)]
    cleanup: bool,
    /// Unix socket of the flow API (mode 0600). `none` serves no socket.
    #[arg(long, env = "ZTRUST_SOCKET", default_value = ztrust_agent::observer::server::DEFAULT_SOCKET)]
    grpc_socket: PathBuf,
    /// Also serve the flow API on this TCP address, with mutual TLS (needs --tls-cert, --tls-key, --tls-client-ca).
    #[arg(long, requires_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    grpc_tcp: Option<SocketAddr>,
    /// Certificate chain (PEM) of the TCP flow API.
    #[arg(long, requires = "grpc_tcp")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the TCP flow API.
    #[arg(long, requires = "grpc_tcp")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to; clients without one are refused.
    #[arg(long, requires = "grpc_tcp")]
    tls_client_ca: Option<PathBuf>,
    /// Flows kept in memory for `flows` queries.
    #[arg(long, default_value_t = 65_536)]
    flow_buffer: usize,
    /// Flows queued per API client; a client further behind loses flows (and is told how many).
    #[arg(long, default_value_t = 4_096)]
    client_queue: usize,
    /// Address of the Prometheus `/metrics` endpoint. `none` serves no metrics.
    #[arg(long, default_value = "0.0.0.0:9965")]
    metrics_addr: String,
    /// Add a `pod` label to the per-flow metrics (cardinality grows with pod churn).
    #[arg(long)]
    metrics_pod_label: bool,
    /// Export every flow as an OpenTelemetry log record over OTLP/gRPC to this collector
    /// (`http://collector:4317`). Its queue is --client-queue flows; what does not fit while the collector
    /// is slow or down is counted as lost (`status`, `ztrust_otlp_flows_lost_total`).
    #[arg(long, value_name = "URL", value_parser = ztrust_agent::otlp::parse_endpoint)]
    otlp_endpoint: Option<String>,
    /// How often the packet counters are pushed to --otlp-endpoint as OTLP metrics.
    #[arg(long, default_value = "10s", value_parser = metrics_interval, requires = "otlp_endpoint")]
    otlp_metrics_interval: Duration,
    /// Do not run the lateral-movement detector.
    #[arg(long)]
    no_detector: bool,
    /// Detector: distinct denied destinations (address, port) from one source within --scan-window that
    /// make a scan alert.
    #[arg(long, default_value_t = 10)]
    scan_threshold: usize,
    /// Detector: the sliding window of --scan-threshold, and the minimum time between two alerts of one
    /// kind for one source (`10s`, `1m`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    scan_window: Duration,
    /// Detector: label selector of the sensitive tier; a denied flow towards it raises an alert.
    /// Repeatable; `none` for no sensitive tier.
    #[arg(long, default_values_t = ["tier=database".to_owned()])]
    sensitive_selector: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Enforce,
    Audit,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum NodePortAddresses {
    Primary,
    All,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PodTunnels {
    Deny,
    Allow,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(matches!(cli.log_format, LogFormat::Json));
    match cli.command {
        Command::Run(args) => run(args),
        Command::Status {
            pin_path,
            output,
            observer,
            connect,
        } => {
            let st = status::read(&pin_path).with_context(|| {
                format!(
                    "reading pinned maps under {} (is the agent installed on this node?)",
                    pin_path.display()
                )
            })?;
            match output {
                cli_flows::Output::Json | cli_flows::Output::Jsonl => {
                    println!("{}", serde_json::to_string_pretty(&st)?)
                }
                _ => print!("{}", status::render(&st)),
            }
            if observer {
                let server = cli_flows::server_status(&connect)?;
                match output {
                    cli_flows::Output::Json | cli_flows::Output::Jsonl => {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&cli_flows::server_status_json(&server))?
                        )
                    }
                    _ => print!("\n{}", cli_flows::render_server_status(&server)),
                }
            }
            Ok(())
        }
        Command::Flows(args) => Ok(cli_flows::run(&args)?),
        Command::Alerts(args) => Ok(cli_flows::run_alerts(&args)?),
        Command::Lint(args) => lint(args),
        Command::WhatIf(args) => what_if(args),
        Command::Suggest(args) => suggest(args),
        Command::Explain(args) => match ztrust_agent::cli_explain::run(&args) {
            Ok(outcome) => std::process::exit(outcome.exit_code()),
            Err(e) => {
                eprintln!("error: {:#}", anyhow::Error::from(e));
                std::process::exit(2)
            }
        },
    }
}

fn lint(args: LintArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    use ztrust_agent::lint;
    let loaded = match &args.path {
        Some(path) => lint::load_dir(path).with_context(|| format!("reading {}", path.display())),
        None => lint_kube(args.kubeconfig.as_deref()),
    };
    let (cluster, errors) = loaded.unwrap_or_else(|e| fail(e));
    if let Some(unknown) = args
        .skip
        .iter()
        .find(|c| !lint::CHECKS.iter().any(|k| k.code == c.as_str()))
    {
        let codes: Vec<&str> = lint::CHECKS.iter().map(|c| c.code).collect();
        fail(anyhow::anyhow!(
            "--skip {unknown}: no such check (the codes: {})",
            codes.join(", ")
        ));
    }
    // An empty name (`--exclude-namespace ''`) excludes nothing: findings of no namespace (a manifest
    // that is no YAML) are always said.
    let excluded: Vec<&String> = args.exclude_namespace.iter().filter(|n| !n.is_empty()).collect();
    let findings: Vec<lint::Finding> = lint::lint(&cluster, &errors)
        .into_iter()
        .filter(|f| !excluded.contains(&&f.namespace) && !args.skip.iter().any(|c| c == f.code))
        .collect();
    let text = match args.output {
        cli_flows::Output::Json => serde_json::to_string_pretty(&findings).map(|t| t + "\n"),
        cli_flows::Output::Jsonl => findings
            .iter()
            .map(|f| serde_json::to_string(f).map(|t| t + "\n"))
            .collect(),
        _ => Ok(lint::render(&findings)),
    }
    .unwrap_or_else(|e| fail(e.into()));
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => {}
        // A reader that stopped early (`| head`) has what it wanted; the status still says.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => fail(anyhow::Error::from(e).context("writing the findings")),
    }
    if findings.iter().any(|f| f.severity >= args.fail_on) {
        std::process::exit(1);
    }
    Ok(())
}

fn what_if(args: WhatIfArgs) -> anyhow::Result<()> {
    use ztrust_agent::whatif;
    let (cluster, flows) = args.recorded.load();
    let (after, summary) =
        whatif::apply_draft(&cluster, args.draft.as_deref(), &args.delete).unwrap_or_else(|e| fail(e.into()));
    let replay = whatif::replay(&cluster, &after, summary, &flows);
    match args.output {
        cli_flows::Output::Json | cli_flows::Output::Jsonl => {
            println!("{}", serde_json::to_string_pretty(&replay)?)
        }
        _ => print!("{}", whatif::render(&replay)),
    }
    std::process::exit(i32::from(replay.newly_dropped() > 0))
}

fn suggest(args: SuggestArgs) -> anyhow::Result<()> {
    let (cluster, flows) = args.recorded.load();
    if !cluster.namespaces.contains_key(&args.namespace)
        && !cluster.pods.values().any(|p| p.namespace == args.namespace)
    {
        fail(anyhow::anyhow!(
            "--namespace {}: the cluster has no such namespace",
            args.namespace
        ));
    }
    let s = ztrust_agent::suggest::suggest(&cluster, &args.namespace, &flows);
    print!("{}", s.to_yaml(&args.namespace)?);
    if s.connections == 0 {
        eprintln!(
            "warning: no recorded connection of {} to learn from (the agent records allowed connections with \
             `run --log-allowed`): only the default deny and DNS are written",
            args.namespace
        );
    }
    Ok(())
}

/// The cluster as the API server has it (one whole snapshot of every watched kind).
fn lint_kube(
    kubeconfig: Option<&std::path::Path>,
) -> anyhow::Result<(ztrust_agent::model::Cluster, Vec<ztrust_agent::source::LoadError>)> {
    use ztrust_agent::source::kube::{KubeSource, Options};
    const WAIT: Duration = Duration::from_secs(30);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = ztrust_agent::source::kube::client(kubeconfig)
            .await
            .context("connecting to the Kubernetes API")?;
        let options = Options {
            events: false,
            ..Options::default()
        };
        let mut source = KubeSource::start_with(client, options);
        // Resolves with the first whole snapshot (every kind listed), taken once.
        match tokio::time::timeout(WAIT, source.changed()).await {
            Ok(loaded) => Ok((loaded.cluster, loaded.errors)),
            Err(_) => anyhow::bail!(
                "no whole snapshot of the cluster within {} s (can this kubeconfig list namespaces, pods, \
                 networkpolicies, services and endpointslices?)",
                WAIT.as_secs()
            ),
        }
    })
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.cleanup {
        datapath::loader::cleanup(&args.pin_path)
            .with_context(|| format!("removing {}", args.pin_path.display()))?;
        eprintln!("removed every pin under {}", args.pin_path.display());
        return Ok(());
    }
    let source = args
        .source
        .context("--source is required (e.g. --source dir:/etc/ztrust/manifests)")?;
    let none = |s: &str| s.is_empty() || s == "none";
    let grpc_tcp = match (args.grpc_tcp, args.tls_cert, args.tls_key, args.tls_client_ca) {
        (Some(addr), Some(cert), Some(key), Some(client_ca)) => {
            Some((addr, ztrust_agent::observer::TlsFiles { cert, key, client_ca }))
        }
        _ => None,
    };
    let observer = ztrust_agent::observer::tasks::ObserverOptions {
        grpc_socket: (!none(&args.grpc_socket.to_string_lossy())).then_some(args.grpc_socket),
        grpc_tcp,
        metrics_addr: if none(&args.metrics_addr) {
            None
        } else {
            Some(
                args.metrics_addr
                    .parse()
                    .with_context(|| format!("--metrics-addr {}", args.metrics_addr))?,
            )
        },
        detector: (!args.no_detector).then(|| ztrust_agent::detector::DetectorOptions {
            scan_threshold: args.scan_threshold,
            window: args.scan_window,
            sensitive: args.sensitive_selector.into_iter().filter(|s| !none(s)).collect(),
            ..Default::default()
        }),
        otlp: args
            .otlp_endpoint
            .map(|endpoint| ztrust_agent::otlp::OtlpOptions {
                endpoint,
                node: args.node_name.clone(),
                metrics_interval: args.otlp_metrics_interval,
            }),
        ..Default::default()
    };
    let opts = agent::Options {
        source: match source.parse()? {
            agent::Source::Kube { .. } => agent::Source::Kube {
                kubeconfig: args.kubeconfig,
            },
            other => other,
        },
        pin_dir: args.pin_path,
        interface_prefixes: args.interface_prefix,
        node_name: args.node_name,
        node_ips: args.node_ip,
        node_ports_any_local: args.nodeport_addresses == NodePortAddresses::All,
        service_cidrs: args.service_cidr,
        service_grace: args.service_grace,
        audit: args.mode == Mode::Audit,
        log_allowed: args.log_allowed,
        event_interval: Duration::from_millis(args.event_interval_ms),
        event_budget: args.event_budget,
        pod_tunnels: args.pod_tunnels == PodTunnels::Allow,
        flow_log: args.flow_log,
        poll: Duration::from_millis(args.poll_ms),
        peer_mark: args.peer_mark.0,
        capacities: datapath::loader::Capacities {
            policy: args.policy_max,
            conntrack: args.conntrack_max,
            ..Default::default()
        },
        flow_buffer: args.flow_buffer,
        client_queue: args.client_queue,
        metrics_pod_label: args.metrics_pod_label,
        observer,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    Ok(rt.block_on(agent::run(opts))?)
}

/// A packet mark, shown in hexadecimal (`--help`'s default reads `0x1000`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mark(u32);

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A mark bit: decimal or 0x-hexadecimal, at most one bit set.
fn parse_mark(s: &str) -> Result<Mark, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?} is not a 32-bit number: {e}"))?;
    if v.count_ones() > 1 {
        return Err(format!(
            "{s} sets {} bits; the peer mark is one bit (or 0: off)",
            v.count_ones()
        ));
    }
    Ok(Mark(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_mark_is_one_bit_and_shown_in_hex() {
        assert_eq!(parse_mark("0x1000"), Ok(Mark(0x1000)));
        assert_eq!(parse_mark("4096"), Ok(Mark(0x1000)));
        assert_eq!(parse_mark("0"), Ok(Mark(0)));
        assert!(parse_mark("0x3").unwrap_err().contains("sets 2 bits"));
        assert!(parse_mark("mark").is_err());
        assert_eq!(Mark(datapath::loader::DEFAULT_PEER_MARK).to_string(), "0x1000");
        let args = Cli::try_parse_from(["ztrust-agent", "run", "--source", "dir:/x"]).unwrap();
        let Command::Run(run) = args.command else {
            panic!("run");
        };
        assert_eq!(run.peer_mark, Mark(datapath::loader::DEFAULT_PEER_MARK));
    }
}
