//! `/metrics` over HTTP on an ephemeral port, parsed back.

use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use ztrust_agent::flows::{Endpoint, Flow};
use ztrust_agent::metrics::{self, Metrics, MetricsOptions};

fn drop_in(ns: &str) -> Flow {
    let ep = |ip: &str, ns: &str| Endpoint {
        ip: ip.parse().unwrap(),
        port: Some(80),
        pod: Some(ztrust_agent::model::ObjectRef::new(ns, "p")),
        labels: Default::default(),
        identity: 300,
    };
    Flow {
        time: humantime::parse_rfc3339("2026-01-01T00:00:00.000Z").unwrap(),
        node: "lab".into(),
        verdict: ztrust_agent::flows::Verdict::Dropped,
        direction: ztrust_agent::flows::Direction::Egress,
        reason: ztrust_agent::flows::Reason::PolicyDenied,
        endpoint: ztrust_agent::flows::JudgedAt::Pod(ztrust_agent::model::ObjectRef::new(ns, "p")),
        protocol: ztrust_agent::flows::IpProtocol::TCP,
        source: ep("10.0.0.1", ns),
        destination: ep("10.0.0.2", "other"),
        tcp_flags: ztrust_agent::flows::TcpFlags(ztrust_common::tcp_flags::SYN),
        policies: vec![],
        allowed_by: None,
        new_connection: true,
        bytes: 60,
        service: None,
    }
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    get_accepting(addr, path, "*/*").await
}

async fn get_accepting(addr: std::net::SocketAddr, path: &str, accept: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Parses `name{labels} value` sample lines of the text format into (series, value).
fn samples(body: &str) -> Vec<(String, f64)> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn scrape() {
    let m = Arc::new(Metrics::new(MetricsOptions::default()));
    for _ in 0..3 {
        m.observe_flow(&drop_in("shop"));
    }
    m.observe_flow(&drop_in("payments"));
    m.observe_sync(0.002, 10);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let health = ztrust_agent::health::Health::default();
    let server = tokio::spawn(metrics::serve(m.clone(), health.clone(), listener, async move {
        let _ = stopped.await;
    }));
    // A scraper that asks for OpenMetrics (as Prometheus does) gets it; others get the classic text format,
    // whose counter HELP/TYPE lines carry the `_total` suffix.
    let classic = get(addr, "/metrics").await;
    assert!(
        classic
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{classic}"
    );
    assert!(
        classic.contains("# TYPE ztrust_drop_events_total counter") && !classic.contains("# EOF"),
        "{classic}"
    );
    let response = get_accepting(addr, "/metrics", "application/openmetrics-text;version=1.0.0").await;
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    let s = samples(body);
    let value = |series: &str| s.iter().find(|(k, _)| k == series).map(|(_, v)| *v);
    let shop = r#"{verdict="dropped",direction="egress",reason="policy-denied",namespace="shop"}"#;
    let pay = r#"{verdict="dropped",direction="egress",reason="policy-denied",namespace="payments"}"#;
    assert_eq!(
        value(&format!("ztrust_drop_events_total{shop}")),
        Some(3.0),
        "{body}"
    );
    assert_eq!(value(&format!("ztrust_drop_events_total{pay}")), Some(1.0));
    assert_eq!(value("ztrust_flows_seen_total"), Some(4.0));
    assert_eq!(value("ztrust_policy_sync_writes_total"), Some(10.0));
    assert_eq!(value("ztrust_policy_sync_duration_seconds_count"), Some(1.0));
    // Every sample carries the prefix.
    assert!(s.iter().all(|(k, _)| k.starts_with("ztrust_")), "{body}");
    assert!(get(addr, "/healthz").await.ends_with("ok\n"));
    // Not ready until the agent has synced its maps.
    assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
    health.set_ready();
    assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
