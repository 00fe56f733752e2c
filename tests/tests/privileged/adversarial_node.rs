//! What the node does with what a pod sends, used against the other pods: a tunnel device of the node
//! that decapsulates a pod's packet and forwards the inner one with the source it names, and the
//! node's one event ring shared by every pod. The same three pods and policy as `adversarial.rs`
//! (see `common/attack.rs`).

use std::time::Instant;

use crate::common::attack::{A, B, C, ETH_P_IP, Lab, drops, ipv4, mac, received_udp, tcp, udp};
use crate::common::sh;
use ztrust_common::{Config, dir, ep_flags, proto, reason, stat, verdict};

/// A VXLAN packet (RFC 7348: flags with the VNI bit, the 24-bit VNI) carrying `inner`, an Ethernet frame.
fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08, 0, 0, 0];
    v.extend_from_slice(&(vni << 8).to_be_bytes());
    v.extend_from_slice(inner);
    v
}

/// A node with a VXLAN device (as flannel's `flannel.1` or Calico's `vxlan.calico`: it takes packets
/// from any sender on its port, and the node forwards what they carry). Pod a writes a VXLAN packet to
/// the node whose inner datagram is "from c" to b:7000, which b admits from c only. Control: the same
/// packet with `--pod-tunnels allow` reaches b's socket, so the node really decapsulates and forwards
/// it (the attack works); denied, it is dropped at a's interface as `encapsulated` and reported.
#[test]
fn a_pod_cannot_tunnel_past_the_source_check() {
    let mut lab = Lab::new("zttun", 220);
    let node = lab.topo.node.clone();
    sh(&[
        "ip",
        "-n",
        &node,
        "link",
        "add",
        "zvx",
        "type",
        "vxlan",
        "id",
        "42",
        "dstport",
        "4789",
        "nolearning",
    ]);
    sh(&["ip", "-n", &node, "link", "set", "zvx", "up"]);
    // The inner packet's source is routed via c's veth, not the tunnel: no reverse-path check here, as
    // with a source on another node that the tunnel does route.
    for conf in ["all", "zvx"] {
        sh(&[
            "ip",
            "netns",
            "exec",
            &node,
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{conf}.rp_filter=0"),
        ]);
    }
    let (a, b, c) = (lab.ip(A), lab.ip(B), lab.ip(C));
    let tunnel_mac = mac(&node, "zvx");
    let frame = |lab: &Lab, payload: &[u8]| {
        let mut inner = tunnel_mac.to_vec();
        inner.extend_from_slice(&[2, 0, 0, 0, 0, 0x0c]);
        inner.extend_from_slice(&ETH_P_IP.to_be_bytes());
        inner.extend_from_slice(&ipv4(c, b, proto::UDP, udp(46000, 7000, payload)));
        lab.frame_from(
            A,
            ETH_P_IP,
            &ipv4(
                a,
                [169, 254, 1, 1],
                proto::UDP,
                udp(46001, 4789, &vxlan(42, &inner)),
            ),
        )
    };
    let denied = frame(&lab, b"tunnelled");
    let before = lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::ENCAPSULATED);
    assert!(
        !received_udp(&lab, B, 7000, b"tunnelled", || lab.send_from_pod(A, vec![denied])),
        "a's tunnelled datagram \"from c\" reached b"
    );
    assert_eq!(
        lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::ENCAPSULATED),
        before + 1
    );
    let events = lab.events();
    let e = drops(&events, lab.ifindex[A], reason::ENCAPSULATED)
        .next()
        .expect("no flow event for the tunnelled packet");
    assert_eq!((e.protocol, e.dport), (proto::UDP, 4789));

    let allow = Config {
        flags: ep_flags::ALLOW_ENCAPSULATION,
        ..Default::default()
    };
    lab.dp.maps.config.set(0, allow, 0).expect("config");
    let control = frame(&lab, b"tunnel-control");
    assert!(
        received_udp(&lab, B, 7000, b"tunnel-control", || lab
            .send_from_pod(A, vec![control])),
        "control: with tunnels allowed, the node did not deliver the inner datagram to b (the attack is broken)"
    );
}

/// One pod's flood of distinct denied flows spends the budget of the interface that judges it, not the
/// other pods' events: a floods b with 5,000 SYNs from 5,000 source ports (each a flow of its own, so
/// the per-flow rate limit does not apply). Control: with no budget every one of them is an event; with
/// a budget of 100 b's interface sends at most 100 per second, every packet is still counted, and a drop
/// at c's interface in the same second is reported.
#[test]
fn a_flood_of_distinct_flows_spends_only_its_interfaces_budget() {
    let mut lab = Lab::new("ztflood", 221);
    let (a, b) = (lab.ip(A), lab.ip(B));
    let flood = |lab: &Lab, first: u16| -> Vec<Vec<u8>> {
        (0..5000u16)
            .map(|i| {
                lab.frame_from(
                    A,
                    ETH_P_IP,
                    &ipv4(a, b, proto::TCP, tcp(first + i, 22, 0x02, b"")),
                )
            })
            .collect()
    };
    let denied_at_b = |lab: &Lab| lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED);
    let over_budget = |lab: &Lab| -> u64 {
        lab.dp
            .maps
            .stats
            .get(&stat::EVENTS_OVER_BUDGET, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    };

    // No budget: 5,000 events.
    let before = denied_at_b(&lab);
    lab.send_from_pod(A, flood(&lab, 10_000));
    assert_eq!(denied_at_b(&lab), before + 5000);
    let events = lab.events();
    assert_eq!(
        drops(&events, lab.ifindex[B], reason::POLICY_DENIED).count(),
        5000,
        "control: without a budget, one event per flow"
    );

    // A budget of 100 per interface and second.
    lab.dp
        .maps
        .config
        .set(
            0,
            Config {
                event_budget: 100,
                ..Default::default()
            },
            0,
        )
        .expect("config");
    let (before, skipped) = (denied_at_b(&lab), over_budget(&lab));
    let started = Instant::now();
    lab.send_from_pod(A, flood(&lab, 20_000));
    // c sends from a's address: dropped at c's own interface, whose budget is untouched.
    let spoofed = lab.frame_from(C, ETH_P_IP, &ipv4(a, b, proto::UDP, udp(47000, 7000, b"x")));
    lab.send_from_pod(C, vec![spoofed]);
    let took = started.elapsed();
    assert_eq!(
        denied_at_b(&lab),
        before + 5000,
        "every packet of the flood is still counted"
    );
    let events = lab.events();
    let at_b = drops(&events, lab.ifindex[B], reason::POLICY_DENIED).count() as u64;
    let windows = took.as_secs() + 2;
    assert!(
        at_b >= 100 && at_b <= 100 * windows,
        "{at_b} events at b in {took:?}, budget 100 per second"
    );
    assert_eq!(
        over_budget(&lab) - skipped,
        5000 - at_b,
        "events left out are counted"
    );
    // The reader the agent gives the observer (from the pins alone) sees the same counter.
    let stats = ztrust_agent::datapath::loader::Stats::open(&lab.topo.pin_dir).expect("stats from the pins");
    assert_eq!(stats.get(stat::EVENTS_OVER_BUDGET), Some(over_budget(&lab)));
    assert_eq!(
        drops(&events, lab.ifindex[C], reason::SPOOFED_SOURCE).count(),
        1,
        "c's drop was crowded out"
    );
    println!(
        "5,000 distinct denied flows in {took:?}: {at_b} events at b, 1 at c; {} over budget",
        5000 - at_b
    );
}
