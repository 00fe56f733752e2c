//! The vocabulary of source problems: what is wrong with an object ([`Problem`]), what was done about
//! it ([`Effect`]), in which object and field ([`ObjectError`]), and where the object came from
//! ([`LoadError`], [`Origin`]). The conversion to the model ([`super::convert`]) knows nothing about
//! sources and says [`ObjectError`]s; each source adds its [`Origin`].

use std::fmt;
use std::path::PathBuf;

use ipnet::IpNet;

use crate::model;

/// What is wrong with one field of one object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("cannot parse the document: {0}")]
    Syntax(String),
    #[error("not a Kubernetes object (no apiVersion/kind)")]
    NotAnObject,
    #[error("unsupported kind {api_version} {kind}, ignored")]
    UnsupportedKind { api_version: String, kind: String },
    #[error("does not match the {kind} schema ({message}); object ignored")]
    Schema { kind: &'static str, message: String },
    #[error(
        "does not match the NetworkPolicy schema ({0}); the policy isolates the pods it selects and allows nothing"
    )]
    PolicySchemaFailClosed(String),
    #[error("required field is missing")]
    Missing,
    #[error("invalid IP address {0:?}")]
    BadIp(String),
    #[error("invalid CIDR {0:?} (expected address/prefix-length)")]
    BadCidr(String),
    #[error("except {except} is not of the same address family as cidr {cidr}")]
    ExceptFamily { cidr: IpNet, except: IpNet },
    #[error("except {except} is not a strict subset of cidr {cidr}")]
    ExceptOutside { cidr: IpNet, except: IpNet },
    #[error("port number {0} is outside 1..=65535")]
    PortRange(i64),
    #[error(
        "invalid port name {0:?} (IANA_SVC_NAME: at most 15 characters, lowercase letters, digits and '-', at least one letter, no leading, trailing or double '-')"
    )]
    PortName(String),
    #[error("unsupported protocol {0:?} (TCP, UDP or SCTP)")]
    Protocol(String),
    #[error("endPort is only allowed with a numeric port")]
    EndPortWithoutNumber,
    #[error("endPort {end} is less than port {port}")]
    EndPortBelow { port: u16, end: i64 },
    #[error("unknown operator {0:?} (In, NotIn, Exists, DoesNotExist)")]
    Operator(String),
    #[error("operator {0} needs a non-empty values list")]
    ValuesRequired(&'static str),
    #[error("operator {0} must have no values")]
    ValuesForbidden(&'static str),
    #[error("a peer must set exactly one of ipBlock or podSelector/namespaceSelector")]
    PeerKind,
    #[error("unknown policy type {0:?} (Ingress or Egress); the policy isolates both directions")]
    PolicyType(String),
    #[error("unknown mode {0:?} (audit or enforce); the policy is enforced")]
    Mode(String),
    #[error("invalid selector: the policy cannot tell which pods it selects")]
    InvalidPodSelector,
    #[error("duplicate object; the one read later replaces the one read earlier")]
    Duplicate,
    /// Not a fault of the object: a limit of where ztrust enforces (reported as an Event, not counted
    /// as a source error).
    #[error(
        "selects host-network pod {pod} on node {node}: its traffic crosses no pod interface, so ztrust does \
         not enforce this policy for it"
    )]
    SelectsHostNetworkPod { pod: model::ObjectRef, node: String },
}

/// Describes what happened to the part of the object that is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond what the problem says.
    None,
    /// The object was ignored.
    ObjectDropped,
    /// The peer was dropped: it matches nothing (a rule left without valid peers allows nothing).
    PeerDropped,
    /// The port entry was dropped (a rule left without valid ports allows nothing).
    PortDropped,
    /// The value was ignored (e.g. one address or container port of a pod).
    ValueDropped,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::None => "",
            Effect::ObjectDropped => "; object ignored",
            Effect::PeerDropped => "; peer dropped, it matches nothing (fail closed)",
            Effect::PortDropped => "; port dropped, it matches nothing (fail closed)",
            Effect::ValueDropped => "; value ignored",
        })
    }
}

/// A problem in one object, independent of where the object came from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {problem}{effect}")]
pub struct ObjectError {
    /// `Kind namespace/name` (or `Kind name` for cluster-scoped objects).
    pub object: String,
    /// Field path as in the API, e.g. `spec.ingress[0].from[1].ipBlock.cidr`.
    pub field: String,
    pub problem: Problem,
    pub effect: Effect,
}

impl ObjectError {
    /// The problem, as read from `origin`.
    pub fn at(self, origin: &Origin) -> LoadError {
        LoadError {
            origin: origin.clone(),
            object: self.object,
            field: self.field,
            problem: self.problem,
            effect: self.effect,
        }
    }
}

/// Where an object was read from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// A manifest file (the directory source, the lab).
    File(PathBuf),
    /// The Kubernetes API server (the `kube` source).
    Api,
    /// Several files: an object two of them define, found when they are put together.
    Merged,
}

impl Origin {
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Origin::File(path.into())
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Api => f.write_str("kube-apiserver"),
            Origin::Merged => f.write_str("(merged)"),
        }
    }
}

/// A problem in an object from a source: where it was read, the object (`Kind namespace/name`), the
/// field path and the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct LoadError {
    pub origin: Origin,
    pub object: String,
    pub field: String,
    pub problem: Problem,
    pub effect: Effect,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.object)?;
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}{}", self.problem, self.effect)
    }
}

/// The result of converting one object: the object (unless it had to be dropped) and its problems.
#[derive(Clone, Debug)]
pub struct Converted<T> {
    pub value: Option<T>,
    pub errors: Vec<ObjectError>,
}
