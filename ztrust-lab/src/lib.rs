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
pub mod ops;
pub mod probe;
pub mod serve;
pub mod services;
pub mod state;

use std::io;
use std::path::PathBuf;

pub use ops::{
    AgentSpec, ApplyOptions, DownOptions, DownReport, LabelChange, LabelKind, Report, UpOptions, apply,
    delete, down, label, status, up,
};
pub use probe::{Family, Matrix, MatrixDiff, Probe, ProbeOptions, Verdict, probe};
pub use serve::{ServeArgs, serve_main};
pub use state::{AgentState, ExternalState, LabState, PodState, ProxyMode, render_status};

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
    #[error("{file}: cannot parse: {message}")]
    Parse { file: String, message: String },
    #[error("{object}: {problem}")]
    Invalid { object: String, problem: String },
    #[error("{0} is not in the lab")]
    NotFound(String),
    #[error("no lab state in {0} (is the lab up? `ztrust-lab up <manifests>`)")]
    NotUp(PathBuf),
    #[error("the server of {name} did not start: {log}")]
    ServerStart { name: String, log: String },
    #[error("the before-link-up hook failed: {0}")]
    Hook(#[source] HookError),
    #[error("the agent {problem}; the end of its log ({}):\n{log}", log_path.display())]
    Agent {
        problem: String,
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

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
