//! Control plane at scale: synthetic clusters ([`super::synth`]) compiled by the real engine and synced
//! into real kernel maps (loaded with the real programs; local endpoints get fake ifindexes, which the
//! maps do not check). Measured per size, each in a process of its own so that its peak RSS (VmHWM) is
//! its own:
//! - cold: the engine's first update (a compile of the whole cluster for this node), then the first
//!   sync;
//! - single changes (pod added, label changed, policy edited, in turn): the time from the changed cluster
//!   to the kernel maps reflecting it, i.e. what the agent does per change with the Kubernetes source,
//!   whose watch events name the changed object: update the engine, sync the delta; and the map writes
//!   each change made. Reported beside it: what a source of whole snapshots (the directory source)
//!   adds, finding what differs from the previous snapshot (`Changes::between`). The source's poll
//!   interval, the API's watch latency and the conversion of the one changed object are not included.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use ztrust_agent::datapath::loader::{self, Capacities, Datapath};
use ztrust_agent::datapath::sync::{KernelMaps, Syncer};
use ztrust_agent::policy::{Changes, Engine};

use super::synth::Synth;
use super::{proc_status_kib, quantile};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Sizes as POLICIES:PODS (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000:5000,10000:50000")]
    pub sizes: Vec<String>,
    /// Pods on this node (with an interface, so with endpoint and policy entries in the maps).
    #[arg(long, default_value_t = 100)]
    pub local: usize,
    /// Single changes measured per size.
    #[arg(long, default_value_t = 200)]
    pub changes: usize,
    /// Stop measuring changes of one size after this many seconds (the count is reported).
    #[arg(long, default_value_t = 600)]
    pub max_seconds: u64,
    /// A Service per app (ClusterIP, EndpointSlice of its pods); `--services false` for the cluster of
    /// earlier versions of this benchmark.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub services: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ChildArgs {
    #[arg(long)]
    pub policies: usize,
    #[arg(long)]
    pub pods: usize,
    #[arg(long)]
    pub local: usize,
    #[arg(long)]
    pub changes: usize,
    #[arg(long)]
    pub max_seconds: u64,
    #[arg(long, action = clap::ArgAction::Set)]
    pub services: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct ChangeStats {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Of which the engine (update) and the map sync, medians and 99th percentiles (each of its own
    /// samples: a change's total tail need not be both parts' tails).
    pub compile_p50_ms: f64,
    pub sync_p50_ms: f64,
    #[serde(default)]
    pub compile_p99_ms: f64,
    #[serde(default)]
    pub sync_p99_ms: f64,
    pub writes_p50: f64,
    pub writes_max: usize,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct SizeResult {
    pub policies: usize,
    pub pods: usize,
    pub local_endpoints: usize,
    pub identities: usize,
    pub ipcache_entries: usize,
    pub policy_entries: usize,
    pub cold_compile_ms: f64,
    pub cold_sync_ms: f64,
    pub cold_writes: usize,
    pub cold_total_ms: f64,
    /// VmHWM after the cold compile and sync, and at the end (after the changes).
    pub peak_rss_cold_mib: f64,
    pub peak_rss_mib: f64,
    /// Median time to find one change by comparing two snapshots of the cluster (what the directory
    /// source adds to each change; the Kubernetes source's watches name the object instead).
    pub snapshot_diff_p50_ms: f64,
    /// All changes, then per kind.
    pub changes: ChangeStats,
    pub by_kind: BTreeMap<String, ChangeStats>,
}

#[derive(Serialize)]
pub struct Report {
    sizes: Vec<SizeResult>,
}

/// One change: total, engine and sync milliseconds, map writes.
type Sample = (f64, f64, f64, usize);

/// Changes per stretch whose tail is reported on its own (when there are more).
const STRETCH: usize = 200;

/// Snapshot diffs measured per size.
const DIFFS: usize = 21;

fn stats(samples: &[Sample]) -> ChangeStats {
    let sorted = |f: &dyn Fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let total = sorted(&|s| s.0);
    let writes = sorted(&|s| s.3 as f64);
    ChangeStats {
        count: samples.len(),
        p50_ms: quantile(&total, 0.5),
        p99_ms: quantile(&total, 0.99),
        max_ms: total.last().copied().unwrap_or(f64::NAN),
        compile_p50_ms: quantile(&sorted(&|s| s.1), 0.5),
        sync_p50_ms: quantile(&sorted(&|s| s.2), 0.5),
        compile_p99_ms: quantile(&sorted(&|s| s.1), 0.99),
        sync_p99_ms: quantile(&sorted(&|s| s.2), 0.99),
        writes_p50: quantile(&writes, 0.5),
        writes_max: samples.iter().map(|s| s.3).max().unwrap_or(0),
    }
}

/// One size, in this process: prints the result as one JSON line on stdout.
pub fn child(a: &ChildArgs) -> anyhow::Result<()> {
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/ztbcp{}", std::process::id()));
    let _ = loader::cleanup(&pin);
    let caps = Capacities {
        policy: 1 << 21,
        ipcache: 1 << 20,
        ..Capacities::default()
    };
    let result = (|| -> anyhow::Result<SizeResult> {
        let mut dp = Datapath::load_with(&pin, caps)?;
        let mut synth = Synth::new(a.policies, a.pods, a.local, a.services);
        let mut r = SizeResult {
            policies: a.policies,
            pods: a.pods,
            local_endpoints: synth.interfaces.len(),
            ..Default::default()
        };
        let mut syncer = Syncer::new();
        syncer.capacities = caps;

        let t0 = Instant::now();
        let mut engine = Engine::for_node(super::synth::THIS_NODE);
        engine.update(&synth.cluster, &Changes::default());
        let delta = engine.take_delta();
        let t1 = Instant::now();
        let s = syncer.sync_delta(
            &mut KernelMaps(&mut dp.maps),
            engine.desired(),
            &synth.interfaces,
            &delta,
        )?;
        let t2 = Instant::now();
        r.cold_compile_ms = (t1 - t0).as_secs_f64() * 1e3;
        r.cold_sync_ms = (t2 - t1).as_secs_f64() * 1e3;
        r.cold_total_ms = (t2 - t0).as_secs_f64() * 1e3;
        r.cold_writes = s.total();
        r.identities = engine.desired().identities.len();
        r.ipcache_entries = syncer.ipcache_entries();
        r.policy_entries = syncer.policy_entries();
        r.peak_rss_cold_mib = proc_status_kib("VmHWM") as f64 / 1024.0;
        eprintln!(
            "  {} policies / {} pods / {} Services: cold compile {:.0} ms, sync {:.0} ms ({} writes), peak RSS {:.0} MiB; {} changes ...",
            a.policies,
            a.pods,
            synth.cluster.services.len(),
            r.cold_compile_ms,
            r.cold_sync_ms,
            r.cold_writes,
            r.peak_rss_cold_mib,
            a.changes
        );

        let mut all = Vec::new();
        let mut kinds: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
        let budget = Instant::now() + std::time::Duration::from_secs(a.max_seconds);
        for i in 0..a.changes {
            if Instant::now() > budget {
                eprintln!("  time budget of {} s spent after {i} changes", a.max_seconds);
                break;
            }
            let (kind, changes) = synth.change(i);
            let t0 = Instant::now();
            engine.update(&synth.cluster, &changes);
            let delta = engine.take_delta();
            let t1 = Instant::now();
            let s = syncer.sync_delta(
                &mut KernelMaps(&mut dp.maps),
                engine.desired(),
                &synth.interfaces,
                &delta,
            )?;
            let t2 = Instant::now();
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            let sample = (ms(t2 - t0), ms(t1 - t0), ms(t2 - t1), s.total());
            all.push(sample);
            kinds.entry(kind.to_owned()).or_default().push(sample);
        }
        // The node grows as changes add pods to it: the tail per stretch of changes shows what that does.
        if all.len() > STRETCH {
            for (i, stretch) in all.chunks(STRETCH).enumerate() {
                let st = stats(stretch);
                eprintln!(
                    "  changes {:>5}..{:<5}: p50 {:.2} ms, p99 {:.2} ms (engine {:.2}, sync {:.2})",
                    i * STRETCH,
                    i * STRETCH + stretch.len(),
                    st.p50_ms,
                    st.p99_ms,
                    st.compile_p99_ms,
                    st.sync_p99_ms
                );
            }
            eprintln!("  local endpoints at the end: {}", synth.interfaces.len());
        }
        r.changes = stats(&all);
        r.by_kind = kinds.iter().map(|(k, v)| (k.clone(), stats(v))).collect();
        r.peak_rss_mib = proc_status_kib("VmHWM") as f64 / 1024.0;

        // What a source of whole snapshots adds: finding the change by comparing two snapshots (after
        // the peak RSS is taken, as this holds two copies of the cluster).
        let mut diffs = Vec::new();
        for i in 0..DIFFS {
            let previous = synth.cluster.clone();
            let (_, changes) = synth.change(i);
            let t0 = Instant::now();
            let found = Changes::between(&previous, &synth.cluster);
            diffs.push(t0.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(
                found == changes,
                "the change names {changes:?}, the diff finds {found:?}"
            );
        }
        diffs.sort_by(f64::total_cmp);
        r.snapshot_diff_p50_ms = quantile(&diffs, 0.5);
        Ok(r)
    })();
    let _ = loader::cleanup(&pin);
    println!("{}", serde_json::to_string(&result?)?);
    Ok(())
}

pub fn run_section(args: &Args) -> anyhow::Result<Report> {
    let exe = std::env::current_exe()?;
    let mut sizes = Vec::new();
    for size in &args.sizes {
        let (p, q) = size
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("size {size}: want POLICIES:PODS"))?;
        let out = Command::new(&exe)
            .args(["control-plane-child", "--policies", p, "--pods", q])
            .args([
                "--local",
                &args.local.to_string(),
                "--changes",
                &args.changes.to_string(),
            ])
            .args(["--max-seconds", &args.max_seconds.to_string()])
            .args(["--services", &args.services.to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "control-plane size {size} failed: {}",
            out.status
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let r: SizeResult = serde_json::from_str(line.trim().lines().last().unwrap_or_default())?;
        sizes.push(r);
    }

    println!(
        "\nControl plane: cold start, and single changes named by the source (incremental engine update + delta sync)"
    );
    println!(
        "{:>8} {:>6} {:>6} {:>5} {:>7} {:>7} | {:>9} {:>8} {:>8} {:>8} | {:>7} | {:>7} {:>8} {:>8} {:>11} {:>7}",
        "policies",
        "pods",
        "local",
        "ids",
        "ipcache",
        "policy",
        "compile",
        "sync",
        "writes",
        "cold",
        "RSS MiB",
        "changes",
        "p50 ms",
        "p99 ms",
        "diff p50",
        "writes"
    );
    for r in &sizes {
        println!(
            "{:>8} {:>6} {:>6} {:>5} {:>7} {:>7} | {:>7.0}ms {:>6.0}ms {:>8} {:>6.0}ms | {:>7.0} | {:>7} {:>8.2} {:>8.2} {:>7.1}ms {:>7.0}",
            r.policies,
            r.pods,
            r.local_endpoints,
            r.identities,
            r.ipcache_entries,
            r.policy_entries,
            r.cold_compile_ms,
            r.cold_sync_ms,
            r.cold_writes,
            r.cold_total_ms,
            r.peak_rss_mib,
            r.changes.count,
            r.changes.p50_ms,
            r.changes.p99_ms,
            r.snapshot_diff_p50_ms,
            r.changes.writes_p50
        );
        for (kind, s) in &r.by_kind {
            println!(
                "{:>30} {:<14} p50 {:>7.2} ms  p99 {:>7.2} ms  engine p50/p99 {:>5.2}/{:<5.2} ms  sync p50/p99 {:>5.2}/{:<5.2} ms  writes p50 {:>5.0} max {:>5}",
                "",
                kind,
                s.p50_ms,
                s.p99_ms,
                s.compile_p50_ms,
                s.compile_p99_ms,
                s.sync_p50_ms,
                s.sync_p99_ms,
                s.writes_p50,
                s.writes_max
            );
        }
    }
    println!(
        "(targets at the larger size: cold <= 2000 ms, peak RSS <= 256 MiB, single change p99 <= 10 ms;"
    );
    println!(" diff = what a source of whole snapshots adds per change to find it, not in p50/p99)");
    Ok(Report { sizes })
}
