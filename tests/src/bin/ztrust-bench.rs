//! `cargo xtask bench [datapath|throughput|control-plane|flows|all] [--json FILE]`: performance of ztrust,
//! measured side by side. The sections live in `ztrust_tests::bench`; without a section, all run.
//! Each section prints a table; `--json FILE` writes every result as one JSON object.

use clap::{Parser, Subcommand};
use ztrust_tests::bench::{self, control, datapath, flows, throughput};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    section: Option<Section>,
    /// Write the results as JSON here too.
    #[arg(long, global = true)]
    json: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Section {
    /// Per-packet cost of the real programs (BPF_PROG_TEST_RUN) as the maps grow.
    Datapath(datapath::Args),
    /// Throughput through a veth pair: none vs ztrust vs iptables vs ipset, at 10/1,000/10,000 rules.
    Throughput(throughput::Args),
    /// Cold compile + map sync of synthetic clusters, peak RSS, single-change latency.
    ControlPlane(control::Args),
    /// Denied-flow events per second from the kernel ring buffer to a `flows --follow` client.
    Flows(flows::Args),
    /// Every section with its defaults.
    All,
    /// (internal) One control-plane size in a process of its own, for its peak RSS.
    #[command(hide = true)]
    ControlPlaneChild(control::ChildArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the benchmark loads eBPF programs: run as root"
    );
    if !matches!(cli.section, Some(Section::ControlPlaneChild(_))) {
        bench::remove_leftovers();
    }
    let mut out = serde_json::Map::new();
    let mut add = |name: &str, v: serde_json::Value| {
        out.insert(name.to_owned(), v);
    };
    match cli.section.unwrap_or(Section::All) {
        Section::ControlPlaneChild(a) => return control::child(&a),
        Section::Datapath(a) => add("datapath", serde_json::to_value(datapath::run_section(&a)?)?),
        Section::Throughput(a) => add("throughput", serde_json::to_value(throughput::run_section(&a)?)?),
        Section::ControlPlane(a) => add("control_plane", serde_json::to_value(control::run_section(&a)?)?),
        Section::Flows(a) => add("flows", serde_json::to_value(flows::run_section(&a)?)?),
        Section::All => {
            let started = std::time::Instant::now();
            let parse = |s: &str| -> Section {
                #[derive(Parser)]
                struct One {
                    #[command(subcommand)]
                    s: Section,
                }
                One::parse_from(["ztrust-bench", s]).s
            };
            for name in ["datapath", "throughput", "control-plane", "flows"] {
                eprintln!("\n=== {name} ({:.0}s elapsed)", started.elapsed().as_secs_f64());
                let v = match parse(name) {
                    Section::Datapath(a) => serde_json::to_value(datapath::run_section(&a)?)?,
                    Section::Throughput(a) => serde_json::to_value(throughput::run_section(&a)?)?,
                    Section::ControlPlane(a) => serde_json::to_value(control::run_section(&a)?)?,
                    Section::Flows(a) => serde_json::to_value(flows::run_section(&a)?)?,
                    _ => unreachable!(),
                };
                add(&name.replace('-', "_"), v);
            }
            eprintln!("\nall sections in {:.0}s", started.elapsed().as_secs_f64());
        }
    }
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
