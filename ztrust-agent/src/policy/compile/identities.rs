//! Identities and the ipcache: the identity of every address, who claims it, and the groups of pods
//! (namespace, labels) each identity stands for.

use super::*;

impl Engine {
    /// The identity key of each address of `pod` (no repeats).
    pub(super) fn pod_keys(&self, pod: &Pod) -> Vec<(IpAddr, IdentityKey)> {
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

    pub(super) fn set_ipcache(&mut self, net: IpNet, id: u32) {
        if keyed_as_ipv4(&net) {
            return;
        }
        if self.desired.ipcache.insert(net, id) != Some(id) {
            self.delta.ipcache.insert(net);
        }
    }

    pub(super) fn del_ipcache(&mut self, net: IpNet) {
        if self.desired.ipcache.remove(&net).is_some() {
            self.delta.ipcache.insert(net);
        }
    }

    pub(super) fn pod_changed(&mut self, r: &ObjectRef, new: Option<&Pod>) {
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
    pub(super) fn id_of(&self, pod: &ObjectRef, ip: IpAddr) -> Option<u32> {
        self.st
            .pods
            .get(pod)?
            .addrs
            .iter()
            .find(|a| a.0 == ip)
            .map(|a| a.2)
    }

    pub(super) fn update_contested(&mut self, ip: IpAddr) {
        let n = self.st.claims.get(&ip).map_or(0, BTreeSet::len);
        if n > 1 || (n == 1 && self.st.host_addrs.contains(&ip)) {
            self.st.contested.insert(ip);
        } else {
            self.st.contested.remove(&ip);
        }
    }

    /// `pod` (whose identity for `ip` is `id`) claims `ip`; the first claimant in object order owns it.
    pub(super) fn claim(&mut self, ip: IpAddr, pod: &ObjectRef, id: u32) {
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
    pub(super) fn unclaim(&mut self, ip: IpAddr, pod: &ObjectRef, id: u32) {
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
    pub(super) fn group_add(&mut self, id: u32, add: bool) {
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
}
