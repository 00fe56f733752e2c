use super::*;

fn p(from: &str, to: &str, port: u16, protocol: Protocol, result: Verdict) -> Probe {
    Probe {
        from: from.into(),
        to: to.into(),
        to_ip: "10.244.0.10".parse().unwrap(),
        port,
        protocol,
        result,
        detail: if result == Verdict::Allowed {
            "ok".into()
        } else {
            "timeout".into()
        },
        latency_ms: 1.5,
        via: None,
    }
}

fn sample() -> Matrix {
    use Protocol::*;
    use Verdict::*;
    Matrix::new(vec![
        p("payments/frontend", "payments/backend", 8080, Tcp, Allowed),
        p("payments/frontend", "payments/database", 5432, Tcp, Denied),
        p("kube-system/coredns", "payments/backend", 80, Tcp, Allowed),
        p("kube-system/coredns", "payments/backend", 81, Tcp, Denied),
        p("payments/frontend", "external/gw", 443, Tcp, Denied),
        p("payments/frontend", "kube-system/coredns", 53, Udp, Allowed),
        p("payments/frontend", "kube-system/coredns", 53, Tcp, Allowed),
    ])
}

#[test]
fn json_shape() {
    let j = sample().to_json();
    let first = &j.as_array().unwrap()[0];
    assert_eq!(first["from"], "kube-system/coredns");
    assert_eq!(first["to"], "payments/backend");
    assert_eq!(first["to_ip"], "10.244.0.10");
    assert_eq!(first["port"], 80);
    assert_eq!(first["protocol"], "TCP");
    assert_eq!(first["result"], "allowed");
    assert_eq!(first["detail"], "ok");
    assert_eq!(first["latency_ms"], 1.5);
    assert_eq!(Matrix::from_json(j).unwrap(), sample());
}

#[test]
fn table_cells_and_legend() {
    let t = sample().render_table();
    let lines: Vec<&str> = t.lines().collect();
    assert!(lines[0].starts_with("FROM \\ TO"), "{t}");
    // Pods before external hosts in the columns.
    assert!(
        lines[0].find("payments/backend").unwrap() < lines[0].find("external/gw").unwrap(),
        "{t}"
    );
    let coredns = lines
        .iter()
        .find(|l| l.starts_with("kube-system/coredns"))
        .unwrap();
    assert!(coredns.contains("80/TCP✓ 81/TCP✗"), "{t}");
    let frontend = lines.iter().find(|l| l.starts_with("payments/frontend")).unwrap();
    assert!(frontend.contains('✓') && frontend.contains('✗'), "{t}");
    assert!(coredns.contains('.'), "{t}");
    assert!(t.contains("✓ allowed  ✗ denied"), "{t}");
    // Aligned: every column starts at the same character in every row.
    let header: Vec<char> = lines[0].chars().collect();
    let starts: Vec<usize> = (1..header.len())
        .filter(|i| header[*i - 1] == ' ' && header[*i] != ' ' && header[*i - 2] == ' ')
        .collect();
    assert_eq!(starts.len(), 4, "{t}");
    for line in &lines[1..3] {
        let chars: Vec<char> = line.chars().collect();
        for s in &starts {
            assert!(
                chars[*s - 1] == ' ' && chars[*s] != ' ',
                "column at {s} in {line:?}\n{t}"
            );
        }
    }
}

#[test]
fn families_that_disagree_show_both() {
    let mut v6 = p("a/x", "a/y", 80, Protocol::Tcp, Verdict::Denied);
    v6.to_ip = "fd00:10:244::a".parse().unwrap();
    let m = Matrix::new(vec![p("a/x", "a/y", 80, Protocol::Tcp, Verdict::Allowed), v6]);
    assert!(
        m.render_table().contains("80/TCP(v4✓,v6✗)"),
        "{}",
        m.render_table()
    );
}

#[test]
fn diff_finds_changed_missing_and_extra() {
    let actual = sample();
    let expected = actual.expected_with(|p| p.result);
    assert!(actual.diff(&expected).is_empty());
    assert_eq!(actual.diff(&expected).render(), "all 7 probes as expected\n");

    let expected = actual.expected_with(|p| {
        if p.to == "payments/database" {
            Verdict::Allowed
        } else {
            p.result
        }
    });
    let d = actual.diff(&expected);
    assert_eq!(d.mismatches.len(), 1);
    assert_eq!(d.mismatches[0].expected, Some(Verdict::Allowed));
    assert_eq!(d.mismatches[0].actual, Some(Verdict::Denied));
    let text = d.render();
    assert!(text.contains("1 of 7 probes differ"), "{text}");
    assert!(
        text.contains("payments/database") && text.contains("5432/TCP") && text.contains("timeout"),
        "{text}"
    );

    let mut fewer = actual.clone();
    fewer.probes.pop();
    let d = fewer.diff(&actual.expected_with(|p| p.result));
    assert_eq!(d.mismatches.len(), 1);
    assert_eq!(d.mismatches[0].actual, None);
    let d = actual.diff(&fewer.expected_with(|p| p.result));
    assert_eq!(d.mismatches[0].expected, None);
}

#[test]
fn sctp_is_expected_unsupported() {
    let m = Matrix::new(vec![p("a/x", "a/y", 9, Protocol::Sctp, Verdict::Unsupported)]);
    assert_eq!(
        m.expected_with(|_| Verdict::Allowed).probes[0].result,
        Verdict::Unsupported
    );
    assert!(m.render_table().contains('?'));
}

#[test]
fn verdict_lookup_prefers_v4() {
    let m = sample();
    assert_eq!(
        m.verdict("payments/frontend", "payments/backend", 8080, Protocol::Tcp),
        Some(Verdict::Allowed)
    );
    assert_eq!(
        m.verdict("payments/frontend", "payments/backend", 9, Protocol::Tcp),
        None
    );
}

/// The payments example, planned and answered by the reference evaluator: the outcomes its README
/// promises.
#[test]
fn payments_example_expectations() {
    use super::super::alloc::Allocator;
    use super::super::manifests::{self, Kind};
    use super::super::state::{ExternalState, PodState};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/payments");
    let read = manifests::read_path(&dir).unwrap();
    let mut alloc = Allocator::new([]);
    let mut state = LabState::default();
    for o in &read.objects {
        match o.kind {
            Kind::Pod => {
                let pod = manifests::pod_model(o).0.unwrap();
                let (v4, v6) = alloc.next_pair(0).unwrap();
                state.pods.push(PodState {
                    namespace: pod.namespace,
                    name: pod.name,
                    labels: pod.labels,
                    ips: vec![v4.into(), v6.into()],
                    ports: pod.ports,
                    netns: "unused".into(),
                    ..Default::default()
                });
            }
            Kind::ExternalHost => {
                let x = manifests::external_host(o).unwrap();
                state.externals.push(ExternalState {
                    name: x.name,
                    ips: x.ips,
                    ports: x.ports,
                    ..Default::default()
                });
            }
            _ => {}
        }
    }
    let mut cluster = ztrust_agent::source::dir::load_dir(&dir).unwrap().cluster;
    for p in &state.pods {
        cluster
            .pods
            .get_mut(&ztrust_agent::model::ObjectRef::new(&p.namespace, &p.name))
            .unwrap()
            .ips = p.ips.clone();
    }
    let questions = Matrix::new(
        plan(
            &state,
            &ProbeOptions {
                family: Family::Both,
                ..Default::default()
            },
        )
        .unwrap()
        .into_iter()
        .map(|j| Probe {
            from: j.from,
            to: j.answers[0].0.clone(),
            to_ip: j.to_ip,
            port: j.port,
            protocol: j.protocol,
            result: Verdict::Allowed,
            detail: String::new(),
            latency_ms: 0.0,
            via: None,
        })
        .collect(),
    );
    let m = questions.expected_by_reference(&state, &cluster);
    let v = |from: &str, to: &str, port: u16, proto: Protocol| m.verdict(from, to, port, proto).unwrap();
    use Protocol::*;
    use Verdict::*;
    assert_eq!(v("payments/frontend", "payments/backend", 8080, Tcp), Allowed);
    assert_eq!(v("payments/frontend", "payments/database", 5432, Tcp), Denied);
    assert_eq!(v("payments/backend", "payments/database", 5432, Tcp), Allowed);
    assert_eq!(v("payments/database", "payments/frontend", 8080, Tcp), Denied);
    assert_eq!(
        v("payments/database", "external/payment-gateway", 443, Tcp),
        Denied
    );
    assert_eq!(v("payments/database", "kube-system/coredns", 53, Udp), Allowed);
    assert_eq!(v("payments/frontend", "kube-system/coredns", 53, Tcp), Allowed);
    assert_eq!(v("monitoring/prometheus", "payments/backend", 8080, Tcp), Allowed);
    assert_eq!(v("monitoring/prometheus", "payments/frontend", 8080, Tcp), Denied);
    assert_eq!(v("kube-system/coredns", "payments/backend", 8080, Tcp), Denied);
    assert_eq!(
        v("kube-system/coredns", "monitoring/prometheus", 9090, Tcp),
        Allowed
    );
    assert_eq!(v("payments/frontend", "payments/frontend", 8080, Tcp), Allowed);
    // IPv6 answers the same as IPv4 wherever both were probed.
    for p in m.probes.iter().filter(|p| p.to_ip.is_ipv6()) {
        let v4 = m.probes.iter().find(|q| {
            q.to_ip.is_ipv4() && (&q.from, &q.to, q.port, q.protocol) == (&p.from, &p.to, p.port, p.protocol)
        });
        assert_eq!(v4.map(|q| q.result), Some(p.result), "{p:?}");
    }
    eprintln!("{}", m.render_table());
}

#[test]
fn plan_uses_container_ports_and_overrides() {
    use ztrust_agent::model::ContainerPort;
    let pod = |ns: &str, name: &str, ip: &str, ports: Vec<ContainerPort>| super::super::PodState {
        namespace: ns.into(),
        name: name.into(),
        ips: vec![ip.parse().unwrap(), "fd00:10:244::a".parse().unwrap()],
        ports,
        netns: format!("t-{name}"),
        ..Default::default()
    };
    let tcp80 = ContainerPort {
        name: None,
        port: 80,
        protocol: Protocol::Tcp,
    };
    let udp53 = ContainerPort {
        name: None,
        port: 53,
        protocol: Protocol::Udp,
    };
    let state = LabState {
        pods: vec![
            pod("a", "x", "10.244.0.10", vec![tcp80.clone()]),
            pod("a", "y", "10.244.0.11", vec![tcp80, udp53]),
        ],
        ..Default::default()
    };
    let jobs = plan(&state, &ProbeOptions::default()).unwrap();
    assert_eq!(
        jobs.len(),
        2 + 2 * 2,
        "x,y each → x (1 port) and y (2 ports), IPv4 only"
    );
    assert!(jobs.iter().all(|j| j.to_ip.is_ipv4()));
    let both = plan(
        &state,
        &ProbeOptions {
            family: Family::Both,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(both.len(), 12);
    let ports = plan(
        &state,
        &ProbeOptions {
            ports: Some(vec![1, 2]),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ports.len(), 2 * 2 * 2);
    assert!(ports.iter().all(|j| j.protocol == Protocol::Tcp));
    let udp = plan(
        &state,
        &ProbeOptions {
            protocols: Some(vec![Protocol::Udp]),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(udp.len(), 2);
    let from = plan(
        &state,
        &ProbeOptions {
            from: vec!["a/x".into()],
            ..Default::default()
        },
    )
    .unwrap();
    assert!(from.iter().all(|j| j.from == "a/x" && j.netns == "t-x"));
}
