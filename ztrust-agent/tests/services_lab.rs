//! Services in the payments lab with the real agent: the lab derives EndpointSlices and writes
//! kube-proxy-style nftables DNAT rules in the node's namespace; pods reach each other by ClusterIP
//! with the verdict of the pod they reach (the seed's Task 5 checks, by Service address).
//!
//! `cargo test -p ztrust-agent --test services_lab -- --ignored` (root)

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{AGENT, PaymentsLab, connects};

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
    let copy = lab.state_dir.join("manifests").join(format!("service-{ns}-{name}.yaml"));
    let text = std::fs::read_to_string(&copy).expect("the Service's copy");
    let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    v["spec"]["clusterIP"].as_str().expect("a cluster IP").parse().unwrap()
}

/// frontend → backend by ClusterIP connects (frontend-egress-to-backend names the backend pods and port
/// 8080, not the ClusterIP or port 80); frontend → database by ClusterIP does not, and its flow says it
/// was frontend's egress that dropped it and names the Service; backend → database by ClusterIP
/// connects, through the same rule (the control: the translation works), and DNS to the kube-dns
/// ClusterIP is answered. The slices the lab derived name the pods.
#[test]
#[ignore = "root: network namespaces, eBPF, nftables"]
fn pods_reach_each_other_by_service_with_the_verdict_of_the_pod_they_reach() {
    let mut lab = PaymentsLab::up("zsv", AGENT.as_ref(), &["--metrics-addr", "none"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("services.yaml"), SERVICES).unwrap();
    lab.apply(dir.path());
    let backend = cluster_ip(&lab, "payments", "backend");
    let database = cluster_ip(&lab, "payments", "database");
    assert!(ztrust_agent::lab::services::SERVICE_CIDR.parse::<ipnet::IpNet>().unwrap().contains(&backend), "{backend}");
    let slice = std::fs::read_to_string(lab.state_dir.join("manifests/endpointslice-payments-backend-0.yaml")).unwrap();
    for pod in ["backend", "backend-2"] {
        assert!(slice.contains(&lab.pod(pod).ips[0].to_string()) && slice.contains("8080"), "{pod}: {slice}");
    }

    let t = Duration::from_secs(2);
    let (frontend, backend_pod) = (lab.pod("frontend").netns, lab.pod("backend").netns);
    // Two replicas behind the ClusterIP, a random one per connection (the rule the lab wrote picks it):
    // every connection is allowed.
    let rules = std::fs::read_to_string(lab.state_dir.join("services.nft")).unwrap();
    assert!(rules.contains(&format!("ip daddr {backend} tcp dport 80 dnat ip to numgen random mod 2 map")), "{rules}");
    for i in 0..6 {
        assert!(connects(&frontend, SocketAddr::new(backend, 80), t), "frontend → backend's ClusterIP:80, connection {i} (allowed: backend pods on 8080)");
    }
    assert!(!connects(&frontend, SocketAddr::new(database, 5432), t), "frontend → database's ClusterIP connected");
    assert!(connects(&backend_pod, SocketAddr::new(database, 5432), t), "backend → database's ClusterIP (allowed)");
    // DNS through the kube-dns ClusterIP: allow-dns-egress names the CoreDNS pods, not the Service.
    let dns = SocketAddr::new("10.96.0.10".parse().unwrap(), 53);
    let answered = {
        let netns = frontend.clone();
        std::thread::spawn(move || {
            common::enter(&netns);
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(dns).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut buf = [0u8; 512];
            (0..2).any(|_| s.send(b"query\n").is_ok() && s.recv(&mut buf).is_ok())
        })
        .join()
        .unwrap()
    };
    assert!(answered, "frontend's query to the kube-dns ClusterIP got no answer");

    let log = std::fs::read_to_string(lab.state_dir.join("flows.jsonl")).unwrap_or_default();
    let denied = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|f| f["destination"]["ip"] == database.to_string() && f["verdict"] == "dropped");
    let denied = denied.expect("no flow for frontend → database's ClusterIP");
    assert_eq!(denied["reason"], "policy-denied", "{denied}");
    assert_eq!(denied["service"]["name"], "payments/database", "{denied}");
    assert_eq!(denied["endpoint"], "payments/frontend", "{denied}");
}
