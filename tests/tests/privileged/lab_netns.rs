//! The lab for real: network namespaces, veths, routes and servers, with no enforcement attached.
//!
//! Needs root (it creates network namespaces). Each test uses its own namespace prefix and state directory,
//! so it can run next to another lab, and a guard takes the lab down even when an assertion fails.
//!
//! `cargo test -p ztrust-tests --test privileged lab_netns::` (root)

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{agent_bin, lab_bin, require_root};
use ztrust_agent::model::Protocol;
use ztrust_lab::{
    self as lab, ApplyOptions, DownOptions, Family, LabelChange, LabelKind, ProbeOptions, UpOptions, Verdict,
};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/payments")
}

/// Takes the lab down when the test ends, however it ends.
struct Lab {
    state_dir: PathBuf,
    prefix: String,
    _dir: tempfile::TempDir,
}

impl Lab {
    fn new(tag: &str) -> Self {
        std::fs::create_dir_all("/run/ztrust").unwrap();
        let dir = tempfile::Builder::new()
            .prefix("lab-test-")
            .tempdir_in("/run/ztrust")
            .unwrap();
        // Short: interface and namespace names stay readable; unique per process and test.
        let prefix = format!("ztt{}{tag}", std::process::id() % 100_000);
        Self {
            state_dir: dir.path().join("state"),
            prefix,
            _dir: dir,
        }
    }

    fn up_opts<'a>(&self) -> UpOptions<'a> {
        UpOptions {
            state_dir: self.state_dir.clone(),
            prefix: self.prefix.clone(),
            lab_bin: Some(lab_bin().into()),
            ..Default::default()
        }
    }

    fn netns(&self) -> Vec<String> {
        let want = format!("{}-", self.prefix);
        let mut v: Vec<String> = std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&want))
            .collect();
        v.sort();
        v
    }

    fn servers(&self) -> usize {
        let tag = format!("--lab {}", self.state_dir.display());
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                cmd.contains(&tag)
                    && !state
                        .rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .count()
    }

    fn down(&self) -> lab::DownReport {
        lab::down(&DownOptions {
            state_dir: self.state_dir.clone(),
            prefix: self.prefix.clone(),
        })
        .unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = lab::down(&DownOptions {
            state_dir: self.state_dir.clone(),
            prefix: self.prefix.clone(),
        });
    }
}

fn ip_n(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", netns])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip -n {netns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn payments_without_enforcement_everything_reaches_everything() {
    require_root();
    let lab = Lab::new("a");
    let node = format!("{}-node", lab.prefix);
    let seen = RefCell::new(Vec::new());
    let mut hook = |links: &[String]| -> Result<(), lab::HookError> {
        // Created, not yet up: the moment to attach enforcement.
        for l in links {
            let show = ip_n(&node, &["link", "show", l]);
            assert!(show.contains("state DOWN"), "{l} is up before the hook: {show}");
        }
        seen.borrow_mut().extend(links.iter().cloned());
        Ok(())
    };
    let report = lab::up(
        &example().join("cluster.yaml"),
        UpOptions {
            before_link_up: Some(&mut hook),
            ..lab.up_opts()
        },
    )
    .unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(
        *seen.borrow(),
        ["ztl1", "ztl2", "ztl3", "ztl4", "ztl5"],
        "pods only, not the external host"
    );

    let state = lab::status(&lab.state_dir).unwrap();
    assert_eq!(state.pods.len(), 5);
    assert_eq!(state.externals.len(), 1);
    assert_eq!(
        lab.netns().len(),
        7,
        "node, five pods, one external host: {:?}",
        lab.netns()
    );
    assert_eq!(lab.servers(), 6);

    // The node routes each pod address to the pod's interface (how the agent binds pods to interfaces).
    let frontend = state.pod("payments/frontend").unwrap();
    let host_if = frontend.host_if.clone().unwrap();
    let routes = ip_n(&node, &["route", "show"]);
    assert!(
        routes.contains(&format!("{} dev {host_if}", frontend.ips[0])),
        "{routes}"
    );
    let routes6 = ip_n(&node, &["-6", "route", "show"]);
    assert!(
        routes6.contains(&format!("{} dev {host_if}", frontend.ips[1])),
        "{routes6}"
    );

    // The agent's source: every object, pods with their addresses.
    let manifests = lab.state_dir.join("manifests");
    let copy = std::fs::read_to_string(manifests.join("pod-payments-frontend.yaml")).unwrap();
    assert!(copy.contains(&format!("podIP: {}", frontend.ips[0])), "{copy}");
    let loaded = ztrust_agent::source::dir::load_dir(&manifests).unwrap();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    assert_eq!(loaded.cluster.pods.len(), 5);
    assert_eq!(loaded.cluster.namespaces.len(), 3);
    assert_eq!(loaded.cluster.pods[&frontend_ref()].ips, frontend.ips);

    let started = std::time::Instant::now();
    let m = lab::probe(
        &lab.state_dir,
        &ProbeOptions {
            family: Family::Both,
            ..Default::default()
        },
    )
    .unwrap();
    eprintln!("{}", m.render_table());
    // 5 sources × (frontend, backend, database, prometheus: 1 port; coredns: 2; gateway: 1) on IPv4, and the
    // same without the gateway (no IPv6 address) on IPv6.
    assert_eq!(m.probes.len(), 5 * 7 + 5 * 6);
    let expected = m.expected_with(|_| Verdict::Allowed);
    let diff = m.diff(&expected);
    assert!(diff.is_empty(), "{diff}");
    assert!(
        started.elapsed().as_secs() < 5,
        "probing took {:?}",
        started.elapsed()
    );
    assert_eq!(
        m.verdict("kube-system/coredns", "kube-system/coredns", 53, Protocol::Udp),
        Some(Verdict::Allowed)
    );
    assert_eq!(
        m.verdict(
            "payments/database",
            "external/payment-gateway",
            443,
            Protocol::Tcp
        ),
        Some(Verdict::Allowed)
    );

    // A port nobody serves is refused, not a timeout; SCTP is reported as untestable.
    let m = lab::probe(
        &lab.state_dir,
        &ProbeOptions {
            ports: Some(vec![9]),
            protocols: Some(vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp]),
            from: vec!["payments/frontend".into()],
            to: vec!["payments/backend".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let got: Vec<(Protocol, Verdict, &str)> = m
        .probes
        .iter()
        .map(|p| (p.protocol, p.result, p.detail.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (Protocol::Tcp, Verdict::Denied, "refused"),
            (Protocol::Udp, Verdict::Denied, "refused"),
            (
                Protocol::Sctp,
                Verdict::Unsupported,
                "no SCTP sockets in this kernel"
            ),
        ]
    );

    let r = lab.down();
    assert_eq!(r.netns_deleted.len(), 7);
    assert!(lab.netns().is_empty(), "left behind: {:?}", lab.netns());
    assert_eq!(lab.servers(), 0);
    assert!(!lab.state_dir.exists());
}

fn frontend_ref() -> ztrust_agent::model::ObjectRef {
    ztrust_agent::model::ObjectRef::new("payments", "frontend")
}

#[test]
fn apply_label_delete_and_down_without_state() {
    require_root();
    let lab = Lab::new("b");
    lab::up(&example().join("cluster.yaml"), lab.up_opts()).unwrap();
    // `up` again: the first lab is cleaned away, the same lab comes back.
    lab::up(&example().join("cluster.yaml"), lab.up_opts()).unwrap();
    assert_eq!(lab.netns().len(), 7);
    assert_eq!(lab.servers(), 6);

    let dir = tempfile::tempdir().unwrap();
    let extra = dir.path().join("extra.yaml");
    std::fs::write(
        &extra,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: extra, namespace: payments, labels: {app: extra}}\n\
         spec: {containers: [{name: c, image: x, ports: [{containerPort: 80}, {containerPort: 5353, protocol: UDP}]}]}\n\
         status: {podIP: 10.244.0.77}\n",
    )
    .unwrap();
    let r = lab::apply(
        &extra,
        ApplyOptions {
            state_dir: lab.state_dir.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.changed, ["Pod payments/extra"]);
    let pod = lab::status(&lab.state_dir)
        .unwrap()
        .pod("payments/extra")
        .cloned()
        .unwrap();
    assert_eq!(
        pod.ips,
        ["10.244.0.77".parse::<std::net::IpAddr>().unwrap()],
        "the manifest's address is kept"
    );
    let m = lab::probe(
        &lab.state_dir,
        &ProbeOptions {
            to: vec!["payments/extra".into()],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(m.probes.len(), 6 * 2);
    assert!(
        m.diff(&m.expected_with(|_| Verdict::Allowed)).is_empty(),
        "{}",
        m.render_table()
    );

    // Policies applied to the lab land in manifests/ (nothing enforces them here).
    lab::apply(
        &example().join("policies"),
        ApplyOptions {
            state_dir: lab.state_dir.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    let manifests = lab.state_dir.join("manifests");
    assert!(
        manifests
            .join("networkpolicy-payments-default-deny-all.yaml")
            .exists()
    );
    let loaded = ztrust_agent::source::dir::load_dir(&manifests).unwrap();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    assert_eq!(loaded.cluster.policies.len(), 7);

    lab::label(
        &lab.state_dir,
        LabelKind::Pod,
        "payments/extra",
        &["app-".parse().unwrap(), "tier=x".parse().unwrap()],
    )
    .unwrap();
    lab::label(
        &lab.state_dir,
        LabelKind::Namespace,
        "payments",
        &[LabelChange {
            key: "env".into(),
            value: Some("lab".into()),
        }],
    )
    .unwrap();
    let loaded = ztrust_agent::source::dir::load_dir(&manifests).unwrap();
    let extra_ref = ztrust_agent::model::ObjectRef::new("payments", "extra");
    assert_eq!(
        loaded.cluster.pods[&extra_ref].labels.iter().collect::<Vec<_>>(),
        [(&"tier".to_owned(), &"x".to_owned())]
    );
    assert_eq!(
        loaded.cluster.namespaces["payments"]
            .labels
            .get("env")
            .map(String::as_str),
        Some("lab")
    );
    assert!(
        lab::label(
            &lab.state_dir,
            LabelKind::Pod,
            "payments/nope",
            &["a=b".parse().unwrap()]
        )
        .is_err()
    );

    lab::delete(&extra, &lab.state_dir).unwrap();
    assert!(!manifests.join("pod-payments-extra.yaml").exists());
    assert_eq!(lab.netns().len(), 7);
    assert_eq!(lab.servers(), 6);

    // A crashed lab: no state.json. `down` still finds the servers and namespaces.
    std::fs::remove_file(lab.state_dir.join("state.json")).unwrap();
    let r = lab.down();
    assert_eq!(r.killed.len(), 6);
    assert!(lab.netns().is_empty(), "left behind: {:?}", lab.netns());
    assert_eq!(lab.servers(), 0);
}

/// The whole exercise with the real agent enforcing in the node: before any policy everything is allowed;
/// with the example's policies the matrix is exactly what the reference evaluator says.
#[test]
fn payments_with_the_agent_enforces_the_policies() {
    require_root();
    let lab = Lab::new("c");
    let pin_dir = lab::ops::default_agent_pin_dir(&lab.prefix);
    lab::up(
        &example().join("cluster.yaml"),
        UpOptions {
            agent: Some(lab::AgentSpec {
                bin: Some(agent_bin().into()),
                ..Default::default()
            }),
            ..lab.up_opts()
        },
    )
    .unwrap();
    let state = lab::status(&lab.state_dir).unwrap();
    let agent = state
        .first_node()
        .agent
        .clone()
        .expect("the lab records its agent");
    // `up` returned, so the agent had pinned its links on every pod interface before they came up.
    for p in &state.pods {
        let ifname = p.host_if.as_deref().unwrap();
        assert!(
            pin_dir.join("links/from-pod").join(ifname).exists(),
            "{ifname} not attached"
        );
    }

    let probe = || lab::probe(&lab.state_dir, &ProbeOptions::default()).unwrap();
    let m = probe();
    assert!(
        m.diff(&m.expected_with(|_| Verdict::Allowed)).is_empty(),
        "no policy yet:\n{}",
        m.render_table()
    );

    lab::apply(
        &example().join("policies"),
        ApplyOptions {
            state_dir: lab.state_dir.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    let cluster = ztrust_agent::source::dir::load_dir(&lab.state_dir.join("manifests"))
        .unwrap()
        .cluster;
    // The agent polls its source: give it a few rounds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (m, diff) = loop {
        let m = probe();
        let diff = m.diff(&m.expected_by_reference(&state, &cluster));
        if diff.is_empty() || std::time::Instant::now() > deadline {
            break (m, diff);
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    eprintln!("{}", m.render_table());
    assert!(diff.is_empty(), "{diff}");
    use Verdict::*;
    assert_eq!(
        m.verdict("payments/frontend", "payments/backend", 8080, Protocol::Tcp),
        Some(Allowed)
    );
    assert_eq!(
        m.verdict("payments/frontend", "payments/database", 5432, Protocol::Tcp),
        Some(Denied)
    );
    assert_eq!(
        m.verdict("payments/backend", "payments/database", 5432, Protocol::Tcp),
        Some(Allowed)
    );
    assert_eq!(
        m.verdict("payments/database", "payments/frontend", 8080, Protocol::Tcp),
        Some(Denied)
    );
    assert_eq!(
        m.verdict(
            "payments/database",
            "external/payment-gateway",
            443,
            Protocol::Tcp
        ),
        Some(Denied)
    );
    let denied = m.probes.iter().find(|p| p.result == Denied).unwrap();
    assert_eq!(denied.detail, "timeout", "a policy drop is silent: {denied:?}");

    // Relabelling is policy too: the frontend, labelled as a backend, may now reach the database, at once.
    lab::label(
        &lab.state_dir,
        LabelKind::Pod,
        "payments/frontend",
        &["app=backend".parse().unwrap()],
    )
    .unwrap();
    let m = lab::probe(
        &lab.state_dir,
        &ProbeOptions {
            from: vec!["payments/frontend".into()],
            to: vec!["payments/database".into()],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        m.verdict("payments/frontend", "payments/database", 5432, Protocol::Tcp),
        Some(Allowed)
    );

    let r = lab.down();
    assert_eq!(r.agent_killed, [agent.pid]);
    assert!(!pin_dir.exists(), "the agent's pins are removed");
    assert!(
        !lab.state_dir.exists(),
        "state, manifests, logs, flow log and socket are removed"
    );
    assert!(lab.netns().is_empty(), "left behind: {:?}", lab.netns());
}
