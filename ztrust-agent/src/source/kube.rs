//! Kubernetes API source: one reflector (a `watcher` with the default backoff feeding a `Store`) per
//! kind — Namespaces, Pods, NetworkPolicies, Services and EndpointSlices, all namespaces — converted into
//! the [`crate::model`] by the same `convert_*` functions as the directory source.
//!
//! - Nothing is reported before all the stores have finished their initial list
//!   (`Store::wait_until_ready`): a partial cluster (policies without their pods, say) would compile
//!   into the wrong allow sets.
//! - The watcher re-lists by itself when the API server answers `410 Gone` (its resourceVersion fell out
//!   of the watch cache) and re-watches after a dropped connection; the store is swapped atomically at
//!   the end of a re-list, so a snapshot never shows a half-listed kind.
//! - While the API server is unreachable the stores keep their last contents: the last snapshot stays in
//!   force (the agent keeps enforcing it), and the watcher's backoff (0.8 s doubling to 30 s) reconnects.
//! - All pods are kept, not only this node's: policy peers are cluster-wide. `spec.nodeName` stays in the
//!   model so the agent can tell its local pods.
//! - Problems in NetworkPolicies (an invalid peer, port, selector: see [`convert::convert_policy`], which
//!   fails closed) become Kubernetes Events on the policy, once per distinct set of problems, when
//!   [`Options::events`] is set.
//!
//! - The stores keep a slimmed copy of each object (no `managedFields`, a Pod only with what the model
//!   reads): the agent holds every pod of the cluster.
//!
//! From a polling loop (the agent's): `KubeSource::start(client, Some(node))` once, inside the runtime,
//! then `poll_changes()` each tick: `None` until every kind is listed and whenever nothing
//! changed (so the pinned state of an earlier agent keeps enforcing until the first snapshot), else the
//! keys of the objects that changed, with `cluster()` the new state. Between re-lists only the objects
//! the watch events name are converted again, so a change costs what it touches, not the size of the
//! cluster. `try_snapshot()` and, from an event loop, `changed().await` (cancel-safe, so it can sit in a
//! `tokio::select!`) return whole snapshots instead. Problems are logged here, once each; the caller
//! need not log `Loaded::errors` again.
//!
//! Every API call the source makes is listed in [`API_CALLS`]; the deploy tests check that the
//! ClusterRole in `deploy/base` grants exactly those (plus `get` on what is read).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{Container, Namespace, ObjectReference, Pod, PodSpec, PodStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{NetworkPolicy, ServiceCIDR};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::model::{self, Cluster};
use crate::policy::Changes;
use crate::source::convert::{self, services};
use crate::source::{ClusterSource, Converted, Effect, LoadError, Loaded, Origin, Problem};

/// `reportingController` of the Events the source emits.
pub const CONTROLLER: &str = "ztrust.io/agent";

/// Default quiet time after a change before a snapshot is taken (a re-list or a rollout is a burst).
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// One kind of API request: verbs on a resource of an API group (`""` is the core group).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiCall {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Every API call this source makes, cluster-wide. The reflectors and the event publisher look
/// themselves up here (so a new call cannot be added without it), and the deploy tests check the
/// ClusterRole against it.
pub const API_CALLS: &[ApiCall] = &[
    ApiCall {
        group: "",
        resource: "namespaces",
        verbs: &["list", "watch"],
    },
    ApiCall {
        group: "",
        resource: "pods",
        verbs: &["list", "watch"],
    },
    ApiCall {
        group: "networking.k8s.io",
        resource: "networkpolicies",
        verbs: &["list", "watch"],
    },
    // A pod's connection to a Service is judged by the backends it translates to.
    ApiCall {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
    },
    ApiCall {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
    },
    // The cluster's Service ranges (Kubernetes 1.33 and later): a connection to an address in them that
    // is no known Service is dropped rather than judged as the address.
    ApiCall {
        group: "networking.k8s.io",
        resource: "servicecidrs",
        verbs: &["list", "watch"],
    },
    // Only with `Options::events`. Each distinct problem set is a new Event (create); the source
    // deduplicates itself, so it never patches an Event series.
    ApiCall {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create"],
    },
];

/// The [`API_CALLS`] entry of `K`. Panics if there is none: that is a bug caught by the unit tests.
pub fn api_call<K: Resource<DynamicType = ()>>(verb: &str) -> &'static ApiCall {
    let (group, resource) = (K::group(&()), K::plural(&()));
    API_CALLS
        .iter()
        .find(|c| c.group == group && c.resource == resource && c.verbs.contains(&verb))
        .unwrap_or_else(|| panic!("API call {verb} {group}/{resource} is missing from API_CALLS"))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("no kubeconfig and not in a pod with a service account: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("creating the Kubernetes API client: {0}")]
    Client(#[from] kube::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Client configuration: from `kubeconfig` when given (`--kubeconfig PATH`, its current context),
/// otherwise inferred — `$KUBECONFIG` or `~/.kube/config` if present, else the pod's service account
/// (in-cluster: `KUBERNETES_SERVICE_HOST` and `/var/run/secrets/kubernetes.io/serviceaccount`).
pub async fn config(kubeconfig: Option<&Path>) -> Result<kube::Config> {
    match kubeconfig {
        Some(path) => {
            let err = |source| Error::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(err)
        }
        None => Ok(kube::Config::infer().await?),
    }
}

/// [`config`] then the client.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    Ok(Client::try_from(config(kubeconfig).await?)?)
}

#[derive(Clone, Debug)]
pub struct Options {
    /// This node's name: the `reportingInstance` of Events (the model keeps every pod's node).
    pub node_name: Option<String>,
    /// Emit Kubernetes Events for problems in NetworkPolicies (needs `create` on events.k8s.io events).
    pub events: bool,
    /// Quiet time before [`KubeSource::changed`] takes its snapshot.
    pub debounce: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            node_name: None,
            events: true,
            debounce: DEBOUNCE,
        }
    }
}

/// The cluster as the API server says it is, kept current by one reflector per kind (Namespace, Pod,
/// NetworkPolicy, Service, EndpointSlice, ServiceCIDR).
///
/// Dropping it stops the watches.
pub struct KubeSource {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    policies: Store<NetworkPolicy>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    /// The ServiceCIDR objects; its writer is dropped when the API server has no such resource (before
    /// Kubernetes 1.33): then only `--service-cidr` says which ranges are Services'.
    service_cidr_objects: Store<ServiceCIDR>,
    /// `--service-cidr`, always part of the ranges.
    service_cidr_flags: Vec<ipnet::IpNet>,
    /// Bumped by the reflector tasks on every change of a store.
    generation: watch::Receiver<u64>,
    /// The generation of the last snapshot taken (reported or found unchanged).
    taken: Option<u64>,
    /// Objects the watches changed since the last snapshot (written by the reflector tasks).
    touched: Arc<Mutex<Touched>>,
    /// The converted cluster as of the last snapshot, patched object by object from then on.
    cluster: Cluster,
    /// Problems of each object (by kind and key) of `cluster`, and the references of NetworkPolicies
    /// with problems (for Events).
    problems: BTreeMap<(&'static str, String), Vec<LoadError>>,
    policy_refs: BTreeMap<String, ObjectReference>,
    /// The problems of the last snapshot reported.
    last_errors: Option<Vec<LoadError>>,
    node_ips: Vec<std::net::IpAddr>,
    debounce: Duration,
    events: Option<mpsc::UnboundedSender<(ObjectReference, String)>>,
    /// Problems already logged / sent as Events, as (object, message).
    reported: BTreeSet<(String, String)>,
    /// This node (Events' instance; whose host-network pods the policies cannot be enforced for).
    node_name: Option<String>,
    /// This node's host-network pods, kept as pods change.
    host_pods: BTreeSet<model::ObjectRef>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl KubeSource {
    /// Starts the watches (needs a Tokio runtime), with Events on.
    pub fn start(client: Client, node_name: Option<String>) -> KubeSource {
        Self::start_with(
            client,
            Options {
                node_name,
                ..Options::default()
            },
        )
    }

    pub fn start_with(client: Client, options: Options) -> KubeSource {
        let (tx, generation) = watch::channel(0u64);
        let touched = Arc::new(Mutex::new(Touched::default()));
        let t = touched.clone();
        let (namespaces, t1) =
            spawn_reflector::<Namespace>(&client, tx.clone(), t.clone(), slim_namespace, |t, ns| {
                t.namespaces.insert(ns.metadata.name.clone().unwrap_or_default());
            });
        let (pods, t2) = spawn_reflector::<Pod>(&client, tx.clone(), t.clone(), slim_pod, |t, pod| {
            t.pods.insert(key_of(&pod.metadata));
        });
        let (policies, t3) =
            spawn_reflector::<NetworkPolicy>(&client, tx.clone(), t.clone(), slim_policy, |t, np| {
                t.policies.insert(key_of(&np.metadata));
            });
        let (services, t4) = spawn_reflector::<Service>(
            &client,
            tx.clone(),
            t.clone(),
            |s| slim_metadata(&mut s.metadata),
            |t, s| {
                t.services.insert(key_of(&s.metadata));
            },
        );
        let (slices, t5) = spawn_reflector::<EndpointSlice>(
            &client,
            tx.clone(),
            t.clone(),
            |s| slim_metadata(&mut s.metadata),
            |t, s| {
                t.slices.insert(key_of(&s.metadata));
            },
        );
        let (service_cidr_objects, t6) = spawn_service_cidr_reflector(&client, tx, t);
        let mut tasks = vec![t1, t2, t3, t4, t5, t6];
        let events = options.events.then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let reporter = Reporter {
                controller: CONTROLLER.to_owned(),
                instance: options.node_name.clone(),
            };
            tasks.push(tokio::spawn(publish_events(client.clone(), reporter, rx)));
            tx
        });
        info!(
            node = options.node_name.as_deref().unwrap_or("-"),
            events = options.events,
            "watching the Kubernetes API"
        );
        KubeSource {
            namespaces,
            pods,
            policies,
            services,
            slices,
            service_cidr_objects,
            service_cidr_flags: Vec::new(),
            generation,
            taken: None,
            touched,
            cluster: Cluster::default(),
            problems: BTreeMap::new(),
            policy_refs: BTreeMap::new(),
            last_errors: None,
            node_ips: Vec::new(),
            debounce: options.debounce,
            events,
            reported: BTreeSet::new(),
            node_name: options.node_name,
            host_pods: BTreeSet::new(),
            tasks,
        }
    }

    /// True once every kind has been listed (it stays true: re-lists keep the old contents until they
    /// complete).
    pub fn is_ready(&self) -> bool {
        let ready = |r: Option<Result<(), reflector::store::WriterDropped>>| matches!(r, Some(Ok(())));
        ready(self.namespaces.wait_until_ready().now_or_never())
            && ready(self.pods.wait_until_ready().now_or_never())
            && ready(self.policies.wait_until_ready().now_or_never())
            && ready(self.services.wait_until_ready().now_or_never())
            && ready(self.slices.wait_until_ready().now_or_never())
            && self
                .service_cidr_objects
                .wait_until_ready()
                .now_or_never()
                .is_some()
    }

    /// Waits until every kind is listed.
    pub async fn wait_until_ready(&self) {
        let (a, b, c, d, e, _absent_or_ready) = futures::join!(
            self.namespaces.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.policies.wait_until_ready(),
            self.services.wait_until_ready(),
            self.slices.wait_until_ready(),
            self.service_cidr_objects.wait_until_ready()
        );
        if a.is_err() || b.is_err() || c.is_err() || d.is_err() || e.is_err() {
            // A reflector task is gone (the source is being dropped): nothing will ever be ready.
            std::future::pending::<()>().await;
        }
    }

    /// Waits for the next change (the first call: for the initial lists), lets the burst settle for the
    /// debounce time, and returns the whole converted cluster. A snapshot identical to the last one is
    /// not returned. Cancel-safe: a change seen by a cancelled call is returned by the next one.
    pub async fn changed(&mut self) -> Loaded {
        self.wait_until_ready().await;
        loop {
            let current = *self.generation.borrow_and_update();
            if self.taken != Some(current) {
                tokio::time::sleep(self.debounce).await;
                if let Some(loaded) = self.take() {
                    return loaded;
                }
                continue;
            }
            if self.generation.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves once a store has changed since the last snapshot (at once if one has), after the
    /// debounce time: a burst (a re-list, a rollout) is taken in one piece. Cancel-safe.
    pub async fn wait_changed(&mut self) {
        loop {
            // Until every kind is listed there is nothing to take: wait for the next change (each
            // reflector's first list and the ServiceCIDR verdict are changes too).
            if self.is_ready() && self.taken != Some(*self.generation.borrow_and_update()) {
                tokio::time::sleep(self.debounce).await;
                return;
            }
            if self.generation.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The snapshot if anything changed since the last one (or it is the first), once all kinds are
    /// listed; `None` otherwise. For a polling loop (its period is the debounce).
    pub fn try_snapshot(&mut self) -> Option<Loaded> {
        if !self.is_ready() || self.taken == Some(*self.generation.borrow()) {
            return None;
        }
        self.take()
    }

    /// Node addresses, set in every cluster the source reports (the API does not say which node the
    /// agent runs on).
    pub fn set_node_ips(&mut self, ips: Vec<std::net::IpAddr>) {
        self.node_ips = ips.clone();
        self.cluster.node_ips = ips;
    }

    /// Whether node ports are frontends at every local address of the node, in every cluster the source
    /// reports.
    pub fn set_node_ports_any_local(&mut self, any_local: bool) {
        self.cluster.node_ports_any_local = any_local;
    }

    /// Service address ranges the agent is told (`--service-cidr`), in every cluster the source reports
    /// together with those of the cluster's ServiceCIDR objects.
    pub fn set_service_cidrs(&mut self, cidrs: Vec<ipnet::IpNet>) {
        self.service_cidr_flags = cidrs;
        self.cluster.service_cidrs = self.service_cidrs();
    }

    /// `--service-cidr` and every range of every ServiceCIDR object (the API server's
    /// `--service-cluster-ip-range` is the one named `kubernetes`), sorted, without duplicates. A range
    /// being deleted still counts: its addresses may still be in use.
    fn service_cidrs(&self) -> Vec<ipnet::IpNet> {
        let mut cidrs: BTreeSet<ipnet::IpNet> =
            self.service_cidr_flags.iter().map(ipnet::IpNet::trunc).collect();
        for object in self.service_cidr_objects.state() {
            for text in object
                .spec
                .as_ref()
                .and_then(|s| s.cidrs.as_ref())
                .into_iter()
                .flatten()
            {
                match text.parse::<ipnet::IpNet>() {
                    Ok(net) => {
                        cidrs.insert(net.trunc());
                    }
                    Err(e) => {
                        warn!(servicecidr = object.metadata.name.as_deref().unwrap_or(""), cidr = %text, error = %e, "ignoring an invalid ServiceCIDR range")
                    }
                }
            }
        }
        cidrs.into_iter().collect()
    }

    /// The converted cluster as of the last snapshot or [`KubeSource::poll_changes`].
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// What changed since the last call (the first: everything), once all kinds are listed; `None`
    /// until then and whenever nothing changed. [`KubeSource::cluster`] is the new state. Between
    /// re-lists only the objects the watches named are converted again, so a change costs what it
    /// touches, not the size of the cluster.
    pub fn poll_changes(&mut self) -> Option<(Changes, Vec<LoadError>)> {
        if !self.is_ready() || self.taken == Some(*self.generation.borrow()) {
            return None;
        }
        self.take_changes()
    }

    fn take(&mut self) -> Option<Loaded> {
        let (_, errors) = self.take_changes()?;
        Some(Loaded {
            cluster: self.cluster.clone(),
            errors,
            lab_objects: Vec::new(),
        })
    }

    /// Brings `cluster` up to date with the stores; `None` if nothing changed (objects or problems).
    fn take_changes(&mut self) -> Option<(Changes, Vec<LoadError>)> {
        self.taken = Some(*self.generation.borrow());
        let mut touched = std::mem::take(&mut *self.touched.lock().expect("touched lock"));
        if touched.relisted || self.last_errors.is_none() {
            // A (re-)list replaced a store: every object is looked at again, those now gone included.
            touched.namespaces.extend(
                self.namespaces
                    .state()
                    .iter()
                    .map(|ns| ns.metadata.name.clone().unwrap_or_default()),
            );
            touched.namespaces.extend(self.cluster.namespaces.keys().cloned());
            touched
                .pods
                .extend(self.pods.state().iter().map(|pod| key_of(&pod.metadata)));
            touched.pods.extend(self.cluster.pods.keys().cloned());
            touched
                .policies
                .extend(self.policies.state().iter().map(|np| key_of(&np.metadata)));
            touched.policies.extend(self.cluster.policies.keys().cloned());
            touched
                .services
                .extend(self.services.state().iter().map(|s| key_of(&s.metadata)));
            touched.services.extend(self.cluster.services.keys().cloned());
            touched
                .slices
                .extend(self.slices.state().iter().map(|s| key_of(&s.metadata)));
            touched
                .slices
                .extend(self.cluster.endpoint_slices.keys().cloned());
            self.problems.clear();
            self.policy_refs.clear();
        }
        let mut changes = self.patch(&touched);
        let cidrs = self.service_cidrs();
        if cidrs != self.cluster.service_cidrs || self.last_errors.is_none() {
            if cidrs.is_empty() {
                warn!(
                    "no Service ranges (no ServiceCIDR objects, no --service-cidr): a connection to a ClusterIP \
                     that is no known Service is judged as that address instead of being dropped as unknown-service"
                );
            } else {
                info!(?cidrs, "Service ranges");
            }
            self.cluster.service_cidrs = cidrs;
            changes.service_cidrs = true;
        }
        let mut errors: Vec<LoadError> = self.problems.values().flatten().cloned().collect();
        // Stores are hash maps: order the problems so equal clusters compare equal.
        errors.sort_by_cached_key(|e| (e.object.clone(), e.field.clone(), e.to_string()));
        // What the policies ask that ztrust does not enforce is reported with the problems (log, Event),
        // not counted with them.
        let limits = self.limits();
        if limits.is_empty() {
            let refs = std::mem::take(&mut self.policy_refs);
            self.report(&errors, &refs);
            self.policy_refs = refs;
        } else {
            let mut refs = self.policy_refs.clone();
            let mut all = errors.clone();
            for (e, reference) in limits {
                refs.entry(e.object.clone()).or_insert(reference);
                all.push(e);
            }
            all.sort_by_cached_key(|e| (e.object.clone(), e.field.clone(), e.to_string()));
            self.report(&all, &refs);
        }
        if changes.is_empty() && self.last_errors.as_ref() == Some(&errors) {
            debug!("re-list or no-op update: cluster unchanged");
            return None;
        }
        self.last_errors = Some(errors.clone());
        Some((changes, errors))
    }

    /// Converts again the objects in `touched` (gone from the store: deleted) into `cluster`, with their
    /// problems; the keys whose converted object changed.
    fn patch(&mut self, touched: &Touched) -> Changes {
        let mut changes = Changes::default();
        for name in &touched.namespaces {
            let converted = self
                .namespaces
                .get(&reflector::ObjectRef::new(name))
                .map(|ns| convert::convert_namespace(&ns));
            let (value, errors) = split(converted);
            set_problems(&mut self.problems, ("Namespace", name.clone()), errors);
            if replace(&mut self.cluster.namespaces, name.clone(), value) {
                changes.namespaces.insert(name.clone());
            }
        }
        for key in &touched.pods {
            let r = reflector::ObjectRef::new(&key.name).within(&key.namespace);
            let converted = self.pods.get(&r).and_then(|pod| convert_pod(&pod));
            let (value, errors) = split(converted);
            set_problems(&mut self.problems, ("Pod", key.to_string()), errors);
            // Scheduled here: a pending host-network pod is no node's yet (every agent would report it).
            let local_host = value
                .as_ref()
                .is_some_and(|p| p.host_network && p.node_name.is_some() && p.node_name == self.node_name);
            if local_host {
                self.host_pods.insert(key.clone());
            } else {
                self.host_pods.remove(key);
            }
            if replace(&mut self.cluster.pods, key.clone(), value) {
                changes.pods.insert(key.clone());
            }
        }
        for key in &touched.policies {
            let r = reflector::ObjectRef::new(&key.name).within(&key.namespace);
            let object = self.policies.get(&r);
            let converted = object.as_ref().map(|np| convert::convert_policy(np));
            self.policy_refs.retain(|_, reference| {
                reference.namespace.as_deref() != Some(key.namespace.as_str())
                    || reference.name.as_deref() != Some(key.name.as_str())
            });
            if let (Some(np), Some(first)) = (&object, converted.as_ref().and_then(|c| c.errors.first())) {
                self.policy_refs.insert(first.object.clone(), np.object_ref(&()));
            }
            let (value, errors) = split(converted);
            set_problems(&mut self.problems, ("NetworkPolicy", key.to_string()), errors);
            if replace(&mut self.cluster.policies, key.clone(), value) {
                changes.policies.insert(key.clone());
            }
        }
        for key in &touched.services {
            let r = reflector::ObjectRef::new(&key.name).within(&key.namespace);
            let (value, errors) = split(self.services.get(&r).map(|s| services::convert_service(&s)));
            set_problems(&mut self.problems, ("Service", key.to_string()), errors);
            if replace(&mut self.cluster.services, key.clone(), value) {
                changes.services.insert(key.clone());
            }
        }
        for key in &touched.slices {
            let r = reflector::ObjectRef::new(&key.name).within(&key.namespace);
            let (value, errors) = split(self.slices.get(&r).map(|s| services::convert_endpoint_slice(&s)));
            set_problems(&mut self.problems, ("EndpointSlice", key.to_string()), errors);
            if replace(&mut self.cluster.endpoint_slices, key.clone(), value) {
                changes.endpoint_slices.insert(key.clone());
            }
        }
        changes
    }

    /// Policies that select a host-network pod of this node: valid, but not enforced for that pod (it has
    /// no interface of its own for the datapath to hook), each with the policy's reference (for its Event).
    /// Costs the host-network pods of this node and the policies of their namespaces, not the cluster.
    fn limits(&self) -> Vec<(LoadError, ObjectReference)> {
        let Some(node) = &self.node_name else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for key in &self.host_pods {
            let Some(pod) = self.cluster.pods.get(key) else {
                continue;
            };
            let from = model::ObjectRef::new(key.namespace.clone(), String::new());
            for (pkey, policy) in self
                .cluster
                .policies
                .range(from..)
                .take_while(|(k, _)| k.namespace == key.namespace)
            {
                let isolates = policy.isolates_ingress || policy.isolates_egress;
                if !isolates || !crate::policy::selector::matches(&policy.pod_selector, &pod.labels) {
                    continue;
                }
                let r = reflector::ObjectRef::new(&pkey.name).within(&pkey.namespace);
                let Some(np) = self.policies.get(&r) else { continue };
                let error = LoadError {
                    origin: Origin::Api,
                    object: convert::object_name("NetworkPolicy", &np.metadata, true),
                    field: "spec.podSelector".to_owned(),
                    problem: Problem::SelectsHostNetworkPod {
                        pod: key.clone(),
                        node: node.clone(),
                    },
                    effect: Effect::None,
                };
                out.push((error, np.object_ref(&())));
            }
        }
        out
    }

    /// Logs problems not logged before and sends one Event per NetworkPolicy whose set of problems is
    /// new. A problem that goes away and comes back is reported again.
    fn report(&mut self, errors: &[LoadError], policy_refs: &BTreeMap<String, ObjectReference>) {
        let mut by_object: BTreeMap<&str, Vec<&LoadError>> = BTreeMap::new();
        for e in errors {
            by_object.entry(e.object.as_str()).or_default().push(e);
        }
        let mut now = BTreeSet::new();
        for (object, problems) in by_object {
            let key = (
                object.to_owned(),
                problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
            if !self.reported.contains(&key) {
                for p in &problems {
                    warn!("{p}");
                }
                if let (Some(tx), Some(reference)) = (&self.events, policy_refs.get(object)) {
                    // The Event regards the object: its note is the field paths and problems.
                    let note = problems
                        .iter()
                        .map(|p| format!("{}: {}{}", p.field, p.problem, p.effect))
                        .collect::<Vec<_>>()
                        .join("\n");
                    let _ = tx.send((reference.clone(), note));
                }
            }
            now.insert(key);
        }
        self.reported = now;
    }
}

impl ClusterSource for KubeSource {
    fn poll_changes(&mut self) -> Option<(Changes, Vec<LoadError>)> {
        KubeSource::poll_changes(self)
    }

    fn changed(&mut self) -> impl std::future::Future<Output = ()> + Send {
        self.wait_changed()
    }

    fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn set_host_local_addrs(&mut self, addrs: BTreeSet<std::net::IpAddr>) -> bool {
        let changed = self.cluster.host_local_addrs != addrs;
        self.cluster.host_local_addrs = addrs;
        changed
    }
}

/// Keys of the objects the watches changed since the last snapshot; `relisted` when a (re-)list
/// completed (a store was replaced: everything is compared).
#[derive(Debug, Default)]
struct Touched {
    relisted: bool,
    namespaces: BTreeSet<String>,
    pods: BTreeSet<model::ObjectRef>,
    policies: BTreeSet<model::ObjectRef>,
    services: BTreeSet<model::ObjectRef>,
    slices: BTreeSet<model::ObjectRef>,
}

fn key_of(meta: &ObjectMeta) -> model::ObjectRef {
    model::ObjectRef::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// A pod as the model sees it; `None` for a pod that has run to completion: it has given its addresses
/// back to the node's IPAM, which may already have handed them to a new pod, so it must not claim them.
/// <https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-phase>
fn convert_pod(pod: &Pod) -> Option<Converted<model::Pod>> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    (!matches!(phase, Some("Succeeded" | "Failed"))).then(|| convert::convert_pod(pod))
}

fn split<T>(c: Option<Converted<T>>) -> (Option<T>, Vec<LoadError>) {
    match c {
        Some(c) => (
            c.value,
            c.errors.into_iter().map(|e| e.at(&Origin::Api)).collect(),
        ),
        None => (None, Vec::new()),
    }
}

fn set_problems(
    problems: &mut BTreeMap<(&'static str, String), Vec<LoadError>>,
    key: (&'static str, String),
    errors: Vec<LoadError>,
) {
    if errors.is_empty() {
        problems.remove(&key);
    } else {
        problems.insert(key, errors);
    }
}

/// Sets or removes `map[key]`; whether that changed anything.
fn replace<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) -> bool {
    match value {
        Some(v) => {
            if map.get(&key) == Some(&v) {
                return false;
            }
            map.insert(key, v);
            true
        }
        None => map.remove(&key).is_some(),
    }
}

mod events;
mod reflect;

use self::events::publish_events;
use self::reflect::*;

#[cfg(test)]
mod tests;
