use super::*;

/// Typed in memory, the same strings in JSON (the flow log, `flows -o json`) as ever; a name of a
/// newer agent reads as `unknown`.
#[test]
fn a_flow_is_typed_in_memory_and_named_in_json() {
    let f = crate::flows::testing::denied();
    let v = serde_json::to_value(&f).expect("serializes");
    assert_eq!(v["time"], "2026-01-01T00:00:00.000Z");
    assert_eq!(v["verdict"], "dropped");
    assert_eq!(v["direction"], "ingress");
    assert_eq!(v["reason"], "policy-denied");
    assert_eq!(v["endpoint"], "payments/database");
    assert_eq!(
        v["policies"],
        serde_json::json!(["payments/default-deny-all", "payments/backend-to-database"])
    );
    assert_eq!(v["protocol"], "TCP");
    assert_eq!(v["source"]["namespace"], "payments");
    assert_eq!(v["source"]["pod"], "frontend-7d9");
    let back: Flow = serde_json::from_value(v.clone()).expect("deserializes");
    assert_eq!(back, f);
    let a = serde_json::to_value(crate::flows::testing::allowed()).expect("serializes");
    // A host outside the cluster has neither namespace nor pod.
    assert!(a["destination"].get("namespace").is_none() && a["destination"].get("pod").is_none());
    assert_eq!(a["protocol"], "UDP");
    let mut s = f.clone();
    s.protocol = IpProtocol(47);
    s.service = Some(ServiceRef {
        name: ObjectRef::new("payments", "db"),
        backends: vec![
            Backend::Pod(ObjectRef::new("payments", "db-0")),
            Backend::Address("192.0.2.7".parse().unwrap()),
        ],
    });
    let sv = serde_json::to_value(&s).expect("serializes");
    assert_eq!(sv["protocol"], "IP/47");
    assert_eq!(
        sv["service"],
        serde_json::json!({"name": "payments/db", "backends": ["payments/db-0", "192.0.2.7"]})
    );
    assert_eq!(serde_json::from_value::<Flow>(sv).expect("deserializes"), s);
    assert_eq!(
        a["allowed_by"],
        serde_json::json!({"policy": "shop/allow-dns", "direction": "egress", "rule": 0})
    );
    let mut newer = v;
    newer["reason"] = "a-reason-of-tomorrow".into();
    newer["endpoint"] = "ifindex/7".into();
    let read: Flow = serde_json::from_value(newer).expect("still reads");
    assert_eq!(read.reason, Reason::Unknown);
    assert_eq!(read.endpoint, JudgedAt::Interface(7));
}

#[test]
fn protocols_by_name_and_number() {
    for (name, n) in [
        ("TCP", 6),
        ("udp", 17),
        ("Sctp", 132),
        ("ICMP", 1),
        ("icmpv6", 58),
        ("IP/47", 47),
    ] {
        let p: IpProtocol = name.parse().unwrap();
        assert_eq!(p, IpProtocol(n), "{name}");
        assert!(p.to_string().eq_ignore_ascii_case(name), "{name} shown as {p}");
    }
    for bad in ["", "TPC", "IP/", "IP/256", "ip/x", "6"] {
        assert!(bad.parse::<IpProtocol>().is_err(), "{bad:?}");
    }
    assert!(IpProtocol::SCTP.has_ports() && !IpProtocol(1).has_ports());
}

#[test]
fn tcp_flags_by_name() {
    use ztrust_common::tcp_flags::{ACK, RST, SYN};
    let sa = TcpFlags(SYN | ACK);
    assert_eq!(sa.to_string(), "SYN|ACK");
    assert_eq!("syn|ack".parse::<TcpFlags>().unwrap(), sa);
    assert_eq!("RST".parse::<TcpFlags>().unwrap(), TcpFlags(RST));
    assert_eq!("".parse::<TcpFlags>().unwrap(), TcpFlags(0));
    assert!(TcpFlags(0).is_empty() && !sa.is_empty());
    // ECE/CWR are not shown: a flow with only them shows none.
    assert!(TcpFlags(0xc0).is_empty());
    assert!("SYN|NOPE".parse::<TcpFlags>().is_err());
}

#[test]
fn drops_name_the_isolating_policies() {
    let mut view = View {
        node: "lab".into(),
        ..Default::default()
    };
    let db = ObjectRef::new("payments", "database");
    let fe = ObjectRef::new("payments", "frontend");
    view.pods_by_ip.insert(
        "10.244.0.12".parse().unwrap(),
        PodView {
            pod: db.clone(),
            labels: Labels::new(),
        },
    );
    view.pods_by_ip.insert(
        "10.244.0.10".parse().unwrap(),
        PodView {
            pod: fe,
            labels: Labels::new(),
        },
    );
    view.endpoints.insert(
        5,
        EndpointView {
            pod: db,
            ingress_policies: vec![
                ObjectRef::new("payments", "default-deny-all"),
                ObjectRef::new("payments", "backend-to-database"),
            ],
            egress_policies: vec![],
        },
    );
    let ev = FlowEvent {
        ifindex: 5,
        saddr: "10.244.0.10"
            .parse::<std::net::Ipv4Addr>()
            .unwrap()
            .to_ipv6_mapped()
            .octets(),
        daddr: "10.244.0.12"
            .parse::<std::net::Ipv4Addr>()
            .unwrap()
            .to_ipv6_mapped()
            .octets(),
        sport: 40000,
        dport: 5432,
        family: 4,
        protocol: proto::TCP,
        direction: dir::INGRESS,
        verdict: verdict::DROPPED,
        reason: ztrust_common::reason::POLICY_DENIED,
        tcp_flags: 0x02,
        ..Default::default()
    };
    let flow = view.enrich(&ev);
    assert_eq!(flow.source.display_name(), "payments/frontend");
    assert_eq!(flow.destination.display_name(), "payments/database");
    assert_eq!(flow.destination.port, Some(5432));
    assert_eq!(flow.verdict, crate::flows::Verdict::Dropped);
    assert_eq!(flow.reason, crate::flows::Reason::PolicyDenied);
    assert_eq!(flow.tcp_flags.to_string(), "SYN");
    assert_eq!(flow.policies.len(), 2);
    let line = render_line(&flow);
    assert!(
        line.contains("payments/frontend -> payments/database:5432 TCP policy-denied"),
        "{line}"
    );
}

/// A pod's connection to a ClusterIP names the Service and its backends, and so does the answer
/// coming back from the ClusterIP.
#[test]
fn connections_to_a_service_name_it_and_its_backends() {
    let mut view = View {
        node: "lab".into(),
        ..Default::default()
    };
    let vip: IpAddr = "10.96.0.20".parse().unwrap();
    let svc = ServiceRef {
        name: "payments/backend".parse().unwrap(),
        backends: vec!["payments/backend-0".parse().unwrap()],
    };
    view.services.insert((vip, 80, proto::TCP), svc.clone());
    let mapped = |ip: &str| {
        ip.parse::<std::net::Ipv4Addr>()
            .unwrap()
            .to_ipv6_mapped()
            .octets()
    };
    let ev = FlowEvent {
        saddr: mapped("10.244.0.10"),
        daddr: mapped("10.96.0.20"),
        sport: 40000,
        dport: 80,
        family: 4,
        protocol: proto::TCP,
        direction: dir::EGRESS,
        verdict: verdict::DROPPED,
        reason: ztrust_common::reason::POLICY_DENIED,
        ..Default::default()
    };
    let flow = view.enrich(&ev);
    assert_eq!(flow.service.as_ref(), Some(&svc));
    assert!(
        render_line(&flow).contains("10.96.0.20:80 (service payments/backend -> payments/backend-0) TCP"),
        "{}",
        render_line(&flow)
    );
    let answer = FlowEvent {
        saddr: ev.daddr,
        daddr: ev.saddr,
        sport: 80,
        dport: 40000,
        direction: dir::INGRESS,
        ..ev
    };
    assert_eq!(view.enrich(&answer).service, Some(svc));
    // Another port of the address is no frontend.
    assert_eq!(view.enrich(&FlowEvent { dport: 81, ..ev }).service, None);
}

/// A node port on every local address is named where the kernel judged the connection by it, and
/// only there: the same port at an address the node forwards is that address's.
#[test]
fn node_ports_at_any_local_address_are_named_where_the_kernel_judged_by_them() {
    let mut view = View::default();
    let svc = ServiceRef {
        name: "payments/backend".parse().unwrap(),
        backends: vec!["payments/backend-0".parse().unwrap()],
    };
    let any_local = crate::policy::services::ANY_LOCAL_V4;
    view.services.insert((any_local, 30080, proto::TCP), svc.clone());
    let mapped = |ip: &str| {
        ip.parse::<std::net::Ipv4Addr>()
            .unwrap()
            .to_ipv6_mapped()
            .octets()
    };
    let judged_by_it = FlowEvent {
        saddr: mapped("10.244.0.10"),
        daddr: mapped("192.0.2.77"),
        sport: 40000,
        dport: 30080,
        family: 4,
        protocol: proto::TCP,
        direction: dir::EGRESS,
        verdict: verdict::DROPPED,
        reason: ztrust_common::reason::POLICY_DENIED,
        flags: event_flags::NEW_FLOW | event_flags::SERVICE,
        ..Default::default()
    };
    assert_eq!(view.enrich(&judged_by_it).service, Some(svc));
    let as_the_address = FlowEvent {
        flags: event_flags::NEW_FLOW,
        ..judged_by_it
    };
    assert_eq!(view.enrich(&as_the_address).service, None);
    let to_the_unspecified = FlowEvent {
        daddr: mapped("0.0.0.0"),
        ..judged_by_it
    };
    assert_eq!(view.enrich(&to_the_unspecified).service, None);
}

#[test]
fn drop_lines_are_limited_per_second_and_the_rest_summed_up() {
    let start = Instant::now();
    let mut log = DropLog {
        window: start,
        logged: 0,
        suppressed: 0,
    };
    let admitted = (0..1_000).filter(|_| log.admit()).count();
    assert_eq!(admitted, DROP_LOG_PER_SECOND as usize);
    assert_eq!(log.suppressed, 1_000 - u64::from(DROP_LOG_PER_SECOND));
    log.roll(start + Duration::from_millis(999));
    assert!(!log.admit(), "still the same second");
    log.roll(start + Duration::from_secs(1));
    assert_eq!((log.logged, log.suppressed), (0, 0));
    assert!(log.admit(), "a new second, new lines");
}
