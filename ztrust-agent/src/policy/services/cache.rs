//! The Service frontends kept between updates ([`FrontendCache`]), so that a change costs what it can
//! reach, not the whole cluster. A frontend's classes are recomputed when
//! - one of the Services claiming it, or one of their EndpointSlices, changed (its backends);
//! - a lost backend's grace began or ended ([`Departed`]);
//! - the identity of one of its backends' addresses may have changed (a changed ipcache prefix covers
//!   the address; the ipcache index is kept with the same changes);
//! - an endpoint's egress entries naming one of its backends' identities changed (which identities
//!   every endpoint treats alike).
//!
//! Everything else keeps its classes. A full delta, the first refresh or a change of the node's
//! addresses recompute every frontend. After each refresh the frontends are exactly what
//! [`super::frontends`] computes from scratch (with the grace's lingering backends joined), which the
//! tests check.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;

use super::{Backend, BackendClass, Departed, Frontend, backends_in, egress_profiles, frontends_of, merged};
use crate::model::{Cluster, ObjectRef};
use crate::policy::ipcache::{IpcacheIndex, mapped, mapped_net};
use crate::policy::{Changes, Delta, Desired};

#[derive(Debug, Default)]
pub struct FrontendCache {
    built: bool,
    node_ips: Vec<IpAddr>,
    node_ports_any_local: bool,
    /// Service → its frontends, each with its backends of the frontend's family.
    /// (Sets of one element are the common case here: vectors and sets of pairs keep the memory near
    /// the entries' own size.)
    by_service: BTreeMap<ObjectRef, Vec<(Frontend, BTreeSet<Backend>)>>,
    /// Service (namespace, name) → its EndpointSlices.
    slices_of: BTreeSet<(ObjectRef, ObjectRef)>,
    /// EndpointSlice → the Service it names (for a slice that is gone or moved).
    service_of: BTreeMap<ObjectRef, ObjectRef>,
    /// Frontend → the Services that claim it (its backends: theirs at it, in `by_service`).
    claims: BTreeMap<Frontend, Vec<ObjectRef>>,
    index: IpcacheIndex,
    /// What each frontend's classes were computed from: its backends' addresses (in the ipcache's
    /// space) and their identities.
    used: BTreeMap<Frontend, (Vec<u128>, Vec<u32>)>,
    /// (backend address, frontend): one set, not a set per address (most addresses back one frontend).
    by_addr: BTreeSet<(u128, Frontend)>,
    by_identity: BTreeSet<(u32, Frontend)>,
    /// Endpoint → the remote identities its egress entries name.
    named_by: BTreeMap<ObjectRef, BTreeSet<u32>>,
}

/// The least frontend (for ranges of `by_addr` and `by_identity`): IPv4 before IPv6, `0.0.0.0`, port
/// 0, the first protocol (a test holds it to that).
const LEAST: Frontend = Frontend {
    addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    port: 0,
    protocol: crate::model::Protocol::Tcp,
};

/// The first and last address of `net` in the ipcache's space.
fn mapped_range(net: &IpNet) -> std::ops::RangeInclusive<u128> {
    let (prefix, network) = mapped_net(net);
    let host = u128::MAX.checked_shr(prefix).unwrap_or(0);
    network..=network | host
}

fn egress_remotes(desired: &Desired, ep: &ObjectRef) -> BTreeSet<u32> {
    desired
        .endpoints
        .get(ep)
        .into_iter()
        .flat_map(|p| p.allow.keys())
        .filter(|k| k.direction == ztrust_common::dir::EGRESS)
        .map(|k| k.remote)
        .collect()
}

impl FrontendCache {
    /// Whether `cluster`'s node addresses or node-port reach differ from those the frontends were
    /// computed for (every frontend is recomputed then).
    pub fn node_differs(&self, cluster: &Cluster) -> bool {
        self.node_ips != cluster.node_ips || self.node_ports_any_local != cluster.node_ports_any_local
    }

    /// Recomputes the frontends `changes` and `delta` (what changed since the last refresh, or more)
    /// can reach; returns each recomputed frontend with its classes, `None` for one that is gone. A
    /// delta not taken since the last refresh is processed again (harmlessly: what it names is
    /// recomputed once more; a full one recomputes everything until it is taken, as the agent does
    /// after each sync).
    pub fn refresh(
        &mut self,
        cluster: &Cluster,
        desired: &Desired,
        delta: &Delta,
        changes: &Changes,
        departed: &mut Departed,
        now: Instant,
    ) -> Vec<(Frontend, Option<Vec<BackendClass>>)> {
        let full = !self.built
            || delta.full
            || self.node_ips != cluster.node_ips
            || self.node_ports_any_local != cluster.node_ports_any_local;
        self.built = true;
        self.node_ips.clone_from(&cluster.node_ips);
        self.node_ports_any_local = cluster.node_ports_any_local;
        let mut dirty: BTreeSet<Frontend> = BTreeSet::new();

        // Which Services' backends to read again.
        let services: BTreeSet<ObjectRef> = if full {
            self.slices_of.clear();
            self.service_of.clear();
            for (r, slice) in &cluster.endpoint_slices {
                let svc = ObjectRef::new(&slice.namespace, &slice.service);
                self.slices_of.insert((svc.clone(), r.clone()));
                self.service_of.insert(r.clone(), svc);
            }
            cluster
                .services
                .keys()
                .chain(self.by_service.keys())
                .cloned()
                .collect()
        } else {
            let mut services = changes.services.clone();
            for r in &changes.endpoint_slices {
                if let Some(svc) = self.service_of.remove(r) {
                    self.slices_of.remove(&(svc.clone(), r.clone()));
                    services.insert(svc);
                }
                if let Some(slice) = cluster.endpoint_slices.get(r) {
                    let svc = ObjectRef::new(&slice.namespace, &slice.service);
                    self.slices_of.insert((svc.clone(), r.clone()));
                    self.service_of.insert(r.clone(), svc.clone());
                    services.insert(svc);
                }
            }
            services
        };
        // Each frontend a changed Service claims or claimed: its backends before and after.
        let mut before: BTreeMap<Frontend, BTreeSet<Backend>> = BTreeMap::new();
        for r in &services {
            for (f, _) in self.by_service.get(r).into_iter().flatten() {
                if !before.contains_key(f) {
                    before.insert(*f, self.backends_of(f));
                }
            }
        }
        for r in &services {
            let old = self.by_service.remove(r).unwrap_or_default();
            let mut new: BTreeMap<Frontend, BTreeSet<Backend>> = BTreeMap::new();
            if let Some(svc) = cluster.services.get(r) {
                let slices: Vec<_> = self
                    .slices_of
                    .range((r.clone(), ObjectRef::default())..)
                    .take_while(|(svc, _)| svc == r)
                    .filter_map(|(_, s)| cluster.endpoint_slices.get(s))
                    .collect();
                for (port, frontend) in frontends_of(cluster, svc) {
                    let of_family = backends_in(slices.iter().copied(), port)
                        .into_iter()
                        .filter(|(ip, _)| ip.is_ipv4() == frontend.addr.is_ipv4());
                    new.entry(frontend).or_default().extend(of_family);
                }
            }
            for (f, _) in &old {
                if let Some(c) = self.claims.get_mut(f) {
                    c.retain(|s| s != r);
                    if c.is_empty() {
                        self.claims.remove(f);
                    }
                }
            }
            for f in new.keys() {
                let claims = self.claims.entry(*f).or_default();
                if !claims.contains(r) {
                    claims.push(r.clone());
                }
                if !before.contains_key(f) {
                    // Claimed by no changed Service before: its backends were the others' only.
                    let others = self.backends_of(f);
                    before.insert(*f, others);
                }
            }
            if !new.is_empty() {
                self.by_service.insert(r.clone(), new.into_iter().collect());
            }
        }
        let none = BTreeSet::new();
        for (f, was) in &before {
            let claimed = self.claims.contains_key(f);
            let is = if claimed {
                self.backends_of(f)
            } else {
                BTreeSet::new()
            };
            let lingered = departed.observe(*f, was, if claimed { &is } else { &none }, now);
            if lingered || *was != is || !claimed || !self.used.contains_key(f) {
                dirty.insert(*f);
            }
        }
        dirty.extend(departed.expire(now));

        // Identities of addresses, and which identities are alike.
        if full {
            self.index = IpcacheIndex::new(desired);
            self.named_by = desired
                .endpoints
                .keys()
                .map(|ep| (ep.clone(), egress_remotes(desired, ep)))
                .collect();
            dirty.extend(self.claims.keys().copied());
            dirty.extend(self.used.keys().copied());
        } else {
            self.index.update(desired, &delta.ipcache);
            for net in &delta.ipcache {
                let range = mapped_range(net);
                let first = (*range.start(), LEAST);
                let within = self.by_addr.range(first..).take_while(|(a, _)| a <= range.end());
                dirty.extend(within.map(|(_, f)| *f));
            }
            for (ep, groups) in &delta.endpoints {
                let was = self.named_by.remove(ep).unwrap_or_default();
                let is = egress_remotes(desired, ep);
                let reached: BTreeSet<u32> = match groups {
                    Some(groups) => groups
                        .iter()
                        .filter(|(direction, ..)| *direction == ztrust_common::dir::EGRESS)
                        .map(|(_, remote, _)| *remote)
                        .collect(),
                    None => was.union(&is).copied().collect(),
                };
                for id in reached {
                    let named = self
                        .by_identity
                        .range((id, LEAST)..)
                        .take_while(|(i, _)| *i == id);
                    dirty.extend(named.map(|(_, f)| *f));
                }
                if desired.endpoints.contains_key(ep) {
                    self.named_by.insert(ep.clone(), is);
                }
            }
        }

        // The classes of every frontend reached.
        let mut classes: BTreeMap<Frontend, BTreeSet<BackendClass>> = BTreeMap::new();
        let mut gone = Vec::new();
        for f in &dirty {
            if let Some((addrs, ids)) = self.used.remove(f) {
                for a in addrs {
                    self.by_addr.remove(&(a, *f));
                }
                for id in ids {
                    self.by_identity.remove(&(id, *f));
                }
            }
            let all: Vec<Backend> = self
                .backends_of(f)
                .into_iter()
                .chain(departed.of(f).copied())
                .collect();
            if all.is_empty() && !self.claims.contains_key(f) {
                gone.push(*f);
                continue;
            }
            let c = all.iter().map(|(ip, t)| (self.index.identity(*ip), *t)).collect();
            classes.insert(*f, c);
            self.remember(f, &all);
        }
        let ids: BTreeSet<u32> = classes.values().flatten().map(|c| c.0).collect();
        let profiles = egress_profiles(desired, &ids);
        let mut out: Vec<(Frontend, Option<Vec<BackendClass>>)> = classes
            .into_iter()
            .map(|(f, c)| (f, Some(merged(c, &profiles))))
            .collect();
        out.extend(gone.into_iter().map(|f| (f, None)));
        out
    }

    /// `f`'s backends: those of every Service that claims it.
    fn backends_of(&self, f: &Frontend) -> BTreeSet<Backend> {
        self.claims
            .get(f)
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let at = self.by_service.get(s)?;
                at.iter().find(|(g, _)| g == f).map(|(_, b)| b)
            })
            .flatten()
            .copied()
            .collect()
    }

    /// Notes that `f`'s classes come from `backends`' addresses and their identities now.
    fn remember(&mut self, f: &Frontend, backends: &[Backend]) {
        let mut addrs = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for (ip, _) in backends {
            addrs.insert(mapped(*ip));
            ids.insert(self.index.identity(*ip));
        }
        for a in &addrs {
            self.by_addr.insert((*a, *f));
        }
        for id in &ids {
            self.by_identity.insert((*id, *f));
        }
        self.used
            .insert(*f, (addrs.into_iter().collect(), ids.into_iter().collect()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    #[test]
    fn least_is_below_every_frontend() {
        for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            for addr in [
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            ] {
                assert!(
                    LEAST
                        <= Frontend {
                            addr,
                            port: 0,
                            protocol
                        }
                );
            }
        }
    }
}
