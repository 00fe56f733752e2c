//! Diffs the desired datapath state against what was applied, and writes only the difference, in an
//! order that never opens anything: at every intermediate step, what the kernel allows is allowed by the
//! old state or by the new one.
//!
//! The order (all allow entries are "allow"; there are no deny entries to race with):
//! 1. narrowings: endpoints that go away or lose their interface are removed (the program then drops
//!    their traffic), isolation flags that are set, allow entries that are removed;
//! 2. the ipcache (addresses whose identity changes): at this point the allow sets are old ∩ new, so an
//!    address in its old or new identity is allowed only where old or new allowed it;
//! 3. widenings: allow entries that are added, then endpoint entries (new endpoints become known only
//!    once their rules are in place; isolation flags that are cleared).
//!
//! When steps 1 or 2 changed anything, the policy revision is bumped before step 3: connectionless flows
//! (UDP, ICMP, …) that conntrack admitted under the old policy are judged again at their next packet, so a
//! narrowing never leaves a datagram flow open. TCP connections keep their admission (a new one starts
//! with a SYN, which is always judged).
//!
//! Capacity is checked before anything is written: an update that would not fit is refused whole and the
//! last applied state stays in force.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use tracing::{debug, warn};
use ztrust_common::{
    BackendClass, EndpointInfo, IpcacheKey, IpcacheValue, PolicyKey, PolicyValue, ServiceKey, ServiceValue,
    capacity, dir, ep_flags, identity, proto,
};

use super::keys::policy_keys;
use crate::model::ObjectRef;
use crate::policy::{AllowGroup, AllowKey, Delta, Desired, Frontend, v4_space};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{map} map would need {needed} entries, capacity is {capacity}; update refused, last state kept")]
    Capacity {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error("writing {map}: {source}")]
    Write {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The writes the sync layer makes. Implemented over the kernel maps, and over memory in tests.
pub trait MapOps {
    fn set_endpoint(&mut self, ifindex: u32, info: &EndpointInfo) -> Result<()>;
    fn del_endpoint(&mut self, ifindex: u32) -> Result<()>;
    fn set_ipcache(&mut self, prefix: u32, key: &IpcacheKey, value: &IpcacheValue) -> Result<()>;
    fn del_ipcache(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()>;
    fn set_policy(&mut self, prefix: u32, key: &PolicyKey, value: &PolicyValue) -> Result<()>;
    fn del_policy(&mut self, prefix: u32, key: &PolicyKey) -> Result<()>;
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()>;
    fn del_service(&mut self, key: &ServiceKey) -> Result<()>;
    fn set_service_range(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()>;
    fn del_service_range(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()>;
    /// Tells the datapath that policy may have narrowed: connectionless flows admitted before are judged
    /// again at their next packet.
    fn bump_revision(&mut self) -> Result<()>;
}

pub use super::keys::{ip_to_mapped, ipcache_key, ipcache_net};

type PolicyEntries = BTreeMap<(u32, PolicyKey), PolicyValue>;

/// Policy entries by allow group (entries of different groups never share a key).
type Grouped = BTreeMap<AllowGroup, PolicyEntries>;

fn group_of(key: &PolicyKey) -> AllowGroup {
    (key.direction, u32::from_be_bytes(key.identity), key.protocol)
}

fn count(entries: &Grouped) -> usize {
    entries.values().map(BTreeMap::len).sum()
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct AppliedEndpoint {
    pod: ObjectRef,
    info: EndpointInfo,
    entries: Grouped,
}

/// The new entries of an endpoint: all of them, or new contents for some groups (the others stay).
#[derive(Debug)]
enum NextEntries {
    All(Grouped),
    Groups(Grouped),
}

#[derive(Debug)]
struct Next {
    pod: ObjectRef,
    info: EndpointInfo,
    entries: NextEntries,
}

/// What one sync wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub endpoint_writes: usize,
    pub ipcache_writes: usize,
    pub policy_writes: usize,
    pub service_writes: usize,
}

impl SyncStats {
    pub fn total(&self) -> usize {
        self.endpoint_writes + self.ipcache_writes + self.policy_writes + self.service_writes
    }
}

/// The kernel's key of a Service frontend.
pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: ip_to_mapped(f.addr),
        port_be: f.port.to_be(),
        protocol: f.protocol.number(),
        _pad: 0,
    }
}

/// The kernel's value for a frontend with `classes` (the first [`ztrust_common::SERVICE_CLASSES`] of
/// them, and how many there are).
pub fn service_value(classes: &[crate::policy::BackendClass]) -> ServiceValue {
    let mut v = ServiceValue {
        classes: classes.len() as u32,
        ..Default::default()
    };
    for (slot, (identity, port)) in v.class.iter_mut().zip(classes) {
        *slot = BackendClass {
            identity: *identity,
            port: *port,
            _pad: 0,
        };
    }
    v
}

static EMPTY_GROUPS: BTreeSet<AllowGroup> = BTreeSet::new();

/// The state last written to the maps.
#[derive(Debug, Default)]
pub struct Syncer {
    ipcache: BTreeMap<IpNet, u32>,
    services: BTreeMap<ServiceKey, ServiceValue>,
    service_ranges: BTreeSet<IpNet>,
    endpoints: BTreeMap<u32, AppliedEndpoint>,
    policy_entries: usize,
    /// Global flags OR-ed into every endpoint (audit mode).
    pub global_flags: u32,
    /// Sizes of the kernel maps: an update that would not fit is refused before any write.
    pub capacities: super::loader::Capacities,
    /// Namespaces in audit mode (annotation [`AUDIT_ANNOTATION`]): their endpoints never drop.
    pub audit_namespaces: BTreeSet<String>,
}

/// Namespace annotation that selects the mode of its pods: `audit` (report what enforcement would drop
/// as `would-drop`, drop nothing) or `enforce` (the default).
pub const AUDIT_ANNOTATION: &str = "ztrust.io/mode";

/// The namespaces a cluster puts in audit mode.
pub fn audit_namespaces(cluster: &crate::model::Cluster) -> BTreeSet<String> {
    cluster
        .namespaces
        .values()
        .filter(|ns| {
            ns.annotations
                .get(AUDIT_ANNOTATION)
                .is_some_and(|m| m.eq_ignore_ascii_case("audit"))
        })
        .map(|ns| ns.name.clone())
        .collect()
}

/// The policy entries of `allow` for endpoint `ifindex`: all groups, or only `only` (each listed group
/// present, empty if it has no entries now).
fn entries_for(
    ifindex: u32,
    allow: &BTreeMap<AllowKey, u32>,
    only: Option<&BTreeSet<AllowGroup>>,
) -> Grouped {
    let mut out = Grouped::new();
    let add = |out: &mut Grouped, key: &AllowKey, rule: u32| {
        let group = out.entry(key.group()).or_default();
        for (prefix, pk) in policy_keys(ifindex, key) {
            group.entry((prefix, pk)).or_insert(PolicyValue {
                rule_id: rule,
                _pad: 0,
            });
        }
    };
    match only {
        None => {
            for (key, rule) in allow {
                add(&mut out, key, *rule);
            }
        }
        Some(groups) => {
            for &(direction, remote, protocol) in groups {
                out.entry((direction, remote, protocol)).or_default();
                let lo = AllowKey {
                    direction,
                    remote,
                    protocol,
                    port_lo: 0,
                    port_hi: 0,
                };
                let hi = AllowKey {
                    direction,
                    remote,
                    protocol,
                    port_lo: u16::MAX,
                    port_hi: u16::MAX,
                };
                for (key, rule) in allow.range(lo..=hi) {
                    add(&mut out, key, *rule);
                }
            }
        }
    }
    out
}

const ISOLATION: u32 = ep_flags::ISOLATED_INGRESS | ep_flags::ISOLATED_EGRESS;

/// [`ep_flags::NO_ANY_PEER_INGRESS`] / `_EGRESS` for an allow set (a range query per direction: the
/// set is ordered by direction, then remote, and [`identity::ANY`] is the lowest remote).
fn no_any_peer_flags(allow: &BTreeMap<AllowKey, u32>) -> u32 {
    let mut flags = 0;
    for (direction, flag) in [
        (dir::INGRESS, ep_flags::NO_ANY_PEER_INGRESS),
        (dir::EGRESS, ep_flags::NO_ANY_PEER_EGRESS),
    ] {
        let lo = AllowKey {
            direction,
            remote: identity::ANY,
            protocol: 0,
            port_lo: 0,
            port_hi: 0,
        };
        let hi = AllowKey {
            direction,
            remote: identity::ANY,
            protocol: u8::MAX,
            port_lo: u16::MAX,
            port_hi: u16::MAX,
        };
        if allow.range(lo..=hi).next().is_none() {
            flags |= flag;
        }
    }
    flags
}

/// Whether `key` is written as entries wider than one port, into the policy trie (see [`policy_keys`]):
/// any protocol, or more than one port. (An empty range writes nothing; it counts as wide, which only
/// costs a trie walk.)
fn is_wide(key: &AllowKey) -> bool {
    key.protocol == proto::ANY || key.port_lo != key.port_hi
}

/// The `NO_WIDE_*` flags for an allow set: one for each direction and protocol class (TCP, UDP, any
/// other) that no wide entry serves. An entry for any protocol serves them all.
fn no_wide_flags(allow: &BTreeMap<AllowKey, u32>) -> u32 {
    let mut wide = 0;
    for key in allow.keys().filter(|k| is_wide(k)) {
        wide |= if key.protocol == proto::ANY {
            [proto::TCP, proto::UDP, proto::ICMP]
                .iter()
                .fold(0, |f, &p| f | ep_flags::no_wide(key.direction, p))
        } else {
            ep_flags::no_wide(key.direction, key.protocol)
        };
    }
    ep_flags::ALL_NO_WIDE & !wide
}

/// The endpoint entry to write during the narrowing step: isolated wherever the old or the new state is,
/// in audit mode only where both are (audit never drops, so it is the open side). The "no any-peer
/// entry" and "no wide entry" flags too are kept only where both have them: such an entry is still looked
/// up while it may exist, and the final write sets them once the entries are gone. (These flags only
/// skip lookups: a stale one can hide an entry, never open anything.)
fn narrowest(old: &EndpointInfo, new: &EndpointInfo) -> EndpointInfo {
    let iso = (old.flags | new.flags) & ISOLATION;
    let rest = old.flags & new.flags & !ISOLATION;
    EndpointInfo {
        flags: iso | rest,
        ..*new
    }
}

impl Syncer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts from what an earlier agent left in the pinned maps, so that the first sync of this agent
    /// removes whatever is stale instead of leaving it open. Until that sync, the old state enforces.
    pub fn adopt(maps: &super::loader::Maps) -> Self {
        let mut me = Self::default();
        for (ifindex, info) in maps.endpoints.iter().flatten() {
            let pod = ObjectRef::new("(adopted)", format!("ifindex-{ifindex}"));
            // Compared with what this agent computes, which leaves slots to the endpoint map.
            let info = EndpointInfo { slot: 0, ..info };
            me.endpoints.insert(
                ifindex,
                AppliedEndpoint {
                    pod,
                    info,
                    entries: Grouped::new(),
                },
            );
        }
        for (prefix, data, value) in maps.policy.entries() {
            let ifindex = u32::from_be_bytes(data.endpoint);
            let ep = me.endpoints.entry(ifindex).or_insert_with(|| AppliedEndpoint {
                pod: ObjectRef::new("(adopted)", format!("ifindex-{ifindex}")),
                // Entries without an endpoint entry are unreachable; keep them to delete them.
                info: EndpointInfo {
                    endpoint_id: ifindex,
                    ..Default::default()
                },
                entries: Grouped::new(),
            });
            ep.entries
                .entry(group_of(&data))
                .or_default()
                .insert((prefix, data), value);
            me.policy_entries += 1;
        }
        for (prefix, key, value) in maps.ipcache.entries() {
            if let Some(net) = ipcache_net(prefix, &key) {
                me.ipcache.insert(net, value.identity);
            }
        }
        me.services = maps.services.iter().flatten().collect();
        for (key, _) in maps.service_ranges.iter().flatten() {
            if let Some(net) = ipcache_net(key.prefix_len(), &key.data()) {
                me.service_ranges.insert(net);
            }
        }
        tracing::info!(
            endpoints = me.endpoints.len(),
            policy_entries = me.policy_entries,
            ipcache = me.ipcache.len(),
            "adopted state pinned by an earlier agent"
        );
        me
    }

    pub fn policy_entries(&self) -> usize {
        self.policy_entries
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    pub fn ipcache_entries(&self) -> usize {
        self.ipcache.len()
    }

    /// Endpoint (pod) of an interface, as last applied.
    pub fn pod_of(&self, ifindex: u32) -> Option<&ObjectRef> {
        self.endpoints.get(&ifindex).map(|e| &e.pod)
    }

    /// Brings the maps to `desired`, looking at everything. `interfaces` binds pods to the ifindex of
    /// their host-side interface; desired endpoints without an interface are not written (their pods
    /// are not on this node, or not wired yet).
    pub fn sync(
        &mut self,
        ops: &mut impl MapOps,
        desired: &Desired,
        interfaces: &BTreeMap<ObjectRef, u32>,
    ) -> Result<SyncStats> {
        self.sync_delta(ops, desired, interfaces, &Delta::full())
    }

    /// Brings the maps to `desired`, looking only at what `delta` says changed since the last successful
    /// sync (and at pods whose interface binding changed): a change costs what it touches, not the size
    /// of the cluster. The same order and checks as a full sync.
    pub fn sync_delta(
        &mut self,
        ops: &mut impl MapOps,
        desired: &Desired,
        interfaces: &BTreeMap<ObjectRef, u32>,
        delta: &Delta,
    ) -> Result<SyncStats> {
        // The interfaces to look at: all, or those of changed endpoints and changed bindings.
        let scope: Option<BTreeSet<u32>> = (!delta.full).then(|| {
            let applied: BTreeMap<&ObjectRef, u32> =
                self.endpoints.iter().map(|(i, e)| (&e.pod, *i)).collect();
            let pods: BTreeSet<&ObjectRef> = applied.keys().copied().chain(interfaces.keys()).collect();
            let mut scope = BTreeSet::new();
            for pod in pods {
                let (old, new) = (applied.get(pod).copied(), interfaces.get(pod).copied());
                if old != new || delta.endpoints.contains_key(pod) {
                    scope.extend(old);
                    scope.extend(new);
                }
            }
            scope
        });
        let in_scope = |ifindex: &u32| scope.as_ref().is_none_or(|s| s.contains(ifindex));

        // The new state of the interfaces in scope: whole, or only the allow groups the delta names
        // when the endpoint stays where it was.
        let mut next: BTreeMap<u32, Next> = BTreeMap::new();
        for (pod, ep) in &desired.endpoints {
            let Some(&ifindex) = interfaces.get(pod) else {
                continue;
            };
            if !in_scope(&ifindex) {
                continue;
            }
            let mut flags = self.global_flags;
            if self.audit_namespaces.contains(&pod.namespace) {
                flags |= ep_flags::AUDIT;
            }
            if ep.isolated_ingress {
                flags |= ep_flags::ISOLATED_INGRESS;
            }
            if ep.isolated_egress {
                flags |= ep_flags::ISOLATED_EGRESS;
            }
            flags |= no_any_peer_flags(&ep.allow) | no_wide_flags(&ep.allow);
            // The slot is the endpoint map's to hand out (`loader::Endpoints`).
            // The addresses are the only sources the pod may send from.
            let info = EndpointInfo {
                endpoint_id: ifindex,
                identity: ep.identity,
                flags,
                ..Default::default()
            }
            .with_addrs(&ep.ips);
            let same_place = self.endpoints.get(&ifindex).is_some_and(|old| &old.pod == pod);
            let only = match delta.endpoints.get(pod) {
                Some(Some(groups)) if !delta.full && same_place => Some(groups),
                // In scope only because of its binding (and the binding is unchanged): nothing changed.
                None if !delta.full && same_place => Some(&EMPTY_GROUPS),
                _ => None,
            };
            let entries = match only {
                Some(groups) => NextEntries::Groups(entries_for(ifindex, &ep.allow, Some(groups))),
                None => NextEntries::All(entries_for(ifindex, &ep.allow, None)),
            };
            next.insert(
                ifindex,
                Next {
                    pod: pod.clone(),
                    info,
                    entries,
                },
            );
        }

        // Capacity, before any write.
        let caps = self.capacities;
        let mut policy_needed = self.policy_entries;
        let mut endpoints_needed = self.endpoints.len();
        for (ifindex, old) in self.endpoints.iter().filter(|(i, _)| in_scope(i)) {
            match next.get(ifindex).map(|n| &n.entries) {
                None | Some(NextEntries::All(_)) => {
                    policy_needed -= count(&old.entries);
                    endpoints_needed -= 1;
                }
                Some(NextEntries::Groups(groups)) => {
                    policy_needed -= groups
                        .keys()
                        .filter_map(|g| old.entries.get(g))
                        .map(BTreeMap::len)
                        .sum::<usize>();
                }
            }
        }
        for (ifindex, new) in &next {
            match &new.entries {
                NextEntries::All(all) => {
                    policy_needed += count(all);
                    endpoints_needed += 1;
                }
                NextEntries::Groups(groups) => {
                    policy_needed += count(groups);
                    endpoints_needed += usize::from(!self.endpoints.contains_key(ifindex));
                }
            }
        }
        if policy_needed > caps.policy as usize {
            return Err(Error::Capacity {
                map: "policy",
                needed: policy_needed,
                capacity: caps.policy,
            });
        }
        if desired.ipcache.len() > caps.ipcache as usize {
            return Err(Error::Capacity {
                map: "ipcache",
                needed: desired.ipcache.len(),
                capacity: caps.ipcache,
            });
        }
        if endpoints_needed > caps.endpoints as usize {
            return Err(Error::Capacity {
                map: "endpoints",
                needed: endpoints_needed,
                capacity: caps.endpoints,
            });
        }
        if desired.services.len() > capacity::SERVICES as usize {
            return Err(Error::Capacity {
                map: "services",
                needed: desired.services.len(),
                capacity: capacity::SERVICES,
            });
        }
        if desired.service_cidrs.len() > capacity::SERVICE_RANGES as usize {
            let needed = desired.service_cidrs.len();
            return Err(Error::Capacity {
                map: "service ranges",
                needed,
                capacity: capacity::SERVICE_RANGES,
            });
        }

        let mut stats = SyncStats::default();
        let empty = PolicyEntries::new();

        // 1. Narrowings.
        for (ifindex, old) in self.endpoints.iter().filter(|(i, _)| in_scope(i)) {
            let Some(new) = next.get(ifindex) else {
                ops.del_endpoint(*ifindex)?;
                stats.endpoint_writes += 1;
                for (prefix, key) in old.entries.values().flat_map(BTreeMap::keys) {
                    ops.del_policy(*prefix, key)?;
                    stats.policy_writes += 1;
                }
                continue;
            };
            if new.info != old.info {
                let step = narrowest(&old.info, &new.info);
                if step != old.info {
                    ops.set_endpoint(*ifindex, &step)?;
                    stats.endpoint_writes += 1;
                }
            }
            let (groups, whole) = match &new.entries {
                NextEntries::All(g) => (g, true),
                NextEntries::Groups(g) => (g, false),
            };
            for (group, old_entries) in &old.entries {
                let new_entries = match groups.get(group) {
                    Some(e) => e,
                    None if whole => &empty,
                    None => continue,
                };
                for (prefix, key) in old_entries.keys() {
                    if !new_entries.contains_key(&(*prefix, *key)) {
                        ops.del_policy(*prefix, key)?;
                        stats.policy_writes += 1;
                    }
                }
            }
        }

        let narrowed_before_ipcache = stats.total();
        // 2. The ipcache: every prefix, or those the delta names and the IPv4 space (whose entry keeps
        // IPv6 prefixes such as ::/0 from matching IPv4 addresses; maps pinned by an earlier agent may
        // lack it, whatever the first delta says).
        let nets: Vec<IpNet> = if delta.full {
            self.ipcache
                .keys()
                .chain(desired.ipcache.keys())
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            delta
                .ipcache
                .iter()
                .copied()
                .chain([v4_space()])
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        let mut removed = Vec::new();
        let mut set = Vec::new();
        for net in nets {
            match (self.ipcache.get(&net), desired.ipcache.get(&net)) {
                (Some(_), None) => removed.push(net),
                (old, Some(new)) if old != Some(new) => set.push((net, *new)),
                _ => {}
            }
        }
        for net in &removed {
            let (prefix, key) = ipcache_key(net);
            ops.del_ipcache(prefix, &key)?;
            stats.ipcache_writes += 1;
            self.ipcache.remove(net);
        }
        // An address that changes identity may lose what it was allowed; a new address cannot.
        let mut ipcache_changed = !removed.is_empty();
        for (net, id) in &set {
            let (prefix, key) = ipcache_key(net);
            ops.set_ipcache(
                prefix,
                &key,
                &IpcacheValue {
                    identity: *id,
                    _pad: 0,
                },
            )?;
            stats.ipcache_writes += 1;
            ipcache_changed |= self.ipcache.insert(*net, *id).is_some();
        }
        // Services after the ipcache (their classes name identities the ipcache now gives), in the same
        // step: a changed class can narrow what a connectionless flow to the Service was admitted for.
        let services_changed = if delta.full || delta.services {
            self.sync_services(ops, desired, &mut stats)?
        } else {
            false
        };
        if narrowed_before_ipcache > 0 || ipcache_changed || services_changed {
            ops.bump_revision()?;
        }

        // 3. Widenings.
        for (ifindex, new) in &next {
            let old = self.endpoints.get(ifindex);
            let groups = match &new.entries {
                NextEntries::All(g) | NextEntries::Groups(g) => g,
            };
            for (group, entries) in groups {
                let old_entries = old.and_then(|o| o.entries.get(group)).unwrap_or(&empty);
                for ((prefix, key), value) in entries {
                    if old_entries.get(&(*prefix, *key)) != Some(value) {
                        ops.set_policy(*prefix, key, value)?;
                        stats.policy_writes += 1;
                    }
                }
            }
            if old.map(|o| o.info) != Some(new.info) {
                ops.set_endpoint(*ifindex, &new.info)?;
                stats.endpoint_writes += 1;
            }
        }
        self.policy_entries = policy_needed;
        self.endpoints.retain(|i, _| !in_scope(i) || next.contains_key(i));
        for (ifindex, new) in next {
            match new.entries {
                NextEntries::All(entries) => {
                    let entries = entries.into_iter().filter(|(_, e)| !e.is_empty()).collect();
                    self.endpoints.insert(
                        ifindex,
                        AppliedEndpoint {
                            pod: new.pod,
                            info: new.info,
                            entries,
                        },
                    );
                }
                NextEntries::Groups(groups) => {
                    let applied = self.endpoints.entry(ifindex).or_default();
                    applied.pod = new.pod;
                    applied.info = new.info;
                    for (group, entries) in groups {
                        if entries.is_empty() {
                            applied.entries.remove(&group);
                        } else {
                            applied.entries.insert(group, entries);
                        }
                    }
                }
            }
        }
        debug!(?stats, "maps synced");
        if stats.total() > 0 {
            tracing::info!(
                endpoints = self.endpoints.len(),
                ipcache = self.ipcache.len(),
                policy_entries = self.policy_entries,
                writes = stats.total(),
                "datapath updated"
            );
        }
        Ok(stats)
    }

    /// Brings the Service frontends and ranges to `desired`: ranges that are added (a narrowing: unknown
    /// addresses in them drop), frontends, then ranges that go. Returns whether anything changed.
    fn sync_services(
        &mut self,
        ops: &mut impl MapOps,
        desired: &Desired,
        stats: &mut SyncStats,
    ) -> Result<bool> {
        let mut changed = false;
        for net in desired.service_cidrs.difference(&self.service_ranges.clone()) {
            let (prefix, key) = ipcache_key(net);
            ops.set_service_range(prefix, &key)?;
            self.service_ranges.insert(*net);
            changed = true;
        }
        let next: BTreeMap<ServiceKey, ServiceValue> = desired
            .services
            .iter()
            .map(|(f, classes)| (service_key(f), service_value(classes)))
            .collect();
        for (key, value) in &next {
            if self.services.get(key) != Some(value) {
                ops.set_service(key, value)?;
                stats.service_writes += 1;
                changed = true;
            }
        }
        for key in self.services.keys().filter(|k| !next.contains_key(k)) {
            ops.del_service(key)?;
            stats.service_writes += 1;
            changed = true;
        }
        self.services = next;
        for net in self
            .service_ranges
            .difference(&desired.service_cidrs)
            .copied()
            .collect::<Vec<_>>()
        {
            let (prefix, key) = ipcache_key(&net);
            ops.del_service_range(prefix, &key)?;
            self.service_ranges.remove(&net);
            changed = true;
        }
        Ok(changed)
    }

    /// Endpoint entries currently applied, for status output.
    pub fn endpoints(&self) -> impl Iterator<Item = (u32, &ObjectRef, &EndpointInfo)> {
        self.endpoints.iter().map(|(i, e)| (*i, &e.pod, &e.info))
    }

    /// Interfaces with an applied endpoint.
    pub fn ifindexes(&self) -> BTreeSet<u32> {
        self.endpoints.keys().copied().collect()
    }
}

/// [`MapOps`] over the kernel maps.
pub struct KernelMaps<'a>(pub &'a mut super::loader::Maps);

fn werr(map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Write { map, source }
}

fn ignore_missing(r: std::result::Result<(), aya::maps::MapError>, map: &'static str) -> Result<()> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => {
            warn!(map, error = %e, "delete failed");
            Err(Error::Write { map, source: e })
        }
    }
}

impl MapOps for KernelMaps<'_> {
    fn set_endpoint(&mut self, ifindex: u32, info: &EndpointInfo) -> Result<()> {
        self.0
            .endpoints
            .insert(ifindex, *info, 0)
            .map_err(werr("endpoints"))
    }
    fn del_endpoint(&mut self, ifindex: u32) -> Result<()> {
        ignore_missing(self.0.endpoints.remove(&ifindex), "endpoints")
    }
    fn set_ipcache(&mut self, prefix: u32, key: &IpcacheKey, value: &IpcacheValue) -> Result<()> {
        self.0.ipcache.insert(prefix, key, value).map_err(werr("ipcache"))
    }
    fn del_ipcache(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
        ignore_missing(self.0.ipcache.remove(prefix, key), "ipcache")
    }
    fn set_policy(&mut self, prefix: u32, key: &PolicyKey, value: &PolicyValue) -> Result<()> {
        self.0.policy.insert(prefix, key, value).map_err(werr("policy"))
    }
    fn del_policy(&mut self, prefix: u32, key: &PolicyKey) -> Result<()> {
        ignore_missing(self.0.policy.remove(prefix, key), "policy")
    }
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.0.services.insert(key, value, 0).map_err(werr("services"))
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<()> {
        ignore_missing(self.0.services.remove(key), "services")
    }
    fn set_service_range(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
        self.0
            .service_ranges
            .insert(&aya::maps::lpm_trie::Key::new(prefix, *key), 0, 0)
            .map_err(werr("service ranges"))
    }
    fn del_service_range(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
        ignore_missing(
            self.0
                .service_ranges
                .remove(&aya::maps::lpm_trie::Key::new(prefix, *key)),
            "service ranges",
        )
    }
    fn bump_revision(&mut self) -> Result<()> {
        let current = self.0.revision.get(&0, 0).map_err(werr("revision"))?;
        self.0
            .revision
            .set(0, current.wrapping_add(1), 0)
            .map_err(werr("revision"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{AllowKey, EndpointPolicy};
    use std::net::IpAddr;
    use ztrust_common::{dir, proto};

    /// Records every write and checks, after each one, that no packet of a fixed probe set is allowed
    /// unless the old or the new state allows it.
    #[derive(Default, Clone)]
    struct Mem {
        endpoints: BTreeMap<u32, EndpointInfo>,
        ipcache: BTreeMap<(u32, IpcacheKey), IpcacheValue>,
        policy: BTreeMap<(u32, PolicyKey), PolicyValue>,
        services: BTreeMap<ServiceKey, ServiceValue>,
        service_ranges: BTreeSet<(u32, IpcacheKey)>,
        log: Vec<String>,
        snapshots: Vec<Mem>,
    }

    impl Mem {
        fn snap(&mut self) {
            let mut s = self.clone();
            s.snapshots.clear();
            self.snapshots.push(s);
        }
        fn identity_of(&self, ip: [u8; 16]) -> u32 {
            let mut best: Option<(u32, u32)> = None;
            for ((prefix, key), v) in &self.ipcache {
                let bits = *prefix as usize;
                let matches =
                    (0..bits).all(|i| (key.addr[i / 8] >> (7 - i % 8)) & 1 == (ip[i / 8] >> (7 - i % 8)) & 1);
                if matches && best.is_none_or(|(p, _)| *prefix > p) {
                    best = Some((*prefix, v.identity));
                }
            }
            best.map_or(ztrust_common::identity::WORLD, |(_, id)| id)
        }
        /// Ingress verdict at `ifindex` for a TCP packet from `src` to `port`, as the kernel decides it.
        fn allows(&self, ifindex: u32, src: [u8; 16], port: u16) -> bool {
            let Some(ep) = self.endpoints.get(&ifindex) else {
                return false;
            };
            if ep.flags & ep_flags::ISOLATED_INGRESS == 0 {
                return true;
            }
            let id = self.identity_of(src);
            [id, ztrust_common::identity::ANY].iter().any(|remote| {
                let want = PolicyKey::new(ep.endpoint_id, *remote, dir::INGRESS, proto::TCP, port);
                self.policy.keys().any(|(prefix, k)| {
                    let a = bytes(k);
                    let b = bytes(&want);
                    (0..*prefix as usize)
                        .all(|i| (a[i / 8] >> (7 - i % 8)) & 1 == (b[i / 8] >> (7 - i % 8)) & 1)
                })
            })
        }
    }

    fn bytes(k: &PolicyKey) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..4].copy_from_slice(&k.endpoint);
        out[4..8].copy_from_slice(&k.identity);
        out[8] = k.direction;
        out[9] = k.protocol;
        out[10..].copy_from_slice(&k.port);
        out
    }

    impl MapOps for Mem {
        fn set_endpoint(&mut self, ifindex: u32, info: &EndpointInfo) -> Result<()> {
            self.endpoints.insert(ifindex, *info);
            self.log
                .push(format!("set_endpoint {ifindex} flags={}", info.flags));
            self.snap();
            Ok(())
        }
        fn del_endpoint(&mut self, ifindex: u32) -> Result<()> {
            self.endpoints.remove(&ifindex);
            self.log.push(format!("del_endpoint {ifindex}"));
            self.snap();
            Ok(())
        }
        fn set_ipcache(&mut self, prefix: u32, key: &IpcacheKey, value: &IpcacheValue) -> Result<()> {
            self.ipcache.insert((prefix, *key), *value);
            self.log.push("set_ipcache".into());
            self.snap();
            Ok(())
        }
        fn del_ipcache(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
            self.ipcache.remove(&(prefix, *key));
            self.log.push("del_ipcache".into());
            self.snap();
            Ok(())
        }
        fn set_policy(&mut self, prefix: u32, key: &PolicyKey, value: &PolicyValue) -> Result<()> {
            self.policy.insert((prefix, *key), *value);
            self.log.push("set_policy".into());
            self.snap();
            Ok(())
        }
        fn del_policy(&mut self, prefix: u32, key: &PolicyKey) -> Result<()> {
            self.policy.remove(&(prefix, *key));
            self.log.push("del_policy".into());
            self.snap();
            Ok(())
        }
        fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
            self.services.insert(*key, *value);
            self.log
                .push(format!("set_service {}", u16::from_be(key.port_be)));
            Ok(())
        }
        fn del_service(&mut self, key: &ServiceKey) -> Result<()> {
            self.services.remove(key);
            self.log
                .push(format!("del_service {}", u16::from_be(key.port_be)));
            Ok(())
        }
        fn set_service_range(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
            self.service_ranges.insert((prefix, *key));
            self.log.push(format!("set_service_range /{prefix}"));
            Ok(())
        }
        fn del_service_range(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
            self.service_ranges.remove(&(prefix, *key));
            self.log.push(format!("del_service_range /{prefix}"));
            Ok(())
        }
        fn bump_revision(&mut self) -> Result<()> {
            self.log.push("bump_revision".into());
            Ok(())
        }
    }

    /// Frontends are written after the ipcache and before the revision is bumped (a changed class can
    /// narrow a datagram flow's admission); new ranges before frontends, old ones after; an unchanged
    /// frontend is not written again.
    #[test]
    fn services_are_written_in_the_ipcache_step() {
        use crate::model::Protocol;
        use crate::policy::Frontend;
        let frontend = |port| Frontend {
            addr: "10.96.0.20".parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        };
        let mut desired = Desired::default();
        desired.services.insert(frontend(80), vec![(300, 8080)]);
        desired.services.insert(frontend(443), vec![]);
        desired.service_cidrs.insert("10.96.0.0/16".parse().unwrap());
        desired.ipcache.insert("10.0.0.11/32".parse().unwrap(), 300);
        let (mut mem, mut syncer) = (Mem::default(), Syncer::new());
        syncer.sync(&mut mem, &desired, &BTreeMap::new()).unwrap();
        let key80 = service_key(&frontend(80));
        assert_eq!(mem.services[&key80].classes, 1);
        assert_eq!(
            mem.services[&key80].class[0],
            BackendClass {
                identity: 300,
                port: 8080,
                _pad: 0
            }
        );
        assert_eq!(mem.services[&service_key(&frontend(443))].classes, 0);
        let at = |log: &[String], what: &str| {
            log.iter()
                .position(|l| l.starts_with(what))
                .unwrap_or_else(|| panic!("no {what} in {log:?}"))
        };
        assert!(at(&mem.log, "set_ipcache") < at(&mem.log, "set_service_range"));
        assert!(at(&mem.log, "set_service_range") < at(&mem.log, "set_service "));
        assert!(at(&mem.log, "set_service ") < at(&mem.log, "bump_revision"));

        // The backends of :80 change identity; :443 goes; the range is replaced.
        mem.log.clear();
        desired
            .services
            .insert(frontend(80), vec![(301, 8080), (300, 8080)]);
        desired.services.remove(&frontend(443));
        desired.service_cidrs = ["10.97.0.0/16".parse().unwrap()].into();
        let delta = Delta {
            services: true,
            ..Delta::default()
        };
        syncer
            .sync_delta(&mut mem, &desired, &BTreeMap::new(), &delta)
            .unwrap();
        assert_eq!(mem.services[&key80].classes, 2);
        assert_eq!(mem.services.len(), 1);
        assert_eq!(mem.service_ranges.len(), 1);
        let log = mem.log.clone();
        assert!(at(&log, "set_service_range") < at(&log, "set_service 80"));
        assert!(at(&log, "del_service 443") < at(&log, "del_service_range"));
        assert!(at(&log, "del_service_range") < at(&log, "bump_revision"));
        // Nothing changed: nothing written, no revision.
        mem.log.clear();
        syncer
            .sync_delta(&mut mem, &desired, &BTreeMap::new(), &delta)
            .unwrap();
        assert!(mem.log.is_empty(), "{:?}", mem.log);
    }

    fn pod(name: &str) -> ObjectRef {
        ObjectRef::new("x", name)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    /// Endpoint "server" (ifindex 7) isolated for ingress, allowing `allowed` identities on TCP `port`;
    /// `clients` maps client addresses to identities.
    fn desired(isolated: bool, allowed: &[u32], port: u16, clients: &[(u8, u32)]) -> Desired {
        let mut d = Desired::default();
        let mut allow = BTreeMap::new();
        for id in allowed {
            allow.insert(
                AllowKey {
                    direction: dir::INGRESS,
                    remote: *id,
                    protocol: proto::TCP,
                    port_lo: port,
                    port_hi: port,
                },
                1,
            );
        }
        d.endpoints.insert(
            pod("server"),
            EndpointPolicy {
                identity: 300,
                ips: vec![ip(1)],
                isolated_ingress: isolated,
                isolated_egress: false,
                ingress_policies: vec![],
                egress_policies: vec![],
                allow,
            },
        );
        d.ipcache.insert(IpNet::from(ip(1)), 300);
        for (last, id) in clients {
            d.ipcache.insert(IpNet::from(ip(*last)), *id);
        }
        d
    }

    fn check_transition(old: &Desired, new: &Desired) -> Mem {
        let ifs: BTreeMap<_, _> = [(pod("server"), 7u32)].into();
        let mut mem = Mem::default();
        let mut syncer = Syncer::new();
        syncer.sync(&mut mem, old, &ifs).unwrap();
        let before = mem.clone();
        mem.snapshots.clear();
        syncer.sync(&mut mem, new, &ifs).unwrap();
        let after = mem.clone();
        for snap in &mem.snapshots {
            for client in 2..6u8 {
                let src = ip_to_mapped(ip(client));
                for port in [80u16, 81] {
                    if snap.allows(7, src, port) {
                        assert!(
                            before.allows(7, src, port) || after.allows(7, src, port),
                            "intermediate state opened 10.0.0.{client}:{port}; writes: {:?}",
                            mem.log
                        );
                    }
                }
            }
        }
        mem
    }

    #[test]
    fn relabel_and_policy_change_never_open_more_than_old_or_new() {
        // Old: client .2 is identity 400 (not allowed), 500 is allowed. New: the policy allows 400, and
        // client .2 moves to identity 600 at the same time. Allowing 400 before .2 leaves it would open
        // .2 for a moment; the sync must order the writes so that it never does.
        let old = desired(true, &[500], 80, &[(2, 400), (3, 500)]);
        let new = desired(true, &[400], 80, &[(2, 600), (3, 500), (4, 400)]);
        check_transition(&old, &new);
        check_transition(&new, &old);
    }

    #[test]
    fn isolation_changes_are_ordered() {
        let open = desired(false, &[], 80, &[(2, 400)]);
        let closed = desired(true, &[400], 81, &[(2, 400)]);
        check_transition(&open, &closed);
        check_transition(&closed, &open);
    }

    #[test]
    fn a_new_endpoint_becomes_known_only_after_its_rules() {
        let new = desired(true, &[400], 80, &[(2, 400)]);
        let mem = check_transition(&Desired::default(), &new);
        let first_endpoint = mem
            .log
            .iter()
            .position(|l| l.starts_with("set_endpoint"))
            .unwrap();
        let last_policy = mem.log.iter().rposition(|l| l == "set_policy").unwrap();
        assert!(first_endpoint > last_policy, "{:?}", mem.log);
    }

    #[test]
    fn unchanged_state_writes_nothing() {
        let d = desired(true, &[400, 500], 80, &[(2, 400)]);
        let ifs: BTreeMap<_, _> = [(pod("server"), 7u32)].into();
        let mut mem = Mem::default();
        let mut syncer = Syncer::new();
        assert!(syncer.sync(&mut mem, &d, &ifs).unwrap().total() > 0);
        assert_eq!(syncer.sync(&mut mem, &d, &ifs).unwrap().total(), 0);
    }

    #[test]
    fn the_any_peer_lookup_is_skipped_only_where_no_entry_is_for_any_peer() {
        let key = |direction, remote| AllowKey {
            direction,
            remote,
            protocol: proto::TCP,
            port_lo: 80,
            port_hi: 80,
        };
        let both = ep_flags::NO_ANY_PEER_INGRESS | ep_flags::NO_ANY_PEER_EGRESS;
        assert_eq!(no_any_peer_flags(&BTreeMap::new()), both);
        let some: BTreeMap<AllowKey, u32> = [(key(dir::INGRESS, 300), 1), (key(dir::EGRESS, 301), 2)].into();
        assert_eq!(no_any_peer_flags(&some), both, "entries for identities only");
        let mut any_in = some.clone();
        any_in.insert(key(dir::INGRESS, identity::ANY), 3);
        assert_eq!(no_any_peer_flags(&any_in), ep_flags::NO_ANY_PEER_EGRESS);
        let mut any_out = some;
        any_out.insert(
            AllowKey {
                direction: dir::EGRESS,
                remote: identity::ANY,
                protocol: 0,
                port_lo: 0,
                port_hi: u16::MAX,
            },
            4,
        );
        assert_eq!(no_any_peer_flags(&any_out), ep_flags::NO_ANY_PEER_INGRESS);
    }

    #[test]
    fn the_policy_trie_is_walked_only_for_the_protocols_and_directions_with_wide_entries() {
        let key = |direction, protocol, port_lo, port_hi| AllowKey {
            direction,
            remote: 300,
            protocol,
            port_lo,
            port_hi,
        };
        assert_eq!(no_wide_flags(&BTreeMap::new()), ep_flags::ALL_NO_WIDE);
        let exact: BTreeMap<AllowKey, u32> = [
            (key(dir::INGRESS, proto::TCP, 80, 80), 1),
            (key(dir::EGRESS, proto::UDP, 53, 53), 2),
        ]
        .into();
        assert_eq!(no_wide_flags(&exact), ep_flags::ALL_NO_WIDE, "single ports only");
        let mut range = exact.clone();
        range.insert(key(dir::EGRESS, proto::UDP, 30000, 30031), 3);
        assert_eq!(
            no_wide_flags(&range),
            ep_flags::ALL_NO_WIDE & !ep_flags::NO_WIDE_EGRESS_UDP
        );
        let mut any_port = exact.clone();
        any_port.insert(key(dir::INGRESS, proto::SCTP, 0, u16::MAX), 4);
        assert_eq!(
            no_wide_flags(&any_port),
            ep_flags::ALL_NO_WIDE & !ep_flags::NO_WIDE_INGRESS_OTHER
        );
        let mut any_proto = exact;
        any_proto.insert(key(dir::INGRESS, proto::ANY, 0, u16::MAX), 5);
        let ingress =
            ep_flags::NO_WIDE_INGRESS_TCP | ep_flags::NO_WIDE_INGRESS_UDP | ep_flags::NO_WIDE_INGRESS_OTHER;
        assert_eq!(no_wide_flags(&any_proto), ep_flags::ALL_NO_WIDE & !ingress);
    }

    proptest::proptest! {
        /// `is_wide` says where `policy_keys` writes a key: exact entries (the hash) or the trie.
        #[test]
        fn a_key_is_wide_exactly_when_it_is_written_wider_than_one_port(
            protocol in proptest::sample::select(vec![proto::ANY, proto::TCP, proto::UDP, proto::SCTP]),
            port_lo in 0u16..=u16::MAX,
            span in proptest::prop_oneof![proptest::strategy::Just(0u16), 0u16..=u16::MAX],
        ) {
            let key = AllowKey { direction: dir::INGRESS, remote: 300, protocol, port_lo, port_hi: port_lo.saturating_add(span) };
            let written = policy_keys(7, &key);
            let all_exact = written.iter().all(|(prefix, _)| *prefix == PolicyKey::PREFIX_FULL);
            proptest::prop_assert_eq!(is_wide(&key), !all_exact, "{:?} -> {:?}", key, written);
        }
    }

    #[test]
    fn ipcache_keys_round_trip() {
        for net in [
            "10.1.0.0/16",
            "0.0.0.0/0",
            "fd00::/64",
            "203.0.113.10/32",
            "::/0",
            "::/80",
        ] {
            let net: IpNet = net.parse().unwrap();
            let (prefix, key) = ipcache_key(&net);
            assert_eq!(ipcache_net(prefix, &key), Some(net));
        }
        // IPv6 inside ::ffff:0:0/96 has IPv4's keys: the engine gives it no entry.
        let mapped: IpNet = "::ffff:0:0/96".parse().unwrap();
        assert_eq!(ipcache_key(&mapped), ipcache_key(&v4_space()));
        assert!(crate::policy::keyed_as_ipv4(&mapped));
    }

    /// The engine's state for endpoint "server" (10.0.0.1, fd00::1; bound to ifindex 7) whose only
    /// ingress rule is from `::/0`, beside a policy (selecting nothing) with the ipBlocks `others`.
    fn from_v6_any(others: &[&str]) -> Desired {
        use crate::model::{Cluster, LabelSelector, NetworkPolicy, Peer, Pod, Rule};
        let block = |cidr: &str| Peer::IpBlock {
            cidr: cidr.parse().unwrap(),
            except: vec![],
        };
        let policy = |name: &str, selector: LabelSelector, peers: Vec<Peer>| NetworkPolicy {
            namespace: "x".into(),
            name: name.into(),
            pod_selector: selector,
            isolates_ingress: true,
            isolates_egress: false,
            ingress: vec![Rule { peers, ports: vec![] }],
            egress: vec![],
        };
        let mut c = Cluster::default();
        let server = Pod {
            namespace: "x".into(),
            name: "server".into(),
            ips: vec![ip(1), "fd00::1".parse().unwrap()],
            ..Pod::default()
        };
        c.pods.insert(server.object_ref(), server);
        let mut pols = vec![policy("in", LabelSelector::default(), vec![block("::/0")])];
        if !others.is_empty() {
            let nothing = LabelSelector {
                match_labels: [("none".to_owned(), "none".to_owned())].into(),
                ..Default::default()
            };
            pols.push(policy(
                "other",
                nothing,
                others.iter().map(|c| block(c)).collect(),
            ));
        }
        for p in pols {
            c.policies.insert(p.object_ref(), p);
        }
        crate::policy::Engine::new().compile(&c)
    }

    fn v4_space_key() -> (u32, IpcacheKey) {
        ipcache_key(&v4_space())
    }

    const WORLD_V4: [u8; 4] = [8, 8, 8, 8];

    fn world_v6() -> [u8; 16] {
        "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets()
    }

    #[test]
    fn the_ipv4_space_entry_is_written_and_never_removed() {
        let ifs: BTreeMap<_, _> = [(pod("server"), 7u32)].into();
        let world = ip_to_mapped(IpAddr::from(WORLD_V4));
        let mut mem = Mem::default();
        let mut syncer = Syncer::new();
        let states = [
            &[][..],
            &["0.0.0.0/0"],
            &["10.0.0.0/8"],
            &["0.0.0.0/0", "10.0.0.0/8"],
            &[],
        ];
        for (i, others) in states.iter().enumerate() {
            let d = from_v6_any(others);
            mem.snapshots.clear();
            syncer.sync(&mut mem, &d, &ifs).unwrap();
            // From the first sync on, at every write: the entry is there and IPv4 world is not admitted.
            let during: &[Mem] = if i == 0 { &[] } else { &mem.snapshots };
            for snap in during.iter().chain([&mem]) {
                assert!(
                    snap.ipcache.contains_key(&v4_space_key()),
                    "state {i} ({others:?}): {:?}",
                    mem.log
                );
                assert!(
                    !snap.allows(7, world, 80),
                    "state {i} ({others:?}) admits IPv4 world: {:?}",
                    mem.log
                );
            }
            let want = d.ipcache[&v4_space()];
            assert_eq!(mem.ipcache[&v4_space_key()].identity, want, "state {i}");
            assert_eq!(
                want == identity::WORLD,
                !others.contains(&"0.0.0.0/0"),
                "state {i}"
            );
            assert!(
                mem.allows(7, world_v6(), 80),
                "IPv6 world is admitted by ::/0 (state {i})"
            );
        }
    }

    #[test]
    fn maps_of_an_earlier_agent_without_the_ipv4_space_get_it() {
        let ifs: BTreeMap<_, _> = [(pod("server"), 7u32)].into();
        let world = ip_to_mapped(IpAddr::from(WORLD_V4));
        for full in [true, false] {
            for others in [&[][..], &["10.0.0.0/8"]] {
                // What an agent before the fix wrote: no entry for the IPv4 space, so IPv4 world matched
                // ::/0.
                let mut legacy = from_v6_any(others);
                legacy.ipcache.remove(&v4_space());
                let mut mem = Mem::default();
                let mut syncer = Syncer::new();
                syncer.sync(&mut mem, &legacy, &ifs).unwrap();
                assert!(!mem.ipcache.contains_key(&v4_space_key()));
                assert!(
                    mem.allows(7, world, 80),
                    "the earlier agent's state admits IPv4 world"
                );
                // This agent's first sync, whether it looks at everything or at a delta naming nothing.
                let d = from_v6_any(others);
                let delta = if full { Delta::full() } else { Delta::default() };
                let stats = syncer.sync_delta(&mut mem, &d, &ifs, &delta).unwrap();
                assert_eq!(stats.ipcache_writes, 1, "full {full}, {others:?}");
                assert_eq!(mem.ipcache[&v4_space_key()].identity, identity::WORLD);
                assert!(!mem.allows(7, world, 80), "full {full}, {others:?}");
                assert!(mem.allows(7, world_v6(), 80));
                assert_eq!(
                    syncer
                        .sync_delta(&mut mem, &d, &ifs, &Delta::default())
                        .unwrap()
                        .total(),
                    0
                );
            }
        }
    }

    #[test]
    fn the_ipv4_space_counts_against_the_ipcache_capacity() {
        let ifs: BTreeMap<_, _> = [(pod("server"), 7u32)].into();
        let d = from_v6_any(&["10.0.0.0/8"]);
        // The server's two addresses, ::/0, 10.0.0.0/8 and the IPv4 space.
        assert_eq!(d.ipcache.len(), 5, "{:?}", d.ipcache);
        let mut syncer = Syncer::new();
        syncer.capacities.ipcache = 4;
        match syncer.sync(&mut Mem::default(), &d, &ifs) {
            Err(Error::Capacity {
                map: "ipcache",
                needed: 5,
                capacity: 4,
            }) => {}
            other => panic!("{other:?}"),
        }
        syncer.capacities.ipcache = 5;
        let mut mem = Mem::default();
        syncer.sync(&mut mem, &d, &ifs).unwrap();
        assert_eq!(mem.ipcache.len(), 5);
        assert_eq!(syncer.ipcache_entries(), 5);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

        /// Syncing only what the engine's delta names (and changed bindings) leaves the maps exactly as
        /// a full sync from scratch would, at every step of an evolving cluster; interfaces come and go.
        #[test]
        fn delta_sync_writes_what_a_full_sync_writes(steps in crate::policy::proptests::evolution()) {
            let mut engine = crate::policy::Engine::for_node("here");
            let mut previous = crate::model::Cluster::default();
            let mut syncer = Syncer::new();
            let mut mem = Mem::default();
            let mut ifindexes: BTreeMap<ObjectRef, u32> = BTreeMap::new();
            for (k, c) in steps.iter().enumerate() {
                engine.update(c, &crate::policy::Changes::between(&previous, c));
                previous = c.clone();
                let delta = engine.take_delta();
                let d = engine.desired();
                let bindings: BTreeMap<ObjectRef, u32> = d
                    .endpoints
                    .keys()
                    .enumerate()
                    .filter(|(i, _)| (i + k) % 4 != 0)
                    .map(|(_, pod)| {
                        let next = ifindexes.len() as u32 + 1;
                        (pod.clone(), *ifindexes.entry(pod.clone()).or_insert(next))
                    })
                    .collect();
                syncer.sync_delta(&mut mem, d, &bindings, &delta).expect("sync");
                let mut full = Mem::default();
                Syncer::new().sync(&mut full, d, &bindings).expect("full sync");
                proptest::prop_assert_eq!(&mem.endpoints, &full.endpoints, "step {}", k);
                proptest::prop_assert_eq!(&mem.ipcache, &full.ipcache, "step {}", k);
                proptest::prop_assert_eq!(&mem.policy, &full.policy, "step {}", k);
                proptest::prop_assert_eq!(syncer.policy_entries(), full.policy.len());
                mem.snapshots.clear();
            }
        }
    }
}
