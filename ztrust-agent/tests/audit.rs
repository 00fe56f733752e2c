//! Audit mode for safe roll-out (root only; `cargo xtask test` runs it): a namespace annotated
//! `ztrust.io/mode: audit` drops nothing and reports what enforcement would drop as `would-drop`;
//! switching it back to enforce takes effect without restarting anything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ztrust_agent::lab::{self, ApplyOptions, DownOptions, Matrix, ProbeOptions, UpOptions, Verdict};
use ztrust_agent::model::Protocol;

const AGENT: &str = env!("CARGO_BIN_EXE_ztrust-agent");

fn payments() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/payments")
}

struct Lab {
    state_dir: PathBuf,
    prefix: String,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = lab::down(&DownOptions { state_dir: self.state_dir.clone(), prefix: self.prefix.clone() });
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

fn namespace(mode: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: payments\n  labels:\n    kubernetes.io/metadata.name: payments\n    team: payments\n  annotations:\n    ztrust.io/mode: {mode}\n"
    )
}

fn frontend_to_database(m: &Matrix) -> Option<Verdict> {
    m.verdict("payments/frontend", "payments/database", 5432, Protocol::Tcp)
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn audit_namespace_reports_would_drop_and_switches_back_live() {
    assert!(nix::unistd::geteuid().is_root(), "run as root");
    std::fs::create_dir_all("/run/ztrust").unwrap();
    let prefix = format!("zta{}", std::process::id() % 10_000);
    let lab = Lab { state_dir: PathBuf::from(format!("/run/ztrust/audit-test-{}", std::process::id())), prefix };
    let apply = |path: &Path| {
        lab::apply(path, ApplyOptions { state_dir: lab.state_dir.clone(), ..Default::default() }).expect("apply")
    };
    lab::up(
        &payments().join("cluster.yaml"),
        UpOptions {
            state_dir: lab.state_dir.clone(),
            prefix: lab.prefix.clone(),
            if_prefix: format!("{}l", lab.prefix),
            ext_if_prefix: format!("{}x", lab.prefix),
            agent_bin: Some(AGENT.into()),
            agent: Some(lab::AgentSpec {
                bin: Some(AGENT.into()),
                extra_args: vec!["--metrics-addr".into(), "none".into()],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .expect("lab up");
    apply(&payments().join("policies"));
    let opts = ProbeOptions { timeout: Duration::from_millis(300), ..Default::default() };
    let enforced = lab::probe(&lab.state_dir, &opts).unwrap();
    assert_eq!(frontend_to_database(&enforced), Some(Verdict::Denied));

    // Audit: the same policies, nothing dropped, the would-be drops reported.
    let ns_file = lab.state_dir.join("payments-ns.yaml");
    std::fs::write(&ns_file, namespace("audit")).unwrap();
    apply(&ns_file);
    let audited = lab::probe(&lab.state_dir, &opts).unwrap();
    assert_eq!(frontend_to_database(&audited), Some(Verdict::Allowed), "audit mode drops nothing");
    let state = lab::status(&lab.state_dir).unwrap();
    let flows = std::fs::read_to_string(&state.agent.as_ref().unwrap().flow_log).unwrap();
    let would_drop = flows
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|f| {
            f["verdict"] == "would-drop"
                && f["source"]["pod"] == "frontend"
                && f["destination"]["pod"] == "database"
                && f["destination"]["port"] == 5432
        });
    let would_drop = would_drop.expect("a would-drop flow for frontend -> database:5432");
    assert_eq!(would_drop["reason"], "policy-denied");
    assert!(would_drop["policies"].as_array().is_some_and(|p| !p.is_empty()), "{would_drop}");

    // Back to enforce, live.
    std::fs::write(&ns_file, namespace("enforce")).unwrap();
    apply(&ns_file);
    let again = lab::probe(&lab.state_dir, &opts).unwrap();
    assert_eq!(frontend_to_database(&again), Some(Verdict::Denied), "enforcing again without a restart");
    assert!(again.diff(&enforced).is_empty(), "same matrix as before the audit:\n{}", again.diff(&enforced).render());
}
