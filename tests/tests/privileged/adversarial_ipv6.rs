//! The adversarial suite over IPv6: an attacker inside a pod, with CAP_NET_RAW, writes IPv6 frames with
//! `AF_PACKET` inside the pod's namespace; they cross the real veths and the real programs, and what
//! arrives is observed with real sockets and captures in the receiving pod (`common/attack.rs`). Every
//! attack has a positive control made by the same builder that arrives where policy allows it.
//!
//! Pods (dual stack): a (10.244.216.10, fd00:10:244:216::10) attacker, b (.11, ::11) the locked-down pod,
//! c (.12, ::12) a third pod; the node is fd00:10:244:216::1, and fe80::1 on every veth.
//! - b: ingress isolated, allows a on TCP 80, c on UDP 7000 and a on SCTP 7100; egress isolated, allows
//!   a on TCP 9000.
//! - a and c: not isolated.
//!
//! Fragments are tried in both families (one body); the segmentation-offload test streams over both.
//! The IPv4 forms of the other classes are in `adversarial.rs`.

use crate::common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::common::attack::{
    A, B, C, DEST_OPTS, ETH_P_IPV6, FRAGMENT, HOP_BY_HOP, Lab, ROUTING, carries, checksummed, checksummed6,
    drops, ext_headers, fragment, has_event, icmp6, ip as ip_packet, ipv6, ipv6_packet, ipv6_with,
    is_fragment_from, is_tuple6, l4_of6, link_local, received_udp_at, received_udp6, solicited, tcp, udp,
};
use crate::common::{enter_netns, sh};
use ztrust_common::{dir, proto, reason, verdict};

const SYN: u8 = 0x02;

fn lab() -> Lab {
    Lab::dual_stack("ztv6", 216)
}

fn world() -> [u8; 16] {
    "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets()
}

/// Neighbour solicitation (RFC 4861 §4.3) for `target`, with the sender's link-layer address option
/// and `data` after it.
fn neighbour_solicitation(target: [u8; 16], mac: [u8; 6], data: &[u8]) -> Vec<u8> {
    let mut body = vec![0; 4];
    body.extend_from_slice(&target);
    body.extend_from_slice(&[1, 1]);
    body.extend_from_slice(&mac);
    body.extend_from_slice(data);
    icmp6(135, 0, &body)
}

/// Neighbour advertisement (RFC 4861 §4.4), solicited and override, for `target`, with the target's
/// link-layer address option and `data` after it.
fn neighbour_advertisement(target: [u8; 16], mac: [u8; 6], data: &[u8]) -> Vec<u8> {
    let mut body = vec![0x60, 0, 0, 0];
    body.extend_from_slice(&target);
    body.extend_from_slice(&[2, 1]);
    body.extend_from_slice(&mac);
    body.extend_from_slice(data);
    icmp6(136, 0, &body)
}

/// An MLDv2 report (RFC 3810 §5.2) with one record (change to exclude `group`), `data` after it.
fn mld_report(group: [u8; 16], data: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 0, 0, 1, 4, 0, 0, 0];
    body.extend_from_slice(&group);
    body.extend_from_slice(data);
    icmp6(143, 0, &body)
}

/// Does the node answer b's neighbour solicitation for fe80::1 (hop limit 255, sent to `dst`) with an
/// advertisement?
fn gateway_answers_b(lab: &Lab, dst: [u8; 16]) -> bool {
    let gateway = link_local(1);
    let ns = ipv6_with(
        255,
        lab.ip6(B),
        dst,
        &[],
        proto::ICMPV6,
        neighbour_solicitation(gateway, lab.macs[B].1, b""),
    );
    let f = lab.frame_from(B, ETH_P_IPV6, &ns);
    lab.captured(
        B,
        move |fr| is_icmp6(fr, gateway, 136),
        || lab.send_from_pod(B, vec![f]),
    ) >= 1
}

/// Is `frame` an ICMPv6 message of type `kind` from `src`?
fn is_icmp6(frame: &[u8], src: [u8; 16], kind: u8) -> bool {
    frame.len() >= 54
        && frame[22..38] == src
        && l4_of6(frame).is_some_and(|(p, m)| p == proto::ICMPV6 && m.first() == Some(&kind))
}

/// Class 1, IPv6: a pod sends only from its own IPv6 address. b admits c on UDP 7000: a datagram "from
/// c's IPv6 address" that a writes never reaches b's socket; nor do a's datagrams to c from the node's
/// own IPv6 address, a world address, a link-local address (on a packet that is not neighbour
/// discovery) or `::`. Each is dropped at a's interface as `spoofed-source`, counted and reported.
/// Controls: the same builder from a's own IPv6 address reaches c; c's own datagram reaches b.
#[test]
fn ipv6_spoofed_sources_are_dropped_at_the_sender() {
    let mut lab = lab();
    let (a, b, c) = (lab.ip6(A), lab.ip6(B), lab.ip6(C));
    let spoofed = |lab: &Lab| lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::SPOOFED_SOURCE);
    let before = spoofed(&lab);
    let forged = lab.frame_from(
        A,
        ETH_P_IPV6,
        &ipv6(c, b, proto::UDP, udp(41000, 7000, b"forged")),
    );
    assert!(
        !received_udp6(&lab, B, 7000, b"forged", || lab.send_from_pod(A, vec![forged])),
        "a datagram a forged as c's reached b"
    );
    let node = lab.topo.node_ip6.expect("dual stack").octets();
    let sources: [(&str, [u8; 16], &'static [u8]); 4] = [
        ("the node's", node, b"node"),
        ("a world", world(), b"world"),
        ("a link-local", link_local(0x99), b"link-local"),
        ("the unspecified", [0; 16], b"unspecified"),
    ];
    for (k, (what, src, payload)) in sources.iter().enumerate() {
        let port = 7100 + k as u16;
        let f = lab.frame_from(
            A,
            ETH_P_IPV6,
            &ipv6(*src, c, proto::UDP, udp(41001, port, payload)),
        );
        assert!(
            !received_udp6(&lab, C, port, payload, || lab.send_from_pod(A, vec![f])),
            "a datagram from {what} address reached c"
        );
    }
    assert_eq!(
        spoofed(&lab),
        before + 5,
        "not every forged datagram was dropped as spoofed at a"
    );
    // Positive control: the same builder, a's own address.
    let honest = lab.frame_from(
        A,
        ETH_P_IPV6,
        &ipv6(a, c, proto::UDP, udp(41002, 7110, b"honest")),
    );
    assert!(
        received_udp6(&lab, C, 7110, b"honest", || lab.send_from_pod(A, vec![honest])),
        "control: a's own datagram did not reach c"
    );
    let from_c = lab.frame_from(
        C,
        ETH_P_IPV6,
        &ipv6(c, b, proto::UDP, udp(41003, 7000, b"from-c")),
    );
    assert!(
        received_udp6(&lab, B, 7000, b"from-c", || lab.send_from_pod(C, vec![from_c])),
        "control: c's datagram did not reach b"
    );
    let events = lab.events();
    let reported: Vec<[u8; 16]> = drops(&events, lab.ifindex[A], reason::SPOOFED_SOURCE)
        .filter(|e| e.family == 6)
        .map(|e| e.saddr)
        .collect();
    for src in [c, node, world(), link_local(0x99), [0; 16]] {
        assert!(
            reported.contains(&src),
            "no flow event for the datagram from {}",
            Ipv6Addr::from(src)
        );
    }
}

/// IPv6 neighbour and multicast listener discovery pass unjudged only where they cannot leave
/// the link. b (egress: a on TCP 9000 only) sends a neighbour solicitation and an advertisement with a
/// payload to c's global address, the solicitation to a world address too, an MLD report with a payload
/// to c, and a solicitation to fe80::1 with hop limit 64 (not 255): each is judged as ICMPv6 and
/// dropped at b's interface (policy-denied); a's solicitation with a payload to b's global address is
/// forwarded by the node (hop limit 254) and dropped at b's ingress. Controls: the same messages from a
/// (not isolated) to c arrive at c, so the node does forward them; the kernel's own neighbour discovery
/// works (a TCP connection a → b:80 over IPv6); b's well-formed solicitation for fe80::1 (hop limit 255,
/// to its solicited-node multicast address or to itself) is answered by the node; b's well-formed MLD
/// report (hop limit 1, to ff02::16) passes b's interface, and stays on the link.
#[test]
fn ipv6_link_control_is_no_data_channel() {
    let mut lab = lab();
    let (a, b, c) = (lab.ip6(A), lab.ip6(B), lab.ip6(C));
    let mac_b = lab.macs[B].1;
    let messages = |src: [u8; 16], mac: [u8; 6]| -> Vec<(&'static str, Vec<u8>, &'static [u8])> {
        vec![
            (
                "a solicitation",
                ipv6_with(
                    255,
                    src,
                    c,
                    &[],
                    proto::ICMPV6,
                    neighbour_solicitation(c, mac, b"ns-exfil"),
                ),
                b"ns-exfil",
            ),
            (
                "an advertisement",
                ipv6_with(
                    255,
                    src,
                    c,
                    &[],
                    proto::ICMPV6,
                    neighbour_advertisement(src, mac, b"na-exfil"),
                ),
                b"na-exfil",
            ),
            (
                "an MLD report",
                ipv6_with(
                    64,
                    src,
                    c,
                    &[],
                    proto::ICMPV6,
                    mld_report(solicited(c), b"mld-exfil"),
                ),
                b"mld-exfil",
            ),
        ]
    };
    let denied = |lab: &Lab| lab.counter(B, dir::EGRESS, verdict::DROPPED, reason::POLICY_DENIED);
    let before = denied(&lab);
    for (what, packet, payload) in messages(b, mac_b) {
        let f = lab.frame_from(B, ETH_P_IPV6, &packet);
        let n = lab.captured(
            C,
            move |fr| carries(fr, payload),
            || lab.send_from_pod(B, vec![f]),
        );
        assert_eq!(n, 0, "{what} with a payload from b reached c");
    }
    let to_world = lab.frame_from(
        B,
        ETH_P_IPV6,
        &ipv6_with(
            255,
            b,
            world(),
            &[],
            proto::ICMPV6,
            neighbour_solicitation(world(), mac_b, b"ns-world"),
        ),
    );
    lab.send_from_pod(B, vec![to_world]);
    let low_hop = lab.frame_from(
        B,
        ETH_P_IPV6,
        &ipv6_with(
            64,
            b,
            link_local(1),
            &[],
            proto::ICMPV6,
            neighbour_solicitation(link_local(1), mac_b, b""),
        ),
    );
    lab.send_from_pod(B, vec![low_hop]);
    assert_eq!(
        denied(&lab),
        before + 5,
        "b's link-control messages off the link were not all judged and dropped at b"
    );
    let events = lab.events();
    assert!(
        drops(&events, lab.ifindex[B], reason::POLICY_DENIED)
            .any(|e| e.protocol == proto::ICMPV6 && e.daddr == world()),
        "no flow event for b's solicitation to the world"
    );
    // Into b: a's solicitation to b's global address, forwarded by the node.
    let ingress_before = lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED);
    let into_b = lab.frame_from(
        A,
        ETH_P_IPV6,
        &ipv6_with(
            255,
            a,
            b,
            &[],
            proto::ICMPV6,
            neighbour_solicitation(b, lab.macs[A].1, b"ns-into-b"),
        ),
    );
    let n = lab.captured(
        B,
        |fr| carries(fr, b"ns-into-b"),
        || lab.send_from_pod(A, vec![into_b]),
    );
    assert_eq!(n, 0, "a's solicitation with a payload reached b");
    assert_eq!(
        lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED),
        ingress_before + 1
    );
    // Controls: the same messages from a reach c.
    for (what, packet, payload) in messages(a, lab.macs[A].1) {
        let f = lab.frame_from(A, ETH_P_IPV6, &packet);
        let n = lab.captured(
            C,
            move |fr| carries(fr, payload),
            || lab.send_from_pod(A, vec![f]),
        );
        assert_eq!(n, 1, "control: {what} with a payload from a did not reach c");
    }
    // The node answers b's well-formed solicitations for the gateway, to its solicited-node multicast
    // address and to the gateway itself.
    let gateway = link_local(1);
    for dst in [solicited(gateway), gateway] {
        let link_before = lab.counter(B, dir::EGRESS, verdict::FORWARDED, reason::NOT_IP);
        assert!(
            gateway_answers_b(&lab, dst),
            "control: the node did not answer b's solicitation for fe80::1 sent to {}",
            Ipv6Addr::from(dst)
        );
        assert!(
            lab.counter(B, dir::EGRESS, verdict::FORWARDED, reason::NOT_IP) > link_before,
            "b's solicitation was not passed as link control"
        );
    }
    // A well-formed MLD report (hop limit 1, link-local source, to ff02::16) with a payload passes b's
    // interface as link control, and stays on the link.
    let all_mld_routers = "ff02::16".parse::<Ipv6Addr>().unwrap().octets();
    let report = lab.frame_from(
        B,
        ETH_P_IPV6,
        &ipv6_with(
            1,
            link_local(0x11),
            all_mld_routers,
            &[],
            proto::ICMPV6,
            mld_report(solicited(c), b"mld-link"),
        ),
    );
    let link_before = lab.counter(B, dir::EGRESS, verdict::FORWARDED, reason::NOT_IP);
    let n = lab.captured(
        C,
        |fr| carries(fr, b"mld-link"),
        || lab.send_from_pod(B, vec![report]),
    );
    assert_eq!(n, 0, "b's link-scope MLD report left the link");
    assert!(
        lab.counter(B, dir::EGRESS, verdict::FORWARDED, reason::NOT_IP) > link_before,
        "b's MLD report was not passed as link control"
    );
    lab.topo.serve(B, 80);
    assert!(
        lab.topo.tcp6(A, B, 80),
        "control: a → b:80 over IPv6 (allowed) failed"
    );
    assert!(
        !lab.topo.tcp6(B, C, 80),
        "b → c:80 over IPv6 (b's egress allows only a:9000) connected"
    );
}

/// IPv6 extension headers hide nothing. A SYN to b:22 (b admits a on 80 only) behind
/// hop-by-hop, destination options and routing headers is judged as TCP (dropped at b, reported with
/// protocol 6 and port 22, not as the last header's protocol); a SYN behind 9 extension headers, one more
/// than the datapath walks, is dropped at a as malformed. Controls: the same builder's SYN to b:80
/// behind 5 headers, and behind 8 (all the walk takes), arrive at b.
#[test]
fn ipv6_extension_headers_hide_nothing() {
    let mut lab = lab();
    let (a, b) = (lab.ip6(A), lab.ip6(B));
    let syn = |lab: &Lab, ext: &[u8], sport: u16, dport: u16| {
        lab.frame_from(
            A,
            ETH_P_IPV6,
            &ipv6_with(64, a, b, ext, proto::TCP, tcp(sport, dport, SYN, b"")),
        )
    };
    let denied_before = lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED);
    let f = syn(&lab, &[HOP_BY_HOP, DEST_OPTS, ROUTING], 46000, 22);
    let n = lab.captured(
        B,
        move |fr| is_tuple6(fr, a, b, proto::TCP, 46000, 22),
        || lab.send_from_pod(A, vec![f]),
    );
    assert_eq!(n, 0, "a SYN to b:22 behind extension headers reached b");
    assert_eq!(
        lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED),
        denied_before + 1
    );
    let malformed_before = lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::MALFORMED);
    let mut nine = vec![HOP_BY_HOP];
    nine.extend([DEST_OPTS; 8]);
    let f = syn(&lab, &nine, 46001, 80);
    let n = lab.captured(
        B,
        move |fr| is_tuple6(fr, a, b, proto::TCP, 46001, 80),
        || lab.send_from_pod(A, vec![f]),
    );
    assert_eq!(n, 0, "a SYN behind 9 extension headers reached b");
    assert_eq!(
        lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::MALFORMED),
        malformed_before + 1
    );
    let events = lab.events();
    assert!(
        drops(&events, lab.ifindex[B], reason::POLICY_DENIED)
            .any(|e| e.protocol == proto::TCP && e.dport == 22 && e.sport == 46000),
        "no flow event for the SYN to b:22 as TCP"
    );
    assert!(
        drops(&events, lab.ifindex[A], reason::MALFORMED).any(|e| e.family == 6 && e.saddr == a),
        "no flow event for the chain past the walk"
    );
    // Controls: 5 headers, and 8.
    let f = syn(
        &lab,
        &[HOP_BY_HOP, DEST_OPTS, ROUTING, FRAGMENT, DEST_OPTS],
        46002,
        80,
    );
    let n = lab.captured(
        B,
        move |fr| is_tuple6(fr, a, b, proto::TCP, 46002, 80),
        || lab.send_from_pod(A, vec![f]),
    );
    assert_eq!(
        n, 1,
        "control: a SYN to b:80 behind 5 extension headers did not arrive"
    );
    let f = syn(&lab, &nine[..8], 46003, 80);
    let n = lab.captured(
        B,
        move |fr| is_tuple6(fr, a, b, proto::TCP, 46003, 80),
        || lab.send_from_pod(A, vec![f]),
    );
    assert_eq!(
        n, 1,
        "control: a SYN to b:80 behind 8 extension headers did not arrive"
    );
}

/// IPv6 fragments. The datapath walks past a fragment header at offset 0 and judges the
/// transport header behind it; a non-first fragment (offset ≠ 0) has no ports and is dropped at the
/// sender as `fragment`, whatever its destination. So: a's first fragment of a datagram to b:7000 (b
/// admits c there, not a) is dropped at b (policy-denied); a first fragment too short for the UDP
/// header, or whose header chain goes on in the next fragment, is dropped at a as malformed; non-first
/// fragments to c (not isolated) are dropped at a; of a whole datagram in two fragments to c only the
/// first arrives, so c's socket receives nothing (nor a datagram larger than the MTU that a's kernel
/// fragments itself); an atomic fragment (offset 0, no more) is judged as the datagram it carries: to
/// b:7000 dropped, to c delivered. Each drop is a flow event. Controls: c's first fragment to b:7000
/// arrives at b; the same datagram unfragmented reaches c's socket.
#[test]
fn ipv6_fragments() {
    fragments(true);
}

/// IPv4 fragments, as [`ipv6_fragments`]: a first fragment (more fragments, offset 0) is judged by its
/// ports, a non-zero offset is `fragment`; the tiny first fragments are a UDP header cut after 2 bytes
/// and a TCP header cut after 8 (ports, no flags: RFC 1858). "Atomic" is a plain packet in IPv4.
#[test]
fn ipv4_fragments() {
    fragments(false);
}

fn fragments(v6: bool) {
    let mut lab = lab();
    let (a, b, c) = (lab.addr(A, v6), lab.addr(B, v6), lab.addr(C, v6));
    let family = if v6 { 6 } else { 4 };
    let datagram = |src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]| {
        checksummed(src, dst, proto::UDP, udp(sport, dport, payload))
    };
    let payload: &'static [u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef";
    let from_a = move |fr: &[u8]| is_fragment_from(fr, a);
    // First fragment to b:7000.
    let d = datagram(a, b, 47000, 7000, payload);
    let first = lab.ip_frame_from(A, &fragment(a, b, proto::UDP, 0, true, &d[..24]));
    let denied_before = lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED);
    let n = lab.captured(B, from_a, || lab.send_from_pod(A, vec![first]));
    assert_eq!(n, 0, "a's first fragment to b:7000 reached b");
    assert_eq!(
        lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED),
        denied_before + 1
    );
    // Tiny first fragments, to c.
    let malformed = |lab: &Lab| lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::MALFORMED);
    let malformed_before = malformed(&lab);
    let d = datagram(a, c, 47001, 7200, payload);
    let second = if v6 {
        fragment(a, c, DEST_OPTS, 0, true, &ext_headers(&[DEST_OPTS], proto::UDP).1)
    } else {
        fragment(
            a,
            c,
            proto::TCP,
            0,
            true,
            &checksummed(a, c, proto::TCP, tcp(47001, 80, SYN, b""))[..8],
        )
    };
    let tiny = vec![
        lab.ip_frame_from(A, &fragment(a, c, proto::UDP, 0, true, &d[..2])),
        lab.ip_frame_from(A, &second),
    ];
    let n = lab.captured(C, from_a, || lab.send_from_pod(A, tiny));
    assert_eq!(n, 0, "a tiny first fragment reached c");
    assert_eq!(
        malformed(&lab),
        malformed_before + 2,
        "the tiny first fragments were not dropped as malformed"
    );
    // Non-first fragments, to c.
    let fragment_drops = |lab: &Lab| lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::FRAGMENT);
    let fragment_before = fragment_drops(&lab);
    let later = vec![
        lab.ip_frame_from(A, &fragment(a, c, proto::UDP, 8, true, &d[8..24])),
        lab.ip_frame_from(A, &fragment(a, c, proto::UDP, 24, false, &d[24..])),
    ];
    let n = lab.captured(C, from_a, || lab.send_from_pod(A, later));
    assert_eq!(n, 0, "a non-first fragment reached c");
    assert_eq!(fragment_drops(&lab), fragment_before + 2);
    // The whole datagram in two fragments: the first arrives alone.
    let d = datagram(a, c, 47002, 7201, payload);
    let whole = vec![
        lab.ip_frame_from(A, &fragment(a, c, proto::UDP, 0, true, &d[..32])),
        lab.ip_frame_from(A, &fragment(a, c, proto::UDP, 32, false, &d[32..])),
    ];
    let n = lab.captured(C, from_a, || lab.send_from_pod(A, whole.clone()));
    assert_eq!(n, 1, "of a's two fragments to c, not just the first arrived");
    assert!(
        !received_udp_at(&lab, C, SocketAddr::new(c, 7201), payload, || lab
            .send_from_pod(A, whole)),
        "a fragmented datagram was reassembled at c"
    );
    assert_eq!(fragment_drops(&lab), fragment_before + 4);
    // A's kernel fragments a datagram larger than the MTU itself: it never arrives either.
    let big: &'static [u8] = Box::leak(vec![b'x'; 3000].into_boxed_slice());
    let dst = SocketAddr::new(c, 7202);
    let sent = || {
        lab.topo.in_pod(A, move || {
            std::net::UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" })
                .unwrap()
                .send_to(big, dst)
                .unwrap()
        });
    };
    assert!(
        !received_udp_at(&lab, C, dst, big, sent),
        "a datagram larger than the MTU arrived in fragments"
    );
    assert!(
        fragment_drops(&lab) > fragment_before + 4,
        "the kernel's own fragments were not dropped as fragments"
    );
    // Atomic fragments: judged by their ports.
    let d = datagram(a, b, 47003, 7000, payload);
    let atomic_b = lab.ip_frame_from(A, &fragment(a, b, proto::UDP, 0, false, &d));
    assert!(
        !received_udp_at(&lab, B, SocketAddr::new(b, 7000), payload, || lab
            .send_from_pod(A, vec![atomic_b])),
        "a's atomic fragment reached b:7000"
    );
    assert_eq!(
        lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED),
        denied_before + 2
    );
    let d = datagram(a, c, 47004, 7203, payload);
    let atomic_c = lab.ip_frame_from(A, &fragment(a, c, proto::UDP, 0, false, &d));
    assert!(
        received_udp_at(&lab, C, SocketAddr::new(c, 7203), payload, || lab
            .send_from_pod(A, vec![atomic_c])),
        "a's atomic fragment to c was not delivered"
    );
    let events = lab.events();
    let ip = |addr: IpAddr| match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    assert!(
        drops(&events, lab.ifindex[A], reason::FRAGMENT)
            .any(|e| e.family == family && e.daddr == ip(c) && e.protocol == proto::UDP),
        "no flow event for the non-first fragments"
    );
    assert!(
        drops(&events, lab.ifindex[A], reason::MALFORMED).any(|e| e.family == family && e.saddr == ip(a)),
        "no flow event for the tiny first fragments"
    );
    assert!(
        drops(&events, lab.ifindex[B], reason::POLICY_DENIED)
            .any(|e| e.protocol == proto::UDP && e.sport == 47000 && e.dport == 7000),
        "no flow event for the first fragment to b"
    );
    // Controls: c's first fragment to b:7000 arrives at b; the datagram unfragmented reaches c.
    let d = datagram(c, b, 47005, 7000, payload);
    let from_c = lab.ip_frame_from(C, &fragment(c, b, proto::UDP, 0, true, &d[..24]));
    let n = lab.captured(
        B,
        move |fr| is_fragment_from(fr, c),
        || lab.send_from_pod(C, vec![from_c]),
    );
    assert_eq!(n, 1, "control: c's first fragment to b:7000 did not arrive");
    let plain = lab.ip_frame_from(A, &ip_packet(a, c, proto::UDP, udp(47006, 7204, payload)));
    assert!(
        received_udp_at(&lab, C, SocketAddr::new(c, 7204), payload, || lab
            .send_from_pod(A, vec![plain])),
        "control: the unfragmented datagram did not reach c"
    );
}

/// ICMPv6 errors are judged by policy as ICMPv6 (no ports), never as part of the flow they
/// quote. a sends b a packet-too-big, a destination-unreachable and a time-exceeded quoting b → a flows
/// that do not exist: none reaches b (b admits a on TCP 80 only). Nor does a packet-too-big quoting b's
/// real connection to a:9000: the datapath has no notion of "related" ICMP (path MTU discovery towards an
/// isolated pod works only with the node's own errors, which pass as the node's). Control: the same
/// messages to c (not isolated) arrive.
#[test]
fn ipv6_icmp_errors_quoting_flows_do_not_pass() {
    let lab = lab();
    let (a, b, c) = (lab.ip6(A), lab.ip6(B), lab.ip6(C));
    let errors = |to: [u8; 16]| -> Vec<(&'static str, Vec<u8>)> {
        let tcp_quote = ipv6(to, a, proto::TCP, tcp(48000, 9000, SYN, b""));
        let udp_quote = ipv6(to, a, proto::UDP, udp(48001, 9001, b"q"));
        let mut too_big = 1280u32.to_be_bytes().to_vec();
        too_big.extend_from_slice(&tcp_quote);
        let mut unreachable = vec![0; 4];
        unreachable.extend_from_slice(&udp_quote);
        let mut exceeded = vec![0; 4];
        exceeded.extend_from_slice(&tcp_quote);
        vec![
            (
                "a packet-too-big",
                ipv6(a, to, proto::ICMPV6, icmp6(2, 0, &too_big)),
            ),
            (
                "a port-unreachable",
                ipv6(a, to, proto::ICMPV6, icmp6(1, 4, &unreachable)),
            ),
            (
                "a time-exceeded",
                ipv6(a, to, proto::ICMPV6, icmp6(3, 0, &exceeded)),
            ),
        ]
    };
    let denied_before = lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED);
    for (what, packet) in errors(b) {
        let kind = packet[40];
        let f = lab.frame_from(A, ETH_P_IPV6, &packet);
        let n = lab.captured(
            B,
            move |fr| is_icmp6(fr, a, kind),
            || lab.send_from_pod(A, vec![f]),
        );
        assert_eq!(n, 0, "{what} quoting a flow that does not exist reached b");
    }
    assert_eq!(
        lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED),
        denied_before + 3
    );
    // A real connection b → a:9000, then an error quoting it.
    let mut lab = lab;
    lab.topo.serve(A, 9000);
    assert!(
        lab.topo.tcp6(B, A, 9000),
        "control: b → a:9000 over IPv6 (allowed) failed"
    );
    let (_, packet) = errors(b).swap_remove(0);
    let f = lab.frame_from(A, ETH_P_IPV6, &packet);
    let n = lab.captured(B, move |fr| is_icmp6(fr, a, 2), || lab.send_from_pod(A, vec![f]));
    assert_eq!(n, 0, "a packet-too-big quoting b's real connection reached b");
    for (what, packet) in errors(c) {
        let kind = packet[40];
        let f = lab.frame_from(A, ETH_P_IPV6, &packet);
        let n = lab.captured(
            C,
            move |fr| is_icmp6(fr, a, kind),
            || lab.send_from_pod(A, vec![f]),
        );
        assert_eq!(n, 1, "control: {what} from a did not reach c");
    }
}

/// A stream of `total` bytes from pod `from` to pod `to` at `dst`, written 256 KiB at a time: how many
/// bytes the receiving socket read (`None`: no connection was accepted within 2 s).
fn bulk(lab: &Lab, from: usize, to: usize, dst: SocketAddr, total: usize) -> Option<usize> {
    let netns = lab.topo.pods[to].netns.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        enter_netns(&netns);
        let listener = TcpListener::bind(dst).expect("bind");
        listener.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        let until = Instant::now() + Duration::from_secs(2);
        let mut conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => return None,
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while let Ok(n @ 1..) = conn.read(&mut buf) {
            got += n;
        }
        Some(got)
    });
    ready_rx.recv().unwrap();
    lab.topo.in_pod(from, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_secs(1)) else {
            return;
        };
        let chunk = vec![0x5a; 256 << 10];
        for _ in 0..total / chunk.len() {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
    });
    receiver.join().expect("receiver")
}

/// (packets, bytes) forwarded as part of an established connection at pod `i`'s interface in
/// `direction`.
fn established(lab: &Lab, i: usize, direction: u8) -> (u64, u64) {
    let (h, s) = common::counter_values(
        &lab.dp,
        lab.ifindex[i],
        direction,
        verdict::FORWARDED,
        reason::ESTABLISHED,
    );
    (h.packets + s.packets, h.bytes + s.bytes)
}

/// `f` for pod `i`'s interface in `direction` between two readings: (packets, bytes per packet).
fn per_packet(lab: &Lab, i: usize, direction: u8, f: impl FnOnce()) -> (u64, u64) {
    let (p0, b0) = established(lab, i, direction);
    f();
    let (p1, b1) = established(lab, i, direction);
    let packets = p1 - p0;
    (packets, (b1 - b0) / packets.max(1))
}

fn ethtool(netns: &str, args: &[&str]) {
    let mut cmd = vec!["ip", "netns", "exec", netns, "ethtool"];
    cmd.extend_from_slice(args);
    sh(&cmd);
}

/// Segmentation offload: an allowed stream of 8 MiB a → b:80, over IPv4 and over IPv6, written in
/// 256 KiB writes, arrives whole, and the veths carry it in GSO super-packets (veth offers TSO): the
/// programs judge and forward packets larger than the MTU (bytes per packet of the established
/// counters, at a's and at b's interface, above 1514). With TSO and GSO off in a, the packets a sends are
/// at most 1514 bytes; with GRO on at the node's side of a's veth they are larger again at a's interface
/// (GRO runs before TC ingress). The same stream to b:81, which b does not admit, gets no connection.
#[test]
fn segmentation_offload_super_packets_are_judged() {
    let lab = lab();
    const TOTAL: usize = 8 << 20;
    for (family, b) in [("IPv4", lab.topo.pods[B].ip), ("IPv6", IpAddr::from(lab.ip6(B)))] {
        let mut got = None;
        let (packets, size) = per_packet(&lab, A, dir::EGRESS, || {
            got = bulk(&lab, A, B, SocketAddr::new(b, 80), TOTAL)
        });
        assert_eq!(
            got,
            Some(TOTAL),
            "{family}: the allowed stream a → b:80 did not arrive whole"
        );
        println!(
            "{family}: a's interface forwarded {packets} established packets, {size} bytes each on average"
        );
        assert!(
            size > 1514,
            "{family}: no packet larger than the MTU was judged at a's interface ({size} bytes per packet)"
        );
        let (_, at_b) = established(&lab, B, dir::INGRESS);
        assert!(at_b > 0, "{family}: nothing was counted for b");
        assert_eq!(
            bulk(&lab, A, B, SocketAddr::new(b, 81), TOTAL),
            None,
            "{family}: the stream to b:81 (denied) connected"
        );
    }
    let b6 = SocketAddr::new(IpAddr::from(lab.ip6(B)), 80);
    let (per_b_before, bytes_b_before) = established(&lab, B, dir::INGRESS);
    ethtool(
        &lab.topo.pods[A].netns,
        &["-K", "eth0", "tso", "off", "gso", "off"],
    );
    let mut got = None;
    let (packets, size) = per_packet(&lab, A, dir::EGRESS, || got = bulk(&lab, A, B, b6, TOTAL));
    assert_eq!(
        got,
        Some(TOTAL),
        "without TSO/GSO: the stream did not arrive whole"
    );
    println!("TSO and GSO off in a: {packets} packets, {size} bytes each on average");
    assert!(
        size <= 1514,
        "without TSO/GSO in a, a's interface still saw {size}-byte packets"
    );
    let (per_b, bytes_b) = established(&lab, B, dir::INGRESS);
    println!(
        "  at b's interface: {} bytes per packet",
        (bytes_b - bytes_b_before) / (per_b - per_b_before).max(1)
    );
    ethtool(&lab.topo.node, &["-K", &lab.topo.pods[A].host_if, "gro", "on"]);
    let (packets, size) = per_packet(&lab, A, dir::EGRESS, || got = bulk(&lab, A, B, b6, TOTAL));
    assert_eq!(
        got,
        Some(TOTAL),
        "with GRO on the node's side: the stream did not arrive whole"
    );
    println!("and GRO on at the node's side of a's veth: {packets} packets, {size} bytes each on average");
    assert!(
        size > 1514,
        "GRO on the node's side made no packet larger than the MTU ({size} bytes per packet)"
    );
}

/// Segment routing (RFC 8754): b's neighbour solicitation to fe80::1 (link control on its own) with a
/// payload, behind a segment routing header whose next segment is c's address, through a node that
/// processes such headers (`seg6_enabled=1` on `all` and on b's veth, as SRv6 deployments set it), which
/// would make c the destination and forward it although b's egress admits only a on TCP 9000. It is
/// dropped at b's interface as `source-routed` and reported. Control: the same solicitation without the
/// header is answered by the node.
#[test]
fn ipv6_segment_routing_header_is_source_routed() {
    let mut lab = lab();
    common::sysctl(&lab.topo.node, "net.ipv6.conf.all.seg6_enabled=1");
    common::sysctl(
        &lab.topo.node,
        &format!("net.ipv6.conf.{}.seg6_enabled=1", lab.topo.pods[B].host_if),
    );
    let routed = |lab: &Lab| lab.counter(B, dir::EGRESS, verdict::DROPPED, reason::SOURCE_ROUTED);
    let before = routed(&lab);
    assert_eq!(
        routed_to_c(&lab),
        0,
        "b's solicitation with a segment routing header reached c through the node"
    );
    assert_eq!(routed(&lab), before + 1);
    assert!(
        has_event(&lab.events(), lab.ifindex[B], reason::SOURCE_ROUTED),
        "no flow event for the source-routed solicitation"
    );
    assert!(
        gateway_answers_b(&lab, link_local(1)),
        "control: the node did not answer b's solicitation for fe80::1"
    );
}

/// Sends b's solicitation for fe80::1 with a payload, behind a segment routing header whose next
/// segment is c ([`routed_solicitation`]): how many frames with the payload arrived at c.
fn routed_to_c(lab: &Lab) -> usize {
    let f = lab.frame_from(B, ETH_P_IPV6, &routed_solicitation(lab, lab.ip6(C), b"srh-exfil"));
    lab.captured(
        C,
        |fr| carries(fr, b"srh-exfil"),
        || lab.send_from_pod(B, vec![f]),
    )
}

/// b's neighbour solicitation for fe80::1, hop limit 255, to fe80::1, behind a segment routing header
/// (type 4) whose segment list is [`next`, fe80::1] with one segment left, and `data` after it.
fn routed_solicitation(lab: &Lab, next: [u8; 16], data: &[u8]) -> Vec<u8> {
    let (b, gateway) = (lab.ip6(B), link_local(1));
    let ns = checksummed6(
        b,
        next,
        proto::ICMPV6,
        neighbour_solicitation(gateway, lab.macs[B].1, data),
    );
    let mut srh = vec![proto::ICMPV6, 4, 4, 1, 1, 0, 0, 0];
    srh.extend_from_slice(&next);
    srh.extend_from_slice(&gateway);
    srh.extend_from_slice(&ns);
    ipv6_packet(255, b, gateway, ROUTING, &srh)
}
