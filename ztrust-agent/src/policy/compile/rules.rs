//! Rules: each NetworkPolicy rule compiled into its peers, ports and allow keys, under a rule id.

use super::*;

pub(super) fn effective(p: &NetworkPolicy) -> impl Iterator<Item = (u8, usize, &Rule)> {
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
pub(crate) fn facts(p: &NetworkPolicy) -> (Vec<IpNet>, Vec<NamedPort>) {
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

pub(super) fn rule_keys(p: &NetworkPolicy) -> impl Iterator<Item = RuleKey> + '_ {
    let r = p.object_ref();
    let r2 = r.clone();
    (0..p.ingress.len())
        .map(move |i| (r.clone(), dir::INGRESS, i))
        .chain((0..p.egress.len()).map(move |i| (r2.clone(), dir::EGRESS, i)))
}

impl Engine {
    pub(super) fn policy_changed(&mut self, r: &ObjectRef, new: Option<&NetworkPolicy>) {
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

    pub(super) fn drop_rules(&mut self, policy: &ObjectRef) {
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

    /// Compiles rule `key` of `p` (creating the peers it needs) into `st.compiled`.
    pub(super) fn build_rule(&mut self, p: &NetworkPolicy, key: RuleKey) {
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
