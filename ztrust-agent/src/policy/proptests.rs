//! Property tests: on small random clusters, the engine's desired state, looked up as the kernel does
//! ([`lookup`]), gives the same verdict as the reference evaluator for random packets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;
use ztrust_common::{dir, proto};

use super::reference::{reference_allowed, reference_direction};
use super::{Engine, lookup};
use crate::model::{
    Cluster, ContainerPort, LabelSelector, Labels, Namespace, NetworkPolicy, Operator, Peer, Pod, PortRef,
    PortSpec, Protocol, Requirement, Rule,
};

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 15));

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

fn v6(last: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last))
}

fn labels() -> impl Strategy<Value = Labels> {
    proptest::collection::btree_map(
        prop_oneof![Just("app"), Just("tier")],
        prop_oneof![Just("x"), Just("y")],
        0..=2,
    )
    .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
}

fn selector() -> impl Strategy<Value = LabelSelector> {
    let req = (
        prop_oneof![Just("app"), Just("tier")],
        prop_oneof![
            Just(Operator::In),
            Just(Operator::NotIn),
            Just(Operator::Exists),
            Just(Operator::DoesNotExist)
        ],
        proptest::collection::btree_set(prop_oneof![Just("x"), Just("y")], 0..=2),
    )
        .prop_map(|(k, op, vals)| Requirement {
            key: k.to_owned(),
            operator: op,
            values: vals.into_iter().map(str::to_owned).collect(),
        });
    (
        labels().prop_map(|l| l.into_iter().take(1).collect()),
        proptest::collection::vec(req, 0..=1),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        })
}

fn prefix() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        4 => (0u8..20, 26u8..=32).prop_map(|(a, len)| IpNet::new(v4(a), len).expect("valid").trunc()),
        1 => (0u16..4, 124u8..=128).prop_map(|(a, len)| IpNet::new(v6(a), len).expect("valid").trunc()),
    ]
}

fn peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        (proptest::option::of(selector()), proptest::option::of(selector())).prop_map(
            |(namespace_selector, pod_selector)| Peer::Pods {
                namespace_selector,
                pod_selector
            }
        ),
        // Excepts anywhere: the API rejects those outside the cidr, but the model can hold them.
        (prefix(), proptest::collection::vec(prefix(), 0..=2))
            .prop_map(|(cidr, except)| Peer::IpBlock { cidr, except }),
        (prefix(), 1u8..=4).prop_map(|(cidr, extra)| {
            // An except that is surely inside the cidr.
            let len = (cidr.prefix_len() + extra).min(cidr.max_prefix_len());
            let except = IpNet::new(cidr.network(), len).expect("valid");
            Peer::IpBlock {
                cidr,
                except: vec![except],
            }
        }),
    ]
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![3 => Just(Protocol::Tcp), 1 => Just(Protocol::Udp), 1 => Just(Protocol::Sctp)]
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    let number = prop_oneof![Just(80u16), Just(81), Just(443), Just(8080), Just(1000)];
    (
        protocol(),
        prop_oneof![
            1 => Just(None),
            3 => number.prop_map(|n| Some(PortRef::Number(n))),
            3 => prop_oneof![Just("http"), Just("db"), Just("nope")].prop_map(|n| Some(PortRef::Name(n.to_owned()))),
        ],
        proptest::option::of(0u16..300),
    )
        .prop_map(|(protocol, port, end)| {
            let end_port = match (&port, end) {
                (Some(PortRef::Number(n)), Some(e)) => Some(n.saturating_add(e)),
                _ => None,
            };
            PortSpec { protocol, port, end_port }
        })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        proptest::collection::vec(peer(), 0..=3),
        proptest::collection::vec(port_spec(), 0..=2),
    )
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

pub(crate) fn policy(i: usize) -> impl Strategy<Value = NetworkPolicy> {
    (
        0..NAMESPACES.len(),
        selector(),
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(rule(), 0..=2),
        proptest::collection::vec(rule(), 0..=2),
    )
        .prop_map(
            move |(ns, pod_selector, isolates_ingress, isolates_egress, ingress, egress)| NetworkPolicy {
                namespace: NAMESPACES[ns].to_owned(),
                name: format!("p{i}"),
                pod_selector,
                isolates_ingress,
                isolates_egress,
                ingress,
                egress,
            },
        )
}

fn container_port() -> impl Strategy<Value = ContainerPort> {
    (
        proptest::option::of(prop_oneof![Just("http"), Just("db")]),
        prop_oneof![Just(80u16), Just(81), Just(443), Just(8080), Just(1100)],
        protocol(),
    )
        .prop_map(|(name, port, protocol)| ContainerPort {
            name: name.map(str::to_owned),
            port,
            protocol,
        })
}

fn pod() -> impl Strategy<Value = (usize, Labels, bool, bool, Vec<ContainerPort>)> {
    (
        0..NAMESPACES.len(),
        labels(),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.1),
        proptest::collection::vec(container_port(), 0..=3),
    )
}

pub(super) fn cluster() -> impl Strategy<Value = Cluster> {
    let namespaces = proptest::collection::vec(proptest::option::of(labels()), NAMESPACES.len());
    let pods = proptest::collection::vec(pod(), 2..=6);
    let addrs = Just((0u8..15).collect::<Vec<_>>()).prop_shuffle();
    let policies = (0usize..=4).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>());
    (namespaces, pods, addrs, policies, any::<bool>()).prop_map(|(ns_labels, pods, addrs, policies, node)| {
        let mut c = Cluster::default();
        for (name, labels) in NAMESPACES.iter().zip(ns_labels) {
            if let Some(labels) = labels {
                c.namespaces.insert(
                    (*name).to_owned(),
                    Namespace {
                        name: (*name).to_owned(),
                        labels,
                        annotations: Labels::new(),
                    },
                );
            }
        }
        for (i, (ns, labels, dual, host, ports)) in pods.into_iter().enumerate() {
            let mut ips = vec![if host { NODE_IP } else { v4(addrs[i]) }];
            if dual && !host {
                ips.push(v6(u16::from(addrs[i])));
            }
            let pod = Pod {
                namespace: NAMESPACES[ns].to_owned(),
                name: format!("pod{i}"),
                labels,
                ips,
                ports,
                host_network: host,
                ..Pod::default()
            };
            c.pods.insert(pod.object_ref(), pod);
        }
        for p in policies {
            c.policies.insert(p.object_ref(), p);
        }
        if node {
            c.node_ips.push(NODE_IP);
        }
        c
    })
}

#[derive(Clone, Debug)]
pub(super) struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub dport: u16,
}

/// Mostly the addresses of the cluster's pods and node, sometimes any address of the small range.
fn address(c: &Cluster) -> impl Strategy<Value = IpAddr> + use<> {
    let mut known: Vec<IpAddr> = c.pods.values().flat_map(|p| p.ips.iter().copied()).collect();
    known.push(NODE_IP);
    prop_oneof![3 => proptest::sample::select(known), 1 => (0u8..20).prop_map(v4), 1 => (0u16..16).prop_map(v6)]
}

fn packet(c: &Cluster) -> impl Strategy<Value = Packet> + use<> {
    let ports: Vec<(IpAddr, Vec<ContainerPort>)> = c
        .pods
        .values()
        .flat_map(|p| p.ips.iter().map(|ip| (*ip, p.ports.clone())))
        .collect();
    (
        address(c),
        address(c),
        prop_oneof![
            Just(proto::TCP),
            Just(proto::UDP),
            Just(proto::SCTP),
            Just(proto::ICMP)
        ],
        prop_oneof![
            Just(80u16),
            Just(81),
            Just(82),
            Just(443),
            Just(444),
            Just(8080),
            Just(1000),
            Just(1100),
            Just(1299),
            Just(0),
            Just(65535)
        ],
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(move |(src, dst, protocol, dport, index, to_container_port)| {
            // Half of the packets go to one of the destination's container ports, which is where
            // named ports matter.
            let target = ports
                .iter()
                .find(|(ip, _)| *ip == dst)
                .map(|(_, p)| p)
                .filter(|p| !p.is_empty());
            match target {
                Some(list) if to_container_port => {
                    let cp = &list[index.index(list.len())];
                    Packet {
                        src,
                        dst,
                        protocol: cp.protocol.number(),
                        dport: cp.port,
                    }
                }
                _ => Packet {
                    src,
                    dst,
                    protocol,
                    dport,
                },
            }
        })
}

/// Compares the engine with the reference for one packet, direction by direction.
pub(super) fn check(c: &Cluster, d: &super::Desired, p: &Packet) -> Result<(), String> {
    let pod_at = |ip: IpAddr| c.pods.values().find(|x| !x.host_network && x.ips.contains(&ip));
    let mut engine_all = true;
    for (direction, addr) in [(dir::EGRESS, p.src), (dir::INGRESS, p.dst)] {
        if let Some(pod) = pod_at(addr) {
            let want = reference_direction(c, pod, p.src, p.dst, p.protocol, p.dport, direction);
            let got = lookup(d, p.src, p.dst, p.protocol, p.dport, &pod.object_ref(), direction);
            if want != got {
                return Err(format!(
                    "{p:?} at {} direction {direction}: reference {want}, engine {got}\ncluster: {c:#?}\ndesired: {d:#?}",
                    pod.object_ref()
                ));
            }
            engine_all &= got;
        }
    }
    if engine_all != reference_allowed(c, p.src, p.dst, p.protocol, p.dport) {
        return Err(format!("{p:?}: combined verdict differs"));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_reference((c, packets) in cluster().prop_flat_map(|c| {
        let packets = proptest::collection::vec(packet(&c), 150);
        (Just(c), packets)
    })) {
        let d = Engine::new().compile(&c);
        for p in &packets {
            if let Err(e) = check(&c, &d, p) {
                prop_assert!(false, "{}", e);
            }
        }
    }

    /// The allocator keeps the numbers of unchanged keys, and a state compiled after another one is as
    /// exact as one compiled from scratch.
    #[test]
    fn recompile_is_stable_and_exact((c1, c2, packets) in (cluster(), cluster()).prop_flat_map(|(c1, c2)| {
        let packets = proptest::collection::vec(prop_oneof![packet(&c1), packet(&c2)], 60);
        (Just(c1), Just(c2), packets)
    })) {
        let mut engine = Engine::new();
        let d1 = engine.compile(&c1);
        prop_assert_eq!(&engine.compile(&c1), &d1);
        let d2 = engine.compile(&c2);
        for p in &packets {
            if let Err(e) = check(&c2, &d2, p) {
                prop_assert!(false, "{}", e);
            }
        }
        let d1_again = engine.compile(&c1);
        for p in &packets {
            if let Err(e) = check(&c1, &d1_again, p) {
                prop_assert!(false, "{}", e);
            }
        }
    }
}
