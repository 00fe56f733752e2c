//! NetworkPolicy after Service translation: a pod's connection to a Service gets the verdict of the
//! backends it reaches. The pod's egress hook runs before the node's DNAT, so it judges by the Service's
//! backends (their identities and target ports), not by the ClusterIP.
//!
//! The same three pods and policy as the adversarial suites (`common/attack.rs`): b's egress admits a on
//! TCP 9000 only; a and c are not isolated.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::attack::{A, B, C, ETH_P_IP, Lab, cluster, drops, ipv4, tcp};
use common::{sh, tcp_echo};
use ztrust_agent::model::{Cluster, EndpointSlice, Protocol, Service, ServicePort, SliceEndpoint, SlicePort};
use ztrust_common::{dir, names, proto, reason, verdict};

const RANGE: &str = "10.96.0.0/16";

/// A ClusterIP Service `name` at `vip`, port `port` → `target` on `backends` (ready), and its slice.
fn add_service(c: &mut Cluster, name: &str, vip: [u8; 4], port: u16, target: u16, backends: &[IpAddr]) {
    let svc = Service {
        namespace: "x".into(),
        name: name.into(),
        cluster_ips: vec![IpAddr::from(vip)],
        ports: vec![ServicePort { name: Some("p".into()), protocol: Protocol::Tcp, port, node_port: None }],
        ..Default::default()
    };
    c.services.insert(svc.object_ref(), svc);
    let slice = EndpointSlice {
        namespace: "x".into(),
        name: format!("{name}-1"),
        service: name.into(),
        ports: vec![SlicePort { name: Some("p".into()), protocol: Protocol::Tcp, port: target }],
        endpoints: backends
            .iter()
            .map(|ip| SliceEndpoint { addresses: vec![*ip], ready: true, serving: true, terminating: false })
            .collect(),
    };
    c.endpoint_slices.insert(slice.object_ref(), slice);
}

const TO_A: [u8; 4] = [10, 96, 0, 10];
const TO_C: [u8; 4] = [10, 96, 0, 11];
const TO_BOTH: [u8; 4] = [10, 96, 0, 12];
const EMPTY: [u8; 4] = [10, 96, 0, 13];

/// The lab's cluster with four Services: to a (which b may reach on 9000), to c (which it may not), to
/// both, and one without backends; the Service range is 10.96.0.0/16.
fn with_services(lab: &Lab) -> Cluster {
    let mut c = cluster(&lab.topo);
    let (a, cc) = (lab.topo.pods[A].ip, lab.topo.pods[C].ip);
    add_service(&mut c, "to-a", TO_A, 80, 9000, &[a]);
    add_service(&mut c, "to-c", TO_C, 80, 9000, &[cc]);
    add_service(&mut c, "to-both", TO_BOTH, 80, 9000, &[a, cc]);
    add_service(&mut c, "empty", EMPTY, 80, 9000, &[]);
    c.service_cidrs = vec![RANGE.parse().unwrap()];
    c
}

/// The reasons a connection from b to a Service is counted with.
const REASONS: [u8; 4] = [reason::ALLOWED_BY_POLICY, reason::POLICY_DENIED, reason::SERVICE_BACKENDS_DIFFER, reason::UNKNOWN_SERVICE];

/// b's egress counters of [`REASONS`] (forwarded and dropped together).
fn counts(lab: &Lab) -> Vec<u64> {
    REASONS
        .iter()
        .map(|r| [verdict::FORWARDED, verdict::DROPPED].iter().map(|v| common::counter(&lab.dp, lab.ifindex[B], dir::EGRESS, *v, *r)).sum())
        .collect()
}

/// b's SYN to `vip`:`port` through its real interface's program (`BPF_PROG_TEST_RUN`): the verdict and
/// the reason it was counted with (0: none of [`REASONS`]).
fn judged(lab: &Lab, vip: [u8; 4], port: u16, sport: u16) -> (u32, u8) {
    let frame = lab.frame_from(B, ETH_P_IP, &ipv4(lab.ip(B), vip, proto::TCP, tcp(sport, port, 0x02, b"")));
    let before = counts(lab);
    let got = common::test_run(&lab.dp, names::PROG_FROM_POD, lab.ifindex[B], &frame);
    let after = counts(lab);
    let counted = REASONS.iter().zip(before.iter().zip(&after)).find(|(_, (x, y))| x != y).map_or(0, |(r, _)| *r);
    (got, counted)
}

/// Every judgment a connection to a Service can get, through the real program: to a Service whose
/// backend b may reach (allowed, by the backend's rule: b's policy names a, not the ClusterIP), whose
/// backend it may not (denied), whose backends differ (not guessed), without backends, and to an address
/// of the Service range that is no Service (unknown). A ClusterIP outside the range the agent does not
/// know is judged as the address it is (b's egress does not admit it). The answer of the allowed
/// connection, which comes back from the ClusterIP after the node's reverse translation, is a reply.
#[test]
fn a_connection_to_a_service_gets_the_verdict_of_its_backends() {
    let mut lab = Lab::new("ztsvc", 222);
    let c = with_services(&lab);
    lab.apply(&c);
    const OK: u32 = 0;
    const SHOT: u32 = 2;
    let cases = [
        ("to a's Service (b may reach a:9000)", TO_A, 80, OK, reason::ALLOWED_BY_POLICY),
        ("to c's Service (b may not reach c)", TO_C, 80, SHOT, reason::POLICY_DENIED),
        ("to a Service whose backends policy treats differently", TO_BOTH, 80, SHOT, reason::SERVICE_BACKENDS_DIFFER),
        ("to a Service without backends", EMPTY, 80, SHOT, reason::UNKNOWN_SERVICE),
        ("to a's Service on a port it does not have", TO_A, 81, SHOT, reason::UNKNOWN_SERVICE),
        ("to an address of the range that is no Service", [10, 96, 7, 7], 80, SHOT, reason::UNKNOWN_SERVICE),
        ("to a's pod address on the Service's port (the Service's rule does not apply)", lab.ip(A), 80, SHOT, reason::POLICY_DENIED),
        ("to a's pod address on its own port (control)", lab.ip(A), 9000, OK, reason::ALLOWED_BY_POLICY),
        ("to an unknown address outside the range", [10, 97, 0, 10], 80, SHOT, reason::POLICY_DENIED),
    ];
    let mut failures = Vec::new();
    for (i, (what, vip, port, want, why)) in cases.iter().enumerate() {
        let got = judged(&lab, *vip, *port, 46000 + i as u16);
        if got != (*want, *why) {
            failures.push(format!("{what}: got {got:?}, want ({want}, {why})"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The allowed connection's answer, from the ClusterIP (the node translated it back).
    // Towards the pod: from the node's side of the veth.
    let mut to_b = lab.frame_from(B, ETH_P_IP, &ipv4(TO_A, lab.ip(B), proto::TCP, tcp(80, 46000, 0x12, b"")));
    let (node_side, pod_side) = lab.macs[B];
    to_b[..6].copy_from_slice(&pod_side);
    to_b[6..12].copy_from_slice(&node_side);
    assert_eq!(common::test_run(&lab.dp, names::PROG_TO_POD, lab.ifindex[B], &to_b), OK, "the answer from the ClusterIP");
    assert_eq!(common::counter_parts(&lab.dp, lab.ifindex[B], dir::INGRESS, verdict::FORWARDED, reason::REPLY).1, 1);
    // The denied connection's flow names the ClusterIP it went to and the backend's identity.
    let desired = ztrust_agent::policy::Engine::new().compile(&c);
    let c_identity = ztrust_agent::policy::remote_identity(&desired, lab.topo.pods[C].ip);
    let events = lab.events();
    let e = drops(&events, lab.ifindex[B], reason::POLICY_DENIED).find(|e| e.sport == 46001).expect("no flow event for the denied connection");
    assert_eq!((e.daddr, e.dport, e.remote_identity), (ztrust_agent::policy::ip_to_mapped(IpAddr::from(TO_C)), 80, c_identity));
}

/// A kube-proxy-style DNAT in the node's namespace, in iptables mode and in nftables mode: b connects to
/// a's ClusterIP (a TCP echo on a:9000; allowed, as b's connection to a:9000 is) and the echo comes back
/// through the reverse translation; its connection to c's ClusterIP is dropped at b's interface, though
/// the same connection from a (not isolated) through the same rule connects — so the rule works and the
/// drop is b's policy. Without a Service the agent knows, the same ClusterIP is `unknown-service`.
#[test]
fn through_the_nodes_dnat_in_iptables_and_nftables_modes() {
    let mut lab = Lab::new("ztdnat", 223);
    let c = with_services(&lab);
    lab.apply(&c);
    lab.topo.serve(A, 9000);
    lab.topo.serve(C, 9000);
    let node = lab.topo.node.clone();
    let (a, cc) = (lab.topo.pods[A].ip, lab.topo.pods[C].ip);
    let via = |lab: &Lab, from: usize, vip: [u8; 4]| {
        let dst = SocketAddr::new(IpAddr::from(vip), 80);
        lab.topo.in_pod(from, move || tcp_echo(dst))
    };
    let modes: [(&str, Vec<Vec<String>>, Vec<String>); 2] = [
        (
            "iptables",
            [(TO_A, a), (TO_C, cc)]
                .iter()
                .map(|(vip, to)| {
                    let vip = IpAddr::from(*vip).to_string();
                    ["iptables", "-t", "nat", "-A", "PREROUTING", "-d", &vip, "-p", "tcp", "--dport", "80", "-j", "DNAT", "--to-destination", &format!("{to}:9000")]
                        .map(String::from)
                        .to_vec()
                })
                .collect(),
            ["iptables", "-t", "nat", "-F", "PREROUTING"].map(String::from).to_vec(),
        ),
        (
            "nftables",
            {
                let mut v: Vec<Vec<String>> = vec![
                    ["nft", "add", "table", "ip", "ztkp"].map(String::from).to_vec(),
                    ["nft", "add", "chain", "ip", "ztkp", "pre", "{ type nat hook prerouting priority -100; }"].map(String::from).to_vec(),
                ];
                for (vip, to) in [(TO_A, a), (TO_C, cc)] {
                    let rule = format!("ip daddr {} tcp dport 80 dnat to {to}:9000", IpAddr::from(vip));
                    v.push(["nft", "add", "rule", "ip", "ztkp", "pre"].map(String::from).into_iter().chain(rule.split(' ').map(String::from)).collect());
                }
                v
            },
            ["nft", "delete", "table", "ip", "ztkp"].map(String::from).to_vec(),
        ),
    ];
    for (mode, setup, teardown) in &modes {
        for cmd in setup {
            let mut args: Vec<&str> = vec!["ip", "netns", "exec", &node];
            args.extend(cmd.iter().map(String::as_str));
            sh(&args);
        }
        let denied = |lab: &Lab| lab.counter(B, dir::EGRESS, verdict::DROPPED, reason::POLICY_DENIED);
        let before = denied(&lab);
        assert!(via(&lab, B, TO_A), "{mode}: b → a's ClusterIP (b may reach a:9000) failed");
        assert!(!via(&lab, B, TO_C), "{mode}: b → c's ClusterIP (b may not reach c) connected");
        assert!(denied(&lab) > before, "{mode}: the connection to c's ClusterIP was not dropped by b's policy");
        assert!(via(&lab, A, TO_C), "{mode}: control: a → c's ClusterIP (a is not isolated) failed: the DNAT rule does not work");
        let mut args: Vec<&str> = vec!["ip", "netns", "exec", &node];
        args.extend(teardown.iter().map(String::as_str));
        sh(&args);
    }
    // The agent loses the Services (its view lags the node's rules): the ClusterIP is no known frontend.
    let mut without = c.clone();
    without.services.clear();
    without.endpoint_slices.clear();
    lab.apply(&without);
    for cmd in &modes[0].1 {
        let mut args: Vec<&str> = vec!["ip", "netns", "exec", &node];
        args.extend(cmd.iter().map(String::as_str));
        sh(&args);
    }
    let unknown = |lab: &Lab| lab.counter(B, dir::EGRESS, verdict::DROPPED, reason::UNKNOWN_SERVICE);
    let before = unknown(&lab);
    assert!(!via(&lab, B, TO_A), "b → a's ClusterIP connected while the agent knew no Service");
    assert!(unknown(&lab) > before, "the connection to an unknown ClusterIP was not dropped as unknown-service");
}
