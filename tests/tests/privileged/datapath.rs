//! The real programs in the kernel, real packets through veth pairs: passes, drops, conntrack replies,
//! established connections surviving a narrowing policy, fail-closed unknown endpoints, counters and
//! ring-buffer events.

use crate::common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::common::model;
use crate::common::{Topology, enter_netns, require_root};
use ztrust_agent::datapath::loader::Datapath;
use ztrust_agent::datapath::sync::{KernelMaps, Syncer};
use ztrust_agent::model::{Cluster, NetworkPolicy, ObjectRef, Protocol};
use ztrust_agent::policy::Engine;
use ztrust_common::{FlowEvent, dir, reason, verdict};

fn cluster(topo: &Topology, policies: Vec<NetworkPolicy>) -> Cluster {
    let pods = topo
        .pods
        .iter()
        .zip(["a", "b", "c"])
        .map(|(p, name)| model::pod(name, vec![p.ip]));
    model::cluster(pods, policies)
}

/// Ingress to `app` from `from_app` on TCP `port` (and nothing else).
fn allow_ingress(name: &str, app: &str, from_app: &str, port: u16) -> NetworkPolicy {
    model::policy(
        name,
        app,
        Some(vec![model::rule(from_app, Protocol::Tcp, port)]),
        None,
    )
}

fn deny_all_ingress(name: &str, app: &str) -> NetworkPolicy {
    model::policy(name, app, Some(vec![]), None)
}

struct Enforcer {
    dp: Datapath,
    syncer: Syncer,
    engine: Engine,
    bindings: BTreeMap<ObjectRef, u32>,
}

impl Enforcer {
    /// Loads the programs with the topology's pin dir and attaches them to every pod's host interface.
    /// Runs on the calling thread, which must be inside the node namespace.
    fn new(topo: &Topology) -> Self {
        let mut dp = Datapath::load(&topo.pin_dir).expect("load datapath");
        let mut bindings = BTreeMap::new();
        for (i, p) in topo.pods.iter().enumerate() {
            let index = nix::net::if_::if_nametoindex(p.host_if.as_str()).expect("ifindex");
            dp.attach(&p.host_if, index).expect("attach");
            bindings.insert(ObjectRef::new("x", ["a", "b", "c"][i]), index);
        }
        dp.maps
            .config
            .set(
                0,
                ztrust_common::Config {
                    log_allowed: 1,
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        Enforcer {
            dp,
            syncer: Syncer::new(),
            engine: Engine::new(),
            bindings,
        }
    }

    fn apply(&mut self, c: &Cluster) {
        let desired = self.engine.compile(c);
        self.syncer
            .sync(&mut KernelMaps(&mut self.dp.maps), &desired, &self.bindings)
            .expect("sync");
    }

    fn counter(&self, host_if_index: u32, direction: u8, v: u8, r: u8) -> u64 {
        common::counter(&self.dp, host_if_index, direction, v, r)
    }

    fn events(&mut self) -> Vec<FlowEvent> {
        common::events(&mut self.dp)
    }
}

/// A TCP connection from pod `from` to `to`:`port` (the topology's line echo) that exchanges one line,
/// then waits until resumed to exchange another.
struct PausedConnection {
    done: std::sync::mpsc::Receiver<bool>,
    go: std::sync::mpsc::Sender<()>,
    client: std::thread::JoinHandle<()>,
}

impl PausedConnection {
    fn open(topo: &Topology, from: usize, to: usize, port: u16, read_timeout: Duration) -> Self {
        let dst = SocketAddr::new(topo.pods[to].ip, port);
        let (tx, done) = std::sync::mpsc::channel::<bool>();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let netns = topo.pods[from].netns.clone();
        let client = std::thread::spawn(move || {
            enter_netns(&netns);
            let s = TcpStream::connect_timeout(&dst, Duration::from_millis(500)).expect("connect");
            s.set_read_timeout(Some(read_timeout)).unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            writeln!(w, "one").unwrap();
            r.read_line(&mut line).unwrap();
            tx.send(line == "one\n").unwrap();
            go_rx.recv().unwrap();
            line.clear();
            let ok = writeln!(w, "two").is_ok() && r.read_line(&mut line).is_ok() && line == "two\n";
            tx.send(ok).unwrap();
        });
        PausedConnection { done, go, client }
    }

    /// Did the first line come back?
    fn first(&self) -> bool {
        self.done.recv_timeout(Duration::from_secs(3)).unwrap()
    }

    /// Sends the second line: did it come back?
    fn resume(self) -> bool {
        self.go.send(()).unwrap();
        let ok = self.done.recv_timeout(Duration::from_secs(4)).unwrap();
        self.client.join().unwrap();
        ok
    }
}

#[test]
fn enforcement_conntrack_counters_and_events() {
    require_root();
    let mut topo = Topology::new("ztdp", 201, 3);
    for i in 0..3 {
        topo.serve(i, 80);
        topo.serve(i, 81);
    }
    let node = topo.node.clone();
    // The datapath is loaded on a thread inside the node namespace; probes run on pod threads.
    enter_netns(&node);
    let mut enf = Enforcer::new(&topo);
    let (a, b, c) = (0, 1, 2);
    let ifindexes: Vec<u32> = ["a", "b", "c"]
        .iter()
        .map(|n| enf.bindings[&ObjectRef::new("x", *n)])
        .collect();
    let idx = |i: usize| ifindexes[i];

    // Attached but no endpoint written yet: fail closed.
    assert!(
        !topo.tcp(a, b, 80),
        "an interface with no endpoint entry must drop"
    );
    assert!(enf.counter(idx(a), dir::EGRESS, verdict::DROPPED, reason::UNKNOWN_ENDPOINT) > 0);

    // No policies: everything reaches everything.
    enf.apply(&cluster(&topo, vec![]));
    assert!(topo.tcp(a, b, 80), "a -> b:80 with no policy");
    assert!(topo.tcp(c, b, 81), "c -> b:81 with no policy");
    assert!(topo.udp(a, b, 80), "a -> b:80/UDP with no policy");
    assert!(topo.tcp(b, a, 80), "b -> a:80 with no policy");

    // b accepts only a on TCP 80.
    enf.apply(&cluster(&topo, vec![allow_ingress("b-from-a", "b", "a", 80)]));
    assert!(topo.tcp(a, b, 80), "a -> b:80 is allowed");
    assert!(!topo.tcp(c, b, 80), "c -> b:80 is denied");
    assert!(!topo.tcp(a, b, 81), "a -> b:81 is denied (port)");
    assert!(!topo.udp(a, b, 80), "a -> b:80/UDP is denied (protocol)");
    assert!(topo.tcp(b, a, 80), "egress of b is not isolated");
    assert!(enf.counter(idx(b), dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED) > 0);
    assert!(
        enf.counter(
            idx(b),
            dir::INGRESS,
            verdict::FORWARDED,
            reason::ALLOWED_BY_POLICY
        ) > 0
    );

    // Drop events name the endpoint, the direction and the flow.
    let events = enf.events();
    let c_ip = topo.pods[c].ip;
    let drop = events
        .iter()
        .find(|e| {
            e.verdict == verdict::DROPPED
                && e.reason == reason::POLICY_DENIED
                && e.dport == 80
                && e.ifindex == idx(b)
        })
        .unwrap_or_else(|| panic!("no drop event for c -> b:80 among {} events", events.len()));
    assert_eq!(drop.direction, dir::INGRESS);
    let src = std::net::Ipv6Addr::from(drop.saddr)
        .to_ipv4_mapped()
        .map(std::net::IpAddr::V4);
    assert_eq!(src, Some(c_ip));
    assert!(drop.rule_id == 0 && drop.remote_identity >= ztrust_common::identity::FIRST_DYNAMIC);
    let allowed = events
        .iter()
        .find(|e| e.verdict == verdict::FORWARDED && e.reason == reason::ALLOWED_BY_POLICY);
    assert!(
        allowed.is_some_and(|e| e.rule_id > 0),
        "allowed new connections carry the rule that allowed them"
    );

    // Replies pass by conntrack even where the other side is fully isolated: a's ingress denies all,
    // yet a -> b:80 still works (the reply from b is not a new connection into a).
    enf.apply(&cluster(
        &topo,
        vec![
            allow_ingress("b-from-a", "b", "a", 80),
            deny_all_ingress("a-deny", "a"),
        ],
    ));
    assert!(
        topo.tcp(a, b, 80),
        "replies of an allowed connection pass an isolated endpoint"
    );
    assert!(!topo.tcp(b, a, 80), "but new connections into a are denied");
    assert!(enf.counter(idx(a), dir::INGRESS, verdict::FORWARDED, reason::REPLY) > 0);

    // A policy that denies new connections does not cut an established one.
    let conn = PausedConnection::open(&topo, a, b, 80, Duration::from_secs(2));
    assert!(conn.first(), "established before the change");
    enf.apply(&cluster(
        &topo,
        vec![deny_all_ingress("b-deny", "b"), deny_all_ingress("a-deny", "a")],
    ));
    assert!(!topo.tcp(a, b, 80), "new connections to b are now denied");
    assert!(conn.resume(), "the established connection survives");
    assert!(enf.counter(idx(b), dir::INGRESS, verdict::FORWARDED, reason::ESTABLISHED) > 0);

    // Removing the policies opens everything again.
    enf.apply(&cluster(&topo, vec![]));
    assert!(topo.tcp(c, b, 80), "c -> b:80 once the policies are gone");
    assert!(topo.tcp(b, a, 80), "b -> a:80 once the policies are gone");
}

fn peer_judged(dp: &Datapath) -> u64 {
    dp.maps
        .stats
        .get(&ztrust_common::stat::PEER_JUDGED, 0)
        .map(|v| v.iter().sum())
        .unwrap_or(0)
}

/// A TCP connection between two pods of the node that both admit it is judged once: after the SYN, the
/// receiving pod's interface passes the packets on the sender's peer mark. Counters are as if each
/// interface had judged; a receiver whose endpoint is gone is not vouched for (it fails closed).
#[test]
fn same_node_tcp_is_judged_once() {
    require_root();
    let mut topo = Topology::new("ztpj", 211, 2);
    topo.serve(1, 80);
    enter_netns(&topo.node);
    let mut enf = Enforcer::new(&topo);
    let (a, b) = (0, 1);
    let (ia, ib) = (
        enf.bindings[&ObjectRef::new("x", "a")],
        enf.bindings[&ObjectRef::new("x", "b")],
    );
    enf.apply(&cluster(&topo, vec![allow_ingress("b-from-a", "b", "a", 80)]));

    assert_eq!(peer_judged(&enf.dp), 0);
    for _ in 0..3 {
        assert!(topo.tcp(a, b, 80), "a -> b:80 is allowed");
    }
    let judged = peer_judged(&enf.dp);
    // Per connection at least the handshake's ACK, the line, its echo and the closing segments.
    assert!(judged >= 3 * 4, "packets passed on the peer mark: {judged}");
    // Each packet is counted once for each end, as each end's own hook would count it.
    let fwd = |i, d, r| enf.counter(i, d, verdict::FORWARDED, r);
    assert_eq!(
        fwd(ia, dir::EGRESS, reason::ESTABLISHED),
        fwd(ib, dir::INGRESS, reason::ESTABLISHED)
    );
    assert_eq!(
        fwd(ib, dir::EGRESS, reason::REPLY),
        fwd(ia, dir::INGRESS, reason::REPLY)
    );
    assert_eq!(
        fwd(ib, dir::INGRESS, reason::ALLOWED_BY_POLICY),
        3,
        "every SYN is judged at b itself"
    );
    assert!(fwd(ib, dir::INGRESS, reason::ESTABLISHED) >= 6);
    // At both ends, in the endpoints' slots: none of them in the hash.
    let ends = [
        (ia, dir::EGRESS, reason::ESTABLISHED),
        (ib, dir::INGRESS, reason::ESTABLISHED),
        (ib, dir::EGRESS, reason::REPLY),
        (ia, dir::INGRESS, reason::REPLY),
    ];
    for (i, d, r) in ends {
        assert_eq!(
            common::counter_parts(&enf.dp, i, d, verdict::FORWARDED, r).0,
            0,
            "ifindex {i} direction {d} reason {r}"
        );
    }
    // `status`, reading the pins, adds them up the same way.
    let st = ztrust_agent::status::read(enf.dp.pin_dir()).expect("status");
    for (i, d, r) in ends {
        let row = st.counters.iter().find(|c| {
            c.ifindex == i
                && c.direction == ztrust_agent::flows::Direction::from_code(d).name()
                && c.verdict == "forwarded"
                && c.reason == ztrust_agent::flows::Reason::from_code(r).name()
        });
        assert_eq!(
            row.map(|c| c.packets),
            Some(fwd(i, d, r)),
            "status row of ifindex {i} direction {d} reason {r}"
        );
    }

    // The mark is not a way around b's policy: a new connection to a port b does not allow is judged
    // (and denied) at b.
    assert!(!topo.tcp(a, b, 81), "a -> b:81 is denied at b");

    // An open connection, then b's endpoint disappears from the map (its pod is going): a's interface
    // no longer vouches for b, and b's interface, which has no endpoint, drops.
    let conn = PausedConnection::open(&topo, a, b, 80, Duration::from_millis(800));
    assert!(conn.first(), "connected");
    let judged = peer_judged(&enf.dp);
    enf.dp.maps.endpoints.remove(&ib).unwrap();
    assert!(!conn.resume(), "nothing reaches an interface without an endpoint");
    assert!(enf.counter(ib, dir::INGRESS, verdict::DROPPED, reason::UNKNOWN_ENDPOINT) > 0);
    assert_eq!(
        peer_judged(&enf.dp),
        judged,
        "no packet passed on the mark after b's endpoint went"
    );
}
