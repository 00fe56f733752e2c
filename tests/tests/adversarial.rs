//! An attacker inside a pod, with CAP_NET_RAW: frames crafted with `AF_PACKET` inside the pod's network
//! namespace, sent through the real veth and the real programs, and what arrives on the other side
//! observed with real sockets and captures (an `AF_PACKET` socket in the receiving pod). Every attack has
//! a positive control made by the same machinery that passes where policy allows it, so that "nothing
//! arrived" can never mean "the attack was broken".
//!
//! Pods: a (10.244.206.10) attacker, b (.11) the locked-down pod, c (.12) a third pod.
//! - b: ingress isolated, allows a on TCP 80 and c on UDP 7000; egress isolated, allows a on TCP 9000.
//! - a and c: not isolated.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{Topology, enter_netns, require_root};
use ztrust_agent::datapath::loader::{DEFAULT_PEER_MARK, Datapath};
use ztrust_agent::datapath::sync::{KernelMaps, Syncer};
use ztrust_agent::model::{Cluster, LabelSelector, Namespace, NetworkPolicy, ObjectRef, Peer, Pod, PortRef, PortSpec, Protocol, Rule};
use ztrust_agent::policy::Engine;
use ztrust_common::{FlowEvent, dir, proto, reason, verdict};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

fn labels(app: &str) -> BTreeMap<String, String> {
    [("app".to_owned(), app.to_owned())].into()
}

fn peer(app: &str) -> Peer {
    Peer::Pods { namespace_selector: None, pod_selector: Some(LabelSelector { match_labels: labels(app), ..Default::default() }) }
}

fn rule(app: &str, protocol: Protocol, port: u16) -> Rule {
    Rule { peers: vec![peer(app)], ports: vec![PortSpec { protocol, port: Some(PortRef::Number(port)), end_port: None }] }
}

fn cluster(topo: &Topology) -> Cluster {
    let mut c = Cluster::default();
    c.namespaces.insert("x".into(), Namespace { name: "x".into(), ..Default::default() });
    for (i, p) in topo.pods.iter().enumerate() {
        let name = ["a", "b", "c"][i];
        let pod = Pod { namespace: "x".into(), name: name.into(), labels: labels(name), ips: vec![p.ip], ..Default::default() };
        c.pods.insert(pod.object_ref(), pod);
    }
    let b = NetworkPolicy {
        namespace: "x".into(),
        name: "b-locked-down".into(),
        pod_selector: LabelSelector { match_labels: labels("b"), ..Default::default() },
        isolates_ingress: true,
        isolates_egress: true,
        ingress: vec![rule("a", Protocol::Tcp, 80), rule("c", Protocol::Udp, 7000)],
        egress: vec![rule("a", Protocol::Tcp, 9000)],
    };
    c.policies.insert(b.object_ref(), b);
    c
}

struct Lab {
    topo: Topology,
    dp: Datapath,
    ifindex: Vec<u32>,
    /// Per pod: (the node side's MAC, the pod side's MAC).
    macs: Vec<([u8; 6], [u8; 6])>,
}

impl Lab {
    fn new() -> Self {
        require_root();
        let topo = Topology::new("ztad", 206, 3);
        enter_netns(&topo.node);
        let mut dp = Datapath::load(&topo.pin_dir).expect("load");
        let mut bindings = BTreeMap::new();
        let mut ifindex = Vec::new();
        for (i, p) in topo.pods.iter().enumerate() {
            let index = nix::net::if_::if_nametoindex(p.host_if.as_str()).expect("ifindex");
            dp.attach(&p.host_if, index).expect("attach");
            bindings.insert(ObjectRef::new("x", ["a", "b", "c"][i]), index);
            ifindex.push(index);
        }
        dp.maps.config.set(0, ztrust_common::Config::default(), 0).unwrap();
        let desired = Engine::new().compile(&cluster(&topo));
        Syncer::new().sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings).expect("sync");
        let macs = topo.pods.iter().map(|p| (mac(&topo.node, &p.host_if), mac(&p.netns, "eth0"))).collect();
        Lab { topo, dp, ifindex, macs }
    }

    fn ip(&self, i: usize) -> [u8; 4] {
        match self.topo.pods[i].ip {
            IpAddr::V4(v4) => v4.octets(),
            IpAddr::V6(_) => unreachable!("the topology is IPv4"),
        }
    }

    /// An Ethernet frame as pod `i` would put it on its `eth0`: to the node's side of its veth.
    fn frame_from(&self, i: usize, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let (node_side, pod_side) = self.macs[i];
        let mut f = node_side.to_vec();
        f.extend_from_slice(&pod_side);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Sends `frames` from inside pod `i` with an `AF_PACKET` socket on its `eth0`.
    fn send_from_pod(&self, i: usize, frames: Vec<Vec<u8>>) {
        let netns = self.topo.pods[i].netns.clone();
        std::thread::spawn(move || {
            enter_netns(&netns);
            raw_send("eth0", &frames, 0);
        })
        .join()
        .expect("sender");
    }

    /// Runs `send`, and returns how many frames pod `i` received on `eth0` meanwhile that `matches`
    /// accepts (an `AF_PACKET` capture in the pod, up to 300 ms after `send` returns).
    fn captured(&self, i: usize, matches: impl Fn(&[u8]) -> bool + Send + 'static, send: impl FnOnce()) -> usize {
        let netns = self.topo.pods[i].netns.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let capture = std::thread::spawn(move || {
            enter_netns(&netns);
            let fd = raw_socket("eth0");
            ready_tx.send(()).unwrap();
            let mut n = 0;
            let mut buf = [0u8; 2048];
            let mut until = None;
            loop {
                if until.is_none() && stop_rx.try_recv().is_ok() {
                    until = Some(Instant::now() + Duration::from_millis(300));
                }
                if until.is_some_and(|t| Instant::now() > t) {
                    break;
                }
                // SAFETY: `buf` is writable for its length; the socket is non-blocking.
                let len = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                if len > 0 {
                    if matches(&buf[..len as usize]) {
                        n += 1;
                    }
                } else {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            // SAFETY: our own descriptor, closed once.
            unsafe { libc::close(fd) };
            n
        });
        ready_rx.recv().unwrap();
        send();
        stop_tx.send(()).unwrap();
        capture.join().expect("capture")
    }

    fn counter(&self, i: usize, direction: u8, v: u8, r: u8) -> u64 {
        common::counter(&self.dp, self.ifindex[i], direction, v, r)
    }

    fn events(&mut self) -> Vec<FlowEvent> {
        common::events(&mut self.dp)
    }

    fn conntrack_entries(&self, i: usize) -> usize {
        self.dp.maps.conntrack.keys().filter_map(Result::ok).filter(|k| k.ifindex == self.ifindex[i]).count()
    }
}

/// The MAC address of `ifname` in network namespace `netns` (from `ip -j`).
fn mac(netns: &str, ifname: &str) -> [u8; 6] {
    let out = std::process::Command::new("ip").args(["-n", netns, "-j", "link", "show", "dev", ifname]).output().expect("ip");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    let text = v[0]["address"].as_str().expect("address");
    let mut m = [0u8; 6];
    for (b, part) in m.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(part, 16).expect("hex");
    }
    m
}

/// An `AF_PACKET` raw socket bound to `ifname` of the calling thread's namespace (all protocols).
fn raw_socket(ifname: &str) -> i32 {
    let index = nix::net::if_::if_nametoindex(ifname).expect("ifindex");
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket calls with a correctly sized, zero-initialised sockaddr_ll.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all));
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = all;
        sll.sll_ifindex = index as i32;
        let rc = libc::bind(fd, (&raw const sll).cast(), size_of::<libc::sockaddr_ll>() as u32);
        assert!(rc == 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
        fd
    }
}

/// Sends each frame on `ifname` through an `AF_PACKET` socket whose packets carry `mark` (`SO_MARK`).
fn raw_send(ifname: &str, frames: &[Vec<u8>], mark: u32) {
    let fd = raw_socket(ifname);
    // SAFETY: as above; the buffers outlive the calls.
    unsafe {
        if mark != 0 {
            let rc = libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_MARK, (&raw const mark).cast(), 4);
            assert!(rc == 0, "SO_MARK: {}", std::io::Error::last_os_error());
        }
        for f in frames {
            let n = libc::send(fd, f.as_ptr().cast(), f.len(), 0);
            // A frame that an egress hook of `ifname` drops is reported to the sender as ENOBUFS.
            let e = std::io::Error::last_os_error();
            assert!(n == f.len() as isize || e.raw_os_error() == Some(libc::ENOBUFS), "send: {e}");
        }
        libc::close(fd);
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet (valid header checksum, TTL 64) carrying `l4`, whose checksum it fills in for TCP and
/// UDP so that a receiving socket takes it.
fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, mut l4: Vec<u8>) -> Vec<u8> {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&l4);
    let at = match protocol {
        proto::TCP => Some(16),
        proto::UDP => Some(6),
        _ => None,
    };
    if let Some(at) = at {
        let c = checksum(&pseudo);
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, protocol, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(&l4);
    h
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0x20, 0, 0x50, flags, 0x20, 0, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}

/// Does `frame` carry an IPv4 packet from `src` to `dst` of `protocol` with these ports?
fn is_tuple(frame: &[u8], src: [u8; 4], dst: [u8; 4], protocol: u8, sport: u16, dport: u16) -> bool {
    frame.len() >= 38
        && frame[12..14] == [0x08, 0x00]
        && frame[23] == protocol
        && frame[26..30] == src
        && frame[30..34] == dst
        && frame[34..36] == sport.to_be_bytes()
        && frame[36..38] == dport.to_be_bytes()
}

/// A UDP socket bound in pod `i` on `port`: did a datagram with `payload` arrive within 500 ms of `send`?
fn received_udp(lab: &Lab, i: usize, port: u16, payload: &'static [u8], send: impl FnOnce()) -> bool {
    let netns = lab.topo.pods[i].netns.clone();
    let ip = lab.topo.pods[i].ip;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let listener = std::thread::spawn(move || {
        enter_netns(&netns);
        let s = UdpSocket::bind(SocketAddr::new(ip, port)).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 256];
        while let Ok(n) = s.recv(&mut buf) {
            if &buf[..n] == payload {
                return true;
            }
        }
        false
    });
    ready_rx.recv().unwrap();
    send();
    listener.join().expect("listener")
}

fn has_event(events: &[FlowEvent], ifindex: u32, r: u8) -> bool {
    events.iter().any(|e| e.ifindex == ifindex && e.reason == r && e.verdict == verdict::DROPPED)
}

/// Class 1: a pod sends only from its own address. b admits c on UDP 7000; a datagram "from c" that a
/// writes never reaches b's socket, nor do its datagrams from the node's or a world address to c.
/// Controls: the same builder from a's own address reaches c (not isolated), and c's own datagram
/// reaches b.
#[test]
fn spoofed_sources_are_dropped_at_the_sender() {
    let mut lab = Lab::new();
    let (a, b, c) = (lab.ip(A), lab.ip(B), lab.ip(C));
    let before = lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::SPOOFED_SOURCE);
    let forged = lab.frame_from(A, 0x0800, &ipv4(c, b, proto::UDP, udp(41000, 7000, b"forged")));
    assert!(!received_udp(&lab, B, 7000, b"forged", || lab.send_from_pod(A, vec![forged])), "a datagram a forged as c's reached b");
    assert_eq!(lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::SPOOFED_SOURCE), before + 1);
    // A forged answer to a query c sent to b: "from b:53".
    let answer = lab.frame_from(A, 0x0800, &ipv4(b, c, proto::UDP, udp(53, 41001, b"answer")));
    assert!(!received_udp(&lab, C, 41001, b"answer", || lab.send_from_pod(A, vec![answer])), "a forged answer reached c");
    // The node's address and an address outside the cluster.
    let node = lab.frame_from(A, 0x0800, &ipv4([10, 244, 206, 1], c, proto::UDP, udp(41002, 7100, b"node")));
    assert!(!received_udp(&lab, C, 7100, b"node", || lab.send_from_pod(A, vec![node])), "a datagram from the node's address reached c");
    let world = lab.frame_from(A, 0x0800, &ipv4([198, 51, 100, 7], c, proto::UDP, udp(41003, 7101, b"world")));
    assert!(!received_udp(&lab, C, 7101, b"world", || lab.send_from_pod(A, vec![world])), "a datagram from the world reached c");
    assert_eq!(lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::SPOOFED_SOURCE), before + 4);
    // Positive control: the same builder, a's own address.
    let honest = lab.frame_from(A, 0x0800, &ipv4(a, c, proto::UDP, udp(41004, 7102, b"honest")));
    assert!(received_udp(&lab, C, 7102, b"honest", || lab.send_from_pod(A, vec![honest])), "control: a's own datagram did not reach c");
    // And c, which b admits, reaches b from its own address (so b's socket and policy work).
    let from_c = lab.frame_from(C, 0x0800, &ipv4(c, b, proto::UDP, udp(41005, 7000, b"from-c")));
    assert!(received_udp(&lab, B, 7000, b"from-c", || lab.send_from_pod(C, vec![from_c])), "control: c's datagram did not reach b");
    assert!(has_event(&lab.events(), lab.ifindex[A], reason::SPOOFED_SOURCE), "no flow event for the spoofed datagrams");
}

/// Class 2: frames the parser does not judge are dropped, also before the endpoint is known. An IP
/// packet behind two VLAN tags with VID 0, which the node would strip and forward.
#[test]
fn vlan_tagged_frames_are_dropped() {
    let mut lab = Lab::new();
    let (a, c) = (lab.ip(A), lab.ip(C));
    let inner = ipv4(a, c, proto::UDP, udp(42000, 7200, b"tagged"));
    let mut tagged = lab.frame_from(A, 0x0800, &inner);
    tagged.splice(12..12, [0x81, 0x00, 0, 0, 0x81, 0x00, 0, 0]);
    let before = lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::UNSUPPORTED_FRAME);
    assert!(!received_udp(&lab, C, 7200, b"tagged", || lab.send_from_pod(A, vec![tagged.clone()])), "a VLAN-tagged datagram reached c");
    assert_eq!(lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::UNSUPPORTED_FRAME), before + 1);
    // One tag: the kernel takes it into the skb's metadata before TC runs, so the program sees the packet
    // inside; it is still a tagged frame, not judged.
    let mut one_tag = lab.frame_from(A, 0x0800, &inner);
    one_tag.splice(12..12, [0x81, 0x00, 0, 0]);
    assert!(!received_udp(&lab, C, 7200, b"tagged", || lab.send_from_pod(A, vec![one_tag])), "a single-tagged datagram reached c");
    assert_eq!(lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::UNSUPPORTED_FRAME), before + 2);
    // Positive control: the same packet untagged (c is not isolated).
    let plain = lab.frame_from(A, 0x0800, &inner);
    assert!(received_udp(&lab, C, 7200, b"tagged", || lab.send_from_pod(A, vec![plain])), "control: the untagged datagram did not reach c");
    assert!(has_event(&lab.events(), lab.ifindex[A], reason::UNSUPPORTED_FRAME), "no flow event for the tagged frame");
    // With a's endpoint removed (the fail-closed window), IP is dropped, and tagged frames too.
    lab.dp.maps.endpoints.remove(&lab.ifindex[A]).expect("remove a's endpoint");
    assert!(!received_udp(&lab, C, 7200, b"tagged", || lab.send_from_pod(A, vec![tagged])), "a VLAN-tagged datagram passed the fail-closed window");
    assert_eq!(lab.counter(A, dir::EGRESS, verdict::DROPPED, reason::UNSUPPORTED_FRAME), before + 3);
}

/// Class 4: a TCP segment without state is judged in its own direction. Both attacks pick the ports
/// that make the reverse direction allowed; both controls are the same segments in the direction
/// policy allows.
#[test]
fn tcp_without_state_cannot_choose_its_direction() {
    let mut lab = Lab::new();
    let (a, b) = (lab.ip(A), lab.ip(B));
    // Into b, "from a's port 9000" (b may connect to a:9000): b's ingress admits a only on 80.
    let into_b = lab.frame_from(A, 0x0800, &ipv4(a, b, proto::TCP, tcp(9000, 43000, 0x18, b"data")));
    let n = lab.captured(B, move |f| is_tuple(f, a, b, proto::TCP, 9000, 43000), || lab.send_from_pod(A, vec![into_b]));
    assert_eq!(n, 0, "ACK|PSH from a:9000 reached b");
    // FIN and ACK scans of b.
    let scans: Vec<Vec<u8>> = [(0x01u8, 22u16), (0x10, 23), (0x04, 24)]
        .iter()
        .map(|(flags, port)| lab.frame_from(A, 0x0800, &ipv4(a, b, proto::TCP, tcp(43001, *port, *flags, b""))))
        .collect();
    let n = lab.captured(B, move |f| f.len() > 34 && f[26..30] == a && f[23] == proto::TCP && f[34..36] == 43001u16.to_be_bytes(), || lab.send_from_pod(A, scans));
    assert_eq!(n, 0, "FIN/ACK/RST probes reached b");
    // Out of b, "from b's port 80" (a may connect to b:80): b's egress allows only a:9000.
    let out_of_b = lab.frame_from(B, 0x0800, &ipv4(b, a, proto::TCP, tcp(80, 43002, 0x18, b"exfil")));
    let n = lab.captured(A, move |f| is_tuple(f, b, a, proto::TCP, 80, 43002), || lab.send_from_pod(B, vec![out_of_b]));
    assert_eq!(n, 0, "ACK|PSH from b:80 left b");
    assert_eq!(lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::NO_CT_ENTRY), 4);
    assert_eq!(lab.counter(B, dir::EGRESS, verdict::DROPPED, reason::NO_CT_ENTRY), 1);
    let events = lab.events();
    assert!(has_event(&events, lab.ifindex[B], reason::NO_CT_ENTRY), "no flow event for the stateless segments");
    // Controls: the same segments in the allowed direction arrive.
    let b_to_a = lab.frame_from(B, 0x0800, &ipv4(b, a, proto::TCP, tcp(43003, 9000, 0x18, b"ok")));
    let n = lab.captured(A, move |f| is_tuple(f, b, a, proto::TCP, 43003, 9000), || lab.send_from_pod(B, vec![b_to_a]));
    assert_eq!(n, 1, "control: ACK|PSH from b to a:9000 did not arrive");
    let a_to_b = lab.frame_from(A, 0x0800, &ipv4(a, b, proto::TCP, tcp(43004, 80, 0x18, b"ok")));
    let n = lab.captured(B, move |f| is_tuple(f, a, b, proto::TCP, 43004, 80), || lab.send_from_pod(A, vec![a_to_b]));
    assert_eq!(n, 1, "control: ACK|PSH from a to b:80 did not arrive");
}

/// Conntrack exhaustion: denied packets make no entries, so a denied pod cannot evict other pods'
/// state. 5,000 RSTs and 5,000 datagrams to b on ports b does not admit: b's table is unchanged, and c's
/// allowed flow to b keeps its state (its answer passes).
#[test]
fn denied_floods_make_no_conntrack_entries() {
    let lab = Lab::new();
    let (a, b, c) = (lab.ip(A), lab.ip(B), lab.ip(C));
    // c → b:7000 (admitted) makes b's entry; b's answer is a reply.
    let from_c = lab.frame_from(C, 0x0800, &ipv4(c, b, proto::UDP, udp(44000, 7000, b"q")));
    lab.send_from_pod(C, vec![from_c]);
    let entries_b = lab.conntrack_entries(B);
    assert!(entries_b >= 1, "control: c's admitted datagram made no entry at b");
    let denied = |lab: &Lab| {
        lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::NO_CT_ENTRY)
            + lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED)
    };
    let before = denied(&lab);
    let flood: Vec<Vec<u8>> = (0..5000u16)
        .flat_map(|i| {
            [
                lab.frame_from(A, 0x0800, &ipv4(a, b, proto::TCP, tcp(80, 10_000 + i, 0x04, b""))),
                lab.frame_from(A, 0x0800, &ipv4(a, b, proto::UDP, udp(20_000 + i, 30_000 + i, b"x"))),
            ]
        })
        .collect();
    let started = Instant::now();
    lab.send_from_pod(A, flood);
    let took = started.elapsed();
    let dropped = denied(&lab) - before;
    assert_eq!(dropped, 10_000, "the flood was not all judged and dropped at b");
    assert_eq!(lab.conntrack_entries(B), entries_b, "denied packets made conntrack entries at b");
    println!("10,000 denied packets in {took:?}: 0 conntrack entries made at b ({entries_b} before and after)");
    // b's answer to c still passes as a reply.
    let answer = lab.frame_from(B, 0x0800, &ipv4(b, c, proto::UDP, udp(7000, 44000, b"a")));
    assert!(received_udp(&lab, C, 44000, b"a", || lab.send_from_pod(B, vec![answer])), "b's answer to c was dropped after the flood");
    assert_eq!(lab.counter(B, dir::EGRESS, verdict::FORWARDED, reason::REPLY), 1);
}

/// Class 6: a mark set by anything else on the node opens nothing. A process of the node writes frames
/// with the peer-mark bit (`SO_MARK`) onto b's interface: a denied SYN "from a" to b:22 is still judged
/// and dropped. Control: the same marked frame to b:80, which b admits from a, arrives.
#[test]
fn a_foreign_peer_mark_opens_nothing() {
    let lab = Lab::new();
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
    let n = lab.captured(B, move |f| is_tuple(f, a, b, proto::TCP, 45000, 22), move || raw_send(&hi, &[denied], DEFAULT_PEER_MARK));
    assert_eq!(n, 0, "a marked SYN to b:22 reached b");
    assert_eq!(lab.counter(B, dir::INGRESS, verdict::DROPPED, reason::POLICY_DENIED), 1);
    let n = lab.captured(B, move |f| is_tuple(f, a, b, proto::TCP, 45000, 80), move || raw_send(&host_if, &[allowed], DEFAULT_PEER_MARK));
    assert_eq!(n, 1, "control: a marked SYN to b:80 did not arrive");
}

/// An ordinary connection still works end to end through all of this (a → b:80), and b cannot reach c.
#[test]
fn honest_traffic_still_flows() {
    let mut lab = Lab::new();
    lab.topo.serve(B, 80);
    lab.topo.serve(C, 81);
    assert!(lab.topo.tcp(A, B, 80), "a → b:80 (allowed) failed");
    assert!(!lab.topo.tcp(B, C, 81), "b → c:81 (b's egress allows only a:9000) connected");
    assert!(lab.topo.tcp(A, C, 81), "a → c:81 (not isolated) failed");
}
