//! Prepared packets through the real programs with `BPF_PROG_TEST_RUN`: every parsed protocol (IPv4,
//! IPv6 with extension headers, TCP, UDP, SCTP, ICMP, ICMPv6 neighbour discovery, ARP), port ranges,
//! fragments, truncated headers, conntrack replies, and the unknown-endpoint case. SCTP sockets are not
//! available on every kernel; the parser and the policy lookup for SCTP are proven here instead.

use crate::common;

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::common::model::{self, peer, port, selector};
use ztrust_agent::datapath::loader::Datapath;
use ztrust_agent::datapath::sync::{KernelMaps, Syncer};
use ztrust_agent::model::{Cluster, NetworkPolicy, ObjectRef, Peer, Protocol, Rule};
use ztrust_agent::policy::Engine;
use ztrust_common::{dir, names, proto, reason, verdict};

const OK: u32 = 0;
const SHOT: u32 = 2;

/// Pod a (the endpoint under test) may reach app=b on TCP 80, UDP 53 and SCTP 9000-9010; its ingress is
/// isolated with no rule (only replies may come in).
fn cluster(a: &[IpAddr], b: &[IpAddr]) -> Cluster {
    let egress = Rule {
        peers: vec![peer("b")],
        ports: vec![
            port(Protocol::Tcp, 80, None),
            port(Protocol::Udp, 53, None),
            port(Protocol::Sctp, 9000, Some(9010)),
        ],
    };
    model::cluster(
        [model::pod("a", a.to_vec()), model::pod("b", b.to_vec())],
        [model::policy("a-egress", "a", Some(vec![]), Some(vec![egress]))],
    )
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
fn v4_with(
    vihl: u8,
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    frag: u16,
    options: &[u8],
    payload: &[u8],
) -> Pkt {
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
    v6_hl(64, src, dst, next, ext, payload)
}

/// [`v6`] with the hop limit given.
fn v6_hl(hop_limit: u8, src: [u8; 16], dst: [u8; 16], next: u8, ext: &[u8], payload: &[u8]) -> Pkt {
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&((ext.len() + payload.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[next, hop_limit]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(ext);
    ip.extend_from_slice(payload);
    Pkt(eth(0x86DD, &ip))
}

use crate::common::attack::{DEST_OPTS, ext_headers, link_local, solicited};
use crate::common::counter;

/// ARP for IPv4 over Ethernet: operation, sender and target protocol address.
fn arp(op: u16, sender: [u8; 4], target: [u8; 4]) -> Pkt {
    let mut a = vec![0, 1, 0x08, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&MAC[6..12]);
    a.extend_from_slice(&sender);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target);
    Pkt(eth(0x0806, &a))
}

/// `frame` with VLAN tags (outermost first) between the MAC addresses and its ethertype, VID 0.
fn vlan(frame: &Pkt, tpids: &[u16]) -> Pkt {
    let mut v = frame.0[..12].to_vec();
    for t in tpids {
        v.extend_from_slice(&t.to_be_bytes());
        v.extend_from_slice(&[0, 0]);
    }
    v.extend_from_slice(&frame.0[12..]);
    Pkt(v)
}

/// `n` IPv6 destination-options headers (8 bytes each, padding only), the last followed by `last`.
fn dest_opts(n: usize, last: u8) -> Vec<u8> {
    ext_headers(&vec![DEST_OPTS; n], last).1
}

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

    // Before the endpoint is written: IP traffic drops (ARP and neighbour discovery would pass), and so
    // does anything that is not IP, IPv6 or ARP: an IP packet behind VLAN tags (which the node would strip
    // and forward) is not "not IP".
    let syn80 = v4(a4, b4, proto::TCP, 0, &l4(proto::TCP, 40000, 80, 0x02));
    assert_eq!(run(&dp, from, ifindex, &syn80), SHOT);
    assert!(
        counter(
            &dp,
            ifindex,
            dir::EGRESS,
            verdict::DROPPED,
            reason::UNKNOWN_ENDPOINT
        ) > 0
    );
    assert_eq!(run(&dp, from, ifindex, &vlan(&syn80, &[0x88a8, 0x8100])), SHOT);
    assert_eq!(
        counter(
            &dp,
            ifindex,
            dir::EGRESS,
            verdict::DROPPED,
            reason::UNSUPPORTED_FRAME
        ),
        1
    );

    let desired = Engine::new().compile(&c);
    let bindings: BTreeMap<ObjectRef, u32> = [(ObjectRef::new("x", "a"), ifindex)].into();
    Syncer::new()
        .sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings)
        .expect("sync");

    let cases: Vec<(&str, &str, Pkt, u32)> = vec![
        (
            "IPv4 TCP SYN to an allowed port",
            from,
            v4(a4, b4, proto::TCP, 0, &l4(proto::TCP, 40001, 80, 0x02)),
            OK,
        ),
        (
            "IPv4 TCP SYN to another port",
            from,
            v4(a4, b4, proto::TCP, 0, &l4(proto::TCP, 40002, 81, 0x02)),
            SHOT,
        ),
        (
            "UDP to the allowed port",
            from,
            v4(a4, b4, proto::UDP, 0, &l4(proto::UDP, 40003, 53, 0)),
            OK,
        ),
        (
            "UDP to another port",
            from,
            v4(a4, b4, proto::UDP, 0, &l4(proto::UDP, 40004, 54, 0)),
            SHOT,
        ),
        (
            "SCTP inside the endPort range",
            from,
            v4(a4, b4, proto::SCTP, 0, &l4(proto::SCTP, 40005, 9005, 0)),
            OK,
        ),
        (
            "SCTP at the range's end",
            from,
            v4(a4, b4, proto::SCTP, 0, &l4(proto::SCTP, 40005, 9010, 0)),
            OK,
        ),
        (
            "SCTP past the range",
            from,
            v4(a4, b4, proto::SCTP, 0, &l4(proto::SCTP, 40006, 9011, 0)),
            SHOT,
        ),
        (
            "TCP to the SCTP port",
            from,
            v4(a4, b4, proto::TCP, 0, &l4(proto::TCP, 40007, 9005, 0x02)),
            SHOT,
        ),
        (
            "IPv6 TCP SYN to an allowed port",
            from,
            v6(a6, b6, proto::TCP, &[], &l4(proto::TCP, 40008, 80, 0x02)),
            OK,
        ),
        (
            "IPv6 TCP SYN to another port",
            from,
            v6(a6, b6, proto::TCP, &[], &l4(proto::TCP, 40009, 81, 0x02)),
            SHOT,
        ),
        (
            "IPv6 hop-by-hop then TCP to the allowed port",
            from,
            v6(
                a6,
                b6,
                0,
                &[proto::TCP, 0, 1, 4, 0, 0, 0, 0],
                &l4(proto::TCP, 40010, 80, 0x02),
            ),
            OK,
        ),
        (
            "ICMP echo (rules with ports allow only their protocols)",
            from,
            v4(a4, b4, proto::ICMP, 0, &[8, 0, 0, 0, 0, 7, 0, 1]),
            SHOT,
        ),
        (
            "a non-first IPv4 fragment",
            from,
            v4(a4, b4, proto::UDP, 5, &[0; 16]),
            SHOT,
        ),
        (
            "a truncated TCP header",
            from,
            v4(a4, b4, proto::TCP, 0, &[0x9c, 0x40]),
            SHOT,
        ),
        // The ports follow the options (IHL 7: 8 bytes of options, here NOPs then end of list).
        (
            "IPv4 with options, TCP SYN to the allowed port",
            from,
            v4_with(
                0x47,
                a4,
                b4,
                proto::TCP,
                0,
                &[1, 1, 1, 1, 1, 1, 1, 0],
                &l4(proto::TCP, 40012, 80, 0x02),
            ),
            OK,
        ),
        (
            "IPv4 with options, TCP SYN to another port",
            from,
            v4_with(
                0x47,
                a4,
                b4,
                proto::TCP,
                0,
                &[1, 1, 1, 1, 1, 1, 1, 0],
                &l4(proto::TCP, 40013, 81, 0x02),
            ),
            SHOT,
        ),
        (
            "an IPv4 header length below 20 bytes",
            from,
            v4_with(0x44, a4, b4, proto::TCP, 0, &[], &l4(proto::TCP, 40014, 80, 0x02)),
            SHOT,
        ),
        // More fragments follow, offset 0: the first fragment carries the ports and is judged by them.
        (
            "a first IPv4 fragment to the allowed port",
            from,
            v4(a4, b4, proto::UDP, 0x2000, &l4(proto::UDP, 40015, 53, 0)),
            OK,
        ),
        (
            "IPv6 to an IPv4-mapped address (never on the wire; would be judged as IPv4)",
            from,
            v6(
                a6,
                std::net::Ipv4Addr::from(b4).to_ipv6_mapped().octets(),
                proto::TCP,
                &[],
                &l4(proto::TCP, 40011, 80, 0x02),
            ),
            SHOT,
        ),
        ("ARP", from, arp(1, a4, [169, 254, 1, 1]), OK),
        (
            "IPv6 neighbour solicitation",
            from,
            v6_hl(
                255,
                a6,
                solicited(b6),
                proto::ICMPV6,
                &[],
                &[135, 0, 0, 0, 0, 0, 0, 0],
            ),
            OK,
        ),
        // Ingress of a is isolated with no rule: a new connection in is dropped...
        (
            "IPv4 TCP SYN into a",
            to,
            v4(b4, a4, proto::TCP, 0, &l4(proto::TCP, 50000, 80, 0x02)),
            SHOT,
        ),
        // ...but the reply of the connection a opened (case 1) passes by conntrack.
        (
            "the SYN-ACK of a's connection",
            to,
            v4(b4, a4, proto::TCP, 0, &l4(proto::TCP, 80, 40001, 0x12)),
            OK,
        ),
        (
            "the UDP reply of a's datagram",
            to,
            v4(b4, a4, proto::UDP, 0, &l4(proto::UDP, 53, 40003, 0)),
            OK,
        ),
        (
            "a UDP datagram from the port a used, to another port",
            to,
            v4(b4, a4, proto::UDP, 0, &l4(proto::UDP, 53, 40099, 0)),
            SHOT,
        ),
        (
            "the IPv6 SYN-ACK of a's connection",
            to,
            v6(b6, a6, proto::TCP, &[], &l4(proto::TCP, 80, 40008, 0x12)),
            OK,
        ),
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
    assert_eq!(
        common::counter_parts(&dp, ifindex, dir::INGRESS, verdict::FORWARDED, reason::REPLY),
        (0, 3)
    );
    assert!(
        counter(
            &dp,
            ifindex,
            dir::EGRESS,
            verdict::FORWARDED,
            reason::ALLOWED_BY_POLICY
        ) == 8
    );
}

/// One crafted packet and what must become of it: the verdict, and the counter (direction, verdict,
/// reason) it must add one to.
struct Crafted {
    what: &'static str,
    prog: &'static str,
    pkt: Pkt,
    /// `skb->ingress_ifindex`: 0 for a packet the node sent, else the interface it entered on.
    from: u32,
    mark: u32,
    want: u32,
    counted: (u8, u8, u8),
}

/// What a pod with CAP_NET_RAW can write, one class at a time (spoofed sources, frames the parser does not
/// judge, neighbour discovery as a channel, TCP choosing the direction of its judgment, long extension
/// header chains, the peer mark, the node's address), each beside a positive control: the same packet
/// built honestly, which passes, so that a drop cannot be a broken packet builder.
#[test]
fn crafted_packets_get_nothing_through() {
    let (topo, ifindex) = common::node_with_one_pod("ztcr", 205);
    let mut dp = Datapath::load(&topo.pin_dir).expect("load");
    let a4 = [10, 244, 205, 10];
    let b4 = [10, 244, 205, 11];
    let node4 = [10, 244, 205, 1];
    let mut a6 = [0u8; 16];
    a6[..4].copy_from_slice(&[0xfd, 0, 0, 0x10]);
    a6[15] = 0x0a;
    let mut b6 = a6;
    b6[15] = 0x0b;
    let mut world6 = [0u8; 16];
    world6[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    world6[15] = 1;
    let mut c = cluster(
        &[IpAddr::from(a4), IpAddr::from(a6)],
        &[IpAddr::from(b4), IpAddr::from(b6)],
    );
    c.node_ips = vec![IpAddr::from(node4)];
    let desired = Engine::new().compile(&c);
    let bindings: BTreeMap<ObjectRef, u32> = [(ObjectRef::new("x", "a"), ifindex)].into();
    Syncer::new()
        .sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings)
        .expect("sync");

    let (from, to) = (names::PROG_FROM_POD, names::PROG_TO_POD);
    let (eg, ing) = (dir::EGRESS, dir::INGRESS);
    let (fw, dr) = (verdict::FORWARDED, verdict::DROPPED);
    let tcp = |s: [u8; 4], d: [u8; 4], sp: u16, dp_: u16, flags: u8| {
        v4(s, d, proto::TCP, 0, &l4(proto::TCP, sp, dp_, flags))
    };
    let udp =
        |s: [u8; 4], d: [u8; 4], sp: u16, dp_: u16| v4(s, d, proto::UDP, 0, &l4(proto::UDP, sp, dp_, 0));
    let icmp6 = |hl: u8, s: [u8; 16], d: [u8; 16], t: u8| {
        v6_hl(hl, s, d, proto::ICMPV6, &[], &[t, 0, 0, 0, 0, 0, 0, 0])
    };
    // MLDv2 report (RFC 3810 §5.2): hop-by-hop router alert, hop limit 1, to ff02::16.
    let mut mld_dst = [0u8; 16];
    mld_dst[..2].copy_from_slice(&[0xff, 0x02]);
    mld_dst[15] = 0x16;
    let router_alert = [proto::ICMPV6, 0, 5, 2, 0, 0, 1, 0];
    let mld = |s: [u8; 16], d: [u8; 16]| v6_hl(1, s, d, 0, &router_alert, &[143, 0, 0, 0, 0, 0, 0, 0]);
    let mut global_mcast = mld_dst;
    global_mcast[1] = 0x0e;
    let case = |what, prog, pkt, want, counted| Crafted {
        what,
        prog,
        pkt,
        from: 0,
        mark: 0,
        want,
        counted,
    };
    let spoofed = (eg, dr, reason::SPOOFED_SOURCE);
    let link = (eg, fw, reason::NOT_IP);
    let denied_out = (eg, dr, reason::POLICY_DENIED);
    let encapsulated = (eg, dr, reason::ENCAPSULATED);
    let cases = vec![
        // 1. Sources.
        case(
            "control: UDP from a's own address to b:53",
            from,
            udp(a4, b4, 41000, 53),
            OK,
            (eg, fw, reason::ALLOWED_BY_POLICY),
        ),
        case(
            "UDP to b:53 from b's address",
            from,
            udp(b4, b4, 41001, 53),
            SHOT,
            spoofed,
        ),
        case(
            "UDP to b:53 from the node's address",
            from,
            udp(node4, b4, 41002, 53),
            SHOT,
            spoofed,
        ),
        case(
            "UDP to b:53 from outside the cluster",
            from,
            udp([203, 0, 113, 9], b4, 41003, 53),
            SHOT,
            spoofed,
        ),
        case(
            "a forged DNS answer to another pod, from b:53",
            from,
            udp(b4, [10, 244, 205, 12], 53, 41004),
            SHOT,
            spoofed,
        ),
        case(
            "control: IPv6 SYN from a to b:80",
            from,
            v6(a6, b6, proto::TCP, &[], &l4(proto::TCP, 41005, 80, 0x02)),
            OK,
            (eg, fw, reason::ALLOWED_BY_POLICY),
        ),
        case(
            "IPv6 SYN to b:80 from b's address",
            from,
            v6(b6, b6, proto::TCP, &[], &l4(proto::TCP, 41006, 80, 0x02)),
            SHOT,
            spoofed,
        ),
        case(
            "IPv6 SYN to b:80 from ::",
            from,
            v6([0; 16], b6, proto::TCP, &[], &l4(proto::TCP, 41007, 80, 0x02)),
            SHOT,
            spoofed,
        ),
        case(
            "IPv6 SYN to b:80 from a link-local address",
            from,
            v6(
                link_local(9),
                b6,
                proto::TCP,
                &[],
                &l4(proto::TCP, 41008, 80, 0x02),
            ),
            SHOT,
            spoofed,
        ),
        // 2. Frames the parser does not judge.
        case(
            "an IP packet behind two VLAN tags (VID 0)",
            from,
            vlan(&tcp(a4, b4, 41009, 80, 0x02), &[0x8100, 0x8100]),
            SHOT,
            (eg, dr, reason::UNSUPPORTED_FRAME),
        ),
        case(
            "an IP packet behind one 802.1ad tag",
            from,
            vlan(&tcp(a4, b4, 41010, 80, 0x02), &[0x88a8]),
            SHOT,
            (eg, dr, reason::UNSUPPORTED_FRAME),
        ),
        case(
            "an unknown ethertype",
            from,
            Pkt(eth(0x88b5, &[0; 46])),
            SHOT,
            (eg, dr, reason::UNSUPPORTED_FRAME),
        ),
        case(
            "an ARP-typed frame that is not ARP for IPv4",
            from,
            Pkt(eth(0x0806, &[0; 28])),
            SHOT,
            (eg, dr, reason::MALFORMED),
        ),
        case(
            "ARP naming another pod as sender",
            from,
            arp(2, b4, [169, 254, 1, 1]),
            SHOT,
            spoofed,
        ),
        case(
            "control: ARP request from a",
            from,
            arp(1, a4, [169, 254, 1, 1]),
            OK,
            link,
        ),
        case(
            "control: ARP probe (no sender address yet)",
            from,
            arp(1, [0; 4], a4),
            OK,
            link,
        ),
        // 3. Neighbour and listener discovery.
        case(
            "control: neighbour solicitation to the gateway's solicited-node group",
            from,
            icmp6(255, a6, solicited(link_local(1)), 135),
            OK,
            link,
        ),
        case(
            "control: neighbour solicitation from link-local to the gateway",
            from,
            icmp6(255, link_local(0x0a), link_local(1), 135),
            OK,
            link,
        ),
        case(
            "control: DAD solicitation from ::",
            from,
            icmp6(255, [0; 16], solicited(a6), 135),
            OK,
            link,
        ),
        case(
            "neighbour solicitation to another pod's address (forwarded: judged)",
            from,
            icmp6(255, a6, b6, 135),
            SHOT,
            denied_out,
        ),
        case(
            "neighbour advertisement to the world (forwarded: judged)",
            from,
            icmp6(255, a6, world6, 136),
            SHOT,
            denied_out,
        ),
        case(
            "neighbour solicitation with hop limit 64 (not ND: judged)",
            from,
            icmp6(64, a6, solicited(b6), 135),
            SHOT,
            denied_out,
        ),
        case(
            "a router advertisement from a's global address (not ND from a pod: judged)",
            from,
            icmp6(255, a6, link_local(1), 134),
            SHOT,
            denied_out,
        ),
        // Link-local sources are for neighbour discovery only.
        case(
            "a router advertisement from a link-local address",
            from,
            icmp6(255, link_local(0x0a), link_local(1), 134),
            SHOT,
            spoofed,
        ),
        case(
            "neighbour solicitation naming another pod as sender",
            from,
            icmp6(255, b6, solicited(link_local(1)), 135),
            SHOT,
            spoofed,
        ),
        case(
            "control: MLDv2 report",
            from,
            mld(link_local(0x0a), mld_dst),
            OK,
            link,
        ),
        case(
            "an MLD report to a global multicast group",
            from,
            mld(link_local(0x0a), global_mcast),
            SHOT,
            spoofed,
        ),
        case(
            "an MLD report from a's global address (not MLD: judged)",
            from,
            mld(a6, mld_dst),
            SHOT,
            denied_out,
        ),
        case(
            "control: neighbour advertisement from the node to a",
            to,
            icmp6(255, link_local(1), a6, 136),
            OK,
            (ing, fw, reason::NOT_IP),
        ),
        case(
            "a forwarded neighbour advertisement (hop limit 254) into a",
            to,
            icmp6(254, link_local(1), a6, 136),
            SHOT,
            (ing, dr, reason::POLICY_DENIED),
        ),
        // 4. TCP without state is judged in its own direction.
        case(
            "ACK from b:80 into a, no connection (a may open it the other way)",
            to,
            tcp(b4, a4, 80, 41100, 0x10),
            SHOT,
            (ing, dr, reason::NO_CT_ENTRY),
        ),
        case(
            "FIN probe into a",
            to,
            tcp(b4, a4, 41101, 22, 0x01),
            SHOT,
            (ing, dr, reason::NO_CT_ENTRY),
        ),
        case(
            "RST into a",
            to,
            tcp(b4, a4, 80, 41102, 0x04),
            SHOT,
            (ing, dr, reason::NO_CT_ENTRY),
        ),
        case(
            "ACK|PSH out of a from its port 8080 to b:41103",
            from,
            tcp(a4, b4, 8080, 41103, 0x18),
            SHOT,
            (eg, dr, reason::NO_CT_ENTRY),
        ),
        case(
            "control: ACK from a to b:80, no connection (allowed that way)",
            from,
            tcp(a4, b4, 41104, 80, 0x10),
            OK,
            (eg, fw, reason::CT_RECOVERED),
        ),
        case(
            "control: b's answer on that tuple",
            to,
            tcp(b4, a4, 80, 41104, 0x10),
            OK,
            (ing, fw, reason::REPLY),
        ),
        case(
            "control: RST from a to b:80, no connection (allowed, makes no entry)",
            from,
            tcp(a4, b4, 41105, 80, 0x04),
            OK,
            (eg, fw, reason::CT_RECOVERED),
        ),
        case(
            "an answer on the RST's tuple",
            to,
            tcp(b4, a4, 80, 41105, 0x10),
            SHOT,
            (ing, dr, reason::NO_CT_ENTRY),
        ),
        // 5. Extension-header chains are walked to the transport header, or dropped.
        case(
            "control: IPv6 SYN to b:80 behind 7 destination-options headers",
            from,
            v6(
                a6,
                b6,
                60,
                &dest_opts(7, proto::TCP),
                &l4(proto::TCP, 41200, 80, 0x02),
            ),
            OK,
            (eg, fw, reason::ALLOWED_BY_POLICY),
        ),
        case(
            "IPv6 SYN to b:80 behind 9 destination-options headers",
            from,
            v6(
                a6,
                b6,
                60,
                &dest_opts(9, proto::TCP),
                &l4(proto::TCP, 41201, 80, 0x02),
            ),
            SHOT,
            (eg, dr, reason::MALFORMED),
        ),
        case(
            "control: IPv6 SYN to b:80 behind an authentication header",
            from,
            v6(
                a6,
                b6,
                51,
                &[proto::TCP, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1],
                &l4(proto::TCP, 41202, 80, 0x02),
            ),
            OK,
            (eg, fw, reason::ALLOWED_BY_POLICY),
        ),
        case(
            "a non-first IPv6 fragment",
            from,
            v6(a6, b6, 44, &[proto::UDP, 0, 0, 8, 0, 0, 0, 1], &[0; 16]),
            SHOT,
            (eg, dr, reason::FRAGMENT),
        ),
        case(
            "a first IPv4 fragment too short for its TCP header",
            from,
            v4(a4, b4, proto::TCP, 0x2000, &l4(proto::TCP, 41203, 80, 0x02)[..8]),
            SHOT,
            (eg, dr, reason::MALFORMED),
        ),
        case(
            "control: an atomic IPv6 fragment, TCP SYN to b:80",
            from,
            v6(
                a6,
                b6,
                44,
                &[proto::TCP, 0, 0, 0, 0, 0, 0, 2],
                &l4(proto::TCP, 41204, 80, 0x02),
            ),
            OK,
            (eg, fw, reason::ALLOWED_BY_POLICY),
        ),
        case(
            "an atomic IPv6 fragment, TCP SYN to b:81",
            from,
            v6(
                a6,
                b6,
                44,
                &[proto::TCP, 0, 0, 0, 0, 0, 0, 3],
                &l4(proto::TCP, 41205, 81, 0x02),
            ),
            SHOT,
            denied_out,
        ),
        // ICMP errors are ICMP: they quote a flow but are judged as themselves (rules with ports deny them).
        case(
            "an ICMP port-unreachable to b quoting a's TCP to b:80",
            from,
            v4(
                a4,
                b4,
                proto::ICMP,
                0,
                &[
                    &[3u8, 3, 0, 0, 0, 0, 0, 0][..],
                    &v4(b4, a4, proto::TCP, 0, &l4(proto::TCP, 80, 41000, 0x12)).0[14..42],
                ]
                .concat(),
            ),
            SHOT,
            denied_out,
        ),
        case(
            "an ICMPv6 packet-too-big to b",
            from,
            icmp6(64, a6, b6, 2),
            SHOT,
            denied_out,
        ),
        // Source ports choose nothing: policy is about the destination port.
        case(
            "UDP from port 53 to b:54",
            from,
            udp(a4, b4, 53, 54),
            SHOT,
            denied_out,
        ),
        case(
            "a TCP SYN from port 80 to b:81",
            from,
            tcp(a4, b4, 80, 81, 0x02),
            SHOT,
            denied_out,
        ),
        // Source routes: the sender picks where the packet goes after the destination it is judged by.
        case(
            "IPv4 SYN to b:80 with a loose source route via the node",
            from,
            v4_with(
                0x47,
                a4,
                b4,
                proto::TCP,
                0,
                &[1, 131, 7, 4, 10, 244, 205, 12],
                &l4(proto::TCP, 41210, 80, 0x02),
            ),
            SHOT,
            (eg, dr, reason::SOURCE_ROUTED),
        ),
        case(
            "IPv4 SYN to b:80 with a strict source route",
            from,
            v4_with(
                0x47,
                a4,
                b4,
                proto::TCP,
                0,
                &[137, 7, 4, 10, 244, 205, 12, 0],
                &l4(proto::TCP, 41211, 80, 0x02),
            ),
            SHOT,
            (eg, dr, reason::SOURCE_ROUTED),
        ),
        case(
            "control: IPv4 SYN to b:80 with a record-route option",
            from,
            v4_with(
                0x47,
                a4,
                b4,
                proto::TCP,
                0,
                &[7, 7, 4, 0, 0, 0, 0, 0],
                &l4(proto::TCP, 41212, 80, 0x02),
            ),
            OK,
            (eg, fw, reason::ALLOWED_BY_POLICY),
        ),
        case(
            "an IPv4 option whose length runs past the header",
            from,
            v4_with(
                0x47,
                a4,
                b4,
                proto::TCP,
                0,
                &[1, 1, 7, 12, 0, 0, 0, 0],
                &l4(proto::TCP, 41213, 80, 0x02),
            ),
            SHOT,
            (eg, dr, reason::MALFORMED),
        ),
        case(
            "IPv6 SYN to b:80 with a segment routing header, one segment left",
            from,
            v6(
                a6,
                b6,
                43,
                &[&[proto::TCP, 2, 4, 1, 0, 0, 0, 0][..], &[0u8; 16]].concat(),
                &l4(proto::TCP, 41214, 80, 0x02),
            ),
            SHOT,
            (eg, dr, reason::SOURCE_ROUTED),
        ),
        case(
            "control: IPv6 SYN to b:80 with a routing header, no segment left",
            from,
            v6(
                a6,
                b6,
                43,
                &[&[proto::TCP, 2, 4, 0, 0, 0, 0, 0][..], &[0u8; 16]].concat(),
                &l4(proto::TCP, 41215, 80, 0x02),
            ),
            OK,
            (eg, fw, reason::ALLOWED_BY_POLICY),
        ),
        // 8. Packets that carry packets, which a node decapsulates and forwards with the inner source:
        // dropped whatever policy says of the outer packet.
        case(
            "IP-in-IP to the node",
            from,
            v4(
                a4,
                node4,
                4,
                0,
                &v4(b4, [10, 244, 205, 12], proto::UDP, 0, &l4(proto::UDP, 1, 7000, 0)).0[14..],
            ),
            SHOT,
            encapsulated,
        ),
        case(
            "IPv6 in IPv4 to b",
            from,
            v4(
                a4,
                b4,
                41,
                0,
                &v6(b6, a6, proto::UDP, &[], &l4(proto::UDP, 1, 7000, 0)).0[14..],
            ),
            SHOT,
            encapsulated,
        ),
        case(
            "GRE to b",
            from,
            v4(a4, b4, 47, 0, &[0, 0, 0x08, 0]),
            SHOT,
            encapsulated,
        ),
        case(
            "EtherIP to b",
            from,
            v4(a4, b4, 97, 0, &[0x30, 0]),
            SHOT,
            encapsulated,
        ),
        case(
            "MPLS in IP to b",
            from,
            v4(a4, b4, 137, 0, &[0, 0, 1, 64]),
            SHOT,
            encapsulated,
        ),
        case(
            "IPv4 in IPv6 to b",
            from,
            v6(
                a6,
                b6,
                4,
                &[],
                &v4(b4, a4, proto::UDP, 0, &l4(proto::UDP, 1, 7000, 0)).0[14..],
            ),
            SHOT,
            encapsulated,
        ),
        case(
            "GRE in IPv6 behind a destination-options header",
            from,
            v6(a6, b6, 60, &dest_opts(1, 47), &[0, 0, 0x86, 0xdd]),
            SHOT,
            encapsulated,
        ),
        case(
            "VXLAN (UDP 4789) to the node",
            from,
            udp(a4, node4, 41500, 4789),
            SHOT,
            encapsulated,
        ),
        case(
            "VXLAN (UDP 8472) to b",
            from,
            udp(a4, b4, 41501, 8472),
            SHOT,
            encapsulated,
        ),
        case(
            "Geneve (UDP 6081) to the world over IPv6",
            from,
            v6(a6, world6, proto::UDP, &[], &l4(proto::UDP, 41502, 6081, 0)),
            SHOT,
            encapsulated,
        ),
        case(
            "control: UDP from port 4789 to b:53 (the destination port says what it carries)",
            from,
            udp(a4, b4, 4789, 53),
            OK,
            (eg, fw, reason::ALLOWED_BY_POLICY),
        ),
        // 7. The node's address, on a packet the node did not send.
        case(
            "control: SYN into a from the node (kubelet probe)",
            to,
            tcp(node4, a4, 41300, 8080, 0x02),
            OK,
            (ing, fw, reason::FROM_HOST),
        ),
        Crafted {
            from: 999,
            ..case(
                "SYN into a with the node's address, entered on another interface",
                to,
                tcp(node4, a4, 41301, 8080, 0x02),
                SHOT,
                (ing, dr, reason::POLICY_DENIED),
            )
        },
        // 6. The peer mark vouches for nothing it does not match.
        Crafted {
            mark: PEER_MARK,
            from: 7,
            ..case(
                "a marked SYN into a",
                to,
                tcp(b4, a4, 41400, 8080, 0x02),
                SHOT,
                (ing, dr, reason::POLICY_DENIED),
            )
        },
        Crafted {
            mark: PEER_MARK,
            from: 7,
            ..case(
                "a marked ACK into a, no connection",
                to,
                tcp(b4, a4, 41401, 8080, 0x10),
                SHOT,
                (ing, dr, reason::NO_CT_ENTRY),
            )
        },
        Crafted {
            mark: PEER_MARK,
            from: 7,
            ..case(
                "a marked UDP datagram into a",
                to,
                udp(b4, a4, 41402, 8080),
                SHOT,
                (ing, dr, reason::POLICY_DENIED),
            )
        },
        Crafted {
            mark: PEER_MARK,
            from: 7,
            ..case(
                "control: a marked reply of a's UDP flow (judged as a reply)",
                to,
                udp(b4, a4, 53, 41000),
                OK,
                (ing, fw, reason::REPLY),
            )
        },
    ];
    let mut failures = Vec::new();
    for c in &cases {
        let (direction, v, r) = c.counted;
        let before = counter(&dp, ifindex, direction, v, r);
        let (got, mark_after) = common::test_run_ctx(&dp, c.prog, ifindex, &c.pkt.0, c.mark, c.from);
        let after = counter(&dp, ifindex, direction, v, r);
        if got != c.want || after != before + 1 {
            failures.push(format!(
                "{}: got {got} (counted {}), want {} counted as {:?}",
                c.what,
                after - before,
                c.want,
                c.counted
            ));
        }
        if mark_after & PEER_MARK != 0 && c.mark != 0 {
            failures.push(format!("{}: the peer mark was left on the packet", c.what));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // `--pod-tunnels allow`: encapsulated packets are judged by policy like any other (a's rules to b
    // allow TCP 80, UDP 53 and SCTP only; its egress to the node has no rule).
    let allow = ztrust_common::Config {
        flags: ztrust_common::ep_flags::ALLOW_ENCAPSULATION,
        ..Default::default()
    };
    dp.maps.config.set(0, allow, 0).expect("config");
    for (what, pkt) in [
        ("IP-in-IP to b", v4(a4, b4, 4, 0, &[0x45; 20])),
        ("VXLAN to b", udp(a4, b4, 41503, 4789)),
    ] {
        let before = counter(&dp, ifindex, eg, dr, reason::POLICY_DENIED);
        assert_eq!(run(&dp, from, ifindex, &pkt), SHOT, "{what}, tunnels allowed");
        assert_eq!(
            counter(&dp, ifindex, eg, dr, reason::POLICY_DENIED),
            before + 1,
            "{what}, tunnels allowed: judged by policy"
        );
    }
    dp.maps
        .config
        .set(0, ztrust_common::Config::default(), 0)
        .expect("config");

    // Every drop is a flow: once a's endpoint is gone, an unknown-endpoint drop too.
    dp.maps.endpoints.remove(&ifindex).expect("remove a");
    assert_eq!(
        common::test_run(&dp, from, ifindex, &udp(a4, b4, 41999, 53).0),
        SHOT
    );
    let reasons: std::collections::BTreeSet<u8> = common::events(&mut dp)
        .iter()
        .filter(|e| e.verdict == verdict::DROPPED)
        .map(|e| e.reason)
        .collect();
    for r in [
        reason::POLICY_DENIED,
        reason::NO_CT_ENTRY,
        reason::SPOOFED_SOURCE,
        reason::UNSUPPORTED_FRAME,
        reason::MALFORMED,
        reason::FRAGMENT,
        reason::UNKNOWN_ENDPOINT,
        reason::ENCAPSULATED,
        reason::SOURCE_ROUTED,
    ] {
        assert!(
            reasons.contains(&r),
            "no flow event for a drop with reason {r} (events for {reasons:?})"
        );
    }
}

const PEER_MARK: u32 = ztrust_agent::datapath::loader::DEFAULT_PEER_MARK;

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
    let block = |cidr: &str| Peer::IpBlock {
        cidr: cidr.parse().unwrap(),
        except: vec![],
    };
    let cluster_with = |others: &[&str]| {
        let mut c = model::cluster([model::pod("a", vec![IpAddr::from(a4), IpAddr::from(a6)])], []);
        let v6_any = NetworkPolicy {
            namespace: "x".into(),
            name: "v6-any".into(),
            pod_selector: selector("a"),
            isolates_ingress: true,
            isolates_egress: true,
            ingress: vec![Rule {
                peers: vec![block("::/0")],
                ports: vec![],
            }],
            egress: vec![Rule {
                peers: vec![block("::/0")],
                ports: vec![],
            }],
            audit: false,
        };
        // Selects no pod; its ipBlocks still give CIDR identities (ipcache entries) of their own.
        let other = NetworkPolicy {
            name: "other".into(),
            pod_selector: selector("nobody"),
            isolates_egress: false,
            ingress: vec![Rule {
                peers: others.iter().map(|c| block(c)).collect(),
                ports: vec![],
            }],
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
    for (n, others) in [
        &[][..],
        &["10.0.0.0/8"],
        &["0.0.0.0/0"],
        &["10.244.0.0/16", "fd00::/8"],
    ]
    .iter()
    .enumerate()
    {
        let desired = Engine::new().compile(&cluster_with(others));
        syncer
            .sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings)
            .expect("sync");
        let sport = 41000 + 10 * n as u16;
        let cases: Vec<(&str, &str, Pkt, u32)> = vec![
            (
                "IPv4 SYN to 8.8.8.8",
                from,
                v4(a4, world4, proto::TCP, 0, &syn(sport, 443)),
                SHOT,
            ),
            (
                "IPv4 SYN to 10.1.2.3",
                from,
                v4(a4, inside_10, proto::TCP, 0, &syn(sport + 1, 443)),
                SHOT,
            ),
            (
                "IPv4 SYN from 8.8.8.8",
                to,
                v4(world4, a4, proto::TCP, 0, &syn(sport + 2, 80)),
                SHOT,
            ),
            (
                "IPv6 SYN to 2001:db8::1 (control)",
                from,
                v6(a6, world6, proto::TCP, &[], &syn(sport + 3, 443)),
                OK,
            ),
            (
                "IPv6 SYN from 2001:db8::1 (control)",
                to,
                v6(world6, a6, proto::TCP, &[], &syn(sport + 4, 80)),
                OK,
            ),
        ];
        for (what, prog, pkt, want) in &cases {
            let got = run(&dp, prog, ifindex, pkt);
            if got != *want {
                failures.push(format!(
                    "{what}, other ipBlocks {others:?}: got {got}, want {want}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "verdicts differ:\n{}", failures.join("\n"));
    assert!(counter(&dp, ifindex, dir::EGRESS, verdict::DROPPED, reason::POLICY_DENIED) == 8);
    assert!(
        counter(
            &dp,
            ifindex,
            dir::INGRESS,
            verdict::DROPPED,
            reason::POLICY_DENIED
        ) == 4
    );

    // Maps of an earlier agent, which wrote no entry for the IPv4 space: IPv4 world took the identity of
    // ::/0 (the bug, in the kernel).
    let desired = Engine::new().compile(&cluster_with(&[]));
    syncer
        .sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings)
        .expect("sync");
    let (prefix, key) = ztrust_agent::datapath::sync::ipcache_key(&ztrust_agent::policy::v4_space());
    assert_eq!(prefix, 96);
    dp.maps
        .ipcache
        .remove(prefix, &key)
        .expect("the IPv4 space's entry was written");
    assert_eq!(
        run(
            &dp,
            from,
            ifindex,
            &v4(a4, world4, proto::TCP, 0, &syn(42000, 443))
        ),
        OK,
        "without the entry"
    );
    // A new agent adopts them; its first sync writes the entry.
    let mut adopted = Syncer::adopt(&dp.maps);
    adopted
        .sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings)
        .expect("sync");
    assert!(
        dp.maps
            .ipcache
            .prefixes
            .get(&aya::maps::lpm_trie::Key::new(prefix, key), 0)
            .is_ok(),
        "written again"
    );
    assert_eq!(
        run(
            &dp,
            from,
            ifindex,
            &v4(a4, world4, proto::TCP, 0, &syn(42001, 443))
        ),
        SHOT,
        "after adoption"
    );
    assert_eq!(
        run(
            &dp,
            from,
            ifindex,
            &v6(a6, world6, proto::TCP, &[], &syn(42002, 443))
        ),
        OK,
        "IPv6 after adoption"
    );
}
