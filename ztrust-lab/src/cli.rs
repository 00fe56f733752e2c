//! `ztrust-lab …`: the lab's command line.

use std::path::PathBuf;
use std::time::Duration;

use super::probe::parse_protocol;
use super::{
    AgentSpec, ApplyOptions, DEFAULT_EXT_IF_PREFIX, DEFAULT_IF_PREFIX, DEFAULT_PREFIX, DEFAULT_STATE_DIR,
    DownOptions, Family, LabelChange, LabelKind, ProbeOptions, ProxyMode, ServeArgs, UpOptions,
};

#[derive(Clone, Debug, clap::Args)]
pub struct StateDir {
    /// The lab's state directory (`state.json`, `manifests/` for the agent's `dir:` source, server logs).
    #[arg(long, env = "ZTRUST_LAB_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, clap::Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing would only obscure clap's derive"
)]
pub enum LabCommand {
    /// Build the node, a network namespace per pod and external host, and a server on every container
    /// port. Anything an earlier lab left is removed first.
    Up {
        /// A manifest file or directory (Namespace, Pod, NetworkPolicy, lab.ztrust.io/v1 ExternalHost).
        manifests: PathBuf,
        #[command(flatten)]
        state: StateDir,
        /// Network namespaces are `<prefix>-node`, `<prefix>-p<N>`, `<prefix>-x<N>`.
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
        /// Node-side interface of pod N: `<if-prefix><N>`.
        #[arg(long, default_value = DEFAULT_IF_PREFIX)]
        if_prefix: String,
        /// Node-side interface of external host N.
        #[arg(long, default_value = DEFAULT_EXT_IF_PREFIX)]
        ext_if_prefix: String,
        /// Do not start an agent in the node (no enforcement: everything reaches everything).
        #[arg(long)]
        no_agent: bool,
        /// The `ztrust-agent` binary that enforces (default: the one beside this binary).
        #[arg(long, env = "ZTRUST_AGENT_BIN")]
        agent_bin: Option<PathBuf>,
        /// The agent's bpffs pin directory (default `/sys/fs/bpf/ztrust-lab-<prefix>`; other nodes' end in
        /// `-node2`, …).
        #[arg(long)]
        pin_path: Option<PathBuf>,
        /// An extra argument for `ztrust-agent run` (repeatable: `--agent-arg=--mode --agent-arg=audit`).
        #[arg(long, allow_hyphen_values = true)]
        agent_arg: Vec<String>,
        /// How the nodes translate Services: the kube-proxy mode the lab plays.
        #[arg(long, value_enum, default_value_t = ProxyMode::Nftables)]
        proxy_mode: ProxyMode,
        /// How many nodes (1 to 16), each with its own agent and pod block, routed to each other. Pods go
        /// where `spec.nodeName` says (`<prefix>-node`, `<prefix>-node2`, …), else to the nodes in turn.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
    },
    /// Remove everything the lab made (works without state.json too).
    Down {
        #[command(flatten)]
        state: StateDir,
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Add or change objects in the running lab (a file or a directory).
    Apply {
        path: PathBuf,
        #[command(flatten)]
        state: StateDir,
    },
    /// Remove the objects named in a file or directory from the running lab.
    Delete {
        path: PathBuf,
        #[command(flatten)]
        state: StateDir,
    },
    /// Set (`key=value`) or remove (`key-`) labels of a pod (`namespace/name`) or namespace.
    Label {
        #[arg(value_enum)]
        kind: LabelKind,
        target: String,
        #[arg(required = true)]
        changes: Vec<String>,
        #[command(flatten)]
        state: StateDir,
    },
    /// Every pod tries every pod and external host on each port: what is allowed, what is denied.
    Probe {
        #[command(flatten)]
        state: StateDir,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Probe these ports instead of each target's container ports.
        #[arg(long, value_delimiter = ',')]
        ports: Option<Vec<u16>>,
        /// Only these protocols (tcp, udp, sctp); with --ports the default is tcp.
        #[arg(long, value_delimiter = ',')]
        protocols: Option<Vec<String>>,
        /// 4, 6 or both.
        #[arg(long, default_value = "4")]
        family: String,
        /// Timeout of a TCP connect or a UDP reply, in milliseconds.
        #[arg(long, default_value_t = 500)]
        timeout_ms: u64,
        /// Only from these pods (namespace/name).
        #[arg(long, value_delimiter = ',')]
        from: Vec<String>,
        /// Only to these pods (namespace/name) or external hosts (external/<name>); with --via-service,
        /// these Services (namespace/name) or the pods behind them.
        #[arg(long, value_delimiter = ',')]
        to: Vec<String>,
        /// Reach pods through the lab's Services (every cluster IP and port, translated by the node as
        /// kube-proxy does) instead of by their own addresses; each answer names the pod that replied.
        #[arg(long)]
        via_service: bool,
    },
    /// The lab's pods (namespace, labels, addresses, node-side interface) and external hosts.
    Status {
        #[command(flatten)]
        state: StateDir,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Also each node agent's drop counters and attached interfaces (from its pinned maps).
        #[arg(long)]
        counters: bool,
    },
    /// Flows seen by the lab's agents, every node's in time order with the node that judged them (their
    /// flow API sockets, or one flow log with `--flow-log`).
    Flows {
        #[command(flatten)]
        state: StateDir,
        /// Only this node's agent.
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        flows: ztrust_agent::cli_flows::FlowsArgs,
    },
    /// The verdict a new connection gets and why, at each hook (`ztrust-agent explain`, asked of the agent
    /// of the source's node and, when the destination is a pod of another node, of that node's too).
    /// Exit status: 0 it goes through, 1 it is dropped, 2 an error, 3 the kernel maps differ.
    Explain {
        #[command(flatten)]
        state: StateDir,
        /// Ask only this node's agent (with `--flow ID` in a lab of several nodes, required: the node
        /// whose agent numbered the flow).
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        explain: ztrust_agent::cli_explain::ExplainArgs,
    },
    /// The lab agent's recorded flows replayed against the lab's policies and against them with a draft
    /// (`ztrust-agent what-if`): which connections change verdict. Nothing is applied. Exit status: 0 the
    /// draft drops no recorded connection that goes through now, 1 it does, 2 an error.
    WhatIf {
        #[command(flatten)]
        state: StateDir,
        /// NetworkPolicies (a file or directory) the draft adds or changes.
        #[arg(short = 'f', long = "filename", required_unless_present = "delete")]
        draft: Option<std::path::PathBuf>,
        /// A NetworkPolicy (namespace/name) the draft deletes; repeatable.
        #[arg(long)]
        delete: Vec<ztrust_agent::model::ObjectRef>,
        /// Only flows since this long ago (`10m`) or this time.
        #[arg(long)]
        since: Option<String>,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Least-privilege NetworkPolicies for a namespace from the lab agent's recorded connections
    /// (`ztrust-agent suggest`), as YAML on stdout.
    Suggest {
        #[command(flatten)]
        state: StateDir,
        #[arg(long, short = 'n')]
        namespace: String,
        /// Only flows since this long ago (`10m`) or this time.
        #[arg(long)]
        since: Option<String>,
    },
    /// (internal) The server the lab runs in every pod and external host.
    #[command(hide = true)]
    Serve(ServeArgs),
}

/// What a `lab` command can fail with: the lab's own errors, said with what the command was doing.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{doing}")]
    Doing {
        doing: String,
        #[source]
        source: super::Error,
    },
    #[error(transparent)]
    Lab(#[from] super::Error),
    #[error("a flow's ID is its node's agent's: say which node with --node")]
    FlowNeedsNode,
    #[error("the lab has no node {node} (its nodes: {nodes})")]
    NoNode { node: String, nodes: String },
    #[error("this lab runs no agent (it was brought up with --no-agent)")]
    NoAgent,
    #[error("reading the lab agent's pinned maps in {}", .pin_dir.display())]
    Maps {
        pin_dir: std::path::PathBuf,
        #[source]
        source: ztrust_agent::datapath::loader::Error,
    },
    #[error(transparent)]
    Flows(#[from] ztrust_agent::cli_flows::Error),
    #[error(transparent)]
    Explain(#[from] ztrust_agent::cli_explain::Error),
    #[error("reading the lab's manifests in {}", .path.display())]
    Manifests {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Draft(#[from] ztrust_agent::whatif::DraftError),
    /// The explanation was printed; the exit status says what it found.
    #[error("the connection is {0}")]
    Explained(&'static str, i32),
    #[error("encoding JSON")]
    Json(#[from] serde_json::Error),
    #[error("encoding YAML")]
    Yaml(#[from] serde_yaml::Error),
}

/// [`CliError::Doing`]: the error, with what was being done.
fn doing(what: impl FnOnce() -> String) -> impl FnOnce(super::Error) -> CliError {
    move |source| CliError::Doing {
        doing: what(),
        source,
    }
}

/// The lab's cluster (its manifests, its node's addresses) and its agent's recorded flows.
fn recorded(
    state: &StateDir,
    since: Option<&str>,
) -> Result<(ztrust_agent::model::Cluster, Vec<ztrust_agent::flows::Flow>), CliError> {
    let s = super::status(&state.state_dir)?;
    let sockets = sockets(&s, None)?;
    let manifests = state.state_dir.join("manifests");
    let mut cluster = ztrust_agent::source::dir::load_dir(&manifests)
        .map_err(|source| CliError::Manifests {
            path: manifests.clone(),
            source,
        })?
        .cluster;
    cluster.node_ips = s.all_node_ips();
    let mut flows = Vec::new();
    for connect in &sockets {
        flows.extend(ztrust_agent::cli_flows::recorded_flows(connect, None, since)?);
    }
    flows.sort_by_key(|f| f.time);
    Ok((cluster, flows))
}

/// `explain`'s outcome as the command's.
fn explained(o: ztrust_agent::cli_explain::Outcome) -> Result<(), CliError> {
    use ztrust_agent::cli_explain::Outcome;
    match o {
        Outcome::Passes => Ok(()),
        Outcome::Dropped => Err(CliError::Explained("dropped", o.exit_code())),
        Outcome::Inconsistent => Err(CliError::Explained(
            "judged differently by the kernel maps and the agent",
            o.exit_code(),
        )),
    }
}

/// The node of the pod `end` names (`ns/name`, an address, either with `:PORT[/PROTO]`), if it is one.
fn node_of_end(s: &crate::LabState, end: &str) -> Option<String> {
    let bare = if let Some(v6) = end.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6)
    } else if end.parse::<std::net::IpAddr>().is_ok() {
        end
    } else {
        end.rsplit_once(':').map_or(end, |(e, _)| e)
    };
    let pod = match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => s.pods.iter().find(|p| !p.host_network && p.ips.contains(&ip)),
        Err(_) => s.pod(bare),
    };
    pod.map(|p| p.node.clone())
}

/// How to reach the flow API of each node's agent (only `node`'s, if given).
fn sockets(
    s: &crate::LabState,
    node: Option<&str>,
) -> Result<Vec<ztrust_agent::cli_flows::Connect>, CliError> {
    if let Some(n) = node
        && s.node(n).is_none()
    {
        return Err(CliError::NoNode {
            node: n.to_owned(),
            nodes: s.node_names(),
        });
    }
    let out: Vec<_> = s
        .agents()
        .filter(|(n, _)| node.is_none_or(|want| n.name == want))
        .map(|(_, a)| ztrust_agent::cli_flows::Connect {
            socket: a.socket.clone(),
            server: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_server_name: None,
        })
        .collect();
    if out.is_empty() {
        return Err(CliError::NoAgent);
    }
    Ok(out)
}

pub fn run(cmd: LabCommand) -> Result<(), CliError> {
    match cmd {
        LabCommand::Up {
            manifests,
            state,
            prefix,
            if_prefix,
            ext_if_prefix,
            no_agent,
            agent_bin,
            pin_path,
            agent_arg,
            proxy_mode,
            nodes,
        } => {
            let agent = (!no_agent).then(|| AgentSpec {
                bin: agent_bin,
                pin_dir: pin_path,
                extra_args: agent_arg,
                ..Default::default()
            });
            let report = super::up(
                &manifests,
                UpOptions {
                    state_dir: state.state_dir,
                    prefix,
                    if_prefix,
                    ext_if_prefix,
                    agent,
                    proxy_mode,
                    nodes,
                    ..Default::default()
                },
            )
            .map_err(doing(|| {
                format!(
                    "bringing the lab up from {}{}",
                    manifests.display(),
                    if no_agent {
                        ""
                    } else {
                        " (--no-agent runs it without enforcement)"
                    }
                )
            }))?;
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", super::render_status(&report.state));
        }
        LabCommand::Down { state, prefix } => {
            let r = super::down(&DownOptions {
                state_dir: state.state_dir,
                prefix,
            })?;
            eprintln!(
                "stopped {} servers{}, removed {} network namespaces",
                r.killed.len(),
                match r.agent_killed.len() {
                    0 => String::new(),
                    1 => " and the agent".to_owned(),
                    n => format!(" and {n} agents"),
                },
                r.netns_deleted.len()
            );
        }
        LabCommand::Apply { path, state } => {
            let r = super::apply(
                &path,
                ApplyOptions {
                    state_dir: state.state_dir,
                    ..Default::default()
                },
            )
            .map_err(doing(|| format!("applying {}", path.display())))?;
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            for c in &r.changed {
                println!("{c} applied");
            }
        }
        LabCommand::Delete { path, state } => {
            let r = super::delete(&path, &state.state_dir)
                .map_err(doing(|| format!("deleting {}", path.display())))?;
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            for c in &r.changed {
                println!("{c} deleted");
            }
        }
        LabCommand::Label {
            kind,
            target,
            changes,
            state,
        } => {
            let changes = changes
                .iter()
                .map(|c| c.parse::<LabelChange>())
                .collect::<Result<Vec<_>, _>>()?;
            super::label(&state.state_dir, kind, &target, &changes)?;
            println!("{target} labeled");
        }
        LabCommand::Probe {
            state,
            output,
            ports,
            protocols,
            family,
            timeout_ms,
            from,
            to,
            via_service,
        } => {
            let protocols = protocols
                .map(|ps| {
                    ps.iter()
                        .map(|p| parse_protocol(p))
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?;
            let opts = ProbeOptions {
                ports,
                protocols,
                family: family.parse::<Family>()?,
                timeout: Duration::from_millis(timeout_ms),
                from,
                to,
                via_service,
                ..Default::default()
            };
            let m = super::probe(&state.state_dir, &opts)?;
            match output {
                Output::Table => print!("{}", m.render_table()),
                Output::Json => println!("{}", serde_json::to_string_pretty(&m.to_json())?),
            }
        }
        LabCommand::Status {
            state,
            output,
            counters,
        } => {
            let s = super::status(&state.state_dir)?;
            if counters && s.agents().next().is_none() {
                return Err(CliError::NoAgent);
            }
            // Each node's kernel state, the pod behind each interface named.
            let mut kernel = Vec::new();
            for (n, a) in s.agents().filter(|_| counters) {
                let mut k = ztrust_agent::status::read_in_netns(&a.pin_dir, &n.name).map_err(|source| {
                    CliError::Maps {
                        pin_dir: a.pin_dir.clone(),
                        source,
                    }
                })?;
                let pods: std::collections::BTreeMap<&str, String> = s
                    .pods
                    .iter()
                    .filter(|p| p.node == n.name)
                    .filter_map(|p| p.host_if.as_deref().map(|i| (i, p.key())))
                    .collect();
                let name = |i: &mut String| {
                    if let Some(pod) = pods.get(i.as_str()) {
                        *i = format!("{i} {pod}");
                    }
                };
                k.endpoints.iter_mut().for_each(|e| name(&mut e.interface));
                k.counters.iter_mut().for_each(|c| name(&mut c.interface));
                kernel.push((n.name.clone(), k));
            }
            match output {
                Output::Table => {
                    print!("{}", super::render_status(&s));
                    for (node, k) in &kernel {
                        if s.nodes.len() > 1 {
                            print!("\nnode {node}:\n");
                        }
                        print!("\n{}", ztrust_agent::status::render(k));
                    }
                }
                Output::Json => {
                    let mut v = serde_json::to_value(&s)?;
                    // One node: `kernel`; several: `kernel.<node>`.
                    for (node, k) in &kernel {
                        if s.nodes.len() == 1 {
                            v["kernel"] = serde_json::to_value(k)?;
                        } else {
                            v["kernel"][node] = serde_json::to_value(k)?;
                        }
                    }
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
            }
        }
        LabCommand::Flows {
            state,
            node,
            mut flows,
        } => {
            let s = super::status(&state.state_dir)?;
            let sockets = sockets(&s, node.as_deref())?;
            if flows.connect.server.is_some() || flows.flow_log.is_some() {
                ztrust_agent::cli_flows::run(&flows)?;
            } else {
                flows.connect.socket = sockets[0].socket.clone();
                ztrust_agent::cli_flows::run_nodes(&flows, &sockets)?;
            }
        }
        LabCommand::Explain {
            state,
            node,
            mut explain,
        } => {
            let s = super::status(&state.state_dir)?;
            if explain.connect.server.is_some() {
                return explained(ztrust_agent::cli_explain::run(&explain)?);
            }
            // The nodes that judge the connection: the source's (its egress), the destination's (its
            // ingress), in that order and once each.
            let mut asked: Vec<String> = match &node {
                Some(n) => vec![n.clone()],
                None => [explain.from.as_deref(), explain.to.as_deref()]
                    .into_iter()
                    .flatten()
                    .filter_map(|end| node_of_end(&s, end))
                    .collect(),
            };
            asked.dedup();
            if asked.is_empty() {
                asked.push(s.first_node().name.clone());
            }
            if explain.flow.is_some() && node.is_none() && s.nodes.len() > 1 {
                return Err(CliError::FlowNeedsNode);
            }
            let mut worst = ztrust_agent::cli_explain::Outcome::Passes;
            let mut answers = serde_json::Map::new();
            for (i, n) in asked.iter().enumerate() {
                let connect = sockets(&s, Some(n))?.remove(0);
                explain.connect.socket = connect.socket;
                let x = ztrust_agent::cli_explain::answer(&explain)?;
                match explain.output {
                    ztrust_agent::cli_explain::Output::Json => {
                        answers.insert(n.clone(), serde_json::to_value(&x)?);
                    }
                    _ => {
                        if asked.len() > 1 {
                            println!("{}node {n}:", if i > 0 { "\n" } else { "" });
                        }
                        print!("{}", ztrust_agent::explain::render(&x));
                    }
                }
                let o = ztrust_agent::cli_explain::Outcome::of(&x);
                if o.exit_code() > worst.exit_code() {
                    worst = o;
                }
            }
            if explain.output == ztrust_agent::cli_explain::Output::Json {
                // One document: the answer; in a lab of several nodes, each asked node's under its name.
                let doc = if s.nodes.len() == 1 {
                    answers.into_iter().next().map(|(_, v)| v).unwrap_or_default()
                } else {
                    serde_json::Value::Object(answers)
                };
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
            return explained(worst);
        }
        LabCommand::Suggest {
            state,
            namespace,
            since,
        } => {
            let (cluster, flows) = recorded(&state, since.as_deref())?;
            print!(
                "{}",
                ztrust_agent::suggest::suggest(&cluster, &namespace, &flows).to_yaml(&namespace)?
            );
        }
        LabCommand::WhatIf {
            state,
            draft,
            delete,
            since,
            output,
        } => {
            use ztrust_agent::whatif;
            let (cluster, flows) = recorded(&state, since.as_deref())?;
            let (after, summary) = whatif::apply_draft(&cluster, draft.as_deref(), &delete)?;
            let replay = whatif::replay(&cluster, &after, summary, &flows);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&replay)?),
                Output::Table => print!("{}", whatif::render(&replay)),
            }
            if replay.newly_dropped() > 0 {
                return Err(CliError::Explained("dropped by the draft", 1));
            }
        }
        LabCommand::Serve(args) => super::serve_main(args)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_asks_the_nodes_of_the_pods_it_names() {
        let pod = |name: &str, ip: &str, node: &str| crate::PodState {
            namespace: "payments".into(),
            name: name.into(),
            ips: vec![ip.parse().unwrap()],
            node: node.into(),
            ..Default::default()
        };
        let s = crate::LabState {
            pods: vec![
                pod("frontend", "10.244.0.10", "n1"),
                pod("database", "fd00:10:244:2::a", "n3"),
            ],
            ..Default::default()
        };
        for (end, node) in [
            ("payments/frontend", Some("n1")),
            ("payments/database:5432", Some("n3")),
            ("payments/database:5432/tcp", Some("n3")),
            ("10.244.0.10", Some("n1")),
            ("10.244.0.10:80", Some("n1")),
            ("fd00:10:244:2::a", Some("n3")),
            ("[fd00:10:244:2::a]:5432", Some("n3")),
            ("203.0.113.10:443", None),
            ("payments/nobody", None),
        ] {
            assert_eq!(node_of_end(&s, end).as_deref(), node, "{end}");
        }
    }
}
