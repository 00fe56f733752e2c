//! Cluster models the in-process tests enforce: one namespace `x` (labelled `ns=x`), pods labelled
//! `app=<name>`, policies in `x` that select and admit pods by `app`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ztrust_agent::model::{
    Cluster, LabelSelector, Namespace, NetworkPolicy, Peer, Pod, PortRef, PortSpec, Protocol, Rule,
};

/// The test pods' and policies' namespace.
pub const NS: &str = "x";

pub fn labels(app: &str) -> BTreeMap<String, String> {
    [("app".to_owned(), app.to_owned())].into()
}

/// Selects the pods labelled `app=<app>`.
pub fn selector(app: &str) -> LabelSelector {
    LabelSelector {
        match_labels: labels(app),
        ..Default::default()
    }
}

/// The pods labelled `app=<app>` in the policy's namespace.
pub fn peer(app: &str) -> Peer {
    Peer::Pods {
        namespace_selector: None,
        pod_selector: Some(selector(app)),
    }
}

/// `protocol` port `port` (to `end` if given).
pub fn port(protocol: Protocol, port: u16, end: Option<u16>) -> PortSpec {
    PortSpec {
        protocol,
        port: Some(PortRef::Number(port)),
        end_port: end,
    }
}

/// From or to the pods labelled `app=<app>` on `protocol` `port`.
pub fn rule(app: &str, protocol: Protocol, number: u16) -> Rule {
    Rule {
        peers: vec![peer(app)],
        ports: vec![port(protocol, number, None)],
    }
}

/// Pod `x/<name>`, labelled `app=<name>`, with `ips`.
pub fn pod(name: &str, ips: Vec<IpAddr>) -> Pod {
    Pod {
        namespace: NS.into(),
        name: name.into(),
        labels: labels(name),
        ips,
        ..Default::default()
    }
}

/// A policy in `x` selecting `app=<app>`: it isolates the directions whose rule lists are given (an
/// empty list isolates and allows nothing).
pub fn policy(name: &str, app: &str, ingress: Option<Vec<Rule>>, egress: Option<Vec<Rule>>) -> NetworkPolicy {
    NetworkPolicy {
        namespace: NS.into(),
        name: name.into(),
        pod_selector: selector(app),
        isolates_ingress: ingress.is_some(),
        isolates_egress: egress.is_some(),
        ingress: ingress.unwrap_or_default(),
        egress: egress.unwrap_or_default(),
        audit: false,
    }
}

/// Namespace `x` with `pods` and `policies`.
pub fn cluster(
    pods: impl IntoIterator<Item = Pod>,
    policies: impl IntoIterator<Item = NetworkPolicy>,
) -> Cluster {
    let mut c = Cluster::default();
    c.namespaces.insert(
        NS.into(),
        Namespace {
            name: NS.into(),
            labels: [("ns".to_owned(), NS.to_owned())].into(),
            ..Default::default()
        },
    );
    for p in pods {
        c.pods.insert(p.object_ref(), p);
    }
    for p in policies {
        c.policies.insert(p.object_ref(), p);
    }
    c
}
