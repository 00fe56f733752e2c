//! Offline checks of `deploy/`: every manifest decodes strictly into its Kubernetes 1.33 type
//! (k8s-openapi, as the API server would read it: a field the type does not know — a typo, a field of
//! another version — is an error, not silently dropped), the ClusterRole grants every API call the
//! agent makes and nothing more, the DaemonSet keeps the properties the design relies on, and the
//! Dockerfile builds with the toolchain `cargo xtask setup` installs.
//!
//! Built as the `deploy_manifests` test of ztrust-agent (`cargo test -p ztrust-agent --test
//! deploy_manifests`) so that it sees `ztrust_agent::source::kube::API_CALLS`. Schema validation with
//! the OpenAPI documents themselves: `tests/deploy/test_manifests.py`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use ztrust_agent::source::kube::API_CALLS;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn documents(rel: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&read(rel))
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// Drops what serialization leaves out anyway (nulls, empty maps), for comparing.
fn normalize(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalize(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        // Quantities and int-or-strings round-trip as written; numbers as numbers.
        other => other.clone(),
    }
}

/// Paths present in `a` but not in `b`.
fn missing(a: &Value, b: &Value, at: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => missing(v, w, &format!("{at}.{k}"), out),
                    None => out.push(format!("{at}.{k}")),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            for (i, v) in x.iter().enumerate() {
                match y.get(i) {
                    Some(w) => missing(v, w, &format!("{at}[{i}]"), out),
                    None => out.push(format!("{at}[{i}]")),
                }
            }
        }
        (x, y) if x != y => out.push(format!("{at} ({x} became {y})")),
        _ => {}
    }
}

/// Decodes into `T` and back: every field written must survive, i.e. be known to the type.
fn strict<T: DeserializeOwned + Serialize>(rel: &str, doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    let mut lost = Vec::new();
    missing(&normalize(doc), &normalize(&back), "", &mut lost);
    assert!(
        lost.is_empty(),
        "{rel}: fields unknown to the Kubernetes 1.33 schema: {lost:?}"
    );
    typed
}

fn base(kind: &str) -> (String, Value) {
    let k: Value = serde_yaml::from_str(&read("deploy/base/kustomization.yaml")).unwrap();
    for r in k["resources"].as_array().unwrap() {
        let rel = format!("deploy/base/{}", r.as_str().unwrap());
        for d in documents(&rel) {
            if d["kind"] == kind {
                return (rel, d);
            }
        }
    }
    panic!("no {kind} in deploy/base");
}

#[test]
fn every_manifest_decodes_strictly() {
    let k: Value = serde_yaml::from_str(&read("deploy/base/kustomization.yaml")).unwrap();
    let mut kinds = BTreeSet::new();
    for r in k["resources"].as_array().unwrap() {
        let rel = format!("deploy/base/{}", r.as_str().unwrap());
        for d in documents(&rel) {
            let kind = d["kind"].as_str().unwrap().to_owned();
            match (d["apiVersion"].as_str().unwrap(), kind.as_str()) {
                ("v1", "Namespace") => drop(strict::<Namespace>(&rel, &d)),
                ("v1", "ServiceAccount") => drop(strict::<ServiceAccount>(&rel, &d)),
                ("v1", "Service") => drop(strict::<Service>(&rel, &d)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => drop(strict::<ClusterRole>(&rel, &d)),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    drop(strict::<ClusterRoleBinding>(&rel, &d))
                }
                ("apps/v1", "DaemonSet") => drop(strict::<DaemonSet>(&rel, &d)),
                (v, k) => panic!("{rel}: unexpected {v} {k}"),
            }
            kinds.insert(kind);
        }
    }
    let want = [
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "Namespace",
        "Service",
        "ServiceAccount",
    ];
    assert_eq!(kinds, want.iter().map(|s| s.to_string()).collect());
}

#[test]
fn strictness_catches_a_typo() {
    let (rel, mut ds) = base("DaemonSet");
    ds["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    let r = std::panic::catch_unwind(|| strict::<DaemonSet>(&rel, &ds));
    assert!(r.is_err(), "a misspelled field must be reported");
}

/// (group, resource) → verbs granted.
fn granted(role: &ClusterRole) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}"
        );
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                assert!(
                    g != "*" && r != "*" && !rule.verbs.iter().any(|v| v == "*"),
                    "no wildcards: {rule:?}"
                );
                out.entry((g.clone(), r.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    out
}

#[test]
fn cluster_role_grants_every_api_call_and_no_more() {
    let (rel, doc) = base("ClusterRole");
    let role: ClusterRole = strict(&rel, &doc);
    let granted = granted(&role);
    // Every call the agent makes is granted.
    for call in API_CALLS {
        let verbs = granted.get(&(call.group.to_owned(), call.resource.to_owned()));
        for verb in call.verbs {
            assert!(
                verbs.is_some_and(|v| v.contains(*verb)),
                "ClusterRole does not grant {verb} on {:?}/{} (used by the agent)",
                call.group,
                call.resource
            );
        }
    }
    // Nothing beyond them, except `get` on what is read (for kubectl-style debugging with the agent's
    // identity; read-only).
    for ((group, resource), verbs) in &granted {
        let call = API_CALLS
            .iter()
            .find(|c| c.group == group && c.resource == resource)
            .unwrap_or_else(|| panic!("ClusterRole grants {group:?}/{resource}, which the agent never uses"));
        for verb in verbs {
            let read = call.verbs.contains(&"list") && verb == "get";
            assert!(
                call.verbs.contains(&verb.as_str()) || read,
                "{verb} on {group:?}/{resource} is not used"
            );
        }
    }
    // Bound to the DaemonSet's service account.
    let (rel, doc) = base("ClusterRoleBinding");
    let binding: ClusterRoleBinding = strict(&rel, &doc);
    let (_, ds) = base("DaemonSet");
    let ds: DaemonSet = serde_json::from_value(ds).unwrap();
    let sa = ds
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .service_account_name
        .unwrap();
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", sa.as_str())
    );
    assert_eq!(subject.namespace.as_deref(), ds.metadata.namespace.as_deref());
}

fn agent(ds: &DaemonSet) -> Container {
    ds.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .clone()
}

#[test]
fn daemonset_has_what_the_design_relies_on() {
    let (rel, doc) = base("DaemonSet");
    let ds: DaemonSet = strict(&rel, &doc);
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_ne!(pod.host_pid, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none())
    );
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy.rolling_update.as_ref().unwrap().max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );

    let c = agent(&ds);
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(
        added,
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON"]),
        "exactly the README's three"
    );

    // The API server refuses Bidirectional propagation in an unprivileged container.
    let mounts = c.volume_mounts.as_ref().unwrap();
    for m in mounts {
        assert_ne!(
            m.mount_propagation.as_deref(),
            Some("Bidirectional"),
            "{} needs privileged",
            m.name
        );
    }
    let volumes: BTreeMap<&str, &str> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    let mounted: BTreeMap<&str, &str> = mounts
        .iter()
        .map(|m| (m.mount_path.as_str(), m.name.as_str()))
        .collect();
    for (path, host) in [
        ("/sys/fs/bpf", "/sys/fs/bpf"),
        ("/sys/fs/cgroup", "/sys/fs/cgroup"),
        ("/var/run/ztrust", "/var/run/ztrust"),
    ] {
        let name = mounted.get(path).unwrap_or_else(|| panic!("{path} not mounted"));
        assert_eq!(volumes.get(name), Some(&host), "{path}");
    }
    assert_eq!(
        Path::new(ztrust_agent::datapath::loader::DEFAULT_PIN_DIR).parent(),
        Some(Path::new("/sys/fs/bpf")),
        "the pins are on the mounted bpffs"
    );
    assert!(
        Path::new(ztrust_agent::observer::server::DEFAULT_SOCKET).starts_with("/var/run/ztrust"),
        "the socket is on the hostPath"
    );
    // Every file the agent writes is on a volume (the root filesystem is read-only).
    let args = c.args.clone().unwrap();
    if let Some(i) = args.iter().position(|a| a == "--flow-log") {
        let log = Path::new(&args[i + 1]);
        assert!(
            mounted.keys().any(|m| log.starts_with(m)),
            "--flow-log {log:?} is not on a volume"
        );
    }

    // run --source kube --node-name $(NODE_NAME), NODE_NAME from the downward API.
    assert_eq!(args[0], "run");
    let arg = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].as_str());
    assert_eq!(arg("--source"), Some("kube"));
    assert_eq!(arg("--node-name"), Some("$(NODE_NAME)"));
    // Node ports are judged as Services where the real cluster's kube-proxy translates them.
    assert_eq!(arg("--nodeport-addresses"), Some("primary"));
    assert!(
        read("xtask/src/cluster/config.rs").contains("nodePortAddresses: [primary]"),
        "the real cluster's kube-proxy translates node ports where the DaemonSet says"
    );
    let env: BTreeMap<&str, &str> = c
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e.name.as_str(),
                e.value_from.as_ref()?.field_ref.as_ref()?.field_path.as_str(),
            ))
        })
        .collect();
    assert_eq!(env.get("NODE_NAME"), Some(&"spec.nodeName"));

    // Probes and metrics on 9965, the agent's --metrics-addr default.
    let port = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .unwrap();
    assert_eq!(port.container_port, 9965);
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/readyz"));
    let res = c.resources.as_ref().unwrap();
    assert!(res.requests.is_some() && res.limits.is_some());

    // The metrics Service selects these pods on that port.
    let (rel, doc) = base("Service");
    let svc: Service = strict(&rel, &doc);
    let labels = spec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    let s = svc.spec.unwrap();
    for (k, v) in s.selector.unwrap() {
        assert_eq!(labels.get(&k), Some(&v));
    }
    let annotations = svc.metadata.annotations.unwrap();
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9965");
}

#[test]
fn service_monitor_scrapes_the_metrics_service() {
    let sm = &documents("deploy/base/servicemonitor/servicemonitor.yaml")[0];
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["kind"], "ServiceMonitor");
    let (_, svc) = base("Service");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &svc["metadata"]["labels"][k], v,
            "the ServiceMonitor selects the Service"
        );
    }
    let port = sm["spec"]["endpoints"][0]["port"].as_str().unwrap();
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == port)
    );
}

/// `const NAME: … = "…";` or `&[ "…", … ];` from xtask's source.
fn xtask_const(name: &str) -> Vec<String> {
    let src = read("xtask/src/main.rs");
    let start = src
        .find(&format!("const {name}:"))
        .unwrap_or_else(|| panic!("xtask has no {name}"));
    let end = start + src[start..].find(';').unwrap();
    src[start..end]
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn dockerfile_uses_the_xtask_toolchain() {
    let docker = read("deploy/Dockerfile");
    let arg = |name: &str| {
        let line = docker
            .lines()
            .find(|l| l.starts_with(&format!("ARG {name}=")))
            .unwrap();
        line.split_once('=').unwrap().1.trim_matches('"').to_owned()
    };
    let packages: BTreeSet<String> = arg("BUILD_PACKAGES")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        packages,
        xtask_const("BUILD_PACKAGES").into_iter().collect(),
        "apt packages"
    );
    assert_eq!(vec![arg("BPF_LINKER_VERSION")], xtask_const("BPF_LINKER_VERSION"));
    assert!(docker.contains(&format!(
        "rustup toolchain link {} /usr",
        xtask_const("BPF_TOOLCHAIN")[0]
    )));
    assert!(docker.contains("cargo build --release --locked -p ztrust-agent"));
    assert!(docker.contains("FROM debian:bookworm-slim"));
}

#[test]
fn kind_cluster_has_no_default_cni() {
    let kind = &documents("deploy/kind/kind-config.yaml")[0];
    assert_eq!(kind["kind"], "Cluster");
    assert_eq!(kind["networking"]["disableDefaultCNI"], true);
    assert_eq!(kind["networking"]["podSubnet"], "192.168.0.0/16");
}
