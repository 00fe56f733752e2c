//! Audit mode for safe roll-out (root only; `cargo xtask test` runs it): a namespace annotated
//! `ztrust.io/mode: audit` drops nothing and reports what enforcement would drop as `would-drop`;
//! switching it back to enforce takes effect without restarting anything.

use std::time::Duration;

use crate::common::payments::PaymentsLab;
use crate::common::{agent_bin, require_root};
use ztrust_agent::model::Protocol;
use ztrust_lab::{self as lab, Matrix, ProbeOptions, Verdict};

fn namespace(mode: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: payments\n  labels:\n    kubernetes.io/metadata.name: payments\n    team: payments\n  annotations:\n    ztrust.io/mode: {mode}\n"
    )
}

fn frontend_to_database(m: &Matrix) -> Option<Verdict> {
    m.verdict("payments/frontend", "payments/database", 5432, Protocol::Tcp)
}

#[test]
fn audit_namespace_reports_would_drop_and_switches_back_live() {
    require_root();
    let mut lab = PaymentsLab::up("zta", agent_bin(), &["--metrics-addr", "none"]);
    let opts = ProbeOptions {
        timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let enforced = lab::probe(&lab.state_dir, &opts).unwrap();
    assert_eq!(frontend_to_database(&enforced), Some(Verdict::Denied));

    // Audit: the same policies, nothing dropped, the would-be drops reported.
    let ns_file = lab.state_dir.join("payments-ns.yaml");
    std::fs::write(&ns_file, namespace("audit")).unwrap();
    lab.apply(&ns_file);
    let audited = lab::probe(&lab.state_dir, &opts).unwrap();
    assert_eq!(
        frontend_to_database(&audited),
        Some(Verdict::Allowed),
        "audit mode drops nothing"
    );
    let flows = std::fs::read_to_string(&lab.agent().flow_log).unwrap();
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
    assert!(
        would_drop["policies"].as_array().is_some_and(|p| !p.is_empty()),
        "{would_drop}"
    );

    // Back to enforce, live.
    std::fs::write(&ns_file, namespace("enforce")).unwrap();
    lab.apply(&ns_file);
    let again = lab::probe(&lab.state_dir, &opts).unwrap();
    assert_eq!(
        frontend_to_database(&again),
        Some(Verdict::Denied),
        "enforcing again without a restart"
    );
    assert!(
        again.diff(&enforced).is_empty(),
        "same matrix as before the audit:\n{}",
        again.diff(&enforced).render()
    );
}
