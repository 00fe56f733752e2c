//! Per-packet cost of the real programs (BPF_PROG_TEST_RUN) as the maps grow.
//!
//! For each cell (policies × pods) the maps are filled from scratch: an ipcache with one /32 per pod
//! (ten pods per identity, as label sets are shared), 100 local endpoints, and per policy the allow
//! entries of a typical rule (three peer identities on one port, plus a port range) for one local
//! endpoint. Then prepared packets of the measured endpoint run through the program:
//! - new allowed TCP SYN, new UDP datagram, new IPv6 SYN: each run a distinct source port, so each is a
//!   real new flow (conntrack miss, ipcache and policy lookups, conntrack insert); the kernel times each
//!   run, and the mean over the runs is reported;
//! - denied SYN and a packet of an established connection: one packet repeated (`repeat`), the kernel's
//!   mean per run; the median of [`REPEATED_RUNS`] such measurements (one alone is at the mercy of the
//!   shared machine: a burst of other work during one moved a cell by 30 %);
//! - a TCP connection between two endpoints of the node that both have admitted it (`--peer-mark`):
//!   `linked` is the sending interface's cost (its entry names the receiver: it also counts for the
//!   receiver and marks the packet), `at the peer` the receiving interface's (it passes the marked
//!   packet). Without the link, both interfaces pay `established`.
//!
//! A second table measures `established`, `linked` and `at the peer` again with the core's caches
//! evicted before each single run: with the maps' entries in the cache a packet costs what the first
//! table says; under a TCP stream, whose data sweeps the caches between two of its packets, each map a
//! packet reads costs a cache miss or more.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use aya::programs::{TestRun, TestRunOptions};
use serde::Serialize;
use ztrust_agent::datapath::loader::{self, Datapath};
use ztrust_common::{
    BackendClass, CtKey, EndpointInfo, IpcacheKey, IpcacheValue, PolicyKey, PolicyValue, ServiceKey,
    ServiceValue, dir, ep_flags, names, node_ports, proto,
};

use super::synth::Rng;
use super::{frame, mapped, sh, skb_ctx};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Policy counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000,10000")]
    pub policies: Vec<u32>,
    /// Pod counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000,100000")]
    pub pods: Vec<u32>,
    /// Repetitions for the repeated-packet cases.
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
    /// Distinct new flows per new-flow case.
    #[arg(long, default_value_t = 20_000)]
    pub flows: u32,
    /// Service frontend counts for the Service table (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
    pub services: Vec<u32>,
}

const CASES: [&str; 7] = [
    "syn allowed",
    "syn denied",
    "established",
    "linked",
    "at the peer",
    "udp new",
    "ipv6 syn",
];

#[derive(Serialize)]
pub struct Cell {
    policies: u32,
    pods: u32,
    policy_entries: usize,
    ns_per_packet: BTreeMap<&'static str, f64>,
    /// An established packet measured as `linked` and `at the peer` are (single runs): what those two
    /// compare with.
    established_single_runs_ns: f64,
    /// Medians of single runs with the caches evicted before each (see [`COLD_SWEEP`]): established,
    /// linked, at the peer.
    cold_ns: BTreeMap<&'static str, f64>,
}

#[derive(Serialize)]
pub struct Report {
    cells: Vec<Cell>,
    worst_ratio: BTreeMap<&'static str, f64>,
    services: Vec<ServiceCell>,
}

/// A new connection straight to a pod and to a Service frontend whose backends are that pod's class,
/// with `services` frontends in the map (the smallest policy and pod counts).
#[derive(Serialize)]
pub struct ServiceCell {
    services: u32,
    syn_to_pod_ns: f64,
    syn_to_service_ns: f64,
    /// With node ports at every local address (`run --nodeport-addresses all`): a SYN straight to the
    /// pod (an exact frontend miss costs one more lookup, of the wildcard key) and one to a node port at
    /// a local address of the node that no frontend names (the wildcard hit, then the lookup in the
    /// mirror of the node's local routes).
    any_local_syn_to_pod_ns: f64,
    any_local_syn_to_node_port_ns: f64,
}

/// The measured endpoint's IPv6 address (fd00::1); its IPv4 one is pod 0's.
const ME6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

fn pod_ip(i: u32) -> [u8; 4] {
    [10, (i >> 16) as u8, (i >> 8) as u8, i as u8]
}

fn run(dp: &Datapath, ifindex: u32, pkt: &[u8], repeat: u32) -> (u32, Duration) {
    run_prog(dp, names::PROG_FROM_POD, ifindex, (0, 0), pkt, repeat)
}

/// How many times a repeated-packet case is measured (the median is reported).
const REPEATED_RUNS: usize = 5;

/// The median over [`REPEATED_RUNS`] measurements of the kernel's mean time per run of `pkt` repeated
/// `repeat` times, and the verdict (the same every time).
fn repeated(dp: &Datapath, ifindex: u32, pkt: &[u8], repeat: u32) -> (u32, f64) {
    let mut verdicts = std::collections::BTreeSet::new();
    let mut ns = Vec::new();
    for _ in 0..REPEATED_RUNS {
        let (rv, d) = run(dp, ifindex, pkt, repeat);
        verdicts.insert(rv);
        ns.push(d.as_nanos() as f64);
    }
    assert_eq!(
        verdicts.len(),
        1,
        "one packet, repeated, got different verdicts: {verdicts:?}"
    );
    (
        verdicts.into_iter().next().unwrap_or_default(),
        super::median(&ns),
    )
}

/// `prog` on `pkt` with `skb->mark` (offset 8 of the context) and `skb->ingress_ifindex` (offset 36: the
/// interface the packet entered the node on) = `mark_from`.
fn run_prog(
    dp: &Datapath,
    prog: &str,
    ifindex: u32,
    mark_from: (u32, u32),
    pkt: &[u8],
    repeat: u32,
) -> (u32, Duration) {
    let mut ctx = skb_ctx(ifindex);
    ctx[8..12].copy_from_slice(&mark_from.0.to_ne_bytes());
    ctx[36..40].copy_from_slice(&mark_from.1.to_ne_bytes());
    let mut out = vec![0u8; pkt.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat,
        ..Default::default()
    };
    let r = dp
        .program(prog)
        .expect("program")
        .test_run(opts)
        .expect("test run");
    (r.return_value, r.duration)
}

/// Mean in-kernel time of `n` single runs of `prog` on `pkt` (which must pass), in ns.
fn single_runs(dp: &Datapath, prog: &str, ifindex: u32, mark: (u32, u32), pkt: &[u8], n: u32) -> f64 {
    let mut total = Duration::ZERO;
    for _ in 0..n {
        let (rv, d) = run_prog(dp, prog, ifindex, mark, pkt, 1);
        assert_eq!(rv, 0, "{prog} dropped a packet of an admitted connection");
        total += d;
    }
    total.as_nanos() as f64 / f64::from(n)
}

/// Bytes written before each cold run: twice this machine's per-core L2 cache (2 MiB), as a TCP stream's
/// data sweeps it between two of its packets. (Sweeping the shared L3 as well, 64 MiB, gave 2-3 us per
/// run, varying by a third from run to run: the test run's own set-up goes cold too.)
const COLD_SWEEP: usize = 4 << 20;
const COLD_RUNS: u32 = 300;

/// Median in-kernel time of `n` single runs of `prog` on `pkt` (which must pass), each after
/// [`COLD_SWEEP`] bytes were written: what a packet costs when the maps it reads are not in the core's
/// caches.
fn cold_runs(dp: &Datapath, prog: &str, ifindex: u32, mark: (u32, u32), pkt: &[u8], n: u32) -> f64 {
    let mut buf = vec![0u8; COLD_SWEEP];
    let mut v = Vec::new();
    for _ in 0..n {
        for i in (0..buf.len()).step_by(64) {
            buf[i] = buf[i].wrapping_add(1);
        }
        std::hint::black_box(&mut buf);
        let (rv, d) = run_prog(dp, prog, ifindex, mark, pkt, 1);
        assert_eq!(rv, 0, "{prog} dropped a packet of an admitted connection");
        v.push(d.as_nanos() as f64);
    }
    super::median(&v)
}

/// Mean in-kernel time of `flows` distinct new flows (source port varies), in ns.
fn new_flows(dp: &Datapath, ifindex: u32, flows: u32, make: impl Fn(u16) -> Vec<u8>) -> f64 {
    let mut total = Duration::ZERO;
    for i in 0..flows {
        let (rv, d) = run(dp, ifindex, &make(1024 + (i % 64000) as u16), 1);
        assert_eq!(rv, 0, "new allowed flow dropped");
        total += d;
    }
    total.as_nanos() as f64 / f64::from(flows)
}

fn measure(args: &Args, pin: &std::path::Path, ifindex: u32, policies: u32, pods: u32) -> Cell {
    let _ = loader::cleanup(pin);
    let mut dp = Datapath::load(pin).expect("load");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(policies) << 20 ^ u64::from(pods));
    let identities = (pods / 10).max(2);
    for i in 0..pods {
        let key = IpcacheKey {
            addr: mapped(pod_ip(i)),
        };
        dp.maps
            .ipcache
            .insert(
                128,
                &key,
                &IpcacheValue {
                    identity: 256 + i / 10,
                    _pad: 0,
                },
            )
            .expect("ipcache");
    }
    // The measured endpoint (ifindex) and 99 others.
    let endpoints: Vec<u32> = std::iter::once(ifindex)
        .chain((0..99).map(|i| 100_000 + i))
        .collect();
    for ep in &endpoints {
        // The flags the agent's sync writes for these entries: isolated for egress, and no entry for any
        // peer in either direction.
        // (The endpoints given a port range below lose `NO_WIDE_EGRESS_UDP` there.)
        let flags = ep_flags::ISOLATED_EGRESS
            | ep_flags::NO_ANY_PEER_INGRESS
            | ep_flags::NO_ANY_PEER_EGRESS
            | ep_flags::ALL_NO_WIDE;
        // The measured endpoint sends from pod 0's address (the only source it may use).
        let info = EndpointInfo {
            endpoint_id: *ep,
            identity: 256,
            flags,
            addr4: mapped(pod_ip(0)),
            addr6: ME6,
            ..Default::default()
        };
        dp.maps.endpoints.insert(*ep, info, 0).expect("endpoint");
    }
    let mut entries = 0usize;
    for p in 0..policies {
        let ep = endpoints[rng.below(endpoints.len() as u64) as usize];
        let port = 1024 + rng.below(20_000) as u16;
        for _ in 0..3 {
            let remote = 256 + rng.below(u64::from(identities)) as u32;
            let key = PolicyKey::new(ep, remote, dir::EGRESS, proto::TCP, port);
            dp.maps
                .policy
                .insert(
                    PolicyKey::PREFIX_FULL,
                    &key,
                    &PolicyValue {
                        rule_id: p + 1,
                        _pad: 0,
                    },
                )
                .expect("policy");
            entries += 1;
        }
        // A range of 32 ports: one aligned block.
        let remote = 256 + rng.below(u64::from(identities)) as u32;
        let base = (30_000 + rng.below(1000) as u16) & !31;
        let key = PolicyKey::new(ep, remote, dir::EGRESS, proto::UDP, base);
        dp.maps
            .policy
            .insert(
                PolicyKey::PREFIX_FULL - 5,
                &key,
                &PolicyValue {
                    rule_id: p + 1,
                    _pad: 0,
                },
            )
            .expect("policy");
        entries += 1;
        // Its UDP egress has a wide entry now: the programs walk the trie for it, as the agent's flags say.
        let mut info = dp.maps.endpoints.get(&ep, 0).expect("endpoint");
        if info.flags & ep_flags::NO_WIDE_EGRESS_UDP != 0 {
            info.flags &= !ep_flags::NO_WIDE_EGRESS_UDP;
            dp.maps.endpoints.insert(ep, info, 0).expect("endpoint");
        }
    }
    // What the measured packets need: the endpoint may reach pod 1's identity on TCP 8080 and UDP 53.
    let me = pod_ip(0);
    let peer = pod_ip(1);
    // Pod i has identity 256 + i / 10.
    let peer_id = 256;
    for (protocol, port) in [(proto::TCP, 8080), (proto::UDP, 53)] {
        let key = PolicyKey::new(ifindex, peer_id, dir::EGRESS, protocol, port);
        dp.maps
            .policy
            .insert(PolicyKey::PREFIX_FULL, &key, &PolicyValue { rule_id: 1, _pad: 0 })
            .expect("policy");
    }
    let (me6, peer6) = (ME6, [0xfdu8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    dp.maps
        .ipcache
        .insert(
            128,
            &IpcacheKey { addr: peer6 },
            &IpcacheValue {
                identity: peer_id,
                _pad: 0,
            },
        )
        .unwrap();
    // Events for denied packets are rate-limited per flow; keep that realistic (one per second).
    dp.maps
        .config
        .set(
            0,
            ztrust_common::Config {
                event_interval_ns: 1_000_000_000,
                ..Default::default()
            },
            0,
        )
        .unwrap();

    let mut ns = BTreeMap::new();
    ns.insert(
        CASES[0],
        new_flows(&dp, ifindex, args.flows, |sp| {
            frame(false, &me, &peer, proto::TCP, sp, 8080, 0x02)
        }),
    );
    let denied = frame(false, &me, &peer, proto::TCP, 999, 8081, 0x02);
    let (rv, d) = repeated(&dp, ifindex, &denied, args.repeat);
    assert_eq!(rv, 2, "denied SYN passed");
    ns.insert(CASES[1], d);
    let syn = frame(false, &me, &peer, proto::TCP, 998, 8080, 0x02);
    assert_eq!(run(&dp, ifindex, &syn, 1).0, 0);
    let ack = frame(false, &me, &peer, proto::TCP, 998, 8080, 0x10);
    let (rv, d) = repeated(&dp, ifindex, &ack, args.repeat);
    assert_eq!(rv, 0);
    ns.insert(CASES[2], d);
    // The same connection once the receiving endpoint (another of the node's endpoints) has admitted it
    // too, as its interface records when it admits the SYN.
    // (The receiving interface must exist for the test run: the namespace's loopback plays it.)
    let receiver = 1;
    let info = EndpointInfo {
        endpoint_id: receiver,
        identity: 256,
        flags: ep_flags::ISOLATED_INGRESS,
        ..Default::default()
    };
    dp.maps.endpoints.insert(receiver, info, 0).expect("endpoint");
    let ct_key = CtKey::new(
        ifindex,
        dir::EGRESS,
        &mapped(me),
        &mapped(peer),
        998u16.to_be(),
        8080u16.to_be(),
        proto::TCP,
    );
    let mut entry = dp.maps.conntrack.get(&ct_key, 0).expect("the connection's entry");
    entry.peer_ifindex = receiver;
    dp.maps.conntrack.insert(ct_key, entry, 0).expect("link");
    // The receiver's entry for the connection, linked to the sender's interface (which the marked packet
    // comes from): what its interface records when it admits the SYN.
    let peer_key = CtKey::new(
        receiver,
        dir::INGRESS,
        &mapped(me),
        &mapped(peer),
        998u16.to_be(),
        8080u16.to_be(),
        proto::TCP,
    );
    let peer_entry = ztrust_common::CtValue {
        origin: dir::INGRESS,
        peer_ifindex: ifindex,
        ..entry
    };
    dp.maps
        .conntrack
        .insert(peer_key, peer_entry, 0)
        .expect("the receiver's entry");
    let at_peer = (loader::DEFAULT_PEER_MARK, ifindex);
    // Each run marks (or clears the mark of) the packet, which a repeated run would see: these are
    // single runs, the mean over as many as there are new flows, and include the per-run overhead of
    // a test run (hence the established packet measured the same way, which the table prints below).
    // The same three are measured again with the caches evicted before each run, as a stream's data
    // evicts them.
    let mut cold_ns = BTreeMap::new();
    let established_single_runs_ns = {
        let mut entry = entry;
        entry.peer_ifindex = 0;
        dp.maps.conntrack.insert(ct_key, entry, 0).expect("unlink");
        let ns = single_runs(&dp, names::PROG_FROM_POD, ifindex, (0, 0), &ack, args.flows);
        cold_ns.insert(
            CASES[2],
            cold_runs(&dp, names::PROG_FROM_POD, ifindex, (0, 0), &ack, COLD_RUNS),
        );
        entry.peer_ifindex = receiver;
        dp.maps.conntrack.insert(ct_key, entry, 0).expect("link");
        ns
    };
    ns.insert(
        CASES[3],
        single_runs(&dp, names::PROG_FROM_POD, ifindex, (0, 0), &ack, args.flows),
    );
    ns.insert(
        CASES[4],
        single_runs(&dp, names::PROG_TO_POD, receiver, at_peer, &ack, args.flows),
    );
    cold_ns.insert(
        CASES[3],
        cold_runs(&dp, names::PROG_FROM_POD, ifindex, (0, 0), &ack, COLD_RUNS),
    );
    cold_ns.insert(
        CASES[4],
        cold_runs(&dp, names::PROG_TO_POD, receiver, at_peer, &ack, COLD_RUNS),
    );
    ns.insert(
        CASES[5],
        new_flows(&dp, ifindex, args.flows, |sp| {
            frame(false, &me, &peer, proto::UDP, sp, 53, 0)
        }),
    );
    ns.insert(
        CASES[6],
        new_flows(&dp, ifindex, args.flows, |sp| {
            frame(true, &me6, &peer6, proto::TCP, sp, 8080, 0x02)
        }),
    );
    drop(dp);
    let _ = loader::cleanup(pin);
    Cell {
        policies,
        pods,
        policy_entries: entries + 2,
        ns_per_packet: ns,
        established_single_runs_ns,
        cold_ns,
    }
}

/// The ClusterIP of Service `i`: 10.96.0.0/16 and up.
fn service_ip(i: u32) -> [u8; 4] {
    let n = (10 << 24 | 96 << 16) + i;
    n.to_be_bytes()
}

/// New SYNs straight to pod 1 and to a Service whose one backend class is pod 1's (target port 8080),
/// with `services` frontends in the map; each frontend has two classes, as in a rolling update.
fn measure_services(args: &Args, pin: &std::path::Path, ifindex: u32, services: u32) -> ServiceCell {
    let _ = loader::cleanup(pin);
    let mut dp = Datapath::load(pin).expect("load");
    let (me, peer, peer_id) = (pod_ip(0), pod_ip(1), 256);
    for (i, id) in [(0, 256), (1, peer_id)] {
        dp.maps
            .ipcache
            .insert(
                128,
                &IpcacheKey {
                    addr: mapped(pod_ip(i)),
                },
                &IpcacheValue {
                    identity: id,
                    _pad: 0,
                },
            )
            .expect("ipcache");
    }
    let flags = ep_flags::ISOLATED_EGRESS
        | ep_flags::NO_ANY_PEER_INGRESS
        | ep_flags::NO_ANY_PEER_EGRESS
        | ep_flags::ALL_NO_WIDE;
    let info = EndpointInfo {
        endpoint_id: ifindex,
        identity: 256,
        flags,
        addr4: mapped(me),
        addr6: ME6,
        ..Default::default()
    };
    dp.maps.endpoints.insert(ifindex, info, 0).expect("endpoint");
    let key = PolicyKey::new(ifindex, peer_id, dir::EGRESS, proto::TCP, 8080);
    dp.maps
        .policy
        .insert(PolicyKey::PREFIX_FULL, &key, &PolicyValue { rule_id: 1, _pad: 0 })
        .expect("policy");
    let class = |identity, port| BackendClass {
        identity,
        port,
        _pad: 0,
    };
    for i in 0..services {
        let mut value = ServiceValue {
            classes: 2,
            ..Default::default()
        };
        value.class[0] = class(peer_id, 8080);
        value.class[1] = class(peer_id, 8080);
        let key = ServiceKey {
            addr: mapped(service_ip(i)),
            port_be: 80u16.to_be(),
            protocol: proto::TCP,
            _pad: 0,
        };
        dp.maps.services.insert(key, value, 0).expect("service");
    }
    // A node port on every local address: the wildcard frontend 0.0.0.0:30080 (IPv4 mapped).
    let mut value = ServiceValue {
        classes: 1,
        ..Default::default()
    };
    value.class[0] = class(peer_id, 8080);
    let wildcard = ServiceKey {
        addr: mapped([0; 4]),
        port_be: NODE_PORT.to_be(),
        protocol: proto::TCP,
        _pad: 0,
    };
    dp.maps.services.insert(wildcard, value, 0).expect("service");
    let config = |dp: &mut Datapath, node_ports| {
        let c = ztrust_common::Config {
            event_interval_ns: 1_000_000_000,
            node_ports,
            ..Default::default()
        };
        dp.maps.config.set(0, c, 0).unwrap();
    };
    config(&mut dp, node_ports::LISTED);
    let vip = service_ip(services / 2);
    // Not measured: the first case run would otherwise pay for warming the code and the maps up
    // (source ports of their own, so the measured SYNs still make new entries).
    new_flows(&dp, ifindex, args.flows, |sp| {
        frame(false, &me, &peer, proto::TCP, sp + 30_000, 8080, 0x02)
    });
    let syn_to_pod_ns = new_flows(&dp, ifindex, args.flows, |sp| {
        frame(false, &me, &peer, proto::TCP, sp, 8080, 0x02)
    });
    let syn_to_service_ns = new_flows(&dp, ifindex, args.flows, |sp| {
        frame(false, &me, &vip, proto::TCP, sp, 80, 0x02)
    });
    config(&mut dp, node_ports::ANY_LOCAL);
    // The agent's mirror of the namespace's local routes (this thread is in it).
    let routes = ztrust_agent::datapath::node_local::local_routes().expect("the local routes");
    ztrust_agent::datapath::node_local::NodeLocal::default()
        .sync(&mut dp.maps.node_local, &routes)
        .expect("the local routes' mirror");
    let any_local_syn_to_pod_ns = new_flows(&dp, ifindex, args.flows, |sp| {
        frame(false, &me, &peer, proto::TCP, sp, 8080, 0x02)
    });
    // Allowed only as the backend's connection: the node's address itself is not (asserted by
    // `new_flows`: the wildcard and the mirror's answer are really taken).
    let any_local_syn_to_node_port_ns = new_flows(&dp, ifindex, args.flows, |sp| {
        frame(false, &me, &NODE_LOCAL, proto::TCP, sp, NODE_PORT, 0x02)
    });
    drop(dp);
    let _ = loader::cleanup(pin);
    ServiceCell {
        services,
        syn_to_pod_ns,
        syn_to_service_ns,
        any_local_syn_to_pod_ns,
        any_local_syn_to_node_port_ns,
    }
}

/// The node port of the wildcard frontend, and a local address of the section's namespace (on its
/// loopback) that no frontend names.
const NODE_PORT: u16 = 30080;
const NODE_LOCAL: [u8; 4] = [192, 0, 2, 1];

/// Runs the section on a thread of its own (it enters a network namespace) and prints its table.
pub fn run_section(args: &Args) -> anyhow::Result<Report> {
    let args = args.clone();
    std::thread::spawn(move || section(&args))
        .join()
        .map_err(|_| anyhow::anyhow!("datapath section panicked"))?
}

/// Removes the section's namespace and pins however it ends (a failed load or assertion included).
struct Cleanup {
    netns: String,
    pin: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.pin);
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn section(args: &Args) -> anyhow::Result<Report> {
    let netns = format!("ztbdp{}", std::process::id());
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{netns}"));
    sh(&["ip", "netns", "add", &netns]);
    let _cleanup = Cleanup {
        netns: netns.clone(),
        pin: pin.clone(),
    };
    // A device for the programs to run on: the kernel resolves the context's ifindex in this namespace.
    // (No dummy driver on every kernel; a veth pair works everywhere.)
    sh(&[
        "ip", "-n", &netns, "link", "add", "ztb0", "type", "veth", "peer", "name", "ztb1",
    ]);
    sh(&["ip", "-n", &netns, "link", "set", "ztb0", "up"]);
    sh(&["ip", "-n", &netns, "link", "set", "ztb1", "up"]);
    sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
    sh(&["ip", "-n", &netns, "addr", "add", "192.0.2.1/32", "dev", "lo"]);
    super::enter_netns(&netns);
    let ifindex = nix::net::if_::if_nametoindex("ztb0")?;

    // What the verifier went through to accept each program, against its budget: the headroom a
    // change of the datapath has before the kernel refuses to load it.
    let _ = loader::cleanup(&pin);
    let dp = Datapath::load(&pin).expect("load");
    println!("\nVerifier: instructions processed to accept each program (the kernel's limit: 1,000,000)");
    for name in ["zt_from_pod", "zt_to_pod"] {
        let n = dp
            .program(name)
            .and_then(|p| p.info().ok())
            .and_then(|i| i.verified_instruction_count());
        match n {
            Some(n) => println!("{name:>12} {n:>9} ({:.0} %)", f64::from(n) / 1e4),
            None => println!("{name:>12} (not reported by this kernel)"),
        }
    }
    drop(dp);

    let mut cells = Vec::new();
    for &policies in &args.policies {
        for &pods in &args.pods {
            eprint!("policies {policies:>6} pods {pods:>7} ... ");
            let _ = std::io::stderr().flush();
            let cell = measure(args, &pin, ifindex, policies, pods);
            eprintln!("{:.0} ns (syn allowed)", cell.ns_per_packet[CASES[0]]);
            cells.push(cell);
        }
    }
    println!("\nPer-packet cost in the kernel (ns/packet; ratio to the smallest cell in brackets)");
    print!("{:>9} {:>8} {:>8}", "policies", "pods", "entries");
    for c in CASES {
        print!(" {:>20}", c);
    }
    println!();
    let base = &cells[0].ns_per_packet;
    let mut worst: BTreeMap<&'static str, f64> = BTreeMap::new();
    for cell in &cells {
        print!("{:>9} {:>8} {:>8}", cell.policies, cell.pods, cell.policy_entries);
        for c in CASES {
            let v = cell.ns_per_packet[c];
            let ratio = v / base[c];
            let w = worst.entry(c).or_insert(0.0);
            *w = w.max(ratio);
            print!(" {:>12.1} ({:>4.2})", v, ratio);
        }
        println!();
    }
    print!("{:>27}", "worst ratio");
    for c in CASES {
        print!(" {:>20.2}", worst[c]);
    }
    let single: Vec<f64> = cells.iter().map(|c| c.established_single_runs_ns).collect();
    println!(
        "\n(linked, at the peer: single runs, with a test run's per-run overhead; an established packet measured so: {:.0}-{:.0} ns)",
        single.iter().copied().fold(f64::INFINITY, f64::min),
        single.iter().copied().fold(0.0, f64::max)
    );
    println!("(target: every ratio <= 1.2, and the established path the cheapest)");
    println!(
        "\nThe same packets with the core's caches evicted before each single run ({} MiB written; median ns):",
        COLD_SWEEP >> 20
    );
    print!("{:>9} {:>8}", "policies", "pods");
    for c in &CASES[2..5] {
        print!(" {:>12}", c);
    }
    println!();
    for cell in &cells {
        print!("{:>9} {:>8}", cell.policies, cell.pods);
        for c in &CASES[2..5] {
            print!(" {:>12.0}", cell.cold_ns[c]);
        }
        println!();
    }
    let mut services = Vec::new();
    for &n in &args.services {
        eprint!("services {n:>6} ... ");
        let cell = measure_services(args, &pin, ifindex, n);
        eprintln!("{:.0} ns (syn to a service)", cell.syn_to_service_ns);
        services.push(cell);
    }
    println!(
        "\nA new connection to a Service frontend (two backend classes) beside one straight to its backend (ns/packet; ratio to the smallest count in brackets)"
    );
    println!(
        "{:>9} {:>20} {:>20} {:>20} {:>20}",
        "services", "syn to the pod", "syn to the service", "all: syn to the pod", "all: to a node port"
    );
    if let Some(first) = services.first() {
        let (pod0, svc0) = (first.syn_to_pod_ns, first.syn_to_service_ns);
        for c in &services {
            println!(
                "{:>9} {:>12.1} ({:>4.2}) {:>12.1} ({:>4.2}) {:>12.1} ({:>4.2}) {:>12.1} ({:>4.2})",
                c.services,
                c.syn_to_pod_ns,
                c.syn_to_pod_ns / pod0,
                c.syn_to_service_ns,
                c.syn_to_service_ns / svc0,
                c.any_local_syn_to_pod_ns,
                c.any_local_syn_to_pod_ns / pod0,
                c.any_local_syn_to_node_port_ns,
                c.any_local_syn_to_node_port_ns / svc0
            );
        }
    }
    println!(
        "(all: `run --nodeport-addresses all`, node ports on every local address; the pod ratios are to the listed mode's smallest count, the node port's to the service's)"
    );
    Ok(Report {
        cells,
        worst_ratio: worst,
        services,
    })
}
