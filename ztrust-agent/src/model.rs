//! The cluster as the policy engine sees it: plain Rust types, no kube or BPF types.
//!
//! Sources (a directory of YAML files, the Kubernetes API) convert their objects into these, validating
//! as they go; the engine (`crate::policy`) turns a [`Cluster`] into the desired datapath state.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub type Labels = BTreeMap<String, String>;

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// `namespace/name`: the form [`ObjectRef`] is displayed in.
impl std::str::FromStr for ObjectRef {
    type Err = InvalidObjectRef;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::new(namespace, name))
            }
            _ => Err(InvalidObjectRef(s.to_owned())),
        }
    }
}

/// Not `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not namespace/name")]
pub struct InvalidObjectRef(pub String);

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    pub annotations: Labels,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Every protocol NetworkPolicy ports name.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The protocol of IANA number `n`, if NetworkPolicy names it.
    pub fn from_number(n: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.number() == n)
    }

    /// IANA protocol number, as in the IP header.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => ztrust_common::proto::TCP,
            Protocol::Udp => ztrust_common::proto::UDP,
            Protocol::Sctp => ztrust_common::proto::SCTP,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub annotations: Labels,
    /// `status.podIPs` (or `status.podIP`); empty while the pod has no address yet.
    pub ips: Vec<IpAddr>,
    /// All `containerPorts` of all containers (named ports resolve against these).
    pub ports: Vec<ContainerPort>,
    pub host_network: bool,
    pub node_name: Option<String>,
}

impl Pod {
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: BTreeSet<String>,
}

/// A Kubernetes label selector. The empty selector selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub match_expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Peer {
    /// `podSelector` and/or `namespaceSelector`. `namespace_selector: None` means the policy's own
    /// namespace; `pod_selector: None` means every pod of the selected namespaces.
    Pods {
        namespace_selector: Option<LabelSelector>,
        pod_selector: Option<LabelSelector>,
    },
    IpBlock {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub protocol: Protocol,
    /// `None`: every port of `protocol`.
    pub port: Option<PortRef>,
    /// Inclusive end of a range starting at a numeric `port`.
    pub end_port: Option<u16>,
}

/// One `ingress` or `egress` rule. Per the API, an empty (or absent) `peers` list matches every peer and
/// an empty (or absent) `ports` list matches every port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: LabelSelector,
    /// `policyTypes` as given, or inferred as the API does (Ingress always; Egress if egress rules exist).
    pub isolates_ingress: bool,
    pub isolates_egress: bool,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    /// The annotation `ztrust.io/mode: audit`: the policy decides a pod's direction only where no enforced
    /// policy isolates it, and there a denial is reported as would-drop and passes. Where an enforced
    /// policy isolates the direction, the audited policy is left out (its rules allow nothing more).
    #[serde(default)]
    pub audit: bool,
}

impl NetworkPolicy {
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }
}

/// One port of a Service: what a client connects to (`port`, and `node_port` on every node's addresses).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// Matches the EndpointSlice port of the same name (both unnamed for a single-port Service).
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A Service as its clients address it. Where it translates to is in its EndpointSlices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs` (empty for a headless Service or an ExternalName).
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs` and `status.loadBalancer.ingress[].ip`: the node translates them as it does the
    /// cluster IPs.
    pub external_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

impl Service {
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }
}

/// One endpoint of an EndpointSlice (`conditions` as the API defines them: `ready` absent means ready).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlicePort {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
}

/// An EndpointSlice: backends of the Service named by its `kubernetes.io/service-name` label.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

impl EndpointSlice {
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }
}

/// Everything the engine compiles from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectRef, Pod>,
    pub policies: BTreeMap<ObjectRef, NetworkPolicy>,
    pub services: BTreeMap<ObjectRef, Service>,
    pub endpoint_slices: BTreeMap<ObjectRef, EndpointSlice>,
    /// Addresses of this node: traffic from them is never blocked (Kubernetes lets no pod block its node).
    pub node_ips: Vec<IpAddr>,
    /// The node's other local addresses (its local routing table, read by the agent): the node's
    /// traffic to a pod may come from any of them — with a point-to-point CNI, from the gateway address
    /// on the pod's host-side interface — and is the node's as well. Not Service frontends.
    pub host_local_addrs: std::collections::BTreeSet<IpAddr>,
    /// Node ports are frontends at every local address of the node (`run --nodeport-addresses all`), not
    /// only at `node_ips`.
    pub node_ports_any_local: bool,
    /// The cluster's Service address ranges (`run --service-cidr`): a pod's connection to an address in
    /// them that is no known Service frontend has no known translation and is dropped.
    pub service_cidrs: Vec<IpNet>,
}

impl Cluster {
    /// The pod (off the host network) that has address `ip`.
    pub fn pod_at(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods
            .values()
            .find(|p| !p.host_network && p.ips.contains(&ip))
    }
}
