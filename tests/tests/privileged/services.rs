//! NetworkPolicy after Service translation: a pod's connection to a Service gets the verdict of the
//! backends it reaches. The pod's egress hook runs before the node's DNAT, so it judges by the Service's
//! backends (their identities and target ports), not by the ClusterIP.
//!
//! The same three pods and policy as the adversarial suites (`common/attack.rs`): b's egress admits a on
//! TCP 9000 only; a and c are not isolated.

use crate::common;

use std::net::{IpAddr, SocketAddr};

use crate::common::attack::{A, B, C, ETH_P_IP, Lab, cluster, drops, ipv4, tcp};
use crate::common::{sh, tcp_echo};
use ztrust_agent::model::{Cluster, EndpointSlice, Protocol, Service, ServicePort, SliceEndpoint, SlicePort};
use ztrust_common::{dir, event_flags, names, proto, reason, verdict};

const RANGE: &str = "10.96.0.0/16";

/// A ClusterIP Service `name` at `vip`, port `port` → `target` on `backends` (ready), and its slice.
fn add_service(
    c: &mut Cluster,
    name: &str,
    vip: impl Into<IpAddr>,
    port: u16,
    target: u16,
    backends: &[IpAddr],
) {
    let svc = Service {
        namespace: "x".into(),
        name: name.into(),
        cluster_ips: vec![vip.into()],
        ports: vec![ServicePort {
            name: Some("p".into()),
            protocol: Protocol::Tcp,
            port,
            node_port: None,
        }],
        ..Default::default()
    };
    c.services.insert(svc.object_ref(), svc);
    let slice = EndpointSlice {
        namespace: "x".into(),
        name: format!("{name}-1"),
        service: name.into(),
        ports: vec![SlicePort {
            name: Some("p".into()),
            protocol: Protocol::Tcp,
            port: target,
        }],
        endpoints: backends
            .iter()
            .map(|ip| SliceEndpoint {
                addresses: vec![*ip],
                ready: true,
                serving: true,
                terminating: false,
            })
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
const REASONS: [u8; 4] = [
    reason::ALLOWED_BY_POLICY,
    reason::POLICY_DENIED,
    reason::SERVICE_BACKENDS_DIFFER,
    reason::UNKNOWN_SERVICE,
];

/// b's egress counters of [`REASONS`] (forwarded and dropped together).
fn counts(lab: &Lab) -> Vec<u64> {
    REASONS
        .iter()
        .map(|r| {
            [verdict::FORWARDED, verdict::DROPPED]
                .iter()
                .map(|v| common::counter(&lab.dp, lab.ifindex[B], dir::EGRESS, *v, *r))
                .sum()
        })
        .collect()
}

/// b's SYN to `vip`:`port` through its real interface's program (`BPF_PROG_TEST_RUN`): the verdict and
/// the reason it was counted with (0: none of [`REASONS`]).
fn judged(lab: &Lab, vip: [u8; 4], port: u16, sport: u16) -> (u32, u8) {
    let frame = lab.frame_from(
        B,
        ETH_P_IP,
        &ipv4(lab.ip(B), vip, proto::TCP, tcp(sport, port, 0x02, b"")),
    );
    judged_frame(lab, &frame)
}

/// b's `frame` through its real interface's program: the verdict and the reason it was counted with
/// (0: none of [`REASONS`]).
fn judged_frame(lab: &Lab, frame: &[u8]) -> (u32, u8) {
    let before = counts(lab);
    let got = common::test_run(&lab.dp, names::PROG_FROM_POD, lab.ifindex[B], frame);
    let after = counts(lab);
    let counted = REASONS
        .iter()
        .zip(before.iter().zip(&after))
        .find(|(_, (x, y))| x != y)
        .map_or(0, |(r, _)| *r);
    (got, counted)
}

/// The node's local routes as the agent reads them (from the node's namespace), mirrored into the
/// lab's map through `mirror`; the routes.
fn mirror_node_routes(
    lab: &mut Lab,
    mirror: &mut ztrust_agent::datapath::node_local::NodeLocal,
) -> std::collections::BTreeMap<ipnet::IpNet, bool> {
    let node = lab.topo.node.clone();
    let routes = std::thread::spawn(move || {
        common::enter_netns(&node);
        ztrust_agent::datapath::node_local::local_routes().expect("the node's local routes")
    })
    .join()
    .unwrap();
    mirror.sync(&mut lab.dp.maps.node_local, &routes).unwrap();
    routes
}

/// Every judgment a connection to a Service can get, through the real program: to a Service whose
/// backend b may reach (allowed, by the backend's rule: b's policy names a, not the ClusterIP), whose
/// backend it may not (denied), whose backends differ (not guessed), without backends, and to an address
/// of the Service range that is no Service (unknown). A ClusterIP outside the range the agent does not
/// know is judged as the address it is (b's egress does not admit it). The answer of the allowed
/// connection, which comes back from the ClusterIP after the node's reverse translation, is a reply.
#[test]
fn a_connection_to_a_service_gets_the_verdict_of_its_backends() {
    let mut lab = Lab::new("ztsva", 222);
    let c = with_services(&lab);
    lab.apply(&c);
    const OK: u32 = 0;
    const SHOT: u32 = 2;
    let cases = [
        (
            "to a's Service (b may reach a:9000)",
            TO_A,
            80,
            OK,
            reason::ALLOWED_BY_POLICY,
        ),
        (
            "to c's Service (b may not reach c)",
            TO_C,
            80,
            SHOT,
            reason::POLICY_DENIED,
        ),
        (
            "to a Service whose backends policy treats differently",
            TO_BOTH,
            80,
            SHOT,
            reason::SERVICE_BACKENDS_DIFFER,
        ),
        (
            "to a Service without backends",
            EMPTY,
            80,
            SHOT,
            reason::UNKNOWN_SERVICE,
        ),
        (
            "to a's Service on a port it does not have",
            TO_A,
            81,
            SHOT,
            reason::UNKNOWN_SERVICE,
        ),
        (
            "to an address of the range that is no Service",
            [10, 96, 7, 7],
            80,
            SHOT,
            reason::UNKNOWN_SERVICE,
        ),
        (
            "to a's pod address on the Service's port (the Service's rule does not apply)",
            lab.ip(A),
            80,
            SHOT,
            reason::POLICY_DENIED,
        ),
        (
            "to a's pod address on its own port (control)",
            lab.ip(A),
            9000,
            OK,
            reason::ALLOWED_BY_POLICY,
        ),
        (
            "to an unknown address outside the range",
            [10, 97, 0, 10],
            80,
            SHOT,
            reason::POLICY_DENIED,
        ),
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
    let mut to_b = lab.frame_from(
        B,
        ETH_P_IP,
        &ipv4(TO_A, lab.ip(B), proto::TCP, tcp(80, 46000, 0x12, b"")),
    );
    let (node_side, pod_side) = lab.macs[B];
    to_b[..6].copy_from_slice(&pod_side);
    to_b[6..12].copy_from_slice(&node_side);
    assert_eq!(
        common::test_run(&lab.dp, names::PROG_TO_POD, lab.ifindex[B], &to_b),
        OK,
        "the answer from the ClusterIP"
    );
    assert_eq!(
        common::counter_parts(
            &lab.dp,
            lab.ifindex[B],
            dir::INGRESS,
            verdict::FORWARDED,
            reason::REPLY
        )
        .1,
        1
    );
    // The denied connection's flow names the ClusterIP it went to and the backend's identity.
    let desired = ztrust_agent::policy::Engine::new().compile(&c);
    let c_identity = ztrust_agent::policy::remote_identity(&desired, lab.topo.pods[C].ip);
    let events = lab.events();
    let e = drops(&events, lab.ifindex[B], reason::POLICY_DENIED)
        .find(|e| e.sport == 46001)
        .expect("no flow event for the denied connection");
    assert_ne!(
        e.flags & event_flags::SERVICE,
        0,
        "judged by the frontend's backends"
    );
    assert_eq!(
        (e.daddr, e.dport, e.remote_identity),
        (
            ztrust_agent::datapath::keys::ip_to_mapped(IpAddr::from(TO_C)),
            80,
            c_identity
        )
    );
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
    // (mode, the commands that write the two rules, the command that removes them)
    type Mode = (&'static str, Vec<Vec<String>>, Vec<String>);
    let modes: [Mode; 2] = [
        (
            "iptables",
            [(TO_A, a), (TO_C, cc)]
                .iter()
                .map(|(vip, to)| {
                    let vip = IpAddr::from(*vip).to_string();
                    [
                        "iptables",
                        "-t",
                        "nat",
                        "-A",
                        "PREROUTING",
                        "-d",
                        &vip,
                        "-p",
                        "tcp",
                        "--dport",
                        "80",
                        "-j",
                        "DNAT",
                        "--to-destination",
                        &format!("{to}:9000"),
                    ]
                    .map(String::from)
                    .to_vec()
                })
                .collect(),
            ["iptables", "-t", "nat", "-F", "PREROUTING"]
                .map(String::from)
                .to_vec(),
        ),
        (
            "nftables",
            {
                let mut v: Vec<Vec<String>> = vec![
                    ["nft", "add", "table", "ip", "ztkp"].map(String::from).to_vec(),
                    [
                        "nft",
                        "add",
                        "chain",
                        "ip",
                        "ztkp",
                        "pre",
                        "{ type nat hook prerouting priority -100; }",
                    ]
                    .map(String::from)
                    .to_vec(),
                ];
                for (vip, to) in [(TO_A, a), (TO_C, cc)] {
                    let rule = format!("ip daddr {} tcp dport 80 dnat to {to}:9000", IpAddr::from(vip));
                    v.push(
                        ["nft", "add", "rule", "ip", "ztkp", "pre"]
                            .map(String::from)
                            .into_iter()
                            .chain(rule.split(' ').map(String::from))
                            .collect(),
                    );
                }
                v
            },
            ["nft", "delete", "table", "ip", "ztkp"]
                .map(String::from)
                .to_vec(),
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
        assert!(
            via(&lab, B, TO_A),
            "{mode}: b → a's ClusterIP (b may reach a:9000) failed"
        );
        assert!(
            !via(&lab, B, TO_C),
            "{mode}: b → c's ClusterIP (b may not reach c) connected"
        );
        assert!(
            denied(&lab) > before,
            "{mode}: the connection to c's ClusterIP was not dropped by b's policy"
        );
        assert!(
            via(&lab, A, TO_C),
            "{mode}: control: a → c's ClusterIP (a is not isolated) failed: the DNAT rule does not work"
        );
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
    assert!(
        !via(&lab, B, TO_A),
        "b → a's ClusterIP connected while the agent knew no Service"
    );
    assert!(
        unknown(&lab) > before,
        "the connection to an unknown ClusterIP was not dropped as unknown-service"
    );
}

/// A frame towards pod `to` (from the node's side of its veth) carrying `ip`.
fn towards(lab: &Lab, to: usize, ip: &[u8]) -> Vec<u8> {
    let mut f = lab.frame_from(to, ETH_P_IP, ip);
    let (node_side, pod_side) = lab.macs[to];
    f[..6].copy_from_slice(&pod_side);
    f[6..12].copy_from_slice(&node_side);
    f
}

/// kube-proxy masquerades a pod's connections to node ports and load-balancer addresses (and hairpin
/// ones): they reach the backend from the node's address, through the interface of the pod that sent
/// them. Judged as that pod (whose sources its own interface checked), not as the node and not as
/// "any node-addressed packet": b admits a on TCP 80, so a SYN from the node's address that entered
/// through a's interface is admitted at b, the same through c's interface is not, and through an
/// interface that is no pod's (the uplink) it is judged by policy as the node's address.
#[test]
fn masqueraded_connections_are_judged_as_the_pod_they_came_from() {
    let mut lab = Lab::new("ztmasq", 224);
    let node = [10, 244, 224, 1];
    let mut c = cluster(&lab.topo);
    c.node_ips = vec![IpAddr::from(node)];
    lab.apply(&c);
    let syn = |lab: &Lab, sport: u16| {
        towards(
            lab,
            B,
            &ipv4(node, lab.ip(B), proto::TCP, tcp(sport, 80, 0x02, b"")),
        )
    };
    let through = |lab: &Lab, from: u32, sport: u16| {
        common::test_run_ctx(
            &lab.dp,
            names::PROG_TO_POD,
            lab.ifindex[B],
            &syn(lab, sport),
            0,
            from,
        )
        .0
    };
    assert_eq!(
        through(&lab, lab.ifindex[A], 47000),
        0,
        "masqueraded SYN from a to b:80 (b admits a)"
    );
    assert_eq!(
        through(&lab, lab.ifindex[C], 47001),
        2,
        "masqueraded SYN from c to b:80 (b admits only a on 80)"
    );
    assert_eq!(
        through(&lab, 999, 47002),
        2,
        "a SYN with the node's address from outside"
    );
    assert_eq!(
        through(&lab, 0, 47003),
        0,
        "control: the node's own SYN (kubelet probe)"
    );
    assert_eq!(
        lab.counter(B, dir::INGRESS, verdict::FORWARDED, reason::FROM_HOST),
        1
    );

    // A masqueraded datagram flow from a to b (b admits c on UDP 7000: c's, here) keeps being judged as
    // c's after a policy revision: its re-judgment uses the interface the opening datagram entered on,
    // not that of b's reply.
    let datagram = towards(
        &lab,
        B,
        &ipv4(
            node,
            lab.ip(B),
            proto::UDP,
            common::attack::udp(47010, 7000, b"q"),
        ),
    );
    let run = |lab: &Lab, prog: &str, ifindex: u32, frame: &[u8], from: u32| {
        common::test_run_ctx(&lab.dp, prog, ifindex, frame, 0, from).0
    };
    assert_eq!(
        run(
            &lab,
            names::PROG_TO_POD,
            lab.ifindex[B],
            &datagram,
            lab.ifindex[C]
        ),
        0,
        "c's masqueraded datagram to b:7000"
    );
    let reply = lab.frame_from(
        B,
        ETH_P_IP,
        &ipv4(
            lab.ip(B),
            node,
            proto::UDP,
            common::attack::udp(7000, 47010, b"a"),
        ),
    );
    assert_eq!(
        run(&lab, names::PROG_FROM_POD, lab.ifindex[B], &reply, lab.ifindex[B]),
        0,
        "b's reply"
    );
    lab.dp.maps.revision.set(0, 77, 0).expect("revision");
    assert_eq!(
        run(&lab, names::PROG_FROM_POD, lab.ifindex[B], &reply, lab.ifindex[B]),
        0,
        "b's reply after a revision"
    );
    assert_eq!(
        run(
            &lab,
            names::PROG_TO_POD,
            lab.ifindex[B],
            &datagram,
            lab.ifindex[C]
        ),
        0,
        "c's next datagram after a revision"
    );
}

/// A pod whose egress no policy isolates reaches any Service, however many classes its backends make;
/// an isolated one cannot be judged for more than the datapath compares.
#[test]
fn not_isolated_egress_reaches_any_service() {
    use ztrust_common::{BackendClass, ServiceKey, ServiceValue};
    let mut lab = Lab::new("ztsvf", 225);
    let c = with_services(&lab);
    lab.apply(&c);
    let vip = [10, 96, 0, 50];
    let mut value = ServiceValue {
        classes: 5,
        ..Default::default()
    };
    for (i, slot) in value.class.iter_mut().enumerate() {
        *slot = BackendClass {
            identity: 1000 + i as u32,
            port: 9000,
            _pad: 0,
        };
    }
    let key = ServiceKey {
        addr: ztrust_agent::datapath::keys::ip_to_mapped(IpAddr::from(vip)),
        port_be: 80u16.to_be(),
        protocol: proto::TCP,
        _pad: 0,
    };
    lab.dp.maps.services.insert(key, value, 0).expect("service");
    let syn = |lab: &Lab, i: usize| {
        lab.frame_from(
            i,
            ETH_P_IP,
            &ipv4(lab.ip(i), vip, proto::TCP, tcp(47100, 80, 0x02, b"")),
        )
    };
    assert_eq!(
        common::test_run(&lab.dp, names::PROG_FROM_POD, lab.ifindex[C], &syn(&lab, C)),
        0,
        "c (not isolated) to a five-class Service"
    );
    assert_eq!(
        lab.counter(C, dir::EGRESS, verdict::FORWARDED, reason::NOT_ISOLATED),
        1
    );
    assert_eq!(
        common::test_run(&lab.dp, names::PROG_FROM_POD, lab.ifindex[B], &syn(&lab, B)),
        2,
        "b (isolated) to a five-class Service"
    );
    assert_eq!(
        lab.counter(B, dir::EGRESS, verdict::DROPPED, reason::SERVICE_BACKENDS_DIFFER),
        1
    );
}

/// A datagram flow to a Service keeps its admission only while its backends would still be admitted:
/// when the Service's backends change to a pod b may not reach, the flow's next datagram is judged
/// again (the sync bumps the policy revision) and dropped. b's egress admits a on UDP 53 here.
#[test]
fn a_datagram_flow_to_a_service_is_judged_again_when_its_backends_change() {
    use ztrust_agent::model::{LabelSelector, Peer, PortRef, PortSpec, Rule};
    let mut lab = Lab::new("ztsvu", 226);
    let mut c = with_services(&lab);
    let b_policy = c.policies.values_mut().next().expect("b's policy");
    b_policy.egress.push(Rule {
        peers: vec![Peer::Pods {
            namespace_selector: None,
            pod_selector: Some(LabelSelector {
                match_labels: [("app".to_owned(), "a".to_owned())].into(),
                ..Default::default()
            }),
        }],
        ports: vec![PortSpec {
            protocol: Protocol::Udp,
            port: Some(PortRef::Number(53)),
            end_port: None,
        }],
    });
    let dns = [10, 96, 0, 14];
    let udp_service = |c: &mut Cluster, backend: IpAddr| {
        add_service(c, "dns", dns, 53, 53, &[backend]);
        let r = ztrust_agent::model::ObjectRef::new("x", "dns");
        c.services.get_mut(&r).unwrap().ports[0].protocol = Protocol::Udp;
        c.endpoint_slices
            .get_mut(&ztrust_agent::model::ObjectRef::new("x", "dns-1"))
            .unwrap()
            .ports[0]
            .protocol = Protocol::Udp;
    };
    udp_service(&mut c, lab.topo.pods[A].ip);
    lab.apply(&c);
    let datagram = lab.frame_from(
        B,
        ETH_P_IP,
        &ipv4(lab.ip(B), dns, proto::UDP, common::attack::udp(47200, 53, b"q")),
    );
    let send = |lab: &Lab| common::test_run(&lab.dp, names::PROG_FROM_POD, lab.ifindex[B], &datagram);
    assert_eq!(send(&lab), 0, "b's query to the DNS Service (backend a)");
    assert_eq!(send(&lab), 0, "b's second query on the flow");
    assert_eq!(
        lab.counter(B, dir::EGRESS, verdict::FORWARDED, reason::ESTABLISHED),
        1
    );
    // The Service now translates to c, which b may not reach.
    udp_service(&mut c, lab.topo.pods[C].ip);
    lab.apply(&c);
    assert_eq!(
        send(&lab),
        2,
        "b's next query on the flow, the Service's backend now c"
    );
}

/// Node ports at any local address (`Config::node_ports` = `ANY_LOCAL`, frontends under `0.0.0.0`,
/// written by the sync for `Cluster::node_ports_any_local`; the node's local routing table mirrored by
/// the agent's `node_local`): b's SYN to an address of the node at a node port gets the verdict of
/// that Service's backends, and so does one inside a local range (an address range on the loopback);
/// the same port at an address the node forwards to (a's) is judged as that address, and so is the
/// local range's broadcast address (a broadcast route, longer than the local one: kube-proxy does not
/// translate it); an address the node got after the mirror was read is `unknown-service` until the next
/// mirror; the unspecified address itself is no frontend; and with node ports only at listed addresses
/// the node's address is judged as itself. to-c's node port is 9000, a port b may reach a on: a's
/// address at it passes only if it is judged as the address, not by to-c's backend.
#[test]
fn node_ports_at_any_local_address_are_judged_by_their_backends() {
    use ztrust_common::{Config, node_ports};
    let mut lab = Lab::new("ztsvn", 227);
    let mut c = with_services(&lab);
    for (name, node_port) in [("to-a", 30080), ("to-c", 9000)] {
        let r = ztrust_agent::model::ObjectRef::new("x", name);
        c.services.get_mut(&r).unwrap().ports[0].node_port = Some(node_port);
    }
    c.node_ports_any_local = true;
    lab.apply(&c);
    let node = lab.topo.node.clone();
    for addr in ["192.0.2.77/32", "198.51.100.1/24"] {
        sh(&["ip", "-n", &node, "addr", "add", addr, "dev", "lo"]);
    }
    let mut mirror = ztrust_agent::datapath::node_local::NodeLocal::default();
    let routes = mirror_node_routes(&mut lab, &mut mirror);
    let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
    assert_eq!(routes.get(&net("192.0.2.77/32")), Some(&true), "{routes:?}");
    assert_eq!(routes.get(&net("198.51.100.255/32")), Some(&false), "{routes:?}");
    let set = |lab: &mut Lab, mode: u32| {
        let config = Config {
            node_ports: mode,
            ..Default::default()
        };
        lab.dp.maps.config.set(0, config, 0).unwrap();
    };
    set(&mut lab, node_ports::ANY_LOCAL);
    let local = [192, 0, 2, 77];
    let a = lab.ip(A);
    const OK: u32 = 0;
    const SHOT: u32 = 2;
    let cases = [
        (
            "the node's address at to-a's node port (a admitted)",
            local,
            30080,
            OK,
            reason::ALLOWED_BY_POLICY,
        ),
        (
            "the node's address at to-c's node port (c denied)",
            local,
            9000,
            SHOT,
            reason::POLICY_DENIED,
        ),
        (
            "a's address at to-c's node port (forwarded: a:9000 admitted)",
            a,
            9000,
            OK,
            reason::ALLOWED_BY_POLICY,
        ),
        (
            "the unspecified address at to-a's node port",
            [0, 0, 0, 0],
            30080,
            SHOT,
            reason::POLICY_DENIED,
        ),
        (
            "an address of the local range at to-a's node port (a admitted)",
            [198, 51, 100, 9],
            30080,
            OK,
            reason::ALLOWED_BY_POLICY,
        ),
        (
            "the local range's broadcast address at to-a's node port (not translated: the address)",
            [198, 51, 100, 255],
            30080,
            SHOT,
            reason::POLICY_DENIED,
        ),
    ];
    for (i, (what, to, port, want, why)) in cases.into_iter().enumerate() {
        assert_eq!(judged(&lab, to, port, 47300 + i as u16), (want, why), "{what}");
    }
    // The same SYN to the link-layer broadcast address: flooded on a bridge, not only to the node, so
    // judged as the address.
    let mut flooded = lab.frame_from(
        B,
        ETH_P_IP,
        &ipv4(lab.ip(B), local, proto::TCP, tcp(47309, 30080, 0x02, b"")),
    );
    flooded[..6].copy_from_slice(&[0xff; 6]);
    let before = common::counter(
        &lab.dp,
        lab.ifindex[B],
        dir::EGRESS,
        verdict::DROPPED,
        reason::POLICY_DENIED,
    );
    assert_eq!(
        common::test_run(&lab.dp, names::PROG_FROM_POD, lab.ifindex[B], &flooded),
        SHOT,
        "to the node's address at to-a's node port, sent to the broadcast MAC"
    );
    assert_eq!(
        common::counter(
            &lab.dp,
            lab.ifindex[B],
            dir::EGRESS,
            verdict::DROPPED,
            reason::POLICY_DENIED
        ),
        before + 1
    );
    // The flows say which drops were judged by a node port's backends: the one at the node's address,
    // not the flooded one (judged as the address), so that the flow names the Service only there.
    let events = lab.events();
    let by_it = |sport: u16| {
        drops(&events, lab.ifindex[B], reason::POLICY_DENIED)
            .find(|e| e.sport == sport)
            .unwrap_or_else(|| panic!("no flow event for the drop from port {sport}"))
            .flags
            & event_flags::SERVICE
    };
    assert_ne!(by_it(47301), 0, "the node's address at to-c's node port");
    assert_eq!(by_it(47309), 0, "sent to the broadcast MAC");
    assert_eq!(by_it(47303), 0, "the unspecified address");
    // An address the node got after the mirror was read: the node's routing does not forward it, the
    // mirror does not know it: not known, denied — until the next mirror.
    sh(&["ip", "-n", &node, "addr", "add", "203.0.113.5/32", "dev", "lo"]);
    let later = [203, 0, 113, 5];
    assert_eq!(
        judged(&lab, later, 30080, 47311),
        (SHOT, reason::UNKNOWN_SERVICE),
        "an address newer than the mirror"
    );
    mirror_node_routes(&mut lab, &mut mirror);
    assert_eq!(
        judged(&lab, later, 30080, 47312),
        (OK, reason::ALLOWED_BY_POLICY),
        "the same address, mirrored"
    );
    set(&mut lab, node_ports::LISTED);
    assert_eq!(
        judged(&lab, local, 30080, 47310),
        (SHOT, reason::POLICY_DENIED),
        "node ports only at listed addresses: the node's address at to-a's node port"
    );
}

/// IPv6 node ports at any local address, as the IPv4 ones above: b's SYN to the node's IPv6 address at
/// a node port gets the verdict of that Service's backends; a's IPv6 address at to-c's node port (9000)
/// is judged as the address (forwarded); `::` is no frontend; a subnet-router anycast address of the
/// node (an anycast route of its local table) is judged as the address; a link-local address of one of
/// the node's interfaces (local on its own link only: not mirrored) is `unknown-service`.
#[test]
fn ipv6_node_ports_at_any_local_address_are_judged_by_their_backends() {
    use std::net::Ipv6Addr;
    use ztrust_common::{Config, node_ports};
    const ETH_P_IPV6: u16 = 0x86dd;
    let mut lab = Lab::dual_stack("ztsv6", 228);
    let mut c = cluster(&lab.topo);
    let (a6, c6) = (lab.topo.pods[A].ip6.unwrap(), lab.topo.pods[C].ip6.unwrap());
    let vip = |s: &str| s.parse::<Ipv6Addr>().unwrap();
    add_service(&mut c, "to-a", vip("fd96::a"), 80, 9000, &[a6.into()]);
    add_service(&mut c, "to-c", vip("fd96::c"), 80, 9000, &[c6.into()]);
    for (name, node_port) in [("to-a", 30080), ("to-c", 9000)] {
        let r = ztrust_agent::model::ObjectRef::new("x", name);
        c.services.get_mut(&r).unwrap().ports[0].node_port = Some(node_port);
    }
    c.service_cidrs = vec!["fd96::/112".parse().unwrap()];
    c.node_ports_any_local = true;
    lab.apply(&c);
    let node = lab.topo.node.clone();
    let a_if = lab.topo.pods[A].host_if.clone();
    sh(&[
        "ip",
        "-n",
        &node,
        "addr",
        "add",
        "2001:db8:77::1/128",
        "dev",
        "lo",
    ]);
    // On a's interface of the node (forwarding is on): its subnet-router anycast address comes along.
    sh(&[
        "ip",
        "-n",
        &node,
        "addr",
        "add",
        "2001:db8:99::1/64",
        "dev",
        &a_if,
        "nodad",
    ]);
    sh(&[
        "ip",
        "-n",
        &node,
        "addr",
        "add",
        "fe80::77/64",
        "dev",
        &a_if,
        "nodad",
    ]);
    let routes = mirror_node_routes(&mut lab, &mut Default::default());
    let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
    assert_eq!(routes.get(&net("2001:db8:77::1/128")), Some(&true), "{routes:?}");
    assert_eq!(
        routes.get(&net("2001:db8:99::/128")),
        Some(&false),
        "anycast: {routes:?}"
    );
    assert_eq!(routes.get(&net("fe80::77/128")), None, "link-local: {routes:?}");
    let config = Config {
        node_ports: node_ports::ANY_LOCAL,
        ..Default::default()
    };
    lab.dp.maps.config.set(0, config, 0).unwrap();
    let judged6 = |lab: &Lab, to: Ipv6Addr, port: u16, sport: u16| {
        let frame = lab.frame_from(
            B,
            ETH_P_IPV6,
            &common::attack::ipv6(lab.ip6(B), to.octets(), proto::TCP, tcp(sport, port, 0x02, b"")),
        );
        judged_frame(lab, &frame)
    };
    const OK: u32 = 0;
    const SHOT: u32 = 2;
    let local = vip("2001:db8:77::1");
    let cases = [
        (
            "the node's address at to-a's node port (a admitted)",
            local,
            30080,
            OK,
            reason::ALLOWED_BY_POLICY,
        ),
        (
            "the node's address at to-c's node port (c denied)",
            local,
            9000,
            SHOT,
            reason::POLICY_DENIED,
        ),
        (
            "a's address at to-c's node port (forwarded: a:9000 admitted)",
            a6,
            9000,
            OK,
            reason::ALLOWED_BY_POLICY,
        ),
        (
            "the unspecified address at to-a's node port",
            Ipv6Addr::UNSPECIFIED,
            30080,
            SHOT,
            reason::POLICY_DENIED,
        ),
        (
            "the anycast address at to-a's node port (the address)",
            vip("2001:db8:99::"),
            30080,
            SHOT,
            reason::POLICY_DENIED,
        ),
        (
            "a link-local address at to-a's node port (not known)",
            vip("fe80::77"),
            30080,
            SHOT,
            reason::UNKNOWN_SERVICE,
        ),
    ];
    for (i, (what, to, port, want, why)) in cases.into_iter().enumerate() {
        assert_eq!(judged6(&lab, to, port, 47400 + i as u16), (want, why), "{what}");
    }
}
