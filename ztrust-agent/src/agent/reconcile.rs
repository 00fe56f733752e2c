//! One pass of the agent's loop, in the order its steps run: [`Reconciler::apply_source`] (the
//! source's changes and the node's addresses into the engine), [`Reconciler::bind`] (this node's pods to
//! their interfaces), [`Reconciler::sync`] (the desired state into the maps) and
//! [`Reconciler::report`] (the flow view). Each step takes the datapath as a trait, so that the whole
//! pass runs without root against doubles.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tracing::{error, info, warn};

use super::view;
use crate::datapath::bind::{Attach, Binder};
use crate::datapath::sync::{MapOps, SyncStats, Syncer};
use crate::flows::View;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::model::{Cluster, ObjectRef};
use crate::netif::HostRoutes;
use crate::observer::Hub;
use crate::policy::{Changes, Delta, Engine};
use crate::source::ClusterSource;

/// What [`Reconciler::sync`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Synced {
    /// Nothing to write, or no snapshot yet (the pinned state of an earlier agent keeps enforcing).
    Nothing,
    /// The first sync of this agent: from here on its state enforces.
    First(SyncStats),
    Again(SyncStats),
    /// The maps refused the update (capacity, a kernel error): the last applied state keeps enforcing,
    /// and the next pass tries again.
    Refused,
}

/// Where a pass reports: the flow view, metrics, the observer's status, readiness.
pub struct Outputs {
    pub view: Arc<RwLock<View>>,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
    pub health: Health,
}

/// The loop's state from one pass to the next.
pub struct Reconciler<S> {
    source: S,
    engine: Engine,
    node_name: String,
    syncer: Syncer,
    binder: Binder,
    /// What changed in the desired state since the last successful sync.
    pending: Delta,
    /// Something to write: the desired state or the bindings changed, or the last sync was refused.
    dirty: bool,
    /// Until the source has delivered a whole snapshot, the pinned state of an earlier agent enforces:
    /// syncing an empty cluster would tear it down.
    have_snapshot: bool,
    in_sync: bool,
    /// Whether the last sync attempt's outcome is yet to be reported.
    attempted: bool,
    last_sync_error: Option<String>,
    view: Arc<RwLock<View>>,
    /// Pod addresses as of the last change, to take them out of the view when they change.
    view_addrs: HashMap<ObjectRef, Vec<IpAddr>>,
    /// Policies changed: the view's rule names are rebuilt at the next report.
    view_rules_stale: bool,
    warned: BTreeSet<String>,
    not_enforced: NotEnforced,
    metrics: Arc<Metrics>,
    hub: Arc<Hub>,
    health: Health,
}

impl<S: ClusterSource> Reconciler<S> {
    /// `syncer` knows what the maps hold (adopted from an earlier agent's, or new).
    pub fn new(source: S, engine: Engine, syncer: Syncer, binder: Binder, out: Outputs) -> Self {
        Self {
            source,
            node_name: engine.node().unwrap_or_default().to_owned(),
            engine,
            syncer,
            binder,
            pending: Delta::full(),
            dirty: true,
            have_snapshot: false,
            in_sync: false,
            attempted: false,
            last_sync_error: None,
            view: out.view,
            view_addrs: HashMap::new(),
            view_rules_stale: true,
            warned: BTreeSet::new(),
            not_enforced: NotEnforced::default(),
            metrics: out.metrics,
            hub: out.hub,
            health: out.health,
        }
    }

    pub fn source(&mut self) -> &mut S {
        &mut self.source
    }

    pub fn cluster(&self) -> &Cluster {
        self.source.cluster()
    }

    pub fn bindings(&self) -> &BTreeMap<ObjectRef, u32> {
        self.binder.bindings()
    }

    /// `explain`'s answer from the engine's state, each end of this node looked up in `maps`.
    pub fn explain(
        &self,
        query: &crate::explain::Query,
        maps: &dyn crate::explain::kernel::Lookup,
    ) -> Result<crate::explain::Explanation, crate::explain::ExplainError> {
        use crate::explain::{ExplainError, State, explain};
        if !self.have_snapshot {
            return Err(ExplainError::NotReady);
        }
        let state = State {
            cluster: self.source.cluster(),
            desired: self.engine.desired(),
            node: self.engine.node(),
            audit_namespaces: &self.syncer.audit_namespaces,
            audit_all: self.syncer.global_flags & ztrust_common::ep_flags::AUDIT != 0,
        };
        let ifindex_of = |p: &ObjectRef| self.binder.bindings().get(p).copied();
        let mut x = explain(&state, query, Some((maps, &ifindex_of)))?;
        if self.dirty {
            x.notes.push(
                "the agent has changes it has not written to the kernel maps yet (a sync was refused, or is \
                 under way): where the kernel differs, ask again in a moment"
                    .into(),
            );
        }
        Ok(x)
    }

    /// Step 1: the node's local addresses (`None`: not read this time, they stay) and what changed in
    /// the source into the engine, and Service backends whose grace is over out of it.
    pub fn apply_source(&mut self, host_addrs: Option<BTreeSet<IpAddr>>, now: Instant) {
        let host_addrs_changed = host_addrs.is_some_and(|a| self.source.set_host_local_addrs(a));
        if let Some((changes, errors)) = self.source.poll_changes() {
            self.have_snapshot = true;
            self.metrics.set_source_errors(errors.len() as u64);
            self.compile(&changes);
        } else if host_addrs_changed && self.have_snapshot {
            let cluster = self.source.cluster();
            info!(addresses = ?cluster.host_local_addrs, "the node's local addresses changed: traffic from them is the node's");
            self.engine.update(cluster, &Changes::default());
            self.pending.merge(self.engine.take_delta());
            self.dirty = true;
        }
        if self.have_snapshot && self.engine.next_service_expiry().is_some_and(|t| t <= now) {
            self.engine.expire_services(self.source.cluster(), now);
            let delta = self.engine.take_delta();
            if delta.services {
                info!("Service backends past their grace dropped from their frontends");
                self.dirty = true;
            }
            self.pending.merge(delta);
        }
    }

    fn compile(&mut self, changes: &Changes) {
        let started = Instant::now();
        let cluster = self.source.cluster();
        self.engine.update(cluster, changes);
        self.pending.merge(self.engine.take_delta());
        {
            let mut v = self.view.write().expect("view lock");
            view::update_pods(&mut v, cluster, &changes.pods, &mut self.view_addrs);
            if !(changes.services.is_empty() && changes.endpoint_slices.is_empty() && changes.pods.is_empty())
            {
                view::update_services(&mut v, cluster);
            }
        }
        self.view_rules_stale |= !changes.policies.is_empty();
        let desired = self.engine.desired();
        let audit = crate::datapath::sync::audit_namespaces(cluster);
        if audit != self.syncer.audit_namespaces {
            info!(namespaces = ?audit, "namespaces in audit mode (annotation {})", crate::datapath::sync::AUDIT_ANNOTATION);
            self.syncer.audit_namespaces = audit;
            self.pending.merge(Delta::full());
        }
        // Said once while they hold (a change elsewhere does not repeat them); again if they recur.
        for w in fresh_warnings(&mut self.warned, &desired.warnings) {
            warn!("{w}");
        }
        info!(
            pods = cluster.pods.len(),
            policies = cluster.policies.len(),
            endpoints = desired.endpoints.len(),
            changed = changes.namespaces.len() + changes.pods.len() + changes.policies.len(),
            compile_ms = started.elapsed().as_secs_f64() * 1000.0,
            "policy compiled"
        );
        self.metrics.observe_compile(started.elapsed().as_secs_f64());
        self.metrics.set_identities(desired.identities.len() as u64);
        self.dirty = true;
        self.not_enforced
            .report(cluster, &changes.pods, &self.node_name, &self.metrics, &self.hub);
    }

    /// Step 2: this node's pods to the interfaces their host routes lead through (see [`Binder`]).
    pub fn bind(&mut self, dp: &mut impl Attach, ifaces: &BTreeMap<String, u32>, routes: &HostRoutes) {
        self.dirty |= self.binder.bind(dp, self.engine.desired(), ifaces, routes);
    }

    /// Step 3: what changed since the last successful sync into the maps, in the order that never
    /// allows more mid-update (see [`Syncer::sync_delta`]).
    pub fn sync(&mut self, ops: &mut impl MapOps, started_at: Instant) -> Synced {
        if !(self.dirty && self.have_snapshot) {
            return Synced::Nothing;
        }
        self.attempted = true;
        let started = Instant::now();
        let result =
            self.syncer
                .sync_delta(ops, self.engine.desired(), self.binder.bindings(), &self.pending);
        match result {
            Ok(stats) => {
                self.pending = Delta::default();
                self.last_sync_error = None;
                self.dirty = false;
                self.metrics
                    .observe_sync(started.elapsed().as_secs_f64(), stats.total() as u64);
                let caps = self.syncer.capacities;
                for (map, used, capacity) in [
                    ("ZT_POLICY", self.syncer.policy_entries(), caps.policy),
                    ("ZT_IPCACHE", self.syncer.ipcache_entries(), caps.ipcache),
                    ("ZT_ENDPOINTS", self.syncer.endpoint_count(), caps.endpoints),
                ] {
                    self.metrics.set_map_fill(map, used as u64, u64::from(capacity));
                }
                if self.in_sync {
                    if stats.total() > 0 {
                        info!(
                            writes = stats.total(),
                            sync_ms = started.elapsed().as_secs_f64() * 1000.0,
                            "synced"
                        );
                    }
                    return Synced::Again(stats);
                }
                // Until here an earlier agent's pinned state enforced; from here, this agent's.
                self.in_sync = true;
                self.health.set_ready();
                info!(
                    writes = stats.total(),
                    since_start_ms = started_at.elapsed().as_secs_f64() * 1000.0,
                    "in sync with the source"
                );
                Synced::First(stats)
            }
            Err(e) => {
                // Retried every pass; said once per distinct problem.
                let msg = e.to_string();
                if self.last_sync_error.as_deref() != Some(msg.as_str()) {
                    self.metrics.sync_refused();
                    error!(error = %msg, "datapath update refused; the last applied state keeps enforcing");
                    self.last_sync_error = Some(msg);
                }
                Synced::Refused
            }
        }
    }

    /// Step 4: the flow view's endpoints (and rule names, when policies changed) as of the last sync
    /// attempt.
    pub fn report(&mut self) {
        if !std::mem::take(&mut self.attempted) {
            return;
        }
        view::update_policy(
            &mut self.view.write().expect("view lock"),
            self.engine.desired(),
            self.binder.bindings(),
            self.view_rules_stale,
        );
        self.view_rules_stale = false;
    }
}

/// The `reason` of a hostNetwork pod in [`NotEnforced`] (metric label, observer status).
pub const HOST_NETWORK: &str = "host_network";

/// Whether `pod` is a hostNetwork pod of this node (a pod without `spec.nodeName` counts as local, as
/// for endpoints). Such pods share the node's network namespace and interfaces, so no hook on a pod
/// interface sees their traffic, and the engine treats their addresses as the node's: their policies are
/// not enforced.
fn is_local_host_network(pod: &crate::model::Pod, node: &str) -> bool {
    pod.host_network && pod.node_name.as_deref().is_none_or(|n| n == node)
}

/// Local pods ztrust does not enforce, reported rather than silently skipped: a warning once per pod
/// (again if it goes and comes back), `ztrust_pods_not_enforced{reason}` and the observer's status.
#[derive(Default)]
struct NotEnforced {
    warned: BTreeSet<ObjectRef>,
    /// The gauge and the observer status were set once (to 0 if there is nothing to report).
    reported: bool,
}

impl NotEnforced {
    /// Call with the pods a change touched (all of them for a first snapshot): only those are looked
    /// at. Returns the pods warned about by this call.
    fn report(
        &mut self,
        cluster: &Cluster,
        changed: &BTreeSet<ObjectRef>,
        node: &str,
        metrics: &Metrics,
        hub: &Hub,
    ) -> Vec<ObjectRef> {
        let mut new = Vec::new();
        let mut gone = false;
        for key in changed {
            if cluster
                .pods
                .get(key)
                .is_some_and(|p| is_local_host_network(p, node))
            {
                if self.warned.insert(key.clone()) {
                    warn!(pod = %key, reason = HOST_NETWORK, "host-network pod: not enforced by ztrust (no cgroup hook yet)");
                    new.push(key.clone());
                }
            } else {
                gone |= self.warned.remove(key);
            }
        }
        if !new.is_empty() || gone || !self.reported {
            self.reported = true;
            metrics.set_pods_not_enforced(HOST_NETWORK, self.warned.len() as u64);
            hub.set_not_enforced(
                self.warned
                    .iter()
                    .map(|p| (p.to_string(), HOST_NETWORK.to_owned()))
                    .collect(),
            );
        }
        new
    }
}

/// The warnings of `current` that were not in force at the last call; `warned` becomes `current`.
fn fresh_warnings<'a>(warned: &mut BTreeSet<String>, current: &'a [String]) -> Vec<&'a String> {
    let fresh = current.iter().filter(|w| !warned.contains(*w)).collect();
    *warned = current.iter().cloned().collect();
    fresh
}

#[cfg(test)]
mod tests;
