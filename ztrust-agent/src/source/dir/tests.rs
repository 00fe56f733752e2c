use std::net::IpAddr;

use super::*;
use crate::model::{ObjectRef, Protocol};
use crate::source::convert::NAMESPACE_NAME_LABEL;

#[test]
fn multi_document_list_lab_and_unsupported() {
    let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: blue}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: web, labels: {app: web}}
  spec:
    nodeName: n1
    containers:
    - name: c
      ports: [{containerPort: 8080, name: http}, {containerPort: 53, protocol: UDP}]
  status: {podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: deny, namespace: prod}
  spec: {podSelector: {}}
---
apiVersion: lab.ztrust.io/v1
kind: Probe
metadata: {name: p}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: s, namespace: prod}
---
"#;
    let l = parse_str("all.yaml", text);
    let ns = &l.cluster.namespaces["prod"];
    assert_eq!(ns.labels.get("team").map(String::as_str), Some("blue"));
    assert_eq!(
        ns.labels.get(NAMESPACE_NAME_LABEL).map(String::as_str),
        Some("prod")
    );
    let pod = &l.cluster.pods[&ObjectRef::new("default", "web")];
    assert_eq!(pod.ips.len(), 2);
    assert_eq!(pod.node_name.as_deref(), Some("n1"));
    assert_eq!(
        pod.ports[0],
        model::ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp
        }
    );
    assert_eq!(pod.ports[1].protocol, Protocol::Udp);
    assert!(!pod.host_network);
    assert!(l.cluster.policies.contains_key(&ObjectRef::new("prod", "deny")));
    assert_eq!(l.lab_objects.len(), 1);
    assert_eq!(l.errors.len(), 1, "{:?}", l.errors);
    let msg = l.errors[0].to_string();
    assert!(
        msg.contains("all.yaml") && msg.contains("Deployment prod/s") && msg.contains("unsupported kind"),
        "{msg}"
    );
}

#[test]
fn json_and_syntax_errors() {
    let l = parse_str(
        "p.json",
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"x","namespace":"a"},"spec":{"containers":[],"hostNetwork":true},"status":{"podIP":"10.0.0.9"}}"#,
    );
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    let pod = &l.cluster.pods[&ObjectRef::new("a", "x")];
    assert!(pod.host_network);
    assert_eq!(pod.ips, vec!["10.0.0.9".parse::<IpAddr>().expect("ip")]);
    let l = parse_str("bad.yaml", "kind: [unclosed");
    assert!(
        l.errors[0]
            .to_string()
            .starts_with("bad.yaml: document #1: cannot parse"),
        "{}",
        l.errors[0]
    );
}

#[test]
fn load_dir_reads_recursively_in_order_and_reports_duplicates() {
    let root = std::env::temp_dir().join(format!("ztrust-dir-test-{}", std::process::id()));
    let sub = root.join("sub");
    std::fs::create_dir_all(&sub).expect("mkdir");
    let pod = |ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {{containers: []}}\nstatus: {{podIP: {ip}}}\n"
        )
    };
    std::fs::write(root.join("a.yaml"), pod("10.0.0.1")).expect("write");
    std::fs::write(sub.join("b.yml"), pod("10.0.0.2")).expect("write");
    std::fs::write(root.join("ignored.txt"), "not: read").expect("write");
    std::fs::write(
        root.join("c.json"),
        r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"default"}}"#,
    )
    .expect("write");
    let l = load_dir(&root);
    let _ = std::fs::remove_dir_all(&root);
    let l = l.expect("load");
    // a.yaml < c.json < sub/b.yml: the later one wins and the duplicate is reported.
    assert_eq!(
        l.cluster.pods[&ObjectRef::new("default", "p")].ips,
        vec!["10.0.0.2".parse::<IpAddr>().expect("ip")]
    );
    assert!(l.cluster.namespaces.contains_key("default"));
    assert_eq!(l.errors.len(), 1, "{:?}", l.errors);
    assert_eq!(l.errors[0].problem, Problem::Duplicate);
}

/// A fresh directory under the temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ztrust-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("mkdir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn namespace(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n")
}

#[test]
fn a_list_whose_items_is_not_a_list_is_an_error_of_the_list() {
    let (docs, errors) =
        documents("apiVersion: v1\nkind: List\nitems: {a: 1}\n---\napiVersion: v1\nkind: List\n");
    assert!(docs.is_empty(), "{docs:?}");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        (errors[0].object.as_str(), errors[0].field.as_str()),
        ("List in document #1", "items")
    );
    // A List of another group is not expanded: it is an object of a kind nobody reads.
    let (docs, _) = documents("apiVersion: example.com/v1\nkind: List\nitems: []\n");
    assert_eq!(docs.len(), 1);
}

#[test]
fn a_configmap_volume_is_read_once_and_its_updates_are_seen() {
    // The kubelet's layout: the files in a hidden timestamped directory, `..data` linking to it and
    // a link per file through `..data`; an update writes a new directory and swaps `..data`.
    let d = TempDir::new("configmap");
    let root = &d.0;
    std::fs::create_dir(root.join("..2026_01")).expect("mkdir");
    std::fs::write(root.join("..2026_01/ns.yaml"), namespace("one")).expect("write");
    std::os::unix::fs::symlink("..2026_01", root.join("..data")).expect("link");
    std::os::unix::fs::symlink("..data/ns.yaml", root.join("ns.yaml")).expect("link");
    let files = manifest_files(root).expect("list");
    assert_eq!(
        files.iter().map(|f| f.path.clone()).collect::<Vec<_>>(),
        vec![root.join("ns.yaml")]
    );
    let mut watch = DirWatch::new(root.clone());
    let first = watch.poll().expect("the first poll reports");
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert!(first.cluster.namespaces.contains_key("one"));
    assert!(watch.poll().is_none(), "nothing changed");

    std::fs::create_dir(root.join("..2026_02")).expect("mkdir");
    std::fs::write(root.join("..2026_02/ns.yaml"), namespace("second")).expect("write");
    std::os::unix::fs::symlink("..2026_02", root.join("..data_tmp")).expect("link");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
    let next = watch.poll().expect("the update is seen");
    assert!(
        next.cluster.namespaces.contains_key("second"),
        "{:?}",
        next.cluster.namespaces.keys()
    );
    assert!(!next.cluster.namespaces.contains_key("one"));
}

#[test]
fn what_cannot_be_read_keeps_the_objects_read_before() {
    let d = TempDir::new("dirwatch");
    let root = d.0.join("manifests");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::write(root.join("a.yaml"), namespace("a")).expect("write");
    std::fs::write(root.join("b.yaml"), namespace("b")).expect("write");
    let mut watch = DirWatch::new(root.clone());
    assert_eq!(watch.poll().expect("first").cluster.namespaces.len(), 2);

    // A file that turns into garbage keeps its objects (and the error says so).
    std::fs::write(root.join("b.yaml"), "kind: [unclosed").expect("write");
    let l = watch.poll().expect("a change");
    assert!(
        l.cluster.namespaces.contains_key("b"),
        "{:?}",
        l.cluster.namespaces.keys()
    );

    // The directory gone (or unlistable): nothing changes, rather than an empty cluster.
    std::fs::rename(&root, d.0.join("elsewhere")).expect("move");
    assert!(watch.poll().is_none());
    assert!(watch.poll().is_none(), "and it stays so, logged once");
    std::fs::rename(d.0.join("elsewhere"), &root).expect("move back");
    std::fs::write(root.join("b.yaml"), namespace("c")).expect("write");
    let l = watch.poll().expect("back");
    let names: Vec<&String> = l.cluster.namespaces.keys().collect();
    assert_eq!(names, ["a", "c"]);

    // A file removed takes its objects with it.
    std::fs::remove_file(root.join("a.yaml")).expect("rm");
    let l = watch.poll().expect("a change");
    assert_eq!(l.cluster.namespaces.keys().collect::<Vec<_>>(), ["c"]);
}

#[test]
fn an_empty_directory_is_an_empty_cluster_once() {
    let d = TempDir::new("empty-dir");
    let dir = &d.0;
    let mut source = DirWatch::new(dir.clone());
    let first = source
        .poll()
        .expect("the first poll reports a snapshot, even of nothing");
    assert!(first.cluster.pods.is_empty() && first.cluster.policies.is_empty() && first.errors.is_empty());
    assert!(source.poll().is_none(), "nothing changed since");
    std::fs::write(
        dir.join("ns.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n",
    )
    .unwrap();
    let second = source.poll().expect("a new file is a change");
    assert!(second.cluster.namespaces.contains_key("a"));
}

#[tokio::test]
async fn a_file_written_wakes_the_directory_source() {
    let d = TempDir::new("dir-events");
    let mut source = DirSource::new(d.0.clone(), &Cluster::default());
    assert!(source.is_event_driven(), "inotify is available here");
    let (changes, _) = source.poll_changes().expect("the first snapshot");
    assert!(changes.namespaces.is_empty());
    let quiet = Duration::from_millis(300);
    // Control: with nothing written, nothing wakes it.
    assert!(tokio::time::timeout(quiet, source.changed()).await.is_err());
    std::fs::write(d.0.join("ns.yaml"), namespace("prod")).expect("write");
    tokio::time::timeout(Duration::from_secs(5), source.changed())
        .await
        .expect("woken by the write");
    let (changes, errors) = source.poll_changes().expect("a change");
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(changes.namespaces.iter().collect::<Vec<_>>(), ["prod"]);
    assert!(source.cluster().namespaces.contains_key("prod"));
    // A new subdirectory is watched too (recursive).
    std::fs::create_dir(d.0.join("team")).expect("mkdir");
    tokio::time::timeout(Duration::from_secs(5), source.changed())
        .await
        .expect("woken by the mkdir");
    let _ = source.poll_changes();
    std::fs::write(d.0.join("team/ns.yaml"), namespace("team")).expect("write");
    tokio::time::timeout(Duration::from_secs(5), source.changed())
        .await
        .expect("woken by a write in the new directory");
    let (changes, _) = source.poll_changes().expect("a change");
    assert_eq!(changes.namespaces.iter().collect::<Vec<_>>(), ["team"]);
}

#[test]
fn links_to_nothing_are_no_files_and_only_the_kubelets_entries_are_hidden() {
    let d = TempDir::new("dangling");
    let root = &d.0;
    std::fs::write(root.join("ns.yaml"), namespace("a")).expect("write");
    std::fs::write(root.join(".team.yaml"), namespace("dot")).expect("write");
    // An editor's lock link and a link whose target went: no files, and nothing else is lost.
    std::os::unix::fs::symlink("user@host.1234", root.join(".#ns.yaml")).expect("link");
    std::os::unix::fs::symlink("gone.yaml", root.join("dangling.yaml")).expect("link");
    let files: Vec<PathBuf> = manifest_files(root)
        .expect("listed")
        .into_iter()
        .map(|f| f.path)
        .collect();
    assert_eq!(files, [root.join(".team.yaml"), root.join("ns.yaml")]);
    let mut watch = DirWatch::new(root.clone());
    let l = watch.poll().expect("a snapshot");
    assert_eq!(l.cluster.namespaces.keys().collect::<Vec<_>>(), ["a", "dot"]);
}

#[test]
fn a_file_that_cannot_be_read_is_read_again_quietly_and_the_first_snapshot_waits_for_it() {
    let d = TempDir::new("unreadable");
    let root = &d.0;
    std::fs::write(root.join("a.yaml"), namespace("a")).expect("write");
    // Not UTF-8: the read fails (as root, permissions would not make it fail).
    std::fs::write(root.join("b.yaml"), [0xff, 0xfe, 0xfd]).expect("write");
    let mut watch = DirWatch::new(root.clone());
    assert!(
        watch.poll().is_none(),
        "no first snapshot without b.yaml: it would lift what an earlier agent enforced for it"
    );
    assert!(watch.poll().is_none(), "still waiting, not a change");
    std::fs::write(root.join("b.yaml"), namespace("b")).expect("write");
    let l = watch.poll().expect("the first snapshot");
    assert_eq!(l.cluster.namespaces.keys().collect::<Vec<_>>(), ["a", "b"]);

    // Later: b.yaml unreadable keeps its objects, and polls that change nothing report nothing.
    std::fs::write(root.join("b.yaml"), [0xff, 0xfe]).expect("write");
    assert!(watch.poll().is_none(), "an unreadable file is no change");
    assert!(watch.poll().is_none(), "and reading it again is none either");
    std::fs::write(root.join("a.yaml"), namespace("a2")).expect("write");
    let l = watch.poll().expect("a.yaml changed");
    assert_eq!(
        l.cluster.namespaces.keys().collect::<Vec<_>>(),
        ["a2", "b"],
        "b's last good objects kept"
    );
    std::fs::write(root.join("b.yaml"), namespace("b2")).expect("write");
    let l = watch.poll().expect("b.yaml readable again");
    assert_eq!(l.cluster.namespaces.keys().collect::<Vec<_>>(), ["a2", "b2"]);
}
