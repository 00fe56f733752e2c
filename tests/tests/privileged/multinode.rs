//! The lab over three nodes (root only; `cargo xtask test` runs it): each node its own namespace and
//! agent, pods spread over them, routed to each other. A connection between pods of two nodes is judged
//! at both ends by two agents, with identities learnt from the cluster view; a label changed on one
//! node's pod reaches the verdicts of another node's agent; a remote node is not `from-host`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::common::payments::{PaymentsLab, connects, payments};
use crate::common::{agent_bin, flow_in_log, flow_log, require_root};
use ztrust_agent::model::Protocol;
use ztrust_lab::{self as lab, LabelChange, LabelKind, ProbeOptions, ProxyMode, Verdict};

fn three_nodes(tag: &str) -> PaymentsLab {
    PaymentsLab::up_on(
        tag,
        agent_bin(),
        &["--metrics-addr", "none"],
        ProxyMode::default(),
        3,
    )
}

/// Tries a TCP connection from `netns` to `dst` until it is set up (`want`) or refused, within 10 s:
/// `apply` and `label` return once every agent has compiled, and a node's kernel maps follow a moment
/// later.
fn until_connects(netns: &str, dst: SocketAddr, want: bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let timeout = Duration::from_millis(if want { 2000 } else { 500 });
    while connects(netns, dst, timeout) != want {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Tries (within 10 s) a connection from `netns` to `dst`, which must fail every time, until the flow log
/// at `log` has, after its first `skip` flows, a flow `wanted` accepts; returns it.
fn refused_until_logged(
    netns: &str,
    dst: SocketAddr,
    log: &std::path::Path,
    skip: usize,
    what: &str,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            !connects(netns, dst, Duration::from_millis(500)),
            "{what}: the connection went through"
        );
        std::thread::sleep(Duration::from_millis(100));
        if let Some(f) = flow_log(log).into_iter().skip(skip).find(|f| wanted(f)) {
            return f;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: no such flow in {}",
            log.display()
        );
    }
}

fn v4(lab: &PaymentsLab, pod: &str) -> IpAddr {
    *lab.pod(pod)
        .ips
        .iter()
        .find(|ip| ip.is_ipv4())
        .expect("an IPv4 address")
}

/// The node a pod runs on, and that node's agent's flow log.
fn node_of(lab: &PaymentsLab, pod: &str) -> (String, std::path::PathBuf) {
    let node = lab.pod(pod).node;
    let agent = lab
        .state
        .node(&node)
        .and_then(|n| n.agent.clone())
        .expect("the node runs an agent");
    (node, agent.flow_log)
}

#[test]
fn three_nodes_enforce_the_payments_matrix_and_judge_across_nodes_at_both_ends() {
    require_root();
    let mut lab = three_nodes("ztm");
    lab.apply(&payments().join("services.yaml"));
    let nodes: Vec<String> = ["frontend", "backend", "database"]
        .iter()
        .map(|p| lab.pod(p).node)
        .collect();
    assert_eq!(lab.state.nodes.len(), 3);
    assert!(
        nodes[0] != nodes[1] && nodes[1] != nodes[2] && nodes[0] != nodes[2],
        "frontend, backend and database on three nodes: {nodes:?}"
    );

    // The same matrix as one node gives, by pod address and through ClusterIPs (each source's node
    // translating them).
    let cluster = ztrust_agent::source::dir::load_dir(&lab.state.manifests_dir())
        .unwrap()
        .cluster;
    for via_service in [false, true] {
        let opts = ProbeOptions {
            timeout: Duration::from_millis(300),
            via_service,
            ..Default::default()
        };
        let m = lab::probe(&lab.state_dir, &opts).unwrap();
        let diff = m.diff(&m.expected_by_reference(&lab.state, &cluster));
        eprintln!("{}", m.render_table());
        assert!(diff.is_empty(), "via Services: {via_service}\n{}", diff.render());
        let counts = m.counts();
        assert!(
            counts.get(&Verdict::Allowed).copied().unwrap_or(0) >= 3
                && counts.get(&Verdict::Denied).copied().unwrap_or(0) >= 3,
            "both verdicts in the matrix: {counts:?}"
        );
        assert_eq!(
            m.verdict("payments/frontend", "payments/backend", 8080, Protocol::Tcp),
            Some(Verdict::Allowed),
            "frontend → backend crosses nodes and is allowed at both ends (via Services: {via_service})"
        );
        if !via_service {
            assert_eq!(
                m.verdict("payments/frontend", "payments/database", 5432, Protocol::Tcp),
                Some(Verdict::Denied)
            );
        }
    }

    // frontend → database: dropped at the frontend's egress, by the frontend's node.
    let (front_node, front_log) = node_of(&lab, "frontend");
    let (db_node, db_log) = node_of(&lab, "database");
    let (egress_drop, _) = flow_in_log(
        &front_log,
        "frontend → database dropped at the frontend's egress",
        |f| {
            f["verdict"] == "dropped"
                && f["direction"] == "egress"
                && f["source"]["pod"] == "frontend"
                && f["destination"]["pod"] == "database"
                && f["destination"]["port"] == 5432
        },
    );
    assert_eq!(egress_drop["node"], front_node.as_str(), "{egress_drop}");

    // Its egress opened: now the database's node drops it at its ingress, knowing the frontend by the
    // cluster view (its address belongs to another node's block).
    let open = lab.state_dir.join("open-egress.yaml");
    std::fs::write(&open, OPEN_FRONTEND_EGRESS).unwrap();
    lab.apply(&open);
    let database = SocketAddr::new(v4(&lab, "database"), 5432);
    let frontend_netns = lab.pod("frontend").netns;
    // Until the frontend's node has opened its egress, an attempt is dropped there: tried again.
    let ingress_drop = refused_until_logged(
        &frontend_netns,
        database,
        &db_log,
        0,
        "frontend → database dropped at the database's ingress",
        |f| {
            f["verdict"] == "dropped"
                && f["direction"] == "ingress"
                && f["endpoint"] == "payments/database"
                && f["source"]["pod"] == "frontend"
                && f["destination"]["port"] == 5432
        },
    );
    assert_eq!(ingress_drop["node"], db_node.as_str(), "{ingress_drop}");
    assert_eq!(ingress_drop["reason"], "policy-denied", "{ingress_drop}");
    // Positive control: backend → database, also across nodes, goes through both agents.
    let backend_netns = lab.pod("backend").netns;
    assert!(connects(&backend_netns, database, Duration::from_secs(2)));
}

const OPEN_FRONTEND_EGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: frontend-egress-open\n  namespace: payments\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{}]\n";

#[test]
fn a_label_changed_on_one_node_reaches_another_nodes_verdicts() {
    require_root();
    let mut lab = three_nodes("ztn");
    let open = lab.state_dir.join("open-egress.yaml");
    std::fs::write(&open, OPEN_FRONTEND_EGRESS).unwrap();
    lab.apply(&open);
    let backend = SocketAddr::new(v4(&lab, "backend"), 8080);
    let frontend_netns = lab.pod("frontend").netns;
    assert!(
        connects(&frontend_netns, backend, Duration::from_secs(2)),
        "frontend → backend is open before the change"
    );
    let (backend_node, backend_log) = node_of(&lab, "backend");
    assert_ne!(lab.pod("frontend").node, backend_node);

    // The frontend's labels change (its node's pod); the backend's agent, on another node, stops
    // admitting it.
    let relabel = |value: &str| {
        lab::label(
            &lab.state_dir,
            LabelKind::Pod,
            "payments/frontend",
            &[LabelChange {
                key: "app".into(),
                value: Some(value.into()),
            }],
        )
        .unwrap()
    };
    relabel("intruder");
    until_connects(
        &frontend_netns,
        backend,
        false,
        "the relabelled frontend still reaches the backend",
    );
    let drop = refused_until_logged(
        &frontend_netns,
        backend,
        &backend_log,
        0,
        "the relabelled frontend dropped at the backend's ingress",
        |f| {
            f["verdict"] == "dropped"
                && f["direction"] == "ingress"
                && f["endpoint"] == "payments/backend"
                && f["source"]["pod"] == "frontend"
                && f["source"]["labels"]["app"] == "intruder"
        },
    );
    assert_eq!(drop["node"], backend_node.as_str(), "{drop}");
    relabel("frontend");
    until_connects(
        &frontend_netns,
        backend,
        true,
        "labelled back, the frontend does not reach the backend again",
    );
}

#[test]
fn a_remote_node_is_not_from_host() {
    require_root();
    let mut lab = three_nodes("ztr");
    let database = SocketAddr::new(v4(&lab, "database"), 5432);
    let db_node = lab.pod("database").node;
    let remote = lab
        .state
        .nodes
        .iter()
        .find(|n| n.name != db_node)
        .expect("another node")
        .name
        .clone();
    // The database admits only the backend; its own node is let in (Kubernetes requires it), a remote
    // node is not.
    assert!(
        connects(&db_node, database, Duration::from_secs(2)),
        "the database's own node reaches it"
    );
    assert!(
        !connects(&remote, database, Duration::from_millis(500)),
        "{remote} is not the database's node and is not let in as the host"
    );
    // Still not with a host-network pod on the remote node, whose address is that node's.
    let exporter = lab.state_dir.join("exporter.yaml");
    std::fs::write(
        &exporter,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: node-exporter\n  namespace: monitoring\n  labels: {{app: node-exporter}}\nspec:\n  hostNetwork: true\n  nodeName: {remote}\n  containers:\n  - name: exporter\n    ports: [{{containerPort: 9100}}]\n"
        ),
    )
    .unwrap();
    let db_log = lab
        .state
        .node(&db_node)
        .and_then(|n| n.agent.clone())
        .unwrap()
        .flow_log;
    let before = flow_log(&db_log).len();
    lab.apply(&exporter);
    assert_eq!(lab.pod("node-exporter").node, remote);
    // Tried until the database's node judges the remote address as the host identity (the pod's, in
    // its ipcache), and dropped all the same: the kernel lets only the node's own packets in as the host.
    let remote_ip = lab.state.node(&remote).unwrap().ips[0];
    let drop = refused_until_logged(
        &remote,
        database,
        &db_log,
        before,
        &format!("a host-network pod of {remote}, let in as the host"),
        |f| {
            f["verdict"] == "dropped"
                && f["endpoint"] == "payments/database"
                && f["source"]["ip"] == remote_ip.to_string()
                && f["source"]["identity"] == ztrust_common::identity::HOST
        },
    );
    assert_eq!(drop["reason"], "policy-denied", "{drop}");
    assert!(
        connects(&db_node, database, Duration::from_secs(2)),
        "and the database's own node still reaches it"
    );
}
