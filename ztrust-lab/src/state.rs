//! `state.json`: everything a running lab made, so that `probe`, `apply` and `down` know it.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Error, Result, io_err};
use ztrust_agent::model::{ContainerPort, Labels};

pub const STATE_FILE: &str = "state.json";
pub const MANIFESTS_DIR: &str = "manifests";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub state_dir: PathBuf,
    /// Network namespace name prefix (`<prefix>-node`, `<prefix>-p<N>`, `<prefix>-x<N>`).
    pub prefix: String,
    pub if_prefix: String,
    pub ext_if_prefix: String,
    /// The binary that runs `serve` in every namespace (`ztrust-lab`).
    #[serde(alias = "agent_bin")]
    pub lab_bin: PathBuf,
    /// The nodes, at least one; the first is where external hosts attach.
    #[serde(default)]
    pub nodes: Vec<NodeState>,
    /// A one-node lab's state as it was written before there were nodes (read, never written):
    /// [`LabState::load`] makes it the first node.
    #[serde(default, rename = "node_netns", skip_serializing)]
    pub(crate) legacy_node_netns: Option<String>,
    #[serde(default, rename = "node_ips", skip_serializing)]
    pub(crate) legacy_node_ips: Vec<IpAddr>,
    #[serde(default, rename = "agent", skip_serializing)]
    pub(crate) legacy_agent: Option<AgentState>,
    pub pods: Vec<PodState>,
    pub externals: Vec<ExternalState>,
    /// Interface/namespace numbers are never reused within a lab.
    pub next_index: u32,
    /// Pods without `spec.nodeName` go to the nodes in turn: the next one's position in `nodes`.
    #[serde(default)]
    pub next_node: usize,
    /// How the node translates Services (the kube-proxy mode the lab plays).
    #[serde(default)]
    pub proxy_mode: ProxyMode,
}

/// The kube-proxy mode the lab plays in the node's namespace: the same translation (a random ready
/// backend per connection, node ports), written as kube-proxy writes it in that mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// One nftables table, `numgen random` maps (kube-proxy's `--proxy-mode nftables`).
    #[default]
    Nftables,
    /// iptables nat rules, `-m statistic --mode random` chains (kube-proxy's default mode).
    Iptables,
}

/// A node: its network namespace (named as the node), its own addresses, its pod address block and
/// its agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// The node's name (`spec.nodeName`, the agent's `--node-name`) and its network namespace's.
    pub name: String,
    /// Its own addresses, on its `lo`: the HOST identity at its pods, the source of what it sends.
    pub ips: Vec<IpAddr>,
    /// Its pod address block: `10.244.<block>.0/24` and `fd00:10:244:<block>::/64`.
    #[serde(default)]
    pub block: u8,
    /// The agent the lab started in the node's namespace, if any.
    #[serde(default)]
    pub agent: Option<AgentState>,
}

/// An agent enforcing in the lab: `<bin> run --source dir:<state>/manifests …` in the node's namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub pid: u32,
    /// Its bpffs pin directory (the lab removes it on `down`).
    pub pin_dir: PathBuf,
    /// Its flow API socket and flow log.
    pub socket: PathBuf,
    pub flow_log: PathBuf,
    pub log: PathBuf,
    #[serde(default)]
    pub attach_timeout_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPort>,
    pub host_network: bool,
    /// The node it runs on ([`NodeState::name`]).
    #[serde(default)]
    pub node: String,
    /// The pod's own network namespace; for a hostNetwork pod, the node's.
    pub netns: String,
    /// Node-side veth (none for a hostNetwork pod).
    pub host_if: Option<String>,
    pub index: u32,
    pub server_pid: Option<u32>,
}

impl PodState {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalState {
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPort>,
    pub netns: String,
    pub host_if: String,
    pub index: u32,
    pub server_pid: Option<u32>,
}

impl ExternalState {
    /// How probes and servers name it: `external/<name>`.
    pub fn key(&self) -> String {
        format!("external/{}", self.name)
    }
}

impl LabState {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(STATE_FILE)
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.state_dir.join(MANIFESTS_DIR)
    }

    /// `Ok(None)` when there is no state file.
    pub fn load(state_dir: &Path) -> Result<Option<Self>> {
        let path = Self::path(state_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        let mut state: Self = serde_json::from_str(&text).map_err(|source| Error::State {
            file: path.clone(),
            source,
        })?;
        state.migrate();
        if state.nodes.is_empty() {
            return Err(Error::State {
                file: path,
                source: serde::de::Error::custom("no nodes"),
            });
        }
        Ok(Some(state))
    }

    /// A state written before there were nodes: its node, agent and pods on the one node.
    fn migrate(&mut self) {
        if self.nodes.is_empty()
            && let Some(name) = self.legacy_node_netns.take()
        {
            self.nodes.push(NodeState {
                name,
                ips: std::mem::take(&mut self.legacy_node_ips),
                block: 0,
                agent: self.legacy_agent.take(),
            });
        }
        if let Some(first) = self.nodes.first().map(|n| n.name.clone()) {
            for p in self.pods.iter_mut().filter(|p| p.node.is_empty()) {
                p.node = first.clone();
            }
        }
    }

    pub fn load_running(state_dir: &Path) -> Result<Self> {
        Self::load(state_dir)?.ok_or_else(|| Error::NotUp(state_dir.to_owned()))
    }

    /// Written atomically (temporary file, then rename), so a reader never sees half a state.
    pub fn save(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("state serializes");
        write_atomic(&Self::path(&self.state_dir), text.as_bytes())
    }

    /// The first node: the only one of a one-node lab, where external hosts attach.
    pub fn first_node(&self) -> &NodeState {
        self.nodes.first().expect("a lab has a node")
    }

    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node `pod` runs on.
    pub fn node_of(&self, pod: &PodState) -> &NodeState {
        self.node(&pod.node).unwrap_or_else(|| self.first_node())
    }

    /// The nodes' names, as errors list them (`a, b, c`).
    pub fn node_names(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The nodes' agents, with their nodes.
    pub fn agents(&self) -> impl Iterator<Item = (&NodeState, &AgentState)> {
        self.nodes.iter().filter_map(|n| n.agent.as_ref().map(|a| (n, a)))
    }

    /// Every address of every node.
    pub fn all_node_ips(&self) -> Vec<IpAddr> {
        self.nodes.iter().flat_map(|n| n.ips.iter().copied()).collect()
    }

    pub fn pod(&self, key: &str) -> Option<&PodState> {
        self.pods.iter().find(|p| p.key() == key)
    }

    pub fn all_server_pids(&self) -> Vec<u32> {
        self.pods
            .iter()
            .filter_map(|p| p.server_pid)
            .chain(self.externals.iter().filter_map(|x| x.server_pid))
            .collect()
    }

    /// Network namespaces of pods and external hosts (not the node's).
    pub fn endpoint_netns(&self) -> Vec<String> {
        let pods = self
            .pods
            .iter()
            .filter(|p| !p.host_network)
            .map(|p| p.netns.clone());
        pods.chain(self.externals.iter().map(|x| x.netns.clone()))
            .collect()
    }
}

/// Writes `path` through a temporary file in the same directory and a rename. The temporary name does not
/// end in `.yaml`, so a directory watcher never reads a half-written manifest.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(io_err(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_err(format!(
        "renaming {} to {}",
        tmp.display(),
        path.display()
    )))
}

fn labels_text(labels: &Labels) -> String {
    if labels.is_empty() {
        return "<none>".to_owned();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A node's pod address blocks, as `status` shows them.
fn node_block(block: u8) -> String {
    let (v4, v6) = crate::alloc::block_cidrs(block);
    format!("{v4},{v6}")
}

fn ips_text(ips: &[IpAddr]) -> String {
    ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

fn ports_text(ports: &[ContainerPort]) -> String {
    if ports.is_empty() {
        return "-".to_owned();
    }
    ports
        .iter()
        .map(|p| format!("{}/{}", p.port, p.protocol))
        .collect::<Vec<_>>()
        .join(",")
}

/// `ztrust-lab status`: pods and external hosts as aligned tables.
pub fn render_status(state: &LabState) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "state: {}", state.state_dir.display());
    for n in &state.nodes {
        let _ = writeln!(
            out,
            "node: {} addresses {} pods {}",
            n.name,
            ips_text(&n.ips),
            node_block(n.block)
        );
        match &n.agent {
            Some(a) => {
                let _ = writeln!(
                    out,
                    "  agent: pid {} pins {} flow API {} flow log {}",
                    a.pid,
                    a.pin_dir.display(),
                    a.socket.display(),
                    a.flow_log.display()
                );
            }
            None => {
                let _ = writeln!(out, "  agent: none (no enforcement)");
            }
        }
    }
    let _ = writeln!(out);
    let mut rows = vec![[
        "POD".to_owned(),
        "NODE".into(),
        "IPS".into(),
        "INTERFACE".into(),
        "NETNS".into(),
        "PORTS".into(),
        "LABELS".into(),
    ]];
    for p in &state.pods {
        rows.push([
            p.key(),
            p.node.clone(),
            ips_text(&p.ips),
            p.host_if.clone().unwrap_or_else(|| "(hostNetwork)".into()),
            p.netns.clone(),
            ports_text(&p.ports),
            labels_text(&p.labels),
        ]);
    }
    out.push_str(&align(&rows));
    if !state.externals.is_empty() {
        let _ = writeln!(out);
        let mut rows = vec![[
            "EXTERNAL".to_owned(),
            "IPS".into(),
            "INTERFACE".into(),
            "NETNS".into(),
            "PORTS".into(),
        ]];
        for x in &state.externals {
            rows.push([
                x.key(),
                ips_text(&x.ips),
                x.host_if.clone(),
                x.netns.clone(),
                ports_text(&x.ports),
            ]);
        }
        out.push_str(&align(&rows));
    }
    out
}

/// Left-aligned columns, two spaces apart (widths in characters, so `✓` counts as one).
pub(crate) fn align<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < N {
                line.extend(std::iter::repeat_n(' ', widths[i] - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
