//! Throughput through a veth pair between two pods, routed by a node (2 pod namespaces + a node
//! namespace wired by `ztrust_lab::node`: host routes, a link-local gateway, as a per-pod CNI does), side by side in
//! one run:
//! - `none`: no enforcement;
//! - `hook`: a program that passes every packet, attached where ztrust's go (both hooks of both
//!   host-side veths): what a TC program costs before it does anything, which any TC-based enforcer
//!   pays. What separates `ztrust` from it is the cost of ztrust's pipeline;
//! - `ztrust`: the real programs attached to both host-side veths; the server pod isolated for ingress,
//!   its policy map holding N entries, the measured flows allowed by the last 4 of them;
//! - `iptables`: the same policy as an iptables-based NetworkPolicy implementation generates it, in the
//!   node's FORWARD chain: a per-pod chain that accepts established/related connections first (as
//!   kube-router and Calico do), then one rule per allowed peer address and port, the measured flows
//!   matched by the LAST rules, then DROP;
//! - `ipset`: the same per-pod chain with the N (peer address, port) pairs in one `hash:ip,port` set;
//! - `svc-none`, `svc-ztrust`: the client reaches the server through a ClusterIP, translated by the
//!   node as kube-proxy in iptables mode does (a DNAT rule in the node's `nat` PREROUTING chain), with
//!   nothing attached and with ztrust, whose Service table then holds N frontends (one of them the
//!   measured one, its backend the server's class). ztrust judges the client's egress at the ClusterIP
//!   by the backend, before the node translates it. Their ratio is `svc-ztrust` to `svc-none` of the
//!   same round: what ztrust costs on Service traffic, the translation's own cost taken out.
//!
//! In the `ztrust` variants both pods are isolated (the client for egress, the server for ingress), as
//! under a default-deny policy: the measured flows are allowed at both ends.
//!
//! Tests: iperf3 TCP stream, iperf3 UDP at a fixed rate, TCP request/response on one connection (RR:
//! 64-byte ping-pong, transactions/s) and TCP connect/request/response/close (CRR: a new connection
//! per transaction, so every transaction is a new flow that walks the rules). The measurement goes in
//! rounds: each round measures one test in every variant back to back (rotating order); a variant's
//! ratio is the median over the rounds of its sample divided by `none`'s sample of the same round, so
//! that the machine's slow phases (it is shared) cancel out. A `control` variant measures `none` again:
//! the spread of its ratios shows how far the machine's noise alone moves a ratio.
//!
//! By default the two ends run where the scheduler puts them, as pods' processes do. `--cpu N` runs
//! both on CPU N, and with them the packets' way through the veths and the node, which the kernel
//! processes on the sending CPU: the test is then bound by that one CPU, so whatever enforcement costs
//! comes out of the result in full (none of it is absorbed by another CPU's idle time). A stricter view,
//! not a quieter one: on this 2-CPU machine the TCP stream's `control` still moved 0.93-1.03 so.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::programs::{SchedClassifier, TcAttachType, tc::SchedClassifierLinkId};
use serde::Serialize;
use ztrust_agent::datapath::{
    EBPF_OBJECT,
    loader::{self, Datapath},
};
use ztrust_common::{
    BackendClass, EndpointInfo, IpcacheKey, IpcacheValue, PolicyKey, PolicyValue, ServiceKey, ServiceValue,
    dir, ep_flags, names, proto,
};

use super::{enter_netns, mapped, median, sh_quiet, sh_stdin};

mod topo;

use topo::{CLIENT_IF, SERVER_IF, Topo};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Rule counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
    pub rules: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2)]
    pub seconds: u32,
    /// Repetitions (variants interleaved, rotating order). Three: with two, one disturbed sample in
    /// either variant moved a ratio by several hundredths on this shared machine.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Offered rate of the UDP test (iperf3 -b).
    #[arg(long, default_value = "400M")]
    pub udp_rate: String,
    /// Only these tests (tcp,udp,rr,crr).
    #[arg(long, value_delimiter = ',', default_value = "tcp,udp,rr,crr")]
    pub tests: Vec<String>,
    /// Only these variants (none is always measured: every ratio is to it).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "control,hook,ztrust,iptables,ipset,svc-none,svc-ztrust"
    )]
    pub variants: Vec<String>,
    /// The CPU both ends of every test run on (a number, or `last`); `any` leaves them to the scheduler.
    #[arg(long, default_value = "any")]
    pub cpu: String,
}

impl Args {
    /// The CPU to pin the tests to, if any.
    fn cpu(&self) -> anyhow::Result<Option<usize>> {
        let online = std::thread::available_parallelism().map_or(1, |n| n.get());
        match self.cpu.as_str() {
            "any" => Ok(None),
            "last" => Ok(Some(online - 1)),
            n => {
                let cpu: usize = n
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--cpu {n}: a CPU number, `last` or `any`"))?;
                anyhow::ensure!(
                    cpu < online,
                    "--cpu {cpu}: this machine has CPUs 0 to {}",
                    online - 1
                );
                Ok(Some(cpu))
            }
        }
    }
}

/// Runs the calling thread (and the threads and processes it starts later) on `cpu` only.
fn pin_to(cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).expect("cpu number in range");
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("sched_setaffinity");
    }
}

/// Values and UDP losses of one test and variant over the repetitions.
type Samples = (Vec<f64>, Vec<f64>);

/// `control` is `none` measured again (nothing attached): its ratio to `none` is what the machine's noise
/// alone makes of a ratio, the resolution against which the others are read.
pub const VARIANTS: [&str; 8] = [
    "none",
    "control",
    "hook",
    "ztrust",
    "iptables",
    "ipset",
    "svc-none",
    "svc-ztrust",
];
/// The variant a variant's ratio is taken to (within a round).
fn baseline(variant: &str) -> &'static str {
    if variant == "svc-ztrust" {
        "svc-none"
    } else {
        "none"
    }
}
const CLIENT_IP: [u8; 4] = [10, 251, 0, 10];
const SERVER_IP: [u8; 4] = [10, 251, 0, 11];
/// The server's ClusterIP (`svc-*` variants): every protocol and port translated to the server.
const SERVICE_IP: [u8; 4] = [10, 96, 0, 10];
const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7000;
const CRR_PORT: u16 = 7001;
/// The measured flows: what the policy allows the client to reach on the server.
const ALLOWED: [(u8, u16); 4] = [
    (proto::TCP, IPERF_PORT),
    (proto::UDP, IPERF_PORT),
    (proto::TCP, RR_PORT),
    (proto::TCP, CRR_PORT),
];

fn proto_name(p: u8) -> &'static str {
    if p == proto::UDP { "udp" } else { "tcp" }
}
const MSG: usize = 64;

fn ip(a: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(a).to_string()
}

fn filler_ip(i: usize) -> [u8; 4] {
    [10, 252, (i >> 8) as u8, i as u8]
}

fn filler_port(i: usize) -> u16 {
    10_000 + (i % 50_000) as u16
}

/// One test's value for one variant: Mbit/s (tcp, udp) or transactions/s (rr, crr).
#[derive(Serialize, Clone, Debug)]
pub struct Value {
    pub median: f64,
    /// One per round, in round order.
    pub samples: Vec<f64>,
    /// The variant the ratios are to: `none`, or `svc-none` for `svc-ztrust`.
    pub baseline: &'static str,
    /// Median over the rounds of (this variant's sample / the baseline's sample of the same round).
    pub ratio_to_none: f64,
    /// The lowest and highest of those per-round ratios.
    pub ratio_min: f64,
    pub ratio_max: f64,
    /// UDP only: receiver-side loss, percent (median).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_loss_percent: Option<f64>,
}

#[derive(Serialize)]
pub struct SizeResult {
    pub rules: usize,
    /// test → variant → value.
    pub tests: BTreeMap<String, BTreeMap<String, Value>>,
}

#[derive(Serialize)]
pub struct Report {
    pub unit: BTreeMap<&'static str, &'static str>,
    /// The CPU both ends of every test ran on (none: unpinned).
    pub cpu: Option<usize>,
    pub sizes: Vec<SizeResult>,
}

/// The `hook` variant: [`names::PROG_PASS`] on both hooks of both interfaces, attached with TCX as
/// ztrust's programs are (links held here: dropping them detaches at once).
struct PassHook {
    ebpf: aya::Ebpf,
    links: Vec<SchedClassifierLinkId>,
}

impl PassHook {
    fn load(pin: &Path) -> anyhow::Result<Self> {
        // The object's maps come along (pinned by name); the program uses none.
        let maps = pin.join("maps");
        std::fs::create_dir_all(&maps).with_context(|| format!("creating {}", maps.display()))?;
        let ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&maps)
            .load(EBPF_OBJECT)?;
        let mut hook = PassHook {
            ebpf,
            links: Vec::new(),
        };
        hook.program()?
            .load()
            .context("loading the pass-through program")?;
        Ok(hook)
    }

    fn program(&mut self) -> anyhow::Result<&mut SchedClassifier> {
        let prog = self
            .ebpf
            .program_mut(names::PROG_PASS)
            .with_context(|| format!("{} not in the object", names::PROG_PASS))?;
        Ok(prog.try_into()?)
    }

    fn attach(&mut self, ifnames: &[&str]) -> anyhow::Result<()> {
        for ifname in ifnames {
            for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
                let id = self
                    .program()?
                    .attach(ifname, hook)
                    .with_context(|| format!("attaching the pass-through program to {ifname}"))?;
                self.links.push(id);
            }
        }
        Ok(())
    }

    fn detach(&mut self) {
        let links = std::mem::take(&mut self.links);
        if let Ok(prog) = self.program() {
            for id in links {
                let _ = prog.detach(id);
            }
        }
    }
}

/// The per-pod chain of the server as iptables rules, the allowed flows last (or in a set).
fn iptables_rules(n: usize, ipset: bool) -> String {
    let client = ip(CLIENT_IP);
    let mut s = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ZT-POD-FW-SERVER - [0:0]\n",
    );
    s += &format!("-A FORWARD -o {SERVER_IF} -j ZT-POD-FW-SERVER\n");
    s += "-A ZT-POD-FW-SERVER -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n";
    if ipset {
        s += "-A ZT-POD-FW-SERVER -m set --match-set ztb-allow src,dst -j ACCEPT\n";
    } else {
        for i in 0..n.saturating_sub(ALLOWED.len()) {
            s += &format!(
                "-A ZT-POD-FW-SERVER -s {}/32 -p tcp -m tcp --dport {} -j ACCEPT\n",
                ip(filler_ip(i)),
                filler_port(i)
            );
        }
        for (p, port) in ALLOWED {
            let p = proto_name(p);
            s += &format!("-A ZT-POD-FW-SERVER -s {client}/32 -p {p} -m {p} --dport {port} -j ACCEPT\n");
        }
    }
    s += "-A ZT-POD-FW-SERVER -j DROP\nCOMMIT\n";
    s
}

fn ipset_restore(n: usize) -> String {
    let client = ip(CLIENT_IP);
    let mut s = format!(
        "create ztb-allow hash:ip,port family inet hashsize 4096 maxelem {}\n",
        (n * 2).max(1024)
    );
    for i in 0..n.saturating_sub(ALLOWED.len()) {
        s += &format!("add ztb-allow {},tcp:{}\n", ip(filler_ip(i)), filler_port(i));
    }
    for (p, port) in ALLOWED {
        s += &format!("add ztb-allow {client},{}:{port}\n", proto_name(p));
    }
    s
}

const EMPTY_RULES: &str =
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";

/// The ClusterIP's translation, as kube-proxy's iptables mode does it in the node (PREROUTING, `nat`).
fn service_nat() -> String {
    format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n-A PREROUTING -d {}/32 -j DNAT --to-destination {}\nCOMMIT\n",
        ip(SERVICE_IP),
        ip(SERVER_IP)
    )
}

const EMPTY_NAT: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";

/// The Service frontend of `i`: filler ClusterIPs from 10.97.0.0 up, port 80.
fn filler_service(i: usize) -> ServiceKey {
    ServiceKey {
        addr: mapped([10, 97, (i >> 8) as u8, i as u8]),
        port_be: 80u16.to_be(),
        protocol: proto::TCP,
        _pad: 0,
    }
}

/// ztrust's maps for size `n`: the server isolated for ingress with n policy entries (n − 4 fillers for
/// other peers and ports, then the 4 that allow the measured flows), an ipcache entry per peer; the
/// client isolated for egress, allowed the measured flows to the server; n Service frontends (n − 4
/// fillers, then the ClusterIP at the 4 measured ports, the server's class behind it).
fn fill_maps(dp: &mut Datapath, n: usize, client_if: u32, server_if: u32) {
    let (client_id, server_id) = (300u32, 301u32);
    let set_ip = |dp: &mut Datapath, a: [u8; 4], id: u32| {
        dp.maps
            .ipcache
            .insert(
                128,
                &IpcacheKey { addr: mapped(a) },
                &IpcacheValue {
                    identity: id,
                    _pad: 0,
                },
            )
            .expect("ipcache");
    };
    set_ip(dp, CLIENT_IP, client_id);
    set_ip(dp, SERVER_IP, server_id);
    // An allow entry of `key` (one port) for rule `rule`.
    let allow = |dp: &mut Datapath, key: PolicyKey, rule: u32| {
        dp.maps
            .policy
            .insert(
                PolicyKey::PREFIX_FULL,
                &key,
                &PolicyValue {
                    rule_id: rule,
                    _pad: 0,
                },
            )
            .expect("policy");
    };
    let pol = |dp: &mut Datapath, remote: u32, protocol: u8, port: u16, rule: u32| {
        allow(
            dp,
            PolicyKey::new(server_if, remote, dir::INGRESS, protocol, port),
            rule,
        );
    };
    for i in 0..n.saturating_sub(ALLOWED.len()) {
        set_ip(dp, filler_ip(i), 1000 + i as u32);
        pol(dp, 1000 + i as u32, proto::TCP, filler_port(i), i as u32 + 1);
    }
    for (p, port) in ALLOWED {
        pol(dp, client_id, p, port, n as u32);
        let egress = PolicyKey::new(client_if, server_id, dir::EGRESS, p, port);
        allow(dp, egress, n as u32 + 1);
    }
    let service = |identity, port| {
        let mut v = ServiceValue {
            classes: 1,
            ..Default::default()
        };
        v.class[0] = BackendClass {
            identity,
            port,
            _pad: 0,
        };
        v
    };
    for i in 0..n.saturating_sub(ALLOWED.len()) {
        let v = service(1000 + i as u32, filler_port(i));
        dp.maps.services.insert(filler_service(i), v, 0).expect("service");
    }
    for (p, port) in ALLOWED {
        let key = ServiceKey {
            addr: mapped(SERVICE_IP),
            port_be: port.to_be(),
            protocol: p,
            _pad: 0,
        };
        dp.maps
            .services
            .insert(key, service(server_id, port), 0)
            .expect("service");
    }
    // The flags the agent's sync writes: the server isolated for ingress; neither has an entry for any
    // peer, nor one wider than a port.
    let lookups_skipped =
        ep_flags::NO_ANY_PEER_INGRESS | ep_flags::NO_ANY_PEER_EGRESS | ep_flags::ALL_NO_WIDE;
    let v4 = |ip: [u8; 4]| std::net::Ipv4Addr::from(ip).to_ipv6_mapped().octets();
    let server = EndpointInfo {
        endpoint_id: server_if,
        identity: server_id,
        flags: ep_flags::ISOLATED_INGRESS | lookups_skipped,
        addr4: v4(SERVER_IP),
        ..Default::default()
    };
    dp.maps.endpoints.insert(server_if, server, 0).unwrap();
    dp.maps
        .endpoints
        .insert(
            client_if,
            EndpointInfo {
                endpoint_id: client_if,
                identity: client_id,
                flags: ep_flags::ISOLATED_EGRESS | lookups_skipped,
                addr4: v4(CLIENT_IP),
                ..Default::default()
            },
            0,
        )
        .unwrap();
}

pub fn run_section(args: &Args) -> anyhow::Result<Report> {
    let args = args.clone();
    std::thread::spawn(move || section(&args))
        .join()
        .map_err(|_| anyhow::anyhow!("throughput section panicked"))?
}

fn section(args: &Args) -> anyhow::Result<Report> {
    for tool in ["iperf3", "iptables-restore", "ipset"] {
        anyhow::ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()?
                .success(),
            "{tool} not found (cargo xtask bench installs it)"
        );
    }
    for v in &args.variants {
        anyhow::ensure!(
            VARIANTS.contains(&v.as_str()),
            "unknown variant {v} (known: {})",
            VARIANTS.join(",")
        );
    }
    let variants: Vec<&str> = VARIANTS
        .iter()
        .copied()
        .filter(|v| *v == "none" || args.variants.iter().any(|a| a == v))
        .collect();
    let cpu = args.cpu()?;
    let mut topo = Topo::new(cpu);
    // This thread works in the node: attaching programs, iptables.
    enter_netns(&topo.node);
    let client_if = nix::net::if_::if_nametoindex(CLIENT_IF)?;
    let server_if = nix::net::if_::if_nametoindex(SERVER_IF)?;
    topo.start_servers();
    let node = topo.node.clone();
    let ipt = |rules: &str| sh_stdin(&["ip", "netns", "exec", &node, "iptables-restore"], rules);
    let mut pass = PassHook::load(&topo.pass_pin)?;
    let teardown = |dp: &mut Datapath, pass: &mut PassHook, variant: &str| match variant {
        "hook" => pass.detach(),
        "ztrust" => {
            dp.detach(CLIENT_IF);
            dp.detach(SERVER_IF);
        }
        "iptables" | "ipset" => ipt(EMPTY_RULES),
        "svc-none" => ipt(EMPTY_NAT),
        "svc-ztrust" => {
            dp.detach(CLIENT_IF);
            dp.detach(SERVER_IF);
            ipt(EMPTY_NAT);
        }
        _ => {}
    };

    let mut sizes = Vec::new();
    for &n in &args.rules {
        let _ = loader::cleanup(&topo.pin);
        let mut dp = Datapath::load(&topo.pin)?;
        fill_maps(&mut dp, n, client_if, server_if);
        sh_quiet(&["ip", "netns", "exec", &node, "ipset", "destroy", "ztb-allow"]);
        sh_stdin(
            &["ip", "netns", "exec", &node, "ipset", "restore"],
            &ipset_restore(n),
        );
        let rules = iptables_rules(n, false);
        let set_rules = iptables_rules(n, true);
        // test → variant → (samples, udp losses)
        let mut raw: BTreeMap<String, BTreeMap<&str, Samples>> = BTreeMap::new();
        // Every round measures each test in every variant back to back (rotating order), so that a slow
        // phase of the machine falls on all variants of a round alike: each ratio is taken within a round.
        // What is in place: a variant stays set up while the next measurement is of it too (a TCX link
        // is released asynchronously after its pin is removed: attaching again at once finds it still
        // there).
        let mut active = "none";
        for rep in 0..args.reps {
            for (t, test) in args.tests.iter().enumerate() {
                for k in 0..variants.len() {
                    let variant = variants[(k + rep + t + n) % variants.len()];
                    if variant != active {
                        teardown(&mut dp, &mut pass, active);
                        match variant {
                            "hook" => pass.attach(&[CLIENT_IF, SERVER_IF])?,
                            "ztrust" => {
                                dp.attach(CLIENT_IF, client_if)?;
                                dp.attach(SERVER_IF, server_if)?;
                            }
                            "iptables" => ipt(&rules),
                            "ipset" => ipt(&set_rules),
                            "svc-none" => ipt(&service_nat()),
                            "svc-ztrust" => {
                                ipt(&service_nat());
                                dp.attach(CLIENT_IF, client_if)?;
                                dp.attach(SERVER_IF, server_if)?;
                            }
                            _ => {}
                        }
                        active = variant;
                    }
                    let dst = if variant.starts_with("svc-") {
                        SERVICE_IP
                    } else {
                        SERVER_IP
                    };
                    let (v, loss) = match test.as_str() {
                        "tcp" => topo.iperf(dst, None, args.seconds),
                        "udp" => topo.iperf(dst, Some(&args.udp_rate), args.seconds),
                        "rr" => (topo.rr(dst, false, args.seconds), None),
                        "crr" => (topo.rr(dst, true, args.seconds), None),
                        other => anyhow::bail!("unknown test {other}"),
                    };
                    eprintln!(
                        "  rules {n:>6} rep {rep} {variant:>8} {test:>4}: {v:.0}{}",
                        loss.map(|l| format!(" (loss {l:.2}%)")).unwrap_or_default()
                    );
                    let e = raw.entry(test.clone()).or_default().entry(variant).or_default();
                    e.0.push(v);
                    e.1.extend(loss);
                }
            }
        }
        teardown(&mut dp, &mut pass, active);
        drop(dp);
        let _ = loader::cleanup(&topo.pin);
        let mut tests = BTreeMap::new();
        for (test, by_variant) in raw {
            let mut out = BTreeMap::new();
            for (variant, (samples, losses)) in &by_variant {
                // Sample i of every variant is from round i. (`svc-ztrust` without `svc-none`: to `none`.)
                let base = if by_variant.contains_key(baseline(variant)) {
                    baseline(variant)
                } else {
                    "none"
                };
                let ratios: Vec<f64> = samples
                    .iter()
                    .zip(&by_variant[base].0)
                    .map(|(v, b)| v / b)
                    .collect();
                let (samples, losses) = (samples.clone(), losses.clone());
                out.insert(
                    (*variant).to_owned(),
                    Value {
                        baseline: base,
                        median: median(&samples),
                        ratio_to_none: median(&ratios),
                        ratio_min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
                        ratio_max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                        samples,
                        udp_loss_percent: (!losses.is_empty()).then(|| median(&losses)),
                    },
                );
            }
            tests.insert(test, out);
        }
        sizes.push(SizeResult { rules: n, tests });
    }
    sh_quiet(&["ip", "netns", "exec", &node, "ipset", "destroy", "ztb-allow"]);
    drop(pass);
    drop(topo);

    println!(
        "\nThroughput through a veth pair ({} rounds x {} s, {}; rules: policy entries and Service frontends; value: median; in brackets: median over the rounds of the ratio to the baseline in the same round)",
        args.reps,
        args.seconds,
        cpu.map_or_else(
            || "both ends unpinned".to_owned(),
            |c| format!("both ends on CPU {c}")
        )
    );
    print!("{:>7} {:>5}", "rules", "test");
    for v in VARIANTS {
        print!(" {:>20}", v);
    }
    println!();
    for s in &sizes {
        for (test, by_variant) in &s.tests {
            print!("{:>7} {:>5}", s.rules, test);
            for v in VARIANTS {
                match by_variant.get(v) {
                    Some(x) => print!(" {:>12.0} ({:>5.3})", x.median, x.ratio_to_none),
                    None => print!(" {:>20}", "-"),
                }
            }
            println!();
        }
    }
    println!(
        "Per-round ratios to `none`, lowest-highest (`control` is `none` again: its spread is the noise):"
    );
    for s in &sizes {
        for (test, by_variant) in &s.tests {
            print!("{:>7} {:>5}", s.rules, test);
            for v in VARIANTS {
                match by_variant.get(v) {
                    Some(x) => print!(" {:>20}", format!("{:.3}-{:.3}", x.ratio_min, x.ratio_max)),
                    None => print!(" {:>20}", "-"),
                }
            }
            println!();
        }
    }
    println!(
        "(tcp, udp: Mbit/s received; udp offered at {}; rr, crr: transactions/s)",
        args.udp_rate
    );
    println!(
        "(svc-none, svc-ztrust: through a ClusterIP DNAT-ed by the node; svc-ztrust's ratio is to svc-none, with N Service frontends in its table)"
    );
    println!(
        "(target: ztrust >= 0.95 of none and svc-ztrust >= 0.95 of svc-none at every size, ahead of iptables at 1,000 and 10,000)"
    );
    let unit = [
        ("tcp", "Mbit/s"),
        ("udp", "Mbit/s"),
        ("rr", "transactions/s"),
        ("crr", "transactions/s"),
    ]
    .into();
    Ok(Report { unit, cpu, sizes })
}
