//! Unit tests: one per semantic rule of NetworkPolicy v1, plus identities, keys and counterexamples.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use ztrust_common::{PolicyKey, dir, identity, proto};

use super::reference::reference_allowed;
use super::*;
use crate::datapath::keys::{ipcache_key, lookup, policy_keys};
use crate::model::{
    Cluster, ContainerPort, LabelSelector, Labels, Namespace, NetworkPolicy, Operator, Peer, Pod, PortRef,
    PortSpec, Protocol, Requirement, Rule,
};

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        match_expressions: vec![],
    }
}

fn pod(ns: &str, name: &str, l: &[(&str, &str)], ips: &[IpAddr]) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(l),
        ips: ips.to_vec(),
        ..Pod::default()
    }
}

fn with_port(mut p: Pod, name: &str, port: u16) -> Pod {
    p.ports.push(ContainerPort {
        name: Some(name.into()),
        port,
        protocol: Protocol::Tcp,
    });
    p
}

fn policy(ns: &str, name: &str, selector: LabelSelector) -> NetworkPolicy {
    NetworkPolicy {
        namespace: ns.into(),
        name: name.into(),
        pod_selector: selector,
        isolates_ingress: true,
        isolates_egress: false,
        audit: false,
        ingress: vec![],
        egress: vec![],
    }
}

fn pods_peer(ns: Option<LabelSelector>, pods: Option<LabelSelector>) -> Peer {
    Peer::Pods {
        namespace_selector: ns,
        pod_selector: pods,
    }
}

fn tcp(port: u16) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Number(port)),
        end_port: None,
    }
}

fn named(name: &str) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Name(name.into())),
        end_port: None,
    }
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test CIDR")
}

fn cluster(pods: Vec<Pod>, policies: Vec<NetworkPolicy>) -> Cluster {
    let mut c = Cluster::default();
    for p in pods {
        c.pods.insert(p.object_ref(), p);
    }
    for p in policies {
        c.policies.insert(p.object_ref(), p);
    }
    c
}

fn add_ns(c: &mut Cluster, name: &str, l: &[(&str, &str)]) {
    c.namespaces.insert(
        name.into(),
        Namespace {
            name: name.into(),
            labels: labels(l),
            annotations: Labels::new(),
        },
    );
}

/// Engine verdict for a connection, checked against the reference evaluator on the way.
fn allowed(c: &Cluster, d: &Desired, src: IpAddr, dst: IpAddr, protocol: u8, port: u16) -> bool {
    let mut ok = true;
    for p in c.pods.values().filter(|p| !p.host_network) {
        if p.ips.contains(&src) {
            ok &= lookup(d, src, dst, protocol, port, &p.object_ref(), dir::EGRESS);
        }
        if p.ips.contains(&dst) {
            ok &= lookup(d, src, dst, protocol, port, &p.object_ref(), dir::INGRESS);
        }
    }
    assert_eq!(
        ok,
        reference_allowed(c, src, dst, protocol, port),
        "engine and reference disagree: {src} -> {dst} {protocol}/{port}"
    );
    ok
}

fn compile(c: &Cluster) -> Desired {
    Engine::new().compile(c)
}

#[test]
fn no_policy_allows_everything_and_isolates_nothing() {
    let c = cluster(
        vec![pod("a", "x", &[], &[ip(1)]), pod("a", "y", &[], &[ip(2)])],
        vec![],
    );
    let d = compile(&c);
    assert!(allowed(&c, &d, ip(1), ip(2), proto::TCP, 80));
    assert!(allowed(&c, &d, ip(1), ip(2), proto::ICMP, 0));
    let ep = &d.endpoints[&ObjectRef::new("a", "x")];
    assert!(!ep.isolated_ingress && !ep.isolated_egress);
}

#[test]
fn default_deny_and_isolation_per_direction() {
    // policyTypes [Ingress] with no rules: ingress denied, egress untouched.
    let c = cluster(
        vec![pod("a", "x", &[], &[ip(1)]), pod("a", "y", &[], &[ip(2)])],
        vec![policy("a", "deny", sel(&[]))],
    );
    let d = compile(&c);
    assert!(!allowed(&c, &d, ip(1), ip(2), proto::TCP, 80));
    assert!(lookup(
        &d,
        ip(1),
        ip(9),
        proto::TCP,
        80,
        &ObjectRef::new("a", "x"),
        dir::EGRESS
    ));
    let ep = &d.endpoints[&ObjectRef::new("a", "y")];
    assert!(ep.isolated_ingress && !ep.isolated_egress);
    assert_eq!(ep.ingress_policies, vec![ObjectRef::new("a", "deny")]);

    // policyTypes [Egress] only: ingress untouched.
    let mut p = policy("a", "deny", sel(&[]));
    p.isolates_ingress = false;
    p.isolates_egress = true;
    p.ingress = vec![Rule::default()]; // ignored: the policy does not affect ingress
    let c = cluster(
        vec![pod("a", "x", &[], &[ip(1)]), pod("a", "y", &[], &[ip(2)])],
        vec![p],
    );
    let d = compile(&c);
    assert!(lookup(
        &d,
        ip(9),
        ip(2),
        proto::TCP,
        80,
        &ObjectRef::new("a", "y"),
        dir::INGRESS
    ));
    assert!(!lookup(
        &d,
        ip(1),
        ip(9),
        proto::TCP,
        80,
        &ObjectRef::new("a", "x"),
        dir::EGRESS
    ));
    assert!(!allowed(&c, &d, ip(1), ip(2), proto::TCP, 80));
}

#[test]
fn empty_rule_allows_all_but_empty_rule_list_allows_nothing() {
    let mut p = policy("a", "all", sel(&[("app", "db")]));
    p.ingress = vec![Rule::default()];
    let c = cluster(
        vec![
            pod("a", "db", &[("app", "db")], &[ip(1)]),
            pod("b", "c", &[], &[ip(2)]),
        ],
        vec![p],
    );
    let d = compile(&c);
    // No peers: any address at all; no ports: any protocol, ICMP included.
    assert!(allowed(&c, &d, ip(2), ip(1), proto::TCP, 5432));
    assert!(allowed(&c, &d, ip(200), ip(1), proto::ICMP, 0));
    let ep = &d.endpoints[&ObjectRef::new("a", "db")];
    assert!(
        ep.allow
            .keys()
            .any(|k| k.remote == identity::ANY && k.protocol == proto::ANY)
    );
}

#[test]
fn port_without_number_is_every_port_of_that_protocol() {
    let mut p = policy("a", "udp", sel(&[]));
    p.ingress = vec![Rule {
        peers: vec![],
        ports: vec![PortSpec {
            protocol: Protocol::Udp,
            port: None,
            end_port: None,
        }],
    }];
    let c = cluster(vec![pod("a", "x", &[], &[ip(1)])], vec![p]);
    let d = compile(&c);
    assert!(allowed(&c, &d, ip(2), ip(1), proto::UDP, 53));
    assert!(allowed(&c, &d, ip(2), ip(1), proto::UDP, 65535));
    assert!(!allowed(&c, &d, ip(2), ip(1), proto::TCP, 53));
    assert!(!allowed(&c, &d, ip(2), ip(1), proto::ICMP, 0));
}

#[test]
fn policies_add_up() {
    let mut p1 = policy("a", "web", sel(&[("app", "db")]));
    p1.ingress = vec![Rule {
        peers: vec![pods_peer(None, Some(sel(&[("app", "web")])))],
        ports: vec![tcp(5432)],
    }];
    let mut p2 = policy("a", "ops", sel(&[]));
    p2.ingress = vec![Rule {
        peers: vec![pods_peer(None, Some(sel(&[("app", "ops")])))],
        ports: vec![],
    }];
    let pods = vec![
        pod("a", "db", &[("app", "db")], &[ip(1)]),
        pod("a", "web", &[("app", "web")], &[ip(2)]),
        pod("a", "ops", &[("app", "ops")], &[ip(3)]),
    ];
    let c = cluster(pods, vec![p1, p2]);
    let d = compile(&c);
    assert!(allowed(&c, &d, ip(2), ip(1), proto::TCP, 5432));
    assert!(!allowed(&c, &d, ip(2), ip(1), proto::TCP, 22));
    assert!(allowed(&c, &d, ip(3), ip(1), proto::TCP, 22));
    assert_eq!(d.endpoints[&ObjectRef::new("a", "db")].ingress_policies.len(), 2);
}

#[test]
fn both_selectors_in_one_peer_are_anded_separate_peers_are_ored() {
    let pods = vec![
        pod("a", "db", &[("app", "db")], &[ip(1)]),
        pod("prod", "web", &[("app", "web")], &[ip(2)]),
        pod("prod", "other", &[("app", "other")], &[ip(3)]),
        pod("dev", "web", &[("app", "web")], &[ip(4)]),
    ];
    let mut p = policy("a", "and", sel(&[("app", "db")]));
    p.ingress = vec![Rule {
        peers: vec![pods_peer(
            Some(sel(&[("env", "prod")])),
            Some(sel(&[("app", "web")])),
        )],
        ports: vec![],
    }];
    let mut c = cluster(pods.clone(), vec![p]);
    add_ns(&mut c, "prod", &[("env", "prod")]);
    add_ns(&mut c, "dev", &[("env", "dev")]);
    let d = compile(&c);
    assert!(allowed(&c, &d, ip(2), ip(1), proto::TCP, 80));
    assert!(!allowed(&c, &d, ip(3), ip(1), proto::TCP, 80));
    assert!(!allowed(&c, &d, ip(4), ip(1), proto::TCP, 80));

    let mut p = policy("a", "or", sel(&[("app", "db")]));
    p.ingress = vec![Rule {
        peers: vec![
            pods_peer(Some(sel(&[("env", "prod")])), None),
            pods_peer(None, Some(sel(&[("app", "web")]))),
        ],
        ports: vec![],
    }];
    let mut c = cluster(pods, vec![p]);
    add_ns(&mut c, "prod", &[("env", "prod")]);
    add_ns(&mut c, "dev", &[("env", "dev")]);
    let d = compile(&c);
    assert!(allowed(&c, &d, ip(2), ip(1), proto::TCP, 80));
    assert!(allowed(&c, &d, ip(3), ip(1), proto::TCP, 80));
    // podSelector alone: the policy's own namespace only.
    assert!(!allowed(&c, &d, ip(4), ip(1), proto::TCP, 80));
}

#[test]
fn named_port_on_ingress_resolves_on_the_selected_pod() {
    let mut p = policy("a", "http", sel(&[("app", "web")]));
    p.ingress = vec![Rule {
        peers: vec![],
        ports: vec![named("http")],
    }];
    let pods = vec![
        with_port(pod("a", "w1", &[("app", "web")], &[ip(1)]), "http", 8080),
        with_port(pod("a", "w2", &[("app", "web")], &[ip(2)]), "http", 9090),
        pod("a", "w3", &[("app", "web")], &[ip(3)]),
    ];
    let c = cluster(pods, vec![p]);
    let d = compile(&c);
    assert!(allowed(&c, &d, ip(9), ip(1), proto::TCP, 8080));
    assert!(!allowed(&c, &d, ip(9), ip(1), proto::TCP, 9090));
    assert!(allowed(&c, &d, ip(9), ip(2), proto::TCP, 9090));
    assert!(!allowed(&c, &d, ip(9), ip(2), proto::TCP, 8080));
    assert!(
        !allowed(&c, &d, ip(9), ip(3), proto::TCP, 8080),
        "no such port: nothing"
    );
    // Same labels, same identity: ingress resolution does not need a split.
    assert_eq!(
        d.endpoints[&ObjectRef::new("a", "w1")].identity,
        d.endpoints[&ObjectRef::new("a", "w2")].identity
    );
}

#[test]
fn named_port_on_egress_resolves_per_destination_pod() {
    let mut p = policy("a", "out", sel(&[("app", "client")]));
    p.isolates_egress = true;
    p.isolates_ingress = false;
    p.egress = vec![Rule {
        peers: vec![pods_peer(None, Some(sel(&[("app", "web")])))],
        ports: vec![named("http")],
    }];
    // Same labels, different numbers for "http": they must get different identities.
    let pods = vec![
        pod("a", "client", &[("app", "client")], &[ip(1)]),
        with_port(pod("a", "w1", &[("app", "web")], &[ip(2)]), "http", 8080),
        with_port(pod("a", "w2", &[("app", "web")], &[ip(3)]), "http", 9090),
    ];
    let c = cluster(pods, vec![p.clone()]);
    let d = compile(&c);
    assert!(allowed(&c, &d, ip(1), ip(2), proto::TCP, 8080));
    assert!(!allowed(&c, &d, ip(1), ip(2), proto::TCP, 9090));
    assert!(allowed(&c, &d, ip(1), ip(3), proto::TCP, 9090));
    assert!(!allowed(&c, &d, ip(1), ip(3), proto::TCP, 8080));
    assert_ne!(d.ipcache[&IpNet::from(ip(2))], d.ipcache[&IpNet::from(ip(3))]);
    // A named port never matches a non-pod destination.
    p.egress = vec![Rule {
        peers: vec![],
        ports: vec![named("http")],
    }];
    let c = cluster(c.pods.values().cloned().collect(), vec![p]);
    let d = compile(&c);
    assert!(allowed(&c, &d, ip(1), ip(3), proto::TCP, 9090));
    assert!(!allowed(&c, &d, ip(1), ip(99), proto::TCP, 8080));
}

#[test]
fn end_port_ranges() {
    let mut p = policy("a", "range", sel(&[]));
    p.ingress = vec![Rule {
        peers: vec![],
        ports: vec![PortSpec {
            protocol: Protocol::Tcp,
            port: Some(PortRef::Number(32000)),
            end_port: Some(32768),
        }],
    }];
    let c = cluster(vec![pod("a", "x", &[], &[ip(1)])], vec![p]);
    let d = compile(&c);
    for (port, want) in [
        (31999, false),
        (32000, true),
        (32500, true),
        (32767, true),
        (32768, true),
        (32769, false),
    ] {
        assert_eq!(
            allowed(&c, &d, ip(2), ip(1), proto::TCP, port),
            want,
            "port {port}"
        );
    }
}

#[test]
fn policy_keys_are_minimal_aligned_blocks() {
    let key = |lo, hi, protocol| AllowKey {
        direction: dir::INGRESS,
        remote: 300,
        protocol,
        port_lo: lo,
        port_hi: hi,
    };
    assert_eq!(
        policy_keys(7, &key(0, 65535, proto::ANY)),
        vec![(PolicyKey::PREFIX_ANY_PROTO, PolicyKey::new(7, 300, 0, 0, 0))]
    );
    assert_eq!(
        policy_keys(7, &key(0, 65535, proto::TCP)),
        vec![(PolicyKey::PREFIX_ANY_PORT, PolicyKey::new(7, 300, 0, 6, 0))]
    );
    assert_eq!(
        policy_keys(7, &key(80, 80, proto::TCP)),
        vec![(96, PolicyKey::new(7, 300, 0, 6, 80))]
    );
    // 32000 = 125·2^8, 32256 = 63·2^9: a block of 256, one of 512, then the single port 32768.
    let blocks: Vec<(u32, u16)> = policy_keys(7, &key(32000, 32768, proto::TCP))
        .into_iter()
        .map(|(p, k)| (p, u16::from_be_bytes(k.port)))
        .collect();
    assert_eq!(blocks, vec![(88, 32000), (87, 32256), (96, 32768)]);
    // Exhaustively: the blocks cover exactly the range, do not overlap, and each is aligned.
    for (lo, hi) in [
        (1u16, 1u16),
        (1, 65535),
        (0, 65534),
        (80, 1000),
        (1023, 1025),
        (65535, 65535),
        (32000, 32768),
    ] {
        let mut covered = 0u32;
        let mut next = u32::from(lo);
        for (plen, k) in policy_keys(1, &key(lo, hi, proto::UDP)) {
            let size = 1u32 << (PolicyKey::PREFIX_FULL - plen);
            let start = u32::from(u16::from_be_bytes(k.port));
            assert_eq!(start % size, 0, "aligned");
            assert_eq!(start, next, "contiguous");
            next += size;
            covered += size;
        }
        assert_eq!(covered, u32::from(hi) - u32::from(lo) + 1);
        // Minimal: at most 2 blocks per bit length.
        assert!(policy_keys(1, &key(lo, hi, proto::UDP)).len() <= 32);
    }
}

#[test]
fn ip_block_with_except_including_pod_addresses() {
    let mut p = policy("a", "cidr", sel(&[("app", "db")]));
    p.ingress = vec![Rule {
        peers: vec![Peer::IpBlock {
            cidr: net("10.0.0.0/24"),
            except: vec![net("10.0.0.128/25"), net("10.0.0.2/32")],
        }],
        ports: vec![],
    }];
    let pods = vec![
        pod("a", "db", &[("app", "db")], &[ip(1)]),
        pod("a", "in", &[], &[ip(3)]),
        pod("a", "excepted", &[], &[ip(2)]),
        pod("a", "high", &[], &[ip(200)]),
    ];
    let c = cluster(pods, vec![p]);
    let d = compile(&c);
    assert!(
        allowed(&c, &d, ip(3), ip(1), proto::TCP, 80),
        "a pod address inside the block"
    );
    assert!(
        !allowed(&c, &d, ip(2), ip(1), proto::TCP, 80),
        "a pod address in an except"
    );
    assert!(!allowed(&c, &d, ip(200), ip(1), proto::TCP, 80));
    assert!(
        allowed(&c, &d, ip(100), ip(1), proto::TCP, 80),
        "a non-pod address in the block"
    );
    assert!(
        !allowed(&c, &d, ip(130), ip(1), proto::TCP, 80),
        "a non-pod address in an except"
    );
    assert!(
        !allowed(
            &c,
            &d,
            IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)),
            ip(1),
            proto::TCP,
            80
        ),
        "outside"
    );
    assert_eq!(
        remote_identity(&d, IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8))),
        identity::WORLD
    );
}

#[test]
fn nested_ip_blocks_of_different_policies() {
    // The /26 of another policy is inside this policy's /24 and not excepted: allowed.
    let mut p1 = policy("a", "wide", sel(&[]));
    p1.ingress = vec![Rule {
        peers: vec![Peer::IpBlock {
            cidr: net("10.0.0.0/24"),
            except: vec![net("10.0.0.0/25")],
        }],
        ports: vec![],
    }];
    let mut p2 = policy("a", "narrow", sel(&[("x", "y")]));
    p2.ingress = vec![Rule {
        peers: vec![Peer::IpBlock {
            cidr: net("10.0.0.192/26"),
            except: vec![],
        }],
        ports: vec![],
    }];
    let mut p3 = policy("a", "inner", sel(&[("x", "y")]));
    p3.ingress = vec![Rule {
        peers: vec![Peer::IpBlock {
            cidr: net("10.0.0.0/26"),
            except: vec![],
        }],
        ports: vec![],
    }];
    let c = cluster(vec![pod("a", "x", &[], &[ip(1)])], vec![p1, p2, p3]);
    let d = compile(&c);
    assert!(allowed(&c, &d, ip(200), ip(1), proto::TCP, 80));
    assert!(allowed(&c, &d, ip(130), ip(1), proto::TCP, 80));
    assert!(
        !allowed(&c, &d, ip(10), ip(1), proto::TCP, 80),
        "inside the except, and inside another policy's block"
    );
}

#[test]
fn pods_without_labels() {
    let mut p = policy("a", "p", sel(&[("app", "db")]));
    p.ingress = vec![Rule {
        peers: vec![pods_peer(None, Some(sel(&[])))],
        ports: vec![],
    }];
    let mut q = policy("a", "q", sel(&[]));
    q.ingress = vec![Rule {
        peers: vec![pods_peer(None, Some(sel(&[("app", "web")])))],
        ports: vec![],
    }];
    let pods = vec![
        pod("a", "db", &[("app", "db")], &[ip(1)]),
        pod("a", "bare", &[], &[ip(2)]),
    ];
    let c = cluster(pods, vec![p, q]);
    let d = compile(&c);
    // The empty podSelector selects the pod without labels (as peer), and selects it for isolation.
    assert!(allowed(&c, &d, ip(2), ip(1), proto::TCP, 80));
    assert!(d.endpoints[&ObjectRef::new("a", "bare")].isolated_ingress);
    assert!(!allowed(&c, &d, ip(1), ip(2), proto::TCP, 80));
}

#[test]
fn match_expressions() {
    let req = |op, vals: &[&str]| Requirement {
        key: "tier".into(),
        operator: op,
        values: vals.iter().map(|v| (*v).to_owned()).collect(),
    };
    let none = labels(&[]);
    let front = labels(&[("tier", "front")]);
    let s = |r| LabelSelector {
        match_labels: Labels::new(),
        match_expressions: vec![r],
    };
    assert!(matches(&s(req(Operator::In, &["front"])), &front));
    assert!(!matches(&s(req(Operator::In, &["front"])), &none));
    assert!(matches(&s(req(Operator::NotIn, &["back"])), &front));
    assert!(
        matches(&s(req(Operator::NotIn, &["front"])), &none),
        "NotIn matches an absent key"
    );
    assert!(!matches(&s(req(Operator::NotIn, &["front"])), &front));
    assert!(matches(&s(req(Operator::Exists, &[])), &front));
    assert!(matches(&s(req(Operator::DoesNotExist, &[])), &none));
    assert!(!matches(&s(req(Operator::DoesNotExist, &[])), &front));
}

#[test]
fn relabelled_namespace_is_recompiled() {
    let mut p = policy("a", "p", sel(&[]));
    p.ingress = vec![Rule {
        peers: vec![pods_peer(Some(sel(&[("team", "blue")])), None)],
        ports: vec![],
    }];
    let mut c = cluster(
        vec![pod("a", "x", &[], &[ip(1)]), pod("b", "y", &[], &[ip(2)])],
        vec![p],
    );
    add_ns(&mut c, "b", &[("team", "red")]);
    let mut engine = Engine::new();
    let d = engine.compile(&c);
    assert!(!allowed(&c, &d, ip(2), ip(1), proto::TCP, 80));
    add_ns(&mut c, "b", &[("team", "blue")]);
    let d2 = engine.compile(&c);
    assert!(allowed(&c, &d2, ip(2), ip(1), proto::TCP, 80));
    assert_eq!(
        d.ipcache, d2.ipcache,
        "namespace labels are not part of identities"
    );
    // A namespace with no object has no labels.
    c.namespaces.remove("b");
    let d3 = engine.compile(&c);
    assert!(!allowed(&c, &d3, ip(2), ip(1), proto::TCP, 80));
}

#[test]
fn identities_are_shared_and_stable() {
    let pods = vec![
        pod("a", "w1", &[("app", "web")], &[ip(1)]),
        pod("a", "w2", &[("app", "web")], &[ip(2)]),
        pod("a", "db", &[("app", "db")], &[ip(3)]),
        pod("b", "w1", &[("app", "web")], &[ip(4)]),
    ];
    let mut c = cluster(pods, vec![]);
    let mut engine = Engine::new();
    let d1 = engine.compile(&c);
    let id = |d: &Desired, i| d.ipcache[&IpNet::from(ip(i))];
    assert_eq!(id(&d1, 1), id(&d1, 2), "same namespace and labels");
    assert_ne!(id(&d1, 1), id(&d1, 3));
    assert_ne!(id(&d1, 1), id(&d1, 4), "namespace is part of the identity");
    assert_eq!(
        d1.ipcache[&net("0.0.0.0/0")],
        identity::WORLD,
        "the IPv4 space, always there"
    );
    assert!(
        d1.ipcache
            .iter()
            .filter(|(n, _)| n.prefix_len() > 0)
            .all(|(_, i)| *i >= identity::FIRST_DYNAMIC)
    );
    // Adding and removing other things keeps the numbers.
    let extra = pod("c", "new", &[("app", "new")], &[ip(5)]);
    c.pods.insert(extra.object_ref(), extra);
    c.pods.remove(&ObjectRef::new("a", "db"));
    let d2 = engine.compile(&c);
    assert_eq!(id(&d1, 1), id(&d2, 1));
    assert_eq!(id(&d1, 4), id(&d2, 4));
    assert_ne!(id(&d2, 5), id(&d1, 3), "a freed number is not reused at once");
    assert!(matches!(&d2.identities[&id(&d2, 1)], IdentityInfo::Pod { namespace, .. } if namespace == "a"));
    assert_eq!(engine.compile(&c), d2, "compiling twice gives the same state");
}

#[test]
fn host_and_host_network_pods() {
    let mut p = policy("a", "deny", sel(&[]));
    p.isolates_egress = true;
    let mut hostnet = pod("kube-system", "proxy", &[], &[ip(50)]);
    hostnet.host_network = true;
    let mut c = cluster(vec![pod("a", "x", &[], &[ip(1)]), hostnet], vec![p]);
    c.node_ips = vec![ip(100)];
    let d = compile(&c);
    assert!(!d.endpoints.contains_key(&ObjectRef::new("kube-system", "proxy")));
    assert_eq!(d.ipcache[&IpNet::from(ip(100))], identity::HOST);
    assert_eq!(d.ipcache[&IpNet::from(ip(50))], identity::HOST);
    // The node (kubelet probes) always reaches its pods; the pod's egress to it is still policed.
    assert!(allowed(&c, &d, ip(100), ip(1), proto::TCP, 8080));
    assert!(allowed(&c, &d, ip(50), ip(1), proto::TCP, 8080));
    assert!(!allowed(&c, &d, ip(9), ip(1), proto::TCP, 8080));
    assert!(!allowed(&c, &d, ip(1), ip(100), proto::TCP, 10250));
}

#[test]
fn dual_stack_pods_have_both_addresses() {
    let v6: IpAddr = "fd00::1".parse().expect("v6");
    let mut p = policy("a", "p", sel(&[("app", "db")]));
    p.ingress = vec![Rule {
        peers: vec![Peer::IpBlock {
            cidr: net("10.0.0.0/24"),
            except: vec![],
        }],
        ports: vec![],
    }];
    let pods = vec![
        pod("a", "db", &[("app", "db")], &[ip(1)]),
        pod("a", "c", &[], &[ip(2), v6]),
    ];
    let c = cluster(pods, vec![p]);
    let d = compile(&c);
    assert!(d.ipcache.contains_key(&net("10.0.0.2/32")) && d.ipcache.contains_key(&net("fd00::1/128")));
    assert!(allowed(&c, &d, ip(2), ip(1), proto::TCP, 80));
    // The v6 address of the same pod is not in the v4 block.
    assert!(!lookup(
        &d,
        v6,
        ip(1),
        proto::TCP,
        80,
        &ObjectRef::new("a", "db"),
        dir::INGRESS
    ));
    assert_eq!(d.endpoints[&ObjectRef::new("a", "c")].ips.len(), 2);
}

#[test]
fn attribution_names_the_first_rule() {
    let mut p = policy("a", "p", sel(&[]));
    p.ingress = vec![
        Rule {
            peers: vec![],
            ports: vec![tcp(80)],
        },
        Rule {
            peers: vec![],
            ports: vec![tcp(80), tcp(443)],
        },
    ];
    let c = cluster(vec![pod("a", "x", &[], &[ip(1)])], vec![p]);
    let d = compile(&c);
    let ep = &d.endpoints[&ObjectRef::new("a", "x")];
    let rule_of = |port| {
        ep.allow
            .iter()
            .find(|(k, _)| k.port_lo == port)
            .map(|(_, r)| d.rules[r].clone())
    };
    assert_eq!(rule_of(80).map(|r| r.index), Some(0));
    assert_eq!(rule_of(443).map(|r| r.index), Some(1));
    assert!(d.rules.keys().all(|r| *r >= 1));
    let ids: BTreeSet<u32> = d.rules.keys().copied().collect();
    assert_eq!(ids.len(), 2);
}

#[test]
fn inexact_situations_are_warned_about_and_fail_closed() {
    // Two node addresses, one inside the block: the single host identity cannot be half allowed.
    let mut p = policy("a", "out", sel(&[]));
    p.isolates_ingress = false;
    p.isolates_egress = true;
    p.egress = vec![Rule {
        peers: vec![Peer::IpBlock {
            cidr: net("10.0.0.0/28"),
            except: vec![],
        }],
        ports: vec![],
    }];
    let mut c = cluster(
        vec![pod("a", "x", &[], &[ip(1)]), pod("a", "twin", &[], &[ip(1)])],
        vec![p],
    );
    c.node_ips = vec![ip(2), ip(200)];
    let d = compile(&c);
    assert!(!lookup(
        &d,
        ip(1),
        ip(2),
        proto::TCP,
        80,
        &ObjectRef::new("a", "x"),
        dir::EGRESS
    ));
    assert!(
        d.warnings
            .iter()
            .any(|w| w.contains("a/out") && w.contains("spec.egress[0].to[0].ipBlock")),
        "{:?}",
        d.warnings
    );
    assert!(
        d.warnings
            .iter()
            .any(|w| w.contains("a/twin") && w.contains("10.0.0.1")),
        "{:?}",
        d.warnings
    );
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().expect("test IPv6 address"))
}

/// The other policies a family test runs beside its own: none, or one (selecting no pod) whose ipBlock
/// gives IPv4 or IPv6 CIDR identities of their own — which of them exist decides which ipcache entry is
/// the longest match of a world address.
fn other_blocks() -> Vec<Vec<NetworkPolicy>> {
    let block = |cidr: &str| {
        let mut p = policy("elsewhere", cidr, sel(&[("none", "none")]));
        p.ingress = vec![Rule {
            peers: vec![Peer::IpBlock {
                cidr: net(cidr),
                except: vec![],
            }],
            ports: vec![],
        }];
        p
    };
    let mut out = vec![vec![]];
    for cidrs in [
        &["10.0.0.0/8"][..],
        &["10.0.0.0/24"],
        &["0.0.0.0/0"],
        &["::/0"],
        &["fd00::/8", "192.0.2.0/24"],
    ] {
        out.push(cidrs.iter().map(|c| block(c)).collect());
    }
    out
}

/// The kernel's keys of the ipcache (IPv4 IPv4-mapped) are all distinct, and the IPv4 space is one.
fn assert_kernel_keys_distinct(d: &Desired) {
    let keys: BTreeSet<_> = d.ipcache.keys().map(ipcache_key).collect();
    assert_eq!(
        keys.len(),
        d.ipcache.len(),
        "two prefixes share a kernel key: {:?}",
        d.ipcache
    );
    let (prefix, key) = ipcache_key(&net("0.0.0.0/0"));
    assert_eq!(
        (prefix, Ipv6Addr::from(key.addr)),
        (96, "::ffff:0:0".parse::<Ipv6Addr>().expect("v6"))
    );
    assert!(
        d.ipcache.contains_key(&net("0.0.0.0/0")),
        "the IPv4 space has its entry"
    );
}

/// Pod x (dual-stack) whose only egress rule is `cidr`, and a dual-stack peer pod y.
fn egress_only_to(cidr: &str, others: Vec<NetworkPolicy>) -> Cluster {
    let mut p = policy("a", "out", sel(&[("app", "x")]));
    p.isolates_ingress = false;
    p.isolates_egress = true;
    p.egress = vec![Rule {
        peers: vec![Peer::IpBlock {
            cidr: net(cidr),
            except: vec![],
        }],
        ports: vec![],
    }];
    let pods = vec![
        pod("a", "x", &[("app", "x")], &[ip(1), v6("fd00::1")]),
        pod("a", "y", &[], &[ip(2), v6("fd00::2")]),
    ];
    let mut policies = vec![p];
    policies.extend(others);
    cluster(pods, policies)
}

/// Pod x (dual-stack) whose only ingress rule is from `cidr`.
fn ingress_only_from(cidr: &str, others: Vec<NetworkPolicy>) -> Cluster {
    let mut p = policy("a", "in", sel(&[("app", "x")]));
    p.ingress = vec![Rule {
        peers: vec![Peer::IpBlock {
            cidr: net(cidr),
            except: vec![],
        }],
        ports: vec![],
    }];
    let pods = vec![
        pod("a", "x", &[("app", "x")], &[ip(1), v6("fd00::1")]),
        pod("a", "y", &[], &[ip(2), v6("fd00::2")]),
    ];
    let mut policies = vec![p];
    policies.extend(others);
    cluster(pods, policies)
}

#[test]
fn egress_allow_to_v6_any_does_not_allow_ipv4_world() {
    // The kernel keys IPv4 as ::ffff:a.b.c.d, inside ::/0: without the IPv4 space's entry, an IPv4
    // address outside every IPv4 CIDR took the identity of ::/0.
    for others in other_blocks() {
        let what = format!("with {:?}", others.iter().map(|p| &p.name).collect::<Vec<_>>());
        let c = egress_only_to("::/0", others);
        let d = compile(&c);
        assert_kernel_keys_distinct(&d);
        for world in [
            IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
            IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            ip(200),
        ] {
            assert!(
                !allowed(&c, &d, ip(1), world, proto::TCP, 443),
                "IPv4 {world} {what}"
            );
        }
        assert!(
            !allowed(&c, &d, ip(1), ip(2), proto::TCP, 80),
            "an IPv4 pod {what}"
        );
        assert!(
            allowed(&c, &d, ip(1), v6("2001:db8::1"), proto::TCP, 443),
            "IPv6 world {what}"
        );
        assert!(
            allowed(&c, &d, ip(1), v6("fd00::2"), proto::TCP, 80),
            "an IPv6 pod {what}"
        );
        assert!(
            allowed(&c, &d, ip(1), v6("::1"), proto::UDP, 53),
            "::1 is inside ::/0 {what}"
        );
    }
    // Shorter IPv6 prefixes that contain ::ffff:0:0/96 too.
    for cidr in ["::/1", "::/64", "::/80"] {
        for others in other_blocks() {
            let c = egress_only_to(cidr, others);
            let d = compile(&c);
            assert!(
                !allowed(
                    &c,
                    &d,
                    ip(1),
                    IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
                    proto::TCP,
                    443
                ),
                "{cidr}"
            );
            assert!(allowed(&c, &d, ip(1), v6("::1"), proto::TCP, 443), "{cidr}");
        }
    }
}

#[test]
fn ingress_from_v6_any_does_not_admit_an_ipv4_client() {
    for others in other_blocks() {
        let what = format!("with {:?}", others.iter().map(|p| &p.name).collect::<Vec<_>>());
        let c = ingress_only_from("::/0", others);
        let d = compile(&c);
        assert_kernel_keys_distinct(&d);
        for client in [
            IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            ip(9),
            ip(2),
        ] {
            assert!(
                !allowed(&c, &d, client, ip(1), proto::TCP, 80),
                "IPv4 client {client} {what}"
            );
        }
        assert!(
            allowed(&c, &d, v6("2001:db8::1"), v6("fd00::1"), proto::TCP, 80),
            "IPv6 world {what}"
        );
        assert!(
            allowed(&c, &d, v6("fd00::2"), v6("fd00::1"), proto::TCP, 80),
            "an IPv6 pod {what}"
        );
        assert_ne!(
            remote_identity(&d, IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8))),
            d.ipcache[&net("::/0")],
            "an IPv4 address never has the identity of ::/0 {what}"
        );
    }
}

#[test]
fn ipv4_any_does_not_admit_ipv6() {
    for others in other_blocks() {
        let what = format!("with {:?}", others.iter().map(|p| &p.name).collect::<Vec<_>>());
        let c = ingress_only_from("0.0.0.0/0", others.clone());
        let d = compile(&c);
        assert_kernel_keys_distinct(&d);
        for client in [v6("2001:db8::1"), v6("fd00::2"), v6("::1"), v6("::a00:9")] {
            assert!(
                !allowed(&c, &d, client, v6("fd00::1"), proto::TCP, 80),
                "IPv6 client {client} {what}"
            );
        }
        assert!(
            allowed(
                &c,
                &d,
                IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
                ip(1),
                proto::TCP,
                80
            ),
            "{what}"
        );
        assert!(allowed(&c, &d, ip(2), ip(1), proto::TCP, 80), "{what}");
        let world_v4 = remote_identity(&d, IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)));
        assert!(
            matches!(&d.identities[&world_v4], IdentityInfo::Cidr { prefix } if *prefix == net("0.0.0.0/0")),
            "the IPv4 space holds the CIDR identity of 0.0.0.0/0 {what}"
        );
        let c = egress_only_to("0.0.0.0/0", others);
        let d = compile(&c);
        assert!(
            !allowed(&c, &d, v6("fd00::1"), v6("2001:db8::1"), proto::TCP, 443),
            "{what}"
        );
        assert!(
            allowed(
                &c,
                &d,
                v6("fd00::1"),
                IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
                proto::TCP,
                443
            ),
            "{what}"
        );
    }
}

#[test]
fn an_ip_block_of_one_family_never_includes_identities_of_the_other() {
    // Every family's prefixes, and pods of both families inside them.
    let cidrs = [
        "::/0",
        "::/80",
        "0.0.0.0/0",
        "10.0.0.0/8",
        "10.0.0.0/24",
        "fd00::/8",
        "::ffff:0:0/96",
    ];
    let mut policies: Vec<NetworkPolicy> = Vec::new();
    for (i, cidr) in cidrs.iter().enumerate() {
        let mut p = policy("a", &format!("p{i}"), sel(&[("app", "x")]));
        p.isolates_egress = true;
        p.ingress = vec![Rule {
            peers: vec![Peer::IpBlock {
                cidr: net(cidr),
                except: vec![],
            }],
            ports: vec![tcp(80 + i as u16)],
        }];
        p.egress = p.ingress.clone();
        policies.push(p);
    }
    let pods = vec![
        pod("a", "x", &[("app", "x")], &[ip(1), v6("fd00::1")]),
        pod("a", "y", &[], &[ip(2), v6("fd00::2")]),
    ];
    let mut c = cluster(pods, policies);
    c.node_ips = vec![ip(100), v6("fd00::100")];
    let d = compile(&c);
    assert_kernel_keys_distinct(&d);
    let family = |id: u32| -> Option<bool> {
        match d.identities.get(&id)? {
            IdentityInfo::Cidr { prefix } => Some(prefix.addr().is_ipv4()),
            _ => {
                let addrs: BTreeSet<bool> = d
                    .ipcache
                    .iter()
                    .filter(|(_, i)| **i == id)
                    .map(|(n, _)| n.addr().is_ipv4())
                    .collect();
                (addrs.len() == 1).then(|| addrs.contains(&true))
            }
        }
    };
    let ep = &d.endpoints[&ObjectRef::new("a", "x")];
    for k in ep.allow.keys() {
        let cidr = net(cidrs[usize::from(k.port_lo - 80)]);
        if let Some(v4) = family(k.remote) {
            assert_eq!(
                v4,
                cidr.addr().is_ipv4(),
                "{cidr} allows identity {} ({:?})",
                k.remote,
                d.identities.get(&k.remote)
            );
        }
    }
    assert!(
        !d.identities
            .values()
            .any(|i| matches!(i, IdentityInfo::Cidr { prefix } if *prefix == net("::ffff:0:0/96")))
    );
}

#[test]
fn ipv4_mapped_ipv6_prefixes_and_addresses_never_match_ipv4() {
    // The kernel would key these as IPv4: they get no ipcache entry (no packet carries them).
    let mut p = policy("a", "p", sel(&[("app", "x")]));
    p.isolates_egress = true;
    p.ingress = vec![Rule {
        peers: vec![Peer::IpBlock {
            cidr: net("::ffff:10.0.0.0/104"),
            except: vec![],
        }],
        ports: vec![],
    }];
    p.egress = vec![Rule {
        peers: vec![
            Peer::IpBlock {
                cidr: net("::ffff:0:0/96"),
                except: vec![],
            },
            Peer::IpBlock {
                cidr: net("::/0"),
                except: vec![],
            },
        ],
        ports: vec![],
    }];
    let mapped = |last: u8| IpAddr::V6(Ipv4Addr::new(10, 0, 0, last).to_ipv6_mapped());
    let pods = vec![
        pod("a", "x", &[("app", "x")], &[ip(1)]),
        // One address reported in both forms; one IPv4-mapped address that no pod has as IPv4.
        pod("a", "y", &[], &[ip(2), mapped(2)]),
        pod("a", "z", &[], &[ip(3), mapped(30)]),
    ];
    let mut c = cluster(pods, vec![p]);
    c.node_ips = vec![mapped(100)];
    let d = compile(&c);
    assert_kernel_keys_distinct(&d);
    assert!(
        d.ipcache.keys().all(|n| !super::keyed_as_ipv4(n)),
        "{:?}",
        d.ipcache
    );
    for client in [ip(2), ip(30), ip(100), ip(200)] {
        assert!(
            !allowed(&c, &d, client, ip(1), proto::TCP, 80),
            "IPv4 client {client}"
        );
        assert!(
            !allowed(&c, &d, ip(1), client, proto::TCP, 80),
            "IPv4 destination {client}"
        );
    }
    assert!(
        allowed(&c, &d, ip(1), v6("2001:db8::1"), proto::TCP, 80),
        "IPv6 world, by ::/0"
    );
    assert!(
        !lookup(
            &d,
            mapped(2),
            ip(1),
            proto::TCP,
            80,
            &ObjectRef::new("a", "x"),
            dir::INGRESS
        ),
        "dropped as malformed"
    );
}

/// Scale: 50,000 pods and 10,000 policies. Run with
/// `cargo test --release -p ztrust-agent --lib -- --ignored compile_at_scale --nocapture`.
#[test]
#[ignore = "slow in debug builds; a benchmark, not a check"]
fn compile_at_scale() {
    let mut c = Cluster::default();
    for i in 0..50_000u32 {
        let ns = format!("ns{}", i % 500);
        let app = format!("app{}", i % 40);
        let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        let mut p = pod(
            &ns,
            &format!("pod{i}"),
            &[("app", &app), ("tier", if i % 2 == 0 { "front" } else { "back" })],
            &[addr],
        );
        p = with_port(p, "http", 8000 + (i % 3) as u16);
        c.pods.insert(p.object_ref(), p);
    }
    for i in 0..500 {
        add_ns(
            &mut c,
            &format!("ns{i}"),
            &[("team", if i % 2 == 0 { "a" } else { "b" })],
        );
    }
    for i in 0..10_000u32 {
        let ns = format!("ns{}", i % 500);
        let mut p = policy(&ns, &format!("np{i}"), sel(&[("app", &format!("app{}", i % 40))]));
        p.isolates_egress = i % 4 == 0;
        p.ingress = vec![Rule {
            peers: vec![
                pods_peer(None, Some(sel(&[("app", &format!("app{}", (i + 1) % 40))]))),
                pods_peer(
                    Some(sel(&[("team", "a")])),
                    Some(sel(&[("app", &format!("app{}", (i + 2) % 40))])),
                ),
            ],
            ports: vec![tcp(80), named("http")],
        }];
        if i % 100 == 0 {
            p.ingress.push(Rule {
                peers: vec![Peer::IpBlock {
                    cidr: net("10.0.0.0/16"),
                    except: vec![net("10.0.1.0/24")],
                }],
                ports: vec![],
            });
        }
        p.egress = vec![Rule {
            peers: vec![pods_peer(None, None)],
            ports: vec![named("http")],
        }];
        c.policies.insert(p.object_ref(), p);
    }
    let mut engine = Engine::new();
    let started = std::time::Instant::now();
    let d = engine.compile(&c);
    let first = started.elapsed();
    let started = std::time::Instant::now();
    let d2 = engine.compile(&c);
    let second = started.elapsed();
    let entries: usize = d.endpoints.values().map(|e| e.allow.len()).sum();
    println!(
        "compile: {first:?} (again: {second:?}); {} endpoints, {} identities, {entries} allow entries",
        d.endpoints.len(),
        d.identities.len()
    );
    assert_eq!(d, d2);
}
