//! Prepared packets through the real programs with `BPF_PROG_TEST_RUN`: every parsed protocol (IPv4,
//! IPv6 with extension headers, TCP, UDP, SCTP, ICMP, ICMPv6 neighbour discovery, ARP), port ranges,
//! fragments, truncated headers, conntrack replies, and the unknown-endpoint case. SCTP sockets are not
//! available on every kernel; the parser and the policy lookup for SCTP are proven here instead.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;

use ztrust_agent::datapath::loader::Datapath;
use ztrust_agent::datapath::sync::{KernelMaps, Syncer};
use ztrust_agent::model::{Cluster, LabelSelector, Namespace, NetworkPolicy, ObjectRef, Peer, Pod, PortRef, PortSpec, Protocol, Rule};
use ztrust_agent::policy::Engine;
use ztrust_common::{dir, names, proto, reason, verdict};

const OK: u32 = 0;
const SHOT: u32 = 2;

fn sel(app: &str) -> LabelSelector {
    LabelSelector { match_labels: [("app".to_owned(), app.to_owned())].into(), ..Default::default() }
}

fn port(p: Protocol, n: u16, end: Option<u16>) -> PortSpec {
    PortSpec { protocol: p, port: Some(PortRef::Number(n)), end_port: end }
}

/// Pod a (the endpoint under test) may reach app=b on TCP 80, UDP 53 and SCTP 9000-9010; its ingress is
/// isolated with no rule (only replies may come in).
fn cluster(a: &[IpAddr], b: &[IpAddr]) -> Cluster {
    let mut c = Cluster::default();
    c.namespaces.insert("x".into(), Namespace { name: "x".into(), ..Default::default() });
    for (name, ips) in [("a", a), ("b", b)] {
        let pod = Pod {
            namespace: "x".into(),
            name: name.into(),
            labels: [("app".to_owned(), name.to_owned())].into(),
            ips: ips.to_vec(),
            ..Default::default()
        };
        c.pods.insert(pod.object_ref(), pod);
    }
    let pol = NetworkPolicy {
        namespace: "x".into(),
        name: "a-egress".into(),
        pod_selector: sel("a"),
        isolates_ingress: true,
        isolates_egress: true,
        ingress: vec![],
        egress: vec![Rule {
            peers: vec![Peer::Pods { namespace_selector: None, pod_selector: Some(sel("b")) }],
            ports: vec![
                port(Protocol::Tcp, 80, None),
                port(Protocol::Udp, 53, None),
                port(Protocol::Sctp, 9000, Some(9010)),
            ],
        }],
    };
    c.policies.insert(pol.object_ref(), pol);
    c
}

struct Pkt(Vec<u8>);

const MAC: [u8; 12] = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = MAC.to_vec();
    v.extend_from_slice(&ethertype.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn l4(protocol: u8, sport: u16, dport: u16, tcp_flags: u8) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    match protocol {
        proto::TCP => {
            h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, tcp_flags, 0xff, 0xff, 0, 0, 0, 0]);
        }
        proto::UDP => h.extend_from_slice(&[0, 8, 0, 0]),
        proto::SCTP => h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]),
        _ => {}
    }
    h
}

fn v4(src: [u8; 4], dst: [u8; 4], protocol: u8, frag: u16, payload: &[u8]) -> Pkt {
    v4_with(0x45, src, dst, protocol, frag, &[], payload)
}

/// An IPv4 packet with `options` after the fixed header and the version/IHL byte as given.
fn v4_with(vihl: u8, src: [u8; 4], dst: [u8; 4], protocol: u8, frag: u16, options: &[u8], payload: &[u8]) -> Pkt {
    let len = (20 + options.len() + payload.len()) as u16;
    let mut ip = vec![vihl, 0];
    ip.extend_from_slice(&len.to_be_bytes());
    ip.extend_from_slice(&[0, 1]);
    ip.extend_from_slice(&frag.to_be_bytes());
    ip.extend_from_slice(&[64, protocol, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(options);
    ip.extend_from_slice(payload);
    Pkt(eth(0x0800, &ip))
}

fn v6(src: [u8; 16], dst: [u8; 16], next: u8, ext: &[u8], payload: &[u8]) -> Pkt {
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&((ext.len() + payload.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[next, 64]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(ext);
    ip.extend_from_slice(payload);
    Pkt(eth(0x86DD, &ip))
}

use common::counter;

fn run(dp: &Datapath, prog: &str, ifindex: u32, pkt: &Pkt) -> u32 {
    common::test_run(dp, prog, ifindex, &pkt.0)
}

#[test]
fn every_protocol_through_the_real_programs() {
    let (topo, ifindex) = common::node_with_one_pod("ztpk", 204);
    let mut dp = Datapath::load(&topo.pin_dir).expect("load");

    let a4 = [10, 244, 204, 10];
    let b4 = [10, 244, 204, 11];
    let mut a6 = [0u8; 16];
    a6[..4].copy_from_slice(&[0xfd, 0, 0, 0x10]);
    a6[15] = 0x0a;
    let mut b6 = a6;
    b6[15] = 0x0b;
    let c = cluster(
        &[IpAddr::from(a4), IpAddr::from(a6)],
        &[IpAddr::from(b4), IpAddr::from(b6)],
    );
    let (from, to) = (names::PROG_FROM_POD, names::PROG_TO_POD);

    // Before the endpoint is written: IP traffic drops (ARP and neighbour discovery would pass).
    let syn80 = v4(a4, b4, proto::TCP, 0, &l4(proto::TCP, 40000, 80, 0x02));
    assert_eq!(run(&dp, from, ifindex, &syn80), SHOT);
    assert!(counter(&dp, ifindex, dir::EGRESS, verdict::DROPPED, reason::UNKNOWN_ENDPOINT) > 0);

    let desired = Engine::new().compile(&c);
    let bindings: BTreeMap<ObjectRef, u32> = [(ObjectRef::new("x", "a"), ifindex)].into();
    Syncer::new().sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings).expect("sync");

    let cases: Vec<(&str, &str, Pkt, u32)> = vec![
        ("IPv4 TCP SYN to an allowed port", from, v4(a4, b4, proto::TCP, 0, &l4(proto::TCP, 40001, 80, 0x02)), OK),
        ("IPv4 TCP SYN to another port", from, v4(a4, b4, proto::TCP, 0, &l4(proto::TCP, 40002, 81, 0x02)), SHOT),
        ("UDP to the allowed port", from, v4(a4, b4, proto::UDP, 0, &l4(proto::UDP, 40003, 53, 0)), OK),
        ("UDP to another port", from, v4(a4, b4, proto::UDP, 0, &l4(proto::UDP, 40004, 54, 0)), SHOT),
        ("SCTP inside the endPort range", from, v4(a4, b4, proto::SCTP, 0, &l4(proto::SCTP, 40005, 9005, 0)), OK),
        ("SCTP at the range's end", from, v4(a4, b4, proto::SCTP, 0, &l4(proto::SCTP, 40005, 9010, 0)), OK),
        ("SCTP past the range", from, v4(a4, b4, proto::SCTP, 0, &l4(proto::SCTP, 40006, 9011, 0)), SHOT),
        ("TCP to the SCTP port", from, v4(a4, b4, proto::TCP, 0, &l4(proto::TCP, 40007, 9005, 0x02)), SHOT),
        ("IPv6 TCP SYN to an allowed port", from, v6(a6, b6, proto::TCP, &[], &l4(proto::TCP, 40008, 80, 0x02)), OK),
        ("IPv6 TCP SYN to another port", from, v6(a6, b6, proto::TCP, &[], &l4(proto::TCP, 40009, 81, 0x02)), SHOT),
        (
            "IPv6 hop-by-hop then TCP to the allowed port",
            from,
            v6(a6, b6, 0, &[proto::TCP, 0, 1, 4, 0, 0, 0, 0], &l4(proto::TCP, 40010, 80, 0x02)),
            OK,
        ),
        ("ICMP echo (rules with ports allow only their protocols)", from, v4(a4, b4, proto::ICMP, 0, &[8, 0, 0, 0, 0, 7, 0, 1]), SHOT),
        ("a non-first IPv4 fragment", from, v4(a4, b4, proto::UDP, 5, &[0; 16]), SHOT),
        ("a truncated TCP header", from, v4(a4, b4, proto::TCP, 0, &[0x9c, 0x40]), SHOT),
        // The ports follow the options (IHL 7: 8 bytes of options, here NOPs then end of list).
        (
            "IPv4 with options, TCP SYN to the allowed port",
            from,
            v4_with(0x47, a4, b4, proto::TCP, 0, &[1, 1, 1, 1, 1, 1, 1, 0], &l4(proto::TCP, 40012, 80, 0x02)),
            OK,
        ),
        (
            "IPv4 with options, TCP SYN to another port",
            from,
            v4_with(0x47, a4, b4, proto::TCP, 0, &[1, 1, 1, 1, 1, 1, 1, 0], &l4(proto::TCP, 40013, 81, 0x02)),
            SHOT,
        ),
        ("an IPv4 header length below 20 bytes", from, v4_with(0x44, a4, b4, proto::TCP, 0, &[], &l4(proto::TCP, 40014, 80, 0x02)), SHOT),
        // More fragments follow, offset 0: the first fragment carries the ports and is judged by them.
        ("a first IPv4 fragment to the allowed port", from, v4(a4, b4, proto::UDP, 0x2000, &l4(proto::UDP, 40015, 53, 0)), OK),
        (
            "IPv6 to an IPv4-mapped address (never on the wire; would be judged as IPv4)",
            from,
            v6(a6, std::net::Ipv4Addr::from(b4).to_ipv6_mapped().octets(), proto::TCP, &[], &l4(proto::TCP, 40011, 80, 0x02)),
            SHOT,
        ),
        ("ARP", from, Pkt(eth(0x0806, &[0; 28])), OK),
        ("IPv6 neighbour solicitation", from, v6(a6, b6, proto::ICMPV6, &[], &[135, 0, 0, 0, 0, 0, 0, 0]), OK),
        // Ingress of a is isolated with no rule: a new connection in is dropped...
        ("IPv4 TCP SYN into a", to, v4(b4, a4, proto::TCP, 0, &l4(proto::TCP, 50000, 80, 0x02)), SHOT),
        // ...but the reply of the connection a opened (case 1) passes by conntrack.
        ("the SYN-ACK of a's connection", to, v4(b4, a4, proto::TCP, 0, &l4(proto::TCP, 80, 40001, 0x12)), OK),
        ("the UDP reply of a's datagram", to, v4(b4, a4, proto::UDP, 0, &l4(proto::UDP, 53, 40003, 0)), OK),
        ("a UDP datagram from the port a used, to another port", to, v4(b4, a4, proto::UDP, 0, &l4(proto::UDP, 53, 40099, 0)), SHOT),
        ("the IPv6 SYN-ACK of a's connection", to, v6(b6, a6, proto::TCP, &[], &l4(proto::TCP, 80, 40008, 0x12)), OK),
    ];
    let mut failures = Vec::new();
    for (what, prog, pkt, want) in &cases {
        let got = run(&dp, prog, ifindex, pkt);
        if got != *want {
            failures.push(format!("{what}: got {got}, want {want}"));
        }
    }
    assert!(failures.is_empty(), "verdicts differ:\n{}", failures.join("\n"));
    assert!(counter(&dp, ifindex, dir::EGRESS, verdict::DROPPED, reason::FRAGMENT) == 1);
    assert!(counter(&dp, ifindex, dir::EGRESS, verdict::DROPPED, reason::MALFORMED) == 3);
    assert!(counter(&dp, ifindex, dir::EGRESS, verdict::FORWARDED, reason::NOT_IP) == 2);
    // Replies are established packets: counted in the endpoint's slot, not in the hash.
    assert_eq!(common::counter_parts(&dp, ifindex, dir::INGRESS, verdict::FORWARDED, reason::REPLY), (0, 3));
    assert!(counter(&dp, ifindex, dir::EGRESS, verdict::FORWARDED, reason::ALLOWED_BY_POLICY) == 8);
}

/// An endpoint whose only rules are egress to `::/0` and ingress from `::/0`. The kernel keys IPv4 as
/// `::ffff:a.b.c.d`, which lies inside `::/0`: IPv4 packets to and from the world must still drop (the
/// ipcache's entry for the IPv4 space, `::ffff:0:0/96`, is their longest match), while IPv6 ones pass —
/// whatever other ipBlocks exist, and after adopting maps of an earlier agent that lack that entry.
#[test]
fn an_ipv6_block_never_matches_ipv4() {
    let (topo, ifindex) = common::node_with_one_pod("ztfam", 215);
    let mut dp = Datapath::load(&topo.pin_dir).expect("load");
    let a4 = [10, 244, 215, 10];
    let a6: [u8; 16] = "fd00:0:0:215::a".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let world4 = [8, 8, 8, 8];
    let inside_10 = [10, 1, 2, 3];
    let world6: [u8; 16] = "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let block = |cidr: &str| Peer::IpBlock { cidr: cidr.parse().unwrap(), except: vec![] };
    let cluster_with = |others: &[&str]| {
        let mut c = Cluster::default();
        c.namespaces.insert("x".into(), Namespace { name: "x".into(), ..Default::default() });
        let pod = Pod {
            namespace: "x".into(),
            name: "a".into(),
            labels: [("app".to_owned(), "a".to_owned())].into(),
            ips: vec![IpAddr::from(a4), IpAddr::from(a6)],
            ..Default::default()
        };
        c.pods.insert(pod.object_ref(), pod);
        let v6_any = NetworkPolicy {
            namespace: "x".into(),
            name: "v6-any".into(),
            pod_selector: sel("a"),
            isolates_ingress: true,
            isolates_egress: true,
            ingress: vec![Rule { peers: vec![block("::/0")], ports: vec![] }],
            egress: vec![Rule { peers: vec![block("::/0")], ports: vec![] }],
        };
        // Selects no pod; its ipBlocks still give CIDR identities (ipcache entries) of their own.
        let other = NetworkPolicy {
            name: "other".into(),
            pod_selector: sel("nobody"),
            isolates_egress: false,
            ingress: vec![Rule { peers: others.iter().map(|c| block(c)).collect(), ports: vec![] }],
            egress: vec![],
            ..v6_any.clone()
        };
        c.policies.insert(v6_any.object_ref(), v6_any);
        if !others.is_empty() {
            c.policies.insert(other.object_ref(), other);
        }
        c
    };
    let (from, to) = (names::PROG_FROM_POD, names::PROG_TO_POD);
    let syn = |sport: u16, dport: u16| l4(proto::TCP, sport, dport, 0x02);
    let bindings: BTreeMap<ObjectRef, u32> = [(ObjectRef::new("x", "a"), ifindex)].into();
    let mut syncer = Syncer::new();
    let mut failures = Vec::new();
    for (n, others) in [&[][..], &["10.0.0.0/8"], &["0.0.0.0/0"], &["10.244.0.0/16", "fd00::/8"]].iter().enumerate() {
        let desired = Engine::new().compile(&cluster_with(others));
        syncer.sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings).expect("sync");
        let sport = 41000 + 10 * n as u16;
        let cases: Vec<(&str, &str, Pkt, u32)> = vec![
            ("IPv4 SYN to 8.8.8.8", from, v4(a4, world4, proto::TCP, 0, &syn(sport, 443)), SHOT),
            ("IPv4 SYN to 10.1.2.3", from, v4(a4, inside_10, proto::TCP, 0, &syn(sport + 1, 443)), SHOT),
            ("IPv4 SYN from 8.8.8.8", to, v4(world4, a4, proto::TCP, 0, &syn(sport + 2, 80)), SHOT),
            ("IPv6 SYN to 2001:db8::1 (control)", from, v6(a6, world6, proto::TCP, &[], &syn(sport + 3, 443)), OK),
            ("IPv6 SYN from 2001:db8::1 (control)", to, v6(world6, a6, proto::TCP, &[], &syn(sport + 4, 80)), OK),
        ];
        for (what, prog, pkt, want) in &cases {
            let got = run(&dp, prog, ifindex, pkt);
            if got != *want {
                failures.push(format!("{what}, other ipBlocks {others:?}: got {got}, want {want}"));
            }
        }
    }
    assert!(failures.is_empty(), "verdicts differ:\n{}", failures.join("\n"));
    assert!(counter(&dp, ifindex, dir::EGRESS, verdict::DROPPED, reason::POLICY_DENIED) == 8);
    assert!(counter(&dp, ifindex, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED) == 4);

    // Maps of an earlier agent, which wrote no entry for the IPv4 space: IPv4 world took the identity of
    // ::/0 (the bug, in the kernel).
    let desired = Engine::new().compile(&cluster_with(&[]));
    syncer.sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings).expect("sync");
    let (prefix, key) = ztrust_agent::datapath::sync::ipcache_key(&ztrust_agent::policy::v4_space());
    assert_eq!(prefix, 96);
    dp.maps.ipcache.remove(prefix, &key).expect("the IPv4 space's entry was written");
    assert_eq!(run(&dp, from, ifindex, &v4(a4, world4, proto::TCP, 0, &syn(42000, 443))), OK, "without the entry");
    // A new agent adopts them; its first sync writes the entry.
    let mut adopted = Syncer::adopt(&dp.maps);
    adopted.sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings).expect("sync");
    assert!(dp.maps.ipcache.prefixes.get(&aya::maps::lpm_trie::Key::new(prefix, key), 0).is_ok(), "written again");
    assert_eq!(run(&dp, from, ifindex, &v4(a4, world4, proto::TCP, 0, &syn(42001, 443))), SHOT, "after adoption");
    assert_eq!(run(&dp, from, ifindex, &v6(a6, world6, proto::TCP, &[], &syn(42002, 443))), OK, "IPv6 after adoption");
}
