//! The cluster tier: the seed's exercise on a real Kubernetes node built from upstream (kube-apiserver,
//! etcd, controller-manager, scheduler, kubelet with containerd and runc, kube-proxy, CoreDNS; CNI ptp +
//! host-local), with the agent deployed as a user deploys it: `kubectl apply -k deploy/`, the image built
//! from the release binary, running under deploy/'s RBAC with its ServiceAccount token.
//!
//! Root-only and needs the cluster, so `#[ignore]`d in plain `cargo test`: `cargo xtask test` starts it
//! (`cargo xtask cluster up --agent`), runs these with `--ignored --test-threads=1`, and stops it. By
//! hand: `cargo xtask cluster up --agent && cargo test -p ztrust-tests --test cluster -- --ignored
//! --test-threads=1`.

mod common;

use std::time::Duration;

use common::cluster::{Cluster, EXT_IP, EXT_NAME, Prometheus};

/// Policy changes reach the kernel within this (the agent polls its watches every 200 ms).
const ENFORCED_WITHIN: Duration = Duration::from_secs(15);

fn url(service: &str) -> String {
    format!("http://{service}.payments.svc.cluster.local")
}

/// Task 2's application, up and answering by Service name; Task 3's flat network: every path the
/// policies will close is open before them (the positive control of every "blocked" below).
fn seed_app_flat(c: &Cluster) {
    c.fresh_namespace("payments");
    c.apply(&common::cluster::seed_app());
    c.ok(&["-n", "payments", "wait", "--for=condition=Available", "deployment", "--all", "--timeout=180s"]);
    for (from, to) in [("frontend", "backend"), ("frontend", "database"), ("backend", "database"), ("database", "frontend")] {
        let page = c
            .wget_until("payments", from, &url(to), true, ENFORCED_WITHIN)
            .unwrap_or_else(|e| panic!("Task 3, flat network: {from} → {to} should pass: {e}"));
        assert!(page.contains(&format!("hello from {to}-")), "{from} → {to}: the page names a {to} pod: {page:?}");
    }
    let page = c
        .wget_until("payments", "database", &format!("http://{EXT_NAME}"), true, ENFORCED_WITHIN)
        .unwrap_or_else(|e| panic!("Task 3, flat network: database → {EXT_NAME} ({EXT_IP}) should pass: {e}"));
    assert!(page.contains(EXT_NAME), "the outside server answered: {page:?}");
}

/// Task 5's five checks, by Service name as the seed runs them.
fn seed_checks(c: &Cluster) {
    for (n, from, to, pass) in [
        (1, "frontend", url("backend"), true),
        (2, "frontend", url("database"), false),
        (3, "backend", url("database"), true),
        (4, "database", url("frontend"), false),
        (5, "database", format!("http://{EXT_NAME}"), false),
    ] {
        let r = c.wget_until("payments", from, &to, pass, ENFORCED_WITHIN);
        match (pass, r) {
            (true, Ok(_)) | (false, Err(_)) => {}
            (true, Err(e)) => panic!("Task 5 test {n}: {from} → {to} should PASS: {e}"),
            (false, Ok(page)) => panic!("Task 5 test {n}: {from} → {to} should be BLOCKED, got {page:?}"),
        }
    }
}

/// Denied flows from pods whose name starts with `from` to `to`: a pod name prefix (the pod itself,
/// or the backend of the Service the connection was to) or an address.
fn denied<'a>(flows: &'a [serde_json::Value], from: &str, to: &str) -> Vec<&'a serde_json::Value> {
    let pod = |e: &serde_json::Value| {
        format!("{}/{}", e["namespace"].as_str().unwrap_or(""), e["pod"].as_str().unwrap_or(""))
    };
    let backends = |f: &serde_json::Value| -> Vec<String> {
        f["service"]["backends"].as_array().into_iter().flatten().filter_map(|b| b.as_str().map(str::to_owned)).collect()
    };
    flows
        .iter()
        .filter(|f| pod(&f["source"]).starts_with(from))
        .filter(|f| {
            pod(&f["destination"]).starts_with(to)
                || backends(f).iter().any(|b| b.starts_with(to))
                || f["destination"]["ip"].as_str() == Some(to)
        })
        .collect()
}

#[test]
#[ignore = "needs the real cluster: cargo xtask cluster up --agent (cargo xtask test runs it)"]
fn seed_exercise_tasks_2_to_5_by_service_name() {
    let c = Cluster::get();
    let agent = c.deploy_agent();
    eprintln!("agent pod {agent} ready");
    seed_app_flat(&c);

    // Task 4, exactly as the seed writes it; DNS by the seed's allow-dns (any destination, port 53).
    c.apply(&common::cluster::seed_policies());
    seed_checks(&c);

    // Visibility: the blocked attempts, named by pod and by the policies that isolate them.
    let flows = c.denied_flows();
    for (from, to, policy) in [
        // Denied on the way out: frontend's egress policies do not allow database.
        ("payments/frontend-", "payments/database-", "frontend-policy"),
        ("payments/database-", "payments/frontend-", "database-policy"),
        ("payments/database-", EXT_IP, "database-policy"),
    ] {
        let hits = denied(&flows, from, to);
        assert!(!hits.is_empty(), "no denied flow {from}* → {to} among {} denied flows: {flows:#?}", flows.len());
        assert!(
            hits.iter().any(|f| f["policies"].as_array().is_some_and(|p| p.iter().any(|p| p.as_str().is_some_and(|p| p.ends_with(policy))))),
            "{from}* → {to}: the flow names {policy}: {hits:#?}"
        );
    }
    // An address in the cluster's Service range (its ServiceCIDR object, read by the agent: deploy/ sets
    // no --service-cidr) that is no Service: dropped as such, not judged as an address.
    let stray = "10.96.200.200";
    assert!(c.wget("payments", "frontend", &format!("http://{stray}/")).is_err());
    let flows = c.denied_flows();
    let hits = denied(&flows, "payments/frontend-", stray);
    assert!(
        hits.iter().any(|f| f["reason"].as_str() == Some("unknown-service")),
        "frontend → {stray} (Service range, no Service) is dropped as unknown-service: {hits:#?}"
    );
    // A real Prometheus finds the agent through the metrics Service and sees the drop counters rise by
    // (at least) the blocked attempts: each is a new connection, so a flow of its own.
    let prometheus = Prometheus::start();
    prometheus.wait_for(r#"up{job="ztrust-agent"}"#, Duration::from_secs(60), |v| v == 1.0);
    let drops = r#"sum(ztrust_drops_total{namespace="payments"})"#;
    let before = prometheus.wait_for(drops, Duration::from_secs(10), |_| true);
    let attempts = 5;
    for _ in 0..attempts {
        assert!(c.wget("payments", "frontend", &url("database")).is_err(), "frontend → database stays blocked");
    }
    let after = prometheus.wait_for(drops, Duration::from_secs(20), |v| v >= before + f64::from(attempts));
    eprintln!("Prometheus: {drops} {before} → {after} over {attempts} blocked attempts");
    drop(prometheus);
    // The table an operator reads.
    let table = c.agent(&["flows", "--denied", "--namespace", "payments", "--all"]);
    eprintln!("{table}");
    assert!(table.contains("svc payments/database:80 → payments/database-"), "the Service and its backend: {table}");
    assert!(table.contains("payments/frontend-policy"), "{table}");
}

#[test]
#[ignore = "needs the real cluster: cargo xtask cluster up --agent (cargo xtask test runs it)"]
fn seed_exercise_with_the_selector_based_dns_rule_of_deploy_examples() {
    let c = Cluster::get();
    c.deploy_agent();
    seed_app_flat(&c);
    // The seed's policies with deploy/examples/payments' DNS rule for its allow-dns: egress to the
    // kube-dns pods of kube-system only, not to any address on port 53. The queries go to the kube-dns
    // ClusterIP; only the Service's translation to the CoreDNS pod lets them through.
    let dns = std::fs::read_to_string(common::cluster::root().join("deploy/examples/payments/policies/10-allow-dns-egress.yaml"))
        .expect("10-allow-dns-egress.yaml");
    let seed = common::cluster::seed_policies();
    let without_seed_dns: Vec<&str> = seed.split("\n---").filter(|d| !d.contains("name: allow-dns")).collect();
    assert_eq!(without_seed_dns.len(), 4, "the seed has five policies, one of them allow-dns");
    c.apply(&without_seed_dns.join("\n---"));
    c.apply(&dns);
    // The seed's per-tier policies still allow any port 53; remove that path so that only the
    // selector-based rule admits DNS.
    for p in ["frontend-policy", "backend-policy"] {
        c.ok(&["-n", "payments", "patch", "networkpolicy", p, "--type=json", "-p", r#"[{"op":"remove","path":"/spec/egress/1"}]"#]);
    }
    c.ok(&["-n", "payments", "patch", "networkpolicy", "database-policy", "--type=json", "-p", r#"[{"op":"remove","path":"/spec/egress"}]"#]);
    seed_checks(&c);
    // DNS itself: resolved through the kube-dns ClusterIP under default deny.
    let out = c.ok(&["-n", "payments", "exec", "deploy/database", "--", "nslookup", "backend.payments.svc.cluster.local"]);
    assert!(out.contains("Address"), "{out}");
}
