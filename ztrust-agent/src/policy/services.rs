//! Service frontends and the backends they translate to, as the datapath judges a pod's egress to them.
//!
//! A pod's egress hook runs before the node's DNAT (kube-proxy's iptables, nftables or IPVS rules), so a
//! packet to a ClusterIP still carries the ClusterIP there. What the connection reaches is one of the
//! Service's ready backends, which the node picks after the hook. Every backend that policy can tell apart
//! from the others is a *class*: its identity and the port the node translates to. The datapath admits
//! a new connection to a frontend when policy admits every class (then whichever backend the node picks,
//! the verdict is the one the connection to it gets), denies it when policy admits none, and drops it as
//! `service-backends-differ` otherwise: it does not guess which one the node would pick.
//!
//! Frontends are what kube-proxy translates: each ClusterIP, external IP and load-balancer address with
//! each Service port, and this node's addresses with each node port. A frontend reaches the backends of
//! its own family (a Service's EndpointSlices are of one address type each). Backends are the ready
//! endpoints, or, when a port has none, the serving and terminating ones (kube-proxy's fallback).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{Cluster, EndpointSlice, Protocol, Service, ServicePort};

use super::Desired;
use super::keys::IpcacheIndex;

/// A Service frontend: what a pod's packet names before the node translates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// A class of backends: (identity, translated port).
pub type BackendClass = (u32, u16);

/// Every frontend of `cluster`'s Services with the classes of its backends (sorted, without repeats;
/// empty when it has no ready or serving backend), identities as `desired`'s ipcache gives them. A
/// frontend that several Services claim (an external IP that is another Service's address) gets the
/// classes of all of them: the node may translate it to any.
pub fn frontends(cluster: &Cluster, desired: &Desired) -> BTreeMap<Frontend, Vec<BackendClass>> {
    let index = IpcacheIndex::new(desired);
    let slices = Slices::new(cluster);
    let mut out: BTreeMap<Frontend, BTreeSet<BackendClass>> = BTreeMap::new();
    for (svc, port, frontend) in each_frontend(cluster) {
        let classes = slices
            .backends(svc, port)
            .into_iter()
            .filter(|(ip, _)| ip.is_ipv4() == frontend.addr.is_ipv4())
            .map(|(ip, target)| (index.identity(ip), target));
        out.entry(frontend).or_default().extend(classes);
    }
    out.into_iter()
        .map(|(f, classes)| (f, classes.into_iter().collect()))
        .collect()
}

/// Every frontend of every Service of `cluster`, with the Service and port it belongs to: each cluster,
/// external and load-balancer address with each port, and this node's addresses with each node port.
pub fn each_frontend(cluster: &Cluster) -> impl Iterator<Item = (&Service, &ServicePort, Frontend)> {
    cluster.services.values().flat_map(move |svc| {
        svc.ports.iter().flat_map(move |port| {
            let at_port = svc
                .cluster_ips
                .iter()
                .chain(&svc.external_ips)
                .map(|ip| (*ip, port.port));
            let at_node_port = port
                .node_port
                .into_iter()
                .flat_map(|np| cluster.node_ips.iter().map(move |ip| (*ip, np)));
            at_port.chain(at_node_port).map(move |(addr, p)| {
                (
                    svc,
                    port,
                    Frontend {
                        addr,
                        port: p,
                        protocol: port.protocol,
                    },
                )
            })
        })
    })
}

/// A cluster's EndpointSlices by the Service they name (looked up once per Service port).
pub struct Slices<'a>(BTreeMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>);

impl<'a> Slices<'a> {
    pub fn new(cluster: &'a Cluster) -> Self {
        let mut by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
        for s in cluster.endpoint_slices.values() {
            by_service
                .entry((s.namespace.as_str(), s.service.as_str()))
                .or_default()
                .push(s);
        }
        Self(by_service)
    }

    /// The (address, target port) of every backend of `port` of `svc`: its EndpointSlices' endpoints
    /// whose slice has a port of the same name and protocol; the ready ones, else the serving
    /// terminating ones.
    pub fn backends(&self, svc: &Service, port: &ServicePort) -> Vec<(IpAddr, u16)> {
        let mut ready = Vec::new();
        let mut terminating = Vec::new();
        let slices = self
            .0
            .get(&(svc.namespace.as_str(), svc.name.as_str()))
            .into_iter()
            .flatten();
        for slice in slices {
            let Some(target) = slice
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == port.protocol)
            else {
                continue;
            };
            for ep in &slice.endpoints {
                let into = if ep.ready {
                    &mut ready
                } else if ep.serving && ep.terminating {
                    &mut terminating
                } else {
                    continue;
                };
                into.extend(ep.addresses.iter().map(|a| (*a, target.port)));
            }
        }
        if ready.is_empty() { terminating } else { ready }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Pod, SliceEndpoint, SlicePort};
    use crate::policy::Engine;
    use ztrust_common::identity;

    fn pod(name: &str, app: &str, ip: &str) -> Pod {
        Pod {
            namespace: "x".into(),
            name: name.into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            ips: vec![ip.parse().unwrap()],
            ..Default::default()
        }
    }

    fn endpoint(ip: &str, ready: bool, terminating: bool) -> SliceEndpoint {
        SliceEndpoint {
            addresses: vec![ip.parse().unwrap()],
            ready,
            serving: ready || terminating,
            terminating,
        }
    }

    fn cluster() -> Cluster {
        let mut c = Cluster::default();
        for p in [
            pod("b1", "b", "10.0.0.11"),
            pod("b2", "b", "10.0.0.12"),
            pod("c", "c", "10.0.0.13"),
        ] {
            c.pods.insert(p.object_ref(), p);
        }
        c.node_ips = vec!["192.168.0.5".parse().unwrap()];
        let svc = Service {
            namespace: "x".into(),
            name: "web".into(),
            cluster_ips: vec!["10.96.0.20".parse().unwrap(), "fd00:96::20".parse().unwrap()],
            external_ips: vec!["203.0.113.7".parse().unwrap()],
            ports: vec![
                ServicePort {
                    name: Some("http".into()),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: Some(30080),
                },
                ServicePort {
                    name: Some("dns".into()),
                    protocol: Protocol::Udp,
                    port: 53,
                    node_port: None,
                },
            ],
        };
        c.services.insert(svc.object_ref(), svc);
        let slice = EndpointSlice {
            namespace: "x".into(),
            name: "web-1".into(),
            service: "web".into(),
            ports: vec![
                SlicePort {
                    name: Some("http".into()),
                    protocol: Protocol::Tcp,
                    port: 8080,
                },
                SlicePort {
                    name: Some("dns".into()),
                    protocol: Protocol::Udp,
                    port: 5353,
                },
            ],
            endpoints: vec![
                endpoint("10.0.0.11", true, false),
                endpoint("10.0.0.12", true, false),
            ],
        };
        c.endpoint_slices.insert(slice.object_ref(), slice);
        c
    }

    fn classes(c: &Cluster, addr: &str, port: u16, protocol: Protocol) -> Option<Vec<BackendClass>> {
        let desired = Engine::new().compile(c);
        frontends(c, &desired)
            .get(&Frontend {
                addr: addr.parse().unwrap(),
                port,
                protocol,
            })
            .cloned()
    }

    #[test]
    fn every_frontend_reaches_the_classes_of_its_backends() {
        let c = cluster();
        let desired = Engine::new().compile(&c);
        let b = super::super::remote_identity(&desired, "10.0.0.11".parse().unwrap());
        assert!(b >= identity::FIRST_DYNAMIC);
        // Two pods with the same labels: one class.
        assert_eq!(
            classes(&c, "10.96.0.20", 80, Protocol::Tcp),
            Some(vec![(b, 8080)])
        );
        assert_eq!(
            classes(&c, "10.96.0.20", 53, Protocol::Udp),
            Some(vec![(b, 5353)])
        );
        assert_eq!(
            classes(&c, "203.0.113.7", 80, Protocol::Tcp),
            Some(vec![(b, 8080)])
        );
        // The node port on this node's addresses.
        assert_eq!(
            classes(&c, "192.168.0.5", 30080, Protocol::Tcp),
            Some(vec![(b, 8080)])
        );
        assert_eq!(classes(&c, "192.168.0.5", 80, Protocol::Tcp), None);
        // A frontend of the other family has no IPv4 backend to reach.
        assert_eq!(classes(&c, "fd00:96::20", 80, Protocol::Tcp), Some(vec![]));
        // No frontend for a port the Service does not have, nor a protocol.
        assert_eq!(classes(&c, "10.96.0.20", 8080, Protocol::Tcp), None);
        assert_eq!(classes(&c, "10.96.0.20", 80, Protocol::Udp), None);
    }

    /// An external IP that is another Service's ClusterIP: the node may translate it to either's
    /// backends, so it has the classes of both.
    #[test]
    fn a_frontend_two_services_claim_has_the_classes_of_both() {
        let mut c = cluster();
        let other = Service {
            namespace: "y".into(),
            name: "claim".into(),
            external_ips: vec!["10.96.0.20".parse().unwrap()],
            ports: vec![ServicePort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None,
            }],
            ..Default::default()
        };
        c.services.insert(other.object_ref(), other);
        let slice = EndpointSlice {
            namespace: "y".into(),
            name: "claim-1".into(),
            service: "claim".into(),
            ports: vec![SlicePort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 9999,
            }],
            endpoints: vec![endpoint("10.0.0.13", true, false)],
        };
        c.endpoint_slices.insert(slice.object_ref(), slice);
        let desired = Engine::new().compile(&c);
        let id = |ip: &str| super::super::remote_identity(&desired, ip.parse().unwrap());
        let mut want = vec![(id("10.0.0.11"), 8080), (id("10.0.0.13"), 9999)];
        want.sort_unstable();
        assert_eq!(classes(&c, "10.96.0.20", 80, Protocol::Tcp), Some(want));
    }

    #[test]
    fn backends_of_other_labels_are_another_class_and_terminating_ones_only_as_a_fallback() {
        let mut c = cluster();
        let r = crate::model::ObjectRef::new("x", "web-1");
        c.endpoint_slices
            .get_mut(&r)
            .unwrap()
            .endpoints
            .push(endpoint("10.0.0.13", true, false));
        let desired = Engine::new().compile(&c);
        let id = |ip: &str| super::super::remote_identity(&desired, ip.parse().unwrap());
        let mut want = vec![(id("10.0.0.11"), 8080), (id("10.0.0.13"), 8080)];
        want.sort_unstable();
        assert_eq!(classes(&c, "10.96.0.20", 80, Protocol::Tcp), Some(want));
        // c terminating while others are ready: not a backend.
        c.endpoint_slices.get_mut(&r).unwrap().endpoints[2] = endpoint("10.0.0.13", false, true);
        assert_eq!(
            classes(&c, "10.96.0.20", 80, Protocol::Tcp),
            Some(vec![(id("10.0.0.11"), 8080)])
        );
        // Nothing ready: the serving terminating ones.
        for e in &mut c.endpoint_slices.get_mut(&r).unwrap().endpoints[..2] {
            *e = SliceEndpoint {
                ready: false,
                serving: false,
                ..e.clone()
            };
        }
        assert_eq!(
            classes(&c, "10.96.0.20", 80, Protocol::Tcp),
            Some(vec![(id("10.0.0.13"), 8080)])
        );
        // A slice of another Service, or without the port's name, adds nothing.
        c.endpoint_slices.get_mut(&r).unwrap().service = "other".into();
        assert_eq!(classes(&c, "10.96.0.20", 80, Protocol::Tcp), Some(vec![]));
    }
}
