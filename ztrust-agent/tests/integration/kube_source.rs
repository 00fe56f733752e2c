//! The Kubernetes source against a fake API server speaking the real list/watch protocol
//! (`fake_apiserver`): initial list, changes of every kind, `410 Gone`, dropped watch connections, the
//! API server going away and coming back, and Events for policies that cannot be fully enforced.
//! Unprivileged.

use std::time::{Duration, Instant};

use crate::fake_apiserver::{Change, FakeApiServer, Kind};
use serde_json::{Value, json};
use ztrust_agent::model::ObjectRef;
use ztrust_agent::source::kube::{KubeSource, Options};
use ztrust_agent::source::{Loaded, Origin};

/// The bound the issue sets for a change to reach a snapshot.
const CHANGE_BOUND: Duration = Duration::from_secs(2);

/// Every kind the source watches.
const KINDS: [Kind; 5] = [
    Kind::Namespace,
    Kind::Pod,
    Kind::NetworkPolicy,
    Kind::Service,
    Kind::EndpointSlice,
];

fn client(server: &FakeApiServer) -> kube::Client {
    let config = kube::Config::new(server.url().parse().unwrap());
    kube::Client::try_from(config).expect("client for the fake API server")
}

fn source(server: &FakeApiServer, events: bool) -> KubeSource {
    KubeSource::start_with(
        client(server),
        Options {
            node_name: Some("node-a".into()),
            events,
            ..Options::default()
        },
    )
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name, "labels": labels } })
}

fn pod(ns: &str, name: &str, labels: Value, ip: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "labels": labels },
        "spec": {
            "nodeName": node,
            "containers": [{ "name": "app", "image": "app", "ports": [{ "name": "http", "containerPort": 8080 }] }],
        },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
    })
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": ns }, "spec": spec,
    })
}

fn allow_frontend() -> Value {
    json!({
        "podSelector": { "matchLabels": { "app": "backend" } },
        "policyTypes": ["Ingress"],
        "ingress": [{ "from": [{ "podSelector": { "matchLabels": { "app": "frontend" } } }],
                      "ports": [{ "protocol": "TCP", "port": 8080 }] }],
    })
}

/// The payments namespace: frontend and backend on node-a, database on node-b, one policy.
fn seed(server: &FakeApiServer) {
    server.apply(namespace("payments", json!({ "team": "payments" })));
    server.apply(namespace("monitoring", json!({})));
    server.apply(pod(
        "payments",
        "frontend",
        json!({ "app": "frontend" }),
        "10.0.1.10",
        "node-a",
    ));
    server.apply(pod(
        "payments",
        "backend",
        json!({ "app": "backend" }),
        "10.0.1.11",
        "node-a",
    ));
    server.apply(pod(
        "payments",
        "database",
        json!({ "app": "database" }),
        "10.0.2.12",
        "node-b",
    ));
    server.apply(policy("payments", "backend-from-frontend", allow_frontend()));
}

/// Waits for a snapshot satisfying `pred`; panics after `within`. Returns it and how long it took.
async fn wait_for(
    source: &mut KubeSource,
    within: Duration,
    what: &str,
    pred: impl Fn(&Loaded) -> bool,
) -> (Loaded, Duration) {
    let started = Instant::now();
    loop {
        let left = within.checked_sub(started.elapsed()).unwrap_or_default();
        match tokio::time::timeout(left, source.changed()).await {
            Ok(loaded) if pred(&loaded) => return (loaded, started.elapsed()),
            Ok(_) => {}
            Err(_) => panic!("{what}: no matching snapshot within {within:?}"),
        }
    }
}

fn pod_ref(ns: &str, name: &str) -> ObjectRef {
    ObjectRef::new(ns, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_then_every_change() {
    let server = FakeApiServer::start().await;
    seed(&server);
    let mut source = source(&server, false);

    // Initial list: everything, converted.
    let (loaded, took) = wait_for(&mut source, Duration::from_secs(5), "initial list", |_| true).await;
    eprintln!("initial snapshot after {took:?}");
    let c = &loaded.cluster;
    assert_eq!(c.namespaces.len(), 2);
    assert_eq!(c.namespaces["payments"].labels["team"], "payments");
    assert_eq!(
        c.namespaces["payments"].labels["kubernetes.io/metadata.name"], "payments",
        "added as the API server does"
    );
    assert_eq!(c.pods.len(), 3);
    let db = &c.pods[&pod_ref("payments", "database")];
    assert_eq!(
        db.node_name.as_deref(),
        Some("node-b"),
        "remote pods are kept, with their node"
    );
    assert_eq!(db.ips, vec!["10.0.2.12".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(db.ports[0].name.as_deref(), Some("http"));
    let np = &c.policies[&pod_ref("payments", "backend-from-frontend")];
    assert!(np.isolates_ingress && !np.isolates_egress);
    assert_eq!(np.ingress.len(), 1);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    assert!(loaded.cluster.node_ips.is_empty(), "the agent fills node_ips");
    assert!(source.try_snapshot().is_none(), "nothing changed since");

    // Create a pod.
    server.apply(pod(
        "payments",
        "worker",
        json!({ "app": "worker" }),
        "10.0.1.20",
        "node-a",
    ));
    let (_, took) = wait_for(&mut source, CHANGE_BOUND, "pod created", |l| {
        l.cluster.pods.contains_key(&pod_ref("payments", "worker"))
    })
    .await;
    eprintln!("pod created → snapshot in {took:?}");

    // Update it (relabel and new address).
    server.apply(pod(
        "payments",
        "worker",
        json!({ "app": "frontend" }),
        "10.0.1.21",
        "node-a",
    ));
    let (_, took) = wait_for(&mut source, CHANGE_BOUND, "pod updated", |l| {
        l.cluster
            .pods
            .get(&pod_ref("payments", "worker"))
            .is_some_and(|p| {
                p.labels["app"] == "frontend"
                    && p.ips == vec!["10.0.1.21".parse::<std::net::IpAddr>().unwrap()]
            })
    })
    .await;
    eprintln!("pod updated → snapshot in {took:?}");

    // A pod that ran to completion gives its address back: it is not in the cluster any more.
    let mut done = pod(
        "payments",
        "worker",
        json!({ "app": "frontend" }),
        "10.0.1.21",
        "node-a",
    );
    done["status"]["phase"] = json!("Succeeded");
    server.apply(done);
    wait_for(&mut source, CHANGE_BOUND, "pod completed", |l| {
        !l.cluster.pods.contains_key(&pod_ref("payments", "worker"))
    })
    .await;
    server.apply(pod(
        "payments",
        "worker",
        json!({ "app": "frontend" }),
        "10.0.1.21",
        "node-a",
    ));
    wait_for(&mut source, CHANGE_BOUND, "pod back", |l| {
        l.cluster.pods.contains_key(&pod_ref("payments", "worker"))
    })
    .await;

    // Delete it.
    assert!(server.delete("Pod", "payments", "worker"));
    let (_, took) = wait_for(&mut source, CHANGE_BOUND, "pod deleted", |l| {
        !l.cluster.pods.contains_key(&pod_ref("payments", "worker")) && l.cluster.pods.len() == 3
    })
    .await;
    eprintln!("pod deleted → snapshot in {took:?}");

    // Relabel a namespace.
    server.apply(namespace("monitoring", json!({ "role": "observability" })));
    let (_, took) = wait_for(&mut source, CHANGE_BOUND, "namespace relabelled", |l| {
        l.cluster.namespaces["monitoring"]
            .labels
            .get("role")
            .map(String::as_str)
            == Some("observability")
    })
    .await;
    eprintln!("namespace relabelled → snapshot in {took:?}");

    // Add a policy, then delete it.
    server.apply(policy(
        "payments",
        "default-deny",
        json!({ "podSelector": {}, "policyTypes": ["Ingress", "Egress"] }),
    ));
    let (_, took) = wait_for(&mut source, CHANGE_BOUND, "policy added", |l| {
        l.cluster
            .policies
            .get(&pod_ref("payments", "default-deny"))
            .is_some_and(|p| p.isolates_egress)
    })
    .await;
    eprintln!("policy added → snapshot in {took:?}");
    assert!(server.delete("NetworkPolicy", "payments", "default-deny"));
    let (_, took) = wait_for(&mut source, CHANGE_BOUND, "policy deleted", |l| {
        !l.cluster
            .policies
            .contains_key(&pod_ref("payments", "default-deny"))
            && l.cluster.policies.len() == 1
    })
    .await;
    eprintln!("policy deleted → snapshot in {took:?}");

    // Each kind was listed once: no spurious re-lists.
    let stats = server.stats();
    for kind in KINDS {
        assert_eq!(stats.lists.get(&kind), Some(&1), "{kind:?}: {stats:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_before_every_kind_is_listed() {
    let server = FakeApiServer::start().await;
    seed(&server);
    // Nothing listens yet: the source cannot be ready.
    server.stop().await;
    let mut source = source(&server, false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!source.is_ready());
    assert!(source.try_snapshot().is_none());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), source.changed())
            .await
            .is_err()
    );
    server.restart().await;
    // The first retry comes after the watcher's backoff (0.8 s, doubling, with jitter).
    let (loaded, took) = wait_for(&mut source, Duration::from_secs(15), "first list", |_| true).await;
    eprintln!("first snapshot {took:?} after the server came up");
    assert_eq!(loaded.cluster.pods.len(), 3);
    assert_eq!(loaded.cluster.policies.len(), 1);
    assert_eq!(loaded.cluster.namespaces.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_until_all_three_kinds_are_listed() {
    let server = FakeApiServer::start().await;
    seed(&server);
    // Namespaces and pods list fine; policies cannot be listed (as without RBAC for them).
    server.fail_kind(Kind::NetworkPolicy, Some(403));
    let mut source = source(&server, false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(server.stats().lists.contains_key(&Kind::Pod), "pods were listed");
    assert!(!source.is_ready(), "not ready without the policies");
    assert!(
        source.try_snapshot().is_none(),
        "pods without their policies would compile wide open"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), source.changed())
            .await
            .is_err()
    );
    server.fail_kind(Kind::NetworkPolicy, None);
    let (loaded, took) = wait_for(&mut source, Duration::from_secs(15), "all listed", |_| true).await;
    eprintln!("snapshot {took:?} after the policies could be listed");
    assert_eq!(loaded.cluster.policies.len(), 1);
    assert_eq!(loaded.cluster.pods.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_converge() {
    let server = FakeApiServer::start().await;
    seed(&server);
    let mut source = source(&server, false);
    wait_for(&mut source, Duration::from_secs(5), "initial list", |l| {
        l.cluster.pods.len() == 3
    })
    .await;

    // A dropped watch connection: the watcher re-watches from its last resourceVersion and gets the
    // change made while it was away from the history.
    let watches_before = server.stats().watches.values().sum::<u64>();
    server.drop_watches();
    server.apply(pod(
        "payments",
        "frontend",
        json!({ "app": "frontend", "v": "2" }),
        "10.0.1.10",
        "node-a",
    ));
    let (_, took) = wait_for(&mut source, CHANGE_BOUND, "after a dropped watch", |l| {
        l.cluster.pods[&pod_ref("payments", "frontend")]
            .labels
            .get("v")
            .map(String::as_str)
            == Some("2")
    })
    .await;
    eprintln!("dropped watch → converged in {took:?}");
    let stats = server.stats();
    assert!(
        stats.dropped >= KINDS.len() as u64,
        "every kind's watch was dropped: {stats:?}"
    );
    let started = Instant::now();
    while server.stats().watches.values().sum::<u64>() < watches_before + KINDS.len() as u64 {
        assert!(
            started.elapsed() < CHANGE_BOUND,
            "not every kind re-watched: {:?}",
            server.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        server.stats().lists.values().sum::<u64>(),
        KINDS.len() as u64,
        "a dropped watch needs no re-list"
    );
}

// Its own test: the watcher's backoff only resets after 120 s without errors, so a 410 right after the
// dropped watches above would wait for the second backoff step (1.6 s and more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_relists_and_converges() {
    let server = FakeApiServer::start().await;
    seed(&server);
    let mut source = source(&server, false);
    wait_for(&mut source, Duration::from_secs(5), "initial list", |l| {
        l.cluster.pods.len() == 3
    })
    .await;

    // 410 Gone: changes made while the history is lost are only seen by listing again.
    server.expire_history_with(vec![
        Change::Delete("Pod", "payments".into(), "database".into()),
        Change::Apply(pod(
            "payments",
            "cache",
            json!({ "app": "cache" }),
            "10.0.2.30",
            "node-b",
        )),
        Change::Apply(namespace(
            "payments",
            json!({ "team": "payments", "pci": "true" }),
        )),
        Change::Delete("NetworkPolicy", "payments".into(), "backend-from-frontend".into()),
    ]);
    let (loaded, took) = wait_for(&mut source, CHANGE_BOUND, "after 410 Gone", |l| {
        !l.cluster.pods.contains_key(&pod_ref("payments", "database"))
            && l.cluster.pods.contains_key(&pod_ref("payments", "cache"))
            && l.cluster.namespaces["payments"]
                .labels
                .get("pci")
                .map(String::as_str)
                == Some("true")
            && l.cluster.policies.is_empty()
    })
    .await;
    eprintln!("410 Gone → re-listed and converged in {took:?}");
    let stats = server.stats();
    assert!(
        stats.gone >= KINDS.len() as u64,
        "every kind got a 410: {stats:?}"
    );
    for kind in KINDS {
        assert!(stats.lists[&kind] >= 2, "{kind:?} re-listed: {stats:?}");
    }
    assert_eq!(loaded.cluster.pods.len(), 3);

    // And the watches work again after the re-list.
    server.apply(pod(
        "payments",
        "cache",
        json!({ "app": "cache", "v": "3" }),
        "10.0.2.30",
        "node-b",
    ));
    wait_for(&mut source, CHANGE_BOUND, "watch after re-list", |l| {
        l.cluster.pods[&pod_ref("payments", "cache")]
            .labels
            .get("v")
            .map(String::as_str)
            == Some("3")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_keeps_last_snapshot_then_catches_up() {
    let server = FakeApiServer::start().await;
    seed(&server);
    let mut source = source(&server, false);
    let (first, _) = wait_for(&mut source, Duration::from_secs(5), "initial list", |l| {
        l.cluster.pods.len() == 3
    })
    .await;

    server.stop().await;
    // Changes the source cannot see while the server is down (they stay in the history).
    server.apply(pod(
        "payments",
        "late",
        json!({ "app": "late" }),
        "10.0.1.40",
        "node-a",
    ));
    server.delete("NetworkPolicy", "payments", "backend-from-frontend");
    // No snapshot while down: in particular no empty one (the agent keeps enforcing the last one).
    assert!(
        tokio::time::timeout(Duration::from_secs(2), source.changed())
            .await
            .is_err(),
        "no snapshot while the API server is down"
    );
    assert!(source.try_snapshot().is_none());
    assert!(source.is_ready(), "still ready: the stores keep their contents");
    assert_eq!(first.cluster.policies.len(), 1);

    let restarted = Instant::now();
    server.restart().await;
    // The watcher reconnects after its backoff (0.8 s doubling to 30 s, with jitter): after ~2 s down
    // the next attempt is a few seconds away.
    let (loaded, _) = wait_for(
        &mut source,
        Duration::from_secs(20),
        "caught up after restart",
        |l| l.cluster.pods.contains_key(&pod_ref("payments", "late")) && l.cluster.policies.is_empty(),
    )
    .await;
    eprintln!("server back → caught up in {:?}", restarted.elapsed());
    assert_eq!(loaded.cluster.pods.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_for_policies_that_cannot_be_fully_enforced() {
    let server = FakeApiServer::start().await;
    seed(&server);
    let bad = json!({
        "podSelector": { "matchLabels": { "app": "database" } },
        "ingress": [{ "from": [{ "ipBlock": { "cidr": "10.0.0.0/33" } },
                               { "podSelector": { "matchLabels": { "app": "backend" } } }] }],
    });
    server.apply(policy("payments", "database-ingress", bad));
    let mut source = source(&server, true);
    let (loaded, _) = wait_for(&mut source, Duration::from_secs(5), "initial list", |_| true).await;
    let problems: Vec<_> = loaded
        .errors
        .iter()
        .filter(|e| e.object.contains("database-ingress"))
        .collect();
    assert_eq!(problems.len(), 1, "{:?}", loaded.errors);
    let e = problems[0];
    assert_eq!(e.origin, Origin::Api);
    assert_eq!(e.object, "NetworkPolicy payments/database-ingress");
    assert_eq!(e.field, "spec.ingress[0].from[0].ipBlock.cidr");
    // Fail closed: the policy is there, with the invalid peer dropped.
    let p = &loaded.cluster.policies[&pod_ref("payments", "database-ingress")];
    assert_eq!(p.ingress[0].peers.len(), 1);

    let event = wait_event(&server, 1).await;
    assert_eq!(event["apiVersion"], "events.k8s.io/v1");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["kind"], "NetworkPolicy");
    assert_eq!(event["regarding"]["namespace"], "payments");
    assert_eq!(event["regarding"]["name"], "database-ingress");
    assert_eq!(event["reportingInstance"], "node-a");
    let note = event["note"].as_str().unwrap();
    assert!(
        note.contains("spec.ingress[0].from[0].ipBlock.cidr") && note.contains("10.0.0.0/33"),
        "{note}"
    );

    // Unrelated changes do not repeat the Event.
    server.apply(pod("payments", "x", json!({ "app": "x" }), "10.0.1.50", "node-a"));
    wait_for(&mut source, CHANGE_BOUND, "pod x", |l| {
        l.cluster.pods.contains_key(&pod_ref("payments", "x"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.events().len(), 1, "deduplicated");

    // A different problem in the same policy is a new Event; fixing it emits none.
    let worse = json!({
        "podSelector": { "matchLabels": { "app": "database" } },
        "ingress": [{ "from": [{ "podSelector": { "matchLabels": { "app": "backend" } } }],
                      "ports": [{ "port": 70000 }] }],
    });
    server.apply(policy("payments", "database-ingress", worse));
    // Events go out when the agent takes the snapshot.
    wait_for(&mut source, CHANGE_BOUND, "worse policy", |l| {
        l.errors.iter().any(|e| e.field.contains("ports"))
    })
    .await;
    let event = wait_event(&server, 2).await;
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("spec.ingress[0].ports[0].port"),
        "{event}"
    );
    server.apply(policy("payments", "database-ingress", allow_frontend()));
    wait_for(&mut source, CHANGE_BOUND, "policy fixed", |l| l.errors.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.events().len(), 2);
}

/// A host-network pod of this node: a pod object as the kubelet reports it (no podIPs of its own).
fn host_pod(ns: &str, name: &str, labels: Value, node: Option<&str>) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "labels": labels },
        "spec": { "nodeName": node, "hostNetwork": true, "containers": [{ "name": "app", "image": "app" }] },
        "status": { "phase": if node.is_some() { "Running" } else { "Pending" } },
    })
}

/// A valid policy that selects a host-network pod of this node gets a Warning Event (ztrust cannot
/// enforce it for that pod), not counted as a source error; one selecting only other pods, or a
/// host-network pod of another node or of none yet, gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_for_policies_selecting_host_network_pods_of_this_node() {
    let server = FakeApiServer::start().await;
    seed(&server);
    server.apply(host_pod(
        "payments",
        "node-agent",
        json!({ "app": "node-agent" }),
        Some("node-a"),
    ));
    server.apply(host_pod(
        "payments",
        "elsewhere",
        json!({ "app": "elsewhere" }),
        Some("node-b"),
    ));
    server.apply(host_pod("payments", "pending", json!({ "app": "pending" }), None));
    for app in ["node-agent", "elsewhere", "pending"] {
        server.apply(policy(
            "payments",
            &format!("deny-{app}"),
            json!({ "podSelector": { "matchLabels": { "app": app } } }),
        ));
    }
    let mut source = source(&server, true);
    let (loaded, _) = wait_for(&mut source, Duration::from_secs(5), "initial list", |l| {
        l.cluster
            .policies
            .contains_key(&pod_ref("payments", "deny-pending"))
    })
    .await;
    assert!(
        loaded.errors.is_empty(),
        "a limit is not a source error: {:?}",
        loaded.errors
    );
    let event = wait_event(&server, 1).await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "PolicyNotFullyEnforced");
    assert_eq!(event["regarding"]["name"], "deny-node-agent");
    let note = event["note"].as_str().unwrap();
    assert!(
        note.starts_with("spec.podSelector: selects host-network pod payments/node-agent on node node-a"),
        "{note}"
    );

    // A re-list (410 Gone, with an unrelated change only a list shows) does not repeat it.
    server.expire_history_with(vec![Change::Apply(pod(
        "payments",
        "x",
        json!({ "app": "x" }),
        "10.0.1.50",
        "node-a",
    ))]);
    wait_for(&mut source, CHANGE_BOUND, "re-listed", |l| {
        l.cluster.pods.contains_key(&pod_ref("payments", "x"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.events().len(), 1, "{:#?}", server.events());

    // The pending pod scheduled here: now its policy is reported too (Events go out when the snapshot
    // is taken).
    server.apply(host_pod(
        "payments",
        "pending",
        json!({ "app": "pending" }),
        Some("node-a"),
    ));
    wait_for(&mut source, CHANGE_BOUND, "pending scheduled", |l| {
        l.cluster
            .pods
            .get(&pod_ref("payments", "pending"))
            .is_some_and(|p| p.node_name.as_deref() == Some("node-a"))
    })
    .await;
    let event = wait_event(&server, 2).await;
    assert_eq!(event["regarding"]["name"], "deny-pending", "{event}");
    // Gone and back: reported again.
    server.delete("Pod", "payments", "node-agent");
    wait_for(&mut source, CHANGE_BOUND, "node-agent deleted", |l| {
        !l.cluster.pods.contains_key(&pod_ref("payments", "node-agent"))
    })
    .await;
    server.apply(host_pod(
        "payments",
        "node-agent",
        json!({ "app": "node-agent" }),
        Some("node-a"),
    ));
    wait_for(&mut source, CHANGE_BOUND, "node-agent back", |l| {
        l.cluster.pods.contains_key(&pod_ref("payments", "node-agent"))
    })
    .await;
    let event = wait_event(&server, 3).await;
    assert_eq!(event["regarding"]["name"], "deny-node-agent", "{event}");
}

async fn wait_event(server: &FakeApiServer, n: usize) -> Value {
    let started = Instant::now();
    loop {
        let events = server.events();
        if events.len() >= n {
            assert_eq!(events.len(), n, "{events:#?}");
            return events[n - 1].clone();
        }
        assert!(
            started.elapsed() < CHANGE_BOUND,
            "event #{n} not posted: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The paths the agent takes outside tests: a kubeconfig file (`--kubeconfig`) with a CA and a bearer
/// token, over HTTPS — what the in-cluster service account configuration amounts to — through
/// `source::kube::client`. Also proves the TLS stack has its crypto provider (rustls with ring).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_with_tls_and_a_token() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = leaf
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .unwrap()
        .pem();
    let server = FakeApiServer::start_tls(&cert, &key.serialize_pem(), "s3cret").await;
    seed(&server);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), &ca_pem).unwrap();
    let kubeconfig = |token: &str| {
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters:\n- name: fake\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\n\
             users:\n- name: agent\n  user:\n    token: {token}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\n",
            url = server.url(),
            ca = dir.path().join("ca.crt").display(),
        );
        let path = dir.path().join(format!("kubeconfig-{token}"));
        std::fs::write(&path, text).unwrap();
        path
    };

    let client = ztrust_agent::source::kube::client(Some(&kubeconfig("s3cret")))
        .await
        .unwrap();
    let mut source = KubeSource::start(client, Some("node-a".into()));
    let (loaded, _) = wait_for(&mut source, Duration::from_secs(5), "list over TLS", |_| true).await;
    assert_eq!(loaded.cluster.pods.len(), 3);
    server.apply(pod(
        "payments",
        "tls",
        json!({ "app": "tls" }),
        "10.0.1.60",
        "node-a",
    ));
    wait_for(&mut source, CHANGE_BOUND, "watch over TLS", |l| {
        l.cluster.pods.contains_key(&pod_ref("payments", "tls"))
    })
    .await;
    drop(source);

    // A wrong token: 401 on every list, never a snapshot.
    let client = ztrust_agent::source::kube::client(Some(&kubeconfig("wrong")))
        .await
        .unwrap();
    let mut source = KubeSource::start(client, None);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), source.changed())
            .await
            .is_err()
    );
    assert!(!source.is_ready());

    // A kubeconfig that does not exist names the file.
    let Err(err) = ztrust_agent::source::kube::client(Some(&dir.path().join("missing"))).await else {
        panic!("a missing kubeconfig is an error");
    };
    assert!(err.to_string().contains("missing"), "{err}");
}

/// Services and EndpointSlices are watched like the other kinds: a Service with its slice appears in the
/// snapshot converted (cluster IP, ports, backends and their conditions), a backend's change follows,
/// and a deleted Service goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_their_endpoint_slices() {
    let server = FakeApiServer::start().await;
    seed(&server);
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "backend", "namespace": "payments" },
        "spec": { "clusterIP": "10.96.0.20", "ports": [{ "name": "http", "port": 80, "targetPort": "http" }] },
    });
    let slice = |ready: bool| {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": { "name": "backend-x1", "namespace": "payments", "labels": { "kubernetes.io/service-name": "backend" } },
            "addressType": "IPv4",
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
            "endpoints": [{ "addresses": ["10.0.1.11"], "conditions": { "ready": ready } }],
        })
    };
    server.apply(service);
    server.apply(slice(true));
    let mut source = source(&server, false);
    let r = pod_ref("payments", "backend");
    let r_slice = pod_ref("payments", "backend-x1");
    let (loaded, _) = wait_for(&mut source, CHANGE_BOUND, "the Service and its slice", |l| {
        l.cluster.services.contains_key(&r) && l.cluster.endpoint_slices.contains_key(&r_slice)
    })
    .await;
    let svc = &loaded.cluster.services[&r];
    assert_eq!(
        svc.cluster_ips,
        vec!["10.96.0.20".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(svc.ports[0].port, 80);
    let s = &loaded.cluster.endpoint_slices[&r_slice];
    assert_eq!(
        (s.service.as_str(), s.ports[0].port, s.endpoints[0].ready),
        ("backend", 8080, true)
    );
    server.apply(slice(false));
    wait_for(&mut source, CHANGE_BOUND, "the backend no longer ready", |l| {
        l.cluster
            .endpoint_slices
            .get(&r_slice)
            .is_some_and(|s| !s.endpoints[0].ready)
    })
    .await;
    server.delete("Service", "payments", "backend");
    wait_for(&mut source, CHANGE_BOUND, "the Service deleted", |l| {
        !l.cluster.services.contains_key(&r)
    })
    .await;
}
