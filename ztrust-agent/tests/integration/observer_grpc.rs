//! The flow API end to end over a unix socket in a temporary directory: no privileges, no kernel.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt as _;
use tokio_stream::StreamExt as _;
use ztrust_agent::flows::{Endpoint, Flow};
use ztrust_agent::observer::client::connect_unix;
use ztrust_agent::observer::proto::get_flows_response::ResponseTypes;
use ztrust_agent::observer::proto::{
    FlowFilter, GetAlertsRequest, GetFlowsRequest, LostEventSource, ServerStatusRequest, Verdict,
    get_alerts_response,
};
use ztrust_agent::observer::{Hub, HubOptions, server};

fn flow(i: u32, verdict: &str, dst_port: u16) -> Flow {
    let ep = |ip: String, port, ns: &str, pod: String, app: &str| Endpoint {
        ip: ip.parse().unwrap(),
        port: Some(port),
        pod: Some(ztrust_agent::model::ObjectRef::new(ns, pod)),
        labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
        identity: 300,
    };
    Flow {
        time: SystemTime::now(),
        node: "lab".into(),
        verdict: ztrust_agent::flows::Verdict::from_name(verdict).expect("a verdict"),
        direction: ztrust_agent::flows::Direction::Ingress,
        reason: if verdict == "forwarded" {
            ztrust_agent::flows::Reason::AllowedByPolicy
        } else {
            ztrust_agent::flows::Reason::PolicyDenied
        },
        endpoint: ztrust_agent::flows::JudgedAt::Pod(ztrust_agent::model::ObjectRef::new(
            "payments", "database",
        )),
        protocol: ztrust_agent::flows::IpProtocol::TCP,
        source: ep(
            format!("10.244.0.{}", 10 + i % 5),
            40000,
            "shop",
            format!("web-{}", i % 5),
            "web",
        ),
        destination: ep(
            "10.244.0.99".into(),
            dst_port,
            "payments",
            "database".into(),
            "database",
        ),
        tcp_flags: ztrust_agent::flows::TcpFlags(ztrust_common::tcp_flags::SYN),
        policies: if verdict == "forwarded" {
            vec![]
        } else {
            vec![ztrust_agent::model::ObjectRef::new("payments", "default-deny")]
        },
        allowed_by: None,
        new_connection: true,
        bytes: 60 + i,
        service: None,
    }
}

struct Server {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    hub: Arc<Hub>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start(opts: HubOptions) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/agent.sock");
    let hub = Arc::new(Hub::new(opts));
    let listener = server::bind_unix(&socket).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::serve_unix(
        server::ObserverService::new(hub.clone()),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    Server {
        _dir: dir,
        socket,
        hub,
        stop: Some(stop),
    }
}

fn opts(flow_buffer: usize, client_queue: usize) -> HubOptions {
    HubOptions {
        node: "lab".into(),
        flow_buffer,
        client_queue,
        alert_buffer: 16,
    }
}

async fn collect(
    client: &mut ztrust_agent::observer::proto::observer_client::ObserverClient<tonic::transport::Channel>,
    req: GetFlowsRequest,
) -> Vec<ResponseTypes> {
    let mut stream = client.get_flows(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(r) = stream.next().await {
        out.push(r.unwrap().response_types.unwrap());
    }
    out
}

fn bytes_of(items: &[ResponseTypes]) -> Vec<u32> {
    items
        .iter()
        .filter_map(|r| {
            if let ResponseTypes::Flow(f) = r {
                Some(f.bytes)
            } else {
                None
            }
        })
        .collect()
}

#[tokio::test]
async fn number_filters_and_status() {
    let srv = start(opts(100, 64)).await;
    for i in 0..10 {
        srv.hub
            .publish(flow(i, if i % 2 == 0 { "dropped" } else { "forwarded" }, 5432));
    }
    let mut c = connect_unix(&srv.socket).await.unwrap();

    // Last 3 of everything.
    let items = collect(
        &mut c,
        GetFlowsRequest {
            number: 3,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(bytes_of(&items), [67, 68, 69]);
    let ResponseTypes::Flow(f) = &items[0] else {
        panic!()
    };
    let dropped = Verdict::Dropped as i32;
    assert_eq!(f.source.as_ref().unwrap().pod_name, "web-2");
    assert_eq!(f.destination.as_ref().unwrap().port, 5432);
    assert_eq!(f.verdict(), Verdict::Forwarded);
    // A reader of the first version gets the text forms beside the typed ones; `typed_only` the typed
    // ones alone, which read back to the same flow.
    assert!(!f.endpoint.is_empty() && !f.protocol.is_empty());
    assert!(matches!(
        f.judged_at,
        Some(ztrust_agent::observer::proto::flow::JudgedAt::JudgedPod(_))
    ));
    let typed = collect(
        &mut c,
        GetFlowsRequest {
            number: 3,
            typed_only: true,
            ..Default::default()
        },
    )
    .await;
    let ResponseTypes::Flow(t) = &typed[0] else {
        panic!()
    };
    assert!(t.endpoint.is_empty() && t.protocol.is_empty() && t.ip_protocol.is_some());
    assert_eq!(
        ztrust_agent::observer::convert::flow_from_proto(t),
        ztrust_agent::observer::convert::flow_from_proto(f)
    );

    // Dropped from web-0, or anything from web-2 (whitelist filters OR, fields within one AND), but
    // nothing forwarded (blacklist).
    let req = GetFlowsRequest {
        whitelist: vec![
            FlowFilter {
                verdict: vec![dropped],
                source_pod: vec!["shop/web-0".into()],
                ..Default::default()
            },
            FlowFilter {
                source_pod: vec!["shop/web-2".into()],
                ..Default::default()
            },
        ],
        blacklist: vec![FlowFilter {
            verdict: vec![Verdict::Forwarded as i32],
            ..Default::default()
        }],
        ..Default::default()
    };
    assert_eq!(bytes_of(&collect(&mut c, req).await), [60, 62]);

    // Label selectors and CIDRs.
    let req = GetFlowsRequest {
        whitelist: vec![FlowFilter {
            source_label: vec!["app=web".into()],
            source_ip: vec!["10.244.0.11/32".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    assert_eq!(bytes_of(&collect(&mut c, req).await), [61, 66]);

    // A bad filter is an error, not an empty answer.
    let bad = GetFlowsRequest {
        whitelist: vec![FlowFilter {
            destination_port: vec!["http".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let Err(err) = c.get_flows(bad).await else {
        panic!("an invalid filter is refused")
    };
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // since / until.
    let future = ztrust_agent::observer::convert::timestamp(SystemTime::now() + Duration::from_secs(60));
    let req = GetFlowsRequest {
        since: Some(future),
        ..Default::default()
    };
    assert!(collect(&mut c, req).await.is_empty());
    let past = ztrust_agent::observer::convert::timestamp(SystemTime::now() - Duration::from_secs(60));
    let req = GetFlowsRequest {
        until: Some(past),
        follow: true,
        ..Default::default()
    };
    assert!(
        collect(&mut c, req).await.is_empty(),
        "until in the past ends even a follow"
    );

    let st = c
        .server_status(ServerStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((st.seen_flows, st.num_flows, st.max_flows), (10, 10, 100));
    assert_eq!(st.node_name, "lab");
    assert!(st.uptime_ns > 0);
}

#[tokio::test]
async fn ring_overwrites_are_reported() {
    let srv = start(opts(4, 64)).await;
    for i in 0..10 {
        srv.hub.publish(flow(i, "dropped", 80));
    }
    let mut c = connect_unix(&srv.socket).await.unwrap();
    let items = collect(
        &mut c,
        GetFlowsRequest {
            number: 6,
            ..Default::default()
        },
    )
    .await;
    assert!(
        matches!(&items[0], ResponseTypes::LostEvents(l) if l.source() == LostEventSource::AgentRing && l.num_events_lost == 2),
        "{items:?}"
    );
    assert_eq!(bytes_of(&items), [66, 67, 68, 69]);
}

#[tokio::test]
async fn follow_gets_history_then_new_flows() {
    let srv = start(opts(100, 64)).await;
    srv.hub.publish(flow(0, "dropped", 80));
    srv.hub.publish(flow(1, "dropped", 443));
    let mut c = connect_unix(&srv.socket).await.unwrap();
    let req = GetFlowsRequest {
        number: 1,
        follow: true,
        whitelist: vec![FlowFilter {
            destination_port: vec!["443".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut stream = c.get_flows(req).await.unwrap().into_inner();
    async fn next(
        s: &mut tonic::Streaming<ztrust_agent::observer::proto::GetFlowsResponse>,
    ) -> ztrust_agent::observer::proto::GetFlowsResponse {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("timely")
            .unwrap()
            .unwrap()
    }
    let first = next(&mut stream).await;
    assert!(matches!(first.response_types, Some(ResponseTypes::Flow(f)) if f.bytes == 61));
    srv.hub.publish(flow(2, "dropped", 80));
    srv.hub.publish(flow(3, "dropped", 443));
    let second = next(&mut stream).await;
    assert!(
        matches!(second.response_types, Some(ResponseTypes::Flow(f)) if f.bytes == 63),
        "port 80 filtered out"
    );
    drop(stream);
    // The server forgets the stream once the client is gone.
    for _ in 0..100 {
        srv.hub.publish(flow(4, "dropped", 80));
        if srv.hub.status().subscribers == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("subscription leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_loses_flows_is_told_and_does_not_slow_others() {
    const TOTAL: u32 = 6_000;
    let srv = start(opts(100_000, 256)).await;
    let mut slow = connect_unix(&srv.socket).await.unwrap();
    let mut slow_stream = slow
        .get_flows(GetFlowsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut fast = connect_unix(&srv.socket).await.unwrap();
    let mut fast_stream = fast
        .get_flows(GetFlowsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Both subscriptions are registered before anything is published.
    while srv.hub.status().subscribers < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The fast client counts what it receives; the publisher waits for it after each batch (smaller
    // than a client queue), so the fast client can never fall behind, while the slow one never reads.
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = received.clone();
    let fast_reader = tokio::spawn(async move {
        let (mut flows, mut lost) = (0u64, 0u64);
        while flows + lost < u64::from(TOTAL) {
            match fast_stream.next().await.unwrap().unwrap().response_types.unwrap() {
                ResponseTypes::Flow(_) => flows += 1,
                ResponseTypes::LostEvents(l) => lost += l.num_events_lost,
            }
            counter.store(flows + lost, std::sync::atomic::Ordering::Relaxed);
        }
        (flows, lost)
    });
    // Payload large enough that the slow client's socket and HTTP/2 windows fill quickly.
    let mut big = flow(0, "dropped", 80);
    big.policies = (0..40)
        .map(|i| ztrust_agent::model::ObjectRef::new("payments", format!("policy-with-a-long-name-{i}")))
        .collect();
    for i in 0..TOTAL {
        let mut f = big.clone();
        f.bytes = i;
        srv.hub.publish(f);
        if i % 100 == 99 {
            let started = std::time::Instant::now();
            while received.load(std::sync::atomic::Ordering::Relaxed) < u64::from(i + 1) {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "the fast client is stuck at {i}"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    let (fast_flows, fast_lost) = tokio::time::timeout(Duration::from_secs(60), fast_reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (fast_flows, fast_lost),
        (u64::from(TOTAL), 0),
        "the fast client got everything"
    );

    // Now the slow client reads: what it got plus what it was told it lost is everything.
    let (mut flows, mut lost, mut last) = (0u64, 0u64, None);
    while flows + lost < u64::from(TOTAL) {
        let item = tokio::time::timeout(Duration::from_secs(10), slow_stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match item.response_types.unwrap() {
            ResponseTypes::Flow(f) => {
                assert!(last.is_none_or(|l| f.bytes > l), "in order");
                last = Some(f.bytes);
                flows += 1;
            }
            ResponseTypes::LostEvents(l) => {
                assert_eq!(l.source(), LostEventSource::SlowClient);
                lost += l.num_events_lost;
            }
        }
    }
    assert_eq!(flows + lost, u64::from(TOTAL));
    assert!(lost > 0, "the slow client lost flows");
    assert_eq!(srv.hub.status().lost_slow_clients, lost);
}

#[tokio::test]
async fn garbage_and_half_open_connections_do_not_hurt_others() {
    let srv = start(opts(100, 64)).await;
    srv.hub.publish(flow(0, "dropped", 80));
    // A half-open connection that never says anything, one that sends an HTTP/1 request, one that
    // sends random bytes, and one that sends a valid HTTP/2 preface and then garbage frames.
    let _silent = tokio::net::UnixStream::connect(&srv.socket).await.unwrap();
    let mut http1 = tokio::net::UnixStream::connect(&srv.socket).await.unwrap();
    http1
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut noise = tokio::net::UnixStream::connect(&srv.socket).await.unwrap();
    let junk: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = noise.write_all(&junk).await;
    let mut bad_frames = tokio::net::UnixStream::connect(&srv.socket).await.unwrap();
    let _ = bad_frames
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff")
        .await;
    let _ = bad_frames.write_all(&junk[..4096]).await;

    let mut c = connect_unix(&srv.socket).await.unwrap();
    let items = tokio::time::timeout(
        Duration::from_secs(10),
        collect(&mut c, GetFlowsRequest::default()),
    )
    .await
    .unwrap();
    assert_eq!(bytes_of(&items), [60]);
    let st = c
        .server_status(ServerStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.seen_flows, 1);
}

#[tokio::test]
async fn alerts_stream() {
    let srv = start(opts(100, 64)).await;
    let detector =
        ztrust_agent::detector::Detector::new(ztrust_agent::detector::DetectorOptions::default()).unwrap();
    let metrics = Arc::new(ztrust_agent::metrics::Metrics::default());
    tokio::spawn(ztrust_agent::observer::tasks::run_detector(
        srv.hub.clone(),
        detector,
        Some(metrics.clone()),
    ));
    while srv.hub.status().subscribers < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut c = connect_unix(&srv.socket).await.unwrap();
    let mut alerts = c
        .get_alerts(GetAlertsRequest {
            follow: true,
            number: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // A scan of 30 ports from one pod towards a pod without sensitive labels.
    for port in 1..=30 {
        let mut f = flow(0, "dropped", port);
        f.destination.labels.clear();
        srv.hub.publish(f);
    }
    let a = tokio::time::timeout(Duration::from_secs(10), alerts.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(get_alerts_response::ResponseTypes::Alert(a)) = a.response_types else {
        panic!("{a:?}")
    };
    assert_eq!(a.source, "shop/web-0");
    assert_eq!(a.distinct_destinations, 10);
    assert!(!a.evidence.is_empty());
    assert!(metrics.render().contains(r#"ztrust_alerts_total{kind="scan"} 1"#));
    // Kept alerts are replayed to a later client.
    let mut later = c
        .get_alerts(GetAlertsRequest {
            follow: false,
            number: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(later.next().await.is_some());
    assert!(later.next().await.is_none());
}

/// `Explain` over the socket: the server hands the query to its explainer (the agent's loop; here a
/// task answering from a cluster read from manifests) and returns the answer; errors keep their codes.
#[tokio::test]
async fn explain_is_answered_by_the_explainer_with_its_status_codes() {
    use ztrust_agent::explain::{ExplainCall, Query, State, explain};
    use ztrust_agent::observer::explain::{explanation_from_proto, query_to_proto};
    const YAML: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
status: {podIP: 10.244.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
status: {podIP: 10.244.0.11}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]
"#;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let (explainer, mut calls) = tokio::sync::mpsc::channel::<ExplainCall>(1);
    tokio::spawn(async move {
        let cluster = ztrust_agent::source::dir::parse_str("shop.yaml", YAML).cluster;
        let desired = ztrust_agent::policy::Engine::new().compile(&cluster);
        let audit = Default::default();
        while let Some(call) = calls.recv().await {
            let state = State {
                cluster: &cluster,
                desired: &desired,
                node: None,
                audit_namespaces: &audit,
                audit_all: false,
            };
            let _ = call.reply.send(explain(&state, &call.query, None));
        }
    });
    let hub = Arc::new(Hub::new(opts(16, 16)));
    let listener = server::bind_unix(&socket).unwrap();
    let service = server::ObserverService::new(hub.clone()).with_explainer(explainer);
    tokio::spawn(server::serve_unix(service, listener, std::future::pending()));
    let mut client = connect_unix(&socket).await.unwrap();

    let ask = |from: &str, to: &str| query_to_proto(&Query::parse(from, to).unwrap());
    let answer = client
        .explain(ask("shop/web", "shop/db:5432"))
        .await
        .unwrap()
        .into_inner();
    let x = explanation_from_proto(&answer).unwrap();
    assert_eq!(x.verdict, ztrust_agent::flows::Verdict::Forwarded);
    let ingress = x.ends.iter().find(|e| e.pod.to_string() == "shop/db").unwrap();
    assert_eq!(ingress.allowed_by.as_ref().unwrap().policy.to_string(), "shop/db");
    let x = explanation_from_proto(
        &client
            .explain(ask("shop/web", "shop/db:80"))
            .await
            .unwrap()
            .into_inner(),
    )
    .unwrap();
    assert_eq!(x.verdict, ztrust_agent::flows::Verdict::Dropped);

    let e = client
        .explain(ask("shop/nope", "shop/db:5432"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("pod shop/nope"), "{}", e.message());
    let mut bad = ask("shop/web", "shop/db:5432");
    bad.port = 0;
    assert_eq!(
        client.explain(bad).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    // A server without an explainer says so.
    let plain = start(opts(16, 16)).await;
    let mut client = connect_unix(&plain.socket).await.unwrap();
    let e = client.explain(ask("shop/web", "shop/db:5432")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
}
