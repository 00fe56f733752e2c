//! `ztrust-agent lint` as CI runs it: the exit status (0 nothing at or above `--fail-on`, 1 findings,
//! 2 unreadable input) and the JSON.

use std::path::PathBuf;
use std::process::{Command, Output};

/// A directory of its own with these files.
fn manifests(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ztrust-lint-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, text) in files {
        std::fs::write(dir.join(file), text).unwrap();
    }
    dir
}

fn lint(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ztrust-agent"))
        .arg("lint")
        .args(args)
        .output()
        .expect("ztrust-agent lint")
}

const SEED_DNS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-dns, namespace: payments}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports: [{protocol: TCP, port: 53}, {protocol: UDP, port: 53}]
"#;

#[test]
fn findings_exit_1_with_json_naming_code_object_and_field() {
    let dir = manifests("seed", &[("dns.yaml", SEED_DNS)]);
    let out = lint(&[dir.to_str().unwrap(), "-o", "json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let findings: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(findings.len(), 1, "{findings:#?}");
    let f = &findings[0];
    assert_eq!(f["code"], "ZT004");
    assert_eq!(f["check"], "dns-to-anywhere");
    assert_eq!(f["severity"], "warning");
    assert_eq!(f["object"], "NetworkPolicy payments/allow-dns");
    assert_eq!(f["field"], "spec.egress[0]");
    assert!(f["fix"].as_str().unwrap().contains("kube-dns"), "{f}");
    // Only warnings: with --fail-on error the status is 0, the table still says them.
    let out = lint(&[dir.to_str().unwrap(), "--fail-on", "error"]);
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("ZT004") && table.contains("1 findings: 0 errors, 1 warnings"),
        "{table}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_clean_directory_exits_0_and_unreadable_input_2() {
    let clean = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: payments}
spec: {podSelector: {}, policyTypes: [Ingress]}
"#;
    let dir = manifests("clean", &[("deny.yaml", clean)]);
    let out = lint(&[dir.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no findings\n");
    std::fs::remove_dir_all(dir).unwrap();

    let out = lint(&["/nonexistent/ztrust-lint"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/ztrust-lint"), "{err}");
}

#[test]
fn a_malformed_policy_is_an_error_finding_naming_its_field() {
    let bad = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: payments}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/33}}]
"#;
    let dir = manifests("bad", &[("bad.yaml", bad)]);
    let out = lint(&[dir.to_str().unwrap(), "-o", "json", "--fail-on", "error"]);
    assert_eq!(out.status.code(), Some(1));
    let findings: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let f = findings.iter().find(|f| f["code"] == "ZT000").expect("ZT000");
    assert_eq!(f["severity"], "error");
    assert!(f["field"].as_str().unwrap().contains("ipBlock"), "{f}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_clusters_own_namespaces_are_left_out_unless_asked_for() {
    let coredns = r#"
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec: {containers: [{name: coredns}]}
"#;
    let dir = manifests("system", &[("coredns.yaml", coredns)]);
    let out = lint(&[dir.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = lint(&[dir.to_str().unwrap(), "--exclude-namespace", "", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let findings: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let codes: Vec<&str> = findings.iter().map(|f| f["code"].as_str().unwrap()).collect();
    assert_eq!(codes, vec!["ZT001", "ZT002"]);
    assert!(findings.iter().all(|f| f["namespace"] == "kube-system"));
    // And a check can be skipped by its code.
    let out = lint(&[
        dir.to_str().unwrap(),
        "--exclude-namespace",
        "",
        "--skip",
        "ZT001,ZT002",
    ]);
    assert_eq!(out.status.code(), Some(0));
    std::fs::remove_dir_all(dir).unwrap();
}

/// `lint --kube` reads one whole snapshot through the API (the test's fake server here; the cluster
/// tier does the same against a real kube-apiserver) and exits with its findings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lint_kube_reads_the_api_and_exits_with_its_findings() {
    use crate::fake_apiserver::FakeApiServer;
    use serde_json::json;
    let server = FakeApiServer::start().await;
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "payments"}}));
    server.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "frontend", "namespace": "payments", "labels": {"app": "frontend"}},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": "10.0.1.10", "podIPs": [{"ip": "10.0.1.10"}]},
    }));
    server.apply(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-dns", "namespace": "payments"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                 "egress": [{"ports": [{"protocol": "UDP", "port": 53}]}]},
    }));
    let kubeconfig = std::env::temp_dir().join(format!("ztrust-lint-kubeconfig-{}", std::process::id()));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: '{}'}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\ncurrent-context: c\n",
            server.url()
        ),
    )
    .unwrap();
    let path = kubeconfig.clone();
    let out = tokio::task::spawn_blocking(move || {
        lint(&["--kube", "--kubeconfig", path.to_str().unwrap(), "-o", "json"])
    })
    .await
    .unwrap();
    std::fs::remove_file(&kubeconfig).unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let findings: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let codes: Vec<(&str, &str)> = findings
        .iter()
        .map(|f| (f["code"].as_str().unwrap(), f["object"].as_str().unwrap()))
        .collect();
    assert_eq!(
        codes,
        vec![("ZT004", "NetworkPolicy payments/allow-dns")],
        "{findings:#?}"
    );
    assert!(
        server.events().is_empty(),
        "lint emits no Events: {:?}",
        server.events()
    );
}

#[test]
fn a_manifest_that_is_no_yaml_is_said_whatever_is_excluded_and_a_bad_skip_is_an_error() {
    let dir = manifests("syntax", &[("broken.yaml", "kind: [unclosed\n")]);
    for extra in [&[][..], &["--exclude-namespace", ""][..]] {
        let mut args = vec![dir.to_str().unwrap(), "-o", "json"];
        args.extend_from_slice(extra);
        let out = lint(&args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let findings: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            findings.iter().any(|f| f["code"] == "ZT000"),
            "{extra:?}: {findings:#?}"
        );
    }
    let out = lint(&[dir.to_str().unwrap(), "--skip", "ZT999"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ZT999"));
    std::fs::remove_dir_all(dir).unwrap();
}
