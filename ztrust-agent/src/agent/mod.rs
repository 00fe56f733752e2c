//! `ztrust-agent run`: the agent's loop. Each pass runs [`reconcile::Reconciler`]'s steps in order:
//! the source's changes into the engine, this node's pods bound to their interfaces, the desired state
//! synced into the kernel maps, the flow view reported. [`flows`] carries kernel events to the flow API,
//! metrics and logs; [`view`] keeps what enriches them current.

mod flows;
mod packets;
pub mod reconcile;
mod view;

pub use reconcile::HOST_NETWORK;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tracing::{info, info_span, warn};
use ztrust_common::{Config, ep_flags};

use self::flows::{FlowSink, read_events};
use self::reconcile::{Outputs, Reconciler, Synced};
use crate::datapath::bind::Binder;
use crate::datapath::loader::Datapath;
use crate::datapath::node_local::Mirror;
use crate::datapath::sync::{KernelMaps, Syncer};
use crate::flows::View;
use crate::model::Cluster;
use crate::netif::{self, HostRoutes};
use crate::policy::Engine;
use crate::source::ClusterSource;
use crate::source::dir::DirSource;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown source `{0}`: use `kube` (the Kubernetes API) or `dir:<path>` (a directory of YAML)")]
    UnknownSource(String),
    #[error("connecting to the Kubernetes API")]
    Kube(#[source] crate::source::kube::Error),
    #[error("writing the datapath's configuration ({map})", map = ztrust_common::names::CONFIG)]
    Config(#[source] aya::maps::MapError),
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

pub async fn run(opts: Options) -> Result<()> {
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
        });
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
    dp.maps.config.set(0, config, 0).map_err(Error::Config)?;
    // The node's local routes, for node ports on every local address (kept empty otherwise).
    let node_local = Mirror::adopt(&dp.maps.node_local, opts.node_ports_any_local);
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
    let health = crate::health::Health::default();
    collect_packets(&metrics, &opts.pin_dir, view.clone(), health.clone());
    // `explain` is answered by the loop, which owns the engine and the maps.
    let (explainer, explain_calls) = tokio::sync::mpsc::channel(8);
    let _observer = crate::observer::tasks::spawn(
        &opts.observer,
        hub.clone(),
        metrics.clone(),
        health.clone(),
        view.clone(),
        events_lost(&opts.pin_dir),
        Some(explainer),
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

    // The links an earlier agent pinned keep enforcing until this agent attaches to their interfaces,
    // which adopts them.
    let adoptable = pinned
        .iter()
        .filter(|p| matches!(p.state, crate::datapath::pins::State::Here { .. }))
        .count();
    info!(source = ?opts.source, pinned = adoptable, "agent running");
    // Allow sets are compiled for this node's pods only; the rest of the cluster are peers.
    let mut engine = Engine::for_node(opts.node_name.clone());
    engine.set_service_grace(opts.service_grace);
    let binder = Binder::new(opts.interface_prefixes.clone());
    let out = Outputs {
        view,
        metrics,
        hub,
        health,
    };
    let result = match &opts.source {
        Source::Dir(root) => {
            let context = Cluster {
                node_ips: opts.node_ips.clone(),
                node_ports_any_local: opts.node_ports_any_local,
                service_cidrs: opts.service_cidrs.clone(),
                ..Cluster::default()
            };
            let source = DirSource::new(root.clone(), &context);
            let r = Reconciler::new(source, engine, syncer, binder, out);
            reconcile(&opts, &mut dp, node_local, r, explain_calls, agent_started).await
        }
        Source::Kube { kubeconfig } => {
            let client = crate::source::kube::client(kubeconfig.as_deref())
                .await
                .map_err(Error::Kube)?;
            let mut kube = crate::source::kube::KubeSource::start(client, Some(opts.node_name.clone()));
            kube.set_node_ips(opts.node_ips.clone());
            kube.set_node_ports_any_local(opts.node_ports_any_local);
            kube.set_service_cidrs(opts.service_cidrs.clone());
            let r = Reconciler::new(kube, engine, syncer, binder, out);
            reconcile(&opts, &mut dp, node_local, r, explain_calls, agent_started).await
        }
    };
    flows_task.abort();
    result
}

/// The loop: wakes on the source's news, interface and route announcements, the tick (a backstop for
/// what none of them announces) or shutdown, then runs the reconciler's steps in order.
async fn reconcile<S: ClusterSource>(
    opts: &Options,
    dp: &mut Datapath,
    mut node_local: Mirror,
    mut r: Reconciler<S>,
    mut explain_calls: tokio::sync::mpsc::Receiver<crate::explain::ExplainCall>,
    agent_started: Instant,
) -> Result<()> {
    let mut ticker = tokio::time::interval(opts.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = std::pin::pin!(shutdown_signal());
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
            _ = r.source().changed() => {}
            r = async { links.as_mut().expect("checked").next().await }, if links.is_some() => {
                links_failed = r.err();
                // A CNI's set-up is a handful of announcements (the link, its moves, its routes): take
                // them together. Also bounds the loop to ~100 wake-ups a second under announcement
                // churn (a pod flapping its link, a routing daemon).
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Some(call) = explain_calls.recv() => {
                // Answered between passes, from the state the last one left (no pass of its own).
                let _ = call.reply.send(r.explain(&call.query, &dp.maps));
                continue;
            }
            _ = &mut shutdown => {
                info!("shutting down; pinned programs and maps keep enforcing");
                return Ok(());
            }
        }
        if let Some(e) = links_failed {
            warn!(error = %e, "interface announcements (rtnetlink) failed; polling only from now on");
            links = None;
        }
        let span = info_span!("reconcile");
        let _enter = span.enter();

        let host_addrs = node_local.refresh(&mut dp.maps.node_local, &r.cluster().service_cidrs);
        r.apply_source(host_addrs, Instant::now());

        let ifaces = match netif::interfaces() {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "listing interfaces");
                continue;
            }
        };
        crate::datapath::bind::release_gone(dp, &ifaces);
        r.bind(dp, &ifaces, &HostRoutes::read().unwrap_or_default());

        if let Synced::First(_) = r.sync(&mut KernelMaps(&mut dp.maps), agent_started) {
            // This agent's programs are attached and find single-port entries in their own map: the
            // copies an earlier agent kept in the trie go.
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
        }
        r.report();
    }
}

async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The datapath's packet counters for `/metrics`, read at each scrape and attributed to the pods the
/// view binds to their interfaces ([`packets::Attribution`]); nothing before the first sync (the view
/// names no pod before it).
fn collect_packets(
    metrics: &crate::metrics::Metrics,
    pin_dir: &Path,
    view: Arc<RwLock<View>>,
    health: crate::health::Health,
) {
    use crate::datapath::loader::CounterMaps;
    let maps = match CounterMaps::open(pin_dir) {
        Ok(m) => m,
        Err(e) => {
            warn!(error = %e, "cannot open the packet counters; /metrics will have no ztrust_datapath_packets_total");
            return;
        }
    };
    // The maps, the attribution, and whether the last read failed (said once per failing stretch).
    let mut attribution = packets::Attribution::default();
    match maps.read() {
        Ok(before) => attribution.baseline(&before),
        Err(e) => {
            warn!(error = %e, "reading the packet counters at the start; what they held is counted at the first scrape")
        }
    }
    let state = std::sync::Mutex::new((maps, attribution, false));
    metrics.collect_packets(move || {
        if !health.is_ready() {
            return Vec::new();
        }
        let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
        let (maps, attribution, failing) = &mut *guard;
        let now = match maps.read() {
            Ok(now) => now,
            Err(e) => {
                if !std::mem::replace(failing, true) {
                    warn!(error = %e, "reading the packet counters; /metrics repeats the last values until a read succeeds");
                }
                return attribution.series();
            }
        };
        if std::mem::replace(failing, false) {
            info!("the packet counters are read again");
        }
        // Interfaces that cannot be listed are all taken to be there (nothing is deleted).
        let live: Option<std::collections::HashSet<u32>> =
            netif::interfaces().ok().map(|i| i.into_values().collect());
        let owners: std::collections::HashMap<u32, crate::model::ObjectRef> = view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .endpoints
            .iter()
            .map(|(ifindex, ep)| (*ifindex, ep.pod.clone()))
            .collect();
        let read = attribution.read(&now, &owners, |ifindex| {
            live.as_ref().is_none_or(|l| l.contains(&ifindex))
        });
        if !read.forget.is_empty()
            && let Err(e) = maps.forget(&read.forget)
        {
            warn!(error = %e, "deleting the packet counters of interfaces that are gone");
        }
        attribution.series()
    });
}

/// The observer's reader of the kernel's events-lost counter, from the pinned stats map.
fn events_lost(pin_dir: &Path) -> Option<crate::observer::tasks::KernelCounter> {
    match crate::datapath::loader::Stats::open(pin_dir) {
        Ok(stats) => Some(Box::new(move || stats.get(ztrust_common::stat::EVENTS_LOST))),
        Err(e) => {
            warn!(error = %e, "cannot open the stats map; kernel event losses will not be reported");
            None
        }
    }
}
