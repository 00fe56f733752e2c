//! Services in the payments lab with the real agent: the lab derives EndpointSlices and writes
//! kube-proxy-style nftables DNAT rules in the node's namespace; pods reach each other by ClusterIP
//! with the verdict of the pod they reach (the seed's Task 5 checks, by Service address).
//!
//! `cargo test -p ztrust-tests --test privileged services_lab::` (root)

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::common::payments::{PaymentsLab, connects};
use crate::common::{agent_bin, flow_in_log, require_root};
use ztrust_agent::model::Protocol;
use ztrust_lab::{ProbeOptions, ProxyMode, Verdict};

const SERVICES: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: backend-2, namespace: payments, labels: {app: backend}}
spec:
  containers:
  - name: api
    image: payments-api
    ports: [{name: http, containerPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: payments}
spec:
  selector: {app: backend}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: database, namespace: payments}
spec:
  selector: {app: database}
  ports: [{name: postgres, port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  selector: {k8s-app: kube-dns}
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
"#;

fn cluster_ip(lab: &PaymentsLab, ns: &str, name: &str) -> IpAddr {
    let copy = lab
        .state_dir
        .join("manifests")
        .join(format!("service-{ns}-{name}.yaml"));
    let text = std::fs::read_to_string(&copy).expect("the Service's copy");
    let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    v["spec"]["clusterIP"]
        .as_str()
        .expect("a cluster IP")
        .parse()
        .unwrap()
}

/// frontend → backend by ClusterIP connects (frontend-egress-to-backend names the backend pods and port
/// 8080, not the ClusterIP or port 80); frontend → database by ClusterIP does not, and its flow says it
/// was frontend's egress that dropped it and names the Service; backend → database by ClusterIP
/// connects, through the same rule (the control: the translation works), and DNS to the kube-dns
/// ClusterIP is answered. The slices the lab derived name the pods.
#[test]
fn pods_reach_each_other_by_service_with_the_verdict_of_the_pod_they_reach() {
    require_root();
    by_service(ProxyMode::Nftables, "zsv");
}

/// The same checks with the node's rules written as kube-proxy's iptables mode writes them (`-m
/// statistic --mode random`, node ports on any local address).
#[test]
fn pods_reach_each_other_by_service_iptables_mode() {
    require_root();
    by_service(ProxyMode::Iptables, "zsi");
}

fn by_service(mode: ProxyMode, tag: &str) {
    let mut lab = PaymentsLab::up_with(tag, agent_bin(), &["--metrics-addr", "none"], mode);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("services.yaml"), SERVICES).unwrap();
    lab.apply(dir.path());
    let backend = cluster_ip(&lab, "payments", "backend");
    let database = cluster_ip(&lab, "payments", "database");
    assert!(
        ztrust_lab::services::SERVICE_CIDR
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&backend),
        "{backend}"
    );
    let slice = std::fs::read_to_string(
        lab.state_dir
            .join("manifests/endpointslice-payments-backend-0.yaml"),
    )
    .unwrap();
    for pod in ["backend", "backend-2"] {
        assert!(
            slice.contains(&lab.pod(pod).ips[0].to_string()) && slice.contains("8080"),
            "{pod}: {slice}"
        );
    }

    let t = Duration::from_secs(2);
    let (frontend, backend_pod) = (lab.pod("frontend").netns, lab.pod("backend").netns);
    // Two replicas behind the ClusterIP, a random one per connection (the rule the lab wrote picks it):
    // every connection is allowed.
    let rules = std::fs::read_to_string(lab.state_dir.join("services.rules")).unwrap();
    let random = match mode {
        ProxyMode::Nftables => format!("ip daddr {backend} tcp dport 80 dnat ip to numgen random mod 2 map"),
        ProxyMode::Iptables => format!(
            "-d {backend}/32 -p tcp -m tcp --dport 80 -m statistic --mode random --probability 0.5000000000"
        ),
    };
    assert!(rules.contains(&random), "{rules}");
    for i in 0..6 {
        assert!(
            connects(&frontend, SocketAddr::new(backend, 80), t),
            "frontend → backend's ClusterIP:80, connection {i} (allowed: backend pods on 8080)"
        );
    }
    assert!(
        !connects(&frontend, SocketAddr::new(database, 5432), t),
        "frontend → database's ClusterIP connected"
    );
    assert!(
        connects(&backend_pod, SocketAddr::new(database, 5432), t),
        "backend → database's ClusterIP (allowed)"
    );
    // DNS through the kube-dns ClusterIP: allow-dns-egress names the CoreDNS pods, not the Service.
    let dns = SocketAddr::new("10.96.0.10".parse().unwrap(), 53);
    let answered = {
        let netns = frontend.clone();
        std::thread::spawn(move || {
            crate::common::payments::enter(&netns);
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(dns).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut buf = [0u8; 512];
            (0..2).any(|_| s.send(b"query\n").is_ok() && s.recv(&mut buf).is_ok())
        })
        .join()
        .unwrap()
    };
    assert!(
        answered,
        "frontend's query to the kube-dns ClusterIP got no answer"
    );

    // `lab probe --via-service` from frontend: each answer names the backend that replied, and the
    // verdicts are those by pod address (frontend → backend pods on 8080 allowed, → database denied).
    let opts = |via_service| ProbeOptions {
        from: vec!["payments/frontend".into()],
        via_service,
        ..Default::default()
    };
    let by_service = ztrust_lab::probe(&lab.state_dir, &opts(true)).expect("probe --via-service");
    let by_pod = ztrust_lab::probe(&lab.state_dir, &opts(false)).expect("probe");
    let of =
        |m: &ztrust_lab::Matrix, to: &str, port: u16| m.verdict("payments/frontend", to, port, Protocol::Tcp);
    let through = |service: &str| {
        by_service
            .probes
            .iter()
            .filter(|p| p.via.as_ref().is_some_and(|v| v.service == service))
            .collect::<Vec<_>>()
    };
    let to_backend = through("payments/backend");
    assert!(
        !to_backend.is_empty()
            && to_backend.iter().all(|p| p.result == Verdict::Allowed
                && p.port == 8080
                && p.to.starts_with("payments/backend")),
        "{to_backend:?}"
    );
    assert_eq!(of(&by_pod, "payments/backend", 8080), Some(Verdict::Allowed));
    let to_database = through("payments/database");
    assert!(
        !to_database.is_empty()
            && to_database
                .iter()
                .all(|p| p.result == Verdict::Denied && p.to == "payments/database"),
        "{to_database:?}"
    );
    assert_eq!(of(&by_pod, "payments/database", 5432), Some(Verdict::Denied));

    let (denied, _) = flow_in_log(
        &lab.state_dir.join("flows.jsonl"),
        "a drop of frontend → database's ClusterIP",
        |f| f["destination"]["ip"] == database.to_string() && f["verdict"] == "dropped",
    );
    assert_eq!(denied["reason"], "policy-denied", "{denied}");
    assert_eq!(denied["service"]["name"], "payments/database", "{denied}");
    assert_eq!(denied["endpoint"], "payments/frontend", "{denied}");
}

const NODE_PORTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: payments}
spec:
  type: NodePort
  selector: {app: backend}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: database, namespace: payments}
spec:
  type: NodePort
  selector: {app: database}
  ports: [{name: postgres, port: 5432, nodePort: 30432}]
"#;

/// Node ports at an address of the node that no `--node-ip` names (kube-proxy in iptables mode without
/// `--nodeport-addresses` translates them at every local address; the lab's iptables rules do too):
/// with `run --nodeport-addresses all` they are judged by the backends. frontend → a second address of
/// the node at backend's node port connects (denied as an address: frontend's egress names only the
/// backend pods); at database's node port it does not, with a `policy-denied` flow naming the
/// address and the Service; backend → the same address at database's node port connects (the control: the
/// translation and the path work).
#[test]
fn node_ports_at_any_local_address_get_the_verdict_of_the_backends() {
    require_root();
    let mut lab = PaymentsLab::up_with(
        "znp",
        agent_bin(),
        &["--metrics-addr", "none", "--nodeport-addresses", "all"],
        ProxyMode::Iptables,
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("services.yaml"), NODE_PORTS).unwrap();
    lab.apply(dir.path());
    // A second address of the node (on its loopback: this kernel has no dummy interfaces).
    let node = format!("{}-node", lab.prefix);
    let extra: IpAddr = "192.0.2.77".parse().unwrap();
    let log = lab.state_dir.join("logs/agent.log");
    let mirrored = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("the node's local routes mirrored")
            .count()
    };
    let before = mirrored();
    let args = ["-n", &node, "addr", "add", "192.0.2.77/32", "dev", "lo"];
    let out = std::process::Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    // The agent mirrors the node's local routes on the announcement of the new one; until then a node
    // port at the address is denied (`unknown-service`), which is not what this test is about.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while mirrored() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not mirror the new local route:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Duration::from_secs(2);
    let (frontend, backend_pod) = (lab.pod("frontend").netns, lab.pod("backend").netns);
    for i in 0..3 {
        assert!(
            connects(&frontend, SocketAddr::new(extra, 30080), t),
            "frontend → {extra}:30080 (backend's node port), connection {i}"
        );
    }
    assert!(
        connects(&backend_pod, SocketAddr::new(extra, 30432), t),
        "backend → {extra}:30432 (database's node port, allowed)"
    );
    assert!(
        !connects(&frontend, SocketAddr::new(extra, 30432), t),
        "frontend → {extra}:30432 (database's node port) connected"
    );
    let (denied, _) = flow_in_log(
        &lab.state_dir.join("flows.jsonl"),
        &format!("a drop of frontend → {extra}:30432"),
        |f| {
            f["destination"]["ip"] == extra.to_string()
                && f["verdict"] == "dropped"
                && f["endpoint"] == "payments/frontend"
        },
    );
    assert_eq!(denied["reason"], "policy-denied", "{denied}");
    assert_eq!(denied["destination"]["port"], 30432, "{denied}");
    // Named by the Service whose backends judged it (the kernel says so: the address alone does not).
    assert_eq!(denied["service"]["name"], "payments/database", "{denied}");
}

/// A Service `api` at port 5432 whose selector picks `app`, its target port `target`.
fn api_service(app: &str, target: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: payments}}\nspec:\n  selector: {{app: {app}}}\n  ports: [{{name: tcp, port: 5432, targetPort: {target}}}]\n"
    )
}

/// A Service's backends change from database (frontend may not reach it) to backend (it may): the
/// backend the frontend lost still counts during `--service-grace` (the node's proxy may still pick it
/// until its rules catch up), so frontend's connection to the ClusterIP is dropped as
/// `service-backends-differ` — not admitted by the new backends alone — and connects once the grace is
/// over (the agent's loop drops the lost backend without any other change to wake it).
#[test]
fn a_backend_a_service_lost_counts_during_the_grace() {
    require_root();
    let grace = Duration::from_secs(8);
    let mut lab = PaymentsLab::up_with(
        "zgr",
        agent_bin(),
        &["--metrics-addr", "none", "--service-grace", "8s"],
        ProxyMode::Nftables,
    );
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("api.yaml");
    std::fs::write(&manifest, api_service("database", 5432)).unwrap();
    lab.apply(dir.path());
    let api = SocketAddr::new(cluster_ip(&lab, "payments", "api"), 5432);
    let (frontend, backend_pod) = (lab.pod("frontend").netns, lab.pod("backend").netns);
    let t = Duration::from_secs(1);
    // The control (the agent may pick the new Service up a moment after the lab's rules).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !connects(&backend_pod, api, t) {
        assert!(
            std::time::Instant::now() < deadline,
            "backend → api (database): the control"
        );
    }
    assert!(
        !connects(&frontend, api, t),
        "frontend → api (database) connected"
    );

    std::fs::write(&manifest, api_service("backend", 8080)).unwrap();
    let changed = std::time::Instant::now();
    lab.apply(dir.path());
    assert_eq!(
        cluster_ip(&lab, "payments", "api"),
        api.ip(),
        "the ClusterIP stays"
    );
    // Until the agent has seen the change the old backends deny; once it has, both count: not
    // guessed. Either way not connected within the grace, and the agent says which.
    let differ = || {
        let log = std::fs::read_to_string(lab.state_dir.join("flows.jsonl")).unwrap_or_default();
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|f| {
                f["endpoint"] == "payments/frontend"
                    && f["destination"]["ip"] == api.ip().to_string()
                    && f["reason"] == "service-backends-differ"
            })
    };
    loop {
        assert!(
            !connects(&frontend, api, t),
            "frontend → api (now backend) connected {:?} after the change, within the grace",
            changed.elapsed()
        );
        if differ() {
            break;
        }
        assert!(
            changed.elapsed() + t < grace,
            "no service-backends-differ drop of frontend → {api} within the grace"
        );
    }
    let deadline = changed + grace + Duration::from_secs(10);
    while !connects(&frontend, api, t) {
        assert!(
            std::time::Instant::now() < deadline,
            "frontend → api (backend) still not connecting {:?} after the change",
            changed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        changed.elapsed() >= grace,
        "connected {:?} after the change, before the grace ended",
        changed.elapsed()
    );
}
