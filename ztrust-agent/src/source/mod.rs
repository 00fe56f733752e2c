//! Sources of cluster state: manifest files ([`dir`]) and the Kubernetes API ([`kube`]), both turning
//! Kubernetes objects into the model through [`convert`] and saying what was wrong in the
//! vocabulary of [`problem`].
pub mod convert;
pub mod dir;
pub mod kube;
pub mod problem;

pub use problem::{Converted, Effect, LoadError, ObjectError, Origin, Problem};

use crate::model;

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
