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
use tracing::debug;
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
    /// What a refused sync began to write (see [`Unconfirmed`]).
    unconfirmed: Unconfirmed,
}

/// Writes a sync began but did not see through (a later write was refused): the record above does not
/// have them, and what the kernel holds for them is not known. Each is noted before it is written (or
/// deleted: a next state that wants a deleted entry back must write it, not trust the record), and
/// the next sync looks at them whatever its delta says: what the state still wants is written again,
/// the rest deleted (deleting what is absent is harmless). Without this, an entry written by a refused
/// sync and no longer wanted by the next state would stay in the kernel, allowing what no policy does.
#[derive(Debug, Default)]
struct Unconfirmed {
    endpoints: BTreeSet<u32>,
    policy: BTreeMap<u32, BTreeSet<(u32, PolicyKey)>>,
    services: BTreeSet<ServiceKey>,
    /// The policy writes of the sync under way, each noted before it is made. A push costs a cold sync
    /// of 100,000 entries nothing measurable, a set insert per write 20% of its time; so they go into
    /// `policy` only when the next sync begins (`settle`), which finds them there only if this one was
    /// refused half-way (a sync that went through empties the log).
    written: Vec<(u32, u32, PolicyKey)>,
}

impl Unconfirmed {
    /// What the last sync noted and did not see through, into the sets this one consults.
    fn settle(&mut self) {
        for (ifindex, prefix, key) in self.written.drain(..) {
            self.policy.entry(ifindex).or_default().insert((prefix, key));
        }
    }

    /// Every write went through: nothing is unconfirmed any more (but Services, recorded apart).
    fn confirm(&mut self) {
        self.endpoints.clear();
        self.policy.clear();
        self.written.clear();
        if self.written.capacity() > 4096 {
            // A cold sync's log is not kept for the small ones after it.
            self.written = Vec::new();
        }
    }

    fn endpoint(&self, ifindex: u32) -> bool {
        self.endpoints.contains(&ifindex) || self.policy.contains_key(&ifindex)
    }
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

static EMPTY_GROUPS: BTreeSet<AllowGroup> = BTreeSet::new();

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
    #[tracing::instrument(level = "debug", skip_all)]
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
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn sync_delta(
        &mut self,
        ops: &mut impl MapOps,
        desired: &Desired,
        interfaces: &BTreeMap<ObjectRef, u32>,
        delta: &Delta,
    ) -> Result<SyncStats> {
        self.unconfirmed.settle();
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
            // Whatever a refused sync left unconfirmed, whatever the delta says.
            scope.extend(self.unconfirmed.endpoints.iter().copied());
            scope.extend(self.unconfirmed.policy.keys().copied());
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
            if ep.audit_ingress {
                flags |= ep_flags::AUDIT_INGRESS;
            }
            if ep.audit_egress {
                flags |= ep_flags::AUDIT_EGRESS;
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
            let same_place = self.endpoints.get(&ifindex).is_some_and(|old| &old.pod == pod)
                && !self.unconfirmed.endpoint(ifindex);
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

        // 1. Narrowings. First what a refused sync left: an endpoint the record does not have goes (its
        // interface drops everything until step 3 writes it again, if it is still wanted), and entries
        // the new state does not have go.
        for ifindex in &self.unconfirmed.endpoints {
            if !self.endpoints.contains_key(ifindex) {
                ops.del_endpoint(*ifindex)?;
                stats.endpoint_writes += 1;
            }
        }
        for (ifindex, keys) in &self.unconfirmed.policy {
            let wanted = next.get(ifindex).map(|n| match &n.entries {
                NextEntries::All(g) | NextEntries::Groups(g) => g,
            });
            for (prefix, key) in keys {
                if !wanted.is_some_and(|g| g.values().any(|e| e.contains_key(&(*prefix, *key)))) {
                    ops.del_policy(*prefix, key)?;
                    stats.policy_writes += 1;
                }
            }
        }
        for (ifindex, old) in self.endpoints.iter().filter(|(i, _)| in_scope(i)) {
            let unsure = self.unconfirmed.endpoints.contains(ifindex);
            let Some(new) = next.get(ifindex) else {
                // Deletions are noted too: a refused sync leaves the record saying they are there, and
                // a next state that wants them must write them again.
                self.unconfirmed.endpoints.insert(*ifindex);
                ops.del_endpoint(*ifindex)?;
                stats.endpoint_writes += 1;
                for (prefix, key) in old.entries.values().flat_map(BTreeMap::keys) {
                    self.unconfirmed.written.push((*ifindex, *prefix, *key));
                    ops.del_policy(*prefix, key)?;
                    stats.policy_writes += 1;
                }
                continue;
            };
            // Unconfirmed, the kernel may hold what the refused sync wrote: the step is written anyway.
            if new.info != old.info || unsure {
                let step = narrowest(&old.info, &new.info);
                if step != old.info || unsure {
                    self.unconfirmed.endpoints.insert(*ifindex);
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
                        self.unconfirmed.written.push((*ifindex, *prefix, *key));
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
        let services_changed = if delta.full || delta.services || !self.unconfirmed.services.is_empty() {
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
                    let unsure = self
                        .unconfirmed
                        .policy
                        .get(ifindex)
                        .is_some_and(|k| k.contains(&(*prefix, *key)));
                    if old_entries.get(&(*prefix, *key)) != Some(value) || unsure {
                        self.unconfirmed.written.push((*ifindex, *prefix, *key));
                        ops.set_policy(*prefix, key, value)?;
                        stats.policy_writes += 1;
                    }
                }
            }
            if old.map(|o| o.info) != Some(new.info) || self.unconfirmed.endpoints.contains(ifindex) {
                self.unconfirmed.endpoints.insert(*ifindex);
                ops.set_endpoint(*ifindex, &new.info)?;
                stats.endpoint_writes += 1;
            }
        }
        // Every write of this sync went through: the record below is the kernel's again.
        self.unconfirmed.confirm();
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
            if self.services.get(key) != Some(value) || self.unconfirmed.services.contains(key) {
                self.unconfirmed.services.insert(*key);
                ops.set_service(key, value)?;
                stats.service_writes += 1;
                changed = true;
            }
        }
        for key in self
            .services
            .keys()
            .chain(&self.unconfirmed.services)
            .filter(|k| !next.contains_key(k))
        {
            ops.del_service(key)?;
            stats.service_writes += 1;
            changed = true;
        }
        self.services = next;
        self.unconfirmed.services.clear();
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

mod entries;
mod kernel;

#[cfg(test)]
use entries::is_wide;
use entries::{entries_for, narrowest, no_any_peer_flags, no_wide_flags};
pub use entries::{service_key, service_value};
pub use kernel::KernelMaps;

#[cfg(test)]
mod tests;
