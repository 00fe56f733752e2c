//! Service frontends and the backends they translate to, as the datapath judges a pod's egress to them.
//!
//! A pod's egress hook runs before the node's DNAT (kube-proxy's iptables, nftables or IPVS rules), so a
//! packet to a ClusterIP still carries the ClusterIP there. What the connection reaches is one of the
//! Service's ready backends, which the node picks after the hook. Every backend that policy can tell apart
//! from the others is a *class*: its identity and the port the node translates to. Identities that every
//! endpoint's egress entries treat alike (the pods of a StatefulSet, whose `pod-name` labels make an
//! identity each, when no egress rule reads those labels) are one class, named by the smallest of the
//! frontend's own identities of that kind:
//! the kernel's lookup with any of them finds the same entries, so the verdict cannot differ. The datapath admits
//! a new connection to a frontend when policy admits every class (then whichever backend the node picks,
//! the verdict is the one the connection to it gets), denies it when policy admits none, and drops it as
//! `service-backends-differ` otherwise: it does not guess which one the node would pick.
//!
//! Frontends are what kube-proxy translates: each ClusterIP, external IP and load-balancer address with
//! each Service port, and this node's addresses with each node port. A frontend reaches the backends of
//! its own family (a Service's EndpointSlices are of one address type each). Backends are the ready
//! endpoints, or, when a port has none, the serving and terminating ones (kube-proxy's fallback).
//!
//! The node's proxy follows EndpointSlice changes after the agent does (kube-proxy applies its rules at
//! most once per `minSyncPeriod`, 1 s by default, and a large rule set takes longer): a backend a
//! frontend just lost may still be picked for a while. A lost backend therefore stays one of the
//! frontend's backends for a grace period ([`Departed`], `run --service-grace`), judged by the identity
//! its address has now (a pod whose labels changed counts as what it is now; an address no pod has
//! any longer, as that address): a connection whose verdict would differ between the backends that stay
//! and the one that left is not guessed during it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::model::{Cluster, EndpointSlice, Protocol, Service, ServicePort};

use super::Desired;
use super::ipcache::IpcacheIndex;

mod cache;
pub use cache::FrontendCache;

/// A Service frontend: what a pod's packet names before the node translates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// A class of backends: (identity, translated port).
pub type BackendClass = (u32, u16);

/// Every frontend of `cluster`'s Services with the classes of its backends (sorted, without repeats;
/// empty when it has no ready or serving backend), identities as `desired`'s ipcache gives them. A
/// frontend that several Services claim (an external IP that is another Service's address) gets the
/// classes of all of them: the node may translate it to any. Computed from scratch, with no grace for
/// lost backends: what [`FrontendCache`] keeps current between updates.
pub fn frontends(cluster: &Cluster, desired: &Desired) -> BTreeMap<Frontend, Vec<BackendClass>> {
    let index = IpcacheIndex::new(desired);
    let slices = Slices::new(cluster);
    let mut backends: BTreeMap<Frontend, BTreeSet<Backend>> = BTreeMap::new();
    for (svc, port, frontend) in each_frontend(cluster) {
        let of_family = slices
            .backends(svc, port)
            .into_iter()
            .filter(|(ip, _)| ip.is_ipv4() == frontend.addr.is_ipv4());
        backends.entry(frontend).or_default().extend(of_family);
    }
    let classes: BTreeMap<Frontend, BTreeSet<BackendClass>> = backends
        .iter()
        .map(|(f, addrs)| {
            (
                *f,
                addrs.iter().map(|(ip, t)| (index.identity(*ip), *t)).collect(),
            )
        })
        .collect();
    let ids: BTreeSet<u32> = classes.values().flatten().map(|c| c.0).collect();
    let profiles = egress_profiles(desired, &ids);
    classes
        .into_iter()
        .map(|(f, classes)| (f, merged(classes, &profiles)))
        .collect()
}

/// A backend: its address and the port the node translates to.
pub type Backend = (IpAddr, u16);

/// One egress entry naming an identity: the endpoint, protocol, port range and rule.
type ProfileEntry<'a> = (&'a crate::model::ObjectRef, u8, u16, u16, u32);

/// For each of `ids`, the egress entries of every endpoint that name it as their remote, in
/// (endpoint, key) order. Two identities with equal profiles are treated alike by every endpoint's
/// egress: the kernel's egress lookup (`policy_lookup`: the exact entry, the trie, then the any-peer
/// entry) gives the same answer, rule included, for either, whatever the endpoint and port. One walk
/// over the allow sets, or, for few identities, a range of each endpoint's allow set per identity.
pub(super) fn egress_profiles<'a>(
    desired: &'a Desired,
    ids: &BTreeSet<u32>,
) -> BTreeMap<u32, Vec<ProfileEntry<'a>>> {
    let mut profile: BTreeMap<u32, Vec<ProfileEntry<'a>>> = ids.iter().map(|id| (*id, Vec::new())).collect();
    if ids.is_empty() {
        return profile;
    }
    let entries: usize = desired.endpoints.values().map(|p| p.allow.len()).sum();
    let ranged = ids
        .len()
        .saturating_mul(desired.endpoints.len())
        .saturating_mul(16)
        < entries;
    for (ep, policy) in &desired.endpoints {
        if ranged {
            for (id, into) in profile.iter_mut() {
                for (key, rule) in policy.allow.range(egress_range(*id)) {
                    into.push((ep, key.protocol, key.port_lo, key.port_hi, *rule));
                }
            }
        } else {
            for (key, rule) in &policy.allow {
                if key.direction != ztrust_common::dir::EGRESS {
                    continue;
                }
                if let Some(into) = profile.get_mut(&key.remote) {
                    into.push((ep, key.protocol, key.port_lo, key.port_hi, *rule));
                }
            }
        }
    }
    profile
}

/// Every egress allow key with remote `id`.
fn egress_range(id: u32) -> std::ops::RangeInclusive<super::AllowKey> {
    let key = |protocol, port| super::AllowKey {
        direction: ztrust_common::dir::EGRESS,
        remote: id,
        protocol,
        port_lo: port,
        port_hi: port,
    };
    key(0, 0)..=key(u8::MAX, u16::MAX)
}

/// A frontend's classes with the identities that every endpoint's egress treats alike (equal
/// `profiles`) merged. Classes come in (identity, port) order: the first of each kind and port is the
/// smallest of this frontend's own identities of that kind, so flows name one of its backends.
pub(super) fn merged(
    classes: BTreeSet<BackendClass>,
    profiles: &BTreeMap<u32, Vec<ProfileEntry<'_>>>,
) -> Vec<BackendClass> {
    let none = Vec::new();
    let mut seen: BTreeSet<(&[ProfileEntry<'_>], u16)> = BTreeSet::new();
    classes
        .into_iter()
        .filter(|(id, port)| seen.insert((profiles.get(id).unwrap_or(&none).as_slice(), *port)))
        .collect()
}

/// Every frontend of every Service of `cluster`, with the Service and port it belongs to: each cluster,
/// external and load-balancer address with each port, and this node's addresses with each node port.
/// With node ports at any local address, each node port also has a frontend at the unspecified address
/// of each of the Service's families (the kernel's key for "any local address", [`ANY_LOCAL_V4`] and
/// [`ANY_LOCAL_V6`]).
pub fn each_frontend(cluster: &Cluster) -> impl Iterator<Item = (&Service, &ServicePort, Frontend)> {
    cluster
        .services
        .values()
        .flat_map(move |svc| frontends_of(cluster, svc).map(move |(port, f)| (svc, port, f)))
}

/// The frontends of one Service of `cluster` ([`each_frontend`]), with the port each belongs to.
pub fn frontends_of<'a>(
    cluster: &'a Cluster,
    svc: &'a Service,
) -> impl Iterator<Item = (&'a ServicePort, Frontend)> + 'a {
    let any_local: &[IpAddr] = match (
        cluster.node_ports_any_local,
        svc.cluster_ips.iter().any(IpAddr::is_ipv4),
        svc.cluster_ips.iter().any(IpAddr::is_ipv6),
    ) {
        (false, _, _) | (true, false, false) => &[],
        (true, true, false) => &[ANY_LOCAL_V4],
        (true, false, true) => &[ANY_LOCAL_V6],
        (true, true, true) => &[ANY_LOCAL_V4, ANY_LOCAL_V6],
    };
    svc.ports.iter().flat_map(move |port| {
        let at_port = svc
            .cluster_ips
            .iter()
            .chain(&svc.external_ips)
            .map(|ip| (*ip, port.port));
        let at_node_port = port
            .node_port
            .into_iter()
            .flat_map(move |np| cluster.node_ips.iter().chain(any_local).map(move |ip| (*ip, np)));
        at_port.chain(at_node_port).map(move |(addr, p)| {
            (
                port,
                Frontend {
                    addr,
                    port: p,
                    protocol: port.protocol,
                },
            )
        })
    })
}

/// The backends frontends lost within the grace period: the node's proxy may still translate to them.
/// A grace of zero (the default) keeps none.
#[derive(Clone, Debug, Default)]
pub struct Departed {
    pub grace: Duration,
    /// Frontend → lost backend (address, target port) → when it stops counting.
    until: BTreeMap<Frontend, BTreeMap<Backend, Instant>>,
}

impl Departed {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            ..Self::default()
        }
    }

    /// Notes that `frontend`'s backends went from `was` to `now_there` at `now`: those gone linger until
    /// `now` + the grace, those back do not. A frontend that is gone (its Service deleted, a port or node
    /// port changed) lost all of its backends: the node may still translate it to them as well. Returns
    /// whether its lingering backends changed.
    pub(super) fn observe(
        &mut self,
        frontend: Frontend,
        was: &BTreeSet<Backend>,
        now_there: &BTreeSet<Backend>,
        now: Instant,
    ) -> bool {
        if self.grace.is_zero() {
            return self.until.remove(&frontend).is_some();
        }
        let until = self.until.entry(frontend).or_default();
        let before = until.len();
        let mut changed = false;
        for b in was.difference(now_there) {
            changed |= until.insert(*b, now + self.grace).is_none();
        }
        until.retain(|b, _| !now_there.contains(b));
        changed |= until.len() != before;
        if until.is_empty() {
            self.until.remove(&frontend);
        }
        changed
    }

    /// Drops the lost backends whose grace has ended by `now`; the frontends that lost some.
    pub(super) fn expire(&mut self, now: Instant) -> Vec<Frontend> {
        let mut changed = Vec::new();
        for (frontend, until) in &mut self.until {
            let before = until.len();
            until.retain(|_, t| *t > now);
            if until.len() != before {
                changed.push(*frontend);
            }
        }
        self.until.retain(|_, lost| !lost.is_empty());
        changed
    }

    /// The backends `frontend` lost within the grace.
    pub(super) fn of(&self, frontend: &Frontend) -> impl Iterator<Item = &Backend> {
        self.until.get(frontend).into_iter().flat_map(BTreeMap::keys)
    }

    /// When the next lost backend stops counting.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.until.values().flat_map(BTreeMap::values).min().copied()
    }
}

/// The address of IPv4 node-port frontends at any local address of the node (`0.0.0.0`: no frontend has
/// it, the node drops packets to it).
pub const ANY_LOCAL_V4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
/// The same for IPv6 (`::`).
pub const ANY_LOCAL_V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

/// A cluster's EndpointSlices by the Service they name (looked up once per Service port).
pub struct Slices<'a>(BTreeMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>);

impl<'a> Slices<'a> {
    pub fn new(cluster: &'a Cluster) -> Self {
        let mut by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
        for s in cluster.endpoint_slices.values() {
            by_service
                .entry((s.namespace.as_str(), s.service.as_str()))
                .or_default()
                .push(s);
        }
        Self(by_service)
    }

    /// The (address, target port) of every backend of `port` of `svc`: its EndpointSlices' endpoints
    /// whose slice has a port of the same name and protocol; the ready ones, else the serving
    /// terminating ones.
    pub fn backends(&self, svc: &Service, port: &ServicePort) -> Vec<Backend> {
        let slices = self
            .0
            .get(&(svc.namespace.as_str(), svc.name.as_str()))
            .into_iter()
            .flatten()
            .copied();
        backends_in(slices, port)
    }
}

/// The (address, target port) of every backend of `port` in `slices` (a Service's EndpointSlices): their
/// endpoints whose slice has a port of the same name and protocol; the ready ones, else the serving
/// terminating ones.
pub fn backends_in<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: &ServicePort,
) -> Vec<Backend> {
    let mut ready = Vec::new();
    let mut terminating = Vec::new();
    for slice in slices {
        let Some(target) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            let into = if ep.ready {
                &mut ready
            } else if ep.serving && ep.terminating {
                &mut terminating
            } else {
                continue;
            };
            into.extend(ep.addresses.iter().map(|a| (*a, target.port)));
        }
    }
    if ready.is_empty() { terminating } else { ready }
}

/// Adds to `c` a Service of one port with `cluster_ips`, and one EndpointSlice (`NAME-1`) of `backends`
/// whose port has the Service port's name and protocol and number `target`.
#[cfg(test)]
pub(crate) fn add_service(
    c: &mut Cluster,
    namespace: &str,
    name: &str,
    cluster_ips: Vec<IpAddr>,
    port: ServicePort,
    target: u16,
    backends: Vec<crate::model::SliceEndpoint>,
) {
    let slice = EndpointSlice {
        namespace: namespace.into(),
        name: format!("{name}-1"),
        service: name.into(),
        ports: vec![crate::model::SlicePort {
            name: port.name.clone(),
            protocol: port.protocol,
            port: target,
        }],
        endpoints: backends,
    };
    let svc = Service {
        namespace: namespace.into(),
        name: name.into(),
        cluster_ips,
        ports: vec![port],
        ..Default::default()
    };
    c.services.insert(svc.object_ref(), svc);
    c.endpoint_slices.insert(slice.object_ref(), slice);
}

#[cfg(test)]
mod tests;
