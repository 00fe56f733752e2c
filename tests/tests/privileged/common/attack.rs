//! The machinery of the adversarial suites: an attacker inside a pod, with CAP_NET_RAW, writes frames
//! with `AF_PACKET` inside the pod's network namespace; they cross the real veth and the real programs,
//! and what arrives on the other side is observed with real sockets and captures (an `AF_PACKET` socket
//! in the receiving pod). One cluster for all of them:
//!
//! Pods: a attacker, b the locked-down pod, c a third pod.
//! - b: ingress isolated, allows a on TCP 80, c on UDP 7000 and a on SCTP 7100; egress isolated, allows
//!   a on TCP 9000.
//! - a and c: not isolated.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::model::{self, rule};
use super::{Topology, enter_netns, require_root};
use ztrust_agent::datapath::loader::Datapath;
use ztrust_agent::datapath::sync::{KernelMaps, Syncer};
use ztrust_agent::model::{Cluster, ObjectRef, Protocol};
use ztrust_agent::policy::Engine;
use ztrust_common::{FlowEvent, proto, verdict};

pub const A: usize = 0;
pub const B: usize = 1;
pub const C: usize = 2;
const NAMES: [&str; 3] = ["a", "b", "c"];

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;

/// IPv6 extension headers (RFC 8200 §4).
pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DEST_OPTS: u8 = 60;

/// The three pods of `topo` (with all their addresses) and b's policy.
pub fn cluster(topo: &Topology) -> Cluster {
    let pods = topo
        .pods
        .iter()
        .zip(NAMES)
        .map(|(p, name)| model::pod(name, p.ips()));
    let b = model::policy(
        "b-locked-down",
        "b",
        Some(vec![
            rule("a", Protocol::Tcp, 80),
            rule("c", Protocol::Udp, 7000),
            rule("a", Protocol::Sctp, 7100),
        ]),
        Some(vec![rule("a", Protocol::Tcp, 9000)]),
    );
    model::cluster(pods, [b])
}

/// The three pods with the programs attached and [`cluster`] enforced. The calling thread is in the
/// node's namespace.
pub struct Lab {
    pub topo: Topology,
    pub dp: Datapath,
    pub ifindex: Vec<u32>,
    /// Per pod: (the node side's MAC, the pod side's MAC).
    pub macs: Vec<([u8; 6], [u8; 6])>,
    syncer: Syncer,
}

impl Lab {
    /// IPv4 pods 10.244.`subnet`.10, .11, .12 in namespaces named after `prefix`.
    pub fn new(prefix: &str, subnet: u8) -> Self {
        require_root();
        Self::with(Topology::new(prefix, subnet, 3))
    }

    /// [`Lab::new`] with IPv6 too (see [`Topology::dual_stack`]).
    pub fn dual_stack(prefix: &str, subnet: u8) -> Self {
        require_root();
        Self::with(Topology::dual_stack(prefix, subnet, 3))
    }

    fn with(topo: Topology) -> Self {
        enter_netns(&topo.node);
        let mut dp = Datapath::load(&topo.pin_dir).expect("load");
        let mut ifindex = Vec::new();
        for p in &topo.pods {
            let index = nix::net::if_::if_nametoindex(p.host_if.as_str()).expect("ifindex");
            dp.attach(&p.host_if, index).expect("attach");
            ifindex.push(index);
        }
        dp.maps
            .config
            .set(0, ztrust_common::Config::default(), 0)
            .unwrap();
        let macs = topo
            .pods
            .iter()
            .map(|p| (mac(&topo.node, &p.host_if), mac(&p.netns, "eth0")))
            .collect();
        let c = cluster(&topo);
        let mut lab = Lab {
            topo,
            dp,
            ifindex,
            macs,
            syncer: Syncer::new(),
        };
        lab.apply(&c);
        lab
    }

    /// Enforces `cluster` (the three pods' names bound to their interfaces), as the agent would.
    pub fn apply(&mut self, cluster: &Cluster) {
        let bindings: BTreeMap<ObjectRef, u32> = NAMES
            .iter()
            .zip(&self.ifindex)
            .map(|(name, i)| (ObjectRef::new("x", *name), *i))
            .collect();
        let desired = Engine::new().compile(cluster);
        self.syncer
            .sync(&mut KernelMaps(&mut self.dp.maps), &desired, &bindings)
            .expect("sync");
    }

    pub fn ip(&self, i: usize) -> [u8; 4] {
        match self.topo.pods[i].ip {
            IpAddr::V4(v4) => v4.octets(),
            IpAddr::V6(_) => unreachable!("a pod's first address is IPv4"),
        }
    }

    pub fn ip6(&self, i: usize) -> [u8; 16] {
        self.topo.pods[i].ip6.expect("a dual-stack lab").octets()
    }

    /// Pod `i`'s IPv6 address if `v6`, else its IPv4 address.
    pub fn addr(&self, i: usize, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::from(self.ip6(i))
        } else {
            self.topo.pods[i].ip
        }
    }

    /// [`Lab::frame_from`] for an IP packet, with the ethertype of its version.
    pub fn ip_frame_from(&self, i: usize, packet: &[u8]) -> Vec<u8> {
        self.frame_from(i, if packet[0] >> 4 == 6 { ETH_P_IPV6 } else { ETH_P_IP }, packet)
    }

    /// An Ethernet frame as pod `i` would put it on its `eth0`: to the node's side of its veth.
    pub fn frame_from(&self, i: usize, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let (node_side, pod_side) = self.macs[i];
        let mut f = node_side.to_vec();
        f.extend_from_slice(&pod_side);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Sends `frames` from inside pod `i` with an `AF_PACKET` socket on its `eth0`.
    pub fn send_from_pod(&self, i: usize, frames: Vec<Vec<u8>>) {
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
    pub fn captured(
        &self,
        i: usize,
        matches: impl Fn(&[u8]) -> bool + Send + 'static,
        send: impl FnOnce(),
    ) -> usize {
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

    pub fn counter(&self, i: usize, direction: u8, v: u8, r: u8) -> u64 {
        super::counter(&self.dp, self.ifindex[i], direction, v, r)
    }

    pub fn events(&mut self) -> Vec<FlowEvent> {
        super::events(&mut self.dp)
    }

    pub fn conntrack_entries(&self, i: usize) -> usize {
        self.dp
            .maps
            .conntrack
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ifindex == self.ifindex[i])
            .count()
    }
}

/// The MAC address of `ifname` in network namespace `netns` (from `ip -j`).
pub fn mac(netns: &str, ifname: &str) -> [u8; 6] {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-j", "link", "show", "dev", ifname])
        .output()
        .expect("ip");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    let text = v[0]["address"].as_str().expect("address");
    let mut m = [0u8; 6];
    for (b, part) in m.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(part, 16).expect("hex");
    }
    m
}

/// An `AF_PACKET` raw socket bound to `ifname` of the calling thread's namespace (all protocols).
pub fn raw_socket(ifname: &str) -> i32 {
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
pub fn raw_send(ifname: &str, frames: &[Vec<u8>], mark: u32) {
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
            assert!(
                n == f.len() as isize || e.raw_os_error() == Some(libc::ENOBUFS),
                "send: {e}"
            );
        }
        libc::close(fd);
    }
}

pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `l4` of `protocol` with its checksum over `pseudo` (the pseudo-header) and itself filled in, for the
/// protocols whose checksum covers one: TCP, UDP, ICMPv6.
fn with_checksum(mut pseudo: Vec<u8>, protocol: u8, mut l4: Vec<u8>) -> Vec<u8> {
    let at = match protocol {
        proto::TCP => 16,
        proto::UDP => 6,
        proto::ICMPV6 => 2,
        _ => return l4,
    };
    pseudo.extend_from_slice(&l4);
    let c = checksum(&pseudo);
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    l4
}

/// An IPv4 packet (valid header checksum, TTL 64, don't fragment) carrying `l4`, whose checksum it fills
/// in for TCP and UDP so that a receiving socket takes it.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, l4: Vec<u8>) -> Vec<u8> {
    ipv4_packet(
        src,
        dst,
        protocol,
        0x4000,
        &[],
        &checksummed4(src, dst, protocol, l4),
    )
}

/// `l4` with its checksum over the IPv4 pseudo-header filled in (TCP, UDP).
pub fn checksummed4(src: [u8; 4], dst: [u8; 4], protocol: u8, l4: Vec<u8>) -> Vec<u8> {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    with_checksum(pseudo, protocol, l4)
}

/// An IPv4 header (TTL 64, valid checksum) with the flags and fragment offset field `frag` and
/// `options` (padded to 4-byte words), and `payload` after it as is.
pub fn ipv4_packet(
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    frag: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut options = options.to_vec();
    options.resize(options.len().div_ceil(4) * 4, 0);
    let mut h = vec![0x40 | (5 + options.len() / 4) as u8, 0];
    h.extend_from_slice(&((20 + options.len() + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, protocol, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&options);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 packet (hop limit 64) carrying `l4` of `protocol`, whose checksum it fills in (TCP, UDP and
/// ICMPv6: all mandatory over IPv6).
pub fn ipv6(src: [u8; 16], dst: [u8; 16], protocol: u8, l4: Vec<u8>) -> Vec<u8> {
    ipv6_with(64, src, dst, &[], protocol, l4)
}

/// [`ipv6`] with the hop limit given, and extension headers of the kinds `ext` (in this order: see
/// [`ext_headers`]) before the transport header.
pub fn ipv6_with(
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
    ext: &[u8],
    protocol: u8,
    l4: Vec<u8>,
) -> Vec<u8> {
    let (next, mut payload) = ext_headers(ext, protocol);
    payload.extend_from_slice(&checksummed6(src, dst, protocol, l4));
    ipv6_packet(hop_limit, src, dst, next, &payload)
}

/// `l4` with its checksum over the IPv6 pseudo-header (RFC 8200 §8.1) filled in (TCP, UDP, ICMPv6).
pub fn checksummed6(src: [u8; 16], dst: [u8; 16], protocol: u8, l4: Vec<u8>) -> Vec<u8> {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, protocol]);
    with_checksum(pseudo, protocol, l4)
}

/// The IPv6 header (hop limit given) whose next header is `next`, and `payload` after it as is.
pub fn ipv6_packet(hop_limit: u8, src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, hop_limit]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(payload);
    h
}

/// Extension headers of the `kinds` given, 8 bytes each, the last followed by `last`: (the first one's
/// kind, or `last` when there is none; the headers). Hop-by-hop and destination options carry padding
/// only; a routing header is of type 0 with no segments left (which a node passes by); a fragment
/// header is an atomic fragment's (offset 0, no more fragments).
pub fn ext_headers(kinds: &[u8], last: u8) -> (u8, Vec<u8>) {
    let mut v = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(last);
        match *kind {
            HOP_BY_HOP | DEST_OPTS => v.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
            ROUTING => v.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]),
            FRAGMENT => v.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0x56, 0x78]),
            other => panic!("no 8-byte form for extension header {other}"),
        }
    }
    (kinds.first().copied().unwrap_or(last), v)
}

/// One fragment of an IPv6 packet (hop limit 64): a fragment header (the fragmentable part's first
/// header `next`, `offset` in bytes, a multiple of 8, the more-fragments flag; identification 0x5678)
/// and `data`, the fragmentable part from `offset` on.
pub fn fragment6(src: [u8; 16], dst: [u8; 16], next: u8, offset: usize, more: bool, data: &[u8]) -> Vec<u8> {
    assert!(offset.is_multiple_of(8), "fragment offsets count 8-byte units");
    let mut payload = vec![next, 0];
    payload.extend_from_slice(&((offset as u16) | u16::from(more)).to_be_bytes());
    payload.extend_from_slice(&[0, 0, 0x56, 0x78]);
    payload.extend_from_slice(data);
    ipv6_packet(64, src, dst, FRAGMENT, &payload)
}

/// [`ipv4`] or [`ipv6`], as the addresses are.
pub fn ip(src: IpAddr, dst: IpAddr, protocol: u8, l4: Vec<u8>) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s.octets(), d.octets(), protocol, l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s.octets(), d.octets(), protocol, l4),
        _ => panic!("{src} and {dst} are of two families"),
    }
}

/// [`checksummed4`] or [`checksummed6`], as the addresses are.
pub fn checksummed(src: IpAddr, dst: IpAddr, protocol: u8, l4: Vec<u8>) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => checksummed4(s.octets(), d.octets(), protocol, l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => checksummed6(s.octets(), d.octets(), protocol, l4),
        _ => panic!("{src} and {dst} are of two families"),
    }
}

/// One fragment of a packet of `protocol` whose transport part (from `offset` on, in bytes, a multiple
/// of 8) is `data`: IPv4 with the fragment offset and more-fragments flag in its header, IPv6 with a
/// fragment header ([`fragment6`]).
pub fn fragment(src: IpAddr, dst: IpAddr, protocol: u8, offset: usize, more: bool, data: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            assert!(offset.is_multiple_of(8), "fragment offsets count 8-byte units");
            let frag = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
            ipv4_packet(s.octets(), d.octets(), protocol, frag, &[], data)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => fragment6(s.octets(), d.octets(), protocol, offset, more, data),
        _ => panic!("{src} and {dst} are of two families"),
    }
}

/// Does `frame` carry a fragment (not an atomic one) from `src`?
pub fn is_fragment_from(frame: &[u8], src: IpAddr) -> bool {
    match src {
        IpAddr::V4(s) => {
            frame.len() >= 34
                && frame[12..14] == [0x08, 0x00]
                && frame[26..30] == s.octets()
                && u16::from_be_bytes([frame[20], frame[21]]) & 0x3fff != 0
        }
        IpAddr::V6(s) => {
            frame.len() >= 62
                && frame[12..14] == [0x86, 0xdd]
                && frame[20] == FRAGMENT
                && frame[22..38] == s.octets()
                && frame[56..58] != [0, 0]
        }
    }
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

pub fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0x20, 0, 0x50, flags, 0x20, 0, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}

/// An ICMPv6 message (its checksum is filled in by [`ipv6`]).
pub fn icmp6(kind: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(body);
    m
}

/// Does `frame` carry an IPv4 packet from `src` to `dst` of `protocol` with these ports (after whatever
/// options)?
pub fn is_tuple(frame: &[u8], src: [u8; 4], dst: [u8; 4], protocol: u8, sport: u16, dport: u16) -> bool {
    let l4 = 14 + usize::from(frame.get(14).map_or(0, |v| v & 0x0f)) * 4;
    frame.len() >= 38.max(l4 + 4)
        && frame[12..14] == [0x08, 0x00]
        && frame[23] == protocol
        && frame[26..30] == src
        && frame[30..34] == dst
        && frame[l4..l4 + 2] == sport.to_be_bytes()
        && frame[l4 + 2..l4 + 4] == dport.to_be_bytes()
}

/// The transport protocol and header of the IPv6 packet in `frame`, past its hop-by-hop, routing and
/// destination options headers and a first fragment's header; `None` for anything else.
pub fn l4_of6(frame: &[u8]) -> Option<(u8, &[u8])> {
    if frame.get(12..14)? != [0x86, 0xdd] {
        return None;
    }
    let mut next = *frame.get(20)?;
    let mut off = 54;
    loop {
        match next {
            HOP_BY_HOP | ROUTING | DEST_OPTS => {
                let h = frame.get(off..off + 2)?;
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            FRAGMENT => {
                let h = frame.get(off..off + 4)?;
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return None;
                }
                next = h[0];
                off += 8;
            }
            _ => return Some((next, frame.get(off..)?)),
        }
    }
}

/// Does `frame` carry an IPv6 packet from `src` to `dst` of `protocol` with these ports (behind
/// whatever extension headers)?
pub fn is_tuple6(frame: &[u8], src: [u8; 16], dst: [u8; 16], protocol: u8, sport: u16, dport: u16) -> bool {
    frame.len() >= 54
        && frame[22..38] == src
        && frame[38..54] == dst
        && l4_of6(frame).is_some_and(|(p, l4)| {
            p == protocol
                && l4.len() >= 4
                && l4[..2] == sport.to_be_bytes()
                && l4[2..4] == dport.to_be_bytes()
        })
}

/// Does `frame` contain `needle` anywhere?
pub fn carries(frame: &[u8], needle: &[u8]) -> bool {
    frame.windows(needle.len()).any(|w| w == needle)
}

/// The solicited-node multicast address of `a` (RFC 4291 §2.7.1): ff02::1:ffXX:XXXX.
pub fn solicited(a: [u8; 16]) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..2].copy_from_slice(&[0xff, 0x02]);
    m[11..13].copy_from_slice(&[0x01, 0xff]);
    m[13..].copy_from_slice(&a[13..]);
    m
}

/// fe80::`last`.
pub fn link_local(last: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..2].copy_from_slice(&[0xfe, 0x80]);
    a[15] = last;
    a
}

/// A UDP socket bound in pod `i` on its IPv4 address and `port`: did a datagram with `payload` arrive
/// within 500 ms of `send`?
pub fn received_udp(lab: &Lab, i: usize, port: u16, payload: &'static [u8], send: impl FnOnce()) -> bool {
    received_udp_at(lab, i, SocketAddr::new(lab.topo.pods[i].ip, port), payload, send)
}

/// [`received_udp`] on pod `i`'s IPv6 address.
pub fn received_udp6(lab: &Lab, i: usize, port: u16, payload: &'static [u8], send: impl FnOnce()) -> bool {
    received_udp_at(
        lab,
        i,
        SocketAddr::new(IpAddr::from(lab.ip6(i)), port),
        payload,
        send,
    )
}

/// [`received_udp`] on `at`, an address of pod `i`.
pub fn received_udp_at(
    lab: &Lab,
    i: usize,
    at: SocketAddr,
    payload: &'static [u8],
    send: impl FnOnce(),
) -> bool {
    let netns = lab.topo.pods[i].netns.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let listener = std::thread::spawn(move || {
        enter_netns(&netns);
        let s = UdpSocket::bind(at).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
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

/// The drop events of interface `ifindex` with reason `r`.
pub fn drops(events: &[FlowEvent], ifindex: u32, r: u8) -> impl Iterator<Item = &FlowEvent> {
    events
        .iter()
        .filter(move |e| e.ifindex == ifindex && e.reason == r && e.verdict == verdict::DROPPED)
}

pub fn has_event(events: &[FlowEvent], ifindex: u32, r: u8) -> bool {
    drops(events, ifindex, r).next().is_some()
}
