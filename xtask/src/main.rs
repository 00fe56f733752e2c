//! Project automation: `cargo xtask setup | build | lab | test | bench | fuzz | cluster`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod cluster;

/// Debian packages the build needs. Debian's rustc ships the `core` sources that `-Z build-std=core`
/// needs for the BPF target (rustup's toolchains here have no `rust-src`); LLVM 22 is what bpf-linker
/// links against.
const BUILD_PACKAGES: &[&str] = &[
    "rustc-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "bpftool",
    "iproute2",
    "util-linux",
];
/// What the privileged tests drive besides the agent: a real port scanner, a real Prometheus server
/// (with promtool), capsh to run the agent with only the capabilities it needs, and ethtool to turn a
/// veth's segmentation offload and GRO off and on.
const TEST_PACKAGES: &[&str] = &[
    "nmap",
    "prometheus",
    "libcap2-bin",
    "ethtool",
    "iptables",
    "nftables",
    "curl",
];
/// What the lab needs beyond the build: its node's Services are nftables DNAT rules (as kube-proxy's
/// nftables mode writes them).
const LAB_PACKAGES: &[&str] = &["nftables"];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The unused-dependency check of `cargo xtask test` (installed by it, once).
const MACHETE_VERSION: &str = "0.9.2";
/// The rustup name under which Debian's toolchain (/usr) is linked for the eBPF build.
const BPF_TOOLCHAIN: &str = "ztrust-bpf";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything the build needs (idempotent; seconds when all is there).
    Setup,
    /// Set up and build the agent (the eBPF object is built and embedded by its build script) and the lab.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// The payments lab: build, bring pods up, probe, apply the policies, probe, show what was denied.
    Lab {
        /// Tear the lab down at the end instead of leaving it up to explore.
        #[arg(long)]
        down: bool,
    },
    /// Benchmarks (not tests): `cargo xtask bench [datapath|throughput|control-plane|flows|all] [--json FILE]`.
    /// Without a section, all of them (about 4 minutes on 2 cores, plus the build). Arguments go to the
    /// benchmark (`cargo xtask bench -- --help`, `cargo xtask bench flows --rates 100000,300000`; a `--`
    /// anywhere is dropped).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the manifest → policy engine path and the packet parser in the kernel (cargo-fuzz, nightly).
    /// A short run is part of `test`; `--seconds 3600` for a long one.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u32,
    },
    /// Build the OpenTelemetry Collector the OTLP tests export to (tests/otelcol; `test` builds it too).
    Otelcol,
    /// A one-node Kubernetes cluster built from upstream (tests/cluster): `cargo xtask cluster up`.
    Cluster {
        #[command(subcommand)]
        action: cluster::Action,
    },
    /// All tests: unit tests, then the privileged integration tests one at a time.
    Test {
        /// Only the unit tests (no root needed).
        #[arg(long)]
        unit: bool,
        /// Leave out the cluster tier (a real Kubernetes node: a first build of ~15 minutes, then ~1
        /// minute to start).
        #[arg(long)]
        no_cluster: bool,
        /// Extra filter passed to the privileged test binaries.
        filter: Option<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The OpenTelemetry Collector of the OTLP tests, built from its Go modules (`tests/otelcol`: go.mod
/// and go.sum pin the release) into `target/otelcol/otelcol`, where the tests look for it. About 1.5
/// minutes the first time on 2 cores; Go's cache makes it seconds after that.
fn otelcol() -> anyhow::Result<PathBuf> {
    step("build the OpenTelemetry Collector (tests/otelcol: core v0.161.0, OTLP receiver, file exporter)");
    if output(cmd("go", &["version"])).is_none() {
        bail!(
            "the OTLP test's OpenTelemetry Collector is built with Go (1.26 or later on PATH as `go`, and the Go module proxy)"
        );
    }
    let out = root().join("target/otelcol/otelcol");
    let out_str = out.to_str().context("non-UTF-8 target path")?.to_owned();
    let mut c = cmd("go", &["build", "-trimpath", "-o", &out_str, "."]);
    c.current_dir(root().join("tests/otelcol"));
    run(c)?;
    Ok(out)
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args).current_dir(root());
    c
}

fn run(mut c: Command) -> anyhow::Result<()> {
    let shown = format!("{c:?}");
    let status = c.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn output(mut c: Command) -> Option<String> {
    let out = c.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(what: &str) {
    eprintln!("\n\x1b[1m==> {what}\x1b[0m");
}

fn is_root() -> bool {
    output(cmd("id", &["-u"])).is_some_and(|s| s.trim() == "0")
}

fn setup() -> anyhow::Result<()> {
    setup_with(&[])
}

fn setup_with(extra_packages: &[&str]) -> anyhow::Result<()> {
    let started = Instant::now();
    step("setup: build toolchain");
    let missing: Vec<&str> = BUILD_PACKAGES
        .iter()
        .chain(extra_packages)
        .copied()
        .filter(|p| {
            !output(cmd("dpkg-query", &["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("apt packages: all present");
    } else {
        eprintln!("apt packages missing: {}", missing.join(" "));
        if !is_root() {
            bail!(
                "installing packages needs root: sudo apt-get install -y {}",
                missing.join(" ")
            );
        }
        run(cmd("apt-get", &["update", "-q"]))?;
        let mut c = cmd("apt-get", &["install", "-y", "-q", "--no-install-recommends"]);
        c.args(&missing).env("DEBIAN_FRONTEND", "noninteractive");
        run(c)?;
    }

    let have_linker =
        output(cmd("bpf-linker", &["--version"])).is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if have_linker {
        eprintln!("bpf-linker {BPF_LINKER_VERSION}: present");
    } else {
        eprintln!("installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)");
        // Without LLVM_PREFIX, bpf-linker's build finds an older llvm-config first.
        let mut c = cmd(
            "cargo",
            &[
                "install",
                "--locked",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                "llvm-22",
            ],
        );
        c.env("LLVM_PREFIX", "/usr/lib/llvm-22");
        run(c)?;
    }

    let linked = output(cmd("rustup", &["toolchain", "list"]))
        .is_some_and(|l| l.lines().any(|t| t.starts_with(BPF_TOOLCHAIN)));
    if linked {
        eprintln!("rustup toolchain {BPF_TOOLCHAIN}: linked");
    } else {
        run(cmd("rustup", &["toolchain", "link", BPF_TOOLCHAIN, "/usr"]))?;
        eprintln!("rustup toolchain {BPF_TOOLCHAIN}: linked to /usr (Debian's rustc with core sources)");
    }
    eprintln!("setup done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Builds the agent alone (`target/<profile>/ztrust-agent`), as its image has it: without the lab,
/// and without the `reference` feature the lab turns on (a build of both in one `cargo build` would
/// unify it into the agent). Returns the profile's directory.
fn build_agent(release: bool) -> anyhow::Result<PathBuf> {
    setup()?;
    step("build the agent");
    cargo_build("ztrust-agent", release)
}

/// The agent, then the lab beside it (`target/<profile>/ztrust-lab`).
fn build(release: bool) -> anyhow::Result<PathBuf> {
    build_agent(release)?;
    step("build the lab");
    cargo_build("ztrust-lab", release)
}

fn cargo_build(package: &str, release: bool) -> anyhow::Result<PathBuf> {
    let mut args = vec!["build", "--locked", "-p", package];
    if release {
        args.push("--release");
    }
    run(cmd("cargo", &args))?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" }))
}

fn lab(down: bool) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the lab creates network namespaces and loads eBPF programs: run it as root");
    }
    setup_with(LAB_PACKAGES)?;
    // The lab's agent is the `ztrust-agent` beside `ztrust-lab`.
    let lab = build(false)?.join("ztrust-lab");
    let example = root().join("deploy/examples/payments");
    let lab_cmd = |args: &[&str]| {
        let mut c = Command::new(&lab);
        c.args(args).current_dir(root());
        c
    };
    let path = |p: &str| example.join(p).to_str().expect("utf-8 path").to_owned();
    step(
        "lab up: the payments namespace as network namespaces over three nodes, each with its agent enforcing (no policies yet)",
    );
    // Allowed connections are logged too, so that `what-if` has them to replay.
    run(lab_cmd(&[
        "up",
        &path("cluster.yaml"),
        "--nodes",
        "3",
        "--agent-arg=--log-allowed",
    ]))?;
    step("the Services (ClusterIPs; the node translates them as kube-proxy's nftables mode does)");
    run(lab_cmd(&["apply", &path("services.yaml")]))?;
    step("probe: with no policy, everything reaches everything");
    run(lab_cmd(&["probe"]))?;
    step("apply the policies in deploy/examples/payments/policies");
    run(lab_cmd(&["apply", &path("policies")]))?;
    step("probe: default deny, with only the allowed paths open");
    run(lab_cmd(&["probe"]))?;
    step(
        "probe by Service (ClusterIP → the pod the node picked): the same verdicts, frontend → backend open",
    );
    run(lab_cmd(&["probe", "--via-service"]))?;
    step("denied connections caused by that probe, every node's (from the kernels' ring buffers)");
    run(lab_cmd(&["flows", "--denied", "-o", "table"]))?;
    step(
        "why frontend → database is dropped: each hook, its isolating policies, why no rule allows it, checked against the kernel maps of both nodes",
    );
    // Exit status 1 is the answer "dropped"; anything else (an error, the kernel differing) fails the lab.
    let mut explain = lab_cmd(&["explain", "payments/frontend", "payments/database:5432"]);
    let shown = format!("{explain:?}");
    let status = explain.status().with_context(|| format!("starting {shown}"))?;
    if status.code() != Some(1) {
        bail!("{shown}: expected the connection to be explained as dropped (exit 1), got {status}");
    }
    step("drop counters (per-CPU, from each node's pinned maps)");
    run(lab_cmd(&["status", "--counters"]))?;
    if down {
        step("lab down");
        run(lab_cmd(&["down"]))?;
    } else {
        eprintln!(
            "\nThe lab is still up. Try:\n  {0} probe -o json\n  {0} flows --denied --follow\n  {0} explain payments/backend payments/database:5432\n  {0} what-if --delete payments/frontend-to-backend\n  {0} down",
            lab.display()
        );
    }
    Ok(())
}

/// Passed / failed / ignored tests over every `cargo test` run of this invocation.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    /// Runs a `cargo test`, echoing its output, adding up its `test result:` lines.
    fn run(&mut self, mut c: Command) -> anyhow::Result<()> {
        use std::io::BufRead as _;
        let shown = format!("{c:?}");
        let mut child = c
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {shown}"))?;
        let stdout = child.stdout.take().expect("piped");
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |what: &str| {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim()
                                .strip_suffix(what)
                                .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
                        })
                        .unwrap_or(0)
                };
                self.passed += count(" passed");
                self.failed += count(" failed");
                self.ignored += count(" ignored");
            }
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("{shown} failed: {status}");
        }
        Ok(())
    }
}

/// One line on the disk: free space where the builds go, and what `target/` holds. A clean
/// `cargo xtask test` needs several GB; a full disk shows up as a linker's "No space left on device".
fn disk(when: &str) {
    let target = root().join("target");
    let avail = free_bytes(&root()).map(gib);
    let used = target
        .exists()
        .then(|| output(cmd("du", &["-sh", &target.display().to_string()])))
        .flatten()
        .and_then(|o| o.split_whitespace().next().map(str::to_owned));
    eprintln!(
        "disk {when}: {} free, target/ {}",
        avail.as_deref().unwrap_or("?"),
        used.as_deref().unwrap_or("empty")
    );
}

/// Free space on the file system that holds `path`, in bytes (`df`).
fn free_bytes(path: &Path) -> Option<u64> {
    output(cmd("df", &["--output=avail", "-B1", &path.display().to_string()]))
        .and_then(|o| o.lines().nth(1)?.trim().parse().ok())
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// tests/deploy/test_manifests.py in a virtualenv of its own (PyPI: kubernetes-validate bundles the schemas).
fn deploy_schema_tests() -> anyhow::Result<()> {
    let venv = root().join("target/deploy-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(cmd(
            "python3",
            &["-m", "venv", venv.to_str().expect("utf-8 path")],
        ))?;
    }
    let requirements = root().join("tests/deploy/requirements.txt");
    let mut pip = Command::new(&python);
    pip.args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "-r"])
        .arg(&requirements);
    run(pip)?;
    let mut t = Command::new(&python);
    t.args(["-m", "unittest", "discover", "-s", "tests/deploy", "-v"])
        .current_dir(root());
    run(t)
}

fn test(unit_only: bool, no_cluster: bool, filter: Option<String>) -> anyhow::Result<()> {
    let mut tally = Tally::default();
    disk("at the start");
    let result = test_tiers(unit_only, no_cluster, filter, &mut tally);
    disk("at the end");
    // One closing line for the whole run, whatever happened.
    println!(
        "\n{} ignored (the cluster tier's tests where no cluster runs, run in their tier; benchmarks)",
        tally.ignored
    );
    println!("summary: {} passed, {} failed", tally.passed, tally.failed);
    result
}

fn test_tiers(
    unit_only: bool,
    no_cluster: bool,
    filter: Option<String>,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    setup_with(TEST_PACKAGES)?;
    step("format (cargo fmt --all --check: rustfmt.toml)");
    run(cmd("cargo", &["fmt", "--all", "--check"]))?;
    lints()?;
    step("unit tests (no root)");
    // The privileged test binary is `test = false`: built and run below, as root.
    tally.run(cmd(
        "cargo",
        &["test", "--locked", "--workspace", "--exclude", "ztrust-ebpf"],
    ))?;
    step("deploy manifests against the Kubernetes 1.33 schemas (kubernetes-validate, offline)");
    deploy_schema_tests()?;
    if unit_only {
        return Ok(());
    }
    if !is_root() {
        bail!("the privileged tests load eBPF programs and create network namespaces: run as root");
    }
    otelcol()?;
    // The cluster tier's Go build (the first one takes ≈15 minutes) overlaps the privileged tests.
    let prebuild = (!no_cluster && filter.is_none()).then(cluster::prebuild_in_background);
    step("privileged integration tests (real programs, real packets through veth pairs), one at a time");
    // The same package selection as the unit tier, so the libraries' features are the same and the
    // dependencies are not built a second time.
    run(cmd(
        "cargo",
        &[
            "build",
            "--locked",
            "--workspace",
            "--exclude",
            "ztrust-ebpf",
            "--bins",
        ],
    ))?;
    let mut c = privileged_tests();
    c.args(["--", "--test-threads=1"]);
    if let Some(f) = &filter {
        c.arg(f);
    }
    tally.run(c)?;
    if let Some(build) = prebuild {
        match build.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("the background Go build failed ({e:#}); the cluster tier builds again"),
            Err(_) => eprintln!("the background Go build panicked; the cluster tier builds again"),
        }
    }
    if !no_cluster {
        cluster_tier(filter.as_deref(), tally)?;
    }
    if filter.is_none() {
        step("a short fuzz run (cargo xtask fuzz --seconds 3600 for a long one)");
        fuzz(20)?;
    }
    Ok(())
}

/// Clippy with warnings as errors (`[workspace.lints]`, `clippy.toml`) on every crate, the kernel one
/// included, and no declared dependency left unused.
fn lints() -> anyhow::Result<()> {
    step("lints (cargo clippy -D warnings; cargo machete: no unused dependencies)");
    // `--all-targets` leaves out the privileged test binary (`test = false`): it is named on its own.
    for targets in [&["--all-targets"][..], &["--test", "privileged"]] {
        let mut args = vec!["clippy", "--locked", "--workspace", "--exclude", "ztrust-ebpf"];
        args.extend_from_slice(targets);
        args.extend_from_slice(&["--", "-D", "warnings"]);
        run(cmd("cargo", &args))?;
    }
    // The kernel crate is built for BPF by a toolchain without clippy; clippy checks it for the host
    // (aya-ebpf builds there too), where `no_std` needs panics to abort.
    run(cmd(
        "cargo",
        &[
            "clippy",
            "--locked",
            "-p",
            "ztrust-ebpf",
            "--config",
            "profile.dev.panic=\"abort\"",
            "--",
            "-D",
            "warnings",
        ],
    ))?;
    // Run as itself, not as `cargo machete`: under `cargo xtask` the environment says it runs as a cargo
    // subcommand, and it then takes its own name for the directory to analyse.
    let machete = |args: &[&str]| {
        let mut c = cmd("cargo-machete", args);
        c.env_remove("CARGO");
        c
    };
    let have = output(machete(&["--version"])).is_some_and(|v| v.trim() == MACHETE_VERSION);
    if !have {
        eprintln!("installing cargo-machete {MACHETE_VERSION} (under a minute, once)");
        run(cmd(
            "cargo",
            &["install", "--locked", &format!("cargo-machete@{MACHETE_VERSION}")],
        ))?;
    }
    // The workspace and, below it, the fuzz crate (its own workspace).
    run(machete(&[]))
}

/// `cargo test` of the privileged test binary (tests/tests/privileged), with the agent binary the
/// end-to-end tests run; the caller adds the test binary's own arguments.
fn privileged_tests() -> Command {
    let mut c = cmd(
        "cargo",
        &[
            "test",
            "--locked",
            "--workspace",
            "--exclude",
            "ztrust-ebpf",
            "--test",
            "privileged",
        ],
    );
    c.env("ZTRUST_AGENT_BIN", root().join("target/debug/ztrust-agent"))
        .env("ZTRUST_LAB_BIN", root().join("target/debug/ztrust-lab"));
    c
}

/// The cluster tier (tests/tests/privileged/cluster.rs): a real node in each of kube-proxy's modes, the agent
/// deployed with `kubectl apply -k deploy/`. The cluster goes down after each mode, also when a test
/// failed (its logs stay in target/cluster/logs).
fn cluster_tier(filter: Option<&str>, tally: &mut Tally) -> anyhow::Result<()> {
    if cluster::is_running() {
        bail!(
            "a cluster is already up: the cluster tier needs its own (`cargo xtask cluster down` first, or --no-cluster)"
        );
    }
    if let Some(f) = filter {
        // Say so rather than start a node for nothing.
        let mut c = privileged_tests();
        c.args(["--", "--ignored", "--list", "cluster::"]);
        let list =
            output(c).context("listing the cluster tier's tests (does the privileged binary build?)")?;
        if !list.lines().any(|l| l.ends_with(": test") && l.contains(f)) {
            step(&format!("cluster tier: no cluster test matches {f:?}, not run"));
            return Ok(());
        }
    }
    for mode in [cluster::ProxyMode::Iptables, cluster::ProxyMode::Nftables] {
        step(&format!(
            "cluster tier: a real Kubernetes node (kube-proxy {}), the agent deployed as a user would, the seed's exercise",
            mode.as_str()
        ));
        let result = cluster::up(mode, true).and_then(|()| {
            // The cluster's tests are the `#[ignore]`d ones of the privileged binary (they need the node).
            let mut c = privileged_tests();
            // (`#[ignore]` is reserved for them, so a user's filter needs no `cluster::` of its own.)
            c.args(["--", "--ignored", "--test-threads=1"]);
            // The faults test the agent, not kube-proxy: they run in one mode; the seed's exercise in both.
            match (filter, mode) {
                (Some(f), _) => {
                    c.arg(f);
                }
                (None, cluster::ProxyMode::Nftables) => {
                    c.arg("cluster::seed_");
                }
                (None, cluster::ProxyMode::Iptables) => {
                    c.arg("cluster::");
                }
            }
            tally.run(c)
        });
        if result.is_err() {
            // What the cluster said, while it is still up.
            let _ = cluster::status();
        }
        let down = cluster::down();
        if let (Err(_), Err(e)) = (&result, &down) {
            eprintln!("cluster down failed too: {e:#}");
        }
        result?;
        down?;
    }
    Ok(())
}

fn bench(args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark loads eBPF programs and creates network namespaces: run it as root");
    }
    // What the throughput section compares ztrust with, and its traffic generator.
    setup_with(&["iperf3", "iptables", "ipset"])?;
    // The agent as its image has it (the flow section runs it), then the benchmark: one `cargo build`
    // of both would give the agent the features the benchmark's dependencies turn on.
    build_agent(true)?;
    step("build (release): the benchmark");
    run(cmd(
        "cargo",
        &[
            "build",
            "--locked",
            "--release",
            "-p",
            "ztrust-tests",
            "--bin",
            "ztrust-bench",
        ],
    ))?;
    step("benchmarks");
    let mut c = Command::new(root().join("target/release/ztrust-bench"));
    // `cargo xtask bench flows -- --rates …` reads naturally; the benchmark's own parser would take the
    // `--` as the end of its options.
    c.args(args.iter().filter(|a| *a != "--"))
        .env("ZTRUST_AGENT_BIN", root().join("target/release/ztrust-agent"));
    run(c)
}

const FUZZ_TARGETS: &[&str] = &["manifest_engine", "packet_datapath"];

fn fuzz(seconds: u32) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the packet target runs the eBPF programs in the kernel: run as root");
    }
    // cargo-fuzz needs unstable compiler flags (coverage instrumentation for libFuzzer). rustup's nightly
    // has them and its AddressSanitizer runtime; where nightly cannot be installed, Debian's rustc (the
    // `ztrust-bpf` toolchain set-up links) builds the targets with RUSTC_BOOTSTRAP=1, without a sanitizer:
    // the oracles (the reference evaluator) still check every input, only memory errors go unseen there.
    // (ZTRUST_FUZZ_NO_NIGHTLY=1 takes that path where nightly exists too.)
    let nightly = std::env::var_os("ZTRUST_FUZZ_NO_NIGHTLY").is_none()
        && output(cmd("rustup", &["run", "nightly", "rustc", "--version"])).is_some();
    let toolchain = if nightly { "+nightly" } else { "+ztrust-bpf" };
    if !nightly {
        eprintln!(
            "rustup has no nightly toolchain: fuzzing with {BPF_TOOLCHAIN} (Debian's rustc, RUSTC_BOOTSTRAP=1, no sanitizer)"
        );
    }
    let have = output(cmd("cargo", &["fuzz", "--version"])).is_some();
    if !have {
        step("installing cargo-fuzz (once)");
        run(cmd("cargo", &["install", "--locked", "cargo-fuzz"]))?;
    }
    for target in FUZZ_TARGETS {
        step(&format!("fuzz {target} for {seconds} s"));
        let corpus = root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let mut c = cmd("cargo", &[toolchain, "fuzz", "run", "-O", target]);
        if !nightly {
            c.args(["--sanitizer", "none"]).env("RUSTC_BOOTSTRAP", "1");
        }
        c.arg(&corpus);
        // Seeds: the example manifests for the engine (read only; new inputs go to `corpus`).
        if *target == "manifest_engine" {
            c.arg(root().join("deploy/examples"));
        }
        c.args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-max_len=4096",
            "-print_final_stats=1",
        ]);
        run(c)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Fuzz { seconds } => fuzz(seconds),
        Cmd::Bench { args } => bench(&args),
        Cmd::Setup => setup(),
        Cmd::Build { release } => {
            build(release).map(|p| eprintln!("built {0}/ztrust-agent and {0}/ztrust-lab", p.display()))
        }
        Cmd::Lab { down } => lab(down),
        Cmd::Otelcol => otelcol().map(|p| eprintln!("built {}", p.display())),
        Cmd::Test {
            unit,
            no_cluster,
            filter,
        } => test(unit, no_cluster, filter),
        Cmd::Cluster { action } => cluster::run_action(action),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rust_files(dir: &Path) -> Vec<(String, String)> {
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .map(|p| {
                let stem = p.file_stem().unwrap().to_str().unwrap().to_owned();
                (stem, std::fs::read_to_string(&p).unwrap())
            })
            .collect();
        out.sort();
        out
    }

    /// One binary per test directory: a test file not declared in its `main.rs` would never be built,
    /// silently. And `#[ignore]` is for the cluster tier only (the tier runs the ignored tests; an
    /// ignored test elsewhere would run nowhere).
    #[test]
    fn every_test_file_is_in_its_binary_and_gated_as_documented() {
        for dir in ["tests/tests/privileged", "ztrust-agent/tests/integration"] {
            let dir = root().join(dir);
            let files = rust_files(&dir);
            let main = &files.iter().find(|(stem, _)| stem == "main").expect("main.rs").1;
            assert!(files.len() > 5, "{}: {files:?}", dir.display());
            for (stem, text) in &files {
                if stem == "main" {
                    continue;
                }
                assert!(
                    main.lines().any(|l| l.trim() == format!("mod {stem};")),
                    "{}/{stem}.rs is not declared in main.rs",
                    dir.display()
                );
                let privileged = dir.ends_with("privileged");
                assert_eq!(
                    text.contains("#[ignore"),
                    privileged && stem == "cluster",
                    "{}/{stem}.rs: #[ignore] is for the cluster tier only",
                    dir.display()
                );
            }
        }
    }
    /// The source files of the crates stay readable: none over 800 lines, test modules aside (a file
    /// named `tests.rs`, `proptests.rs` or `testing.rs`, or under a `tests/` directory).
    #[test]
    fn no_source_file_is_over_800_lines() {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|e| e == "rs") {
                    out.push(p);
                }
            }
        }
        let mut long = Vec::new();
        let mut seen = 0;
        for src in [
            "ztrust-common/src",
            "ztrust-ebpf/src",
            "ztrust-agent/src",
            "ztrust-lab/src",
            "xtask/src",
            "tests/src",
            "fuzz/fuzz_targets",
        ] {
            let src = root().join(src);
            let mut files = Vec::new();
            walk(&src, &mut files);
            for p in files {
                let inside = p.strip_prefix(&src).unwrap();
                let test_module = inside.components().any(|c| c.as_os_str() == "tests")
                    || ["tests", "proptests", "testing"].contains(&p.file_stem().unwrap().to_str().unwrap());
                seen += 1;
                let n = std::fs::read_to_string(&p).unwrap().lines().count();
                if !test_module && n > 800 {
                    long.push(format!("{} ({n})", p.display()));
                }
            }
        }
        assert!(seen > 40, "found only {seen} source files");
        assert!(long.is_empty(), "over 800 lines: {long:?}");
    }
}
