//! The lab: a Kubernetes node made of network namespaces.
//!
//! `up` turns a directory of manifests (Namespaces, Pods, NetworkPolicies, Services, plus the lab's own
//! `lab.ztrust.io/v1` `ExternalHost`) into:
//!
//! - a node network namespace (`<prefix>-node`) that routes between pods, with the node's own address on
//!   `lo` (10.244.0.1, fd00:10:244::1): the HOST identity of Kubernetes policy;
//! - one network namespace per pod (`<prefix>-p<N>`), joined to the node by a veth pair whose node side is
//!   `<if_prefix><N>`, routed the way Calico does it (a /32 and /128 host route per pod on the node, the
//!   pod's default route through a link-local gateway), so the agent can bind interfaces to pods from the
//!   node's routing table alone;
//! - one network namespace per external host (`<prefix>-x<N>`, node side `<ext_if_prefix><N>`);
//! - a server in each of them answering on every container port, so [`probe`] can tell allowed from
//!   denied;
//! - Services as a cluster has them: EndpointSlices from the pods their selectors select, and DNAT rules
//!   in the node's namespace, as kube-proxy in nftables mode writes them ([`services`]);
//! - a state directory with `state.json` and `manifests/`, the copy of every object with the pod
//!   addresses filled in, which an agent watches as its `dir:` source.
//!
//! Everything lives in network namespaces the lab made; the root namespace is never touched.

pub mod alloc;
pub mod cli;
pub mod manifests;
pub mod net;
pub mod node;
pub mod ops;
pub mod probe;
pub mod serve;
pub mod services;
pub mod state;

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ztrust_agent::source::{ObjectError, Problem};

pub use ops::{
    AgentSpec, ApplyOptions, DownOptions, DownReport, LabelChange, LabelKind, Report, UpOptions, apply,
    delete, down, label, status, up,
};
pub use probe::{Family, Matrix, MatrixDiff, Probe, ProbeOptions, Verdict, probe};
pub use serve::{ServeArgs, serve_main};
pub use state::{AgentState, ExternalState, LabState, NodeState, PodState, ProxyMode, render_status};

/// Where the lab keeps its state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/run/ztrust/lab";
/// Network namespace name prefix: `ztlab-node`, `ztlab-p1`, `ztlab-x1`.
pub const DEFAULT_PREFIX: &str = "ztlab";
/// Node-side interface of pod N: `ztl<N>` (the agent attaches to `ztl*`).
pub const DEFAULT_IF_PREFIX: &str = "ztl";
/// Node-side interface of external host N: `ztx<N>`. A different prefix on purpose: an external host is
/// not a pod, and an agent attaching to `ztl*` (fail closed until the pod is known) must leave it alone.
pub const DEFAULT_EXT_IF_PREFIX: &str = "ztx";

/// A hook the lab calls with the node-side interfaces it just made, before it brings them up: the place
/// to make sure an enforcement program is attached before a pod gets any connectivity.
pub type LinkHook<'a> = &'a mut dyn FnMut(&[String]) -> Result<(), HookError>;
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{}: cannot parse: {source}", file.display())]
    State {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: cannot parse: {source}", file.display())]
    Yaml {
        file: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    /// A manifest file that cannot be read as YAML at all.
    #[error("{file}: {problem}")]
    Manifest {
        file: String,
        #[source]
        problem: Problem,
    },
    /// An object of the lab's own kinds that does not hold what it must (in the agent's vocabulary: the
    /// object, the field, the problem).
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("{object}: {conflict}")]
    Conflict {
        object: String,
        #[source]
        conflict: Conflict,
    },
    #[error(
        "no ztrust-agent beside {} (build it: `cargo build -p ztrust-agent`; or run without enforcement: --no-agent)",
        lab_bin.display()
    )]
    NoAgent { lab_bin: PathBuf },
    #[error("{0} is not in the lab")]
    NotFound(String),
    #[error("no lab state in {0} (is the lab up? `ztrust-lab up <manifests>`)")]
    NotUp(PathBuf),
    #[error("the server of {name} {why}; its log: {log}")]
    ServerStart {
        name: String,
        why: &'static str,
        log: String,
    },
    #[error("the before-link-up hook failed: {0}")]
    Hook(#[source] HookError),
    #[error("the agent {problem}; the end of its log ({}):\n{log}", log_path.display())]
    Agent {
        problem: AgentProblem,
        log_path: PathBuf,
        log: String,
    },
    #[error("invalid {what} {value:?}: {expected}")]
    BadArgument {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// What the lab's agent failed to do.
#[derive(Debug, thiserror::Error)]
pub enum AgentProblem {
    #[error("exited")]
    Exited,
    #[error("did not attach to {ifname} within {within:?} (no pinned links under {}/links)", pin_dir.display())]
    NotAttached {
        ifname: String,
        within: Duration,
        pin_dir: PathBuf,
    },
    #[error("did not bind {} to their pods in time", .0.join(", "))]
    NotBound(Vec<String>),
}

/// Why an object cannot join the running lab.
#[derive(Debug, thiserror::Error)]
pub enum Conflict {
    #[error("its address is already {0}'s")]
    AddressOf(String),
    #[error("{0} is already taken")]
    Taken(IpAddr),
    #[error("no free address left in {0}")]
    NoFreeAddress(String),
    #[error("spec.nodeName: the lab has no node {node} (its nodes: {nodes})")]
    UnknownNode { node: String, nodes: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
