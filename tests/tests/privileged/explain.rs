//! The operator's tools against the payments lab with the real agent: `explain`, `what-if`, `suggest`.
//!
//! `explain`: for every probe of the lab's matrix (real
//! connections, by the pods' own addresses and through the Services' ClusterIPs) the agent's answer is
//! the outcome of the connection, and the kernel maps agree with it; an allow entry removed from the
//! kernel behind the agent's back is said (and the real connection is then dropped, as the kernel says).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData};
use ztrust_agent::cli_explain::{Ask, Outcome, ask};
use ztrust_agent::datapath::loader::open_pinned;
use ztrust_agent::explain::{Explanation, Query, Target};
use ztrust_agent::flows::Verdict;
use ztrust_agent::model::ObjectRef;
use ztrust_common::{EndpointInfo, PolicyKey, PolicyValue, dir, names};
use ztrust_lab::probe::{Family, ProbeOptions, Verdict as Probed};

use crate::common::payments::{PaymentsLab, connects};
use crate::common::{agent_bin, lab_bin};

fn explain(lab: &PaymentsLab, query: &Query) -> Explanation {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(ask(&lab.connect(), &Ask::Query(query.clone())))
        .unwrap_or_else(|e| panic!("explain {query:?}: {e:#}"))
}

#[test]
fn every_probe_is_explained_as_it_went_and_the_kernel_agrees() {
    let mut lab = PaymentsLab::up("ex", agent_bin(), &[]);
    lab.apply(&crate::common::payments::payments().join("services.yaml"));
    let probe = |via_service: bool| {
        ztrust_lab::probe(
            &lab.state_dir,
            &ProbeOptions {
                family: Family::Both,
                via_service,
                ..Default::default()
            },
        )
        .unwrap()
    };
    // The agent has applied the policies once explain's answers agree with the kernel on a known pair.
    let deadline = Instant::now() + Duration::from_secs(15);
    let known = Query::parse("payments/frontend", "payments/database:5432").unwrap();
    while !(explain(&lab, &known).consistent() && explain(&lab, &known).verdict == Verdict::Dropped) {
        assert!(Instant::now() < deadline, "the agent never applied the policies");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (mut checked, mut denied, mut via) = (0, 0, 0);
    for m in [probe(false), probe(true)] {
        for p in &m.probes {
            if p.result == Probed::Unsupported {
                continue;
            }
            let (addr, port) = p.via.as_ref().map_or((p.to_ip, p.port), |v| (v.address, v.port));
            let query = Query {
                from: Target::Pod(p.from.parse().unwrap()),
                to: Target::Address(addr),
                port,
                protocol: p.protocol,
            };
            let x = explain(&lab, &query);
            let text = ztrust_agent::explain::render(&x);
            assert!(x.consistent(), "{p:?}\n{text}");
            assert!(
                x.ends
                    .iter()
                    .filter(|e| e.here)
                    .all(|e| e.kernel.as_ref().is_some_and(|k| k.agrees)),
                "{p:?}: every end on the node is checked against the kernel\n{text}"
            );
            let want = if p.result == Probed::Allowed {
                Verdict::Forwarded
            } else {
                Verdict::Dropped
            };
            assert_eq!(x.verdict, want, "{p:?}\n{text}");
            checked += 1;
            denied += usize::from(want == Verdict::Dropped);
            via += usize::from(p.via.is_some());
        }
    }
    eprintln!("{checked} probes explained as they went ({denied} denied, {via} through Services)");
    assert!(
        checked - denied > 20 && denied > 20 && via > 10,
        "{checked} / {denied} / {via}"
    );
}

#[test]
fn a_kernel_entry_lost_behind_the_agents_back_is_said_and_the_cli_exits_3() {
    let lab = PaymentsLab::up("ey", agent_bin(), &[]);
    let backend = lab.pod("backend");
    let dst = SocketAddr::new(backend.ips[0], 8080);
    let query = Query::parse("payments/frontend", "payments/backend:8080").unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(explain(&lab, &query).consistent()
        && connects(&lab.pod("frontend").netns, dst, Duration::from_secs(1)))
    {
        assert!(Instant::now() < deadline, "frontend → backend:8080 never allowed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let x = explain(&lab, &query);
    assert_eq!(x.verdict, Verdict::Forwarded);

    // The backend's ingress allow entries go from the kernel's exact-port map; the agent does not know.
    let pin_dir = lab.agent().pin_dir;
    // The backend's interface (in the node's network namespace), as the answer's kernel check names it.
    let ifindex = x
        .ends
        .iter()
        .find(|e| e.pod == ObjectRef::new("payments", "backend"))
        .and_then(|e| e.kernel.as_ref())
        .unwrap()
        .ifindex;
    let endpoints: BpfHashMap<MapData, u32, EndpointInfo> = open_pinned(&pin_dir, names::ENDPOINTS).unwrap();
    let endpoint_id = endpoints.get(&ifindex, 0).unwrap().endpoint_id;
    let mut exact: BpfHashMap<MapData, PolicyKey, PolicyValue> =
        open_pinned(&pin_dir, names::POLICY_EXACT).unwrap();
    let gone: Vec<PolicyKey> = exact
        .keys()
        .flatten()
        .filter(|k| u32::from_be_bytes(k.endpoint) == endpoint_id && k.direction == dir::INGRESS)
        .collect();
    assert!(!gone.is_empty(), "the backend has ingress entries to lose");
    for k in &gone {
        exact.remove(k).unwrap();
    }

    let x = explain(&lab, &query);
    let text = ztrust_agent::explain::render(&x);
    assert_eq!(Outcome::of(&x), Outcome::Inconsistent, "{text}");
    let end = x
        .ends
        .iter()
        .find(|e| e.pod == ObjectRef::new("payments", "backend"))
        .unwrap();
    let k = end.kernel.as_ref().unwrap();
    assert_eq!((k.verdict, k.agrees), (Verdict::Dropped, false), "{text}");
    assert!(text.contains("DIFFERS"), "{text}");
    // The kernel's word is what happens: the connection is dropped now.
    assert!(!connects(
        &lab.pod("frontend").netns,
        dst,
        Duration::from_millis(500)
    ));

    // The CLI says the same, with exit status 3.
    let out = Command::new(lab_bin())
        .args(["explain", "--state-dir"])
        .arg(&lab.state_dir)
        .args(["payments/frontend", "payments/backend:8080"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("! the kernel maps say dropped (policy-denied)"),
        "{stdout}"
    );

    // An unknown pod is an error naming it, exit status 2.
    let out = Command::new(lab_bin())
        .args(["explain", "--state-dir"])
        .arg(&lab.state_dir)
        .args(["payments/frontend", "payments/nope:80"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pod payments/nope: no such pod"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `what-if` on the lab's recorded flows (the agent logs allowed connections too): a draft deleting the
/// frontend → backend policy shows that connection newly dropped, and applies nothing (the real
/// connection still goes through); a malformed draft is an error naming the object and field.
#[test]
fn what_if_shows_the_connections_a_draft_drops_and_changes_nothing() {
    let lab = PaymentsLab::up("ew", agent_bin(), &["--log-allowed"]);
    let backend = SocketAddr::new(lab.pod("backend").ips[0], 8080);
    let frontend_ns = lab.pod("frontend").netns;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !connects(&frontend_ns, backend, Duration::from_secs(1)) {
        assert!(Instant::now() < deadline, "frontend → backend:8080 never allowed");
    }
    ztrust_lab::probe(&lab.state_dir, &ProbeOptions::default()).unwrap();
    let what_if = |args: &[&str]| {
        let out = Command::new(lab_bin())
            .args(["what-if", "--state-dir"])
            .arg(&lab.state_dir)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The flows reach the agent's ring asynchronously: ask until the connection shows.
    let (code, out) = loop {
        let (code, out, err) = what_if(&["--delete", "payments/frontend-to-backend", "-o", "json"]);
        assert!(matches!(code, Some(0 | 1)), "{out}{err}");
        if code == Some(1) || Instant::now() > deadline {
            break (code, out);
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(code, Some(1), "{out}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        r["draft"]["deleted"],
        serde_json::json!(["payments/frontend-to-backend"])
    );
    assert_eq!(
        r["recorded_otherwise"], 0,
        "the recorded verdicts are the current policies': {r}"
    );
    let changed = r["changed"].as_array().unwrap();
    assert!(
        changed.iter().any(|c| c["from"] == "payments/frontend"
            && c["to"] == "payments/backend"
            && c["port"] == 8080
            && c["before"] == "forwarded"
            && c["after"] == "dropped"),
        "{r}"
    );
    assert!(
        changed
            .iter()
            .all(|c| c["to"] == "payments/backend" || c["to"] == "10.96.0.21"),
        "only the backend: {r}"
    );
    // Nothing was applied.
    assert!(connects(&frontend_ns, backend, Duration::from_secs(1)));

    let bad = lab.state_dir.join("bad-draft.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: payments}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: 70000}]}]\n",
    )
    .unwrap();
    let (code, _, err) = what_if(&["-f", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("NetworkPolicy payments/bad") && err.contains("spec.ingress[0].ports[0]"),
        "{err}"
    );
}

/// `suggest` from the lab's recorded connections: the policies it writes read back, `what-if` of them in
/// place of the lab's own drops none of the recorded connections, and applied for real (the lab's own
/// policies deleted) they give the probe matrix the lab's policies gave: everything observed allowed,
/// nothing more.
#[test]
fn suggested_policies_enforce_what_was_observed_and_nothing_more() {
    let lab = PaymentsLab::up("es", agent_bin(), &["--log-allowed"]);
    let before = ztrust_lab::probe(&lab.state_dir, &ProbeOptions::default()).unwrap();
    let lab_cmd = |args: &[&str]| {
        let out = Command::new(lab_bin())
            .arg(args[0])
            .arg("--state-dir")
            .arg(&lab.state_dir)
            .args(&args[1..])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The probe's flows reach the agent's ring asynchronously: the suggestion grows until all are in.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut yaml = String::new();
    loop {
        let (code, out, err) = lab_cmd(&["suggest", "--namespace", "payments"]);
        assert_eq!(code, Some(0), "{err}");
        if out == yaml || Instant::now() > deadline {
            break;
        }
        yaml = out;
        std::thread::sleep(Duration::from_millis(500));
    }
    let loaded = ztrust_agent::source::dir::parse_str("suggested.yaml", &yaml);
    assert!(loaded.errors.is_empty(), "{:?}\n{yaml}", loaded.errors);
    assert!(loaded.cluster.policies.len() >= 4, "{yaml}");
    let file = lab.state_dir.join("suggested.yaml");
    std::fs::write(&file, &yaml).unwrap();

    // What-if: the suggestion in place of the lab's policies drops no recorded connection.
    let policies = crate::common::payments::payments().join("policies");
    let mut args = vec![
        "what-if".to_owned(),
        "-f".to_owned(),
        file.to_str().unwrap().to_owned(),
    ];
    for p in ztrust_agent::source::dir::load_dir(&policies)
        .unwrap()
        .cluster
        .policies
        .keys()
    {
        args.extend(["--delete".to_owned(), p.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = lab_cmd(&args);
    assert_eq!(code, Some(0), "{out}{err}\n{yaml}");

    // For real: the lab's policies out, the suggestion in.
    let (code, _, err) = lab_cmd(&["delete", policies.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = lab_cmd(&["apply", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let after = ztrust_lab::probe(&lab.state_dir, &ProbeOptions::default()).unwrap();
        let diff = after.diff(&before);
        if diff.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the suggestion enforces another matrix:\n{}\n{yaml}",
            diff.render()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
