//! `up`, `apply`, `delete`, `label`, `down`, `status`: the lab's life cycle.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::alloc::{self, Allocator, MAX_NODES};
use super::manifests::{self, Kind, RawObject};
use super::node::{self, NodeAddrs};
use super::serve::ServeArgs;
use super::state::{
    AgentState, ExternalState, LabState, MANIFESTS_DIR, NodeState, PodState, ProxyMode, write_atomic,
};
use super::{
    DEFAULT_EXT_IF_PREFIX, DEFAULT_IF_PREFIX, DEFAULT_PREFIX, DEFAULT_STATE_DIR, Error, LinkHook, Result,
    io_err, net,
};
use ztrust_agent::model::{ContainerPort, Protocol};

const LOGS_DIR: &str = "logs";
const AGENT_SOCKET: &str = "agent.sock";
const FLOW_LOG: &str = "flows.jsonl";
const READY_DIR: &str = "ready";
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

pub struct UpOptions<'a> {
    /// `state.json`, `manifests/` (the agent's source), server logs. Default `/run/ztrust/lab`.
    pub state_dir: PathBuf,
    /// Network namespaces are `<prefix>-node`, `<prefix>-p<N>`, `<prefix>-x<N>`; `up` first removes every
    /// `<prefix>-*` namespace. Use a unique prefix to run labs side by side (tests).
    pub prefix: String,
    /// Node-side interface of pod N: `<if_prefix><N>`.
    pub if_prefix: String,
    /// Node-side interface of external host N: `<ext_if_prefix><N>`.
    pub ext_if_prefix: String,
    /// The binary whose `serve` runs in every namespace (`ztrust-lab`); default: this executable.
    pub lab_bin: Option<PathBuf>,
    /// Called with the new pods' node-side interfaces, created but still down.
    pub before_link_up: Option<LinkHook<'a>>,
    /// How long servers may take to bind their ports.
    pub server_timeout: Duration,
    /// Start an agent in the node's namespace, and bring no pod interface up before it has attached.
    pub agent: Option<AgentSpec>,
    /// How the nodes translate Services.
    pub proxy_mode: ProxyMode,
    /// How many nodes (1 to 16), routed to each other; pods go where their `spec.nodeName` says, else to
    /// the nodes in turn.
    pub nodes: usize,
}

/// An agent the lab starts in each node's namespace as soon as the node exists:
/// `<bin> run --source dir:<state>/manifests --pin-path <pin_dir> --node-ip <node> --interface-prefix
/// <if_prefix> --node-name <node> --flow-log <state>/flows.jsonl --grpc-socket <state>/agent.sock
/// <extra_args…>` (the second node's files and pins end in `-node2`, and so on). Each new pod interface is brought up only once the agent has pinned its links there
/// (`<pin_dir>/links/<hook>/<ifname>`), so no pod ever has a moment without enforcement.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// The `ztrust-agent` binary. Default: the one beside the lab's binary (`cargo build` puts both in
    /// `target/<profile>/`).
    pub bin: Option<PathBuf>,
    /// Default: `/sys/fs/bpf/ztrust-lab-<prefix>`, apart from a real agent's pins (the second node's
    /// with `-node2` after it, and so on).
    pub pin_dir: Option<PathBuf>,
    /// After the lab's own arguments (`--mode`, `audit`, `--log-allowed`, …).
    pub extra_args: Vec<String>,
    /// How long the agent may take to attach to a new interface.
    pub attach_timeout: Duration,
}

impl Default for AgentSpec {
    fn default() -> Self {
        Self {
            bin: None,
            pin_dir: None,
            extra_args: Vec::new(),
            attach_timeout: Duration::from_secs(15),
        }
    }
}

pub fn default_agent_pin_dir(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/ztrust-lab-{prefix}"))
}

/// What the names of the node at `position` (from 0) end in: nothing for the first, `-node2` for the
/// second, … (kind names its nodes so too).
pub(crate) fn node_suffix(position: usize) -> String {
    if position == 0 {
        String::new()
    } else {
        format!("-node{}", position + 1)
    }
}

/// The name (and network namespace) of the node at `position`: `<prefix>-node`, `<prefix>-node2`, …
fn node_name(prefix: &str, position: usize) -> String {
    match position {
        0 => format!("{prefix}-node"),
        _ => format!("{prefix}{}", node_suffix(position)),
    }
}

/// Whether `netns` is a node of the lab with netns prefix `prefix`.
fn is_node_netns(prefix: &str, netns: &str) -> bool {
    netns
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix("-node"))
        .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
}

/// Whether `name` is a file the lab's agents write in the state directory (`agent.sock`,
/// `agent-node2.sock`, `flows.jsonl`, …).
fn is_agent_file(name: &str) -> bool {
    [("agent", ".sock"), ("flows", ".jsonl")]
        .iter()
        .any(|(stem, ext)| {
            name.strip_prefix(stem)
                .and_then(|r| r.strip_suffix(ext))
                .is_some_and(|mid| mid.is_empty() || is_node_netns("", mid))
        })
}

/// The part of the agent's command line by which the lab knows it.
fn agent_tag(state_dir: &Path) -> String {
    format!("dir:{}", state_dir.join(MANIFESTS_DIR).display())
}

impl Default for UpOptions<'_> {
    fn default() -> Self {
        Self {
            state_dir: DEFAULT_STATE_DIR.into(),
            prefix: DEFAULT_PREFIX.into(),
            if_prefix: DEFAULT_IF_PREFIX.into(),
            ext_if_prefix: DEFAULT_EXT_IF_PREFIX.into(),
            lab_bin: None,
            before_link_up: None,
            server_timeout: Duration::from_secs(10),
            agent: None,
            proxy_mode: ProxyMode::default(),
            nodes: 1,
        }
    }
}

pub struct ApplyOptions<'a> {
    pub state_dir: PathBuf,
    pub before_link_up: Option<LinkHook<'a>>,
    pub server_timeout: Duration,
}

impl Default for ApplyOptions<'_> {
    fn default() -> Self {
        Self {
            state_dir: DEFAULT_STATE_DIR.into(),
            before_link_up: None,
            server_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug)]
pub struct DownOptions {
    pub state_dir: PathBuf,
    /// Namespaces `<prefix>-*` are removed even when `state.json` is gone.
    pub prefix: String,
}

impl Default for DownOptions {
    fn default() -> Self {
        Self {
            state_dir: DEFAULT_STATE_DIR.into(),
            prefix: DEFAULT_PREFIX.into(),
        }
    }
}

/// What `up`, `apply` and `delete` did, and what they had to say about the manifests.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub state: LabState,
    /// Objects created or changed (`Pod payments/frontend`).
    pub changed: Vec<String>,
    /// Manifests the lab skipped or fixed, problems the agent's source will report too.
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct DownReport {
    /// Servers.
    pub killed: Vec<u32>,
    /// The lab's agent.
    pub agent_killed: Vec<u32>,
    pub netns_deleted: Vec<String>,
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_owned())
    }
}

/// Brings the lab up from a manifest file or directory, after removing whatever an earlier lab left.
pub fn up(manifests: &Path, opts: UpOptions<'_>) -> Result<Report> {
    let state_dir = absolute(&opts.state_dir);
    for (what, name) in [
        ("if_prefix", &opts.if_prefix),
        ("ext_if_prefix", &opts.ext_if_prefix),
    ] {
        if name.is_empty() || name.len() > IFNAME_MAX - 4 || name == "eth" {
            return Err(Error::BadArgument {
                what: "interface prefix",
                value: format!("{what}={name}"),
                expected: "1 to 11 characters",
            });
        }
    }
    if opts.prefix.is_empty() || opts.prefix.contains('/') {
        return Err(Error::BadArgument {
            what: "netns prefix",
            value: opts.prefix,
            expected: "a name without /",
        });
    }
    if opts.nodes == 0 || opts.nodes > MAX_NODES {
        return Err(Error::BadArgument {
            what: "number of nodes",
            value: opts.nodes.to_string(),
            expected: "1 to 16",
        });
    }
    for name in [&opts.if_prefix, &opts.ext_if_prefix]
        .into_iter()
        .filter(|_| opts.nodes > 1)
    {
        if name.starts_with(node::NODE_LINK) || node::NODE_LINK.starts_with(name.as_str()) {
            return Err(Error::BadArgument {
                what: "interface prefix",
                value: name.clone(),
                expected: "a prefix apart from the links between nodes (`tonode<N>`)",
            });
        }
    }
    let read = manifests::read_path(manifests)?;
    down(&DownOptions {
        state_dir: state_dir.clone(),
        prefix: opts.prefix.clone(),
    })?;

    for dir in [MANIFESTS_DIR, LOGS_DIR, READY_DIR] {
        let d = state_dir.join(dir);
        std::fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
    }
    let lab_bin = match opts.lab_bin {
        Some(b) => absolute(&b),
        None => std::env::current_exe().map_err(io_err("finding this executable"))?,
    };
    let nodes = (0..opts.nodes)
        .map(|i| {
            let block = u8::try_from(i).expect("at most 16 nodes");
            let (v4, v6) = alloc::node_addrs(block);
            NodeState {
                name: node_name(&opts.prefix, i),
                ips: vec![IpAddr::V4(v4), IpAddr::V6(v6)],
                block,
                agent: None,
            }
        })
        .collect();
    let mut state = LabState {
        state_dir: state_dir.clone(),
        prefix: opts.prefix.clone(),
        if_prefix: opts.if_prefix,
        ext_if_prefix: opts.ext_if_prefix,
        lab_bin,
        nodes,
        pods: Vec::new(),
        externals: Vec::new(),
        next_index: 1,
        next_node: 0,
        proxy_mode: opts.proxy_mode,
        ..Default::default()
    };
    // Saved before anything exists, so that a crash half-way is cleaned up by the next `up` or `down`.
    state.save()?;
    for n in &state.nodes {
        node::make_node(&n.name, node_addrs(n))?;
    }
    for (i, a) in state.nodes.iter().enumerate() {
        for b in &state.nodes[i + 1..] {
            node::connect_nodes(peer(a), peer(b))?;
        }
    }
    if let Some(spec) = opts.agent {
        for i in 0..state.nodes.len() {
            start_agent(&mut state, i, spec.clone())?;
            state.save()?;
        }
    }
    let mut report = Report {
        warnings: read.skipped,
        ..Default::default()
    };
    add_objects(
        &mut state,
        read.objects,
        opts.before_link_up,
        opts.server_timeout,
        &mut report,
    )?;
    report.state = state;
    Ok(report)
}

pub(crate) fn node_addrs(n: &NodeState) -> NodeAddrs {
    let (v4, v6) = alloc::node_addrs(n.block);
    NodeAddrs { v4, v6 }
}

pub(crate) fn peer(n: &NodeState) -> node::Peer<'_> {
    node::Peer {
        netns: &n.name,
        block: n.block,
    }
}

/// Adds or updates the objects of a manifest file or directory in the running lab.
pub fn apply(path: &Path, opts: ApplyOptions<'_>) -> Result<Report> {
    let mut state = LabState::load_running(&absolute(&opts.state_dir))?;
    let read = manifests::read_path(path)?;
    let mut report = Report {
        warnings: read.skipped,
        ..Default::default()
    };
    add_objects(
        &mut state,
        read.objects,
        opts.before_link_up,
        opts.server_timeout,
        &mut report,
    )?;
    report.state = state;
    Ok(report)
}

/// Removes the objects named in a manifest file or directory from the running lab (pods lose their
/// network namespace, servers are stopped). Objects the lab does not have are noted, not an error.
pub fn delete(path: &Path, state_dir: &Path) -> Result<Report> {
    let mut state = LabState::load_running(&absolute(state_dir))?;
    let read = manifests::read_path(path)?;
    let mut report = Report {
        warnings: read.skipped,
        ..Default::default()
    };
    let log_from = agent_log_len(&state);
    for obj in read.objects {
        let copy = state.manifests_dir().join(obj.file_name());
        let had_copy = copy.exists();
        if had_copy {
            std::fs::remove_file(&copy).map_err(io_err(format!("removing {}", copy.display())))?;
        }
        let removed = match obj.kind {
            Kind::Pod => {
                let key = format!("{}/{}", obj.namespace, obj.name);
                match state.pods.iter().position(|p| p.key() == key) {
                    Some(i) => {
                        let pod = state.pods.remove(i);
                        remove_endpoint(
                            &state,
                            pod.server_pid,
                            (!pod.host_network).then_some(pod.netns.as_str()),
                        );
                        if !pod.host_network {
                            for n in state.nodes.iter().filter(|n| n.name != pod.node) {
                                node::unroute(&n.name, &pod.ips);
                            }
                        }
                        true
                    }
                    None => false,
                }
            }
            Kind::ExternalHost => match state.externals.iter().position(|x| x.name == obj.name) {
                Some(i) => {
                    let x = state.externals.remove(i);
                    remove_endpoint(&state, x.server_pid, Some(&x.netns));
                    for n in &state.nodes[1..] {
                        node::unroute(&n.name, &x.ips);
                    }
                    true
                }
                None => false,
            },
            Kind::Namespace | Kind::NetworkPolicy | Kind::Service => had_copy,
        };
        if removed || had_copy {
            report.changed.push(obj.display());
        } else {
            report
                .warnings
                .push(format!("{} is not in the lab", obj.display()));
        }
        state.save()?;
    }
    super::services::realise(&state)?;
    if !report.changed.is_empty() && !wait_settled(&state, &log_from)? {
        report
            .warnings
            .push("an agent has not picked up the change yet (see logs/agent*.log)".into());
    }
    report.state = state;
    Ok(report)
}

fn remove_endpoint(state: &LabState, pid: Option<u32>, netns: Option<&str>) {
    if let Some(pid) = pid {
        net::kill_servers(&[pid], &state.state_dir);
    }
    if let Some(ns) = netns {
        // The veth goes with the namespace, and the node's host routes with the veth.
        let _ = net::del_netns(ns);
    }
}

/// Which object `label` changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelKind {
    Namespace,
    Pod,
}

/// `key=value` sets a label, `key-` removes it (as `kubectl label`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelChange {
    pub key: String,
    pub value: Option<String>,
}

impl std::str::FromStr for LabelChange {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::BadArgument {
            what: "label change",
            value: s.to_owned(),
            expected: "key=value or key-",
        };
        if let Some((k, v)) = s.split_once('=') {
            if k.is_empty() {
                return Err(bad());
            }
            Ok(Self {
                key: k.to_owned(),
                value: Some(v.to_owned()),
            })
        } else if let Some(k) = s.strip_suffix('-') {
            if k.is_empty() {
                return Err(bad());
            }
            Ok(Self {
                key: k.to_owned(),
                value: None,
            })
        } else {
            Err(bad())
        }
    }
}

/// Changes labels of a Namespace (`name`) or Pod (`namespace/name`) in the running lab by rewriting its
/// copy in `manifests/` (the agent picks the change up from there).
pub fn label(state_dir: &Path, kind: LabelKind, target: &str, changes: &[LabelChange]) -> Result<()> {
    let mut state = LabState::load_running(&absolute(state_dir))?;
    let (file, shown) = match kind {
        LabelKind::Namespace => (
            manifests::file_name(Kind::Namespace, "", target),
            format!("Namespace {target}"),
        ),
        LabelKind::Pod => {
            let (ns, name) = target.split_once('/').unwrap_or(("default", target));
            (
                manifests::file_name(Kind::Pod, ns, name),
                format!("Pod {ns}/{name}"),
            )
        }
    };
    let path = state.manifests_dir().join(file);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NotFound(shown)),
        Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
    };
    let mut value: serde_json::Value = serde_yaml::from_str(&text).map_err(|source| Error::Yaml {
        file: path.clone(),
        source,
    })?;
    for c in changes {
        manifests::set_label(&mut value, &c.key, c.value.as_deref());
    }
    let log_from = agent_log_len(&state);
    write_atomic(&path, manifests::to_yaml(&value).as_bytes())?;
    if kind == LabelKind::Pod {
        let key = if target.contains('/') {
            target.to_owned()
        } else {
            format!("default/{target}")
        };
        if let Some(pod) = state.pods.iter_mut().find(|p| p.key() == key) {
            for c in changes {
                match &c.value {
                    Some(v) => pod.labels.insert(c.key.clone(), v.clone()),
                    None => pod.labels.remove(&c.key),
                };
            }
        }
        state.save()?;
    }
    super::services::realise(&state)?;
    wait_settled(&state, &log_from)?;
    Ok(())
}

/// Removes everything the lab made: servers, network namespaces (and so every veth and route in them),
/// the state directory's contents. Works without `state.json`, from `prefix` and the servers' command
/// lines.
pub fn down(opts: &DownOptions) -> Result<DownReport> {
    let state_dir = absolute(&opts.state_dir);
    // A state file that cannot be read is no reason to leave the rest behind.
    let state = LabState::load(&state_dir).ok().flatten();
    let mut agents = net::processes_with(&[" run ", &agent_tag(&state_dir)]);
    agents.extend(
        state
            .iter()
            .flat_map(|s| s.agents())
            .map(|(_, a)| a.pid)
            .filter(|pid| net::cmdline(*pid).contains(&agent_tag(&state_dir))),
    );
    agents.sort_unstable();
    agents.dedup();
    // The agents first: they must not see the lab come apart, and their pins go once they are gone.
    net::terminate(&agents, Duration::from_secs(3));
    let mut pin_dirs: Vec<PathBuf> = state
        .iter()
        .flat_map(|s| s.agents())
        .map(|(_, a)| a.pin_dir.clone())
        .collect();
    // Without a state file: the default pin directories of every node this prefix may have had.
    pin_dirs.extend((0..MAX_NODES).map(|i| {
        let mut pin = default_agent_pin_dir(&opts.prefix).into_os_string();
        pin.push(node_suffix(i));
        PathBuf::from(pin)
    }));
    pin_dirs.sort();
    pin_dirs.dedup();
    for pin in pin_dirs {
        if pin.exists() {
            ztrust_agent::datapath::loader::cleanup(&pin)
                .map_err(io_err(format!("removing the agent's pins in {}", pin.display())))?;
        }
    }
    let mut pids: Vec<u32> = state.as_ref().map(LabState::all_server_pids).unwrap_or_default();
    pids.extend(net::lab_servers(&state_dir));
    pids.sort_unstable();
    pids.dedup();
    net::kill_servers(&pids, &state_dir);
    let mut report = DownReport {
        killed: pids,
        agent_killed: agents,
        ..Default::default()
    };

    let mut prefixes = vec![opts.prefix.clone()];
    let mut endpoints = Vec::new();
    let mut nodes = Vec::new();
    if let Some(s) = &state {
        prefixes.push(s.prefix.clone());
        endpoints.extend(s.endpoint_netns());
        nodes.extend(s.nodes.iter().map(|n| n.name.clone()));
    }
    for prefix in &prefixes {
        for ns in net::list_netns(prefix) {
            if is_node_netns(prefix, &ns) {
                nodes.push(ns)
            } else {
                endpoints.push(ns)
            }
        }
    }
    // Endpoints first: the node goes last, when nothing routes through it any more.
    for list in [&mut endpoints, &mut nodes] {
        list.sort();
        list.dedup();
    }
    for ns in endpoints.iter().chain(nodes.iter()) {
        if net::netns_path(ns).exists() {
            net::del_netns(ns)?;
            report.netns_deleted.push(ns.clone());
        }
    }
    // Only what the lab writes: the state directory may be one the user also keeps other things in.
    for dir in [MANIFESTS_DIR, LOGS_DIR, READY_DIR] {
        let d = state_dir.join(dir);
        if d.exists() {
            std::fs::remove_dir_all(&d).map_err(io_err(format!("removing {}", d.display())))?;
        }
    }
    let agent_files = std::fs::read_dir(&state_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(is_agent_file))
        .map(|e| e.path());
    for file in std::iter::once(LabState::path(&state_dir)).chain(agent_files) {
        if file.exists() {
            std::fs::remove_file(&file).map_err(io_err(format!("removing {}", file.display())))?;
        }
    }
    let _ = std::fs::remove_dir(&state_dir); // only if empty
    Ok(report)
}

/// The running lab.
pub fn status(state_dir: &Path) -> Result<LabState> {
    LabState::load_running(&absolute(state_dir))
}

fn serve_args(state: &LabState, name: &str, ports: &[ContainerPort], index: u32) -> ServeArgs {
    let of = |proto: Protocol| {
        let mut v: Vec<u16> = ports
            .iter()
            .filter(|p| p.protocol == proto)
            .map(|p| p.port)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    ServeArgs {
        name: name.to_owned(),
        tcp: of(Protocol::Tcp),
        udp: of(Protocol::Udp),
        sctp: of(Protocol::Sctp),
        ready_file: Some(state.state_dir.join(READY_DIR).join(index.to_string())),
        lab: Some(state.state_dir.clone()),
    }
}

struct Started {
    name: String,
    pid: u32,
    ready: PathBuf,
    log: PathBuf,
}

fn start_server(state: &LabState, netns: &str, args: ServeArgs, index: u32) -> Result<Started> {
    let ready = args.ready_file.clone().expect("serve_args sets it");
    let _ = std::fs::remove_file(&ready);
    let log = state
        .state_dir
        .join(LOGS_DIR)
        .join(format!("{index}-{}.log", args.name.replace('/', "_")));
    let pid = net::spawn_in_netns(netns, &state.lab_bin, &args.to_args(), &log)?;
    Ok(Started {
        name: args.name,
        pid,
        ready,
        log,
    })
}

fn wait_ready(started: &[Started], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for s in started {
        loop {
            if s.ready.exists() {
                break;
            }
            let alive = std::fs::read_to_string(format!("/proc/{}/stat", s.pid)).is_ok_and(|st| {
                !st.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            });
            if !alive || Instant::now() > deadline {
                let log = std::fs::read_to_string(&s.log).unwrap_or_default();
                let why = if alive { "was not ready in time" } else { "exited" };
                return Err(Error::ServerStart {
                    name: s.name.clone(),
                    why,
                    log: log.trim().to_owned(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

mod agent;
mod objects;

use self::agent::*;
use self::objects::*;

#[cfg(test)]
mod tests;
