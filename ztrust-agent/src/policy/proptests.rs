//! Property tests: on small random clusters, the engine's desired state, looked up as the kernel does
//! ([`lookup`]), gives the same verdict as the reference evaluator for random packets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;
use ztrust_common::{dir, proto};

use super::reference::{reference_allowed, reference_direction};
use super::{Changes, Engine};
use crate::datapath::keys::{ipcache_key, lookup};
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

/// An IPv6 address that is IPv4-mapped (`::ffff:10.0.0.last`): in the kernel's 128-bit key space, where
/// the datapath keeps IPv4.
fn mapped(last: u8) -> IpAddr {
    IpAddr::V6(Ipv4Addr::new(10, 0, 0, last).to_ipv6_mapped())
}

/// Prefixes whose kernel keys meet the other family's: IPv6 prefixes shorter than /96 that contain the
/// IPv4-mapped space (`::/0` …), that space itself and prefixes inside it, IPv6 prefixes beside it, and
/// short IPv4 prefixes.
const CROSS_FAMILY: [&str; 14] = [
    "::/0",
    "::/1",
    "::/64",
    "::/80",
    "::/96",
    "::ffff:0:0/96",
    "::ffff:10.0.0.0/120",
    "::ffff:10.0.0.4/126",
    "::ffff:10.0.0.3/128",
    "fd00::/8",
    "0.0.0.0/0",
    "0.0.0.0/1",
    "128.0.0.0/1",
    "10.0.0.0/8",
];

fn prefix() -> impl Strategy<Value = IpNet> {
    let cross: Vec<IpNet> = CROSS_FAMILY.iter().map(|p| p.parse().expect("valid")).collect();
    prop_oneof![
        4 => (0u8..20, 26u8..=32).prop_map(|(a, len)| IpNet::new(v4(a), len).expect("valid").trunc()),
        1 => (0u16..4, 124u8..=128).prop_map(|(a, len)| IpNet::new(v6(a), len).expect("valid").trunc()),
        2 => proptest::sample::select(cross),
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
        // One policy in four audited (`ztrust.io/mode: audit`).
        proptest::bool::weighted(0.25),
    )
        .prop_map(
            move |(ns, pod_selector, isolates_ingress, isolates_egress, ingress, egress, audit)| {
                NetworkPolicy {
                    namespace: NAMESPACES[ns].to_owned(),
                    name: format!("p{i}"),
                    pod_selector,
                    isolates_ingress,
                    isolates_egress,
                    ingress,
                    egress,
                    audit,
                }
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

/// A pod's second address: none, its IPv6 address, or an IPv4-mapped IPv6 address (which no packet
/// carries, but which the kernel would key as IPv4).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Second {
    None,
    V6,
    Mapped,
}

fn pod() -> impl Strategy<Value = (usize, Labels, Second, bool, Vec<ContainerPort>)> {
    (
        0..NAMESPACES.len(),
        labels(),
        prop_oneof![14 => Just(Second::None), 5 => Just(Second::V6), 1 => Just(Second::Mapped)],
        prop::bool::weighted(0.1),
        proptest::collection::vec(container_port(), 0..=3),
    )
}

pub(crate) fn cluster() -> impl Strategy<Value = Cluster> {
    let namespaces = proptest::collection::vec(proptest::option::of(labels()), NAMESPACES.len());
    let pods = proptest::collection::vec(pod(), 2..=6);
    let addrs = Just((0u8..15).collect::<Vec<_>>()).prop_shuffle();
    let policies = (0usize..=4).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>());
    cluster_of(namespaces, pods, addrs, policies)
}

fn cluster_of(
    namespaces: impl Strategy<Value = Vec<Option<Labels>>>,
    pods: impl Strategy<Value = Vec<(usize, Labels, Second, bool, Vec<ContainerPort>)>>,
    addrs: impl Strategy<Value = Vec<u8>>,
    policies: impl Strategy<Value = Vec<NetworkPolicy>>,
) -> impl Strategy<Value = Cluster> {
    let node = (any::<bool>(), prop::bool::weighted(0.1));
    (namespaces, pods, addrs, policies, node).prop_map(
        |(ns_labels, pods, addrs, policies, (node, node_mapped))| {
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
            for (i, (ns, labels, second, host, ports)) in pods.into_iter().enumerate() {
                let mut ips = vec![if host { NODE_IP } else { v4(addrs[i]) }];
                match second {
                    _ if host => {}
                    Second::None => {}
                    Second::V6 => ips.push(v6(u16::from(addrs[i]))),
                    // The pod's own IPv4 address, or one no pod has (16..20).
                    Second::Mapped => ips.push(mapped(if i % 2 == 0 { addrs[i] } else { 16 + i as u8 % 4 })),
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
            if node_mapped {
                c.node_ips.push(mapped(16));
            }
            c
        },
    )
}

#[derive(Clone, Debug)]
pub(crate) struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub dport: u16,
}

/// Addresses outside the small ranges of the generated pods and prefixes (inside the wide prefixes of
/// [`CROSS_FAMILY`] only).
const WORLD: [&str; 5] = ["192.0.2.1", "10.1.0.1", "8.8.8.8", "2001:db8::1", "::1"];

/// Mostly the addresses of the cluster's pods and node, sometimes any address of the small range or of
/// the world. Never an IPv4-mapped IPv6 address: no packet carries one (the datapath drops such IPv6
/// packets as malformed).
fn address(c: &Cluster) -> impl Strategy<Value = IpAddr> + use<> {
    let is_mapped = |ip: &IpAddr| matches!(ip, IpAddr::V6(a) if a.to_ipv4_mapped().is_some());
    let mut known: Vec<IpAddr> = c
        .pods
        .values()
        .flat_map(|p| p.ips.iter().copied())
        .filter(|ip| !is_mapped(ip))
        .collect();
    known.push(NODE_IP);
    let world: Vec<IpAddr> = WORLD.iter().map(|a| a.parse().expect("valid")).collect();
    prop_oneof![
        3 => proptest::sample::select(known),
        1 => (0u8..20).prop_map(v4),
        1 => (0u16..16).prop_map(v6),
        1 => proptest::sample::select(world),
    ]
}

pub(crate) fn packet(c: &Cluster) -> impl Strategy<Value = Packet> + use<> {
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

/// A cluster that evolves: seven steps from three random clusters, each step taking a random part of
/// the differences to another (pods and namespaces, then policies that keep the ipBlock prefixes and
/// egress named ports, so that most steps are incremental for the engine; the last step anything).
/// Pods are spread over the node "here", the node "there" and no node.
pub(crate) fn evolution() -> impl Strategy<Value = Vec<Cluster>> {
    (
        cluster(),
        cluster(),
        cluster(),
        proptest::collection::vec(any::<u64>(), 4),
        proptest::collection::vec(0u8..3, 6),
    )
        .prop_map(|(a, b, c, masks, nodes)| {
            let place = |mut c: Cluster| {
                for (i, pod) in c.pods.values_mut().enumerate() {
                    pod.node_name = match nodes[i % nodes.len()] {
                        0 => None,
                        1 => Some("here".to_owned()),
                        _ => Some("there".to_owned()),
                    };
                }
                c
            };
            let s1 = mix(&a, &b, masks[0], Mix::PodsAndNamespaces);
            let s2 = mix(&s1, &b, masks[1], Mix::Policies);
            let s3 = mix(&s2, &c, masks[2], Mix::PodsAndNamespaces);
            let s4 = mix(&s3, &c, masks[3], Mix::Policies);
            let s5 = mix(&s4, &a, !masks[0], Mix::PodsAndNamespaces);
            let s6 = mix(&s5, &b, masks[1] ^ masks[2], Mix::All);
            [a, s1, s2, s3, s4, s5, s6].into_iter().map(place).collect()
        })
}

/// The endpoints of `d` with identity and rule numbers replaced by what they stand for (the ipcache
/// prefixes of an identity, the rule's policy and index): equal for two states that differ only in
/// numbering.
fn canonical(d: &super::Desired) -> std::collections::BTreeMap<crate::model::ObjectRef, String> {
    let mut prefixes: std::collections::BTreeMap<u32, Vec<IpNet>> = std::collections::BTreeMap::new();
    for (net, id) in &d.ipcache {
        prefixes.entry(*id).or_default().push(*net);
    }
    let name = |id: u32| match id {
        ztrust_common::identity::ANY => "any".to_owned(),
        ztrust_common::identity::HOST => "host".to_owned(),
        _ => format!("{:?}", prefixes.get(&id)),
    };
    d.endpoints
        .iter()
        .map(|(r, ep)| {
            let allow: std::collections::BTreeSet<String> = ep
                .allow
                .iter()
                .map(|(k, rule)| {
                    format!(
                        "{} {} {} {}-{} by {:?}",
                        k.direction,
                        name(k.remote),
                        k.protocol,
                        k.port_lo,
                        k.port_hi,
                        d.rules.get(rule)
                    )
                })
                .collect();
            let text = format!(
                "identity {} in {} eg {} ips {:?} in {:?} eg {:?} allow {:#?}",
                name(ep.identity),
                ep.isolated_ingress,
                ep.isolated_egress,
                ep.ips,
                ep.ingress_policies,
                ep.egress_policies,
                allow
            );
            (r.clone(), text)
        })
        .collect()
}

/// What a step of [`mix`] takes from the second cluster.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Mix {
    /// Namespaces and pods that are not on the host network in either (policies stay).
    PodsAndNamespaces,
    /// Policies with the same ipBlock prefixes and egress named ports in both (pods stay).
    Policies,
    /// Any object.
    All,
}

/// `a`, with the objects (by key) that `what` allows and bit `i` of `mask` picks taken from `b`: a
/// cluster that differs from `a` by a random part of their differences.
pub(crate) fn mix(a: &Cluster, b: &Cluster, mask: u64, what: Mix) -> Cluster {
    fn pick<K: Ord + Clone, V: Clone>(
        a: &std::collections::BTreeMap<K, V>,
        b: &std::collections::BTreeMap<K, V>,
        mask: u64,
        salt: u32,
        allowed: impl Fn(Option<&V>, Option<&V>) -> bool,
    ) -> std::collections::BTreeMap<K, V> {
        let keys: std::collections::BTreeSet<&K> = a.keys().chain(b.keys()).collect();
        keys.into_iter()
            .enumerate()
            .filter_map(|(i, k)| {
                let take_b = mask.rotate_left(salt + i as u32) & 1 == 1 && allowed(a.get(k), b.get(k));
                (if take_b { b } else { a })
                    .get(k)
                    .map(|v| (k.clone(), v.clone()))
            })
            .collect()
    }
    let pods_too = matches!(what, Mix::PodsAndNamespaces | Mix::All);
    let policies_too = matches!(what, Mix::Policies | Mix::All);
    let not_host = |p: Option<&Pod>| p.is_none_or(|p| !p.host_network);
    let facts = |p: Option<&NetworkPolicy>| p.map(super::compile::facts).unwrap_or_default();
    Cluster {
        namespaces: pick(&a.namespaces, &b.namespaces, mask, 0, |_, _| pods_too),
        pods: pick(&a.pods, &b.pods, mask, 7, |x, y| {
            matches!(what, Mix::All) || (pods_too && not_host(x) && not_host(y))
        }),
        policies: pick(&a.policies, &b.policies, mask, 19, |x, y| {
            matches!(what, Mix::All) || (policies_too && facts(x) == facts(y))
        }),
        node_ips: a.node_ips.clone(),
        ..Cluster::default()
    }
}

/// The kernel keys of the ipcache are distinct (two prefixes of one key would leave the kernel with
/// whichever was written last), the IPv4 space is one of them, and nothing is keyed inside it but IPv4.
pub(super) fn check_kernel_keys(d: &super::Desired) -> Result<(), String> {
    let keys: std::collections::BTreeSet<_> = d.ipcache.keys().map(ipcache_key).collect();
    if keys.len() != d.ipcache.len() {
        return Err(format!(
            "two ipcache prefixes share a kernel key: {:?}",
            d.ipcache
        ));
    }
    if !d.ipcache.contains_key(&super::v4_space()) {
        return Err(format!("no entry for the IPv4 space: {:?}", d.ipcache));
    }
    match d.ipcache.keys().find(|n| super::keyed_as_ipv4(n)) {
        Some(n) => Err(format!("{n} is keyed as IPv4")),
        None => Ok(()),
    }
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
        if let Err(e) = check_kernel_keys(&d) {
            prop_assert!(false, "{}", e);
        }
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
        if let Err(e) = check_kernel_keys(&d2) {
            prop_assert!(false, "{}", e);
        }
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

    /// An engine updated through an [`evolution`], each step told only which objects changed, is as
    /// exact as the reference and equal (numbering aside) to one compiled from scratch, for the
    /// endpoints of its node (a step that changes the ipBlock prefixes or the host addresses rebuilds).
    #[test]
    fn incremental_updates_are_exact((steps, packets) in evolution().prop_flat_map(|steps| {
            let packets: Vec<_> = steps.iter().map(|c| proptest::collection::vec(packet(c), 40)).collect();
            (Just(steps), packets)
        })) {
        let mut engine = Engine::for_node("here");
        let mut previous = Cluster::default();
        for (c, packets) in steps.iter().zip(&packets) {
            engine.update(c, &Changes::between(&previous, c));
            previous = c.clone();
            let d = engine.desired();
            if let Err(e) = check_kernel_keys(d) {
                prop_assert!(false, "{}", e);
            }
            let fresh = Engine::for_node("here").compile(c);
            prop_assert_eq!(d.endpoints.keys().collect::<Vec<_>>(), fresh.endpoints.keys().collect::<Vec<_>>());
            prop_assert_eq!(d.ipcache.keys().collect::<Vec<_>>(), fresh.ipcache.keys().collect::<Vec<_>>());
            prop_assert_eq!(canonical(d), canonical(&fresh));
            let (mut w1, mut w2) = (d.warnings.clone(), fresh.warnings.clone());
            w1.sort();
            w2.sort();
            prop_assert_eq!(w1, w2);
            let local = |pod: &crate::model::Pod| pod.node_name.as_deref().is_none_or(|n| n == "here");
            let pod_at = |ip: IpAddr| c.pods.values().find(|x| !x.host_network && x.ips.contains(&ip));
            for p in packets {
                for (direction, addr) in [(dir::EGRESS, p.src), (dir::INGRESS, p.dst)] {
                    if let Some(pod) = pod_at(addr).filter(|pod| local(pod)) {
                        let want = reference_direction(c, pod, p.src, p.dst, p.protocol, p.dport, direction);
                        let got = lookup(d, p.src, p.dst, p.protocol, p.dport, &pod.object_ref(), direction);
                        prop_assert_eq!(want, got, "{:?} at {} direction {}\ncluster: {:#?}\ndesired: {:#?}", p, pod.object_ref(), direction, c, d);
                    }
                }
            }
        }
    }
}

/// A Service in front of every IPv4 pod address of `c` (port 80 → target `target`, all ready), at
/// 10.96.0.1.
fn with_service_to_all(c: &Cluster, target: u16) -> Cluster {
    use crate::model::{ServicePort, SliceEndpoint};
    let mut c = c.clone();
    let port = ServicePort {
        name: None,
        protocol: Protocol::Tcp,
        port: 80,
        node_port: None,
    };
    let backends = c
        .pods
        .values()
        .filter(|p| !p.host_network)
        .flat_map(|p| p.ips.iter().filter(|ip| ip.is_ipv4()))
        .map(|ip| SliceEndpoint {
            addresses: vec![*ip],
            ready: true,
            serving: true,
            terminating: false,
        })
        .collect();
    let cluster_ip = vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))];
    super::services::add_service(&mut c, "a", "all", cluster_ip, port, target, backends);
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Merging the classes of a Service's backends never changes a verdict: for every endpoint whose
    /// egress is isolated, a connection to the Service (judged as the kernel's `judge_service` does,
    /// over the classes an incrementally updated engine wrote) is admitted iff the reference admits it to
    /// every backend, denied iff to none, and otherwise not guessed — also after steps that change only
    /// policies (whose allow sets decide which identities are alike).
    #[test]
    fn service_classes_keep_the_verdict_of_every_backend(
        steps in evolution(),
        target in prop_oneof![Just(80u16), Just(81), Just(443), Just(1100)],
    ) {
        use super::{Frontend, remote_identity};
        use crate::datapath::keys::admits_remote;
        let frontend = Frontend {
            addr: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let mut engine = Engine::for_node("here");
        let mut previous = Cluster::default();
        for step in &steps {
            let c = with_service_to_all(step, target);
            engine.update(&c, &Changes::between(&previous, &c));
            // As the agent does after each sync: what the next update changes is its own delta.
            engine.take_delta();
            previous = c.clone();
            let d = engine.desired();
            // Kept between updates, the frontends are what a computation from scratch finds.
            prop_assert_eq!(&d.services, &super::services::frontends(&c, d));
            let classes = d.services.get(&frontend).cloned().unwrap_or_default();
            let backends: Vec<IpAddr> = c.endpoint_slices.values().flat_map(|s| &s.endpoints).flat_map(|e| e.addresses.clone()).collect();
            // The raw classes (one per backend identity) bound the merged ones.
            let raw: std::collections::BTreeSet<u32> = backends.iter().map(|ip| remote_identity(d, *ip)).collect();
            prop_assert!(classes.len() <= raw.len().max(1));
            prop_assert!(classes.iter().all(|(id, _)| raw.contains(id)), "a class named by no backend: {:?}", classes);
            for (r, ep) in d.endpoints.iter().filter(|(_, ep)| ep.isolated_egress) {
                let Some(pod) = c.pods.get(r) else { continue };
                let Some(src) = pod.ips.iter().copied().find(IpAddr::is_ipv4) else { continue };
                let admitted: Vec<bool> = backends
                    .iter()
                    .map(|b| reference_direction(&c, pod, src, *b, proto::TCP, target, dir::EGRESS))
                    .collect();
                let got: Vec<bool> = classes
                    .iter()
                    // What passes: admitted, or a would-drop where audited policies alone isolate.
                    .map(|(id, port)| ep.audit_egress || admits_remote(ep, *id, dir::EGRESS, proto::TCP, *port))
                    .collect();
                if admitted.is_empty() {
                    prop_assert!(got.is_empty());
                } else if admitted.iter().all(|a| *a) {
                    prop_assert!(got.iter().all(|g| *g), "{} admits every backend, classes {:?} say no", r, classes);
                } else if admitted.iter().all(|a| !*a) {
                    prop_assert!(got.iter().all(|g| !*g), "{} admits no backend, classes {:?} say yes", r, classes);
                } else {
                    prop_assert!(got.iter().any(|g| *g) && got.iter().any(|g| !*g),
                        "{} admits some backends: the classes {:?} must differ", r, classes);
                }
            }
        }
    }
}

/// A namespace relabel moves an identity out of one rule's peer and back while an overlapping later
/// rule keeps allowing it: the entry must stay (handed to the later rule) and return to the earlier
/// rule, exactly as a compile from scratch attributes it; a named-port entry of a third rule goes and
/// comes back with it.
#[test]
fn namespace_relabel_hands_entries_between_overlapping_rules() {
    let labels = |pairs: &[(&str, &str)]| -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let ns = |name: &str, l: Labels| Namespace {
        name: name.to_owned(),
        labels: l,
        annotations: Labels::new(),
    };
    let pod = |ns: &str, name: &str, app: &str, ip: u8| Pod {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        labels: labels(&[("app", app)]),
        ips: vec![v4(ip)],
        ..Pod::default()
    };
    let policy = |name: &str, peer: Peer| NetworkPolicy {
        namespace: "srv".to_owned(),
        name: name.to_owned(),
        pod_selector: LabelSelector::default(),
        isolates_ingress: true,
        isolates_egress: false,
        audit: false,
        ingress: vec![Rule {
            peers: vec![peer],
            ports: vec![PortSpec {
                protocol: Protocol::Tcp,
                port: Some(PortRef::Number(80)),
                end_port: None,
            }],
        }],
        egress: Vec::new(),
    };
    let selector = |l: Labels| LabelSelector {
        match_labels: l,
        match_expressions: Vec::new(),
    };
    let with_team = |team: bool| {
        let mut c = Cluster::default();
        let cl = if team {
            labels(&[("name", "cl"), ("team", "x")])
        } else {
            labels(&[("name", "cl")])
        };
        c.namespaces.insert("cl".into(), ns("cl", cl));
        c.namespaces
            .insert("srv".into(), ns("srv", labels(&[("name", "srv")])));
        let mut server = pod("srv", "server", "s", 2);
        server.ports = vec![ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp,
        }];
        for p in [pod("cl", "client", "c", 1), server] {
            c.pods.insert(p.object_ref(), p);
        }
        for p in [
            policy(
                "p1",
                Peer::Pods {
                    namespace_selector: Some(selector(labels(&[("team", "x")]))),
                    pod_selector: None,
                },
            ),
            policy(
                "p2",
                Peer::Pods {
                    namespace_selector: Some(selector(labels(&[("name", "cl")]))),
                    pod_selector: Some(selector(labels(&[("app", "c")]))),
                },
            ),
            // A named port (resolved on the server) from the namespaces of team x.
            NetworkPolicy {
                name: "p3".into(),
                ingress: vec![Rule {
                    peers: vec![Peer::Pods {
                        namespace_selector: Some(selector(labels(&[("team", "x")]))),
                        pod_selector: None,
                    }],
                    ports: vec![PortSpec {
                        protocol: Protocol::Tcp,
                        port: Some(PortRef::Name("http".into())),
                        end_port: None,
                    }],
                }],
                ..policy(
                    "p3",
                    Peer::Pods {
                        namespace_selector: None,
                        pod_selector: None,
                    },
                )
            },
        ] {
            c.policies.insert(p.object_ref(), p);
        }
        c
    };
    let mut engine = Engine::new();
    let mut previous = Cluster::default();
    for (team, by) in [(true, "p1"), (false, "p2"), (true, "p1")] {
        let c = with_team(team);
        engine.update(&c, &Changes::between(&previous, &c));
        previous = c.clone();
        let d = engine.desired();
        assert_eq!(
            canonical(d),
            canonical(&Engine::new().compile(&c)),
            "team label {team}"
        );
        let server = crate::model::ObjectRef::new("srv", "server");
        let client_id = d.ipcache[&IpNet::from(v4(1))];
        let rule = d.endpoints[&server]
            .allow
            .iter()
            .find(|(k, _)| k.remote == client_id && k.port_lo == 80)
            .map(|(_, r)| d.rules[r].policy.name.clone());
        assert_eq!(rule.as_deref(), Some(by), "team label {team}");
        let named = d.endpoints[&server]
            .allow
            .keys()
            .any(|k| k.remote == client_id && k.port_lo == 8080);
        assert_eq!(named, team, "the named port entry follows the team label");
    }
}

/// Services over `c` chosen by `mask`: up to three, each over the pods its bits pick, one with an
/// external IP that is another's cluster IP (a frontend two Services claim), a slice that names the
/// first Service or the second, and node ports at the node's addresses.
fn with_services(c: &Cluster, mask: u64) -> Cluster {
    use crate::model::{EndpointSlice, Service, ServicePort, SliceEndpoint, SlicePort};
    let mut c = c.clone();
    c.node_ips = vec![IpAddr::V4(Ipv4Addr::new(192, 168, 0, 5))];
    let addrs: Vec<IpAddr> = c
        .pods
        .values()
        .filter(|p| !p.host_network)
        .flat_map(|p| p.ips.clone())
        .collect();
    for k in 0..3u64 {
        if mask >> (k * 8) & 1 == 0 {
            continue;
        }
        let name = format!("s{k}");
        let port = ServicePort {
            name: Some("p".into()),
            protocol: Protocol::Tcp,
            port: 80 + k as u16,
            node_port: (mask >> (k * 8 + 1) & 1 == 1).then_some(30000 + k as u16),
        };
        let svc = Service {
            namespace: "a".into(),
            name: name.clone(),
            cluster_ips: vec![
                IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10 + k as u8)),
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 10 + k as u16)),
            ],
            // s2 is also reached at s0's address (and port 80 is s0's only when s2 has port 80 too).
            external_ips: if k == 2 {
                vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))]
            } else {
                Vec::new()
            },
            ports: vec![port],
        };
        c.services.insert(svc.object_ref(), svc);
        // The slice of s1 sometimes names s0 instead (its label changed).
        let service = if k == 1 && mask >> 30 & 1 == 1 {
            "s0".to_owned()
        } else {
            name.clone()
        };
        let endpoints = addrs
            .iter()
            .enumerate()
            .filter(|(i, _)| mask >> (k * 8 + 2 + (*i as u64 % 6)) & 1 == 1)
            .map(|(i, ip)| SliceEndpoint {
                addresses: vec![*ip],
                ready: i % 5 != 4,
                serving: true,
                terminating: i % 5 == 4,
            })
            .collect();
        let slice = EndpointSlice {
            namespace: "a".into(),
            name: format!("{name}-1"),
            service,
            ports: vec![SlicePort {
                name: Some("p".into()),
                protocol: Protocol::Tcp,
                port: 8000 + k as u16 + (mask >> 40 & 3) as u16,
            }],
            endpoints,
        };
        c.endpoint_slices.insert(slice.object_ref(), slice);
    }
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The frontends kept between updates (each update told only which objects changed) are at every
    /// step what a computation from scratch finds, while pods, policies, Services and slices change.
    #[test]
    fn frontends_kept_between_updates_are_computed_from_scratch(
        steps in evolution(),
        masks in proptest::collection::vec(any::<u64>(), 7),
    ) {
        let mut engine = Engine::for_node("here");
        let mut previous = Cluster::default();
        for (step, mask) in steps.iter().zip(&masks) {
            let c = with_services(step, *mask);
            engine.update(&c, &Changes::between(&previous, &c));
            if mask & (1 << 63) != 0 {
                // Sometimes the agent syncs (takes the delta) between updates, sometimes not.
                engine.take_delta();
            }
            previous = c.clone();
            let d = engine.desired();
            prop_assert_eq!(&d.services, &super::services::frontends(&c, d), "cluster: {:#?}", c);
        }
    }
}
