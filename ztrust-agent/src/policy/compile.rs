//! The compiler: identities, ipcache, per-endpoint allow sets.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::rc::Rc;

use ipnet::IpNet;
use ztrust_common::{dir, identity, proto};

use super::{AllowKey, Desired, EndpointPolicy, IdentityInfo, RuleRef, matches};
use crate::model::{
    Cluster, LabelSelector, Labels, NetworkPolicy, ObjectRef, Peer, Pod, PortRef, Protocol, Rule,
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

/// Hands out numbers to keys, keeping the number of a key for as long as the key exists. Freed
/// numbers are reused oldest-first, so that a number means something else as late as possible (flows
/// in flight and conntrack entries carry numbers).
#[derive(Debug)]
struct Allocator<K: Ord> {
    ids: BTreeMap<K, u32>,
    free: VecDeque<u32>,
    next: u32,
}

impl<K: Ord + Clone> Allocator<K> {
    fn new(first: u32) -> Self {
        Self {
            ids: BTreeMap::new(),
            free: VecDeque::new(),
            next: first,
        }
    }

    /// Keeps the numbers of the keys in `wanted`, frees the others, numbers the new ones (in key order,
    /// so that the result does not depend on hash order).
    fn sync(&mut self, wanted: &BTreeSet<K>) {
        let mut freed = Vec::new();
        self.ids.retain(|k, id| {
            let keep = wanted.contains(k);
            if !keep {
                freed.push(*id);
            }
            keep
        });
        freed.sort_unstable();
        for k in wanted {
            if !self.ids.contains_key(k) {
                let id = match self.free.pop_front() {
                    Some(id) => id,
                    None => {
                        let id = self.next;
                        self.next += 1;
                        id
                    }
                };
                self.ids.insert(k.clone(), id);
            }
        }
        // Numbers freed now are reused only after those freed earlier.
        self.free.extend(freed);
    }

    fn get(&self, k: &K) -> Option<u32> {
        self.ids.get(k).copied()
    }
}

type RuleKey = (ObjectRef, u8, usize);

/// A `podSelector`/`namespaceSelector` peer; the namespace is the policy's when there is no
/// namespaceSelector.
type PodsPeerKey<'a> = (Option<LabelSelector>, Option<LabelSelector>, Option<&'a str>);

/// An `ipBlock` peer (truncated cidr and excepts).
type BlockKey = (IpNet, Vec<IpNet>);

/// Identities of a peer, shared between the rules that use the same peer.
type IdSet = Rc<BTreeSet<u32>>;

/// The engine. Its state is the identity and rule-id allocators, so that numbers stay the same across
/// [`Engine::compile`] calls for whatever did not change.
#[derive(Debug)]
pub struct Engine {
    identities: Allocator<IdentityKey>,
    rules: Allocator<RuleKey>,
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

/// Pods with equal namespace and labels: selectors cannot tell them apart.
struct Group<'a> {
    namespace: &'a str,
    labels: &'a Labels,
    /// Identities of the addresses of these pods.
    identities: BTreeSet<u32>,
}

/// A rule compiled once, shared by every endpoint the policy selects.
struct CompiledRule {
    rule_id: u32,
    /// Entries that do not depend on the endpoint.
    keys: Vec<AllowKey>,
    /// Ingress named ports resolve against the endpoint's own container ports.
    ingress_named: Vec<NamedPort>,
    /// Remotes for `ingress_named`.
    remotes: Rc<BTreeSet<u32>>,
}

struct Compiler<'a> {
    cluster: &'a Cluster,
    groups: Vec<Group<'a>>,
    groups_by_ns: BTreeMap<&'a str, Vec<usize>>,
    /// Pod identity → its signature.
    pod_ids: HashMap<u32, &'a Signature>,
    /// ipBlock prefix → pod identities whose address lies inside it.
    inside: HashMap<IpNet, BTreeSet<u32>>,
    /// Prefixes with a CIDR identity (sorted, for range queries).
    cidr_ids: BTreeMap<IpNet, u32>,
    /// Named port → pod identities where it resolves, with the numbers.
    named_index: HashMap<NamedPort, Vec<(u32, Vec<u16>)>>,
    host_addrs: BTreeSet<IpAddr>,
    peer_cache: HashMap<PodsPeerKey<'a>, IdSet>,
    block_cache: HashMap<BlockKey, (IdSet, bool)>,
    select_cache: HashMap<(&'a str, &'a LabelSelector), Rc<Vec<usize>>>,
    warnings: Vec<String>,
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
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

fn is_endpoint(pod: &Pod) -> bool {
    !pod.host_network && !pod.ips.is_empty()
}

impl Engine {
    pub fn new() -> Self {
        Self {
            identities: Allocator::new(identity::FIRST_DYNAMIC),
            rules: Allocator::new(1),
        }
    }

    /// Compiles `cluster` into the desired datapath state, with exact Kubernetes NetworkPolicy v1
    /// semantics.
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
        let mut d = Desired::default();
        let mut warnings = Vec::new();
        let policies: Vec<&NetworkPolicy> = cluster.policies.values().collect();

        // 1. What policies can see about addresses.
        let mut prefixes: BTreeSet<IpNet> = BTreeSet::new();
        let mut egress_names: BTreeSet<NamedPort> = BTreeSet::new();
        for p in &policies {
            for (direction, _, rule) in effective(p) {
                for peer in &rule.peers {
                    if let Peer::IpBlock { cidr, except } = peer {
                        prefixes.insert(cidr.trunc());
                        prefixes.extend(except.iter().map(IpNet::trunc));
                    }
                }
                if direction == dir::EGRESS {
                    for port in &rule.ports {
                        if let Some(PortRef::Name(n)) = &port.port {
                            egress_names.insert((n.clone(), port.protocol));
                        }
                    }
                }
            }
        }
        let prefix_set: std::collections::HashSet<IpNet> = prefixes.iter().copied().collect();
        let lens_v4: BTreeSet<u8> = prefixes
            .iter()
            .filter(|p| matches!(p, IpNet::V4(_)))
            .map(IpNet::prefix_len)
            .collect();
        let lens_v6: BTreeSet<u8> = prefixes
            .iter()
            .filter(|p| matches!(p, IpNet::V6(_)))
            .map(IpNet::prefix_len)
            .collect();
        let containing = |ip: IpAddr| -> Vec<IpNet> {
            let lens = if ip.is_ipv4() { &lens_v4 } else { &lens_v6 };
            let mut v: Vec<IpNet> = lens
                .iter()
                .filter_map(|len| IpNet::new(ip, *len).ok().map(|n| n.trunc()))
                .filter(|n| prefix_set.contains(n))
                .collect();
            v.sort();
            v
        };

        // 2. Addresses of the host: node IPs and host-network pods (not endpoints; never blockable on
        // ingress, as Kubernetes lets no pod block its node).
        let mut host_addrs: BTreeSet<IpAddr> = cluster.node_ips.iter().copied().collect();
        for pod in cluster.pods.values().filter(|p| p.host_network) {
            host_addrs.extend(pod.ips.iter().copied());
        }

        // 3. Pod addresses → identity keys.
        let endpoints: Vec<&Pod> = cluster.pods.values().filter(|p| is_endpoint(p)).collect();
        let mut addr_keys: Vec<Vec<IdentityKey>> = Vec::with_capacity(endpoints.len());
        let mut wanted: BTreeSet<IdentityKey> = BTreeSet::new();
        for pod in &endpoints {
            let named: Vec<(NamedPort, Vec<u16>)> = egress_names
                .iter()
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
            let keys: Vec<IdentityKey> = pod
                .ips
                .iter()
                .map(|ip| IdentityKey::Pod {
                    namespace: pod.namespace.clone(),
                    labels: pod.labels.clone(),
                    sig: Signature {
                        prefixes: containing(*ip),
                        named: named.clone(),
                    },
                })
                .collect();
            wanted.extend(keys.iter().cloned());
            addr_keys.push(keys);
        }
        let exact: BTreeSet<IpNet> = endpoints
            .iter()
            .flat_map(|p| p.ips.iter().map(|ip| host_net(*ip)))
            .chain(host_addrs.iter().map(|ip| host_net(*ip)))
            .collect();
        for p in prefixes.iter().filter(|p| !exact.contains(p)) {
            wanted.insert(IdentityKey::Cidr(*p));
        }
        self.identities.sync(&wanted);

        // 4. ipcache and identity display. Longest-prefix match makes the /32 and /128 of a pod win
        // over any CIDR that contains it.
        d.identities
            .insert(identity::WORLD, IdentityInfo::Reserved { name: "world" });
        d.identities
            .insert(identity::HOST, IdentityInfo::Reserved { name: "host" });
        let mut cidr_ids = BTreeMap::new();
        for key in &wanted {
            let Some(id) = self.identities.get(key) else {
                continue;
            };
            match key {
                IdentityKey::Cidr(p) => {
                    d.ipcache.insert(*p, id);
                    cidr_ids.insert(*p, id);
                    d.identities.insert(id, IdentityInfo::Cidr { prefix: *p });
                }
                IdentityKey::Pod {
                    namespace, labels, ..
                } => {
                    d.identities.insert(
                        id,
                        IdentityInfo::Pod {
                            namespace: namespace.clone(),
                            labels: labels.clone(),
                        },
                    );
                }
            }
        }
        let mut owner: HashMap<IpAddr, &ObjectRef> = HashMap::new();
        let mut groups: Vec<Group<'_>> = Vec::new();
        let mut group_index: HashMap<(&str, &Labels), usize> = HashMap::new();
        let mut pod_group: Vec<usize> = Vec::with_capacity(endpoints.len());
        let mut pod_ids: HashMap<u32, &Signature> = HashMap::new();
        let mut inside: HashMap<IpNet, BTreeSet<u32>> = HashMap::new();
        let mut named_index: HashMap<NamedPort, Vec<(u32, Vec<u16>)>> = HashMap::new();
        let pod_refs: Vec<ObjectRef> = endpoints.iter().map(|p| p.object_ref()).collect();
        for (i, pod) in endpoints.iter().enumerate() {
            let g = *group_index
                .entry((pod.namespace.as_str(), &pod.labels))
                .or_insert_with(|| {
                    groups.push(Group {
                        namespace: &pod.namespace,
                        labels: &pod.labels,
                        identities: BTreeSet::new(),
                    });
                    groups.len() - 1
                });
            pod_group.push(g);
            for (ip, key) in pod.ips.iter().zip(&addr_keys[i]) {
                let Some(id) = self.identities.get(key) else {
                    continue;
                };
                if let Some(first) = owner.get(ip) {
                    warnings.push(format!(
                        "Pod {}: status.podIPs: address {ip} is also the address of Pod {first}; the ipcache maps it to {first}",
                        pod_refs[i]
                    ));
                    continue;
                }
                owner.insert(*ip, &pod_refs[i]);
                if host_addrs.contains(ip) {
                    warnings.push(format!(
                        "Pod {}: status.podIPs: address {ip} is an address of the node; traffic from it is treated as the node's",
                        pod_refs[i]
                    ));
                    continue;
                }
                d.ipcache.insert(host_net(*ip), id);
                groups[g].identities.insert(id);
                if let IdentityKey::Pod { sig, .. } = key
                    && !pod_ids.contains_key(&id)
                {
                    for p in &sig.prefixes {
                        inside.entry(*p).or_default().insert(id);
                    }
                    for (np, nums) in &sig.named {
                        named_index
                            .entry(np.clone())
                            .or_default()
                            .push((id, nums.clone()));
                    }
                    pod_ids.insert(id, sig);
                }
            }
        }
        for ip in &host_addrs {
            d.ipcache.insert(host_net(*ip), identity::HOST);
        }
        let mut groups_by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (g, group) in groups.iter().enumerate() {
            groups_by_ns.entry(group.namespace).or_default().push(g);
        }

        // 5. Rule ids.
        let rule_keys: BTreeSet<RuleKey> = policies
            .iter()
            .flat_map(|p| {
                let r = p.object_ref();
                (0..p.ingress.len())
                    .map(move |i| (r.clone(), dir::INGRESS, i))
                    .chain((0..p.egress.len()).map({
                        let r = p.object_ref();
                        move |i| (r.clone(), dir::EGRESS, i)
                    }))
            })
            .collect();
        self.rules.sync(&rule_keys);
        for (key, id) in &self.rules.ids {
            d.rules.insert(
                *id,
                RuleRef {
                    policy: key.0.clone(),
                    direction: key.1,
                    index: key.2,
                },
            );
        }

        let mut c = Compiler {
            cluster,
            groups,
            groups_by_ns,
            pod_ids,
            inside,
            cidr_ids,
            named_index,
            host_addrs,
            peer_cache: HashMap::new(),
            block_cache: HashMap::new(),
            select_cache: HashMap::new(),
            warnings,
        };

        // 6. Which policies select which group, per direction (in policy order).
        let mut ingress_of: Vec<Vec<usize>> = vec![Vec::new(); c.groups.len()];
        let mut egress_of: Vec<Vec<usize>> = vec![Vec::new(); c.groups.len()];
        for (pi, p) in policies.iter().enumerate() {
            if !p.isolates_ingress && !p.isolates_egress {
                continue;
            }
            for g in c.select(&p.namespace, &p.pod_selector).iter() {
                if p.isolates_ingress {
                    ingress_of[*g].push(pi);
                }
                if p.isolates_egress {
                    egress_of[*g].push(pi);
                }
            }
        }

        // 7. Endpoints.
        let mut compiled: HashMap<(usize, u8, usize), Rc<CompiledRule>> = HashMap::new();
        for (i, pod) in endpoints.iter().enumerate() {
            let g = pod_group[i];
            let mut ep = EndpointPolicy {
                identity: addr_keys[i]
                    .first()
                    .and_then(|k| self.identities.get(k))
                    .unwrap_or(identity::WORLD),
                ips: pod.ips.clone(),
                isolated_ingress: !ingress_of[g].is_empty(),
                isolated_egress: !egress_of[g].is_empty(),
                ingress_policies: ingress_of[g]
                    .iter()
                    .map(|pi| policies[*pi].object_ref())
                    .collect(),
                egress_policies: egress_of[g].iter().map(|pi| policies[*pi].object_ref()).collect(),
                allow: BTreeMap::new(),
            };
            for (direction, list) in [(dir::INGRESS, &ingress_of[g]), (dir::EGRESS, &egress_of[g])] {
                for pi in list {
                    let p = policies[*pi];
                    let rules = if direction == dir::INGRESS {
                        &p.ingress
                    } else {
                        &p.egress
                    };
                    for (ri, rule) in rules.iter().enumerate() {
                        let cr = match compiled.get(&(*pi, direction, ri)) {
                            Some(cr) => cr.clone(),
                            None => {
                                let rule_id = self.rules.get(&(p.object_ref(), direction, ri)).unwrap_or(0);
                                let cr = Rc::new(c.compile_rule(p, direction, ri, rule, rule_id));
                                compiled.insert((*pi, direction, ri), cr.clone());
                                cr
                            }
                        };
                        for k in &cr.keys {
                            ep.allow.entry(*k).or_insert(cr.rule_id);
                        }
                        for (name, protocol) in &cr.ingress_named {
                            // "If this is a string, it must be a named port on the pod" — the pod
                            // being the one the policy selects, for ingress.
                            for port in pod.ports.iter().filter(|c| {
                                c.name.as_deref() == Some(name.as_str()) && c.protocol == *protocol
                            }) {
                                for r in cr.remotes.iter() {
                                    let k = AllowKey {
                                        direction,
                                        remote: *r,
                                        protocol: protocol.number(),
                                        port_lo: port.port,
                                        port_hi: port.port,
                                    };
                                    ep.allow.entry(k).or_insert(cr.rule_id);
                                }
                            }
                        }
                    }
                }
            }
            d.endpoints.insert(pod_refs[i].clone(), ep);
        }
        d.warnings = c.warnings;
        d
    }
}

impl<'a> Compiler<'a> {
    /// Groups of `namespace` whose labels `sel` matches.
    fn select(&mut self, namespace: &'a str, sel: &'a LabelSelector) -> Rc<Vec<usize>> {
        if let Some(v) = self.select_cache.get(&(namespace, sel)) {
            return v.clone();
        }
        let v: Vec<usize> = self
            .groups_by_ns
            .get(namespace)
            .map(|gs| {
                gs.iter()
                    .copied()
                    .filter(|g| matches(sel, self.groups[*g].labels))
                    .collect()
            })
            .unwrap_or_default();
        let v = Rc::new(v);
        self.select_cache.insert((namespace, sel), v.clone());
        v
    }

    fn namespace_labels(&self, ns: &str) -> Labels {
        // A namespace with no object in the cluster has no labels.
        self.cluster
            .namespaces
            .get(ns)
            .map(|n| n.labels.clone())
            .unwrap_or_default()
    }

    /// Identities a `podSelector`/`namespaceSelector` peer of a policy in `policy_ns` matches:
    /// "If namespaceSelector is also set, then the NetworkPolicyPeer as a whole selects the pods
    /// matching podSelector in the Namespaces selected by NamespaceSelector. Otherwise it selects the
    /// pods matching podSelector in the policy's own namespace."
    fn pods_peer(
        &mut self,
        policy_ns: &'a str,
        ns_sel: &Option<LabelSelector>,
        pod_sel: &Option<LabelSelector>,
    ) -> Rc<BTreeSet<u32>> {
        let key = (
            ns_sel.clone(),
            pod_sel.clone(),
            if ns_sel.is_none() { Some(policy_ns) } else { None },
        );
        if let Some(v) = self.peer_cache.get(&key) {
            return v.clone();
        }
        let namespaces: Vec<&str> = match ns_sel {
            None => vec![policy_ns],
            Some(sel) => self
                .groups_by_ns
                .keys()
                .copied()
                .filter(|ns| matches(sel, &self.namespace_labels(ns)))
                .collect(),
        };
        let mut out = BTreeSet::new();
        for ns in namespaces {
            for g in self.groups_by_ns.get(ns).into_iter().flatten() {
                let group = &self.groups[*g];
                if pod_sel.as_ref().is_none_or(|s| matches(s, group.labels)) {
                    out.extend(group.identities.iter().copied());
                }
            }
        }
        let out = Rc::new(out);
        self.peer_cache.insert(key, out.clone());
        out
    }

    /// Identities an `ipBlock` peer matches: every address in `cidr` and in no `except`. Returns
    /// whether some but not all host addresses match (which the single host identity cannot express).
    fn block_peer(&mut self, cidr: &IpNet, except: &[IpNet]) -> (Rc<BTreeSet<u32>>, bool) {
        let cidr = cidr.trunc();
        let except: Vec<IpNet> = except.iter().map(IpNet::trunc).collect();
        let key = (cidr, except.clone());
        if let Some(v) = self.block_cache.get(&key) {
            return v.clone();
        }
        let mut out = BTreeSet::new();
        // CIDR identities: all addresses that map to prefix p lie in p, so p ⊆ cidr and p ⊄ every
        // except makes all of them match; any other p has none that matches (prefixes nest or are
        // disjoint, and an except inside p has its own, more specific entry).
        for (p, id) in self.cidr_ids.range(cidr..) {
            if !cidr.contains(p) {
                if p.network() > cidr.broadcast() || !same_family(p, &cidr) {
                    break;
                }
                continue;
            }
            if !except.iter().any(|e| e.contains(p)) {
                out.insert(*id);
            }
        }
        // Pod identities: their signature lists every ipBlock prefix containing the address.
        if let Some(ids) = self.inside.get(&cidr) {
            for id in ids {
                let sig = self.pod_ids[id];
                if !except.iter().any(|e| sig.prefixes.contains(e)) {
                    out.insert(*id);
                }
            }
        }
        let in_block = |ip: &IpAddr| cidr.contains(ip) && !except.iter().any(|e| e.contains(ip));
        let n = self.host_addrs.iter().filter(|ip| in_block(ip)).count();
        if n == self.host_addrs.len() && n > 0 {
            out.insert(identity::HOST);
        }
        let partial = n > 0 && n < self.host_addrs.len();
        let v = (Rc::new(out), partial);
        self.block_cache.insert(key, v.clone());
        v
    }

    fn compile_rule(
        &mut self,
        p: &'a NetworkPolicy,
        direction: u8,
        index: usize,
        rule: &Rule,
        rule_id: u32,
    ) -> CompiledRule {
        let (dir_name, peers_name) = if direction == dir::INGRESS {
            ("ingress", "from")
        } else {
            ("egress", "to")
        };
        // "If this field is empty or missing, this rule matches all sources/destinations."
        let mut remotes = BTreeSet::new();
        if rule.peers.is_empty() {
            remotes.insert(identity::ANY);
        }
        for (pi, peer) in rule.peers.iter().enumerate() {
            match peer {
                Peer::Pods {
                    namespace_selector,
                    pod_selector,
                } => {
                    remotes.extend(
                        self.pods_peer(&p.namespace, namespace_selector, pod_selector)
                            .iter()
                            .copied(),
                    );
                }
                Peer::IpBlock { cidr, except } => {
                    let (ids, partial) = self.block_peer(cidr, except);
                    remotes.extend(ids.iter().copied());
                    if partial && direction == dir::EGRESS {
                        self.warnings.push(format!(
                            "NetworkPolicy {}: spec.{dir_name}[{index}].{peers_name}[{pi}].ipBlock: contains some but not all \
                             addresses of the host (node IPs, host-network pods); traffic to the host is not allowed by it",
                            p.object_ref()
                        ));
                    }
                }
            }
        }
        // "If this field is empty or missing, this rule matches all ports."
        let mut ranges: Vec<(u8, u16, u16)> = Vec::new();
        let mut keys = Vec::new();
        let mut ingress_named = Vec::new();
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
                        self.warnings.push(format!(
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
                    if let Some(list) = self.named_index.get(&np) {
                        for (id, nums) in list {
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
                    }
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
        CompiledRule {
            rule_id,
            keys,
            ingress_named,
            remotes: Rc::new(remotes),
        }
    }
}

fn same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}
