//! What lint reads: the manifests of a directory as the agent's directory source reads them, and the
//! pods that workloads (Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs) would run —
//! one pod per workload, with its template's labels and ports — so that the checks that need pods see
//! the application a repository deploys, not only bare Pod objects.

use std::io;
use std::path::Path;

use serde_json::{Value, json};

use crate::model::{Cluster, Namespace};
use crate::source::dir;
use crate::source::{LoadError, Problem};

/// The kinds whose pod template lint turns into a pod, and where the template is.
const WORKLOADS: &[(&str, &str, &[&str])] = &[
    ("apps/v1", "Deployment", &["spec", "template"]),
    ("apps/v1", "StatefulSet", &["spec", "template"]),
    ("apps/v1", "DaemonSet", &["spec", "template"]),
    ("apps/v1", "ReplicaSet", &["spec", "template"]),
    ("batch/v1", "Job", &["spec", "template"]),
    (
        "batch/v1",
        "CronJob",
        &["spec", "jobTemplate", "spec", "template"],
    ),
];

/// The manifests under `path`, with a pod for each workload; problems as the directory source finds
/// them, less the kinds it does not read (lint has nothing to say about them: other kinds of policy,
/// such as Cilium's or Calico's, are not read either).
pub fn load_dir(path: &Path) -> io::Result<(Cluster, Vec<LoadError>)> {
    let mut loaded = dir::load_dir(path)?;
    for file in dir::manifest_files(path)? {
        let text = std::fs::read_to_string(&file.path)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", file.path.display())))?;
        let (documents, _) = dir::documents(&text);
        for d in documents {
            if let Some(pod) = workload_pod(&d.value) {
                let text = serde_json::to_string(&pod).expect("a JSON value serializes");
                let pods = dir::parse_str(file.path.clone(), &text);
                loaded.errors.extend(pods.errors);
                for (r, pod) in pods.cluster.pods {
                    // A Pod object of the same name is what it says it is.
                    loaded.cluster.pods.entry(r).or_insert(pod);
                }
            }
        }
    }
    loaded
        .errors
        .retain(|e| !matches!(e.problem, Problem::UnsupportedKind { .. }));
    // A namespace the manifests put objects in but do not define exists in the cluster they are for,
    // with the label the API server gives every namespace.
    let c = &mut loaded.cluster;
    let named: Vec<String> = c
        .pods
        .values()
        .map(|p| p.namespace.clone())
        .chain(c.policies.values().map(|p| p.namespace.clone()))
        .chain(c.services.values().map(|s| s.namespace.clone()))
        .collect();
    for ns in named {
        c.namespaces.entry(ns.clone()).or_insert_with(|| Namespace {
            labels: [("kubernetes.io/metadata.name".to_owned(), ns.clone())].into(),
            annotations: Default::default(),
            name: ns,
        });
    }
    Ok((loaded.cluster, loaded.errors))
}

/// The pod a workload object would run (named as the workload), if `value` is one.
fn workload_pod(value: &Value) -> Option<Value> {
    let api_version = value.get("apiVersion")?.as_str()?;
    let kind = value.get("kind")?.as_str()?;
    let (_, _, at) = WORKLOADS
        .iter()
        .find(|(a, k, _)| *a == api_version && *k == kind)?;
    let template = at.iter().try_fold(value, |v, key| v.get(key))?;
    let metadata = value.get("metadata")?;
    Some(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": metadata.get("name")?,
            "namespace": metadata.get("namespace").cloned().unwrap_or_else(|| json!("default")),
            "labels": template.pointer("/metadata/labels").cloned().unwrap_or_else(|| json!({})),
        },
        "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
    }))
}
