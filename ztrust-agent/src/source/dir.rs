//! Directory source: Kubernetes manifests (YAML or JSON, multi-document, `kind: List`) read from the
//! files under a directory, and kept current by [`DirWatch`].
//!
//! One walker ([`manifest_files`]) and one document parser ([`documents`]) serve the agent and the lab.
//! Objects go through the k8s-openapi types first, so that a manifest is read exactly as the API server
//! would decode it, then through [`super::convert`]; problems are [`LoadError`]s naming the file
//! ([`Origin::File`]), the object, the field path and the problem.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{error, warn};

use super::convert;
use super::problem::{Converted, Effect, LoadError, ObjectError, Origin, Problem};
use super::{ClusterSource, Loaded};
use crate::model::{self, Cluster};
use crate::policy::Changes;

/// A manifest file: its path, and its modification time and length (to tell when it changed).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ManifestFile {
    pub path: PathBuf,
    pub modified: SystemTime,
    pub len: u64,
}

/// The manifest files at `path`: the file itself, or every `*.yaml`, `*.yml` and `*.json` under the
/// directory, recursively, sorted by path.
///
/// Entries whose names start with `..` are skipped: a ConfigMap mounted as a volume holds its files
/// twice, in the kubelet's `..<timestamp>` directory (and `..data`) and as links to them. Links to files
/// are followed (their target's time and length are what change when the ConfigMap is updated); links
/// to directories are not (no loops). A link to nothing (an editor's lock link) and a file gone between
/// the listing and its examination are no files. An error names the path that could not be listed or
/// examined.
pub fn manifest_files(path: &Path) -> io::Result<Vec<ManifestFile>> {
    let in_context = |what: &str, p: &Path| {
        let what = what.to_owned();
        let p = p.to_owned();
        move |e: io::Error| io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    let file = |p: PathBuf| -> io::Result<Option<ManifestFile>> {
        let meta = match std::fs::metadata(&p) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(in_context("examining", &p)(e)),
        };
        Ok(Some(ManifestFile {
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            len: meta.len(),
            path: p,
        }))
    };
    let mut out = Vec::new();
    if !std::fs::metadata(path)
        .map_err(in_context("examining", path))?
        .is_dir()
    {
        out.extend(file(path.to_owned())?);
        return Ok(out);
    }
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(in_context("listing", &dir))? {
            let entry = entry.map_err(in_context("listing", &dir))?;
            let p = entry.path();
            if entry.file_name().to_string_lossy().starts_with("..") {
                continue;
            }
            let kind = entry.file_type().map_err(in_context("examining", &p))?;
            if kind.is_dir() {
                stack.push(p);
            } else if matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                out.extend(file(p)?);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// One object of a manifest text: where it is (`document #2`, `document #1 items[3]`) and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub place: String,
    pub value: serde_json::Value,
}

/// The objects of one manifest text: multi-document YAML (JSON is YAML too), empty documents left out,
/// the items of a `v1 List` in its place. Problems, as errors of the place they are at: a syntax error
/// (it ends the text: the YAML parser cannot resume after one) and a `List` whose `items` is not a list.
pub fn documents(text: &str) -> (Vec<Document>, Vec<ObjectError>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let place = format!("document #{}", index + 1);
        match serde_json::Value::deserialize(document) {
            Ok(value) => expand(place, value, &mut out, &mut errors),
            Err(e) => {
                errors.push(ObjectError {
                    object: place,
                    field: String::new(),
                    problem: Problem::Syntax(e.to_string()),
                    effect: Effect::None,
                });
                break;
            }
        }
    }
    (out, errors)
}

fn expand(place: String, value: serde_json::Value, out: &mut Vec<Document>, errors: &mut Vec<ObjectError>) {
    if value.is_null() {
        return; // an empty document (`---` at the end of a file)
    }
    let field = |f: &str| value.get(f).and_then(serde_json::Value::as_str);
    if (field("apiVersion"), field("kind")) != (Some("v1"), Some("List")) {
        out.push(Document { place, value });
        return;
    }
    match value.get("items") {
        Some(serde_json::Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                expand(format!("{place} items[{i}]"), item.clone(), out, errors);
            }
        }
        None | Some(serde_json::Value::Null) => {}
        Some(_) => errors.push(ObjectError {
            object: format!("List in {place}"),
            field: "items".into(),
            problem: Problem::Schema {
                kind: "List",
                message: "items is not a list".into(),
            },
            effect: Effect::None,
        }),
    }
}

/// Reads every manifest file under `path` ([`manifest_files`]), in sorted order.
///
/// Only a failure to list or read the directory is an `Err`; problems in files are [`Loaded::errors`].
pub fn load_dir(path: &Path) -> io::Result<Loaded> {
    let mut out = Loaded::default();
    for file in manifest_files(path)? {
        let text = std::fs::read_to_string(&file.path)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", file.path.display())))?;
        merge(&mut out, parse_str(file.path, &text));
    }
    Ok(out)
}

/// Parses one file's text ([`documents`]) and converts its objects.
pub fn parse_str(file: impl Into<PathBuf>, text: &str) -> Loaded {
    let origin = Origin::File(file.into());
    let mut out = Loaded::default();
    let (documents, errors) = documents(text);
    out.errors.extend(errors.into_iter().map(|e| e.at(&origin)));
    for d in documents {
        add_value(&mut out, &origin, &d.place, d.value);
    }
    out
}

/// Adds `other` to `into`. An object defined twice keeps the later definition and records an error.
pub fn merge(into: &mut Loaded, other: Loaded) {
    let Loaded {
        cluster,
        errors,
        lab_objects,
    } = other;
    merge_kind(
        &mut into.cluster.namespaces,
        cluster.namespaces,
        "Namespace",
        &mut into.errors,
    );
    merge_kind(&mut into.cluster.pods, cluster.pods, "Pod", &mut into.errors);
    merge_kind(
        &mut into.cluster.policies,
        cluster.policies,
        "NetworkPolicy",
        &mut into.errors,
    );
    merge_kind(
        &mut into.cluster.services,
        cluster.services,
        "Service",
        &mut into.errors,
    );
    merge_kind(
        &mut into.cluster.endpoint_slices,
        cluster.endpoint_slices,
        "EndpointSlice",
        &mut into.errors,
    );
    into.cluster.node_ips.extend(cluster.node_ips);
    into.errors.extend(errors);
    into.lab_objects.extend(lab_objects);
}

/// Adds the objects of one kind to `into`; one already there is replaced, with a [`Problem::Duplicate`].
fn merge_kind<K: Ord + fmt::Display, V>(
    into: &mut BTreeMap<K, V>,
    other: BTreeMap<K, V>,
    kind: &str,
    errors: &mut Vec<LoadError>,
) {
    for (key, value) in other {
        let shown = format!("{kind} {key}");
        if into.insert(key, value).is_some() {
            errors.push(duplicate(&Origin::Merged, &shown));
        }
    }
}

fn duplicate(origin: &Origin, object: &str) -> LoadError {
    LoadError {
        origin: origin.clone(),
        object: object.to_owned(),
        field: String::new(),
        problem: Problem::Duplicate,
        effect: Effect::None,
    }
}

fn add_value(out: &mut Loaded, origin: &Origin, where_: &str, value: serde_json::Value) {
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let kind = value
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let err = |object: String, problem: Problem| LoadError {
        origin: origin.clone(),
        object,
        field: String::new(),
        problem,
        effect: Effect::None,
    };
    if api_version.is_empty() || kind.is_empty() {
        out.errors.push(err(where_.to_owned(), Problem::NotAnObject));
        return;
    }
    if api_version.starts_with("lab.ztrust.io/") {
        out.lab_objects.push(value);
        return;
    }
    let name = describe(&value);
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => add_object(
            out,
            origin,
            "Namespace",
            &name,
            value,
            convert::convert_namespace,
            |c, ns| c.namespaces.insert(ns.name.clone(), ns).is_some(),
        ),
        ("v1", "Pod") => add_object(
            out,
            origin,
            "Pod",
            &name,
            value,
            convert::convert_pod,
            |c, pod| c.pods.insert(pod.object_ref(), pod).is_some(),
        ),
        ("v1", "Service") => add_object(
            out,
            origin,
            "Service",
            &name,
            value,
            convert::services::convert_service,
            |c, svc| c.services.insert(svc.object_ref(), svc).is_some(),
        ),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            add_object(
                out,
                origin,
                "EndpointSlice",
                &name,
                value,
                convert::services::convert_endpoint_slice,
                |c, slice| c.endpoint_slices.insert(slice.object_ref(), slice).is_some(),
            );
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let object = format!("NetworkPolicy {name}");
            let c = match serde_json::from_value::<NetworkPolicy>(value.clone()) {
                Ok(np) => convert::convert_policy(&np),
                Err(e) => convert::fail_closed_policy(&value, &object, e.to_string()),
            };
            out.errors.extend(c.errors.into_iter().map(|e| e.at(origin)));
            if let Some(p) = c.value
                && out.cluster.policies.insert(p.object_ref(), p).is_some()
            {
                out.errors.push(duplicate(origin, &object));
            }
        }
        _ => out.errors.push(err(
            if name.is_empty() {
                format!("{kind} in {where_}")
            } else {
                format!("{kind} {name}")
            },
            Problem::UnsupportedKind { api_version, kind },
        )),
    }
}

/// Decodes `value` as a `K`, converts it and inserts it into the cluster (`insert` says whether it
/// replaced one read before); every problem is an error at `origin`.
fn add_object<K: serde::de::DeserializeOwned, M>(
    out: &mut Loaded,
    origin: &Origin,
    kind: &'static str,
    name: &str,
    value: serde_json::Value,
    convert: fn(&K) -> Converted<M>,
    insert: impl FnOnce(&mut model::Cluster, M) -> bool,
) {
    let object = format!("{kind} {name}");
    match serde_json::from_value::<K>(value) {
        Ok(k) => {
            let c = convert(&k);
            out.errors.extend(c.errors.into_iter().map(|e| e.at(origin)));
            if let Some(m) = c.value
                && insert(&mut out.cluster, m)
            {
                out.errors.push(duplicate(origin, &object));
            }
        }
        Err(e) => out.errors.push(LoadError {
            origin: origin.clone(),
            object,
            field: String::new(),
            problem: Problem::Schema {
                kind,
                message: e.to_string(),
            },
            effect: Effect::ObjectDropped,
        }),
    }
}

/// `namespace/name` of a raw object, for messages; `default` when the namespace is absent.
fn describe(value: &serde_json::Value) -> String {
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or("<no name>");
    if value.get("kind").and_then(|v| v.as_str()) == Some("Namespace") {
        return name.to_owned();
    }
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    format!("{ns}/{name}")
}

/// The directory source: the merged objects of every manifest file under a directory, re-read when a
/// file changes.
///
/// A file that stops parsing keeps its previous objects in force, and so does the whole directory when
/// it cannot be listed: a typo or a permission change never lifts the policies the files held.
#[derive(Debug)]
pub struct DirWatch {
    root: PathBuf,
    /// The files as of the last poll; `None` before the first (whose snapshot is reported even when
    /// the directory is empty: an empty directory is an empty cluster, not "nothing yet").
    seen: Option<Vec<ManifestFile>>,
    files: BTreeMap<PathBuf, Loaded>,
    /// The problems logged, so that each is logged once while it lasts.
    reported: BTreeSet<String>,
    /// The listing error logged last, likewise.
    listing_error: Option<String>,
    /// Files that could not be read, as they were listed then: read again at every poll, said again
    /// only once they change.
    unreadable: BTreeMap<PathBuf, ManifestFile>,
}

impl DirWatch {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            seen: None,
            files: BTreeMap::new(),
            reported: BTreeSet::new(),
            listing_error: None,
            unreadable: BTreeMap::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Re-reads the files that changed. Returns the merged objects when anything did.
    pub fn poll(&mut self) -> Option<Loaded> {
        let now = match manifest_files(&self.root) {
            Ok(files) => {
                self.listing_error = None;
                files
            }
            Err(e) => {
                let msg = e.to_string();
                if self.listing_error.as_ref() != Some(&msg) {
                    if self.seen.is_some() {
                        error!("{msg} (keeping the objects read before)");
                    } else {
                        error!("{msg} (no snapshot yet: what is enforced stays as it is)");
                    }
                    self.listing_error = Some(msg);
                }
                return None;
            }
        };
        if self.seen.as_ref() == Some(&now) && self.unreadable.is_empty() {
            return None;
        }
        let first = self.seen.is_none();
        let old: BTreeMap<&Path, &ManifestFile> = self
            .seen
            .iter()
            .flatten()
            .map(|f| (f.path.as_path(), f))
            .collect();
        let before = self.files.len();
        self.files.retain(|p, _| now.iter().any(|f| &f.path == p));
        self.unreadable.retain(|p, _| now.iter().any(|f| &f.path == p));
        let mut changed = first || self.files.len() != before;
        for file in &now {
            if old.get(file.path.as_path()) == Some(&file) && !self.unreadable.contains_key(&file.path) {
                continue;
            }
            let text = match std::fs::read_to_string(&file.path) {
                Ok(t) => t,
                Err(e) => {
                    if self.unreadable.get(&file.path) != Some(file) {
                        warn!(file = %file.path.display(), error = %e, "cannot read manifest; keeping its last good objects, reading it again");
                        self.unreadable.insert(file.path.clone(), file.clone());
                    }
                    continue;
                }
            };
            self.unreadable.remove(&file.path);
            changed = true;
            let loaded = parse_str(file.path.clone(), &text);
            let c = &loaded.cluster;
            let objects = c.namespaces.len()
                + c.pods.len()
                + c.policies.len()
                + c.services.len()
                + c.endpoint_slices.len();
            if objects == 0 && !loaded.errors.is_empty() && self.files.contains_key(&file.path) {
                for e in &loaded.errors {
                    error!("{e} (keeping the objects this file held before)");
                }
                continue;
            }
            self.files.insert(file.path.clone(), loaded);
        }
        self.seen = Some(now);
        // The first snapshot waits for every file: one left out would take away, on the first sync, the
        // state an earlier agent enforced for it.
        if first && !self.unreadable.is_empty() {
            self.seen = None;
            self.files.clear();
            return None;
        }
        if !changed {
            return None;
        }
        let mut merged = Loaded::default();
        for loaded in self.files.values() {
            merge(&mut merged, loaded.clone());
        }
        let mut reported = BTreeSet::new();
        for e in &merged.errors {
            let msg = e.to_string();
            if !self.reported.contains(&msg) {
                error!("{msg}");
            }
            reported.insert(msg);
        }
        self.reported = reported;
        Some(merged)
    }
}

/// Quiet time after a file-system event before [`DirSource::changed`] resolves: an editor's save or a
/// ConfigMap update is a handful of events.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// The directory source as the agent runs it: [`DirWatch`] woken by the kernel's file-system events
/// (inotify, through `notify`), with the node's context, which files cannot say (its addresses, node
/// ports, the Service ranges), in every cluster it reports.
pub struct DirSource {
    watch: DirWatch,
    /// The cluster as last reported; its node fields are the context every next one gets.
    cluster: Cluster,
    /// File-system events under the root; `None` when they cannot be had (no inotify, the directory
    /// missing): then only the agent's tick finds changes, and each poll tries again.
    events: Option<Events>,
    /// Why there are no events, as last said (said again only when it changes).
    events_error: Option<String>,
}

struct Events {
    _watcher: notify::RecommendedWatcher,
    rx: mpsc::Receiver<()>,
}

impl DirSource {
    /// `context`: the node's fields ([`Cluster::node_ips`], [`Cluster::node_ports_any_local`],
    /// [`Cluster::service_cidrs`]); its objects are ignored.
    pub fn new(root: PathBuf, context: &Cluster) -> Self {
        let cluster = Cluster {
            node_ips: context.node_ips.clone(),
            node_ports_any_local: context.node_ports_any_local,
            service_cidrs: context.service_cidrs.clone(),
            host_local_addrs: context.host_local_addrs.clone(),
            ..Cluster::default()
        };
        let mut source = Self {
            watch: DirWatch::new(root),
            cluster,
            events: None,
            events_error: None,
        };
        source.ensure_events();
        source
    }

    /// Whether file-system events wake the source (else the agent's tick polls it).
    pub fn is_event_driven(&self) -> bool {
        self.events.is_some()
    }

    fn ensure_events(&mut self) {
        if self.events.is_some() {
            return;
        }
        let (tx, rx) = mpsc::channel(1);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reading the files is no change (and the poll reads them: waking on that would never
            // stop); a write ends with a modification, a close after writing, or both.
            use notify::event::{AccessKind, AccessMode, EventKind};
            if let Ok(e) = &event
                && let EventKind::Access(kind) = e.kind
                && kind != AccessKind::Close(AccessMode::Write)
            {
                return;
            }
            // One pending wake-up is enough: the poll reads whatever changed.
            let _ = tx.try_send(());
        });
        let root = self.watch.root().to_owned();
        let watching = watcher.and_then(|mut w| {
            notify::Watcher::watch(&mut w, &root, notify::RecursiveMode::Recursive).map(|()| w)
        });
        match watching {
            Ok(w) => {
                self.events = Some(Events { _watcher: w, rx });
                self.events_error = None;
            }
            Err(e) => {
                let msg = e.to_string();
                if self.events_error.as_ref() != Some(&msg) {
                    warn!(dir = %root.display(), error = %msg, "no file-system events for the manifest directory; its changes are found by polling");
                    self.events_error = Some(msg);
                }
            }
        }
    }
}

impl ClusterSource for DirSource {
    fn poll_changes(&mut self) -> Option<(Changes, Vec<LoadError>)> {
        let loaded = self.watch.poll();
        if self.watch.listing_error.is_some() {
            // The directory (and with it its watches) may be gone: watch it again once it is back.
            self.events = None;
        } else {
            self.ensure_events();
        }
        let loaded = loaded?;
        let next = Cluster {
            node_ips: self.cluster.node_ips.clone(),
            node_ports_any_local: self.cluster.node_ports_any_local,
            service_cidrs: self.cluster.service_cidrs.clone(),
            host_local_addrs: self.cluster.host_local_addrs.clone(),
            ..loaded.cluster
        };
        let changes = Changes::between(&self.cluster, &next);
        self.cluster = next;
        Some((changes, loaded.errors))
    }

    async fn changed(&mut self) {
        let Some(events) = &mut self.events else {
            return std::future::pending().await;
        };
        if events.rx.recv().await.is_none() {
            return std::future::pending().await;
        }
        tokio::time::sleep(DEBOUNCE).await;
        while events.rx.try_recv().is_ok() {}
    }

    fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn set_host_local_addrs(&mut self, addrs: BTreeSet<IpAddr>) -> bool {
        let changed = self.cluster.host_local_addrs != addrs;
        self.cluster.host_local_addrs = addrs;
        changed
    }
}

#[cfg(test)]
mod tests;
