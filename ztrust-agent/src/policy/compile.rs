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

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

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

/// Hands out numbers to keys, keeping the number of a key for as long as something holds it. Freed
/// numbers are reused oldest-first, and never within the update that freed them, so that a number
/// means something else as late as possible (flows in flight and conntrack entries carry numbers).
#[derive(Debug)]
struct Allocator<K: Ord> {
    /// Key → (number, holders).
    ids: BTreeMap<K, (u32, usize)>,
    free: VecDeque<u32>,
    /// Freed during the current update; reusable after [`Allocator::finish`].
    freed: Vec<u32>,
    next: u32,
}

impl<K: Ord + Clone> Allocator<K> {
    fn new(first: u32) -> Self {
        Self {
            ids: BTreeMap::new(),
            free: VecDeque::new(),
            freed: Vec::new(),
            next: first,
        }
    }

    /// One more holder of `k`; its number.
    fn acquire(&mut self, k: &K) -> u32 {
        if let Some((id, n)) = self.ids.get_mut(k) {
            *n += 1;
            return *id;
        }
        let id = self.free.pop_front().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        self.ids.insert(k.clone(), (id, 1));
        id
    }

    /// One holder less; the number when it was the last one.
    fn release<Q>(&mut self, k: &Q) -> Option<u32>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let (id, n) = self.ids.get_mut(k)?;
        *n -= 1;
        if *n > 0 {
            return None;
        }
        let id = *id;
        self.ids.remove(k);
        self.freed.push(id);
        Some(id)
    }

    fn get<Q>(&self, k: &Q) -> Option<u32>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.ids.get(k).map(|(id, _)| *id)
    }

    /// Before a rebuild: every key loses its holders but keeps its number until [`Allocator::sweep`].
    fn forget_holders(&mut self) {
        for (_, n) in self.ids.values_mut() {
            *n = 0;
        }
    }

    /// After a rebuild: frees the keys nobody holds again.
    fn sweep(&mut self) {
        let freed = &mut self.freed;
        self.ids.retain(|_, (id, n)| {
            if *n == 0 {
                freed.push(*id);
            }
            *n > 0
        });
    }

    /// End of an update: what it freed becomes reusable, after what was freed earlier.
    fn finish(&mut self) {
        self.freed.sort_unstable();
        self.free.extend(self.freed.drain(..));
    }
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

fn effective(p: &NetworkPolicy) -> impl Iterator<Item = (u8, usize, &Rule)> {
    let ingress = p
        .ingress
        .iter()
        .enumerate()
        .filter(|_| p.isolates_ingress)
        .map(|(i, r)| (dir::INGRESS, i, r));
    let egress = p
        .egress
        .iter()
        .enumerate()
        .filter(|_| p.isolates_egress)
        .map(|(i, r)| (dir::EGRESS, i, r));
    ingress.chain(egress)
}

/// The ipBlock prefixes and egress named ports of `p`'s effective rules.
pub(super) fn facts(p: &NetworkPolicy) -> (Vec<IpNet>, Vec<NamedPort>) {
    let mut prefixes = Vec::new();
    let mut names = Vec::new();
    for (direction, _, rule) in effective(p) {
        for peer in &rule.peers {
            if let Peer::IpBlock { cidr, except } = peer {
                prefixes.push(cidr.trunc());
                prefixes.extend(except.iter().map(IpNet::trunc));
            }
        }
        if direction == dir::EGRESS {
            for port in &rule.ports {
                if let Some(PortRef::Name(n)) = &port.port {
                    names.push((n.clone(), port.protocol));
                }
            }
        }
    }
    (prefixes, names)
}

fn rule_keys(p: &NetworkPolicy) -> impl Iterator<Item = RuleKey> + '_ {
    let r = p.object_ref();
    let r2 = r.clone();
    (0..p.ingress.len())
        .map(move |i| (r.clone(), dir::INGRESS, i))
        .chain((0..p.egress.len()).map(move |i| (r2.clone(), dir::EGRESS, i)))
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
            self.refresh_services_at(cluster, now);
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
        {
            self.refresh_services(cluster);
        }
        &self.desired
    }

    /// Service frontends and ranges from `cluster` and the current ipcache; the delta says whether they
    /// changed.
    fn refresh_services(&mut self, cluster: &Cluster) {
        self.refresh_services_at(cluster, std::time::Instant::now());
    }

    fn refresh_services_at(&mut self, cluster: &Cluster, now: std::time::Instant) {
        let frontends = super::services::frontends_at(cluster, &self.desired, &mut self.departed, now);
        let cidrs: BTreeSet<IpNet> = cluster.service_cidrs.iter().map(IpNet::trunc).collect();
        if frontends != self.desired.services || cidrs != self.desired.service_cidrs {
            self.desired.services = frontends;
            self.desired.service_cidrs = cidrs;
            self.delta.services = true;
        }
    }

    /// Re-derives everything from `cluster`.
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
        self.refresh_services(cluster);
    }

    /// The identity key of each address of `pod` (no repeats).
    fn pod_keys(&self, pod: &Pod) -> Vec<(IpAddr, IdentityKey)> {
        let named: Vec<(NamedPort, Vec<u16>)> = self
            .st
            .egress_names
            .keys()
            .filter_map(|np| {
                let nums: BTreeSet<u16> = pod
                    .ports
                    .iter()
                    .filter(|c| c.name.as_deref() == Some(np.0.as_str()) && c.protocol == np.1)
                    .map(|c| c.port)
                    .collect();
                (!nums.is_empty()).then(|| (np.clone(), nums.into_iter().collect()))
            })
            .collect();
        let mut seen = BTreeSet::new();
        pod.ips
            .iter()
            .filter(|ip| seen.insert(**ip))
            .map(|ip| {
                let lens = if ip.is_ipv4() {
                    &self.st.lens_v4
                } else {
                    &self.st.lens_v6
                };
                let prefixes: Vec<IpNet> = lens
                    .iter()
                    .filter_map(|len| IpNet::new(*ip, *len).ok().map(|n| n.trunc()))
                    .filter(|n| self.st.prefixes.contains_key(n))
                    .collect();
                let key = IdentityKey::Pod {
                    namespace: pod.namespace.clone(),
                    labels: pod.labels.clone(),
                    sig: Signature {
                        prefixes,
                        named: named.clone(),
                    },
                };
                (*ip, key)
            })
            .collect()
    }

    fn set_ipcache(&mut self, net: IpNet, id: u32) {
        if keyed_as_ipv4(&net) {
            return;
        }
        if self.desired.ipcache.insert(net, id) != Some(id) {
            self.delta.ipcache.insert(net);
        }
    }

    fn del_ipcache(&mut self, net: IpNet) {
        if self.desired.ipcache.remove(&net).is_some() {
            self.delta.ipcache.insert(net);
        }
    }

    fn pod_changed(&mut self, r: &ObjectRef, new: Option<&Pod>) {
        // The old state goes.
        if let Some(old) = self.st.pods.remove(r) {
            for (ip, key, id) in &old.addrs {
                self.unclaim(*ip, r, *id);
                if let Some(id) = self.identities.release(key.as_ref()) {
                    self.desired.identities.remove(&id);
                    self.st.id_keys.remove(&id);
                }
            }
        }
        if let Some(local) = self.st.locals.remove(r) {
            if let Some(set) = self.st.locals_by_ns.get_mut(&local.namespace) {
                set.remove(r);
            }
            for p in &local.selected_by {
                if let Some(set) = self.st.selected.get_mut(p) {
                    set.remove(r);
                }
                self.st.touched_policies.insert(p.clone());
            }
            self.st.dirty_endpoints.insert(r.clone());
        }
        if new.is_none() {
            self.st.host_pods.remove(r);
        }
        let Some(pod) = new.filter(|p| is_endpoint(p)) else {
            return;
        };

        // The new one comes.
        let mut addrs = Vec::new();
        for (ip, key) in self.pod_keys(pod) {
            let key = match self.identities.ids.get_key_value(&key) {
                Some((k, _)) => k.clone(),
                None => Arc::new(key),
            };
            let id = self.identities.acquire(&key);
            if let std::collections::hash_map::Entry::Vacant(e) = self.st.id_keys.entry(id) {
                e.insert(key.clone());
                if let IdentityKey::Pod {
                    namespace, labels, ..
                } = key.as_ref()
                {
                    self.desired.identities.insert(
                        id,
                        IdentityInfo::Pod {
                            namespace: namespace.clone(),
                            labels: labels.clone(),
                        },
                    );
                }
            }
            addrs.push((ip, key, id));
        }
        let identity = addrs.first().map_or(identity::WORLD, |a| a.2);
        for (ip, _, id) in &addrs {
            self.claim(*ip, r, *id);
        }
        self.st.pods.insert(r.clone(), PodState { addrs });

        if self.is_local(pod) {
            let selected_by: BTreeSet<ObjectRef> = self
                .st
                .policies_by_ns
                .get(&pod.namespace)
                .into_iter()
                .flatten()
                .filter(|p| selects(&self.st.policies[*p], &pod.namespace, &pod.labels))
                .cloned()
                .collect();
            for p in &selected_by {
                self.st.selected.entry(p.clone()).or_default().insert(r.clone());
                self.st.touched_policies.insert(p.clone());
            }
            self.st
                .locals_by_ns
                .entry(pod.namespace.clone())
                .or_default()
                .insert(r.clone());
            self.st.locals.insert(
                r.clone(),
                Local {
                    namespace: pod.namespace.clone(),
                    labels: pod.labels.clone(),
                    ips: pod.ips.clone(),
                    ports: pod.ports.clone(),
                    identity,
                    selected_by,
                },
            );
            self.st.dirty_endpoints.insert(r.clone());
        }
    }

    /// The number of `pod`'s identity for its address `ip`.
    fn id_of(&self, pod: &ObjectRef, ip: IpAddr) -> Option<u32> {
        self.st
            .pods
            .get(pod)?
            .addrs
            .iter()
            .find(|a| a.0 == ip)
            .map(|a| a.2)
    }

    fn update_contested(&mut self, ip: IpAddr) {
        let n = self.st.claims.get(&ip).map_or(0, BTreeSet::len);
        if n > 1 || (n == 1 && self.st.host_addrs.contains(&ip)) {
            self.st.contested.insert(ip);
        } else {
            self.st.contested.remove(&ip);
        }
    }

    /// `pod` (whose identity for `ip` is `id`) claims `ip`; the first claimant in object order owns it.
    fn claim(&mut self, ip: IpAddr, pod: &ObjectRef, id: u32) {
        let set = self.st.claims.entry(ip).or_default();
        let previous = set.first().cloned();
        set.insert(pod.clone());
        let owner_now = set.first() == Some(pod);
        self.update_contested(ip);
        if self.st.host_addrs.contains(&ip) || !owner_now {
            return;
        }
        if let Some(prev) = previous
            && let Some(prev_id) = self.id_of(&prev, ip)
        {
            self.group_add(prev_id, false);
        }
        self.group_add(id, true);
        self.set_ipcache(host_net(ip), id);
    }

    /// `pod` (whose identity for `ip` was `id`; no longer in `st.pods`) gives `ip` up.
    fn unclaim(&mut self, ip: IpAddr, pod: &ObjectRef, id: u32) {
        let Some(set) = self.st.claims.get_mut(&ip) else {
            return;
        };
        let was_owner = set.first() == Some(pod);
        set.remove(pod);
        let next = set.first().cloned();
        if set.is_empty() {
            self.st.claims.remove(&ip);
        }
        self.update_contested(ip);
        if self.st.host_addrs.contains(&ip) || !was_owner {
            return;
        }
        self.group_add(id, false);
        match next.and_then(|n| self.id_of(&n, ip)) {
            Some(next_id) => {
                self.group_add(next_id, true);
                self.set_ipcache(host_net(ip), next_id);
            }
            None => self.del_ipcache(host_net(ip)),
        }
    }

    /// One owned address more (`add`) or less with identity `id`; an identity becomes live with its
    /// first and dead with its last.
    fn group_add(&mut self, id: u32, add: bool) {
        let Some(key) = self.st.id_keys.get(&id).cloned() else {
            return;
        };
        let IdentityKey::Pod {
            namespace,
            labels,
            sig,
        } = key.as_ref()
        else {
            return;
        };
        let ids = self
            .st
            .groups
            .entry(namespace.clone())
            .or_default()
            .entry(labels.clone())
            .or_default();
        let n = ids.entry(id).or_default();
        let transition = if add {
            *n += 1;
            *n == 1
        } else {
            *n -= 1;
            *n == 0
        };
        if !transition {
            return;
        }
        if !add {
            ids.remove(&id);
            if ids.is_empty()
                && let Some(by_labels) = self.st.groups.get_mut(namespace)
            {
                by_labels.remove(labels);
                if by_labels.is_empty() {
                    self.st.groups.remove(namespace);
                }
            }
        }
        // Indexes and the peers that match it.
        for p in &sig.prefixes {
            let set = self.st.inside.entry(*p).or_default();
            if add {
                set.insert(id);
            } else {
                set.remove(&id);
            }
        }
        for (np, nums) in &sig.named {
            let map = self.st.named_index.entry(np.clone()).or_default();
            if add {
                map.insert(id, nums.clone());
            } else {
                map.remove(&id);
            }
        }
        let ns_labels = self.st.namespaces.get(namespace.as_str());
        for (pk, ps) in &mut self.st.peers {
            if peer_matches(pk, namespace, labels, sig, ns_labels) {
                let changed = if add {
                    ps.ids.insert(id)
                } else {
                    ps.ids.remove(&id)
                };
                if changed {
                    self.st.dirty_rules.extend(ps.users.iter().cloned());
                }
            }
        }
        if !sig.named.is_empty() {
            for (rk, cr) in &self.st.compiled {
                if cr
                    .egress_named
                    .iter()
                    .any(|np| sig.named.iter().any(|(n, _)| n == np))
                {
                    self.st.dirty_rules.insert(rk.clone());
                }
            }
        }
    }

    fn namespace_changed(&mut self, name: &str, labels: Option<&Labels>) {
        let empty = Labels::new();
        let new = labels.unwrap_or(&empty);
        let old = self.st.namespaces.get(name).cloned().unwrap_or_default();
        if &old == new {
            return;
        }
        match labels {
            Some(l) => self.st.namespaces.insert(name.to_owned(), l.clone()),
            None => self.st.namespaces.remove(name),
        };
        let Some(groups) = self.st.groups.get(name) else {
            return;
        };
        for ps_key in self.st.peers.keys().cloned().collect::<Vec<_>>() {
            let PeerKey::Pods {
                namespace_selector: Some(ns_sel),
                pod_selector,
                ..
            } = &ps_key
            else {
                continue;
            };
            let (was, now) = (matches(ns_sel, &old), matches(ns_sel, new));
            if was == now {
                continue;
            }
            let ids: Vec<u32> = groups
                .iter()
                .filter(|(l, _)| pod_selector.as_ref().is_none_or(|s| matches(s, l)))
                .flat_map(|(_, ids)| ids.keys().copied())
                .collect();
            let ps = self.st.peers.get_mut(&ps_key).expect("peer");
            for id in ids {
                if now {
                    ps.ids.insert(id);
                } else {
                    ps.ids.remove(&id);
                }
            }
            self.st.dirty_rules.extend(ps.users.iter().cloned());
        }
    }

    fn policy_changed(&mut self, r: &ObjectRef, new: Option<&NetworkPolicy>) {
        let old = self.st.policies.remove(r);
        // Rule numbers: kept for the rules that are still there.
        let old_keys: BTreeSet<RuleKey> = old.iter().flat_map(|p| rule_keys(p)).collect();
        let new_keys: BTreeSet<RuleKey> = new.iter().flat_map(|p| rule_keys(p)).collect();
        for k in old_keys.difference(&new_keys) {
            if let Some(id) = self.rules.release(k) {
                self.desired.rules.remove(&id);
            }
        }
        for k in new_keys.difference(&old_keys) {
            let id = self.rules.acquire(k);
            self.desired.rules.insert(
                id,
                RuleRef {
                    policy: k.0.clone(),
                    direction: k.1,
                    index: k.2,
                },
            );
        }
        // What it selected, and its compiled rules, go.
        if let Some(old) = &old {
            if let Some(set) = self.st.policies_by_ns.get_mut(&old.namespace) {
                set.remove(r);
            }
            for ep in self.st.selected.remove(r).unwrap_or_default() {
                if let Some(local) = self.st.locals.get_mut(&ep) {
                    local.selected_by.remove(r);
                }
                self.st.dirty_endpoints.insert(ep);
            }
            self.drop_rules(r);
        }
        let Some(p) = new else {
            return;
        };
        self.st.policies.insert(r.clone(), Arc::new(p.clone()));
        self.st
            .policies_by_ns
            .entry(p.namespace.clone())
            .or_default()
            .insert(r.clone());
        let eps: Vec<ObjectRef> = self
            .st
            .locals_by_ns
            .get(&p.namespace)
            .into_iter()
            .flatten()
            .filter(|ep| {
                let l = &self.st.locals[*ep];
                selects(p, &l.namespace, &l.labels)
            })
            .cloned()
            .collect();
        for ep in &eps {
            if let Some(local) = self.st.locals.get_mut(ep) {
                local.selected_by.insert(r.clone());
            }
            self.st.dirty_endpoints.insert(ep.clone());
        }
        if !eps.is_empty() {
            self.st.selected.insert(r.clone(), eps.into_iter().collect());
        }
        self.st.touched_policies.insert(r.clone());
    }

    fn drop_rules(&mut self, policy: &ObjectRef) {
        let keys: Vec<RuleKey> = self
            .st
            .compiled
            .range((policy.clone(), 0, 0)..)
            .take_while(|(k, _)| &k.0 == policy)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            let cr = self.st.compiled.remove(&k).expect("compiled rule");
            for pk in &cr.peers {
                if let Some(ps) = self.st.peers.get_mut(pk) {
                    ps.users.remove(&k);
                    if ps.users.is_empty() {
                        self.st.peers.remove(pk);
                    }
                }
            }
        }
    }

    /// Compiles what the changes made necessary: rules of policies that now select a local endpoint
    /// (dropping those that select none), rules whose peers changed, then the allow sets of the local
    /// endpoints that depend on any of it.
    fn settle(&mut self) {
        for p in std::mem::take(&mut self.st.touched_policies) {
            let active = self.st.selected.get(&p).is_some_and(|s| !s.is_empty());
            if !active {
                self.st.selected.remove(&p);
                self.drop_rules(&p);
                continue;
            }
            let Some(policy) = self.st.policies.get(&p).cloned() else {
                continue;
            };
            let mut added = false;
            for (direction, index, _) in effective(&policy) {
                let key = (p.clone(), direction, index);
                if !self.st.compiled.contains_key(&key) {
                    self.build_rule(&policy, key);
                    added = true;
                }
            }
            if added {
                let eps = self.st.selected[&p].iter().cloned().collect::<Vec<_>>();
                self.st.dirty_endpoints.extend(eps);
            }
        }
        // Rules whose peers (or named-port identities) changed: all compiled again first, then the
        // endpoints that use them patched entry by entry (or recompiled whole when a patch cannot say).
        let mut rebuilt = Vec::new();
        for key in std::mem::take(&mut self.st.dirty_rules) {
            let Some(old) = self.st.compiled.remove(&key) else {
                continue;
            };
            let Some(policy) = self.st.policies.get(&key.0).cloned() else {
                continue;
            };
            self.build_rule(&policy, key.clone());
            if self.st.compiled.get(&key) != Some(&old) {
                rebuilt.push((key, old));
            }
        }
        for (key, old) in rebuilt {
            let eps: Vec<ObjectRef> = self
                .st
                .selected
                .get(&key.0)
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            for ep in eps {
                if self.st.dirty_endpoints.contains(&ep) {
                    continue;
                }
                match self.patch_endpoint(&ep, &key, &old) {
                    Some(groups) if groups.is_empty() => {}
                    Some(groups) => self.delta.endpoint(&ep, Some(groups)),
                    None => {
                        self.st.dirty_endpoints.insert(ep);
                    }
                }
            }
        }
        for ep in std::mem::take(&mut self.st.dirty_endpoints) {
            let new = self.endpoint_policy(&ep);
            let old = match new {
                Some(new) => self.desired.endpoints.insert(ep.clone(), new),
                None => self.desired.endpoints.remove(&ep),
            };
            if old.as_ref() != self.desired.endpoints.get(&ep) {
                self.delta.endpoint(&ep, None);
            }
        }
        self.identities.finish();
        self.rules.finish();
        self.desired.warnings = self.warnings();
    }

    fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for ip in &self.st.contested {
            let Some(claims) = self.st.claims.get(ip) else {
                continue;
            };
            let first = claims.first().expect("a claim");
            for pod in claims {
                if pod == first {
                    if self.st.host_addrs.contains(ip) {
                        out.push(format!(
                            "Pod {pod}: status.podIPs: address {ip} is an address of the node; traffic from it is treated as the node's"
                        ));
                    }
                } else {
                    out.push(format!(
                        "Pod {pod}: status.podIPs: address {ip} is also the address of Pod {first}; the ipcache maps it to {first}"
                    ));
                }
            }
        }
        out.extend(
            self.st
                .compiled
                .values()
                .flat_map(|cr| cr.warnings.iter().cloned()),
        );
        out
    }

    /// The allow set and isolation of local endpoint `ep`, from the compiled rules of the policies that
    /// select it (in policy, then rule order: the first rule that allows an entry names it).
    fn endpoint_policy(&self, ep: &ObjectRef) -> Option<EndpointPolicy> {
        let local = self.st.locals.get(ep)?;
        let of = |direction: u8| -> Vec<&ObjectRef> {
            local
                .selected_by
                .iter()
                .filter(|p| {
                    let p = &self.st.policies[*p];
                    if direction == dir::INGRESS {
                        p.isolates_ingress
                    } else {
                        p.isolates_egress
                    }
                })
                .collect()
        };
        let (ingress_of, egress_of) = (of(dir::INGRESS), of(dir::EGRESS));
        let mut out = EndpointPolicy {
            identity: local.identity,
            ips: local.ips.clone(),
            isolated_ingress: !ingress_of.is_empty(),
            isolated_egress: !egress_of.is_empty(),
            ingress_policies: ingress_of.iter().map(|p| (*p).clone()).collect(),
            egress_policies: egress_of.iter().map(|p| (*p).clone()).collect(),
            allow: BTreeMap::new(),
        };
        for (direction, list) in [(dir::INGRESS, &ingress_of), (dir::EGRESS, &egress_of)] {
            for p in list {
                let policy = &self.st.policies[*p];
                let n = if direction == dir::INGRESS {
                    policy.ingress.len()
                } else {
                    policy.egress.len()
                };
                for ri in 0..n {
                    let Some(cr) = self.st.compiled.get(&((*p).clone(), direction, ri)) else {
                        debug_assert!(false, "rule {p} {direction} {ri} not compiled");
                        continue;
                    };
                    for k in &cr.keys {
                        out.allow.entry(*k).or_insert(cr.rule_id);
                    }
                    if !cr.ingress_named.is_empty() {
                        for r in &cr.remotes {
                            for k in named_keys(cr, local, *r) {
                                out.allow.entry(k).or_insert(cr.rule_id);
                            }
                        }
                    }
                }
            }
        }
        Some(out)
    }

    /// Brings local endpoint `ep`'s allow set from rule `key` as `old` to the rule as compiled now, entry
    /// by entry: what the rule no longer allows goes to the next rule (in policy, then rule order) that
    /// allows it, if any; what it newly allows is its own unless an earlier rule has it. Returns the
    /// allow groups that changed, or `None` if the change is not one a patch can make (then the
    /// endpoint is compiled whole).
    fn patch_endpoint(
        &mut self,
        ep: &ObjectRef,
        key: &RuleKey,
        old: &CompiledRule,
    ) -> Option<BTreeSet<AllowGroup>> {
        let new = self.st.compiled.get(key)?;
        let local = self.st.locals.get(ep)?;
        if new.rule_id != old.rule_id
            || new.ingress_named != old.ingress_named
            || !self.desired.endpoints.contains_key(ep)
        {
            return None;
        }
        let mut removed = sorted_difference(&old.keys, &new.keys);
        let mut added = sorted_difference(&new.keys, &old.keys);
        if !new.ingress_named.is_empty() {
            let named = |cr: &CompiledRule, remotes: Vec<&u32>| -> Vec<AllowKey> {
                remotes
                    .into_iter()
                    .flat_map(|r| named_keys(cr, local, *r))
                    .collect()
            };
            removed.extend(named(old, old.remotes.difference(&new.remotes).collect()));
            added.extend(named(new, new.remotes.difference(&old.remotes).collect()));
        }
        let rule_id = new.rule_id;
        let mut groups = BTreeSet::new();
        let mut updates: Vec<(AllowKey, Option<u32>)> = Vec::new();
        {
            let allow = &self.desired.endpoints[ep].allow;
            for k in &removed {
                if allow.get(k) == Some(&rule_id) {
                    updates.push((*k, self.first_provider(local, k)));
                }
            }
            for k in &added {
                match allow.get(k) {
                    None => updates.push((*k, Some(rule_id))),
                    Some(current) if *current != rule_id && self.earlier(rule_id, *current) => {
                        updates.push((*k, Some(rule_id)));
                    }
                    Some(_) => {}
                }
            }
        }
        let allow = &mut self.desired.endpoints.get_mut(ep).expect("endpoint").allow;
        for (k, value) in updates {
            let before = match value {
                Some(id) => allow.insert(k, id),
                None => allow.remove(&k),
            };
            if before != value {
                groups.insert(k.group());
            }
        }
        Some(groups)
    }

    /// Whether rule `a` comes before rule `b` (both of one direction of one endpoint): in policy order,
    /// then rule order.
    fn earlier(&self, a: u32, b: u32) -> bool {
        match (self.desired.rules.get(&a), self.desired.rules.get(&b)) {
            (Some(a), Some(b)) => (&a.policy, a.index) < (&b.policy, b.index),
            _ => false,
        }
    }

    /// The rule id of the first rule (policy, then rule order) that gives `local` the entry `k`.
    fn first_provider(&self, local: &Local, k: &AllowKey) -> Option<u32> {
        for p in &local.selected_by {
            let policy = &self.st.policies[p];
            let (isolated, n) = if k.direction == dir::INGRESS {
                (policy.isolates_ingress, policy.ingress.len())
            } else {
                (policy.isolates_egress, policy.egress.len())
            };
            if !isolated {
                continue;
            }
            for ri in 0..n {
                let Some(cr) = self.st.compiled.get(&(p.clone(), k.direction, ri)) else {
                    continue;
                };
                if cr.keys.binary_search(k).is_ok() || named_keys(cr, local, k.remote).contains(k) {
                    return Some(cr.rule_id);
                }
            }
        }
        None
    }

    /// The identities `key` matches, computed from the groups and CIDR identities.
    fn scan_peer(&self, key: &PeerKey) -> PeerState {
        let mut ps = PeerState::default();
        match key {
            PeerKey::Pods {
                namespace_selector,
                pod_selector,
                namespace,
            } => {
                let empty = Labels::new();
                for (ns, groups) in &self.st.groups {
                    let ns_match = match (namespace_selector, namespace) {
                        (Some(sel), _) => matches(sel, self.st.namespaces.get(ns).unwrap_or(&empty)),
                        (None, Some(own)) => own == ns,
                        (None, None) => false,
                    };
                    if !ns_match {
                        continue;
                    }
                    for (labels, ids) in groups {
                        if pod_selector.as_ref().is_none_or(|s| matches(s, labels)) {
                            ps.ids.extend(ids.keys().copied());
                        }
                    }
                }
            }
            PeerKey::Block { cidr, except } => {
                // CIDR identities: all addresses that map to prefix p lie in p, so p ⊆ cidr and p ⊄
                // every except makes all of them match; any other p has none that matches (prefixes
                // nest or are disjoint, and an except inside p has its own, more specific entry).
                // Containment is per family: an IPv4 prefix is never inside an IPv6 one, nor the reverse,
                // whatever their kernel keys (IPv4 under `::ffff:0:0/96`, which [`v4_space`] holds).
                for (p, id) in self.st.cidr_ids.range(*cidr..) {
                    if !cidr.contains(p) {
                        if p.network() > cidr.broadcast() || !same_family(p, cidr) {
                            break;
                        }
                        continue;
                    }
                    if !except.iter().any(|e| e.contains(p)) {
                        ps.ids.insert(*id);
                    }
                }
                // Pod identities: their signature lists every ipBlock prefix containing the address.
                for id in self.st.inside.get(cidr).into_iter().flatten() {
                    if let Some(IdentityKey::Pod { sig, .. }) = self.st.id_keys.get(id).map(AsRef::as_ref)
                        && !except.iter().any(|e| sig.prefixes.contains(e))
                    {
                        ps.ids.insert(*id);
                    }
                }
                let in_block = |ip: &IpAddr| cidr.contains(ip) && !except.iter().any(|e| e.contains(ip));
                // The host identity stands for the host addresses with an ipcache entry.
                let host: Vec<&IpAddr> = self
                    .st
                    .host_addrs
                    .iter()
                    .filter(|ip| !keyed_as_ipv4(&host_net(**ip)))
                    .collect();
                let n = host.iter().filter(|ip| in_block(ip)).count();
                if n == host.len() && n > 0 {
                    ps.ids.insert(identity::HOST);
                }
                ps.partial_host = n > 0 && n < host.len();
            }
        }
        ps
    }

    /// Compiles rule `key` of `p` (creating the peers it needs) into `st.compiled`.
    fn build_rule(&mut self, p: &NetworkPolicy, key: RuleKey) {
        let (direction, index) = (key.1, key.2);
        let rule = if direction == dir::INGRESS {
            &p.ingress[index]
        } else {
            &p.egress[index]
        };
        let rule_id = self.rules.get(&key).unwrap_or(0);
        let (dir_name, peers_name) = if direction == dir::INGRESS {
            ("ingress", "from")
        } else {
            ("egress", "to")
        };
        let mut warnings = Vec::new();
        // "If this field is empty or missing, this rule matches all sources/destinations."
        let mut remotes = BTreeSet::new();
        if rule.peers.is_empty() {
            remotes.insert(identity::ANY);
        }
        let mut peer_keys = Vec::new();
        for (pi, peer) in rule.peers.iter().enumerate() {
            let pk = match peer {
                Peer::Pods {
                    namespace_selector,
                    pod_selector,
                } => PeerKey::Pods {
                    namespace_selector: namespace_selector.clone(),
                    pod_selector: pod_selector.clone(),
                    namespace: namespace_selector.is_none().then(|| p.namespace.clone()),
                },
                Peer::IpBlock { cidr, except } => PeerKey::Block {
                    cidr: cidr.trunc(),
                    except: except.iter().map(IpNet::trunc).collect(),
                },
            };
            if !self.st.peers.contains_key(&pk) {
                let ps = self.scan_peer(&pk);
                self.st.peers.insert(pk.clone(), ps);
            }
            let ps = self.st.peers.get_mut(&pk).expect("peer");
            ps.users.insert(key.clone());
            remotes.extend(ps.ids.iter().copied());
            if ps.partial_host && direction == dir::EGRESS {
                warnings.push(format!(
                    "NetworkPolicy {}: spec.{dir_name}[{index}].{peers_name}[{pi}].ipBlock: contains some but not all \
                     addresses of the host (node IPs, host-network pods); traffic to the host is not allowed by it",
                    p.object_ref()
                ));
            }
            peer_keys.push(pk);
        }
        // "If this field is empty or missing, this rule matches all ports."
        let mut ranges: Vec<(u8, u16, u16)> = Vec::new();
        let mut keys = Vec::new();
        let mut ingress_named = Vec::new();
        let mut egress_named = Vec::new();
        if rule.ports.is_empty() {
            ranges.push((proto::ANY, 0, u16::MAX));
        }
        for (si, spec) in rule.ports.iter().enumerate() {
            let protocol = spec.protocol.number();
            match &spec.port {
                None => ranges.push((protocol, 0, u16::MAX)),
                Some(PortRef::Number(n)) => {
                    let end = spec.end_port.unwrap_or(*n);
                    if end < *n {
                        warnings.push(format!(
                            "NetworkPolicy {}: spec.{dir_name}[{index}].ports[{si}].endPort: {end} < port {n}; the entry allows nothing",
                            p.object_ref()
                        ));
                    } else {
                        ranges.push((protocol, *n, end));
                    }
                }
                Some(PortRef::Name(name)) if direction == dir::INGRESS => {
                    ingress_named.push((name.clone(), spec.protocol));
                }
                Some(PortRef::Name(name)) => {
                    // Egress: the name resolves on each destination pod; non-pod destinations have
                    // no named ports, so they match nothing.
                    let np = (name.clone(), spec.protocol);
                    for (id, nums) in self.st.named_index.get(&np).into_iter().flatten() {
                        if rule.peers.is_empty() || remotes.contains(id) {
                            for n in nums {
                                keys.push(AllowKey {
                                    direction,
                                    remote: *id,
                                    protocol,
                                    port_lo: *n,
                                    port_hi: *n,
                                });
                            }
                        }
                    }
                    egress_named.push(np);
                }
            }
        }
        for r in &remotes {
            for (protocol, lo, hi) in &ranges {
                keys.push(AllowKey {
                    direction,
                    remote: *r,
                    protocol: *protocol,
                    port_lo: *lo,
                    port_hi: *hi,
                });
            }
        }
        keys.sort_unstable();
        keys.dedup();
        let cr = CompiledRule {
            rule_id,
            keys,
            ingress_named,
            remotes,
            egress_named,
            peers: peer_keys,
            warnings,
        };
        self.st.compiled.insert(key, cr);
    }
}

/// The entries an ingress rule's named ports give endpoint `local` for remote `remote`: "If this is a
/// string, it must be a named port on the pod" — the pod being the one the policy selects, for ingress.
fn named_keys(cr: &CompiledRule, local: &Local, remote: u32) -> Vec<AllowKey> {
    if !cr.remotes.contains(&remote) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (name, protocol) in &cr.ingress_named {
        for port in local
            .ports
            .iter()
            .filter(|c| c.name.as_deref() == Some(name.as_str()) && c.protocol == *protocol)
        {
            out.push(AllowKey {
                direction: dir::INGRESS,
                remote,
                protocol: protocol.number(),
                port_lo: port.port,
                port_hi: port.port,
            });
        }
    }
    out
}

/// The elements of sorted `a` that are not in sorted `b`.
fn sorted_difference(a: &[AllowKey], b: &[AllowKey]) -> Vec<AllowKey> {
    let mut out = Vec::new();
    let mut j = 0;
    for x in a {
        while j < b.len() && b[j] < *x {
            j += 1;
        }
        if j >= b.len() || b[j] != *x {
            out.push(*x);
        }
    }
    out
}

/// Whether a live pod identity of (`namespace`, `labels`, `sig`) belongs to peer `pk`.
fn peer_matches(
    pk: &PeerKey,
    namespace: &str,
    labels: &Labels,
    sig: &Signature,
    ns_labels: Option<&Labels>,
) -> bool {
    match pk {
        PeerKey::Pods {
            namespace_selector,
            pod_selector,
            namespace: own,
        } => {
            let ns_match = match (namespace_selector, own) {
                (Some(sel), _) => matches(sel, ns_labels.unwrap_or(&Labels::new())),
                (None, Some(own)) => own == namespace,
                (None, None) => false,
            };
            ns_match && pod_selector.as_ref().is_none_or(|s| matches(s, labels))
        }
        PeerKey::Block { cidr, except } => {
            sig.prefixes.contains(cidr) && !except.iter().any(|e| sig.prefixes.contains(e))
        }
    }
}

fn same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}
