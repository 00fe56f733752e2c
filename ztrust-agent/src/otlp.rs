//! Flows exported as OpenTelemetry log records over OTLP/gRPC (`run --otlp-endpoint URL`), for a
//! collector that gathers every node's flows in one place.
//!
//! The exporter is one more follower of the observer's hub: it reads the hub's flows through a
//! subscription with a bounded queue (`--client-queue`), so a collector that is slow or down costs the
//! agent a fixed amount of memory and never makes the datapath, the flow log or the API's clients wait.
//! What it cannot export is counted, by why ([`OtlpCounters`]: metrics and `status`): flows that did not
//! fit its queue while an export was under way, and flows of a batch the collector did not take (down,
//! refused, or unanswered within the timeout: those may have arrived). A batch is sent once, never
//! again: a flow reaches the collector at most once.
//! The kernel's packet counters go the same way as OTLP metrics ([`export_metrics`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::{InstrumentationScope, Key, KeyValue};
use opentelemetry_otlp::{RetryPolicy, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::{LogBatch, LogExporter as _, SdkLogRecord, SdkLogger, SdkLoggerProvider};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use tracing::{info, warn};
use ztrust_common::proto;

use crate::flows::{Endpoint, Observed};
use crate::observer::hub::{Hub, Item};

/// Flows per export request at most.
pub const MAX_BATCH: usize = 512;
/// How long flows wait for more to fill a request.
pub const BATCH_DELAY: Duration = Duration::from_millis(200);
/// How long one export may take before its flows are counted lost.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct OtlpOptions {
    /// `http://host:4317`: the collector's OTLP/gRPC receiver ([`parse_endpoint`]).
    pub endpoint: String,
    /// This node's name, the flows' resource attribute `k8s.node.name`.
    pub node: String,
    /// How often the packet counters are pushed (`--otlp-metrics-interval`).
    pub metrics_interval: Duration,
}

/// What the exporter did, read by `status` and the metrics.
#[derive(Debug, Default)]
pub struct OtlpCounters {
    pub exported: AtomicU64,
    /// Flows that did not fit the exporter's queue (the collector was slower than the flows came).
    pub lost_queue_full: AtomicU64,
    /// Flows of requests the collector did not take (unreachable, refused, timed out).
    pub lost_export_failed: AtomicU64,
}

/// [`OtlpCounters`] as read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OtlpStatus {
    pub exported: u64,
    pub lost_queue_full: u64,
    pub lost_export_failed: u64,
}

impl OtlpCounters {
    pub fn status(&self) -> OtlpStatus {
        OtlpStatus {
            exported: self.exported.load(Ordering::Relaxed),
            lost_queue_full: self.lost_queue_full.load(Ordering::Relaxed),
            lost_export_failed: self.lost_export_failed.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--otlp-endpoint {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
}

/// The attributes of the agent and node every flow carries.
pub fn resource(node: &str) -> Resource {
    Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", "ztrust-agent"),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("k8s.node.name", node.to_owned()),
        ])
        .build()
}

/// `--otlp-endpoint`: an `http://` URL with a host (TLS to the collector is not built in: reach it
/// in the cluster or through a local collector).
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    if s.starts_with("https://") {
        return Err(format!(
            "{s}: TLS to the collector is not supported: export over http:// to a collector in the cluster or on the node, which forwards with TLS"
        ));
    }
    let rest = s.strip_prefix("http://").ok_or_else(|| {
        format!("{s}: an http:// URL of the collector's OTLP/gRPC receiver, e.g. http://otel-collector:4317")
    })?;
    if rest.is_empty() || rest.starts_with('/') || rest.starts_with(':') {
        return Err(format!("{s}: no host"));
    }
    Ok(s.to_owned())
}

fn exporter_error(endpoint: &str) -> impl FnOnce(opentelemetry_otlp::ExporterBuildError) -> Error + '_ {
    move |e| Error::Exporter {
        endpoint: endpoint.to_owned(),
        message: e.to_string(),
    }
}

/// Starts following the hub's flows now (so that no flow published after this goes uncounted) and
/// returns the loop that exports them, until the hub goes away. Called within the agent's runtime
/// (the gRPC channel runs on it). The exporter connects lazily: an unreachable collector makes requests
/// fail (their flows counted), not this function. Flows still queued when the agent stops are neither
/// exported nor counted.
pub fn export_flows(
    hub: Arc<Hub>,
    opts: OtlpOptions,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, Error> {
    let mut exporter = to_collector(
        opentelemetry_otlp::LogExporter::builder().with_tonic(),
        &opts.endpoint,
    )
    .build()
    .map_err(exporter_error(&opts.endpoint))?;
    exporter.set_resource(&resource(&opts.node));
    let sub = hub.flows.subscribe(true).subscription;
    hub.set_otlp_endpoint(opts.endpoint.clone());
    Ok(async move {
        if let Some(sub) = sub {
            run_flows(&hub, sub, exporter, &opts.endpoint).await;
        }
    })
}

async fn run_flows(
    hub: &Hub,
    mut sub: crate::observer::hub::Subscription<Observed>,
    exporter: opentelemetry_otlp::LogExporter,
    endpoint: &str,
) {
    // Records are made by a logger of a provider with no processor: the SDK's batching (which drops
    // what it cannot send without saying how much) is not used; this loop batches and counts.
    let provider = SdkLoggerProvider::builder().build();
    let logger = provider.logger("ztrust");
    let scope = InstrumentationScope::builder("ztrust")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let counters = &hub.otlp;
    info!(endpoint, "exporting flows over OTLP");
    let mut batch: Vec<Arc<Observed>> = Vec::with_capacity(MAX_BATCH);
    let mut failing = false;
    loop {
        // The first flow of a batch is waited for; the rest only as long as BATCH_DELAY.
        match sub.next().await {
            None => return,
            Some(item) => take(item, &mut batch, counters),
        }
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, sub.next()).await {
                Ok(Some(item)) => take(item, &mut batch, counters),
                Ok(None) | Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let records: Vec<SdkLogRecord> = batch.iter().map(|o| record(&logger, o)).collect();
        let refs: Vec<(&SdkLogRecord, &InstrumentationScope)> = records.iter().map(|r| (r, &scope)).collect();
        let n = batch.len() as u64;
        match exporter.export(LogBatch::new(&refs)).await {
            Ok(()) => {
                counters.exported.fetch_add(n, Ordering::Relaxed);
                if failing {
                    info!(endpoint, "OTLP export works again");
                    failing = false;
                }
            }
            Err(e) => {
                counters.lost_export_failed.fetch_add(n, Ordering::Relaxed);
                // Once per failing stretch: a collector that is down for an hour says so once.
                if !failing {
                    warn!(endpoint, error = %e, lost = n, "OTLP export failed; flows are counted as lost until it works again");
                    failing = true;
                }
            }
        }
        batch.clear();
    }
}

/// An OTLP/gRPC exporter's builder (logs or metrics) set for `endpoint`: [`EXPORT_TIMEOUT`] per request,
/// sent once (a request the collector took but did not answer would arrive twice if sent again).
fn to_collector<B: WithExportConfig + WithTonicConfig>(builder: B, endpoint: &str) -> B {
    builder
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .with_retry_policy(RetryPolicy::disabled())
}

/// The kernel's packet counters as OTLP metrics, pushed every `opts.metrics_interval` on the SDK's
/// reader thread: `ztrust.datapath.packets` and `ztrust.datapath.bytes`, cumulative sums with the
/// labels of `ztrust_datapath_packets_total` as attributes named as the flows' are (`ztrust.verdict`,
/// `ztrust.direction`, `ztrust.reason`, `k8s.namespace.name`, `k8s.pod.name`), read by the same reader
/// as `/metrics` (once per instrument and push).
/// Dropping the provider stops it. Built within the agent's runtime (the gRPC channel runs on it).
pub fn export_metrics(
    metrics: Arc<crate::metrics::Metrics>,
    opts: &OtlpOptions,
) -> Result<SdkMeterProvider, Error> {
    let exporter = to_collector(
        opentelemetry_otlp::MetricExporter::builder().with_tonic(),
        &opts.endpoint,
    )
    .build()
    .map_err(exporter_error(&opts.endpoint))?;
    let reader = PeriodicReader::builder(exporter)
        .with_interval(opts.metrics_interval)
        .build();
    let provider = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource(&opts.node))
        .build();
    let meter = provider.meter("ztrust");
    type Pick = fn(u64, u64) -> u64;
    let instruments: [(&'static str, &'static str, &'static str, Pick); 2] = [
        (
            "ztrust.datapath.packets",
            "Packets judged by the datapath, by verdict, direction, reason and namespace of the judged pod",
            "{packet}",
            |packets, _| packets,
        ),
        (
            "ztrust.datapath.bytes",
            "Bytes of the packets judged by the datapath, same attributes",
            "By",
            |_, bytes| bytes,
        ),
    ];
    for (name, description, unit, pick) in instruments {
        let metrics = metrics.clone();
        meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_unit(unit)
            .with_callback(move |observer| {
                for (labels, packets, bytes) in metrics.packet_series() {
                    let attributes: Vec<KeyValue> = labels
                        .into_iter()
                        .map(|(k, v)| KeyValue::new(metric_attribute(k), v))
                        .collect();
                    observer.observe(pick(packets, bytes), &attributes);
                }
            })
            .build();
    }
    Ok(provider)
}

/// The OTLP name of a label of `ztrust_datapath_packets_total`: the flows' attribute names.
fn metric_attribute(label: &'static str) -> &'static str {
    match label {
        "verdict" => "ztrust.verdict",
        "direction" => "ztrust.direction",
        "reason" => "ztrust.reason",
        "namespace" => "k8s.namespace.name",
        "pod" => "k8s.pod.name",
        other => other,
    }
}

/// A flow into the batch; a loss of the exporter's own queue counted (losses before the hub, in the
/// kernel's ring buffer, are the hub's own counter).
fn take(item: Item<Observed>, batch: &mut Vec<Arc<Observed>>, counters: &OtlpCounters) {
    match item {
        Item::Value(o) => batch.push(o),
        Item::Lost(crate::observer::proto::LostEventSource::SlowClient, n) => {
            counters.lost_queue_full.fetch_add(n, Ordering::Relaxed);
        }
        Item::Lost(..) => {}
    }
}

/// One flow as a log record: the line `flows` prints as its body, everything else as attributes.
pub fn record(logger: &SdkLogger, o: &Observed) -> SdkLogRecord {
    let f = &o.flow;
    let mut r = logger.create_log_record();
    r.set_event_name("ztrust.flow");
    r.set_timestamp(o.time);
    r.set_observed_timestamp(SystemTime::now());
    if f.is_drop() {
        r.set_severity_number(Severity::Warn);
        r.set_severity_text("WARN");
    } else {
        r.set_severity_number(Severity::Info);
        r.set_severity_text("INFO");
    }
    r.set_body(AnyValue::String(crate::flows::render_line(f).into()));
    r.add_attributes(attributes(o));
    r
}

/// The attributes of a flow's record (OpenTelemetry's `source.*`, `destination.*` and `network.*`
/// names where they exist; `ztrust.*` for the rest).
pub fn attributes(o: &Observed) -> Vec<(Key, AnyValue)> {
    let f = &o.flow;
    let s = |v: &str| AnyValue::String(v.to_owned().into());
    let mut a = vec![
        (Key::new("ztrust.flow.id"), AnyValue::Int(o.seq as i64)),
        (Key::new("ztrust.verdict"), s(f.verdict.name())),
        (Key::new("ztrust.reason"), s(f.reason.name())),
        (Key::new("ztrust.direction"), s(f.direction.name())),
        (Key::new("ztrust.endpoint"), s(&f.endpoint.to_string())),
        (Key::new("ztrust.protocol"), s(&f.protocol.to_string())),
        (
            Key::new("network.type"),
            s(if f.source.ip.is_ipv4() { "ipv4" } else { "ipv6" }),
        ),
        (
            Key::new("ztrust.new_connection"),
            AnyValue::Boolean(f.new_connection),
        ),
        (Key::new("ztrust.bytes"), AnyValue::Int(i64::from(f.bytes))),
    ];
    if matches!(f.protocol.0, proto::TCP | proto::UDP) {
        a.push((
            Key::new("network.transport"),
            s(&f.protocol.to_string().to_lowercase()),
        ));
    }
    end(&mut a, "source", &f.source);
    end(&mut a, "destination", &f.destination);
    if !f.tcp_flags.is_empty() {
        a.push((Key::new("ztrust.tcp_flags"), s(&f.tcp_flags.to_string())));
    }
    if !f.policies.is_empty() {
        let list = f.policies.iter().map(|p| s(&p.to_string())).collect();
        a.push((Key::new("ztrust.policies"), AnyValue::ListAny(Box::new(list))));
    }
    if let Some(by) = &f.allowed_by {
        a.push((Key::new("ztrust.allowed_by.policy"), s(&by.policy.to_string())));
        a.push((Key::new("ztrust.allowed_by.rule"), AnyValue::Int(by.rule as i64)));
    }
    if let Some(svc) = &f.service {
        a.push((Key::new("ztrust.service"), s(&svc.name.to_string())));
    }
    a
}

/// `source.address`, `source.port`, and the pod's namespace, name and labels, of one end.
fn end(a: &mut Vec<(Key, AnyValue)>, side: &'static str, e: &Endpoint) {
    let s = |v: &str| AnyValue::String(v.to_owned().into());
    a.push((Key::new(format!("{side}.address")), s(&e.ip.to_string())));
    if let Some(port) = e.port {
        a.push((Key::new(format!("{side}.port")), AnyValue::Int(i64::from(port))));
    }
    if let Some(pod) = &e.pod {
        a.push((Key::new(format!("ztrust.{side}.namespace")), s(&pod.namespace)));
        a.push((Key::new(format!("ztrust.{side}.pod")), s(&pod.name)));
    }
    if !e.labels.is_empty() {
        let labels = e
            .labels
            .iter()
            .map(|(k, v)| (Key::new(k.clone()), s(v)))
            .collect();
        a.push((
            Key::new(format!("ztrust.{side}.labels")),
            AnyValue::Map(Box::new(labels)),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::denied;

    #[test]
    fn the_endpoint_is_an_http_url_with_a_host() {
        assert!(parse_endpoint("http://otel-collector:4317").is_ok());
        assert!(parse_endpoint("http://10.0.0.1:4317").is_ok());
        for bad in [
            "otel-collector:4317",
            "https://c:4317",
            "http://",
            "http://:4317",
            "grpc://c:4317",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_flows_record_says_what_flows_says() {
        let flow = denied();
        let o = Observed {
            seq: 7,
            time: flow.time,
            flow: flow.clone(),
        };
        let provider = SdkLoggerProvider::builder().build();
        let r = record(&provider.logger("t"), &o);
        assert_eq!(r.severity_number(), Some(Severity::Warn));
        assert_eq!(r.timestamp(), Some(flow.time));
        assert_eq!(
            r.body(),
            Some(&AnyValue::String(crate::flows::render_line(&flow).into()))
        );
        let get = |k: &str| {
            r.attributes_iter()
                .find(|(key, _)| key.as_str() == k)
                .map(|(_, v)| v.clone())
        };
        let s = |v: &str| Some(AnyValue::String(v.to_owned().into()));
        assert_eq!(get("ztrust.flow.id"), Some(AnyValue::Int(7)));
        assert_eq!(get("ztrust.verdict"), s(flow.verdict.name()));
        assert_eq!(get("ztrust.reason"), s(flow.reason.name()));
        assert_eq!(get("source.address"), s(&flow.source.ip.to_string()));
        assert_eq!(
            get("destination.port"),
            flow.destination.port.map(|p| AnyValue::Int(i64::from(p)))
        );
        let keys: Vec<&str> = r.attributes_iter().map(|(k, _)| k.as_str()).collect();
        let mut unique = keys.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "no attribute twice: {keys:?}");
        assert_eq!(get("ztrust.protocol"), s(&flow.protocol.to_string()));
        assert_eq!(
            get("network.transport"),
            s(&flow.protocol.to_string().to_lowercase()),
            "TCP and UDP have OpenTelemetry's transport attribute"
        );
        let mut icmp = o.flow.clone();
        icmp.protocol = crate::flows::IpProtocol(ztrust_common::proto::ICMP);
        let icmp = Observed {
            seq: 8,
            time: icmp.time,
            flow: icmp,
        };
        assert!(
            attributes(&icmp)
                .iter()
                .all(|(k, _)| k.as_str() != "network.transport"),
            "ICMP is no transport of OpenTelemetry's list"
        );
        let src = flow.source.pod.as_ref().expect("the test flow's source is a pod");
        assert_eq!(get("ztrust.source.pod"), s(&src.name));
        assert_eq!(get("ztrust.source.namespace"), s(&src.namespace));
        assert!(!flow.policies.is_empty(), "the test flow names its policies");
        assert_eq!(
            get("ztrust.policies"),
            Some(AnyValue::ListAny(Box::new(
                flow.policies
                    .iter()
                    .map(|p| AnyValue::String(p.to_string().into()))
                    .collect()
            )))
        );
    }
}
