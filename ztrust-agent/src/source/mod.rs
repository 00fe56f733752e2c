//! Sources of cluster state: manifest files ([`dir`]) and the Kubernetes API ([`kube`]), both turning
//! Kubernetes objects into the model through [`convert`] and saying what was wrong in the
//! vocabulary of [`problem`].
pub mod convert;
pub mod dir;
pub mod kube;
pub mod problem;

pub use problem::{Converted, Effect, LoadError, ObjectError, Origin, Problem};

use std::collections::BTreeSet;
use std::future::Future;
use std::net::IpAddr;

use crate::model::{self, Cluster};
use crate::policy::Changes;

/// What the agent's loop asks of a source of cluster state; [`dir::DirSource`] and [`kube::KubeSource`]
/// implement it.
///
/// The loop waits on [`ClusterSource::changed`] (and its own tick, a backstop), then asks
/// [`ClusterSource::poll_changes`]: a source wakes the loop when it has news, it is not polled on a
/// fixed interval for them.
pub trait ClusterSource {
    /// What changed since the last call (the first: everything) with the source's current problems, and
    /// [`ClusterSource::cluster`] is the new state; `None` when nothing changed, and until the source has
    /// a whole snapshot (so the pinned state of an earlier agent keeps enforcing meanwhile).
    fn poll_changes(&mut self) -> Option<(Changes, Vec<LoadError>)>;

    /// Resolves when the source may have news, after a short quiet time so that a burst of changes is
    /// taken together. Cancel-safe: it can sit in a `tokio::select!`.
    fn changed(&mut self) -> impl Future<Output = ()> + Send;

    /// The cluster as of the last change reported.
    fn cluster(&self) -> &Cluster;

    /// The node's local addresses other than its `node_ips` (its traffic to pods may come from any of
    /// them), in the current cluster and every later one. Returns whether they changed.
    fn set_host_local_addrs(&mut self, addrs: BTreeSet<IpAddr>) -> bool;
}

/// What a source read: the cluster's objects and the problems found in them.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// Namespaces, pods, policies, Services and EndpointSlices; `node_ips` and `service_cidrs` are left
    /// empty (the agent knows its node and cluster, files do not).
    pub cluster: model::Cluster,
    pub errors: Vec<LoadError>,
    /// Objects of the lab's own API group (`lab.ztrust.io/*`), untouched.
    pub lab_objects: Vec<serde_json::Value>,
}
