//! Audit mode for safe roll-out (root only; `cargo xtask test` runs it): a namespace annotated
//! `ztrust.io/mode: audit` drops nothing and reports what enforcement would drop as `would-drop`;
//! switching it back to enforce takes effect without restarting anything.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::payments::{PaymentsLab, enter};
use crate::common::{agent_bin, flow_in_log, require_root};
use ztrust_agent::model::Protocol;
use ztrust_lab::{self as lab, Matrix, ProbeOptions, Verdict};

fn namespace(mode: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: payments\n  labels:\n    kubernetes.io/metadata.name: payments\n    team: payments\n  annotations:\n    ztrust.io/mode: {mode}\n"
    )
}

fn frontend_to_database(m: &Matrix) -> Option<Verdict> {
    m.verdict("payments/frontend", "payments/database", 5432, Protocol::Tcp)
}

#[test]
fn audit_namespace_reports_would_drop_and_switches_back_live() {
    require_root();
    let mut lab = PaymentsLab::up("zta", agent_bin(), &["--metrics-addr", "none"]);
    let opts = ProbeOptions {
        timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let enforced = lab::probe(&lab.state_dir, &opts).unwrap();
    assert_eq!(frontend_to_database(&enforced), Some(Verdict::Denied));

    // Audit: the same policies, nothing dropped, the would-be drops reported.
    let ns_file = lab.state_dir.join("payments-ns.yaml");
    std::fs::write(&ns_file, namespace("audit")).unwrap();
    lab.apply(&ns_file);
    probe_until(&lab, &opts, Verdict::Allowed, "audit mode drops nothing");
    let (would_drop, _) = flow_in_log(
        &lab.agent().flow_log,
        "a would-drop flow for frontend -> database:5432",
        |f| {
            f["verdict"] == "would-drop"
                && f["source"]["pod"] == "frontend"
                && f["destination"]["pod"] == "database"
                && f["destination"]["port"] == 5432
        },
    );
    assert_eq!(would_drop["reason"], "policy-denied");
    assert!(
        would_drop["policies"].as_array().is_some_and(|p| !p.is_empty()),
        "{would_drop}"
    );

    // Back to enforce, live.
    std::fs::write(&ns_file, namespace("enforce")).unwrap();
    lab.apply(&ns_file);
    let again = probe_until(&lab, &opts, Verdict::Denied, "enforcing again without a restart");
    assert!(
        again.diff(&enforced).is_empty(),
        "same matrix as before the audit:\n{}",
        again.diff(&enforced).render()
    );
}

/// The lab's matrix once frontend → database:5432 gets `want` (probed again for up to 10 s: `apply`
/// waits for the agent to compile, and the kernel's maps follow a moment later on a loaded machine).
fn probe_until(lab: &PaymentsLab, opts: &ProbeOptions, want: Verdict, what: &str) -> Matrix {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = lab::probe(&lab.state_dir, opts).unwrap();
        let got = frontend_to_database(&m);
        if got == Some(want) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: frontend → database:5432 is {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A default deny for `monitoring`, audited or enforced.
fn monitoring_deny_all(mode: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny-all\n  namespace: monitoring\n  annotations:\n    ztrust.io/mode: {mode}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress, Egress]\n"
    )
}

fn prometheus_to_backend(m: &Matrix) -> Option<Verdict> {
    m.verdict("monitoring/prometheus", "payments/backend", 8080, Protocol::Tcp)
}

/// `ztrust.io/mode: audit` on one NetworkPolicy: where it alone isolates a pod's direction, what it
/// denies passes as would-drop; where an enforced policy isolates it too, it changes nothing; switched
/// to enforce, it drops, without a restart.
#[test]
fn an_audited_policy_reports_would_drop_where_it_alone_isolates_and_switches_live() {
    require_root();
    let mut lab = PaymentsLab::up("ztp", agent_bin(), &["--metrics-addr", "none"]);
    let opts = ProbeOptions {
        timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let enforced = lab::probe(&lab.state_dir, &opts).unwrap();
    assert_eq!(
        prometheus_to_backend(&enforced),
        Some(Verdict::Allowed),
        "the scrape path is open"
    );
    assert_eq!(frontend_to_database(&enforced), Some(Verdict::Denied));

    // Audited alone: monitoring's pods isolated by an audited deny-all only.
    let file = lab.state_dir.join("monitoring-deny-all.yaml");
    std::fs::write(&file, monitoring_deny_all("audit")).unwrap();
    lab.apply(&file);
    let audited = lab::probe(&lab.state_dir, &opts).unwrap();
    assert!(
        audited.diff(&enforced).is_empty(),
        "an audited policy drops nothing:\n{}",
        audited.diff(&enforced).render()
    );
    let (would_drop, flows) = flow_in_log(
        &lab.agent().flow_log,
        "a would-drop flow for prometheus -> backend at prometheus' egress",
        |f| {
            f["verdict"] == "would-drop"
                && f["source"]["pod"] == "prometheus"
                && f["destination"]["pod"] == "backend"
                && f["direction"] == "egress"
        },
    );
    assert_eq!(would_drop["reason"], "policy-denied");
    assert_eq!(
        would_drop["policies"],
        serde_json::json!(["monitoring/deny-all"]),
        "{would_drop}"
    );
    let payments_would_drop = flows
        .iter()
        .filter(|f| f["verdict"] == "would-drop")
        .filter(|f| f["endpoint"].as_str().is_some_and(|e| e.starts_with("payments/")))
        .count();
    assert_eq!(
        payments_would_drop, 0,
        "payments' enforced policies are not audited"
    );

    // Beside enforced ones: payments' default deny audited changes nothing, its other policies isolate.
    let payments_default_deny = std::fs::read_to_string(
        crate::common::payments::payments().join("policies/00-default-deny-all.yaml"),
    )
    .unwrap()
    .replace(
        "  namespace: payments\n",
        "  namespace: payments\n  annotations:\n    ztrust.io/mode: audit\n",
    );
    assert!(
        payments_default_deny.contains("ztrust.io/mode: audit"),
        "{payments_default_deny}"
    );
    let pdd = lab.state_dir.join("payments-default-deny.yaml");
    std::fs::write(&pdd, &payments_default_deny).unwrap();
    lab.apply(&pdd);
    let beside = lab::probe(&lab.state_dir, &opts).unwrap();
    assert_eq!(
        frontend_to_database(&beside),
        Some(Verdict::Denied),
        "enforced policies still isolate the frontend"
    );

    // Enforced, live: the deny-all drops prometheus' scrape.
    std::fs::write(&file, monitoring_deny_all("enforce")).unwrap();
    lab.apply(&file);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = lab::probe(&lab.state_dir, &opts).unwrap();
        if prometheus_to_backend(&m) == Some(Verdict::Denied) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "enforce never took effect");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// monitoring's egress isolated by an audited policy only, its ingress by an enforced one.
fn monitoring_split(egress_mode: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny-ingress\n  namespace: monitoring\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny-egress\n  namespace: monitoring\n  annotations:\n    ztrust.io/mode: {egress_mode}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n"
    )
}

/// One line sent on `conn` and read back (the lab's servers echo), within the read timeout.
fn exchange(conn: &mut (BufReader<TcpStream>, TcpStream), msg: &str) -> Result<(), String> {
    writeln!(conn.1, "{msg}").map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    conn.0.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    if line.trim_end() == msg {
        Ok(())
    } else {
        Err(format!("echo {line:?} for {msg:?}"))
    }
}

/// A connection only an audited policy would drop is tracked like an admitted one: its replies reach
/// the pod through the pod's other direction even where an enforced policy isolates that direction
/// (they are the connection's, not new flows). When the audited policy is enforced, the connection is
/// judged again and ends; it does not keep what audit let it have.
#[test]
fn a_would_drop_connection_is_tracked_and_ends_when_enforced() {
    require_root();
    let mut lab = PaymentsLab::up("ztw", agent_bin(), &["--metrics-addr", "none"]);
    let opts = ProbeOptions {
        timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let file = lab.state_dir.join("monitoring-split.yaml");
    std::fs::write(&file, monitoring_split("audit")).unwrap();
    lab.apply(&file);
    let m = lab::probe(&lab.state_dir, &opts).unwrap();
    assert_eq!(
        prometheus_to_backend(&m),
        Some(Verdict::Allowed),
        "the audited egress lets the scrape through, and its replies pass the enforced ingress"
    );
    // Positive control: the ingress is enforced (nothing reaches prometheus).
    let to_prometheus: Vec<_> = m
        .probes
        .iter()
        .filter(|p| p.to == "monitoring/prometheus" && p.from != p.to)
        .collect();
    assert!(!to_prometheus.is_empty(), "the matrix probes prometheus");
    for p in &to_prometheus {
        assert_eq!(p.result, Verdict::Denied, "{} -> prometheus:{}", p.from, p.port);
    }

    // A held connection, opened while audited: data both ways.
    let (prometheus, backend) = (lab.pod("prometheus"), lab.pod("backend"));
    let dst = SocketAddr::new(backend.ips.iter().find(|a| a.is_ipv4()).copied().unwrap(), 8080);
    let netns = prometheus.netns.clone();
    let (to_conn, conn_rx) = std::sync::mpsc::channel::<String>();
    let (result_tx, results) = std::sync::mpsc::channel::<Result<(), String>>();
    let holder = std::thread::spawn(move || {
        enter(&netns);
        let s =
            TcpStream::connect_timeout(&dst, Duration::from_secs(1)).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut conn = (BufReader::new(s.try_clone().unwrap()), s);
        let mut greeting = String::new();
        conn.0
            .read_line(&mut greeting)
            .map_err(|e| format!("greeting: {e}"))?;
        for msg in conn_rx {
            result_tx.send(exchange(&mut conn, &msg)).unwrap();
        }
        Ok::<(), String>(())
    });
    to_conn.send("while audited".into()).unwrap();
    assert_eq!(
        results.recv().unwrap(),
        Ok(()),
        "the audited connection carries data"
    );
    flow_in_log(
        &lab.agent().flow_log,
        "prometheus -> backend:8080 reported as would-drop by monitoring/deny-egress",
        |f| {
            f["verdict"] == "would-drop"
                && f["direction"] == "egress"
                && f["source"]["pod"] == "prometheus"
                && f["destination"]["pod"] == "backend"
                && f["destination"]["port"] == 8080
                && f["policies"] == serde_json::json!(["monitoring/deny-egress"])
        },
    );

    // Enforced: new connections are dropped, and so is the held one's next segment.
    std::fs::write(&file, monitoring_split("enforce")).unwrap();
    lab.apply(&file);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while prometheus_to_backend(&lab::probe(&lab.state_dir, &opts).unwrap()) != Some(Verdict::Denied) {
        assert!(std::time::Instant::now() < deadline, "enforce never took effect");
        std::thread::sleep(Duration::from_millis(200));
    }
    to_conn.send("once enforced".into()).unwrap();
    let after = results.recv().unwrap();
    assert!(
        after.is_err(),
        "the connection audit let through outlived enforcement"
    );
    drop(to_conn);
    let _ = holder.join();
}
