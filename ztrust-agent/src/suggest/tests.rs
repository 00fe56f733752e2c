use super::*;
use crate::flows::Reason;
use crate::flows::testing::denied;
use crate::model::ObjectRef;
use crate::source::dir;
use crate::whatif::{DraftSummary, replay};

fn payments() -> Cluster {
    let mut c = dir::parse_str("payments.yaml", crate::explain::tests::PAYMENTS).cluster;
    c.node_ips = vec!["192.168.1.10".parse().unwrap()];
    c.service_cidrs = vec!["10.96.0.0/16".parse().unwrap()];
    c
}

fn flow(src: &str, dst: &str, port: u16, protocol: u8, verdict: Verdict) -> Flow {
    let mut f = denied();
    f.source.ip = src.parse().unwrap();
    f.destination.ip = dst.parse().unwrap();
    f.destination.port = Some(port);
    f.protocol = crate::flows::IpProtocol(protocol);
    f.verdict = verdict;
    f.reason = match verdict {
        Verdict::Forwarded => Reason::AllowedByPolicy,
        _ => Reason::PolicyDenied,
    };
    f
}

fn observed() -> Vec<Flow> {
    use ztrust_common::proto::{TCP, UDP};
    vec![
        flow("10.244.0.10", "10.96.0.21", 80, TCP, Verdict::Forwarded), // frontend → backend Service
        flow("10.244.0.11", "10.244.0.12", 5432, TCP, Verdict::WouldDrop), // backend → database (audit)
        flow("10.244.0.10", "10.244.0.2", 53, UDP, Verdict::Forwarded), // frontend → DNS
        flow("10.244.0.11", "10.244.0.2", 53, UDP, Verdict::Forwarded),
        flow("10.244.0.12", "10.244.0.2", 53, UDP, Verdict::Forwarded),
        flow("10.244.0.10", "10.244.0.12", 5432, TCP, Verdict::Dropped), // blocked: stays so
        flow("192.168.1.10", "10.244.0.11", 8080, TCP, Verdict::Forwarded), // kubelet probe
    ]
}

/// The cluster with `yaml`'s policies in place of `namespace`'s.
fn with_suggestion(cluster: &Cluster, namespace: &str, yaml: &str) -> Cluster {
    let loaded = dir::parse_str("suggested.yaml", yaml);
    assert!(
        loaded.errors.is_empty(),
        "the suggestion reads back without problems: {:?}\n{yaml}",
        loaded.errors
    );
    let mut c = cluster.clone();
    c.policies.retain(|r, _| r.namespace != namespace);
    c.policies.extend(loaded.cluster.policies);
    c
}

#[test]
fn the_suggestion_admits_every_observed_connection_and_nothing_dropped() {
    let cluster = payments();
    let s = suggest(&cluster, "payments", &observed());
    let yaml = s.to_yaml("payments").unwrap();
    let after = with_suggestion(&cluster, "payments", &yaml);
    let names: Vec<String> = after
        .policies
        .keys()
        .filter(|r| r.namespace == "payments")
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(
        names,
        ["allow-dns", "backend", "database", "default-deny", "frontend"],
        "{yaml}"
    );

    // What-if: every observed connection that went through (or would have) still does; the one that
    // was dropped stays dropped.
    let flows = observed();
    let r = replay(&cluster, &after, DraftSummary::default(), &flows);
    assert!(
        r.changed.iter().all(|c| c.after != Verdict::Dropped),
        "{}\n{yaml}",
        crate::whatif::render(&r)
    );
    let judge = |c: &Cluster, from: &str, to: &str| {
        let desired = Engine::new().compile(c);
        let audit = Default::default();
        let state = State {
            cluster: c,
            desired: &desired,
            node: None,
            audit_namespaces: &audit,
            audit_all: false,
        };
        explain(&state, &Query::parse(from, to).unwrap(), None)
            .unwrap()
            .verdict
    };
    for (from, to) in [
        ("payments/frontend", "10.96.0.21:80"),
        ("payments/frontend", "payments/backend:8080"),
        ("payments/backend", "payments/database:5432"),
        ("payments/database", "10.244.0.2:53/udp"),
        ("192.168.1.10", "payments/backend:8080"),
    ] {
        assert_eq!(
            judge(&after, from, to),
            Verdict::Forwarded,
            "{from} → {to}\n{yaml}"
        );
    }
    // Least privilege: what was not seen is not allowed.
    for (from, to) in [
        ("payments/frontend", "payments/database:5432"),
        ("payments/database", "payments/backend:8080"),
        ("payments/backend", "payments/frontend:8080"),
        ("payments/frontend", "1.1.1.1:443"),
        ("payments/frontend", "1.1.1.1:53/udp"),
    ] {
        assert_eq!(judge(&after, from, to), Verdict::Dropped, "{from} → {to}\n{yaml}");
    }
    assert_eq!(
        s.left_out.values().sum::<usize>(),
        1,
        "the dropped flow: {:?}",
        s.left_out
    );
}

#[test]
fn lint_accepts_the_suggestion() {
    let cluster = payments();
    let yaml = suggest(&cluster, "payments", &observed())
        .to_yaml("payments")
        .unwrap();
    let after = with_suggestion(&cluster, "payments", &yaml);
    let findings: Vec<String> = crate::lint::lint(&after, &[])
        .into_iter()
        .filter(|f| f.namespace == "payments")
        .map(|f| format!("{} {} {} {}", f.code, f.object, f.field, f.message))
        .collect();
    assert!(findings.is_empty(), "{findings:#?}\n{yaml}");
}

#[test]
fn peers_are_pods_by_labels_or_addresses_and_other_namespaces_by_name() {
    let mut cluster = payments();
    let mut scraper = cluster.pods[&ObjectRef::new("payments", "frontend")].clone();
    scraper.namespace = "monitoring".into();
    scraper.name = "prometheus-0".into();
    scraper.labels = [
        ("app".to_owned(), "prometheus".to_owned()),
        (
            "statefulset.kubernetes.io/pod-name".to_owned(),
            "prometheus-0".to_owned(),
        ),
    ]
    .into();
    scraper.ips = vec!["10.244.0.30".parse().unwrap()];
    cluster.pods.insert(scraper.object_ref(), scraper);
    use ztrust_common::proto::TCP;
    let flows = [
        flow("10.244.0.30", "10.244.0.11", 8080, TCP, Verdict::Forwarded),
        flow("10.244.0.12", "203.0.113.10", 443, TCP, Verdict::Forwarded),
    ];
    let yaml = suggest(&cluster, "payments", &flows).to_yaml("payments").unwrap();
    assert!(yaml.contains("kubernetes.io/metadata.name: monitoring"), "{yaml}");
    assert!(yaml.contains("app: prometheus"), "{yaml}");
    assert!(
        !yaml.contains("statefulset.kubernetes.io/pod-name"),
        "per-pod labels are left out:\n{yaml}"
    );
    assert!(yaml.contains("cidr: 203.0.113.10/32"), "{yaml}");
}

#[test]
fn a_connection_one_hook_let_out_and_another_dropped_is_not_learned() {
    use ztrust_common::proto::TCP;
    let cluster = payments();
    // The DNS pod's egress is not isolated (forwarded there); the frontend's ingress dropped it.
    let mut out = flow("10.244.0.2", "10.244.0.10", 8080, TCP, Verdict::Forwarded);
    out.direction = crate::flows::Direction::Egress;
    let dropped = flow("10.244.0.2", "10.244.0.10", 8080, TCP, Verdict::Dropped);
    let s = suggest(&cluster, "payments", &[out, dropped]);
    let yaml = s.to_yaml("payments").unwrap();
    assert_eq!(s.connections, 0, "{yaml}");
    assert!(!yaml.contains("k8s-app: kube-dns\n    ports"), "{yaml}");
    assert_eq!(
        s.policies
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect::<Vec<_>>(),
        ["default-deny", "allow-dns"]
    );
}

#[test]
fn replies_and_connections_a_backend_dropped_behind_a_service_are_not_learned() {
    use ztrust_common::proto::TCP;
    let cluster = payments();
    // The database reaches the backend Service: let out at its egress (say, audited), dropped at the
    // backend's ingress, which records the backend's address and port.
    let out = flow("10.244.0.12", "10.96.0.21", 80, TCP, Verdict::WouldDrop);
    let dropped = flow("10.244.0.12", "10.244.0.11", 8080, TCP, Verdict::Dropped);
    // A segment without a conntrack entry (of a would-drop connection whose entry went), judged as a
    // packet of its own.
    let mut reply = flow("10.244.0.11", "10.244.0.10", 40000, TCP, Verdict::WouldDrop);
    reply.reason = Reason::NoCtEntry;
    let s = suggest(&cluster, "payments", &[out, dropped, reply]);
    let yaml = s.to_yaml("payments").unwrap();
    assert_eq!(s.connections, 0, "{yaml}");
    assert!(!yaml.contains("40000") && !yaml.contains("8080"), "{yaml}");
}

#[test]
fn generated_names_are_valid_and_distinct() {
    let l = |pairs: &[(&str, &str)]| -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    assert_eq!(workload_name(&l(&[("app", "")])), "workload");
    let long = "x".repeat(49) + "-y";
    assert!(!workload_name(&l(&[("app", &long)])).ends_with('-'));
    assert_eq!(workload_name(&l(&[("app", "Web_API")])), "web-api");
}
