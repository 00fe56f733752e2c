//! Random frames through the real programs (BPF_PROG_TEST_RUN; needs root). Never crashes, and never
//! passes what a pod must not get through.
//!
//! The endpoint is pod a, isolated both ways, whose rules let it open TCP connections to pod b on port 80
//! and send anything to 192.0.2.0/24. So a frame the program passes must be:
//! - well-formed ARP (from a: naming a, or nobody, as its sender);
//! - ICMPv6 neighbour or listener discovery as RFC 4861 / 3810 require it (hop limit, link-scope
//!   addressing; from a: sent from a's address, `::` or a link-local one);
//! - from a: an IP packet from a's own address that the reference evaluator allows (TCP to b:80,
//!   anything to 192.0.2.0/24) and that carries no packet (IP in IP, GRE, VXLAN, Geneve: a node would
//!   decapsulate it and forward the inner packet with the source it names);
//! - towards a: the reply of a connection a packet from a opened before (tracked here: the programs'
//!   conntrack learns only from what they passed), never a packet that picked its own direction.
//!
//! Anything else passed (another ethertype, VLAN tags, a forged source, a stateless TCP segment into a)
//! is a finding.
#![no_main]

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use aya::programs::{TestRun, TestRunOptions};
use libfuzzer_sys::fuzz_target;
use ztrust_agent::datapath::loader::{self, Datapath};
use ztrust_agent::datapath::sync::{KernelMaps, Syncer};
use ztrust_agent::model::{Cluster, LabelSelector, Namespace, NetworkPolicy, ObjectRef, Peer, Pod, PortRef, PortSpec, Protocol, Rule};
use ztrust_agent::policy::{Engine, reference::reference_allowed};
use ztrust_common::{names, proto};

const A4: Ipv4Addr = Ipv4Addr::new(10, 244, 250, 10);
const B4: Ipv4Addr = Ipv4Addr::new(10, 244, 250, 11);
const A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0xa);
const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0xb);

struct Fixture {
    dp: Datapath,
    ifindex: u32,
    cluster: Cluster,
    /// (protocol, a's address and port, the peer's address and port) of every IP packet passed from a.
    opened: HashSet<(u8, IpAddr, u16, IpAddr, u16)>,
}

fn netns_name() -> String {
    format!("ztfuzz{}", std::process::id())
}

extern "C" fn cleanup() {
    let _ = Command::new("ip").args(["netns", "del", &netns_name()]).status();
    let _ = loader::cleanup(std::path::Path::new(&format!("/sys/fs/bpf/{}", netns_name())));
}

fn sel(app: &str) -> LabelSelector {
    LabelSelector { match_labels: [("app".to_owned(), app.to_owned())].into(), ..Default::default() }
}

fn cluster() -> Cluster {
    let mut c = Cluster::default();
    c.namespaces.insert("x".into(), Namespace { name: "x".into(), ..Default::default() });
    for (name, ips) in [("a", [IpAddr::V4(A4), IpAddr::V6(A6)]), ("b", [IpAddr::V4(B4), IpAddr::V6(B6)])] {
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
        name: "a".into(),
        pod_selector: sel("a"),
        isolates_ingress: true,
        isolates_egress: true,
        ingress: vec![],
        egress: vec![
            Rule {
                peers: vec![Peer::Pods { namespace_selector: None, pod_selector: Some(sel("b")) }],
                ports: vec![PortSpec { protocol: Protocol::Tcp, port: Some(PortRef::Number(80)), end_port: None }],
            },
            Rule { peers: vec![Peer::IpBlock { cidr: "192.0.2.0/24".parse().unwrap(), except: vec![] }], ports: vec![] },
        ],
        audit: false,
    };
    c.policies.insert(pol.object_ref(), pol);
    c
}

fn fixture() -> &'static Mutex<Fixture> {
    static F: OnceLock<Mutex<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let ns = netns_name();
        let ok = Command::new("ip").args(["netns", "add", &ns]).status().is_ok_and(|s| s.success())
            && Command::new("ip")
                .args(["-n", &ns, "link", "add", "ztf0", "type", "veth", "peer", "name", "ztf1"])
                .status()
                .is_ok_and(|s| s.success());
        assert!(ok, "creating the fuzz network namespace (needs root)");
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(cleanup) };
        let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        // libFuzzer runs the target on this thread; the namespace is where the device lives.
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let ifindex = nix::net::if_::if_nametoindex("ztf0").unwrap();
        let mut dp = Datapath::load(std::path::Path::new(&format!("/sys/fs/bpf/{ns}"))).expect("load");
        let cluster = cluster();
        let desired = Engine::new().compile(&cluster);
        let bindings: BTreeMap<ObjectRef, u32> = [(ObjectRef::new("x", "a"), ifindex)].into();
        Syncer::new().sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings).expect("sync");
        Mutex::new(Fixture { dp, ifindex, cluster, opened: HashSet::new() })
    })
}

/// What the kernel must have seen in the frame, parsed independently of the eBPF parser.
enum Seen {
    /// Not IPv4, IPv6 or ARP: never passed.
    Other,
    /// ARP for IPv4 over Ethernet, request or reply, with its sender's protocol address.
    Arp { sender: Ipv4Addr },
    /// ICMPv6 of a neighbour or listener discovery type.
    LinkControl { src: Ipv6Addr, dst: Ipv6Addr, hop_limit: u8, icmp_type: u8 },
    Ip { src: IpAddr, dst: IpAddr, protocol: u8, sport: u16, dport: u16 },
    Unparsed,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn parse(f: &[u8]) -> Seen {
    let Some(ethertype) = be16(f, 12) else { return Seen::Unparsed };
    let ports = |off: usize, protocol: u8| match protocol {
        proto::TCP | proto::UDP | proto::SCTP => Some((be16(f, off)?, be16(f, off + 2)?)),
        _ => Some((0, 0)),
    };
    match ethertype {
        0x0800 => {
            let Some(&vihl) = f.get(14) else { return Seen::Unparsed };
            let ihl = usize::from(vihl & 0xf) * 4;
            let (Some(&protocol), Some(src), Some(dst)) = (f.get(23), f.get(26..30), f.get(30..34)) else {
                return Seen::Unparsed;
            };
            let src = IpAddr::from(<[u8; 4]>::try_from(src).unwrap());
            let dst = IpAddr::from(<[u8; 4]>::try_from(dst).unwrap());
            match ports(14 + ihl, protocol) {
                Some((sport, dport)) => Seen::Ip { src, dst, protocol, sport, dport },
                None => Seen::Unparsed,
            }
        }
        0x86DD => {
            let (Some(&next), Some(&hop_limit), Some(src), Some(dst)) = (f.get(20), f.get(21), f.get(22..38), f.get(38..54))
            else {
                return Seen::Unparsed;
            };
            let src6 = Ipv6Addr::from(<[u8; 16]>::try_from(src).unwrap());
            let dst6 = Ipv6Addr::from(<[u8; 16]>::try_from(dst).unwrap());
            let (mut next, mut off) = (next, 54);
            for _ in 0..8 {
                match next {
                    0 | 43 | 60 => {
                        let (Some(&n), Some(&len)) = (f.get(off), f.get(off + 1)) else { return Seen::Unparsed };
                        next = n;
                        off += (usize::from(len) + 1) * 8;
                    }
                    51 => {
                        let (Some(&n), Some(&len)) = (f.get(off), f.get(off + 1)) else { return Seen::Unparsed };
                        next = n;
                        off += (usize::from(len) + 2) * 4;
                    }
                    44 => {
                        let Some(&n) = f.get(off) else { return Seen::Unparsed };
                        next = n;
                        off += 8;
                    }
                    _ => break,
                }
            }
            if next == proto::ICMPV6
                && let Some(&icmp_type) = f.get(off)
                && ((130..=137).contains(&icmp_type) || icmp_type == 143)
            {
                return Seen::LinkControl { src: src6, dst: dst6, hop_limit, icmp_type };
            }
            match ports(off, next) {
                Some((sport, dport)) => Seen::Ip { src: IpAddr::V6(src6), dst: IpAddr::V6(dst6), protocol: next, sport, dport },
                None => Seen::Unparsed,
            }
        }
        0x0806 => {
            let Some(a) = f.get(14..42) else { return Seen::Unparsed };
            let op = u16::from_be_bytes([a[6], a[7]]);
            if a[..6] != [0, 1, 0x08, 0, 6, 4] || !(op == 1 || op == 2) {
                return Seen::Unparsed;
            }
            Seen::Arp { sender: Ipv4Addr::new(a[14], a[15], a[16], a[17]) }
        }
        _ => Seen::Other,
    }
}

fn link_scope_multicast(a: &Ipv6Addr) -> bool {
    a.octets()[0] == 0xff && a.octets()[1] & 0x0f == 2
}

/// May this ICMPv6 message pass as link control (RFC 4861 §6.1/§7.1, RFC 3810 §5)? From a, only from
/// a's address, `::` or a link-local one.
fn link_control_ok(towards_a: bool, src: &Ipv6Addr, dst: &Ipv6Addr, hop_limit: u8, t: u8) -> bool {
    let mld = matches!(t, 130..=132 | 143);
    let rfc = if mld {
        hop_limit == 1 && (src.is_unicast_link_local() || src.is_unspecified()) && link_scope_multicast(dst)
    } else if towards_a {
        hop_limit == 255
    } else {
        hop_limit == 255 && matches!(t, 133 | 135 | 136) && (dst.is_unicast_link_local() || link_scope_multicast(dst))
    };
    let sender = towards_a || *src == A6 || src.is_unspecified() || src.is_unicast_link_local();
    rfc && sender && !(mld && !towards_a && t == 130)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 14 || data.len() > 1500 {
        return;
    }
    let mut fx = fixture().lock().unwrap();
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&fx.ifindex.to_ne_bytes());
    for (prog, towards_a) in [(names::PROG_FROM_POD, false), (names::PROG_TO_POD, true)] {
        let mut out = vec![0u8; data.len() + 256];
        let opts = TestRunOptions { data_in: Some(data), data_out: Some(&mut out), ctx_in: Some(&ctx), ..Default::default() };
        let result = match fx.dp.program(prog).unwrap().test_run(opts) {
            Ok(r) => r,
            // The kernel refuses to build an skb from some frames (an IP ethertype without a whole IP
            // header): nothing reaches the program, so there is nothing to check.
            Err(aya::programs::ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("test run: {e:?}"),
        };
        let passed = result.return_value == 0;
        if !passed {
            continue;
        }
        match parse(data) {
            Seen::Other => panic!("{prog} passed a frame that is neither IPv4, IPv6 nor ARP: {data:02x?}"),
            Seen::Unparsed => panic!("{prog} passed a frame with cut-off or invalid headers: {data:02x?}"),
            Seen::Arp { sender } => {
                assert!(towards_a || sender == A4 || sender.is_unspecified(), "{prog} passed ARP from a naming {sender}");
            }
            Seen::LinkControl { src, dst, hop_limit, icmp_type } => {
                // What fails the RFCs' conditions is judged as ICMPv6, which a's rules (TCP only) deny.
                assert!(
                    link_control_ok(towards_a, &src, &dst, hop_limit, icmp_type),
                    "{prog} passed ICMPv6 type {icmp_type} {src} -> {dst} hop limit {hop_limit}"
                );
            }
            Seen::Ip { dst, src, protocol, sport, dport } => {
                if towards_a {
                    // a's ingress admits nothing: only replies of what a opened pass.
                    assert!(
                        fx.opened.contains(&(protocol, dst, dport, src, sport)),
                        "{prog} passed {src}:{sport} -> {dst}:{dport} proto {protocol}, which replies to nothing a sent"
                    );
                } else {
                    let own = if src.is_ipv4() { IpAddr::V4(A4) } else { IpAddr::V6(A6) };
                    assert!(src == own, "{prog} passed a packet from {src}, which is not a's address");
                    assert!(
                        reference_allowed(&fx.cluster, src, dst, protocol, dport),
                        "{prog} passed {src}:{sport} -> {dst}:{dport} proto {protocol}, which the reference denies"
                    );
                    // IP in IP (4), IPv6 (41), GRE (47), EtherIP (97), MPLS in IP (137); VXLAN, VXLAN-GPE, Geneve.
                    let tunnel = matches!(protocol, 4 | 41 | 47 | 97 | 137)
                        || (protocol == proto::UDP && matches!(dport, 4789 | 4790 | 6081 | 8472));
                    assert!(!tunnel, "{prog} passed a packet that carries a packet: proto {protocol} to {dst}:{dport}");
                    fx.opened.insert((protocol, src, sport, dst, dport));
                }
            }
        }
    }
});
