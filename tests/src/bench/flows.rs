//! The flow pipeline: denied-flow events per second from the kernel ring buffer to a `flows --follow`
//! gRPC client, at rising offered rates, with the losses.
//!
//! The real agent binary runs in a network namespace of its own (`run --event-interval-ms 0 --event-budget 0`, so every
//! denied packet emits an event; everything else at its defaults: the drop log line, metrics, the
//! detector). This process loads the same programs on the agent's pinned maps (so the events land in the
//! ring buffer the agent reads), describes one isolated endpoint, and runs a denied SYN through the
//! program with BPF_PROG_TEST_RUN, `repeat` packets per millisecond for the offered rate. A gRPC client
//! on the agent's unix socket follows the flows and counts them, and the `LostEvents` records by source.
//! Per rate: generated (program runs, each one emitting), delivered to the client, lost in the kernel
//! (the events-lost counter), reported lost to the client (kernel ring buffer, slow client), and
//! unaccounted = generated − delivered − reported lost (0 when every loss is counted).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aya::programs::{TestRun, TestRunOptions};
use serde::Serialize;
use ztrust_agent::datapath::loader::{self, Datapath};
use ztrust_agent::observer::proto::get_flows_response::ResponseTypes;
use ztrust_agent::observer::proto::{GetFlowsRequest, LostEventSource};
use ztrust_common::{EndpointInfo, ep_flags, names, proto, stat};

use super::{frame, sh, sh_quiet, skb_ctx};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Offered rates, events per second (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "50000,100000,150000,200000,300000,500000,1000000"
    )]
    pub rates: Vec<u64>,
    /// Seconds per rate.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// The agent binary (default: `ztrust-agent` beside this one, or $ZTRUST_AGENT_BIN).
    #[arg(long, env = "ZTRUST_AGENT_BIN")]
    pub agent: Option<PathBuf>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Step {
    offered_per_s: u64,
    generated: u64,
    generated_per_s: f64,
    delivered: u64,
    delivered_per_s: f64,
    kernel_lost: u64,
    reported_kernel_lost: u64,
    reported_slow_client_lost: u64,
    unaccounted: i64,
}

#[derive(Serialize)]
pub struct Report {
    steps: Vec<Step>,
    /// Highest delivered rate with nothing lost.
    max_lossless_per_s: f64,
}

#[derive(Default)]
struct Counts {
    flows: AtomicU64,
    lost_kernel: AtomicU64,
    lost_slow: AtomicU64,
    lost_other: AtomicU64,
}

struct Guard {
    netns: String,
    pin: PathBuf,
    dir: PathBuf,
    agent: Option<Child>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(a.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = a.wait();
        }
        let _ = loader::cleanup(&self.pin);
        sh_quiet(&["ip", "netns", "del", &self.netns]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn agent_bin(args: &Args) -> anyhow::Result<PathBuf> {
    let p = match &args.agent {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("ztrust-agent"),
    };
    anyhow::ensure!(
        p.exists(),
        "agent binary {} not found (build it: cargo build --release -p ztrust-agent)",
        p.display()
    );
    Ok(p)
}

pub fn run_section(args: &Args) -> anyhow::Result<Report> {
    let args = args.clone();
    std::thread::spawn(move || section(&args))
        .join()
        .map_err(|_| anyhow::anyhow!("flows section panicked"))?
}

fn section(args: &Args) -> anyhow::Result<Report> {
    let agent = agent_bin(args)?;
    let id = std::process::id();
    let mut g = Guard {
        netns: format!("ztbfl{id}"),
        pin: PathBuf::from(format!("/sys/fs/bpf/ztbfl{id}")),
        dir: PathBuf::from(format!("/tmp/ztbfl{id}")),
        agent: None,
    };
    let manifests = g.dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    // One object, so that the source has a snapshot to deliver: the agent syncs (and says "in sync")
    // only after its source's first whole snapshot, and a directory source with no file has none.
    std::fs::write(
        manifests.join("namespace.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench\n  labels:\n    kubernetes.io/metadata.name: bench\n",
    )?;
    let socket = g.dir.join("agent.sock");
    let log = g.dir.join("agent.log");
    sh(&["ip", "netns", "add", &g.netns]);
    sh(&["ip", "-n", &g.netns, "link", "set", "lo", "up"]);
    sh(&[
        "ip", "-n", &g.netns, "link", "add", "ztbf0", "type", "veth", "peer", "name", "ztbf1",
    ]);
    sh(&["ip", "-n", &g.netns, "link", "set", "ztbf0", "up"]);
    sh(&["ip", "-n", &g.netns, "link", "set", "ztbf1", "up"]);
    // Not `ip netns exec`: it would give the agent a mount namespace with a bpffs of its own. A child
    // inherits the network namespace of the thread that spawns it.
    super::enter_netns(&g.netns);
    let child = Command::new(&agent)
        .args(["run", "--source", &format!("dir:{}", manifests.display())])
        .arg("--pin-path")
        .arg(&g.pin)
        .arg("--grpc-socket")
        .arg(&socket)
        .args(["--event-interval-ms", "0"])
        // The per-interface budget (default 1,000 events a second) would leave out all but the first
        // thousand of every second: this measures the pipeline, not the budget.
        .args(["--event-budget", "0"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    g.agent = Some(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("in sync")
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "agent not in sync after 30 s; its log: {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let ifindex = nix::net::if_::if_nametoindex("ztbf0")?;
    // The agent's pinned maps: the ring buffer it reads, the config it set (every drop emits).
    let mut dp = Datapath::load_with(&g.pin, loader::Capacities::default())?;
    dp.maps.endpoints.insert(
        ifindex,
        EndpointInfo {
            endpoint_id: ifindex,
            identity: 256,
            flags: ep_flags::ISOLATED_EGRESS,
            addr4: std::net::Ipv4Addr::new(10, 9, 0, 1).to_ipv6_mapped().octets(),
            ..Default::default()
        },
        0,
    )?;
    let cfg = dp.maps.config.get(&0, 0)?;
    anyhow::ensure!(
        cfg.event_interval_ns == 0 && cfg.event_budget == 0,
        "agent did not set event_interval_ns = 0 and event_budget = 0"
    );
    let pkt = frame(
        false,
        &[10, 9, 0, 1],
        &[10, 9, 0, 2],
        proto::TCP,
        40000,
        5432,
        0x02,
    );
    let ctx = skb_ctx(ifindex);
    let mut out = vec![0u8; pkt.len() + 256];
    let prog = dp.program(names::PROG_FROM_POD).expect("program");
    let mut fire = |n: u32| {
        let opts = TestRunOptions {
            data_in: Some(&pkt),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat: n,
            ..Default::default()
        };
        let r = prog.test_run(opts).expect("test run");
        assert_eq!(r.return_value, 2, "the denied SYN passed");
    };
    let kernel_lost = || -> u64 {
        dp.maps
            .stats
            .get(&stat::EVENTS_LOST, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    };

    // The client: a tokio runtime of its own, on this thread's namespace-independent unix socket.
    let counts = Arc::new(Counts::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let c = counts.clone();
    let sock = socket.clone();
    rt.spawn(async move {
        let mut client = match ztrust_agent::observer::client::connect_unix(&sock).await {
            Ok(c) => c,
            Err(e) => return eprintln!("flows client: {e}"),
        };
        let mut stream = match client
            .get_flows(GetFlowsRequest {
                follow: true,
                typed_only: true,
                ..Default::default()
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(e) => return eprintln!("GetFlows: {e}"),
        };
        while let Ok(Some(m)) = stream.message().await {
            match m.response_types {
                Some(ResponseTypes::Flow(_)) => {
                    c.flows.fetch_add(1, Ordering::Relaxed);
                }
                Some(ResponseTypes::LostEvents(l)) => {
                    let n = l.num_events_lost;
                    if l.source == LostEventSource::KernelRingBuffer as i32 {
                        c.lost_kernel.fetch_add(n, Ordering::Relaxed);
                    } else if l.source == LostEventSource::SlowClient as i32 {
                        c.lost_slow.fetch_add(n, Ordering::Relaxed);
                    } else {
                        c.lost_other.fetch_add(n, Ordering::Relaxed);
                    }
                }
                None => {}
            }
        }
    });
    // Warm-up: until the client sees events (its subscription is in place).
    let deadline = Instant::now() + Duration::from_secs(10);
    while counts.flows.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            anyhow::bail!(
                "the flows client received nothing; the agent's last lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        fire(1);
        std::thread::sleep(Duration::from_millis(50));
    }
    settle(&counts);

    let mut steps = Vec::new();
    for &rate in &args.rates {
        let (f0, k0, s0, l0) = (
            counts.flows.load(Ordering::Relaxed),
            counts.lost_kernel.load(Ordering::Relaxed),
            counts.lost_slow.load(Ordering::Relaxed),
            kernel_lost(),
        );
        let start = Instant::now();
        let mut done: u64 = 0;
        loop {
            let el = start.elapsed().as_secs_f64();
            if el >= args.seconds {
                break;
            }
            let target = (rate as f64 * el) as u64;
            if target > done {
                let n = (target - done).min(20_000) as u32;
                fire(n);
                done += u64::from(n);
            } else {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        let gen_secs = start.elapsed().as_secs_f64();
        let last_delivery = settle(&counts);
        let delivered = counts.flows.load(Ordering::Relaxed) - f0;
        let step = Step {
            offered_per_s: rate,
            generated: done,
            generated_per_s: done as f64 / gen_secs,
            delivered,
            // Over the time from the first event to the last delivery.
            delivered_per_s: delivered as f64 / (last_delivery - start).as_secs_f64().max(gen_secs),
            kernel_lost: kernel_lost() - l0,
            reported_kernel_lost: counts.lost_kernel.load(Ordering::Relaxed) - k0,
            reported_slow_client_lost: counts.lost_slow.load(Ordering::Relaxed) - s0,
            unaccounted: 0,
        };
        let step = Step {
            unaccounted: done as i64
                - delivered as i64
                - step.reported_kernel_lost as i64
                - step.reported_slow_client_lost as i64,
            ..step
        };
        eprintln!("  offered {rate}/s: {step:?}");
        steps.push(step);
    }
    rt.shutdown_timeout(Duration::from_millis(200));
    drop(dp);
    drop(g);

    println!(
        "\nFlow pipeline: denied-flow events, kernel ring buffer -> agent -> hub -> gRPC `flows --follow` client"
    );
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>10} {:>11} {:>11} {:>11} {:>11}",
        "offered/s",
        "generated/s",
        "generated",
        "delivered",
        "deliv/s",
        "kernel lost",
        "rep kernel",
        "rep slow",
        "unaccounted"
    );
    for s in &steps {
        println!(
            "{:>10} {:>10.0} {:>10} {:>10} {:>10.0} {:>11} {:>11} {:>11} {:>11}",
            s.offered_per_s,
            s.generated_per_s,
            s.generated,
            s.delivered,
            s.delivered_per_s,
            s.kernel_lost,
            s.reported_kernel_lost,
            s.reported_slow_client_lost,
            s.unaccounted
        );
    }
    let max_lossless = steps
        .iter()
        .filter(|s| s.delivered == s.generated)
        .map(|s| s.generated_per_s)
        .fold(0.0, f64::max);
    println!(
        "highest rate delivered without loss: {max_lossless:.0}/s (target: >= 200000/s, losses above counted exactly)"
    );
    Ok(Report {
        steps,
        max_lossless_per_s: max_lossless,
    })
}

/// Waits until deliveries stop (and the agent's once-a-second loss report had time to come), returns
/// when the last one came.
fn settle(counts: &Counts) -> Instant {
    let mut last = counts.flows.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = counts.flows.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_millis(1500) {
            return last_change;
        }
    }
}
