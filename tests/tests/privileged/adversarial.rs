//! An attacker inside a pod, with CAP_NET_RAW: frames crafted with `AF_PACKET` inside the pod's network
//! namespace, sent through the real veth and the real programs, and what arrives on the other side
//! observed with real sockets and captures (an `AF_PACKET` socket in the receiving pod). Every attack has
//! a positive control made by the same machinery that passes where policy allows it, so that "nothing
//! arrived" can never mean "the attack was broken". The machinery and the cluster are in
//! `common/attack.rs`.
//!
//! Pods: a (10.244.206.10) attacker, b (.11) the locked-down pod, c (.12) a third pod.
//! - b: ingress isolated, allows a on TCP 80, c on UDP 7000 and a on SCTP 7100; egress isolated, allows
//!   a on TCP 9000.
//! - a and c: not isolated.

use crate::common;

use std::time::Instant;

use crate::common::attack::{
    A, B, C, ETH_P_IP, Lab, checksummed4, drops, has_event, ipv4, ipv4_packet, is_tuple, raw_send,
    received_udp, tcp, udp,
};
use ztrust_agent::datapath::loader::DEFAULT_PEER_MARK;
use ztrust_common::{dir, proto, reason, verdict};

const SYN: u8 = 0x02;

fn lab() -> Lab {
    Lab::new("ztad", 206)
}

/// Class 1: a pod sends only from its own address. b admits c on UDP 7000; a datagram "from c" that a
/// writes never reaches b's socket, nor do its datagrams from the node's or a world address to c.
/// Controls: the same builder from a's own address reaches c (not isolated), and c's own datagram
/// reaches b.
#[test]
fn spoofed_sources_are_dropped_at_the_sender() {
    let mut lab = lab();
    let (a, b, c) = (lab.ip(A), lab.ip(B), lab.ip(C));
    let before = lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::SPOOFED_SOURCE);
    let forged = lab.frame_from(A, 0x0800, &ipv4(c, b, proto::UDP, udp(41000, 7000, b"forged")));
    assert!(
        !received_udp(&lab, B, 7000, b"forged", || lab.send_from_pod(A, vec![forged])),
        "a datagram a forged as c's reached b"
    );
    assert_eq!(
        lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::SPOOFED_SOURCE),
        before + 1
    );
    // A forged answer to a query c sent to b: "from b:53".
    let answer = lab.frame_from(A, 0x0800, &ipv4(b, c, proto::UDP, udp(53, 41001, b"answer")));
    assert!(
        !received_udp(&lab, C, 41001, b"answer", || lab.send_from_pod(A, vec![answer])),
        "a forged answer reached c"
    );
    // The node's address and an address outside the cluster.
    let node = lab.frame_from(
        A,
        0x0800,
        &ipv4([10, 244, 206, 1], c, proto::UDP, udp(41002, 7100, b"node")),
    );
    assert!(
        !received_udp(&lab, C, 7100, b"node", || lab.send_from_pod(A, vec![node])),
        "a datagram from the node's address reached c"
    );
    let world = lab.frame_from(
        A,
        0x0800,
        &ipv4([198, 51, 100, 7], c, proto::UDP, udp(41003, 7101, b"world")),
    );
    assert!(
        !received_udp(&lab, C, 7101, b"world", || lab.send_from_pod(A, vec![world])),
        "a datagram from the world reached c"
    );
    assert_eq!(
        lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::SPOOFED_SOURCE),
        before + 4
    );
    // Positive control: the same builder, a's own address.
    let honest = lab.frame_from(A, 0x0800, &ipv4(a, c, proto::UDP, udp(41004, 7102, b"honest")));
    assert!(
        received_udp(&lab, C, 7102, b"honest", || lab.send_from_pod(A, vec![honest])),
        "control: a's own datagram did not reach c"
    );
    // And c, which b admits, reaches b from its own address (so b's socket and policy work).
    let from_c = lab.frame_from(C, 0x0800, &ipv4(c, b, proto::UDP, udp(41005, 7000, b"from-c")));
    assert!(
        received_udp(&lab, B, 7000, b"from-c", || lab.send_from_pod(C, vec![from_c])),
        "control: c's datagram did not reach b"
    );
    assert!(
        has_event(&lab.events(), lab.ifindex[A], reason::SPOOFED_SOURCE),
        "no flow event for the spoofed datagrams"
    );
}

/// Class 2: frames the parser does not judge are dropped, also before the endpoint is known. An IP
/// packet behind two VLAN tags with VID 0, which the node would strip and forward.
#[test]
fn vlan_tagged_frames_are_dropped() {
    let mut lab = lab();
    let (a, c) = (lab.ip(A), lab.ip(C));
    let inner = ipv4(a, c, proto::UDP, udp(42000, 7200, b"tagged"));
    let mut tagged = lab.frame_from(A, 0x0800, &inner);
    tagged.splice(12..12, [0x81, 0x00, 0, 0, 0x81, 0x00, 0, 0]);
    let before = lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::UNSUPPORTED_FRAME);
    assert!(
        !received_udp(&lab, C, 7200, b"tagged", || lab
            .send_from_pod(A, vec![tagged.clone()])),
        "a VLAN-tagged datagram reached c"
    );
    assert_eq!(
        lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::UNSUPPORTED_FRAME),
        before + 1
    );
    // One tag: the kernel takes it into the skb's metadata before TC runs, so the program sees the packet
    // inside; it is still a tagged frame, not judged.
    let mut one_tag = lab.frame_from(A, 0x0800, &inner);
    one_tag.splice(12..12, [0x81, 0x00, 0, 0]);
    assert!(
        !received_udp(&lab, C, 7200, b"tagged", || lab.send_from_pod(A, vec![one_tag])),
        "a single-tagged datagram reached c"
    );
    assert_eq!(
        lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::UNSUPPORTED_FRAME),
        before + 2
    );
    // Positive control: the same packet untagged (c is not isolated).
    let plain = lab.frame_from(A, 0x0800, &inner);
    assert!(
        received_udp(&lab, C, 7200, b"tagged", || lab.send_from_pod(A, vec![plain])),
        "control: the untagged datagram did not reach c"
    );
    assert!(
        has_event(&lab.events(), lab.ifindex[A], reason::UNSUPPORTED_FRAME),
        "no flow event for the tagged frame"
    );
    // With a's endpoint removed (the fail-closed window), IP is dropped, and tagged frames too.
    lab.dp
        .maps
        .endpoints
        .remove(&lab.ifindex[A])
        .expect("remove a's endpoint");
    assert!(
        !received_udp(&lab, C, 7200, b"tagged", || lab.send_from_pod(A, vec![tagged])),
        "a VLAN-tagged datagram passed the fail-closed window"
    );
    assert_eq!(
        lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::UNSUPPORTED_FRAME),
        before + 3
    );
}

/// Class 4: a TCP segment without state is judged in its own direction. Both attacks pick the ports
/// that make the reverse direction allowed; both controls are the same segments in the direction
/// policy allows.
#[test]
fn tcp_without_state_cannot_choose_its_direction() {
    let mut lab = lab();
    let (a, b) = (lab.ip(A), lab.ip(B));
    // Into b, "from a's port 9000" (b may connect to a:9000): b's ingress admits a only on 80.
    let into_b = lab.frame_from(
        A,
        0x0800,
        &ipv4(a, b, proto::TCP, tcp(9000, 43000, 0x18, b"data")),
    );
    let n = lab.captured(
        B,
        move |f| is_tuple(f, a, b, proto::TCP, 9000, 43000),
        || lab.send_from_pod(A, vec![into_b]),
    );
    assert_eq!(n, 0, "ACK|PSH from a:9000 reached b");
    // FIN and ACK scans of b.
    let scans: Vec<Vec<u8>> = [(0x01u8, 22u16), (0x10, 23), (0x04, 24)]
        .iter()
        .map(|(flags, port)| {
            lab.frame_from(A, 0x0800, &ipv4(a, b, proto::TCP, tcp(43001, *port, *flags, b"")))
        })
        .collect();
    let n = lab.captured(
        B,
        move |f| f.len() > 34 && f[26..30] == a && f[23] == proto::TCP && f[34..36] == 43001u16.to_be_bytes(),
        || lab.send_from_pod(A, scans),
    );
    assert_eq!(n, 0, "FIN/ACK/RST probes reached b");
    // Out of b, "from b's port 80" (a may connect to b:80): b's egress allows only a:9000.
    let out_of_b = lab.frame_from(B, 0x0800, &ipv4(b, a, proto::TCP, tcp(80, 43002, 0x18, b"exfil")));
    let n = lab.captured(
        A,
        move |f| is_tuple(f, b, a, proto::TCP, 80, 43002),
        || lab.send_from_pod(B, vec![out_of_b]),
    );
    assert_eq!(n, 0, "ACK|PSH from b:80 left b");
    assert_eq!(
        lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::NO_CT_ENTRY),
        4
    );
    assert_eq!(
        lab.counter(B, dir::EGRESS, verdict::DROPPED, reason::NO_CT_ENTRY),
        1
    );
    let events = lab.events();
    assert!(
        has_event(&events, lab.ifindex[B], reason::NO_CT_ENTRY),
        "no flow event for the stateless segments"
    );
    // Controls: the same segments in the allowed direction arrive.
    let b_to_a = lab.frame_from(B, 0x0800, &ipv4(b, a, proto::TCP, tcp(43003, 9000, 0x18, b"ok")));
    let n = lab.captured(
        A,
        move |f| is_tuple(f, b, a, proto::TCP, 43003, 9000),
        || lab.send_from_pod(B, vec![b_to_a]),
    );
    assert_eq!(n, 1, "control: ACK|PSH from b to a:9000 did not arrive");
    let a_to_b = lab.frame_from(A, 0x0800, &ipv4(a, b, proto::TCP, tcp(43004, 80, 0x18, b"ok")));
    let n = lab.captured(
        B,
        move |f| is_tuple(f, a, b, proto::TCP, 43004, 80),
        || lab.send_from_pod(A, vec![a_to_b]),
    );
    assert_eq!(n, 1, "control: ACK|PSH from a to b:80 did not arrive");
}

/// Conntrack exhaustion: denied packets make no entries, so a denied pod cannot evict other pods'
/// state. 5,000 RSTs and 5,000 datagrams to b on ports b does not admit: b's table is unchanged, and c's
/// allowed flow to b keeps its state (its answer passes).
#[test]
fn denied_floods_make_no_conntrack_entries() {
    let lab = lab();
    let (a, b, c) = (lab.ip(A), lab.ip(B), lab.ip(C));
    // c → b:7000 (admitted) makes b's entry; b's answer is a reply.
    let from_c = lab.frame_from(C, 0x0800, &ipv4(c, b, proto::UDP, udp(44000, 7000, b"q")));
    lab.send_from_pod(C, vec![from_c]);
    let entries_b = lab.conntrack_entries(B);
    assert!(
        entries_b >= 1,
        "control: c's admitted datagram made no entry at b"
    );
    let denied = |lab: &Lab| {
        lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::NO_CT_ENTRY)
            + lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED)
    };
    let before = denied(&lab);
    let flood: Vec<Vec<u8>> = (0..5000u16)
        .flat_map(|i| {
            [
                lab.frame_from(A, 0x0800, &ipv4(a, b, proto::TCP, tcp(80, 10_000 + i, 0x04, b""))),
                lab.frame_from(
                    A,
                    0x0800,
                    &ipv4(a, b, proto::UDP, udp(20_000 + i, 30_000 + i, b"x")),
                ),
            ]
        })
        .collect();
    let started = Instant::now();
    lab.send_from_pod(A, flood);
    let took = started.elapsed();
    let dropped = denied(&lab) - before;
    assert_eq!(dropped, 10_000, "the flood was not all judged and dropped at b");
    assert_eq!(
        lab.conntrack_entries(B),
        entries_b,
        "denied packets made conntrack entries at b"
    );
    println!(
        "10,000 denied packets in {took:?}: 0 conntrack entries made at b ({entries_b} before and after)"
    );
    // b's answer to c still passes as a reply.
    let answer = lab.frame_from(B, 0x0800, &ipv4(b, c, proto::UDP, udp(7000, 44000, b"a")));
    assert!(
        received_udp(&lab, C, 44000, b"a", || lab.send_from_pod(B, vec![answer])),
        "b's answer to c was dropped after the flood"
    );
    assert_eq!(lab.counter(B, dir::EGRESS, verdict::FORWARDED, reason::REPLY), 1);
}

/// Class 6: a mark set by anything else on the node opens nothing. A process of the node writes frames
/// with the peer-mark bit (`SO_MARK`) onto b's interface: a denied SYN "from a" to b:22 is still judged
/// and dropped. Control: the same marked frame to b:80, which b admits from a, arrives.
#[test]
fn a_foreign_peer_mark_opens_nothing() {
    let lab = lab();
    let (a, b) = (lab.ip(A), lab.ip(B));
    let host_if = lab.topo.pods[B].host_if.clone();
    let frame = |dport: u16| {
        let (node_side, pod_side) = lab.macs[B];
        let mut f = pod_side.to_vec();
        f.extend_from_slice(&node_side);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&ipv4(a, b, proto::TCP, tcp(45000, dport, 0x02, b"")));
        f
    };
    let (denied, allowed) = (frame(22), frame(80));
    let hi = host_if.clone();
    let n = lab.captured(
        B,
        move |f| is_tuple(f, a, b, proto::TCP, 45000, 22),
        move || raw_send(&hi, &[denied], DEFAULT_PEER_MARK),
    );
    assert_eq!(n, 0, "a marked SYN to b:22 reached b");
    assert_eq!(
        lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED),
        1
    );
    let n = lab.captured(
        B,
        move |f| is_tuple(f, a, b, proto::TCP, 45000, 80),
        move || raw_send(&host_if, &[allowed], DEFAULT_PEER_MARK),
    );
    assert_eq!(n, 1, "control: a marked SYN to b:80 did not arrive");
}

/// An ordinary connection still works end to end through all of this (a → b:80), and b cannot reach c.
#[test]
fn honest_traffic_still_flows() {
    let mut lab = lab();
    lab.topo.serve(B, 80);
    lab.topo.serve(C, 81);
    assert!(lab.topo.tcp(A, B, 80), "a → b:80 (allowed) failed");
    assert!(
        !lab.topo.tcp(B, C, 81),
        "b → c:81 (b's egress allows only a:9000) connected"
    );
    assert!(lab.topo.tcp(A, C, 81), "a → c:81 (not isolated) failed");
}

/// IPv4 options hide nothing. A SYN to b:22 (b admits a on 80 only) with a record-route option
/// is judged by its ports and dropped at b. One with a loose source route (RFC 791) to the node's
/// address 169.254.1.1 and on to b — which a node that honours source routes (`accept_source_route=1`,
/// set here) rewrites to b and forwards — is dropped at a's interface as `source-routed`, to b:22 and to
/// b:80 alike: its route is not the destination it would be judged by. Control: the same builder's SYN
/// to b:80 with a record-route option arrives at b.
#[test]
fn ipv4_options_hide_nothing() {
    let mut lab = lab();
    let (a, b) = (lab.ip(A), lab.ip(B));
    let record_route = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut source_route = vec![131, 7, 4];
    source_route.extend_from_slice(&b);
    let syn = |lab: &Lab, dst: [u8; 4], options: &[u8], sport: u16, dport: u16| {
        let segment = checksummed4(a, b, proto::TCP, tcp(sport, dport, SYN, b""));
        lab.frame_from(
            A,
            ETH_P_IP,
            &ipv4_packet(a, dst, proto::TCP, 0x4000, options, &segment),
        )
    };
    let through = |lab: &Lab, f: Vec<u8>, sport: u16, dport: u16| {
        lab.captured(
            B,
            move |fr| is_tuple(fr, a, b, proto::TCP, sport, dport),
            || lab.send_from_pod(A, vec![f]),
        )
    };
    let denied = |lab: &Lab| lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED);
    let before = denied(&lab);
    assert_eq!(
        through(&lab, syn(&lab, b, &record_route, 49000, 22), 49000, 22),
        0,
        "a SYN to b:22 with a record-route option reached b"
    );
    assert_eq!(denied(&lab), before + 1);
    assert_eq!(
        through(&lab, syn(&lab, b, &record_route, 49001, 80), 49001, 80),
        1,
        "control: a SYN to b:80 with a record-route option did not arrive"
    );
    common::sysctl(&lab.topo.node, "net.ipv4.conf.all.accept_source_route=1");
    let routed = |lab: &Lab| lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::SOURCE_ROUTED);
    let gateway = [169, 254, 1, 1];
    assert_eq!(
        through(&lab, syn(&lab, gateway, &source_route, 49003, 22), 49003, 22),
        0,
        "a source-routed SYN to b:22 reached b"
    );
    assert_eq!(
        through(&lab, syn(&lab, gateway, &source_route, 49004, 80), 49004, 80),
        0,
        "a source-routed SYN to b:80 reached b"
    );
    assert_eq!(routed(&lab), 2);
    let events = lab.events();
    assert!(
        drops(&events, lab.ifindex[A], reason::SOURCE_ROUTED).any(|e| e.sport == 49003),
        "no flow event for the source-routed SYN"
    );
}

/// An SCTP INIT chunk from `sport` to `dport` (no checksum: nothing here checks it).
fn sctp_init(sport: u16, dport: u16) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&[0; 8]);
    s.extend_from_slice(&[1, 0, 0, 20, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1]);
    s
}

/// SCTP is judged by its ports like TCP and UDP. b admits a on SCTP 7100 only: a's INIT to
/// b:7101, and c's INIT to b:7100, are dropped at b (policy-denied, reported as protocol 132).
/// Control: a's INIT to b:7100 arrives.
#[test]
fn sctp_is_judged_by_its_port() {
    let mut lab = lab();
    let (a, b, c) = (lab.ip(A), lab.ip(B), lab.ip(C));
    let before = lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED);
    let f = lab.frame_from(A, ETH_P_IP, &ipv4(a, b, proto::SCTP, sctp_init(50000, 7101)));
    let n = lab.captured(
        B,
        move |fr| is_tuple(fr, a, b, proto::SCTP, 50000, 7101),
        || lab.send_from_pod(A, vec![f]),
    );
    assert_eq!(n, 0, "a's INIT to b:7101 reached b");
    let f = lab.frame_from(C, ETH_P_IP, &ipv4(c, b, proto::SCTP, sctp_init(50001, 7100)));
    let n = lab.captured(
        B,
        move |fr| is_tuple(fr, c, b, proto::SCTP, 50001, 7100),
        || lab.send_from_pod(C, vec![f]),
    );
    assert_eq!(n, 0, "c's INIT to b:7100 (admitted from a only) reached b");
    assert_eq!(
        lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED),
        before + 2
    );
    let events = lab.events();
    assert_eq!(
        drops(&events, lab.ifindex[B], reason::POLICY_DENIED)
            .filter(|e| e.protocol == proto::SCTP)
            .count(),
        2,
        "no flow events for the INITs as SCTP"
    );
    let f = lab.frame_from(A, ETH_P_IP, &ipv4(a, b, proto::SCTP, sctp_init(50002, 7100)));
    let n = lab.captured(
        B,
        move |fr| is_tuple(fr, a, b, proto::SCTP, 50002, 7100),
        || lab.send_from_pod(A, vec![f]),
    );
    assert_eq!(n, 1, "control: a's INIT to b:7100 did not arrive");
}

/// A datagram from port 53 is no answer when nobody asked. c's datagram from port 53 to
/// b:41000 (b has sent nothing; b admits c on UDP 7000 only), and a's from port 53 to b:7000, are
/// dropped at b as policy-denied. Control: c's datagram from port 53 to b:7000 arrives.
#[test]
fn udp_from_port_53_is_not_a_reply() {
    let lab = lab();
    let (a, b, c) = (lab.ip(A), lab.ip(B), lab.ip(C));
    let before = lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED);
    let answer = lab.frame_from(C, ETH_P_IP, &ipv4(c, b, proto::UDP, udp(53, 41000, b"answer")));
    assert!(
        !received_udp(&lab, B, 41000, b"answer", || lab.send_from_pod(C, vec![answer])),
        "c's datagram from port 53 reached b:41000"
    );
    let from_a = lab.frame_from(A, ETH_P_IP, &ipv4(a, b, proto::UDP, udp(53, 7000, b"answer")));
    assert!(
        !received_udp(&lab, B, 7000, b"answer", || lab.send_from_pod(A, vec![from_a])),
        "a's datagram from port 53 reached b:7000"
    );
    assert_eq!(
        lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED),
        before + 2
    );
    let control = lab.frame_from(C, ETH_P_IP, &ipv4(c, b, proto::UDP, udp(53, 7000, b"answer")));
    assert!(
        received_udp(&lab, B, 7000, b"answer", || lab.send_from_pod(C, vec![control])),
        "control: c's datagram from port 53 to b:7000 did not arrive"
    );
}
