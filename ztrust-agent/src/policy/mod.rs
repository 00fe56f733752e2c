//! The pure policy engine: a [`Cluster`](crate::model::Cluster) in, the desired datapath state out.
//!
//! No BPF, no kube, no I/O. The datapath sync (`crate::datapath::sync`) diffs [`Desired`] against what
//! it last wrote and writes the maps; [`lookup`] simulates the kernel's lookup over the same state so
//! the engine can be tested against [`reference::reference_allowed`], an evaluator that reads the
//! NetworkPolicy objects directly.
//!
//! The model is Cilium's: a pod's address maps (ipcache, longest-prefix match) to a numeric *identity*
//! shared by every address that every policy treats alike; each endpoint has an allow set keyed by
//! (direction, remote identity, protocol, port range). See [`Engine::compile`] for how identities are
//! chosen so that sharing never changes a verdict.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::model::{Labels, ObjectRef};

mod compile;
mod keys;
pub mod reference;
mod selector;

#[cfg(test)]
pub(crate) mod proptests;
#[cfg(test)]
mod tests;

pub use compile::Engine;
pub use keys::{lookup, policy_keys, remote_identity};
pub use selector::matches;

/// One allow entry of an endpoint: traffic in `direction` with a remote of identity `remote`, protocol
/// `protocol` and destination port in `port_lo..=port_hi` is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct AllowKey {
    /// [`ztrust_common::dir`].
    pub direction: u8,
    /// Remote identity; [`ztrust_common::identity::ANY`] = any address at all.
    pub remote: u32,
    /// IP protocol number; 0 = any protocol (then the port range is `0..=65535`).
    pub protocol: u8,
    pub port_lo: u16,
    pub port_hi: u16,
}

/// Which rule of which policy an allow entry comes from (flows show it as "allowed by").
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RuleRef {
    pub policy: ObjectRef,
    /// [`ztrust_common::dir`].
    pub direction: u8,
    /// Index in `spec.ingress` / `spec.egress`, as in the object.
    pub index: usize,
}

/// What a numeric identity stands for, for display.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum IdentityInfo {
    /// `world` (no ipcache entry) or `host` (this node).
    Reserved { name: &'static str },
    /// Pods of `namespace` with exactly these labels. Several identities can share (namespace, labels)
    /// when their addresses are treated differently by some policy (ipBlock, named ports).
    Pod { namespace: String, labels: Labels },
    /// Addresses inside `prefix` (and not inside a more specific ipcache entry), from an `ipBlock`.
    Cidr { prefix: IpNet },
}

/// The policy state of one endpoint (a pod with an address that is not on the host network).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// Identity of the pod's first address.
    pub identity: u32,
    pub ips: Vec<IpAddr>,
    pub isolated_ingress: bool,
    pub isolated_egress: bool,
    /// The policies that isolate the endpoint for ingress (for "why was this dropped").
    pub ingress_policies: Vec<ObjectRef>,
    pub egress_policies: Vec<ObjectRef>,
    /// Allowed traffic → rule id of the first rule (in policy, then rule order) that allows it.
    pub allow: BTreeMap<AllowKey, u32>,
}

/// The desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Address prefix → identity: pod addresses (/32, /128), ipBlock cidrs and excepts, host addresses
    /// (node IPs and host-network pods) → [`ztrust_common::identity::HOST`].
    pub ipcache: BTreeMap<IpNet, u32>,
    pub identities: BTreeMap<u32, IdentityInfo>,
    pub endpoints: BTreeMap<ObjectRef, EndpointPolicy>,
    /// Rule id (≥ 1) → rule.
    pub rules: BTreeMap<u32, RuleRef>,
    /// What compiled but cannot be enforced exactly, named by object and field.
    pub warnings: Vec<String>,
}
