//! What `ztrust-agent run` starts for observability, beside enforcement: the flow API (unix socket,
//! optional mTLS TCP), `/metrics`, the lateral-movement detector, and a housekeeping tick that copies
//! the kernel's events-lost counter (read by the agent's [`KernelCounter`]: the observer opens no map)
//! and the number of enforced endpoints into the hub and metrics.
//!
//! Observability never stands in the way of enforcement: a listener that cannot be bound is logged as
//! an error and the agent runs on without it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{debug, error, warn};

use crate::detector::{Detector, DetectorOptions};
use crate::flows::View;
use crate::health::Health;
use crate::metrics::{FlowApiCounters, Metrics};
use crate::observer::convert;
use crate::observer::hub::{Hub, Item};
use crate::observer::server::{self, TlsFiles};

#[derive(Clone, Debug)]
pub struct ObserverOptions {
    /// `--grpc-socket`; `None` serves no socket.
    pub grpc_socket: Option<PathBuf>,
    /// `--grpc-tcp` with `--tls-cert/--tls-key/--tls-client-ca`.
    pub grpc_tcp: Option<(SocketAddr, TlsFiles)>,
    /// `--metrics-addr`; `None` serves no metrics.
    pub metrics_addr: Option<SocketAddr>,
    /// `None` with `--no-detector`.
    pub detector: Option<DetectorOptions>,
    /// How often the kernel's counters are read.
    pub tick: Duration,
    /// `--otlp-endpoint`: flows exported to an OpenTelemetry collector.
    pub otlp: Option<crate::otlp::OtlpOptions>,
}

impl Default for ObserverOptions {
    fn default() -> Self {
        Self {
            grpc_socket: Some(server::DEFAULT_SOCKET.into()),
            grpc_tcp: None,
            metrics_addr: Some(SocketAddr::from(([0, 0, 0, 0], 9965))),
            detector: Some(DetectorOptions::default()),
            tick: Duration::from_secs(1),
            otlp: None,
        }
    }
}

/// The running tasks. Dropping it stops them and removes the socket file.
pub struct Running {
    tasks: Vec<JoinHandle<()>>,
    socket: Option<PathBuf>,
    /// The OTLP metrics pipeline (its reader thread stops when it is dropped).
    meters: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A kernel counter the observer reports, read by whoever owns the datapath (the observer opens no map);
/// `None` when it could not be read this time (the tick then reports nothing).
pub type KernelCounter = Box<dyn Fn() -> Option<u64> + Send + Sync>;

/// The flow API's service: the hub's flows and alerts, and `Explain` when the agent answers it.
fn service(hub: &Arc<Hub>, explainer: &Option<crate::explain::Explainer>) -> server::ObserverService {
    let s = server::ObserverService::new(hub.clone());
    match explainer {
        Some(e) => s.with_explainer(e.clone()),
        None => s,
    }
}

/// Starts everything `opts` asks for. `health` is what `/readyz` answers; `events_lost` reads the
/// kernel's count of flow events its ring buffer had no room for (`None`: not reported); `view` is the
/// agent's enrichment view (for the endpoint count); `explainer`, where `Explain` is answered (`None`: not served).
pub async fn spawn(
    opts: &ObserverOptions,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    health: Health,
    view: Arc<RwLock<View>>,
    events_lost: Option<KernelCounter>,
    explainer: Option<crate::explain::Explainer>,
) -> Running {
    let counted = hub.clone();
    metrics.collect_flow_api(move || flow_api_counters(&counted));
    let mut running = Running {
        tasks: Vec::new(),
        socket: None,
        meters: None,
    };
    let forever = std::future::pending::<()>;

    if let Some(path) = &opts.grpc_socket {
        match server::bind_unix(path) {
            Ok(listener) => {
                running.socket = Some(path.clone());
                let service = service(&hub, &explainer);
                running.tasks.push(tokio::spawn(async move {
                    if let Err(e) = server::serve_unix(service, listener, forever()).await {
                        error!(error = %e, "flow API (unix socket) stopped");
                    }
                }));
            }
            Err(e) => error!(error = %e, "flow API not served on the unix socket"),
        }
    }
    if let Some((addr, tls)) = &opts.grpc_tcp {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                let (service, tls) = (service(&hub, &explainer), tls.clone());
                running.tasks.push(tokio::spawn(async move {
                    if let Err(e) = server::serve_tcp(service, listener, &tls, forever()).await {
                        error!(error = %e, "flow API (TCP, mTLS) stopped");
                    }
                }));
            }
            Err(e) => error!(%addr, error = %e, "flow API not served on TCP"),
        }
    }
    if let Some(addr) = opts.metrics_addr {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                let metrics = metrics.clone();
                running.tasks.push(tokio::spawn(async move {
                    if let Err(e) = crate::metrics::serve(metrics, health, listener, forever()).await {
                        error!(error = %e, "metrics server stopped");
                    }
                }));
            }
            Err(e) => error!(%addr, error = %e, "metrics not served"),
        }
    }
    if let Some(d) = &opts.detector {
        match Detector::new(d.clone()) {
            Ok(det) => running.tasks.push(tokio::spawn(run_detector(
                hub.clone(),
                det,
                Some(metrics.clone()),
            ))),
            Err(e) => error!(error = %e, "lateral-movement detector not started"),
        }
    }
    if let Some(otlp) = &opts.otlp {
        match crate::otlp::export_metrics(metrics.clone(), otlp) {
            Ok(provider) => running.meters = Some(provider),
            Err(e) => error!(error = %e, "the packet counters are not exported over OTLP"),
        }
        // Subscribed here, before the agent starts reading the kernel's events: every flow is
        // exported or counted lost.
        match crate::otlp::export_flows(hub.clone(), otlp.clone()) {
            Ok(export) => running.tasks.push(tokio::spawn(export)),
            Err(e) => error!(error = %e, "flows are not exported over OTLP"),
        }
    }
    running.tasks.push(tokio::spawn(housekeeping(
        hub,
        metrics,
        view,
        events_lost,
        opts.tick,
    )));
    running
}

/// The hub's counters as the metrics mirror them.
fn flow_api_counters(hub: &Hub) -> FlowApiCounters {
    let st = hub.status();
    FlowApiCounters {
        lost_kernel_ring_buffer: st.lost_kernel_ring_buffer,
        lost_slow_clients: st.lost_slow_clients,
        ring_overwritten: st.ring_overwritten,
        ring_flows: st.num_flows,
        ring_capacity: st.max_flows,
        subscribers: st.subscribers,
        otlp: st.otlp,
    }
}

/// Follows the hub's flows through the detector and publishes its alerts (flow API, metrics, log)
/// until the hub goes away.
pub async fn run_detector(hub: Arc<Hub>, mut detector: Detector, metrics: Option<Arc<Metrics>>) {
    let Some(mut sub) = hub.flows.subscribe(true).subscription else {
        return;
    };
    while let Some(item) = sub.next().await {
        match item {
            Item::Lost(source, n) => {
                debug!(
                    lost = n,
                    source = source.as_str_name(),
                    "detector did not see some flows"
                );
            }
            Item::Value(o) => {
                for alert in detector.observe_shared(&o) {
                    let kind = alert.kind.name();
                    warn!(target: "ztrust::alerts", kind, source = %alert.source, "{}", alert.summary);
                    if let Some(m) = &metrics {
                        m.alert_raised(kind);
                    }
                    hub.publish_alert(convert::alert_to_proto(&alert, &hub.node));
                }
            }
        }
    }
}

async fn housekeeping(
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    view: Arc<RwLock<View>>,
    events_lost: Option<KernelCounter>,
    tick: Duration,
) {
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let endpoints = view.read().map(|v| v.endpoints.len() as u64).unwrap_or(0);
        hub.set_endpoints(endpoints);
        metrics.set_endpoints(endpoints);
        if let Some(lost) = events_lost.as_ref().and_then(|read| read()) {
            hub.set_kernel_lost(lost);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::denied;
    use crate::observer::HubOptions;

    #[test]
    fn the_hubs_counters_reach_the_metrics() {
        let hub = Hub::new(HubOptions {
            flow_buffer: 2,
            client_queue: 1,
            ..Default::default()
        });
        let _slow = hub.flows.subscribe(true);
        for _ in 0..4 {
            hub.publish(denied());
        }
        hub.set_kernel_lost(9);
        // Queue of 1: the first flow went in, the 3 others did not; a ring of 2 overwrote 2.
        assert_eq!(
            flow_api_counters(&hub),
            FlowApiCounters {
                lost_kernel_ring_buffer: 9,
                lost_slow_clients: 3,
                ring_overwritten: 2,
                ring_flows: 2,
                ring_capacity: 2,
                subscribers: 1,
                otlp: None,
            }
        );
    }

    /// The tick copies what the agent's counter reads into the hub (and the endpoint count).
    #[tokio::test]
    async fn housekeeping_reports_the_kernels_count_of_lost_events() {
        let hub = Arc::new(Hub::new(HubOptions::default()));
        let metrics = Arc::new(Metrics::new(Default::default()));
        let lost = Arc::new(std::sync::atomic::AtomicU64::new(7));
        let read = lost.clone();
        // u64::MAX stands for "could not be read".
        let counter: KernelCounter = Box::new(move || {
            Some(read.load(std::sync::atomic::Ordering::Relaxed)).filter(|&n| n != u64::MAX)
        });
        let task = tokio::spawn(housekeeping(
            hub.clone(),
            metrics,
            Arc::new(RwLock::new(View::default())),
            Some(counter),
            Duration::from_millis(5),
        ));
        let until = |want: u64| {
            let hub = hub.clone();
            async move {
                for _ in 0..400 {
                    if hub.status().lost_kernel_ring_buffer == want {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                false
            }
        };
        assert!(until(7).await, "first reading");
        // A reading that fails keeps the last value (it does not fall to 0).
        lost.store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(hub.status().lost_kernel_ring_buffer, 7);
        lost.store(9, std::sync::atomic::Ordering::Relaxed);
        assert!(until(9).await, "a later reading");
        task.abort();
    }
}
