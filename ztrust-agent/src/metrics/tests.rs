use super::*;
use crate::flows::testing::{allowed, denied};

/// `name{labels} value` lines → value, for the checks below.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn prometheus_text_names_counters_with_their_suffix() {
    let om = "# HELP ztrust_alerts Alerts raised.\n# TYPE ztrust_alerts counter\nztrust_alerts_total{kind=\"scan\"} 1\n\
              # HELP ztrust_endpoints Endpoints.\n# TYPE ztrust_endpoints gauge\n# UNIT ztrust_endpoints x\nztrust_endpoints 3\n# EOF\n";
    let text = to_prometheus_text(om);
    assert_eq!(
        text,
        "# HELP ztrust_alerts_total Alerts raised.\n# TYPE ztrust_alerts_total counter\nztrust_alerts_total{kind=\"scan\"} 1\n\
         # HELP ztrust_endpoints Endpoints.\n# TYPE ztrust_endpoints gauge\nztrust_endpoints 3\n"
    );
}

#[test]
fn flow_counters_by_verdict_direction_reason_namespace() {
    let m = Metrics::default();
    m.observe_flow(&denied());
    m.observe_flow(&denied());
    m.observe_flow(&allowed());
    let text = m.render();
    let drop = r#"{verdict="dropped",direction="ingress",reason="policy-denied",namespace="payments"}"#;
    assert_eq!(
        sample(&text, &format!("ztrust_flow_events_total{drop}")),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("ztrust_drop_events_total{drop}")),
        Some(2.0)
    );
    let fwd = r#"{verdict="forwarded",direction="egress",reason="allowed-by-policy",namespace="shop"}"#;
    assert_eq!(
        sample(&text, &format!("ztrust_flow_events_total{fwd}")),
        Some(1.0)
    );
    assert_eq!(sample(&text, &format!("ztrust_drop_events_total{fwd}")), None);
    assert_eq!(sample(&text, "ztrust_flows_seen_total"), Some(3.0));
    assert!(!text.contains("pod=\""), "no pod label by default");
    assert!(text.trim_end().ends_with("# EOF"));
}

#[test]
fn a_batch_counts_as_its_flows_one_by_one() {
    let flows = [denied(), allowed(), denied(), denied()];
    let (batch, single) = (Metrics::default(), Metrics::default());
    batch.observe_flows(flows.iter());
    for f in &flows {
        single.observe_flow(f);
    }
    // The same series and values (their order within a family is the family's hash order).
    let lines = |m: &Metrics| {
        let mut l: Vec<String> = m.render().lines().map(str::to_owned).collect();
        l.sort();
        l
    };
    assert_eq!(lines(&batch), lines(&single));
    let text = batch.render();
    let drop = r#"{verdict="dropped",direction="ingress",reason="policy-denied",namespace="payments"}"#;
    assert_eq!(
        sample(&text, &format!("ztrust_drop_events_total{drop}")),
        Some(3.0),
        "{text}"
    );
    assert_eq!(sample(&text, "ztrust_flows_seen_total"), Some(4.0));
}

#[test]
fn a_batch_with_many_label_sets_counts_each() {
    let m = Metrics::new(MetricsOptions { pod_label: true });
    let flows: Vec<Flow> = (0..80)
        .map(|i| {
            let mut f = denied();
            f.destination.pod = Some(crate::model::ObjectRef::new("payments", format!("db-{}", i % 40)));
            f
        })
        .collect();
    m.observe_flows(flows.iter());
    let text = m.render();
    for i in [0, 17, 39] {
        let series = format!(
            r#"ztrust_drop_events_total{{verdict="dropped",direction="ingress",reason="policy-denied",namespace="payments",pod="db-{i}"}}"#
        );
        assert_eq!(sample(&text, &series), Some(2.0), "{text}");
    }
}

/// A collector whose answer the test changes between scrapes.
fn packet_source(m: &Metrics) -> Arc<Mutex<Vec<PacketCount>>> {
    let counts = Arc::new(Mutex::new(Vec::new()));
    let shared = counts.clone();
    m.collect_packets(move || shared.lock().unwrap().clone());
    counts
}

fn dropped(namespace: &str, pod: &str, packets: u64) -> PacketCount {
    PacketCount {
        direction: "ingress",
        verdict: "dropped",
        reason: "policy-denied",
        namespace: namespace.into(),
        pod: pod.into(),
        packets,
        bytes: packets * 60,
    }
}

#[test]
fn packet_counters_are_collected_at_each_scrape_summed_by_namespace() {
    let m = Metrics::default();
    let counts = packet_source(&m);
    *counts.lock().unwrap() = vec![
        dropped("payments", "database", 10_000),
        dropped("payments", "backend", 5),
        dropped("payments", "", 7),
        dropped("shop", "cart", 1),
    ];
    let text = m.render();
    let pay = r#"{verdict="dropped",direction="ingress",reason="policy-denied",namespace="payments"}"#;
    let shop = r#"{verdict="dropped",direction="ingress",reason="policy-denied",namespace="shop"}"#;
    assert_eq!(
        sample(&text, &format!("ztrust_datapath_packets_total{pay}")),
        Some(10_012.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("ztrust_datapath_bytes_total{pay}")),
        Some(600_720.0)
    );
    assert_eq!(
        sample(&text, &format!("ztrust_datapath_packets_total{shop}")),
        Some(1.0)
    );
    assert!(!text.contains("pod="), "{text}");
    // The next scrape reads again: the values are the collector's, not added to the last ones.
    counts.lock().unwrap()[0].packets = 10_010;
    let text = m.render();
    assert_eq!(
        sample(&text, &format!("ztrust_datapath_packets_total{pay}")),
        Some(10_022.0)
    );
    // A namespace the collector no longer names has no series.
    counts.lock().unwrap().pop();
    assert!(!m.render().contains(r#"namespace="shop""#));
}

#[test]
fn packet_counters_by_pod_on_request_and_a_departed_pods_series_goes() {
    let m = Metrics::new(MetricsOptions { pod_label: true });
    let counts = packet_source(&m);
    *counts.lock().unwrap() = vec![
        dropped("payments", "database", 3),
        dropped("payments", "backend", 2),
    ];
    let text = m.render();
    let of = |pod: &str| {
        format!(
            r#"ztrust_datapath_packets_total{{verdict="dropped",direction="ingress",reason="policy-denied",namespace="payments",pod="{pod}"}}"#
        )
    };
    assert_eq!(sample(&text, &of("database")), Some(3.0), "{text}");
    assert_eq!(sample(&text, &of("backend")), Some(2.0));
    *counts.lock().unwrap() = vec![dropped("payments", "", 3), dropped("payments", "backend", 2)];
    let text = m.render();
    assert_eq!(sample(&text, &of("database")), None, "{text}");
    assert_eq!(sample(&text, &of("")), Some(3.0));
}

#[test]
fn pod_label_on_request() {
    let m = Metrics::new(MetricsOptions { pod_label: true });
    m.observe_flow(&denied());
    let text = m.render();
    assert!(
        text.contains(r#"namespace="payments",pod="database-0"}"#),
        "{text}"
    );
}

#[test]
fn agent_facing_setters() {
    let m = Metrics::default();
    m.observe_compile(0.003);
    m.observe_sync(0.010, 42);
    m.observe_sync(0.020, 8);
    m.set_endpoints(7);
    m.set_identities(12);
    m.set_map_fill("ZT_POLICY", 100, 1_048_576);
    m.alert_raised("scan");
    assert_eq!(
        sample(&m.render(), r#"ztrust_pods_not_enforced{reason="host_network"}"#),
        Some(0.0)
    );
    m.set_pods_not_enforced("host_network", 2);
    let text = m.render();
    assert_eq!(
        sample(&text, r#"ztrust_pods_not_enforced{reason="host_network"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "ztrust_policy_compile_duration_seconds_count"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ztrust_policy_sync_duration_seconds_count"),
        Some(2.0)
    );
    assert_eq!(sample(&text, "ztrust_policy_sync_writes_total"), Some(50.0));
    assert_eq!(sample(&text, "ztrust_endpoints"), Some(7.0));
    assert_eq!(sample(&text, "ztrust_identities"), Some(12.0));
    assert_eq!(
        sample(&text, r#"ztrust_map_entries{map="ZT_POLICY"}"#),
        Some(100.0)
    );
    assert_eq!(
        sample(&text, r#"ztrust_map_capacity{map="ZT_POLICY"}"#),
        Some(1_048_576.0)
    );
    assert_eq!(sample(&text, r#"ztrust_alerts_total{kind="scan"}"#), Some(1.0));
}

#[test]
fn flow_api_counters_are_mirrored_monotonically() {
    let m = Metrics::default();
    let now = Arc::new(Mutex::new(FlowApiCounters {
        lost_kernel_ring_buffer: 9,
        lost_slow_clients: 3,
        ring_overwritten: 2,
        ring_flows: 2,
        ring_capacity: 2,
        subscribers: 1,
        otlp: None,
    }));
    let read = now.clone();
    m.collect_flow_api(move || *read.lock().unwrap());
    let text = m.render();
    assert_eq!(
        sample(&text, r#"ztrust_flows_lost_total{source="kernel_ring_buffer"}"#),
        Some(9.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"ztrust_flows_lost_total{source="slow_client"}"#),
        Some(3.0)
    );
    assert_eq!(sample(&text, "ztrust_flow_ring_overwritten_total"), Some(2.0));
    assert_eq!(sample(&text, "ztrust_flow_ring_flows"), Some(2.0));
    assert_eq!(sample(&text, "ztrust_flow_ring_capacity"), Some(2.0));
    // A second scrape does not count again; a counter that went back (a new hub) adds nothing.
    let text = m.render();
    assert_eq!(
        sample(&text, r#"ztrust_flows_lost_total{source="kernel_ring_buffer"}"#),
        Some(9.0)
    );
    now.lock().unwrap().lost_kernel_ring_buffer = 12;
    let text = m.render();
    assert_eq!(
        sample(&text, r#"ztrust_flows_lost_total{source="kernel_ring_buffer"}"#),
        Some(12.0)
    );
    assert_eq!(sample(&text, "ztrust_otlp_flows_exported_total"), Some(0.0));
    // Exporting over OTLP: its counters too.
    now.lock().unwrap().otlp = Some(crate::otlp::OtlpStatus {
        exported: 40,
        lost_queue_full: 2,
        lost_export_failed: 5,
    });
    let text = m.render();
    assert_eq!(sample(&text, "ztrust_otlp_flows_exported_total"), Some(40.0));
    assert_eq!(
        sample(&text, r#"ztrust_otlp_flows_lost_total{reason="queue_full"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, r#"ztrust_otlp_flows_lost_total{reason="export_failed"}"#),
        Some(5.0)
    );
}
