//! Prometheus metrics, all in one registry with the `ztrust_` prefix, served at `/metrics`
//! (`--metrics-addr`, default `0.0.0.0:9965`) in the OpenMetrics text format.
//!
//! Names are stable (documented in the README): a metric is not given another meaning; one renamed
//! (`ztrust_flows_total` → `ztrust_flow_events_total`, `ztrust_drops_total` → `ztrust_drop_events_total`,
//! to say that they count events, not packets) is said in the README. Label values come from bounded sets (verdict, direction, reason names, namespaces);
//! the `pod` label, whose cardinality follows pod churn, is only added with `--metrics-pod-label`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::flows::Flow;
use crate::health::Health;

type Labels = Vec<(&'static str, String)>;
type U64Gauge = Gauge<u64, AtomicU64>;

#[derive(Clone, Copy, Debug, Default)]
pub struct MetricsOptions {
    /// Add the `pod` label to the per-flow counters.
    pub pod_label: bool,
}

/// The flow API's own counters (kept by the observer's hub), collected at each scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowApiCounters {
    pub lost_kernel_ring_buffer: u64,
    pub lost_slow_clients: u64,
    pub ring_overwritten: u64,
    pub ring_flows: u64,
    pub ring_capacity: u64,
    pub subscribers: u64,
    /// `Some` while flows are exported over OTLP.
    pub otlp: Option<crate::otlp::OtlpStatus>,
}

type Collector = Box<dyn Fn() -> FlowApiCounters + Send + Sync>;

/// One of the datapath's packet counters, attributed to the judged pod (`pod` empty for the packets of
/// pods that left, `namespace` too for interfaces no pod is bound to): collected at each scrape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PacketCount {
    pub direction: &'static str,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub namespace: String,
    pub pod: String,
    pub packets: u64,
    pub bytes: u64,
}

type PacketCollector = Box<dyn Fn() -> Vec<PacketCount> + Send + Sync>;

/// Counters collected from the flow API, mirrored into the registry at each scrape.
#[derive(Default)]
struct Mirrored {
    lost_kernel: u64,
    lost_slow: u64,
    overwritten: u64,
    otlp: crate::otlp::OtlpStatus,
}

pub struct Metrics {
    opts: MetricsOptions,
    registry: Registry,
    flows: Family<Labels, Counter>,
    drops: Family<Labels, Counter>,
    packets: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    flows_seen: Counter,
    flows_lost: Family<Labels, Counter>,
    otlp_exported: Counter,
    otlp_lost: Family<Labels, Counter>,
    ring_overwritten: Counter,
    ring_flows: U64Gauge,
    ring_capacity: U64Gauge,
    subscribers: U64Gauge,
    compile: Histogram,
    sync: Histogram,
    sync_writes: Counter,
    endpoints: U64Gauge,
    identities: U64Gauge,
    source_errors: U64Gauge,
    sync_refused: Counter,
    map_entries: Family<Labels, U64Gauge>,
    map_capacity: Family<Labels, U64Gauge>,
    pods_not_enforced: Family<Labels, U64Gauge>,
    alerts: Family<Labels, Counter>,
    flow_api: OnceLock<Collector>,
    datapath: OnceLock<PacketCollector>,
    mirrored: Mutex<Mirrored>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(MetricsOptions::default())
    }
}

impl Metrics {
    pub fn new(opts: MetricsOptions) -> Self {
        let mut registry = Registry::with_prefix("ztrust");
        let duration = || Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        let m = Self {
            opts,
            flows: Family::default(),
            drops: Family::default(),
            packets: Family::default(),
            bytes: Family::default(),
            flows_seen: Counter::default(),
            flows_lost: Family::default(),
            otlp_exported: Counter::default(),
            otlp_lost: Family::default(),
            ring_overwritten: Counter::default(),
            ring_flows: U64Gauge::default(),
            ring_capacity: U64Gauge::default(),
            subscribers: U64Gauge::default(),
            compile: duration(),
            sync: duration(),
            sync_writes: Counter::default(),
            endpoints: U64Gauge::default(),
            identities: U64Gauge::default(),
            source_errors: U64Gauge::default(),
            sync_refused: Counter::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            pods_not_enforced: Family::default(),
            alerts: Family::default(),
            flow_api: OnceLock::new(),
            datapath: OnceLock::new(),
            mirrored: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "datapath_packets",
            "Packets judged by the datapath (the kernel's counters, read at each scrape), by verdict, direction, reason and namespace of the judged pod",
            m.packets.clone(),
        );
        registry.register(
            "datapath_bytes",
            "Bytes of the packets in ztrust_datapath_packets_total, same labels",
            m.bytes.clone(),
        );
        registry.register(
            "flow_events",
            "Flow events reported by the datapath (rate-limited per flow: --event-interval, --event-budget), by verdict, direction, reason and namespace of the judged pod",
            m.flows.clone(),
        );
        registry.register(
            "drop_events",
            "Flow events of dropped and would-drop (audit) flows (rate-limited per flow; ztrust_datapath_packets_total counts the packets), same labels",
            m.drops.clone(),
        );
        registry.register(
            "flows_seen",
            "Flows received from the kernel and enriched",
            m.flows_seen.clone(),
        );
        registry.register(
            "flows_lost",
            "Flows lost: source=kernel_ring_buffer (kernel could not queue the event), slow_client (summed over API clients)",
            m.flows_lost.clone(),
        );
        registry.register(
            "otlp_flows_exported",
            "Flows the OpenTelemetry collector took (run --otlp-endpoint)",
            m.otlp_exported.clone(),
        );
        registry.register(
            "otlp_flows_lost",
            "Flows not exported over OTLP: reason=queue_full (the collector was slower than the flows came; also in flows_lost{source=slow_client}), export_failed (requests the collector did not take)",
            m.otlp_lost.clone(),
        );
        registry.register(
            "flow_ring_overwritten",
            "Flows overwritten in the in-memory flow ring (oldest first)",
            m.ring_overwritten.clone(),
        );
        registry.register(
            "flow_ring_flows",
            "Flows held in the in-memory flow ring",
            m.ring_flows.clone(),
        );
        registry.register(
            "flow_ring_capacity",
            "Capacity of the in-memory flow ring",
            m.ring_capacity.clone(),
        );
        registry.register(
            "flow_subscribers",
            "Open GetFlows/GetAlerts streams",
            m.subscribers.clone(),
        );
        registry.register(
            "policy_compile_duration_seconds",
            "Time to compile cluster state into the desired datapath state",
            m.compile.clone(),
        );
        registry.register(
            "policy_sync_duration_seconds",
            "Time to write the desired state into the kernel maps",
            m.sync.clone(),
        );
        registry.register(
            "policy_sync_writes",
            "Kernel map writes (updates and deletes) done by syncs",
            m.sync_writes.clone(),
        );
        registry.register(
            "endpoints",
            "Endpoints (pods) enforced on this node",
            m.endpoints.clone(),
        );
        registry.register(
            "identities",
            "Security identities allocated",
            m.identities.clone(),
        );
        registry.register(
            "source_errors",
            "Problems in the source's objects now (invalid fields, unsupported kinds), each logged naming the object and field",
            m.source_errors.clone(),
        );
        registry.register(
            "sync_refused",
            "Map updates refused whole (capacity, write errors); the last applied state kept enforcing",
            m.sync_refused.clone(),
        );
        registry.register("map_entries", "Entries in a kernel map", m.map_entries.clone());
        registry.register("map_capacity", "Capacity of a kernel map", m.map_capacity.clone());
        registry.register(
            "pods_not_enforced",
            "Pods of this node the datapath does not enforce, by reason (host_network: shares the node's interfaces; no cgroup hook yet)",
            m.pods_not_enforced.clone(),
        );
        // Present (at 0) from the start, so an alert on it needs no `absent()`.
        m.set_pods_not_enforced("host_network", 0);
        registry.register(
            "alerts",
            "Lateral-movement alerts raised, by kind (scan, sensitive_tier)",
            m.alerts.clone(),
        );
        Self { registry, ..m }
    }

    /// Where the flow API's counters (flows lost, ring fill, subscribers) are read at every scrape.
    pub fn collect_flow_api(&self, collect: impl Fn() -> FlowApiCounters + Send + Sync + 'static) {
        let _ = self.flow_api.set(Box::new(collect));
    }

    /// Where the datapath's packet counters are read at every scrape.
    pub fn collect_packets(&self, collect: impl Fn() -> Vec<PacketCount> + Send + Sync + 'static) {
        let _ = self.datapath.set(Box::new(collect));
    }

    /// Called for every flow.
    pub fn observe_flow(&self, f: &Flow) {
        self.observe_flows(std::iter::once(f));
    }

    /// Counts a batch of flows: the label set of each is looked up in the families once per batch,
    /// not once per flow (a batch holds few distinct label sets: the family lookup, which allocates
    /// and hashes the labels, would otherwise dominate at high event rates).
    pub fn observe_flows<'a>(&self, flows: impl ExactSizeIterator<Item = &'a Flow>) {
        if flows.len() == 0 {
            return;
        }
        self.flows_seen.inc_by(flows.len() as u64);
        // (verdict, direction, reason, namespace, pod) → (flows, drops), borrowed from the batch. A
        // batch has few distinct label sets, mostly in runs: a short list, tried at the last hit
        // first; with many (the pod label on a busy node), an index.
        let mut counts: Vec<([&str; 5], (u64, u64))> = Vec::new();
        let mut index: std::collections::HashMap<[&str; 5], usize> = std::collections::HashMap::new();
        let mut last = 0;
        for f in flows {
            let judged = if f.direction == crate::flows::Direction::Ingress {
                &f.destination
            } else {
                &f.source
            };
            let namespace = judged
                .namespace()
                .unwrap_or_else(|| f.endpoint.pod().map_or("", |p| p.namespace.as_str()));
            let pod = if self.opts.pod_label {
                judged.pod.as_ref().map_or("", |p| p.name.as_str())
            } else {
                ""
            };
            let key = [
                f.verdict.name(),
                f.direction.name(),
                f.reason.name(),
                namespace,
                pod,
            ];
            if counts.get(last).is_none_or(|(k, _)| !same_labels(k, &key)) {
                let found = if counts.len() <= 16 {
                    counts.iter().position(|(k, _)| same_labels(k, &key))
                } else {
                    if index.is_empty() {
                        index.extend(counts.iter().enumerate().map(|(i, (k, _))| (*k, i)));
                    }
                    index.get(&key).copied()
                };
                last = found.unwrap_or_else(|| {
                    counts.push((key, (0, 0)));
                    if !index.is_empty() {
                        index.insert(key, counts.len() - 1);
                    }
                    counts.len() - 1
                });
            }
            let (n, d) = &mut counts[last].1;
            *n += 1;
            *d += u64::from(f.is_drop());
        }
        for ([verdict, direction, reason, namespace, pod], (n, drops)) in counts {
            let labels = self.judged_labels([verdict, direction, reason, namespace, pod]);
            if drops > 0 {
                self.drops.get_or_create(&labels).inc_by(drops);
            }
            self.flows.get_or_create(&labels).inc_by(n);
        }
    }

    pub fn observe_compile(&self, secs: f64) {
        self.compile.observe(secs);
    }

    pub fn observe_sync(&self, secs: f64, writes: u64) {
        self.sync.observe(secs);
        self.sync_writes.inc_by(writes);
    }

    pub fn set_endpoints(&self, n: u64) {
        self.endpoints.set(n);
    }

    pub fn set_identities(&self, n: u64) {
        self.identities.set(n);
    }

    pub fn set_source_errors(&self, n: u64) {
        self.source_errors.set(n);
    }

    pub fn sync_refused(&self) {
        self.sync_refused.inc();
    }

    /// `map` is the pinned name (`ZT_POLICY`, ...) or any stable short name.
    pub fn set_map_fill(&self, map: &str, used: u64, capacity: u64) {
        let labels: Labels = vec![("map", map.to_owned())];
        self.map_entries.get_or_create(&labels).set(used);
        self.map_capacity.get_or_create(&labels).set(capacity);
    }

    /// `reason`: `host_network`.
    pub fn set_pods_not_enforced(&self, reason: &str, n: u64) {
        self.pods_not_enforced
            .get_or_create(&vec![("reason", reason.to_owned())])
            .set(n);
    }

    /// `kind`: `scan` or `sensitive_tier`.
    pub fn alert_raised(&self, kind: &str) {
        self.alerts.get_or_create(&vec![("kind", kind.to_owned())]).inc();
    }

    /// The packet families, rebuilt from what the collector reads (series of departed pods are gone
    /// from it; it keeps each value from falling). Called with `mirrored` held, so that two scrapes do
    /// not interleave.
    fn refresh_packets(&self) {
        self.packets.clear();
        self.bytes.clear();
        for (labels, packets, bytes) in self.packet_series() {
            self.packets.get_or_create(&labels).inc_by(packets);
            self.bytes.get_or_create(&labels).inc_by(bytes);
        }
    }

    /// The datapath's packet and byte counters as read now, one series per label set of
    /// `ztrust_datapath_packets_total` (also what OTLP exports: [`crate::otlp::export_metrics`]).
    pub fn packet_series(&self) -> Vec<(Labels, u64, u64)> {
        let Some(collect) = self.datapath.get() else {
            return Vec::new();
        };
        let mut sums: BTreeMap<[&str; 5], (u64, u64)> = BTreeMap::new();
        let counts = collect();
        for c in &counts {
            let pod = if self.opts.pod_label { c.pod.as_str() } else { "" };
            let sum = sums
                .entry([c.verdict, c.direction, c.reason, c.namespace.as_str(), pod])
                .or_default();
            sum.0 += c.packets;
            sum.1 += c.bytes;
        }
        sums.into_iter()
            .map(|(key, (packets, bytes))| (self.judged_labels(key), packets, bytes))
            .collect()
    }

    /// The labels of the per-flow and per-packet families: verdict, direction, reason, namespace, and
    /// the pod with `--metrics-pod-label`.
    fn judged_labels(&self, [verdict, direction, reason, namespace, pod]: [&str; 5]) -> Labels {
        let mut labels: Labels = vec![
            ("verdict", verdict.to_owned()),
            ("direction", direction.to_owned()),
            ("reason", reason.to_owned()),
            ("namespace", namespace.to_owned()),
        ];
        if self.opts.pod_label {
            labels.push(("pod", pod.to_owned()));
        }
        labels
    }

    fn refresh(&self, m: &mut Mirrored) {
        self.refresh_packets();
        let Some(collect) = self.flow_api.get() else {
            return;
        };
        let st = collect();
        let mirror = |counter: &Counter, last: &mut u64, now: u64| {
            if now > *last {
                counter.inc_by(now - *last);
            }
            *last = now;
        };
        let kernel = self
            .flows_lost
            .get_or_create(&vec![("source", "kernel_ring_buffer".to_owned())])
            .clone();
        let slow = self
            .flows_lost
            .get_or_create(&vec![("source", "slow_client".to_owned())])
            .clone();
        mirror(&kernel, &mut m.lost_kernel, st.lost_kernel_ring_buffer);
        mirror(&slow, &mut m.lost_slow, st.lost_slow_clients);
        mirror(&self.ring_overwritten, &mut m.overwritten, st.ring_overwritten);
        if let Some(o) = st.otlp {
            let lost = |reason: &str| {
                self.otlp_lost
                    .get_or_create(&vec![("reason", reason.to_owned())])
                    .clone()
            };
            mirror(&self.otlp_exported, &mut m.otlp.exported, o.exported);
            mirror(
                &lost("queue_full"),
                &mut m.otlp.lost_queue_full,
                o.lost_queue_full,
            );
            mirror(
                &lost("export_failed"),
                &mut m.otlp.lost_export_failed,
                o.lost_export_failed,
            );
        }
        self.ring_flows.set(st.ring_flows);
        self.ring_capacity.set(st.ring_capacity);
        self.subscribers.set(st.subscribers);
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        // Held while the text is written: a scrape never sees another's half-rebuilt families.
        let mut m = self.mirrored.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(&mut m);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Label values compared, identical ones first by address: the agent's flows borrow their verdict,
/// direction and reason names from the same constants, so most comparisons end there. (glibc's
/// vectorised `memcmp` reads 32 bytes with a masked load; on a short string near the end of a page
/// that load is slow on some CPUs, which made this comparison the most expensive step of the
/// pipeline when every label went through it.)
fn same_labels(a: &[&str; 5], b: &[&str; 5]) -> bool {
    a.iter().zip(b).all(|(x, y)| std::ptr::eq(*x, *y) || x == y)
}

/// OpenMetrics text → the Prometheus text format (0.0.4), for scrapers that do not ask for OpenMetrics
/// (`promtool check metrics`, older Prometheus, curl). The two differ where it matters here: a counter's
/// `# HELP`/`# TYPE` name carries the `_total` suffix its samples have, and there is no `# UNIT` or
/// `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{tag}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (200 once the maps are in sync with
/// the source, 503 before) on `listener` until `shutdown` resolves.
pub async fn serve(
    metrics: Arc<Metrics>,
    health: Health,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    use axum::routing::get;
    tracing::info!(addr = ?listener.local_addr().ok(), "metrics listening");
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let m = metrics.clone();
                async move {
                    // Content negotiation: OpenMetrics for those who ask (Prometheus does), the classic
                    // text format otherwise.
                    let wants_openmetrics = headers
                        .get(axum::http::header::ACCEPT)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.contains("application/openmetrics-text"));
                    if wants_openmetrics {
                        (
                            [(
                                CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            m.render(),
                        )
                    } else {
                        (
                            [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                            to_prometheus_text(&m.render()),
                        )
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = health.is_ready();
                async move {
                    if ready {
                        (axum::http::StatusCode::OK, "ready\n")
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "not in sync with the source yet\n",
                        )
                    }
                }
            }),
        );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests;
