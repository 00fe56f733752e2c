//! `ztrust-agent run`: source → engine → datapath sync, and the flow pipeline.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::unix::AsyncFd;
use tracing::{error, info, info_span, warn};
use ztrust_common::{Config, FlowEvent, ep_flags};

use crate::datapath::loader::{Datapath, Released};
use crate::datapath::sync::{KernelMaps, Syncer};
use crate::flows::{AllowedBy, EndpointView, Flow, PodView, View};
use crate::model::{Cluster, ObjectRef};
use crate::netif::{self, HostRoutes};
use crate::policy::{Changes, Delta, Desired, Engine};
use crate::source::LoadError;
use crate::source::dir::DirWatch;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown source `{0}`: use `kube` (the Kubernetes API) or `dir:<path>` (a directory of YAML)")]
    UnknownSource(String),
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(String),
    #[error(transparent)]
    Datapath(#[from] crate::datapath::loader::Error),
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("listing this network namespace's interfaces: {0}")]
    Interfaces(std::io::Error),
    #[error(
        "pinned links for {} that this network namespace cannot see ({}): is hostNetwork set? (the agent must \
         run in the network namespace of the pods' host-side interfaces). Enforcement is left as it is; \
         `ztrust-agent run --cleanup --pin-path {}` removes it", plural(.names.len(), "interface"), list(.names), .pin_dir.display()
    )]
    UnseenLinks { names: Vec<String>, pin_dir: PathBuf },
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The first names, then how many more.
fn list(names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", and {} more", names.len() - SHOWN));
    }
    s
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Dir(PathBuf),
    /// The Kubernetes API: in-cluster (service account) or from a kubeconfig.
    Kube {
        kubeconfig: Option<PathBuf>,
    },
}

impl std::str::FromStr for Source {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once(':') {
            Some(("dir", path)) if !path.is_empty() => Ok(Source::Dir(PathBuf::from(path))),
            None if s == "kube" => Ok(Source::Kube { kubeconfig: None }),
            _ => Err(Error::UnknownSource(s.to_owned())),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub source: Source,
    pub pin_dir: PathBuf,
    /// Interfaces with these name prefixes get the programs as soon as they appear, before their pod
    /// is known (they drop everything until then: fail closed).
    pub interface_prefixes: Vec<String>,
    pub node_name: String,
    pub node_ips: Vec<IpAddr>,
    /// Node ports are Service frontends at every local address of the node (`--nodeport-addresses all`),
    /// not only at `node_ips`.
    pub node_ports_any_local: bool,
    /// How long a backend a frontend lost still counts as one of its backends (`--service-grace`).
    pub service_grace: Duration,
    /// The cluster's Service address ranges (`--service-cidr`): a connection to an address in them that
    /// is no known Service frontend is dropped as `unknown-service`.
    pub service_cidrs: Vec<ipnet::IpNet>,
    pub audit: bool,
    pub log_allowed: bool,
    pub event_interval: Duration,
    /// Events per interface and second (`--event-budget`; 0: no limit).
    pub event_budget: u32,
    /// Pods may send encapsulated packets (`--pod-tunnels allow`).
    pub pod_tunnels: bool,
    pub flow_log: Option<PathBuf>,
    pub poll: Duration,
    /// Kernel map sizes.
    pub capacities: crate::datapath::loader::Capacities,
    /// See [`Datapath::load_with_mark`].
    pub peer_mark: u32,
    /// Flows kept in memory for the flow API (`--flow-buffer`).
    pub flow_buffer: usize,
    /// Flows queued per API client before it starts losing them (`--client-queue`).
    pub client_queue: usize,
    /// The `pod` label on per-flow metrics (`--metrics-pod-label`).
    pub metrics_pod_label: bool,
    /// Flow API listeners, `/metrics`, detector.
    pub observer: crate::observer::tasks::ObserverOptions,
}

/// How long an interface may be held closed with no pod before the agent says so.
const HELD_CLOSED_WARNING: Duration = Duration::from_secs(10);

/// Where the cluster comes from. Each keeps the current cluster; a poll says which objects changed.
enum Watched {
    /// Files give whole snapshots: the changes are what differs from the previous one.
    Dir {
        source: DirWatch,
        cluster: Cluster,
        node_ips: Vec<std::net::IpAddr>,
        node_ports_any_local: bool,
        service_cidrs: Vec<ipnet::IpNet>,
        host_local_addrs: BTreeSet<std::net::IpAddr>,
    },
    /// The API's watches name the objects that change.
    Kube(crate::source::kube::KubeSource),
}

impl Watched {
    /// What changed since the last call and the source's problems; `None` if nothing did.
    fn poll(&mut self) -> Option<(Changes, Vec<LoadError>)> {
        match self {
            Watched::Dir {
                source,
                cluster,
                node_ips,
                node_ports_any_local,
                service_cidrs,
                host_local_addrs,
            } => {
                let loaded = source.poll()?;
                let mut next = loaded.cluster;
                next.node_ips = node_ips.clone();
                next.node_ports_any_local = *node_ports_any_local;
                next.service_cidrs = service_cidrs.clone();
                next.host_local_addrs = host_local_addrs.clone();
                let changes = Changes::between(cluster, &next);
                *cluster = next;
                Some((changes, loaded.errors))
            }
            Watched::Kube(k) => k.poll_changes(),
        }
    }

    /// The node's other local addresses, in the current cluster and every later one. Returns whether
    /// they changed.
    fn set_host_local_addrs(&mut self, addrs: BTreeSet<std::net::IpAddr>) -> bool {
        if self.cluster().host_local_addrs == addrs {
            return false;
        }
        match self {
            Watched::Dir {
                cluster,
                host_local_addrs,
                ..
            } => {
                cluster.host_local_addrs = addrs.clone();
                *host_local_addrs = addrs;
            }
            Watched::Kube(k) => k.set_host_local_addrs(addrs),
        }
        true
    }

    /// Resolves when the source has news (the API's watches changed a store), after the debounce
    /// time, so a change is compiled without waiting for the next poll tick. Files are polled only.
    async fn changed(&mut self) {
        match self {
            Watched::Dir { .. } => std::future::pending().await,
            Watched::Kube(k) => k.wait_changed().await,
        }
    }

    fn cluster(&self) -> &Cluster {
        match self {
            Watched::Dir { cluster, .. } => cluster,
            Watched::Kube(k) => k.cluster(),
        }
    }
}

/// Keeps the view's address → pod index current for the pods in `changed` (`addrs` remembers the
/// addresses each pod had, to take them out when it changes or goes): a change costs what it touches.
fn update_view_pods(
    view: &mut View,
    cluster: &Cluster,
    changed: &BTreeSet<ObjectRef>,
    addrs: &mut HashMap<ObjectRef, Vec<std::net::IpAddr>>,
) {
    for r in changed {
        for ip in addrs.remove(r).unwrap_or_default() {
            if view.pods_by_ip.get(&ip).is_some_and(|p| &p.pod == r) {
                view.pods_by_ip.remove(&ip);
            }
        }
        if let Some(pod) = cluster.pods.get(r) {
            for ip in &pod.ips {
                view.pods_by_ip.insert(
                    *ip,
                    PodView {
                        pod: r.clone(),
                        labels: pod.labels.clone(),
                    },
                );
            }
            addrs.insert(r.clone(), pod.ips.clone());
        }
    }
}

/// The view's Service frontends, each with its Service and backend pods (by address: `pods_by_ip` must
/// be current).
fn update_view_services(view: &mut View, cluster: &Cluster) {
    let mut services: HashMap<(std::net::IpAddr, u16, u8), crate::flows::ServiceRef> = HashMap::new();
    let slices = crate::policy::services::Slices::new(cluster);
    for (svc, port, f) in crate::policy::services::each_frontend(cluster) {
        let backends = slices
            .backends(svc, port)
            .into_iter()
            .filter(|(ip, _)| ip.is_ipv4() == f.addr.is_ipv4())
            .map(|(ip, _)| {
                view.pods_by_ip
                    .get(&ip)
                    .map_or_else(|| ip.to_string(), |p| p.pod.to_string())
            });
        // A frontend two Services claim names the first and the backends of both.
        let entry = services
            .entry((f.addr, f.port, f.protocol.number()))
            .or_insert_with(|| crate::flows::ServiceRef {
                name: svc.object_ref().to_string(),
                backends: Vec::new(),
            });
        entry.backends.extend(backends);
        entry.backends.sort();
        entry.backends.dedup();
    }
    view.services = services;
}

/// The view's endpoints (this node's bound pods) and, when `rules` is set, its rule names, from the
/// desired state.
fn update_view_policy(view: &mut View, desired: &Desired, bindings: &BTreeMap<ObjectRef, u32>, rules: bool) {
    view.endpoints.clear();
    for (pod, ifindex) in bindings {
        if let Some(ep) = desired.endpoints.get(pod) {
            view.endpoints.insert(
                *ifindex,
                EndpointView {
                    pod: pod.clone(),
                    ingress_policies: ep.ingress_policies.iter().map(ToString::to_string).collect(),
                    egress_policies: ep.egress_policies.iter().map(ToString::to_string).collect(),
                },
            );
        }
    }
    if rules {
        view.rules = desired
            .rules
            .iter()
            .map(|(id, rule)| {
                let by = AllowedBy {
                    policy: rule.policy.to_string(),
                    direction: crate::flows::direction_name(rule.direction).into(),
                    rule: rule.index,
                };
                (*id, by)
            })
            .collect();
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
        metrics: &crate::metrics::Metrics,
        hub: &crate::observer::Hub,
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

fn matches_prefix(name: &str, prefixes: &[String]) -> bool {
    prefixes
        .iter()
        .any(|p| !p.is_empty() && name.starts_with(p.as_str()))
}

/// Every enriched flow passes here: metrics, the observer hub (flow API, detector), the flow log (JSON
/// lines) and, for drops, the log (rate-limited: see [`crate::flows::DropLog`]). Called from the task that reads the
/// kernel ring buffer, once per batch of events (what one wake-up found, at most [`MAX_BATCH`]): the
/// view is locked once per batch, the metric families and the hub once per batch, the clocks read once
/// per batch. Nothing here waits (the hub never blocks on a client).
struct FlowSink {
    file: Option<std::fs::File>,
    seen: u64,
    hub: Arc<crate::observer::Hub>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// [`FlowSink`] with what it needs per batch, reused from batch to batch.
struct Batches {
    sink: FlowSink,
    /// The flow log, written per batch.
    file: Option<std::io::BufWriter<std::fs::File>>,
    log: crate::flows::DropLog,
    flows: Vec<(Flow, SystemTime)>,
    published: Vec<Arc<crate::observer::hub::Observed>>,
}

/// Events taken from the ring buffer per batch. Enough to spread the per-batch costs thin, few enough
/// that a batch's flows stay in the CPU cache from enrichment to publishing (1,024 was slower), and
/// well below the per-client queue (`--client-queue`, default 4,096): a subscriber drains its queue
/// between batches, so a batch must fit in it with room to spare.
const MAX_BATCH: usize = 256;

impl Batches {
    fn new(mut sink: FlowSink) -> Self {
        let file = sink.file.take().map(std::io::BufWriter::new);
        Self {
            sink,
            file,
            log: crate::flows::DropLog::new(),
            flows: Vec::new(),
            published: Vec::new(),
        }
    }

    fn enrich(&mut self, view: &View, events: &[FlowEvent]) {
        let clock = crate::flows::Clock::now();
        self.flows.clear();
        self.flows.extend(events.iter().map(|ev| {
            let time = clock.system_time(ev.ts_ns);
            (view.enrich_at(ev, time), time)
        }));
    }

    /// Records the batch [`Self::enrich`] made.
    fn record(&mut self) {
        self.sink.seen += self.flows.len() as u64;
        self.sink.metrics.observe_flows(self.flows.iter().map(|(f, _)| f));
        self.log.roll(Instant::now());
        for (flow, _) in &self.flows {
            if flow.is_drop() && self.log.admit() {
                info!(target: "ztrust::flows", "{}", crate::flows::render_line(flow));
            }
            if let Some(f) = &mut self.file
                && serde_json::to_writer(&mut *f, flow).is_ok()
            {
                let _ = f.write_all(b"\n");
            }
        }
        if let Some(f) = &mut self.file {
            let _ = f.flush();
        }
        self.sink
            .hub
            .publish_batch(self.flows.drain(..), &mut self.published);
    }
}

/// The warnings of `current` that were not in force at the last call; `warned` becomes `current`.
fn fresh_warnings<'a>(warned: &mut BTreeSet<String>, current: &'a [String]) -> Vec<&'a String> {
    let fresh = current.iter().filter(|w| !warned.contains(*w)).collect();
    *warned = current.iter().cloned().collect();
    fresh
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let agent_started = Instant::now();
    // Before anything changes: the links an earlier agent pinned must be on interfaces this network
    // namespace has. An agent started elsewhere (hostNetwork lost, a debug run in a container) sees none
    // of them, and would otherwise take them for gone.
    let ifaces = netif::interfaces().map_err(Error::Interfaces)?;
    let pinned = crate::datapath::loader::survey_pins(&opts.pin_dir, &ifaces);
    let unseen = crate::datapath::pins::unseen(&pinned);
    if !unseen.is_empty() {
        return Err(Error::UnseenLinks {
            names: unseen,
            pin_dir: opts.pin_dir.clone(),
        }
        .into());
    }
    let mut dp = Datapath::load_with_mark(&opts.pin_dir, opts.capacities, opts.peer_mark)?;
    crate::datapath::loader::settle_pins(&opts.pin_dir, &pinned);
    let config = Config {
        event_interval_ns: opts.event_interval.as_nanos() as u64,
        flags: if opts.audit { ep_flags::AUDIT } else { 0 }
            | if opts.pod_tunnels {
                ep_flags::ALLOW_ENCAPSULATION
            } else {
                0
            },
        log_allowed: u32::from(opts.log_allowed),
        event_budget: opts.event_budget,
        node_ports: if opts.node_ports_any_local {
            ztrust_common::node_ports::ANY_LOCAL
        } else {
            ztrust_common::node_ports::LISTED
        },
    };
    dp.maps.config.set(0, config, 0)?;
    // The node's local routes, for node ports on every local address (kept empty otherwise). Until the
    // first mirror, a node port at a local address is denied as `unknown-service`, never misjudged.
    let mut node_local = crate::datapath::node_local::NodeLocal::adopt(&dp.maps.node_local);
    // Consecutive failed reads of the node's local routes.
    let mut node_local_failed = 0u32;
    let mut syncer = Syncer::adopt(&dp.maps);
    // Audit mode is a property of every endpoint entry the sync writes.
    syncer.global_flags = config.flags;
    syncer.capacities = dp.capacities();

    let view = Arc::new(RwLock::new(View {
        node: opts.node_name.clone(),
        ..Default::default()
    }));
    let ring = dp.events.take().expect("events map taken once");
    // Observability: flow API, /metrics, detector. `metrics` is also where the reconcile loop reports
    // (`observe_compile`, `observe_sync`, `set_identities`, `set_map_fill`).
    let metrics = Arc::new(crate::metrics::Metrics::new(crate::metrics::MetricsOptions {
        pod_label: opts.metrics_pod_label,
    }));
    let hub = Arc::new(crate::observer::Hub::new(crate::observer::HubOptions {
        node: opts.node_name.clone(),
        flow_buffer: opts.flow_buffer,
        client_queue: opts.client_queue,
        ..Default::default()
    }));
    let _observer = crate::observer::tasks::spawn(
        &opts.observer,
        hub.clone(),
        metrics.clone(),
        view.clone(),
        opts.pin_dir.clone(),
    )
    .await;
    let sink = FlowSink {
        file: match &opts.flow_log {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| Error::Io {
                        path: p.clone(),
                        source,
                    })?,
            ),
            None => None,
        },
        seen: 0,
        hub: hub.clone(),
        metrics: metrics.clone(),
    };
    let flows_task = tokio::spawn(read_events(ring, view.clone(), sink));

    let mut source = match &opts.source {
        Source::Dir(root) => Watched::Dir {
            source: DirWatch::new(root.clone()),
            cluster: Cluster {
                node_ips: opts.node_ips.clone(),
                node_ports_any_local: opts.node_ports_any_local,
                service_cidrs: opts.service_cidrs.clone(),
                ..Cluster::default()
            },
            node_ips: opts.node_ips.clone(),
            node_ports_any_local: opts.node_ports_any_local,
            service_cidrs: opts.service_cidrs.clone(),
            host_local_addrs: BTreeSet::new(),
        },
        Source::Kube { kubeconfig } => {
            let client = crate::source::kube::client(kubeconfig.as_deref())
                .await
                .map_err(|e| Error::Kube(e.to_string()))?;
            let mut kube = crate::source::kube::KubeSource::start(client, Some(opts.node_name.clone()));
            kube.set_node_ips(opts.node_ips.clone());
            kube.set_node_ports_any_local(opts.node_ports_any_local);
            kube.set_service_cidrs(opts.service_cidrs.clone());
            Watched::Kube(kube)
        }
    };
    // Allow sets are compiled for this node's pods only; the rest of the cluster are peers.
    let mut engine = Engine::for_node(opts.node_name.clone());
    engine.set_service_grace(opts.service_grace);
    // What changed in the desired state since the last successful sync.
    let mut pending = Delta::full();
    let mut bindings: BTreeMap<ObjectRef, u32> = BTreeMap::new();
    let mut unbound_reported: BTreeSet<ObjectRef> = BTreeSet::new();
    // Interfaces held closed by --interface-prefix that no pod's host route leads to: since when, and
    // whether that was said.
    let mut held_closed: HashMap<String, (Instant, bool)> = HashMap::new();
    let mut not_enforced = NotEnforced::default();
    let mut warned: BTreeSet<String> = BTreeSet::new();
    // The flow view: pod addresses as of the last change, rule names to rebuild when policies changed.
    let mut view_addrs: HashMap<ObjectRef, Vec<std::net::IpAddr>> = HashMap::new();
    let mut view_rules_stale = true;
    let mut dirty = true;
    // The links an earlier agent pinned keep enforcing until this agent attaches to their interfaces,
    // which adopts them.
    let adoptable: BTreeSet<&str> = pinned
        .iter()
        .filter(|p| matches!(p.state, crate::datapath::pins::State::Here { .. }))
        .map(|p| p.ifname.as_str())
        .collect();
    info!(source = ?opts.source, pinned = adoptable.len(), "agent running");

    let mut ticker = tokio::time::interval(opts.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = std::pin::pin!(shutdown_signal());
    let mut in_sync = false;
    // Until the source has delivered a whole snapshot, the pinned state of an earlier agent enforces:
    // syncing an empty cluster would tear it down.
    let mut have_snapshot = false;
    let mut last_sync_error: Option<String> = None;
    let mut links = match netif::LinkEvents::open() {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(error = %e, poll_ms = opts.poll.as_millis() as u64, "no interface announcements (rtnetlink); new pod interfaces are found by polling only");
            None
        }
    };
    loop {
        let mut links_failed = None;
        tokio::select! {
            _ = ticker.tick() => {}
            _ = source.changed() => {}
            r = async { links.as_mut().expect("checked").next().await }, if links.is_some() => {
                links_failed = r.err();
                // A CNI's set-up is a handful of announcements (the link, its moves, its routes): take
                // them together. Also bounds the loop to ~100 wake-ups a second under announcement
                // churn (a pod flapping its link, a routing daemon).
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            _ = &mut shutdown => {
                info!("shutting down; pinned programs and maps keep enforcing");
                break;
            }
        }
        if let Some(e) = links_failed {
            warn!(error = %e, "interface announcements (rtnetlink) failed; polling only from now on");
            links = None;
        }
        let span = info_span!("reconcile");
        let _enter = span.enter();

        // The node's local routing table (a route announcement wakes the loop, the tick catches what one
        // would hide): its addresses are the node's (traffic from them to a pod is the node's), and, with
        // node ports on every local address, it is mirrored for the kernel.
        let mut host_addrs_changed = false;
        match crate::datapath::node_local::local_routes() {
            Ok(routes) => {
                node_local_failed = 0;
                // Not the Service addresses (IPVS binds every ClusterIP to the node's `kube-ipvs0`):
                // they are frontends, not the node's traffic.
                let mut host = crate::datapath::node_local::host_addresses(&routes);
                let service_cidrs = &source.cluster().service_cidrs;
                host.retain(|ip| !service_cidrs.iter().any(|n| n.contains(ip)));
                host_addrs_changed = source.set_host_local_addrs(host);
                let mirrored = if opts.node_ports_any_local {
                    routes
                } else {
                    BTreeMap::new()
                };
                match node_local.sync(&mut dp.maps.node_local, &mirrored) {
                    Ok(true) => info!(
                        local_routes = node_local.local(),
                        "node ports on every local address: the node's local routes mirrored"
                    ),
                    Ok(false) => {}
                    Err(e) => {
                        error!(error = %e, "cannot write the node's local routes; node ports at the missing addresses are denied (unknown-service)")
                    }
                }
            }
            Err(e) => {
                node_local_failed += 1;
                // A dump a route change interrupted is read again at the next wake-up; failing three
                // times in a row, what the mirror holds may be stale (an address gone): emptied, every
                // node port at an address other than a frontend's then misses and the FIB decides (not
                // forwarded: denied).
                if node_local_failed == 3 {
                    error!(error = %e, "cannot read the node's local routes (rtnetlink): the node's addresses stay as last read; node ports at any local address are denied (unknown-service) until they can be read");
                    if let Err(e) = node_local.sync(&mut dp.maps.node_local, &BTreeMap::new()) {
                        error!(error = %e, "cannot empty the mirror of the node's local routes");
                    }
                } else if node_local_failed < 3 {
                    warn!(error = %e, "reading the node's local routes (rtnetlink) failed; reading again");
                }
            }
        }

        if let Some((changes, errors)) = source.poll() {
            have_snapshot = true;
            metrics.set_source_errors(errors.len() as u64);
            let started = Instant::now();
            let cluster = source.cluster();
            engine.update(cluster, &changes);
            pending.merge(engine.take_delta());
            update_view_pods(
                &mut view.write().expect("view lock"),
                cluster,
                &changes.pods,
                &mut view_addrs,
            );
            if !(changes.services.is_empty() && changes.endpoint_slices.is_empty() && changes.pods.is_empty())
            {
                update_view_services(&mut view.write().expect("view lock"), cluster);
            }
            view_rules_stale |= !changes.policies.is_empty();
            let desired = engine.desired();
            let audit = crate::datapath::sync::audit_namespaces(cluster);
            if audit != syncer.audit_namespaces {
                info!(namespaces = ?audit, "namespaces in audit mode (annotation {})", crate::datapath::sync::AUDIT_ANNOTATION);
                syncer.audit_namespaces = audit;
                pending.merge(Delta::full());
            }
            // Said once while they hold (a change elsewhere does not repeat them); again if they recur.
            for w in fresh_warnings(&mut warned, &desired.warnings) {
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
            metrics.observe_compile(started.elapsed().as_secs_f64());
            metrics.set_identities(desired.identities.len() as u64);
            dirty = true;
            not_enforced.report(cluster, &changes.pods, &opts.node_name, &metrics, &hub);
        }
        if host_addrs_changed && have_snapshot {
            let cluster = source.cluster();
            info!(addresses = ?cluster.host_local_addrs, "the node's local addresses changed: traffic from them is the node's");
            engine.update(cluster, &Changes::default());
            pending.merge(engine.take_delta());
            dirty = true;
        }
        // Backends Services lost whose grace is over (the tick wakes the loop at most a poll late).
        if have_snapshot && engine.next_service_expiry().is_some_and(|t| t <= Instant::now()) {
            engine.expire_services(source.cluster(), Instant::now());
            let delta = engine.take_delta();
            if delta.services {
                info!("Service backends past their grace dropped from their frontends");
                dirty = true;
            }
            pending.merge(delta);
        }

        // Interfaces: attach to new ones (fail closed), forget vanished ones.
        let ifaces = match netif::interfaces() {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "listing interfaces");
                continue;
            }
        };
        // Attached interfaces not listed under the name and index they had: deleted, renamed or moved to
        // another namespace. Only the kernel can tell; their pins go only if it detached the links (see
        // `Datapath::release`). Before attaching: a recreated or renamed interface is attached this tick.
        let gone: Vec<String> = dp
            .attached()
            .filter(|(n, i)| ifaces.get(*n) != Some(i))
            .map(|(n, _)| n.to_owned())
            .collect();
        for name in gone {
            match dp.release(&name, &ifaces) {
                Released::Gone => info!(ifname = %name, "interface gone"),
                Released::Renamed(now) => {
                    info!(ifname = %name, %now, "interface renamed: its links are pinned under the new name")
                }
                Released::Kept(kept) => warn!(
                    ifname = %name,
                    kept = ?kept.iter().map(|(_, p)| p.display().to_string()).collect::<Vec<_>>(),
                    state = ?kept.first().map(|(s, _)| s),
                    "interface no longer in this network namespace under that name, but its links are still attached \
                     (moved to another namespace, or renamed to a name whose pins are taken): they keep enforcing \
                     there, kept aside; `run --cleanup` removes them"
                ),
            }
        }
        let routes = HostRoutes::read().unwrap_or_default();
        let desired = engine.desired();
        let cluster = source.cluster();
        let mut new_bindings = BTreeMap::new();
        for (pod, ep) in &desired.endpoints {
            // Pods of other nodes are peers here, not endpoints.
            let elsewhere = cluster
                .pods
                .get(pod)
                .and_then(|p| p.node_name.as_deref())
                .is_some_and(|n| n != opts.node_name);
            if elsewhere {
                continue;
            }
            let iface = ep.ips.iter().find_map(|ip| routes.interface_of(ip));
            match iface.and_then(|n| ifaces.get(n).map(|i| (n, *i))) {
                Some((name, index)) => {
                    new_bindings.insert(pod.clone(), index);
                    unbound_reported.remove(pod);
                    if !dp.is_attached(name)
                        && let Err(e) = dp.attach(name, index)
                    {
                        error!(%pod, error = %e, "cannot attach; pod NOT enforced");
                        new_bindings.remove(pod);
                    }
                }
                None => {
                    if unbound_reported.insert(pod.clone()) {
                        warn!(%pod, ips = ?ep.ips, "no host route to the pod on this node; not enforced here");
                    }
                }
            }
        }
        for (name, index) in &ifaces {
            if matches_prefix(name, &opts.interface_prefixes)
                && !dp.is_attached(name)
                && let Err(e) = dp.attach(name, *index)
            {
                error!(ifname = %name, error = %e, "cannot attach to new interface");
            }
        }
        let bound: BTreeSet<u32> = new_bindings.values().copied().collect();
        held_closed.retain(|name, _| ifaces.contains_key(name));
        for (name, index) in &ifaces {
            if !(matches_prefix(name, &opts.interface_prefixes) && dp.is_attached(name))
                || bound.contains(index)
            {
                held_closed.remove(name);
                continue;
            }
            let (since, said) = held_closed.entry(name.clone()).or_insert((Instant::now(), false));
            if !*said && since.elapsed() > HELD_CLOSED_WARNING {
                *said = true;
                warn!(
                    ifname = %name,
                    "interface held closed for {}s: it matches --interface-prefix, but no pod of this node has a host \
                     route (/32, /128) through it. Either its pod is not in the API yet, or it is no pod's (another \
                     container runtime's veth), or the CNI bridges pods (flannel, the bridge plugin: not supported, \
                     every pod stays closed)",
                    HELD_CLOSED_WARNING.as_secs()
                );
            }
        }
        if new_bindings != bindings {
            bindings = new_bindings;
            dirty = true;
        }

        if dirty && have_snapshot {
            let started = Instant::now();
            match syncer.sync_delta(&mut KernelMaps(&mut dp.maps), desired, &bindings, &pending) {
                Ok(stats) => {
                    pending = Delta::default();
                    last_sync_error = None;
                    metrics.observe_sync(started.elapsed().as_secs_f64(), stats.total() as u64);
                    let caps = syncer.capacities;
                    metrics.set_map_fill(
                        "ZT_POLICY",
                        syncer.policy_entries() as u64,
                        u64::from(caps.policy),
                    );
                    metrics.set_map_fill(
                        "ZT_IPCACHE",
                        syncer.ipcache_entries() as u64,
                        u64::from(caps.ipcache),
                    );
                    metrics.set_map_fill(
                        "ZT_ENDPOINTS",
                        syncer.endpoint_count() as u64,
                        u64::from(caps.endpoints),
                    );
                    dirty = false;
                    if !in_sync {
                        // Until here an earlier agent's pinned state enforced; from here, this agent's.
                        in_sync = true;
                        // This agent's programs are attached and find single-port entries in their own
                        // map: the copies an earlier agent kept in the trie go.
                        match dp.maps.policy.drop_legacy_exact() {
                            Ok(0) => {}
                            Ok(n) => info!(
                                entries = n,
                                "single-port allow entries of an earlier agent removed from the policy trie"
                            ),
                            Err(e) => {
                                warn!(error = %e, "removing an earlier agent's single-port entries from the policy trie")
                            }
                        }
                        metrics.set_ready();
                        info!(
                            writes = stats.total(),
                            since_start_ms = agent_started.elapsed().as_secs_f64() * 1000.0,
                            "in sync with the source"
                        );
                    } else if stats.total() > 0 {
                        info!(
                            writes = stats.total(),
                            sync_ms = started.elapsed().as_secs_f64() * 1000.0,
                            "synced"
                        );
                    }
                }
                Err(e) => {
                    // Retried every tick; said once per distinct problem.
                    let msg = e.to_string();
                    if last_sync_error.as_deref() != Some(msg.as_str()) {
                        metrics.sync_refused();
                        error!(error = %msg, "datapath update refused; the last applied state keeps enforcing");
                        last_sync_error = Some(msg);
                    }
                }
            }
            update_view_policy(
                &mut view.write().expect("view lock"),
                desired,
                &bindings,
                view_rules_stale,
            );
            view_rules_stale = false;
        }
    }
    flows_task.abort();
    Ok(())
}

async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn read_events(ring: aya::maps::RingBuf<aya::maps::MapData>, view: Arc<RwLock<View>>, sink: FlowSink) {
    // SAFETY: the ring buffer owns its map descriptor, which stays open for as long as the AsyncFd
    // (which owns the ring buffer) lives.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            error!(error = %e, "cannot poll the event ring buffer; no flows will be reported");
            return;
        }
    };
    let mut sink = Batches::new(sink);
    let mut batch: Vec<FlowEvent> = Vec::with_capacity(MAX_BATCH);
    // Sums up suppressed drop lines even when no new drop comes.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut guard = tokio::select! {
            g = fd.readable_mut() => match g {
                Ok(g) => g,
                Err(e) => {
                    error!(error = %e, "event ring buffer");
                    return;
                }
            },
            _ = tick.tick() => {
                sink.log.roll(Instant::now());
                continue;
            }
        };
        let ring = guard.get_inner_mut();
        batch.clear();
        while batch.len() < MAX_BATCH
            && let Some(item) = ring.next()
        {
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: the kernel writes whole FlowEvent records (see ztrust-ebpf emit()).
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
            }
        }
        // A full batch may have left events behind: stay ready, and come back after the others
        // (the readiness await yields to other tasks once this task's budget is spent).
        if batch.len() < MAX_BATCH {
            guard.clear_ready();
        }
        drop(guard);
        if batch.is_empty() {
            continue;
        }
        sink.enrich(&view.read().expect("view lock"), &batch);
        sink.record();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Pod;

    #[test]
    fn a_warning_is_said_once_while_it_holds_and_again_when_it_recurs() {
        let mut warned = BTreeSet::new();
        let (a, b) = (
            "policy x/p: ingress[0].from[0].ipBlock.cidr invalid".to_owned(),
            "port name web unknown".to_owned(),
        );
        assert_eq!(fresh_warnings(&mut warned, std::slice::from_ref(&a)), vec![&a]);
        assert!(
            fresh_warnings(&mut warned, std::slice::from_ref(&a)).is_empty(),
            "a change elsewhere does not repeat it"
        );
        assert_eq!(fresh_warnings(&mut warned, &[a.clone(), b.clone()]), vec![&b]);
        assert!(fresh_warnings(&mut warned, &[]).is_empty());
        assert_eq!(
            fresh_warnings(&mut warned, std::slice::from_ref(&a)),
            vec![&a],
            "fixed, then broken again: said again"
        );
    }

    #[test]
    fn view_follows_changed_pods_only() {
        let mut view = View::default();
        let mut addrs = HashMap::new();
        let web = ObjectRef::new("shop", "web");
        let mut c = cluster(vec![pod("shop", "web", false, None)]);
        update_view_pods(&mut view, &c, &[web.clone()].into(), &mut addrs);
        assert_eq!(view.pods_by_ip[&"10.0.0.5".parse().unwrap()].pod, web);
        // A new address: the old one goes.
        c.pods.get_mut(&web).unwrap().ips = vec!["10.0.0.6".parse().unwrap()];
        update_view_pods(&mut view, &c, &[web.clone()].into(), &mut addrs);
        assert!(!view.pods_by_ip.contains_key(&"10.0.0.5".parse().unwrap()));
        assert_eq!(view.pods_by_ip[&"10.0.0.6".parse().unwrap()].pod, web);
        // Unchanged pods are not looked at; a deleted one goes.
        c.pods.clear();
        update_view_pods(&mut view, &c, &BTreeSet::new(), &mut addrs);
        assert_eq!(view.pods_by_ip.len(), 1);
        update_view_pods(&mut view, &c, &[web.clone()].into(), &mut addrs);
        assert!(view.pods_by_ip.is_empty() && addrs.is_empty());
    }

    fn pod(ns: &str, name: &str, host_network: bool, node: Option<&str>) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            ips: vec!["10.0.0.5".parse().unwrap()],
            host_network,
            node_name: node.map(Into::into),
            ..Default::default()
        }
    }

    fn cluster(pods: Vec<Pod>) -> Cluster {
        Cluster {
            pods: pods.into_iter().map(|p| (p.object_ref(), p)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn local_host_network_pods_are_this_nodes_only() {
        let c = cluster(vec![
            pod("kube-system", "node-exporter", true, Some("n1")),
            pod("kube-system", "kube-proxy", true, Some("n2")),
            pod("kube-system", "unscheduled", true, None),
            pod("shop", "web", false, Some("n1")),
        ]);
        let local: Vec<ObjectRef> = c
            .pods
            .values()
            .filter(|p| is_local_host_network(p, "n1"))
            .map(Pod::object_ref)
            .collect();
        assert_eq!(
            local,
            [
                ObjectRef::new("kube-system", "node-exporter"),
                ObjectRef::new("kube-system", "unscheduled")
            ]
        );
    }

    #[test]
    fn not_enforced_pods_are_warned_once_and_counted() {
        let metrics = crate::metrics::Metrics::default();
        let hub = crate::observer::Hub::new(Default::default());
        let gauge = |m: &crate::metrics::Metrics| {
            m.render().lines().find_map(|l| {
                l.strip_prefix(r#"ztrust_pods_not_enforced{reason="host_network"} "#)
                    .map(str::to_owned)
            })
        };
        let mut ne = NotEnforced::default();
        let exporter = ObjectRef::new("kube-system", "node-exporter");
        let with = cluster(vec![
            pod("kube-system", "node-exporter", true, Some("n1")),
            pod("shop", "web", false, Some("n1")),
        ]);
        let all: BTreeSet<ObjectRef> = with.pods.keys().cloned().collect();
        let report = |ne: &mut NotEnforced, c: &Cluster, node: &str| ne.report(c, &all, node, &metrics, &hub);
        assert_eq!(report(&mut ne, &with, "n1"), std::slice::from_ref(&exporter));
        assert_eq!(gauge(&metrics).as_deref(), Some("1"));
        assert_eq!(
            hub.not_enforced(),
            [("kube-system/node-exporter".to_owned(), "host_network".to_owned())]
        );
        // The next snapshot with the same pod: counted, not warned again.
        assert!(report(&mut ne, &with, "n1").is_empty());
        assert_eq!(gauge(&metrics).as_deref(), Some("1"));
        // A change that does not name it leaves it alone (only changed pods are looked at).
        let web_only: BTreeSet<ObjectRef> = [ObjectRef::new("shop", "web")].into();
        assert!(ne.report(&with, &web_only, "n1", &metrics, &hub).is_empty());
        assert_eq!(gauge(&metrics).as_deref(), Some("1"));
        // Gone: back to 0; back again: warned again.
        let without = cluster(vec![pod("shop", "web", false, Some("n1"))]);
        assert!(report(&mut ne, &without, "n1").is_empty());
        assert_eq!(gauge(&metrics).as_deref(), Some("0"));
        assert!(hub.not_enforced().is_empty());
        assert_eq!(report(&mut ne, &with, "n1"), [exporter]);
        // Another node's hostNetwork pods are not this agent's to report.
        assert!(report(&mut ne, &with, "n2").is_empty());
        assert_eq!(gauge(&metrics).as_deref(), Some("0"));
    }
}
