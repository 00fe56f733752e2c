//! `ztrust-agent flows` / `alerts` (the real binary) against a flow API served by this test; what the
//! binary does not have (the lab).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use ztrust_agent::flows::{Endpoint, Flow};
use ztrust_agent::observer::{Hub, HubOptions, server};

fn flow(i: u16, verdict: &str) -> Flow {
    let ep = |ip: String, port, ns: &str, pod: &str| Endpoint {
        ip: ip.parse().unwrap(),
        port: Some(port),
        pod: Some(ztrust_agent::model::ObjectRef::new(ns, pod)),
        labels: BTreeMap::from([("app".to_owned(), pod.to_owned())]),
        identity: 300,
    };
    Flow {
        time: std::time::SystemTime::now(),
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
            format!("10.244.0.{}", 10 + i),
            40000 + i,
            "shop",
            if i.is_multiple_of(2) {
                "web"
            } else {
                "a-much-longer-pod-name"
            },
        ),
        destination: ep("10.244.0.99".into(), 5432, "payments", "database"),
        tcp_flags: ztrust_agent::flows::TcpFlags(ztrust_common::tcp_flags::SYN),
        policies: vec![ztrust_agent::model::ObjectRef::new("payments", "default-deny")],
        allowed_by: None,
        new_connection: true,
        bytes: u32::from(i),
        service: None,
    }
}

fn cli(socket: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ztrust-agent"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .env_remove("ZTRUST_SERVER")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_and_alerts_commands() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let hub = Arc::new(Hub::new(HubOptions {
        node: "lab".into(),
        ..Default::default()
    }));
    let listener = server::bind_unix(&socket).unwrap();
    tokio::spawn(server::serve_unix(
        server::ObserverService::new(hub.clone()),
        listener,
        std::future::pending(),
    ));
    for i in 0..6 {
        hub.publish(flow(i, if i < 4 { "dropped" } else { "forwarded" }));
    }
    let s = socket.clone();
    let (jsonl, table, filtered, alerts) = tokio::task::spawn_blocking(move || {
        (
            cli(&s, &["flows", "-o", "jsonl", "--last", "3"]),
            cli(&s, &["flows", "--denied"]),
            cli(
                &s,
                &[
                    "flows",
                    "-o",
                    "jsonl",
                    "--denied",
                    "--from-pod",
                    "shop/a-much",
                    "--to-ip",
                    "10.244.0.0/24",
                ],
            ),
            cli(&s, &["alerts", "-o", "jsonl"]),
        )
    })
    .await
    .unwrap();

    let flows: Vec<Flow> = jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        flows.iter().map(|f| f.bytes).collect::<Vec<_>>(),
        [3, 4, 5],
        "{jsonl}"
    );
    assert_eq!(flows[0].destination.port, Some(5432));

    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "header + 4 denied:\n{table}");
    assert!(!table.contains('\x1b'), "no colour when stdout is not a terminal");
    let col = |l: &str, s: &str| l.find(s).unwrap_or_else(|| panic!("{s} in {l}"));
    for l in &lines[1..] {
        assert_eq!(
            col(l, "payments/database:5432"),
            col(lines[0], "DESTINATION"),
            "aligned:\n{table}"
        );
        assert_eq!(
            col(l, "policy-denied"),
            col(lines[0], "REASON"),
            "aligned:\n{table}"
        );
    }

    let filtered: Vec<Flow> = filtered
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(filtered.iter().map(|f| f.bytes).collect::<Vec<_>>(), [1, 3]);
    assert!(alerts.is_empty(), "no alerts raised: {alerts}");
}

#[test]
fn flow_log_fallback_uses_the_same_filters() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("flows.jsonl");
    let text: String = (0..6)
        .map(|i| serde_json::to_string(&flow(i, if i < 4 { "dropped" } else { "forwarded" })).unwrap() + "\n")
        .collect();
    std::fs::write(&log, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ztrust-agent"))
        .args(["flows", "-o", "jsonl", "--verdict", "forwarded", "--flow-log"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let flows: Vec<Flow> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(flows.iter().map(|f| f.bytes).collect::<Vec<_>>(), [4, 5]);
}

#[test]
fn a_missing_agent_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ztrust-agent"))
        .args(["flows", "--socket"])
        .arg(dir.path().join("nobody.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no agent answers on") && err.contains("nobody.sock"),
        "{err}"
    );
}

/// The DaemonSet's binary carries no lab: `lab` is no subcommand of it (the lab is `ztrust-lab`).
#[test]
fn the_agent_binary_has_no_lab() {
    let out = Command::new(env!("CARGO_BIN_EXE_ztrust-agent"))
        .args(["lab", "up", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unrecognized subcommand 'lab'"), "{stderr}");
    // Positive control: a real subcommand of the same binary parses.
    let help = Command::new(env!("CARGO_BIN_EXE_ztrust-agent"))
        .args(["flows", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success(), "{}", String::from_utf8_lossy(&help.stderr));
}
