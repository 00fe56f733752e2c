//! The observer end to end in the lab (root only; `cargo xtask test` runs it): a real port scanner
//! (nmap) from a compromised frontend raises a scan alert within two seconds naming the frontend, while
//! legitimate frontend → backend traffic raises none; a real Prometheus server scrapes the agent and a
//! PromQL query returns the drop count the agent reported; `promtool check metrics` accepts the
//! exposition; a flood of denied packets on one 5-tuple raises the packet counter Prometheus scrapes by
//! exactly its size, and the drop events by the kernel's rate-limited few.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::payments::PaymentsLab;
use crate::common::{agent_bin, require_root};
const METRICS: &str = "127.0.0.1:19965";
const PROMETHEUS: &str = "127.0.0.1:19090";

/// Processes the test started (Prometheus), killed when the test ends, before the lab goes down.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `f` on a thread inside a network namespace.
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).expect("netns");
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// A plain HTTP/1.0 GET; the body.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.")
        .then(|| body.to_owned())
        .filter(|_| head.contains(" 200 "))
}

fn alerts(socket: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(agent_bin())
        .args(["alerts", "--socket"])
        .arg(socket)
        .args(["-o", "jsonl"])
        .output()
        .expect("alerts");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn is_scan_from(alert: &serde_json::Value, source: &str) -> bool {
    alert["source"] == source
        && alert["kind"]
            .as_str()
            .is_some_and(|k| k.to_ascii_lowercase().contains("scan"))
}

#[test]
fn scanner_alert_and_prometheus_scrape() {
    require_root();
    assert!(nix::unistd::geteuid().is_root(), "run as root");
    for tool in ["nmap", "prometheus", "promtool"] {
        assert!(
            Command::new("which")
                .arg(tool)
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is missing: `cargo xtask setup` installs it"
        );
    }
    let lab = PaymentsLab::up(
        "zto",
        agent_bin(),
        &[
            "--metrics-addr",
            METRICS,
            "--scan-threshold",
            "10",
            "--scan-window",
            "10s",
            "--sensitive-selector",
            "none",
        ],
    );
    let mut children = Children(Vec::new());
    let state = lab.state.clone();
    let agent = lab.agent();
    let pod = |name: &str| state.pods.iter().find(|p| p.name == name).unwrap().clone();
    let (frontend, backend) = (pod("frontend"), pod("backend"));
    let backend_ip = backend.ips.iter().find(|a| a.is_ipv4()).copied().unwrap();

    // Legitimate traffic: frontend -> backend:8080, many connections. No alert.
    let ok = in_netns(&frontend.netns, move || {
        (0..50)
            .filter(|_| {
                TcpStream::connect_timeout(&SocketAddr::new(backend_ip, 8080), Duration::from_millis(500))
                    .is_ok()
            })
            .count()
    });
    assert_eq!(ok, 50, "frontend -> backend is allowed");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        alerts(&agent.socket).is_empty(),
        "legitimate traffic raised an alert: {:?}",
        alerts(&agent.socket)
    );

    // The compromised frontend scans the backend's ports.
    let started = Instant::now();
    let scan = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", frontend.netns))
        .args([
            "nmap",
            "-sS",
            "-Pn",
            "-n",
            "-T4",
            "--max-retries",
            "0",
            "-p",
            "1-200",
        ])
        .arg(backend_ip.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nmap");
    let mut scan = scan;
    let mut fired = None;
    while started.elapsed() < Duration::from_secs(10) {
        if let Some(a) = alerts(&agent.socket)
            .into_iter()
            .find(|a| is_scan_from(a, "payments/frontend"))
        {
            fired = Some((started.elapsed(), a));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (after, alert) = fired.expect("no scan alert within 10 s");
    // The CLI over the agent's socket shows the scan's denied flows, with their reason and policies.
    let out = Command::new(agent_bin())
        .args([
            "flows",
            "--denied",
            "--from-pod",
            "payments/frontend",
            "--to-pod",
            "payments/backend",
            "--last",
            "500",
            "-o",
            "jsonl",
            "--socket",
        ])
        .arg(&agent.socket)
        .output()
        .expect("flows");
    let flows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        flows.len() >= 10,
        "denied scan flows over gRPC: {} ({})",
        flows.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        flows
            .iter()
            .all(|f| f.to_string().contains("policy-denied") || f.to_string().contains("POLICY_DENIED")),
        "{flows:?}"
    );
    eprintln!("scan alert after {after:?}: {}", alert["summary"]);
    assert!(after < Duration::from_secs(2), "the alert took {after:?}");
    assert!(
        alert["distinct_destinations"].as_u64().unwrap_or(0) >= 10
            || alert["distinctDestinations"].as_u64().unwrap_or(0) >= 10,
        "{alert}"
    );

    // Prometheus scrapes the agent (both in the node's namespace).
    let dir = lab.state_dir.join("prometheus");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ztrust\n    static_configs:\n      - targets: ['{METRICS}']\n"),
    )
    .unwrap();
    let prom = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", state.first_node().name))
        .arg("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus");
    children.0.push(prom);

    // Let the scan finish so the counters settle, then compare what Prometheus says with the flows.
    let deadline = Instant::now() + Duration::from_secs(60);
    while scan.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "nmap did not finish within a minute");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let node = state.first_node().name.clone();
    let exposition = in_netns(&node, || http_get(METRICS, "/metrics")).expect("/metrics");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // The flow log is read again at every try: the agent may still be writing the scan's last flows.
    let drops_in_log = || {
        std::fs::read_to_string(&agent.flow_log)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|f| {
                f["verdict"] == "dropped"
                    && f["endpoint"].as_str().is_some_and(|e| e.starts_with("payments/"))
            })
            .count() as f64
    };
    let query = "/api/v1/query?query=sum(ztrust_drop_events_total%7Bnamespace%3D%22payments%22%7D)";
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    let mut drops_reported;
    loop {
        drops_reported = drops_in_log();
        let node = node.clone();
        if let Some(body) = in_netns(&node, move || http_get(PROMETHEUS, query)) {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let value = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok());
            if value == Some(drops_reported) {
                eprintln!(
                    "PromQL sum(ztrust_drop_events_total{{namespace=\"payments\"}}) = {drops_reported}"
                );
                break;
            }
            last = body;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never returned {drops_reported} drops; last answer: {last}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        drops_reported >= 10.0,
        "the scan was reported as drops ({drops_reported})"
    );

    // A flood on one 5-tuple: every denied packet is in the packet counter Prometheus scrapes, while
    // the flow events of it are as few as the kernel's per-flow rate limit lets through.
    let packets =
        r#"sum(ztrust_datapath_packets_total{namespace="payments",verdict="dropped",direction="egress"})"#;
    let events = r#"sum(ztrust_drop_events_total{namespace="payments",direction="egress"})"#;
    let packets_before = settled(&node, packets);
    let events_before = settled(&node, events);
    const FLOOD: usize = 20_000;
    let started = Instant::now();
    let sent = in_netns(&frontend.netns, move || {
        // UDP to a port the frontend's egress does not allow (only backend:8080/TCP and DNS).
        let socket = std::net::UdpSocket::bind("0.0.0.0:40404").expect("bind");
        socket.connect(SocketAddr::new(backend_ip, 9)).expect("connect");
        let mut sent = 0;
        for i in 0..FLOOD {
            if socket.send(b"ztrust flood").is_ok() {
                sent += 1;
            }
            // Paced well under the veth's receive backlog (1,000 packets), which drops before any hook.
            if i % 200 == 199 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sent
    });
    let took = started.elapsed();
    assert_eq!(sent, FLOOD, "every datagram of the flood was sent");
    let want = packets_before + FLOOD as f64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let packets_after = loop {
        let v = prom_value(&node, packets);
        if v == Some(want) || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        packets_after,
        Some(want),
        "PromQL {packets}: {packets_before} before a flood of {FLOOD} denied packets"
    );
    // The events of the flood have reached the counter by now (they are read before a scrape).
    std::thread::sleep(Duration::from_secs(2));
    let flood_events = settled(&node, events) - events_before;
    eprintln!(
        "flood of {FLOOD} denied packets in {took:?}: packet counter +{FLOOD}, drop events +{flood_events}"
    );
    // Established packets are counted in the endpoints' slots, not the hash: they are exported too (the
    // 50 connections to the backend at the start: at least their handshakes' last ACKs and FINs).
    let forwarded = settled(
        &node,
        r#"sum(ztrust_datapath_packets_total{namespace="payments",verdict="forwarded",reason="established"})"#,
    );
    assert!(forwarded >= 100.0, "established packets exported: {forwarded}");
    // One event per flow and --event-interval (1 s): one per started second of the flood, at least one.
    let most = took.as_secs_f64().ceil() + 1.0;
    assert!(
        (1.0..=most).contains(&flood_events),
        "drop events of the flood: {flood_events} (expected 1..={most}: the per-flow rate limit)"
    );
}

/// A PromQL query's single value, asked of the Prometheus server in the node's namespace.
fn prom_value(node: &str, query: &str) -> Option<f64> {
    let encoded: String = query
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '(' | ')' | '.' => c.to_string(),
            c => format!("%{:02X}", c as u32),
        })
        .collect();
    let path = format!("/api/v1/query?query={encoded}");
    let node = node.to_owned();
    let body = in_netns(&node, move || http_get(PROMETHEUS, &path))?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// The query's value once two answers 2 s apart (two scrapes at 1 s) agree.
fn settled(node: &str, query: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = prom_value(node, query);
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let now = prom_value(node, query);
        if let Some(v) = now.filter(|_| now == last) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{query} did not settle: {last:?}, then {now:?}"
        );
        last = now;
    }
}
