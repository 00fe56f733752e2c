//! The pure policy engine: a [`Cluster`](crate::model::Cluster) in, the desired datapath state out.
//!
//! No BPF, no kube, no I/O. The datapath sync (`crate::datapath::sync`) diffs [`Desired`] against what
//! it last wrote and writes the maps; `crate::datapath::keys::lookup` simulates the kernel's lookup over
//! the same state so the engine can be tested against [`reference::reference_allowed`], an evaluator that reads the
//! NetworkPolicy objects directly.
//!
//! The model is Cilium's: a pod's address maps (ipcache, longest-prefix match) to a numeric *identity*
//! shared by every address that every policy treats alike; each endpoint has an allow set keyed by
//! (direction, remote identity, protocol, port range). See [`Engine::compile`] for how identities are
//! chosen so that sharing never changes a verdict.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::model::{Cluster, Labels, ObjectRef};

mod compile;
pub mod ipcache;
#[cfg(any(test, feature = "reference"))]
pub mod reference;
pub(crate) mod selector;
pub mod services;

#[cfg(test)]
pub(crate) mod proptests;
#[cfg(test)]
mod tests;

pub(crate) use compile::namespace_matches;
pub use compile::{Engine, keyed_as_ipv4, v4_space};
pub use ipcache::{IpcacheIndex, remote_identity};
pub use selector::matches;
pub use services::{BackendClass, Frontend};

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
    /// `world` (no ipcache entry but the IPv4 space's) or `host` (this node).
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
    /// Isolated for ingress by audited policies only (`ztrust.io/mode: audit` on each): a denial is a
    /// would-drop, and passes.
    pub audit_ingress: bool,
    pub audit_egress: bool,
    /// The policies that isolate the endpoint for ingress (for "why was this dropped"): the enforced
    /// ones, or the audited ones where no enforced policy isolates it.
    pub ingress_policies: Vec<ObjectRef>,
    pub egress_policies: Vec<ObjectRef>,
    /// Allowed traffic → rule id of the first rule (in policy, then rule order) that allows it.
    pub allow: BTreeMap<AllowKey, u32>,
}

/// The desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Address prefix → identity: pod addresses (/32, /128), ipBlock cidrs and excepts, host addresses
    /// (node IPs, the node's other local addresses and host-network pods) → [`ztrust_common::identity::HOST`], and always `0.0.0.0/0` (the
    /// kernel's `::ffff:0:0/96`, [`ztrust_common::identity::WORLD`] unless it is an ipBlock) so that no
    /// IPv6 prefix is ever the longest match of an IPv4 address. IPv6 prefixes and addresses inside
    /// `::ffff:0:0/96` have no entry: the kernel would key them as IPv4.
    pub ipcache: BTreeMap<IpNet, u32>,
    pub identities: BTreeMap<u32, IdentityInfo>,
    pub endpoints: BTreeMap<ObjectRef, EndpointPolicy>,
    /// Rule id (≥ 1) → rule.
    pub rules: BTreeMap<u32, RuleRef>,
    /// What compiled but cannot be enforced exactly, named by object and field.
    pub warnings: Vec<String>,
    /// Service frontends → the classes of their backends (see [`services`]).
    pub services: BTreeMap<Frontend, Vec<BackendClass>>,
    /// The Service address ranges: addresses in them that are no frontend have no known translation.
    pub service_cidrs: BTreeSet<IpNet>,
}

/// The objects that differ between two snapshots of a cluster (added, modified or deleted), by key:
/// what [`Engine::update`] needs to know to touch only what depends on them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub namespaces: BTreeSet<String>,
    pub pods: BTreeSet<ObjectRef>,
    pub policies: BTreeSet<ObjectRef>,
    pub services: BTreeSet<ObjectRef>,
    pub endpoint_slices: BTreeSet<ObjectRef>,
    /// The Service address ranges differ.
    pub service_cidrs: bool,
}

/// Keys whose value differs between `old` and `new` (present in one only, or unequal).
fn changed_keys<K: Ord + Clone, V: PartialEq>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> BTreeSet<K> {
    let mut out = BTreeSet::new();
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                out.insert((*k).clone());
                a.next();
            }
            (None, Some((k, _))) => {
                out.insert((*k).clone());
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.insert((*ka).clone());
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.insert((*kb).clone());
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if va != vb {
                        out.insert((*ka).clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    out
}

impl Changes {
    /// What differs between `old` and `new` (one ordered walk over each map).
    pub fn between(old: &Cluster, new: &Cluster) -> Self {
        Self {
            namespaces: changed_keys(&old.namespaces, &new.namespaces),
            pods: changed_keys(&old.pods, &new.pods),
            policies: changed_keys(&old.policies, &new.policies),
            services: changed_keys(&old.services, &new.services),
            endpoint_slices: changed_keys(&old.endpoint_slices, &new.endpoint_slices),
            service_cidrs: old.service_cidrs != new.service_cidrs,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.pods.is_empty()
            && self.policies.is_empty()
            && self.services.is_empty()
            && self.endpoint_slices.is_empty()
            && !self.service_cidrs
    }
}

/// A part of an endpoint's allow set: the entries of one direction, remote identity and protocol. Entries
/// of different groups never share a policy-map key, so each group can be written on its own.
pub type AllowGroup = (u8, u32, u8);

impl AllowKey {
    pub fn group(&self) -> AllowGroup {
        (self.direction, self.remote, self.protocol)
    }
}

/// What changed in the [`Desired`] state: the datapath sync rewrites only these (or everything when
/// `full`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Anything may have changed.
    pub full: bool,
    /// ipcache prefixes whose identity changed, appeared or went.
    pub ipcache: BTreeSet<IpNet>,
    /// Endpoints whose policy changed, appeared or went, with the allow groups that changed when only
    /// those did (`None`: anything about the endpoint).
    pub endpoints: BTreeMap<ObjectRef, Option<BTreeSet<AllowGroup>>>,
    /// The Service frontends or ranges changed.
    pub services: bool,
}

impl Delta {
    /// A delta that says everything may have changed.
    pub fn full() -> Self {
        Self {
            full: true,
            ..Self::default()
        }
    }

    /// Adds that `groups` of endpoint `ep` changed (`None`: anything about it).
    pub fn endpoint(&mut self, ep: &ObjectRef, groups: Option<BTreeSet<AllowGroup>>) {
        match (self.endpoints.get_mut(ep), groups) {
            (None, groups) => {
                self.endpoints.insert(ep.clone(), groups);
            }
            (Some(Some(known)), Some(more)) => known.extend(more),
            (Some(slot), _) => *slot = None,
        }
    }

    /// Adds what `other` says changed.
    pub fn merge(&mut self, other: Delta) {
        self.full |= other.full;
        self.services |= other.services;
        if self.full {
            self.ipcache.clear();
            self.endpoints.clear();
            return;
        }
        self.ipcache.extend(other.ipcache);
        for (ep, groups) in other.endpoints {
            self.endpoint(&ep, groups);
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.full && self.ipcache.is_empty() && self.endpoints.is_empty() && !self.services
    }
}
