//! Flows exported over OTLP to a real OpenTelemetry Collector (root only; `cargo xtask test` builds the
//! collector from `tests/otelcol` and runs this): every flow of the payments lab arrives exactly once,
//! as the log record `flows` would print, with the node as a resource attribute; with the collector
//! stopped, the flows are counted lost (and nothing else suffers: the flow log has them all); restarted,
//! export resumes. Every flow the agent saw is exported or counted lost, none twice. The kernel's
//! packet counters arrive as OTLP metrics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ztrust_agent::cli_flows::{Connect, server_status};
use ztrust_agent::flows::{Flow, render_line};
use ztrust_lab::ProbeOptions;

use crate::common::payments::PaymentsLab;
use crate::common::{agent_bin, require_root};

/// The collector `cargo xtask test` builds (`cargo xtask otelcol` builds it alone).
fn otelcol_bin() -> PathBuf {
    let path = std::env::var_os("ZTRUST_OTELCOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/otelcol/otelcol"));
    assert!(
        path.exists(),
        "no OpenTelemetry Collector at {}: build it with `cargo xtask otelcol` (or set ZTRUST_OTELCOL)",
        path.display()
    );
    path
}

/// A collector in a lab node's network namespace (where its agent runs), receiving OTLP/gRPC on
/// `listen` and writing what it gets to `out` (OTLP JSON, one request per line). Killed on drop.
struct Collector(Child);

impl Collector {
    fn start(node_netns: &str, listen: &str, dir: &Path, out: &Path) -> Collector {
        let config = dir.join("otelcol.yaml");
        std::fs::write(
            &config,
            format!(
                "receivers:\n  otlp:\n    protocols:\n      grpc:\n        endpoint: {listen}\n\
                 exporters:\n  file:\n    path: {}\n    flush_interval: 100ms\n\
                 service:\n  telemetry:\n    metrics:\n      level: none\n  pipelines:\n    logs:\n      receivers: [otlp]\n      exporters: [file]\n    metrics:\n      receivers: [otlp]\n      exporters: [file]\n",
                out.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("otelcol.log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node_netns}"))
            .arg(otelcol_bin())
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the collector");
        let c = Collector(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(dir.join("otelcol.log"))
            .unwrap_or_default()
            .contains("Everything is ready")
        {
            assert!(
                Instant::now() < deadline,
                "the collector did not start: see {}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the collector wrote: each record's flow id, body and attributes, and the resource's.
#[derive(Debug)]
struct Received {
    id: i64,
    body: String,
    attributes: BTreeMap<String, serde_json::Value>,
    node: String,
}

/// What the collector wrote to `out`, once it holds `n` records (the file exporter flushes every
/// 100 ms; within 10 s).
fn received(out: &Path, n: u64) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = read_received(out);
        if got.len() as u64 >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The lines of the collector's output written whole (the file exporter writes through a buffer: a
/// long request may be written in two parts, and the file read between them).
fn complete_lines(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(str::to_owned)
        .collect()
}

fn read_received(out: &Path) -> Vec<Received> {
    let mut all = Vec::new();
    for line in complete_lines(out) {
        let v: serde_json::Value = serde_json::from_str(&line).expect("OTLP JSON");
        // Metrics are in the same file, on lines of their own.
        let Some(resource_logs) = v["resourceLogs"].as_array() else {
            continue;
        };
        for rl in resource_logs {
            let node = rl["resource"]["attributes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["key"] == "k8s.node.name")
                .map(|a| a["value"]["stringValue"].as_str().unwrap().to_owned())
                .unwrap_or_default();
            for sl in rl["scopeLogs"].as_array().unwrap() {
                for r in sl["logRecords"].as_array().unwrap() {
                    let attributes: BTreeMap<String, serde_json::Value> = r["attributes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|a| (a["key"].as_str().unwrap().to_owned(), a["value"].clone()))
                        .collect();
                    let id = attributes["ztrust.flow.id"]["intValue"]
                        .as_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    all.push(Received {
                        id,
                        body: r["body"]["stringValue"].as_str().unwrap().to_owned(),
                        attributes,
                        node: node.clone(),
                    });
                }
            }
        }
    }
    all
}

/// The last value the collector got for the packet counter with these attributes (`None`: none yet).
fn last_packets(out: &Path, want: &[(&str, &str)]) -> Option<u64> {
    let mut last = None;
    for line in complete_lines(out) {
        let v: serde_json::Value = serde_json::from_str(&line).expect("OTLP JSON");
        let Some(resource_metrics) = v["resourceMetrics"].as_array() else {
            continue;
        };
        for m in resource_metrics
            .iter()
            .flat_map(|rm| rm["scopeMetrics"].as_array().unwrap())
            .flat_map(|sm| sm["metrics"].as_array().unwrap())
            .filter(|m| m["name"] == "ztrust.datapath.packets")
        {
            assert_eq!(m["sum"]["isMonotonic"], true, "{m}");
            for p in m["sum"]["dataPoints"].as_array().unwrap() {
                let attrs = p["attributes"].as_array().unwrap();
                let has = |k: &str, v: &str| {
                    attrs
                        .iter()
                        .any(|a| a["key"] == k && a["value"]["stringValue"] == v)
                };
                if want.iter().all(|(k, v)| has(k, v)) {
                    last = Some(p["asInt"].as_str().unwrap().parse().unwrap());
                }
            }
        }
    }
    last
}

/// The agent's flow log, each flow as `flows` prints it.
fn logged(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| render_line(&serde_json::from_str::<Flow>(l).expect("flow log line")))
        .collect()
}

/// (seen, exported, lost because the queue was full, lost because the export failed), once the
/// exporter has dealt with every flow the agent saw and no flow came for half a second (within 20 s).
fn settled(connect: &Connect) -> (u64, u64, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_seen = None;
    loop {
        let s = server_status(connect).expect("status");
        let accounted = s.otlp_exported + s.otlp_lost_queue_full + s.otlp_lost_export_failed;
        if accounted == s.seen_flows && last_seen == Some(s.seen_flows) {
            return (
                s.seen_flows,
                s.otlp_exported,
                s.otlp_lost_queue_full,
                s.otlp_lost_export_failed,
            );
        }
        assert!(
            accounted <= s.seen_flows,
            "flows exported or lost more than once: {s:?}"
        );
        assert!(
            Instant::now() < deadline,
            "the exporter did not account for every flow: {s:?}"
        );
        last_seen = Some(s.seen_flows);
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn flows_reach_a_real_collector_exactly_once_and_losses_are_counted() {
    require_root();
    let lab = PaymentsLab::up(
        "ztl",
        agent_bin(),
        &[
            "--metrics-addr",
            "none",
            "--log-allowed",
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
            "--otlp-metrics-interval",
            "1s",
        ],
    );
    let node_netns = lab.state.first_node().name.clone();
    let connect = lab.connect();
    let opts = ProbeOptions {
        timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let dir = lab.state_dir.clone();
    let first_out = dir.join("otlp-1.jsonl");
    let collector = Collector::start(&node_netns, "127.0.0.1:4317", &dir, &first_out);
    // What the agent saw before the collector listened (the lab's start) is accounted for first.
    let (_, _, _, lost_before) = settled(&connect);
    let before = server_status(&connect).unwrap().seen_flows;

    // 1. Running: a probe of the whole matrix; every flow arrives, once, as `flows` shows it.
    ztrust_lab::probe(&lab.state_dir, &opts).unwrap();
    let (seen, exported, full, failed) = settled(&connect);
    assert!(seen > before, "the probe made flows");
    eprintln!("seen {seen} exported {exported} lost before the collector listened {lost_before}");
    assert_eq!(
        (full, failed),
        (0, lost_before),
        "nothing lost while the collector runs"
    );
    let got = received(&first_out, exported);
    assert_eq!(
        got.len() as u64,
        exported,
        "every exported flow is in the collector's output"
    );
    let mut ids: Vec<i64> = got.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), got.len(), "no flow arrived twice");
    // The flow log has every flow, in order: those of the probe follow the `before` the agent saw
    // before it (which may have been lost while the collector did not listen yet).
    let log = logged(&lab.agent().flow_log);
    assert_eq!(log.len() as u64, seen, "one line per flow in the flow log");
    let denied_in_log: Vec<&String> = log[before as usize..]
        .iter()
        .filter(|l| l.contains("DROPPED"))
        .collect();
    assert!(
        !denied_in_log.is_empty(),
        "the payments policies deny some of the matrix"
    );
    let mut bodies: Vec<&str> = got.iter().map(|r| r.body.as_str()).collect();
    for line in &denied_in_log {
        let i = bodies
            .iter()
            .position(|b| b == line)
            .unwrap_or_else(|| panic!("denied flow not at the collector: {line}"));
        bodies.swap_remove(i);
    }
    let database_drop = got
        .iter()
        .find(|r| {
            r.attributes["ztrust.verdict"]["stringValue"] == "dropped"
                && r.attributes.get("ztrust.source.pod").map(|v| &v["stringValue"])
                    == Some(&"frontend".into())
                && r.attributes
                    .get("ztrust.destination.pod")
                    .map(|v| &v["stringValue"])
                    == Some(&"database".into())
        })
        .expect("frontend -> database dropped, at the collector");
    // The lab names its node after the node's network namespace.
    assert_eq!(database_drop.node, node_netns);
    assert_eq!(
        database_drop.attributes["ztrust.reason"]["stringValue"],
        "policy-denied"
    );
    assert_eq!(database_drop.attributes["destination.port"]["intValue"], "5432");
    assert!(
        database_drop.attributes["ztrust.policies"]["arrayValue"]["values"]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "{database_drop:?}"
    );

    // The kernel's packet counters as OTLP metrics: at least one dropped packet for each drop event of
    // payments' pods' egress (events are rate-limited per flow; packets are all counted).
    let drop_events = std::fs::read_to_string(lab.agent().flow_log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|f| {
            f["verdict"] == "dropped"
                && f["direction"] == "egress"
                && f["reason"] == "policy-denied"
                && f["endpoint"].as_str().is_some_and(|e| e.starts_with("payments/"))
        })
        .count() as u64;
    assert!(drop_events > 0);
    let want = [
        ("ztrust.verdict", "dropped"),
        ("ztrust.direction", "egress"),
        ("ztrust.reason", "policy-denied"),
        ("k8s.namespace.name", "payments"),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let packets = loop {
        match last_packets(&first_out, &want) {
            Some(n) if n >= drop_events => break n,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "ztrust.datapath.packets{want:?} = {other:?} at the collector, {drop_events} drop events"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    eprintln!("dropped egress packets of payments' pods at the collector: {packets} ({drop_events} events)");

    // 2. Stopped: the flows are counted lost, the flow log still has them.
    drop(collector);
    let log_before = logged(&lab.agent().flow_log).len();
    ztrust_lab::probe(&lab.state_dir, &opts).unwrap();
    let (seen2, exported2, full2, failed2) = settled(&connect);
    eprintln!(
        "collector down: seen {seen2} exported {exported2} lost {}",
        failed2 + full2
    );
    assert_eq!(
        exported2, exported,
        "nothing exported while the collector is down"
    );
    assert!(failed2 + full2 > failed + full, "the loss is counted");
    assert_eq!(
        (failed2 + full2) - (failed + full),
        seen2 - seen,
        "every flow of the outage is counted lost"
    );
    assert_eq!(
        logged(&lab.agent().flow_log).len() - log_before,
        (seen2 - seen) as usize,
        "the flow log has every flow of the outage"
    );

    // 3. Restarted: export resumes.
    let second_out = dir.join("otlp-2.jsonl");
    let _collector = Collector::start(&node_netns, "127.0.0.1:4317", &dir, &second_out);
    ztrust_lab::probe(&lab.state_dir, &opts).unwrap();
    let (seen3, exported3, full3, failed3) = settled(&connect);
    eprintln!(
        "collector back: seen {seen3} exported {exported3} lost {}",
        failed3 + full3
    );
    assert!(exported3 > exported2, "export resumed");
    let got2 = received(&second_out, exported3 - exported2);
    // Flows sent before the collector listened again (at most the request under way when it came
    // back) are lost; those after it, exported.
    assert_eq!(got2.len() as u64, exported3 - exported2);
    assert_eq!(exported3 + full3 + failed3, seen3);
    assert!(
        got2.iter().all(|r| r.id as u64 > seen2),
        "only flows of after the outage arrive after it"
    );
    let mut bodies: Vec<&str> = got2.iter().map(|r| r.body.as_str()).collect();
    let log = logged(&lab.agent().flow_log);
    for line in log[seen2 as usize..].iter().filter(|l| l.contains("DROPPED")) {
        let i = bodies
            .iter()
            .position(|b| b == line)
            .unwrap_or_else(|| panic!("denied flow of after the outage not at the collector: {line}"));
        bodies.swap_remove(i);
    }
    // The counters went on counting while the collector was away.
    let deadline = Instant::now() + Duration::from_secs(10);
    while last_packets(&second_out, &want).is_none_or(|n| n <= packets) {
        assert!(
            Instant::now() < deadline,
            "the packet counters did not reach the restarted collector higher"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Three nodes, three agents, one collector (on the first node's address, which the others reach over
/// the links between nodes): every denied flow of every node arrives once, with its node; stopped, each
/// agent counts its loss; restarted, every node's export resumes.
#[test]
fn every_denied_flow_of_three_nodes_reaches_one_collector_once_with_its_node() {
    require_root();
    let listen = "10.244.0.1:4317";
    let endpoint = format!("http://{listen}");
    let lab = PaymentsLab::up_on(
        "zto",
        agent_bin(),
        &["--metrics-addr", "none", "--otlp-endpoint", &endpoint],
        ztrust_lab::ProxyMode::default(),
        3,
    );
    assert_eq!(
        lab.state.first_node().ips[0].to_string(),
        listen.split(':').next().unwrap(),
        "the collector listens on the first node's address"
    );
    // Each node: its name, its agent's socket and flow log.
    let nodes: Vec<(String, Connect, PathBuf)> = lab
        .state
        .agents()
        .map(|(n, a)| {
            let mut c = lab.connect();
            c.socket = a.socket.clone();
            (n.name.clone(), c, a.flow_log.clone())
        })
        .collect();
    assert_eq!(nodes.len(), 3);
    let opts = ProbeOptions {
        timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let dir = lab.state_dir.clone();
    let out = dir.join("otlp-nodes.jsonl");
    let collector = Collector::start(&lab.state.first_node().name, listen, &dir, &out);
    let before: Vec<(u64, u64, u64, u64)> = nodes.iter().map(|(_, c, _)| settled(c)).collect();

    ztrust_lab::probe(&lab.state_dir, &opts).unwrap();
    let after: Vec<(u64, u64, u64, u64)> = nodes.iter().map(|(_, c, _)| settled(c)).collect();
    let exported: u64 = after.iter().map(|a| a.1).sum();
    let got = received(&out, exported);
    assert_eq!(
        got.len() as u64,
        exported,
        "every exported flow of every node at the collector"
    );
    let mut keys: Vec<(&str, i64)> = got.iter().map(|r| (r.node.as_str(), r.id)).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), got.len(), "no flow arrived twice");
    for (((node, _, flow_log), b), a) in nodes.iter().zip(&before).zip(&after) {
        assert_eq!(
            (a.2, a.3),
            (b.2, b.3),
            "{node}: nothing lost while the collector runs"
        );
        let mine: Vec<&Received> = got.iter().filter(|r| r.node == *node).collect();
        assert_eq!(
            mine.len() as u64,
            a.1,
            "{node}: its exported flows, with its name"
        );
        let log = logged(flow_log);
        assert_eq!(log.len() as u64, a.0, "{node}: one line per flow in the flow log");
        let denied: Vec<&String> = log[b.0 as usize..]
            .iter()
            .filter(|l| l.contains("DROPPED"))
            .collect();
        assert!(!denied.is_empty(), "{node} denied some of the matrix");
        let mut bodies: Vec<&str> = mine.iter().map(|r| r.body.as_str()).collect();
        for line in &denied {
            let i = bodies
                .iter()
                .position(|b| b == line)
                .unwrap_or_else(|| panic!("{node}: denied flow not at the collector with its node: {line}"));
            bodies.swap_remove(i);
        }
        eprintln!(
            "{node}: seen {} exported {} ({} denied)",
            a.0 - b.0,
            a.1 - b.1,
            denied.len()
        );
    }

    // Stopped: each agent counts its loss; restarted: every node's export resumes.
    drop(collector);
    ztrust_lab::probe(&lab.state_dir, &opts).unwrap();
    let down: Vec<(u64, u64, u64, u64)> = nodes.iter().map(|(_, c, _)| settled(c)).collect();
    for (((node, _, _), a), d) in nodes.iter().zip(&after).zip(&down) {
        assert_eq!(d.1, a.1, "{node}: nothing exported while the collector is down");
        assert!(d.0 > a.0, "{node}: the probe made flows");
        assert_eq!(
            (d.2 + d.3) - (a.2 + a.3),
            d.0 - a.0,
            "{node}: every flow of the outage counted lost"
        );
    }
    let out2 = dir.join("otlp-nodes-2.jsonl");
    let _collector = Collector::start(&lab.state.first_node().name, listen, &dir, &out2);
    ztrust_lab::probe(&lab.state_dir, &opts).unwrap();
    let back: Vec<(u64, u64, u64, u64)> = nodes.iter().map(|(_, c, _)| settled(c)).collect();
    let resumed: u64 = back.iter().zip(&down).map(|(b, d)| b.1 - d.1).sum();
    let got2 = received(&out2, resumed);
    for (((node, _, _), d), b) in nodes.iter().zip(&down).zip(&back) {
        assert!(b.1 > d.1, "{node}: export resumed");
        assert_eq!(
            got2.iter().filter(|r| r.node == *node).count() as u64,
            b.1 - d.1,
            "{node}: what it exported after the outage, at the collector"
        );
    }
}
