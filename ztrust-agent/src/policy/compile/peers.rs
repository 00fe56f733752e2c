//! The selector cache: the identities each peer of a compiled rule matches, kept current as
//! namespaces, pods and ipBlock prefixes change.

use super::*;

impl Engine {
    pub(super) fn namespace_changed(&mut self, name: &str, labels: Option<&Labels>) {
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

    /// The identities `key` matches, computed from the groups and CIDR identities.
    pub(super) fn scan_peer(&self, key: &PeerKey) -> PeerState {
        let mut ps = PeerState::default();
        match key {
            PeerKey::Pods {
                namespace_selector,
                pod_selector,
                namespace,
            } => {
                for (ns, groups) in &self.st.groups {
                    if !namespace_matches(namespace_selector, namespace, ns, self.st.namespaces.get(ns)) {
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
}

/// Whether a live pod identity of (`namespace`, `labels`, `sig`) belongs to peer `pk`.
pub(super) fn peer_matches(
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
            namespace_matches(namespace_selector, own, namespace, ns_labels)
                && pod_selector.as_ref().is_none_or(|s| matches(s, labels))
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

/// Whether the pods of `namespace` (whose labels are `ns_labels`; `None`: no such Namespace object, no
/// labels) can be peers of a `podSelector`/`namespaceSelector` peer: with a namespaceSelector, the
/// namespace's labels decide; without one, only the policy's own namespace `own` is in scope.
pub(crate) fn namespace_matches(
    namespace_selector: &Option<LabelSelector>,
    own: &Option<String>,
    namespace: &str,
    ns_labels: Option<&Labels>,
) -> bool {
    match (namespace_selector, own) {
        (Some(sel), _) => matches(sel, ns_labels.unwrap_or(&Labels::new())),
        (None, Some(own)) => own == namespace,
        (None, None) => false,
    }
}
