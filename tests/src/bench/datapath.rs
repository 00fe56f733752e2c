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
//!   mean per run.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use aya::maps::lpm_trie::Key;
use aya::programs::{TestRun, TestRunOptions};
use serde::Serialize;
use ztrust_agent::datapath::loader::{self, Datapath};
use ztrust_common::{EndpointInfo, IpcacheKey, IpcacheValue, PolicyKey, PolicyValue, dir, ep_flags, names, proto};

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
}

const CASES: [&str; 5] = ["syn allowed", "syn denied", "established", "udp new", "ipv6 syn"];

#[derive(Serialize)]
pub struct Cell {
    policies: u32,
    pods: u32,
    policy_entries: usize,
    ns_per_packet: BTreeMap<&'static str, f64>,
}

#[derive(Serialize)]
pub struct Report {
    cells: Vec<Cell>,
    worst_ratio: BTreeMap<&'static str, f64>,
}

fn pod_ip(i: u32) -> [u8; 4] {
    [10, (i >> 16) as u8, (i >> 8) as u8, i as u8]
}

fn run(dp: &Datapath, ifindex: u32, pkt: &[u8], repeat: u32) -> (u32, Duration) {
    let ctx = skb_ctx(ifindex);
    let mut out = vec![0u8; pkt.len() + 256];
    let opts = TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), ctx_in: Some(&ctx), repeat, ..Default::default() };
    let r = dp.program(names::PROG_FROM_POD).expect("program").test_run(opts).expect("test run");
    (r.return_value, r.duration)
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
        let key = IpcacheKey { addr: mapped(pod_ip(i)) };
        dp.maps.ipcache.insert(128, &key, &IpcacheValue { identity: 256 + i / 10, _pad: 0 }).expect("ipcache");
    }
    // The measured endpoint (ifindex) and 99 others.
    let endpoints: Vec<u32> = std::iter::once(ifindex).chain((0..99).map(|i| 100_000 + i)).collect();
    for ep in &endpoints {
        // The flags the agent's sync writes for these entries: isolated for egress, and no entry for any
        // peer in either direction.
        let flags = ep_flags::ISOLATED_EGRESS | ep_flags::NO_ANY_PEER_INGRESS | ep_flags::NO_ANY_PEER_EGRESS;
        let info = EndpointInfo { endpoint_id: *ep, identity: 256, flags, _pad: 0 };
        dp.maps.endpoints.insert(*ep, info, 0).expect("endpoint");
    }
    let mut entries = 0usize;
    for p in 0..policies {
        let ep = endpoints[rng.below(endpoints.len() as u64) as usize];
        let port = 1024 + rng.below(20_000) as u16;
        for _ in 0..3 {
            let remote = 256 + rng.below(u64::from(identities)) as u32;
            let key = Key::new(PolicyKey::PREFIX_FULL, PolicyKey::new(ep, remote, dir::EGRESS, proto::TCP, port));
            dp.maps.policy.insert(&key, PolicyValue { rule_id: p + 1, _pad: 0 }, 0).expect("policy");
            entries += 1;
        }
        // A range of 32 ports: one aligned block.
        let remote = 256 + rng.below(u64::from(identities)) as u32;
        let base = (30_000 + rng.below(1000) as u16) & !31;
        let key = Key::new(PolicyKey::PREFIX_FULL - 5, PolicyKey::new(ep, remote, dir::EGRESS, proto::UDP, base));
        dp.maps.policy.insert(&key, PolicyValue { rule_id: p + 1, _pad: 0 }, 0).expect("policy");
        entries += 1;
    }
    // What the measured packets need: the endpoint may reach pod 1's identity on TCP 8080 and UDP 53.
    let me = pod_ip(0);
    let peer = pod_ip(1);
    // Pod i has identity 256 + i / 10.
    let peer_id = 256;
    for (protocol, port) in [(proto::TCP, 8080), (proto::UDP, 53)] {
        let key = Key::new(PolicyKey::PREFIX_FULL, PolicyKey::new(ifindex, peer_id, dir::EGRESS, protocol, port));
        dp.maps.policy.insert(&key, PolicyValue { rule_id: 1, _pad: 0 }, 0).expect("policy");
    }
    let (me6, peer6) = ([0xfdu8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0xfdu8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    dp.maps.ipcache.insert(128, &IpcacheKey { addr: peer6 }, &IpcacheValue { identity: peer_id, _pad: 0 }).unwrap();
    // Events for denied packets are rate-limited per flow; keep that realistic (one per second).
    dp.maps.config.set(0, ztrust_common::Config { event_interval_ns: 1_000_000_000, flags: 0, log_allowed: 0 }, 0).unwrap();

    let mut ns = BTreeMap::new();
    ns.insert(CASES[0], new_flows(&dp, ifindex, args.flows, |sp| frame(false, &me, &peer, proto::TCP, sp, 8080, 0x02)));
    let denied = frame(false, &me, &peer, proto::TCP, 999, 8081, 0x02);
    let (rv, d) = run(&dp, ifindex, &denied, args.repeat);
    assert_eq!(rv, 2, "denied SYN passed");
    ns.insert(CASES[1], d.as_nanos() as f64);
    let syn = frame(false, &me, &peer, proto::TCP, 998, 8080, 0x02);
    assert_eq!(run(&dp, ifindex, &syn, 1).0, 0);
    let ack = frame(false, &me, &peer, proto::TCP, 998, 8080, 0x10);
    let (rv, d) = run(&dp, ifindex, &ack, args.repeat);
    assert_eq!(rv, 0);
    ns.insert(CASES[2], d.as_nanos() as f64);
    ns.insert(CASES[3], new_flows(&dp, ifindex, args.flows, |sp| frame(false, &me, &peer, proto::UDP, sp, 53, 0)));
    ns.insert(CASES[4], new_flows(&dp, ifindex, args.flows, |sp| frame(true, &me6, &peer6, proto::TCP, sp, 8080, 0x02)));
    drop(dp);
    let _ = loader::cleanup(pin);
    Cell { policies, pods, policy_entries: entries + 2, ns_per_packet: ns }
}

/// Runs the section on a thread of its own (it enters a network namespace) and prints its table.
pub fn run_section(args: &Args) -> anyhow::Result<Report> {
    let args = args.clone();
    std::thread::spawn(move || section(&args)).join().map_err(|_| anyhow::anyhow!("datapath section panicked"))?
}

fn section(args: &Args) -> anyhow::Result<Report> {
    let netns = format!("ztbdp{}", std::process::id());
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{netns}"));
    sh(&["ip", "netns", "add", &netns]);
    // A device for the programs to run on: the kernel resolves the context's ifindex in this namespace.
    // (No dummy driver on every kernel; a veth pair works everywhere.)
    sh(&["ip", "-n", &netns, "link", "add", "ztb0", "type", "veth", "peer", "name", "ztb1"]);
    sh(&["ip", "-n", &netns, "link", "set", "ztb0", "up"]);
    sh(&["ip", "-n", &netns, "link", "set", "ztb1", "up"]);
    super::enter_netns(&netns);
    let ifindex = nix::net::if_::if_nametoindex("ztb0")?;

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
    let _ = std::process::Command::new("ip").args(["netns", "del", &netns]).status();

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
    println!("\n(target: every ratio <= 1.2, and the established path the cheapest)");
    Ok(Report { cells, worst_ratio: worst })
}
