//! Test topology: a "node" network namespace with one veth pair per "pod" namespace, wired by the
//! lab's own code (`ztrust_lab::node`: Calico style, /32 and /128 host routes, a link-local gateway on
//! every node-side interface, the node's addresses 10.244.<subnet>.1 and fd00:10:244:<subnet>::1 on its
//! `lo`). Everything is made in namespaces this test creates and removed by `Drop`, also when the test
//! panics. [`Topology::dual_stack`] gives every pod an IPv6 address too.

pub mod attack;
pub mod cluster;
pub mod model;
pub mod payments;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use ztrust_lab::node::NodeAddrs;

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sets a sysctl (`key=value`) inside network namespace `netns`.
pub fn sysctl(netns: &str, setting: &str) {
    let (key, value) = setting.split_once('=').expect("key=value");
    ztrust_lab::net::sysctls(netns, &[(key, value)]).expect("sysctl");
}

/// Moves the calling thread into a network namespace (threads keep their own).
pub fn enter_netns(name: &str) {
    let f = std::fs::File::open(format!("/run/netns/{name}")).expect("open netns");
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

pub struct Pod {
    pub netns: String,
    pub host_if: String,
    pub ip: IpAddr,
    /// The pod's IPv6 address in a [`Topology::dual_stack`] topology.
    pub ip6: Option<Ipv6Addr>,
}

impl Pod {
    /// The pod's addresses: its IPv4 address, then its IPv6 address if it has one.
    pub fn ips(&self) -> Vec<IpAddr> {
        std::iter::once(self.ip).chain(self.ip6.map(IpAddr::V6)).collect()
    }
}

pub struct Topology {
    pub prefix: String,
    pub node: String,
    pub pods: Vec<Pod>,
    /// The node's own IPv6 address (on its loopback) in a [`Topology::dual_stack`] topology.
    pub node_ip6: Option<Ipv6Addr>,
    pub pin_dir: PathBuf,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
}

impl Topology {
    /// `prefix` must be unique per test; pods get 10.244.<subnet>.<10+i>.
    pub fn new(prefix: &str, subnet: u8, pods: usize) -> Self {
        Self::build(prefix, subnet, pods, false)
    }

    /// [`Topology::new`], and IPv6 too: pod i gets fd00:10:244:<subnet>::<10+i>/128 on its `eth0` and a
    /// default route via fe80::1, the link-local address of the node's side of every veth (the node
    /// answers neighbour discovery for it); the node routes each pod's /128 to its veth and forwards, and
    /// has fd00:10:244:<subnet>::1 of its own (on its loopback). No duplicate address detection anywhere
    /// (`nodad`, `accept_dad=0`), so that every address is usable at once.
    pub fn dual_stack(prefix: &str, subnet: u8, pods: usize) -> Self {
        Self::build(prefix, subnet, pods, true)
    }

    fn build(prefix: &str, subnet: u8, pods: usize, v6: bool) -> Self {
        let node = format!("{prefix}n");
        let addrs = NodeAddrs {
            v4: Ipv4Addr::new(10, 244, subnet, 1),
            v6: format!("fd00:10:244:{subnet}::1").parse().unwrap(),
        };
        let mut me = Topology {
            prefix: prefix.to_owned(),
            node: node.clone(),
            pods: Vec::new(),
            node_ip6: v6.then_some(addrs.v6),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{prefix}")),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
        };
        me.cleanup();
        // The lab's own wiring (`ztrust_lab::node`), so that what these tests prove holds for the lab.
        ztrust_lab::node::make_node(&node, addrs).expect("node namespace");
        for i in 0..pods {
            let netns = format!("{prefix}p{i}");
            let host_if = format!("{prefix}h{i}");
            let ip: IpAddr = format!("10.244.{subnet}.{}", 10 + i).parse().unwrap();
            let ip6: Option<Ipv6Addr> =
                v6.then(|| format!("fd00:10:244:{subnet}::{}", 10 + i).parse().unwrap());
            let pod = Pod {
                netns,
                host_if,
                ip,
                ip6,
            };
            let ips = pod.ips();
            ztrust_lab::node::make_endpoint(&node, &pod.netns, &pod.host_if, &ips).expect("pod namespace");
            ztrust_lab::node::link_up(&node, &pod.host_if, &ips, addrs).expect("pod link up");
            me.pods.push(pod);
        }
        me
    }

    fn cleanup(&self) {
        for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&self.prefix) {
                let _ = ztrust_lab::net::del_netns(&name);
            }
        }
        let _ = ztrust_agent::datapath::loader::cleanup(&self.pin_dir);
    }

    /// A TCP echo server (line by line) and a UDP echo server on `port` inside pod `i`, on each of its
    /// addresses.
    pub fn serve(&mut self, i: usize, port: u16) {
        let netns = self.pods[i].netns.clone();
        let ips = self.pods[i].ips();
        let stop = self.stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.servers.push(std::thread::spawn(move || {
            enter_netns(&netns);
            let mut servers = Vec::new();
            for ip in ips {
                let tcp = TcpListener::bind(SocketAddr::new(ip, port)).expect("bind tcp");
                tcp.set_nonblocking(true).unwrap();
                let udp = UdpSocket::bind(SocketAddr::new(ip, port)).expect("bind udp");
                udp.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                servers.push((tcp, udp));
            }
            tx.send(()).unwrap();
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                for (tcp, udp) in &servers {
                    if let Ok((conn, _)) = tcp.accept() {
                        conn.set_nonblocking(false).unwrap();
                        std::thread::spawn(move || {
                            let mut w = conn.try_clone().unwrap();
                            for line in BufReader::new(conn).lines() {
                                let Ok(line) = line else { break };
                                if writeln!(w, "{line}").is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&buf[..n], peer);
                    }
                }
            }
        }));
        rx.recv_timeout(Duration::from_secs(5)).expect("server up");
    }

    /// Runs `f` on a thread inside pod `i`'s namespace.
    pub fn in_pod<T: Send + 'static>(&self, i: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        let netns = self.pods[i].netns.clone();
        std::thread::spawn(move || {
            enter_netns(&netns);
            f()
        })
        .join()
        .expect("pod thread")
    }

    /// Does a TCP connection from pod `from` to pod `to`:`port` get through, with an echoed line?
    pub fn tcp(&self, from: usize, to: usize, port: u16) -> bool {
        let dst = SocketAddr::new(self.pods[to].ip, port);
        self.in_pod(from, move || tcp_echo(dst))
    }

    /// [`Topology::tcp`] to pod `to`'s IPv6 address.
    pub fn tcp6(&self, from: usize, to: usize, port: u16) -> bool {
        let dst = SocketAddr::new(
            IpAddr::V6(self.pods[to].ip6.expect("a dual-stack topology")),
            port,
        );
        self.in_pod(from, move || tcp_echo(dst))
    }

    pub fn udp(&self, from: usize, to: usize, port: u16) -> bool {
        let dst = SocketAddr::new(self.pods[to].ip, port);
        self.in_pod(from, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let mut buf = [0u8; 64];
            for _ in 0..2 {
                let _ = s.send_to(b"ping", dst);
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    return &buf[..n] == b"ping";
                }
            }
            false
        })
    }
}

pub fn tcp_echo(dst: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_millis(400)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
    if s.write_all(b"hello\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).is_ok() && &buf == b"hello\n"
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
        self.cleanup();
    }
}

/// Runs `prog` once on `frame` with `BPF_PROG_TEST_RUN`, as if it arrived on interface `ifindex` (the
/// only field set in the `__sk_buff` context, at offset 40); the program's return value.
pub fn test_run(
    dp: &ztrust_agent::datapath::loader::Datapath,
    prog: &str,
    ifindex: u32,
    frame: &[u8],
) -> u32 {
    test_run_marked(dp, prog, ifindex, frame, 0).0
}

/// As [`test_run`], with `skb->mark` (offset 8) set to `mark`: (return value, mark afterwards).
pub fn test_run_marked(
    dp: &ztrust_agent::datapath::loader::Datapath,
    prog: &str,
    ifindex: u32,
    frame: &[u8],
    mark: u32,
) -> (u32, u32) {
    test_run_ctx(dp, prog, ifindex, frame, mark, 0)
}

/// As [`test_run_marked`], with `skb->ingress_ifindex` (offset 36: the interface the packet entered the
/// node on; 0 for a packet the node itself sent) set to `from`.
pub fn test_run_ctx(
    dp: &ztrust_agent::datapath::loader::Datapath,
    prog: &str,
    ifindex: u32,
    frame: &[u8],
    mark: u32,
    from: u32,
) -> (u32, u32) {
    use aya::programs::{TestRun, TestRunOptions};
    let mut ctx = [0u8; 192];
    ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
    ctx[36..40].copy_from_slice(&from.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut ctx_out = [0u8; 192];
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        ctx_out: Some(&mut ctx_out),
        ..Default::default()
    };
    let ret = dp
        .program(prog)
        .expect("program")
        .test_run(opts)
        .expect("test run")
        .return_value;
    (ret, u32::from_ne_bytes(ctx_out[8..12].try_into().unwrap()))
}

/// Packets counted for (interface, direction, verdict, reason), summed over CPUs: in the hash and in the
/// endpoint's slot together.
pub fn counter(
    dp: &ztrust_agent::datapath::loader::Datapath,
    ifindex: u32,
    direction: u8,
    verdict: u8,
    reason: u8,
) -> u64 {
    let (hashed, slotted) = counter_parts(dp, ifindex, direction, verdict, reason);
    hashed + slotted
}

/// [`counter`]'s two parts: (in the hash, in the endpoint's slot).
pub fn counter_parts(
    dp: &ztrust_agent::datapath::loader::Datapath,
    ifindex: u32,
    direction: u8,
    verdict: u8,
    reason: u8,
) -> (u64, u64) {
    let (hashed, slotted) = counter_values(dp, ifindex, direction, verdict, reason);
    (hashed.packets, slotted.packets)
}

/// Packets and bytes counted for (interface, direction, verdict, reason), summed over CPUs: (in the
/// hash, in the endpoint's slot).
pub fn counter_values(
    dp: &ztrust_agent::datapath::loader::Datapath,
    ifindex: u32,
    direction: u8,
    verdict: u8,
    reason: u8,
) -> (ztrust_common::CounterValue, ztrust_common::CounterValue) {
    let key = ztrust_common::CounterKey {
        ifindex,
        direction,
        verdict,
        reason,
        _pad: 0,
    };
    let mut hashed = ztrust_common::CounterValue::default();
    for c in dp.maps.counters.get(&key, 0).iter().flat_map(|vals| vals.iter()) {
        hashed.packets += c.packets;
        hashed.bytes += c.bytes;
    }
    let slots = dp.maps.endpoints.slot_counts(ifindex).expect("slot counters");
    let mut slotted = ztrust_common::CounterValue::default();
    for (_, c) in slots
        .entries()
        .into_iter()
        .filter(|(k, _)| *k == (direction, verdict, reason))
    {
        slotted.packets += c.packets;
        slotted.bytes += c.bytes;
    }
    (hashed, slotted)
}

/// The flow events waiting in the datapath's ring buffer, taken out of it.
pub fn events(dp: &mut ztrust_agent::datapath::loader::Datapath) -> Vec<ztrust_common::FlowEvent> {
    let ring = dp.events.as_mut().expect("ring");
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        // SAFETY: the ring carries FlowEvent records only; read unaligned from its bytes.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ztrust_common::FlowEvent>()) });
    }
    out
}

/// The gate of every privileged test: it fails, loudly, when not run as root (never a silent skip).
/// `cargo xtask test` runs this binary as root; by hand: `cargo test -p ztrust-tests --test privileged`.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "privileged test (network namespaces, eBPF): run as root, e.g. by `cargo xtask test`"
    );
}

/// The agent's flow log (`--flow-log`, JSON lines), read again until a flow `wanted` accepts is in it:
/// the agent writes a flow a moment after the kernel reported it, so a log read at once after a probe
/// may lack the probe's last flows. Returns that flow and the whole log as it was then; panics naming
/// `what` (and what the log held) when it has not come within 10 s.
pub fn flow_in_log(
    path: &Path,
    what: &str,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, Vec<serde_json::Value>) {
    flow_in_log_after(path, 0, what, wanted)
}

/// [`flow_in_log`] among the flows after the first `skip` of the log.
pub fn flow_in_log_after(
    path: &Path,
    skip: usize,
    what: &str,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, Vec<serde_json::Value>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let flows = flow_log(path);
        if let Some(f) = flows.iter().skip(skip).find(|f| wanted(f)) {
            return (f.clone(), flows);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not in the flow log {} within 10 s ({} flows there, {skip} before)",
            path.display(),
            flows.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent's flow log as it is now, each flow as JSON.
pub fn flow_log(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The `ztrust-agent` binary the end-to-end tests run: `ZTRUST_AGENT_BIN` (`cargo xtask test` sets it
/// to the one it has just built), else the workspace's debug build, which must exist.
pub fn agent_bin() -> &'static Path {
    static BIN: LazyLock<PathBuf> = LazyLock::new(|| built("ZTRUST_AGENT_BIN", "ztrust-agent"));
    &BIN
}

/// The `ztrust-lab` binary whose `serve` runs in the lab's namespaces: `ZTRUST_LAB_BIN`, else the
/// workspace's debug build.
pub fn lab_bin() -> &'static Path {
    static BIN: LazyLock<PathBuf> = LazyLock::new(|| built("ZTRUST_LAB_BIN", "ztrust-lab"));
    &BIN
}

fn built(var: &str, name: &str) -> PathBuf {
    let bin = std::env::var_os(var).map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/debug")
                .join(name)
        },
        PathBuf::from,
    );
    assert!(
        bin.is_file(),
        "no {name} binary at {} (set {var}, or `cargo build -p {name}` first; `cargo xtask test` does both)",
        bin.display()
    );
    bin
}

/// A node with one pod (root required); the calling thread enters the node's namespace. Returns the
/// topology and the ifindex of the pod's host-side interface.
pub fn node_with_one_pod(prefix: &str, subnet: u8) -> (Topology, u32) {
    require_root();
    let topo = Topology::new(prefix, subnet, 1);
    enter_netns(&topo.node);
    let ifindex = nix::net::if_::if_nametoindex(topo.pods[0].host_if.as_str()).expect("ifindex");
    (topo, ifindex)
}
