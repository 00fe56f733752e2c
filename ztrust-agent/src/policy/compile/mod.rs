//! The compiler: identities, ipcache, per-endpoint allow sets — kept up to date incrementally.
//!
//! The engine keeps, between calls, everything it derived from the cluster: the identity of every pod
//! address, the pods of every (namespace, labels) group, the identities every peer of a compiled rule
//! matches, and which policies select which endpoint of this node. A change of one object then touches
//! only what depends on it:
//!
//! - a pod: its addresses' identities and ipcache entries; if an identity appears or disappears, the
//!   peers that match it, the rules that use those peers and the local endpoints those rules apply to;
//!   if the pod is on this node, its own allow set;
//! - a namespace's labels: the `namespaceSelector` peers that start or stop matching it;
//! - a policy: its rule ids, the local endpoints it selected or selects, their allow sets.
//!
//! Allow sets are compiled only for the endpoints of this node ([`Engine::for_node`]); the rest of the
//! cluster contributes identities and ipcache entries (peers). Two kinds of change re-derive everything
//! ([`Engine::rebuild`]), because they change the identity of addresses anywhere: the set of ipBlock
//! prefixes or egress named ports that the cluster's policies use, and the set of host addresses (node
//! IPs, host-network pods).

mod allocator;
mod endpoints;
mod identities;
mod peers;
mod rules;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use self::allocator::Allocator;
pub(crate) use self::peers::namespace_matches;
use self::peers::peer_matches;
pub(super) use self::rules::facts;
use self::rules::{effective, rule_keys};
use ipnet::IpNet;
use ztrust_common::{dir, identity, proto};

use super::{AllowGroup, AllowKey, Changes, Delta, Desired, EndpointPolicy, IdentityInfo, RuleRef, matches};
use crate::model::{
    Cluster, ContainerPort, LabelSelector, Labels, NetworkPolicy, ObjectRef, Peer, Pod, PortRef, Protocol,
    Rule,
};

/// A named port as a rule refers to it: the name and the rule's protocol. A container port matches
/// only if both its name and its protocol are the same.
type NamedPort = (String, Protocol);

/// The address-dependent facts that policies can see about one pod address, beyond its namespace and
/// labels. Two addresses with the same namespace, labels and signature are indistinguishable to every
/// rule, so they can share an identity without changing any verdict.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Signature {
    /// The ipBlock prefixes (cidrs and excepts of effective rules) that contain the address.
    prefixes: Vec<IpNet>,
    /// For each named port that an egress rule uses, the numbers it resolves to on this pod (only
    /// those that resolve).
    named: Vec<(NamedPort, Vec<u16>)>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum IdentityKey {
    Pod {
        namespace: String,
        labels: Labels,
        sig: Signature,
    },
    Cidr(IpNet),
}

type RuleKey = (ObjectRef, u8, usize);

/// A peer of a rule, as far as which identities it matches goes: rules that use equal peers share it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum PeerKey {
    /// `podSelector`/`namespaceSelector`; `namespace` is the policy's when there is no
    /// namespaceSelector (else `None`).
    Pods {
        namespace_selector: Option<LabelSelector>,
        pod_selector: Option<LabelSelector>,
        namespace: Option<String>,
    },
    /// `ipBlock`, cidr and excepts truncated.
    Block { cidr: IpNet, except: Vec<IpNet> },
}

#[derive(Debug, Default)]
struct PeerState {
    ids: BTreeSet<u32>,
    /// ipBlock: some but not all host addresses are inside (the single host identity cannot say so).
    partial_host: bool,
    /// Compiled rules that use this peer.
    users: BTreeSet<RuleKey>,
}

/// A rule compiled once, shared by every local endpoint the policy selects.
#[derive(Debug, PartialEq, Eq)]
struct CompiledRule {
    rule_id: u32,
    /// Entries that do not depend on the endpoint (sorted, no repeats).
    keys: Vec<AllowKey>,
    /// Ingress named ports resolve against the endpoint's own container ports.
    ingress_named: Vec<NamedPort>,
    /// Remotes for `ingress_named`.
    remotes: BTreeSet<u32>,
    /// Egress named ports (the rule depends on which identities they resolve on).
    egress_named: Vec<NamedPort>,
    peers: Vec<PeerKey>,
    warnings: Vec<String>,
}

/// What the engine keeps of one endpoint pod (any node).
#[derive(Debug)]
struct PodState {
    /// Addresses, without repeats, with their identity key and number.
    addrs: Vec<(IpAddr, Arc<IdentityKey>, u32)>,
}

/// An endpoint of this node.
#[derive(Debug)]
struct Local {
    namespace: String,
    labels: Labels,
    ips: Vec<IpAddr>,
    ports: Vec<ContainerPort>,
    identity: u32,
    /// Policies that select it (and isolate at least one direction), in policy order.
    selected_by: BTreeSet<ObjectRef>,
}

/// Everything derived from the cluster.
#[derive(Debug, Default)]
struct State {
    built: bool,
    node_ips: Vec<IpAddr>,
    host_local_addrs: BTreeSet<IpAddr>,
    /// Node IPs, the node's other local addresses and addresses of host-network pods.
    host_addrs: BTreeSet<IpAddr>,
    host_pods: HashMap<ObjectRef, Vec<IpAddr>>,
    /// ipBlock prefixes and egress named ports of effective rules, with the number of uses.
    prefixes: BTreeMap<IpNet, usize>,
    egress_names: BTreeMap<NamedPort, usize>,
    lens_v4: BTreeSet<u8>,
    lens_v6: BTreeSet<u8>,
    namespaces: HashMap<String, Labels>,
    policies: BTreeMap<ObjectRef, Arc<NetworkPolicy>>,
    policies_by_ns: HashMap<String, BTreeSet<ObjectRef>>,
    pods: HashMap<ObjectRef, PodState>,
    /// Endpoint pods that claim each address; the first (in object order) owns it.
    claims: HashMap<IpAddr, BTreeSet<ObjectRef>>,
    /// Addresses claimed twice, or claimed and a host address (reported as warnings).
    contested: BTreeSet<IpAddr>,
    /// Namespace → labels → identity → owned addresses with it. An identity is *live* (peers see it)
    /// while it has an owned address.
    groups: HashMap<String, HashMap<Labels, BTreeMap<u32, usize>>>,
    id_keys: HashMap<u32, Arc<IdentityKey>>,
    /// ipBlock prefix → live pod identities whose addresses lie inside it.
    inside: HashMap<IpNet, BTreeSet<u32>>,
    /// Egress named port → live pod identities where it resolves, with the numbers.
    named_index: HashMap<NamedPort, BTreeMap<u32, Vec<u16>>>,
    /// Prefixes with a CIDR identity.
    cidr_ids: BTreeMap<IpNet, u32>,
    locals: BTreeMap<ObjectRef, Local>,
    locals_by_ns: HashMap<String, BTreeSet<ObjectRef>>,
    /// Policy → the local endpoints it selects (only policies that select some).
    selected: HashMap<ObjectRef, BTreeSet<ObjectRef>>,
    compiled: BTreeMap<RuleKey, CompiledRule>,
    peers: HashMap<PeerKey, PeerState>,
    // Work of the current update.
    touched_policies: BTreeSet<ObjectRef>,
    dirty_rules: BTreeSet<RuleKey>,
    dirty_endpoints: BTreeSet<ObjectRef>,
}

/// The engine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    /// Pods of other nodes are peers only. `None`: every pod is an endpoint (the directory source and
    /// the lab, where pods have no node).
    node: Option<String>,
    identities: Allocator<Arc<IdentityKey>>,
    rules: Allocator<RuleKey>,
    st: State,
    desired: Desired,
    delta: Delta,
    /// Backends frontends lost within `run --service-grace`.
    departed: super::services::Departed,
    frontends: super::services::FrontendCache,
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// The IPv4 space, `0.0.0.0/0`: the kernel keys it as `::ffff:0:0/96`, inside every IPv6 prefix shorter
/// than /96 that contains that /96 (`::/0`, `::/80` …). The ipcache always holds it, with the identity
/// of an IPv4 address outside every IPv4 CIDR (the CIDR identity of `0.0.0.0/0` if that is an ipBlock,
/// else [`identity::WORLD`]), so that an IPv4 address never takes an IPv6 prefix's identity.
pub fn v4_space() -> IpNet {
    IpNet::V4(ipnet::Ipv4Net::default())
}

/// Whether `net` is an IPv6 prefix inside `::ffff:0:0/96`, where the kernel keys IPv4: it gets no
/// ipcache entry (nor CIDR identity). No packet the datapath judges has such an address (an IPv6 packet
/// with an IPv4-mapped address is dropped as malformed), and an entry would match IPv4 addresses.
pub fn keyed_as_ipv4(net: &IpNet) -> bool {
    matches!(net, IpNet::V6(n) if n.prefix_len() >= 96 && n.network().to_ipv4_mapped().is_some())
}

fn is_endpoint(pod: &Pod) -> bool {
    !pod.host_network && !pod.ips.is_empty()
}

fn host_ips(pod: Option<&Pod>) -> Vec<IpAddr> {
    pod.filter(|p| p.host_network)
        .map(|p| p.ips.clone())
        .unwrap_or_default()
}

/// Whether `p` selects pods with `labels` in `namespace` (policies that isolate nothing select nothing).
fn selects(p: &NetworkPolicy, namespace: &str, labels: &Labels) -> bool {
    p.namespace == namespace && (p.isolates_ingress || p.isolates_egress) && matches(&p.pod_selector, labels)
}

/// Whether adding `delta` to `counts` makes a key appear or disappear.
fn set_changes<K: Ord>(counts: &BTreeMap<K, usize>, delta: &BTreeMap<K, isize>) -> bool {
    delta.iter().any(|(k, d)| {
        let n = counts.get(k).copied().unwrap_or(0) as isize;
        (n == 0) != (n + d == 0)
    })
}

/// Adds `delta` to `counts` (keys that reach 0 go).
fn apply_counts<K: Ord>(counts: &mut BTreeMap<K, usize>, delta: BTreeMap<K, isize>) {
    for (k, d) in delta {
        let n = counts.get(&k).copied().unwrap_or(0) as isize + d;
        if n > 0 {
            counts.insert(k, n as usize);
        } else {
            counts.remove(&k);
        }
    }
}

impl Engine {
    /// An engine for which every pod is an endpoint.
    pub fn new() -> Self {
        Self {
            node: None,
            identities: Allocator::new(identity::FIRST_DYNAMIC),
            rules: Allocator::new(1),
            st: State::default(),
            desired: Desired::default(),
            delta: Delta::default(),
            departed: super::services::Departed::default(),
            frontends: super::services::FrontendCache::default(),
        }
    }

    /// How long a backend a frontend lost stays one of its backends (see [`super::services`]): the
    /// node's proxy may translate to it until it has caught up. Zero (the default): not at all.
    pub fn set_service_grace(&mut self, grace: std::time::Duration) {
        self.departed.grace = grace;
    }

    /// When a lost backend's grace ends: [`Engine::expire_services`] is due then.
    pub fn next_service_expiry(&self) -> Option<std::time::Instant> {
        self.departed.next_expiry()
    }

    /// Drops the lost backends whose grace has ended by `now` from their frontends; the delta says
    /// whether the frontends changed.
    pub fn expire_services(&mut self, cluster: &Cluster, now: std::time::Instant) {
        if self.st.built && self.departed.next_expiry().is_some_and(|t| t <= now) {
            self.refresh_services_at(cluster, &Changes::default(), now);
        }
    }

    /// An engine for node `node`: pods with another `spec.nodeName` are peers, not endpoints (pods
    /// without a node name are endpoints).
    pub fn for_node(node: impl Into<String>) -> Self {
        Self {
            node: Some(node.into()),
            ..Self::new()
        }
    }

    /// The node of [`Engine::for_node`].
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    fn is_local(&self, pod: &Pod) -> bool {
        match (&self.node, &pod.node_name) {
            (Some(node), Some(n)) => n == node,
            _ => true,
        }
    }

    /// The desired state as of the last [`Engine::compile`] or [`Engine::update`].
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// What changed in [`Engine::desired`] since the last call (a rebuild says `full`).
    pub fn take_delta(&mut self) -> Delta {
        std::mem::take(&mut self.delta)
    }

    /// Compiles `cluster` from scratch (identity and rule numbers of what still exists are kept) and
    /// returns the desired state, with exact Kubernetes NetworkPolicy v1 semantics.
    ///
    /// Identities: pod addresses share an identity when they have the same namespace, labels and
    /// [`Signature`] — the ipBlock prefixes that contain the address (so that `ipBlock` rules, which the
    /// API lets match pod addresses, allow exactly the right ones) and the resolution of the named
    /// ports that egress rules use (a named port on egress resolves against the *destination* pod, so
    /// two pods with equal labels but different numbers for the name must be told apart). Every
    /// ipBlock cidr and except also gets a CIDR identity; with longest-prefix match, an address maps to
    /// the most specific prefix that contains it, and a rule's ipBlock allows a CIDR identity iff its
    /// prefix lies inside the cidr and not inside any except.
    pub fn compile(&mut self, cluster: &Cluster) -> Desired {
        self.rebuild(cluster);
        self.desired.clone()
    }

    /// Brings the desired state up to date with `cluster`, where only the objects named in `changes`
    /// changed since the last call. Falls back to [`Engine::rebuild`] on the first call and for changes
    /// that re-derive every identity (see the module documentation).
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn update(&mut self, cluster: &Cluster, changes: &Changes) -> &Desired {
        if !self.st.built
            || cluster.node_ips != self.st.node_ips
            || cluster.host_local_addrs != self.st.host_local_addrs
        {
            self.rebuild(cluster);
            return &self.desired;
        }
        // Host addresses, or a pod address equal to an ipBlock prefix (which then has no CIDR identity).
        let global_pod_change = changes.pods.iter().any(|r| {
            let new = cluster.pods.get(r);
            if self.st.host_pods.get(r).cloned().unwrap_or_default() != host_ips(new) {
                return true;
            }
            let old_ips = self
                .st
                .pods
                .get(r)
                .into_iter()
                .flat_map(|s| s.addrs.iter().map(|a| a.0));
            let new_ips = new
                .filter(|p| is_endpoint(p))
                .into_iter()
                .flat_map(|p| p.ips.iter().copied());
            old_ips
                .chain(new_ips)
                .any(|ip| self.st.prefixes.contains_key(&host_net(ip)))
        });
        if global_pod_change {
            self.rebuild(cluster);
            return &self.desired;
        }
        // Prefixes and egress named ports: a change of the sets re-derives every signature. Only the
        // counts of what the changed policies use are looked at.
        let mut prefixes: BTreeMap<IpNet, isize> = BTreeMap::new();
        let mut names: BTreeMap<NamedPort, isize> = BTreeMap::new();
        for r in &changes.policies {
            for (policy, step) in [
                (self.st.policies.get(r).map(AsRef::as_ref), -1),
                (cluster.policies.get(r), 1),
            ] {
                if let Some(policy) = policy {
                    let (p, n) = facts(policy);
                    p.into_iter()
                        .for_each(|k| *prefixes.entry(k).or_default() += step);
                    n.into_iter().for_each(|k| *names.entry(k).or_default() += step);
                }
            }
        }
        if set_changes(&self.st.prefixes, &prefixes) || set_changes(&self.st.egress_names, &names) {
            self.rebuild(cluster);
            return &self.desired;
        }
        apply_counts(&mut self.st.prefixes, prefixes);
        apply_counts(&mut self.st.egress_names, names);

        for ns in &changes.namespaces {
            self.namespace_changed(ns, cluster.namespaces.get(ns).map(|n| &n.labels));
        }
        for r in &changes.policies {
            self.policy_changed(r, cluster.policies.get(r));
        }
        for r in &changes.pods {
            self.pod_changed(r, cluster.pods.get(r));
        }
        self.settle();
        // Backends' identities come from the ipcache: a changed address or identity can change a class;
        // which identities are one class comes from the allow sets: a changed endpoint can merge or
        // split classes.
        if !changes.services.is_empty()
            || !changes.endpoint_slices.is_empty()
            || changes.service_cidrs
            || !self.delta.ipcache.is_empty()
            || !self.delta.endpoints.is_empty()
            || self.delta.full
            || self.frontends.node_differs(cluster)
        {
            self.refresh_services(cluster, changes);
        }
        &self.desired
    }

    /// Service frontends and ranges from `cluster` and the current ipcache, recomputed where `changes`
    /// and the delta reach ([`super::services::FrontendCache`]); the delta says whether they changed.
    fn refresh_services(&mut self, cluster: &Cluster, changes: &Changes) {
        self.refresh_services_at(cluster, changes, std::time::Instant::now());
    }

    fn refresh_services_at(&mut self, cluster: &Cluster, changes: &Changes, now: std::time::Instant) {
        let updates = self.frontends.refresh(
            cluster,
            &self.desired,
            &self.delta,
            changes,
            &mut self.departed,
            now,
        );
        let mut changed = false;
        for (frontend, classes) in updates {
            changed |= match classes {
                Some(c) => self.desired.services.insert(frontend, c.clone()) != Some(c),
                None => self.desired.services.remove(&frontend).is_some(),
            };
        }
        let cidrs: BTreeSet<IpNet> = cluster.service_cidrs.iter().map(IpNet::trunc).collect();
        if changed || cidrs != self.desired.service_cidrs {
            self.desired.service_cidrs = cidrs;
            self.delta.services = true;
        }
    }

    /// Re-derives everything from `cluster`.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn rebuild(&mut self, cluster: &Cluster) {
        self.identities.forget_holders();
        self.rules.forget_holders();
        self.st = State {
            built: true,
            node_ips: cluster.node_ips.clone(),
            host_local_addrs: cluster.host_local_addrs.clone(),
            ..State::default()
        };
        self.desired = Desired::default();
        self.desired
            .identities
            .insert(identity::WORLD, IdentityInfo::Reserved { name: "world" });
        self.desired
            .identities
            .insert(identity::HOST, IdentityInfo::Reserved { name: "host" });
        self.delta = Delta {
            full: true,
            ..Delta::default()
        };
        let st = &mut self.st;

        // Host addresses: node IPs, the node's other local addresses and host-network pods (not endpoints; never blockable on ingress, as
        // Kubernetes lets no pod block its node).
        st.host_addrs = cluster
            .node_ips
            .iter()
            .chain(&cluster.host_local_addrs)
            .copied()
            .collect();
        for (r, pod) in cluster
            .pods
            .iter()
            .filter(|(_, p)| p.host_network && !p.ips.is_empty())
        {
            st.host_addrs.extend(pod.ips.iter().copied());
            st.host_pods.insert(r.clone(), pod.ips.clone());
        }
        for (name, ns) in &cluster.namespaces {
            st.namespaces.insert(name.clone(), ns.labels.clone());
        }

        // Policies: what they let addresses be told apart by, rule numbers.
        for (r, p) in &cluster.policies {
            let (prefixes, names) = facts(p);
            prefixes
                .into_iter()
                .for_each(|k| *st.prefixes.entry(k).or_default() += 1);
            names
                .into_iter()
                .for_each(|k| *st.egress_names.entry(k).or_default() += 1);
            st.policies.insert(r.clone(), Arc::new(p.clone()));
            st.policies_by_ns
                .entry(p.namespace.clone())
                .or_default()
                .insert(r.clone());
        }
        for p in cluster.policies.values() {
            for key in rule_keys(p) {
                let id = self.rules.acquire(&key);
                self.desired.rules.insert(
                    id,
                    RuleRef {
                        policy: key.0,
                        direction: key.1,
                        index: key.2,
                    },
                );
            }
        }
        let st = &mut self.st;
        for p in st.prefixes.keys() {
            match p {
                IpNet::V4(_) => st.lens_v4.insert(p.prefix_len()),
                IpNet::V6(_) => st.lens_v6.insert(p.prefix_len()),
            };
        }

        // CIDR identities: every prefix that is not exactly an address of a pod or of the host (the /32
        // or /128 of the address is the more specific entry anyway) nor inside the IPv4-mapped space.
        let exact: BTreeSet<IpNet> = cluster
            .pods
            .values()
            .filter(|p| is_endpoint(p))
            .flat_map(|p| p.ips.iter().map(|ip| host_net(*ip)))
            .chain(st.host_addrs.iter().map(|ip| host_net(*ip)))
            .collect();
        let cidrs: Vec<IpNet> = st
            .prefixes
            .keys()
            .filter(|p| !exact.contains(p) && !keyed_as_ipv4(p))
            .copied()
            .collect();
        for p in cidrs {
            let id = self.identities.acquire(&Arc::new(IdentityKey::Cidr(p)));
            self.st.cidr_ids.insert(p, id);
            self.desired.ipcache.insert(p, id);
            self.desired
                .identities
                .insert(id, IdentityInfo::Cidr { prefix: p });
        }
        self.desired.ipcache.entry(v4_space()).or_insert(identity::WORLD);
        for ip in &self.st.host_addrs {
            if !keyed_as_ipv4(&host_net(*ip)) {
                self.desired.ipcache.insert(host_net(*ip), identity::HOST);
            }
        }

        // Pods, then what this node's endpoints need.
        for (r, pod) in &cluster.pods {
            self.pod_changed(r, Some(pod));
        }
        self.identities.sweep();
        self.rules.sweep();
        self.settle();
        self.refresh_services(cluster, &Changes::default());
    }
}
