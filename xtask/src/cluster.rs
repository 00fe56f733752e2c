//! `cargo xtask cluster up | down | status | kubeconfig | kubectl`: a one-node Kubernetes cluster built
//! from upstream's Go modules (`tests/cluster`), to run the agent as a real DaemonSet against a real
//! kubelet, kube-proxy and CoreDNS.
//!
//! The node is a network namespace of its own, `ztcluster-node`, joined to the host by one veth pair
//! (`ztcluster0` 10.250.0.1/30 and fd00:10:250::1/126 on the host, `eth0` 10.250.0.2/30 and
//! fd00:10:250::2/126 in the node; 10.250.0.2 is the node's primary IP and the apiserver's address).
//! Every component runs in it (`nsenter --net`, not `ip netns exec`, which remounts /sys), so
//! kube-proxy's iptables or nftables rules, the pods' veths and their routes live there and disappear
//! with it. Nothing the cluster sends gets past the host: the node's default routes lead to the host,
//! which does not forward. On the host, the pod and Service ranges are routed into the node, so a test
//! on the host that reaches a pod or a ClusterIP stays on this machine.
//!
//! Dual stack, IPv4 first. Pods get addresses from 10.244.0.0/24 and fd00:10:244::/64 (CNI `ptp` +
//! `host-local`): one veth per pod, `vethXXXXXXXX` on the node with a /32 and a /128 route to the pod,
//! `eth0` in the pod. Services are 10.96.0.0/16 and fd00:10:96::/112 (IPv4 unless a Service asks for
//! both), the DNS Service `kube-dns` 10.96.0.10, the domain cluster.local.
//!
//! This machine's quirks: cgroup v1 only (the kubelet needs `failCgroupV1: false`), no systemd (the
//! `cgroupfs` driver everywhere), no registry (images are OCI archives written here and imported into
//! containerd), root without CAP_SYS_RESOURCE (containerd's `restrict_oom_score_adj`). The kubelet runs
//! in a mount namespace of its own where the kernel tunables it would otherwise rewrite for the whole
//! machine (kernel.panic=10, kernel.panic_on_oops=1, vm.overcommit_memory=1, …) read as the values it
//! wants; its root directory is a shared mount so that the volumes it mounts there reach containerd.
//! tests/cluster/README.md lists every setting this machine needed and why.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Subcommand, ValueEnum};

use crate::{cmd, free_bytes, gib, is_root, output, root, run, step};

type Result<T, E = anyhow::Error> = std::result::Result<T, E>;

const NETNS: &str = "ztcluster-node";
const NODE_NAME: &str = "ztrust-node";
const HOST_IF: &str = "ztcluster0";
const NODE_IF: &str = "eth0";
const HOST_IP: &str = "10.250.0.1";
const NODE_IP: &str = "10.250.0.2";
const LINK_PREFIX_LEN: u8 = 30;
const CLUSTER_CIDR: &str = "10.244.0.0/16";
const POD_CIDR: &str = "10.244.0.0/24";
const SERVICE_CIDR: &str = "10.96.0.0/16";
// Dual stack, as the lab (fd00:10:244::/64 for the pods). IPv4 is the primary family: the apiserver
// advertises 10.250.0.2, and Services are IPv4 unless they ask for both.
const HOST_IP6: &str = "fd00:10:250::1";
const NODE_IP6: &str = "fd00:10:250::2";
const LINK_PREFIX_LEN6: u8 = 126;
const CLUSTER_CIDR6: &str = "fd00:10:244::/56";
const POD_CIDR6: &str = "fd00:10:244::/64";
const SERVICE_CIDR6: &str = "fd00:10:96::/112";
const API_SERVICE_IP: &str = "10.96.0.1";
const DNS_SERVICE_IP: &str = "10.96.0.10";
const CLUSTER_DOMAIN: &str = "cluster.local";

/// "The internet", for the seed's `database → https://example.com` check: a network namespace of its
/// own behind the node (`ztext0` 192.0.2.1/24 in the node, `eth0` 192.0.2.80/24 in it, TEST-NET-1),
/// serving HTTP on port 80. CoreDNS answers `example.com` with its address, so a pod that is allowed
/// out reaches it by that name, and a test can tell "blocked" from "there is nothing out there".
const EXT_NETNS: &str = "ztcluster-ext";
const EXT_NODE_IF: &str = "ztext0";
const EXT_NODE_IP: &str = "192.0.2.1";
pub const EXT_IP: &str = "192.0.2.80";
pub const EXT_NAME: &str = "example.com";
/// The agent DaemonSet's pin directory on the host's bpffs (deploy/base/daemonset.yaml: the default).
const AGENT_PIN_DIR: &str = "/sys/fs/bpf/ztrust";

/// Etcd data, the PKI, configuration, the kubelet's and containerd's directories: all removed by `down`.
const STATE_DIR: &str = "/var/lib/ztrust-cluster";
/// Sockets, containerd's runtime state and the pods' network namespaces (containerd's
/// `netns_mounts_under_state_dir`), and the components' pid files.
const RUN_DIR: &str = "/run/ztrust-cluster";

/// What the node runs on besides our own binaries: Debian's containerd and runc, the reference CNI
/// plugins (in /usr/lib/cni), busybox for the workload image, and the tools kube-proxy and the kubelet
/// exec.
const PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    "iptables",
    "nftables",
    "conntrack",
    "iproute2",
    "util-linux",
    "mount",
];

pub const PAUSE_IMAGE: &str = "ztrust.test/pause:1";
pub const WORKLOAD_IMAGE: &str = "ztrust.test/workload:1";
/// The name deploy/base/daemonset.yaml pulls (IfNotPresent), so the DaemonSet runs the local build.
pub const AGENT_IMAGE: &str = "ghcr.io/ztrust/ztrust-agent:0.1.0";

/// The components in start order (stopped in reverse).
const COMPONENTS: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
    "kube-proxy",
];
/// Links to the multicall binary, one per name it answers to.
const LINKS: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
    "coredns",
];

#[derive(Subcommand)]
pub enum Action {
    /// Build what is missing or stale, start the node and its control plane, wait until the node is
    /// Ready and CoreDNS answers.
    Up {
        /// kube-proxy's mode.
        #[arg(long, value_enum, default_value_t = ProxyMode::Iptables)]
        proxy_mode: ProxyMode,
        /// Also build the agent (`cargo build --release`) and import its image, ghcr.io/ztrust/ztrust-agent:0.1.0.
        /// Without it the image is imported only if target/release/ztrust-agent exists.
        #[arg(long)]
        agent: bool,
    },
    /// Stop everything and remove the cluster's state, mounts, network namespaces and rules.
    Down,
    /// Components, the node and the pods.
    Status,
    /// Stops one component of the running cluster and starts it again with the same flags, then waits
    /// until the API server answers (and, for the kubelet, the node is Ready): for fault tests.
    Restart {
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(COMPONENTS))]
        component: String,
        /// SIGKILL instead of SIGTERM: a crash, no graceful shutdown (which waits for its clients).
        #[arg(long)]
        kill: bool,
    },
    /// The admin kubeconfig's path (`--print`: its content).
    Kubeconfig {
        #[arg(long)]
        print: bool,
    },
    /// kubectl with the admin kubeconfig: `cargo xtask cluster kubectl -- get pods -A`.
    Kubectl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ProxyMode {
    Iptables,
    Nftables,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Nftables => "nftables",
        }
    }
}

pub fn run_action(action: Action) -> Result<()> {
    match action {
        Action::Up { proxy_mode, agent } => up(proxy_mode, agent),
        Action::Down => down(),
        Action::Status => status(),
        Action::Restart { component, kill } => restart(&component, kill),
        Action::Kubeconfig { print } => {
            let path = admin_kubeconfig();
            if !path.exists() {
                bail!(
                    "no cluster: {} does not exist (cargo xtask cluster up)",
                    path.display()
                );
            }
            if print {
                print!("{}", fs::read_to_string(&path)?);
            } else {
                println!("{}", path.display());
            }
            Ok(())
        }
        Action::Kubectl { args } => {
            let args: Vec<&str> = args.iter().map(String::as_str).filter(|a| *a != "--").collect();
            let status = kubectl_cmd(&args).status().context("starting kubectl")?;
            std::process::exit(status.code().unwrap_or(1));
        }
    }
}

/// Where everything of ours lives.
struct Paths {
    /// tests/cluster, the Go module.
    module: PathBuf,
    /// target/cluster/bin: ztrust-k8s and its links, ztrust-k8s-tool, pause.
    bin: PathBuf,
    /// target/cluster/images: the OCI archives.
    images: PathBuf,
    /// target/cluster/logs: one log per component, kept after `down`, emptied by `up`.
    logs: PathBuf,
    state: PathBuf,
    run: PathBuf,
}

impl Paths {
    fn new() -> Self {
        let target = root().join("target/cluster");
        Paths {
            module: root().join("tests/cluster"),
            bin: target.join("bin"),
            images: target.join("images"),
            logs: target.join("logs"),
            state: PathBuf::from(STATE_DIR),
            run: PathBuf::from(RUN_DIR),
        }
    }
    fn pki(&self) -> PathBuf {
        self.state.join("pki")
    }
    fn config(&self) -> PathBuf {
        self.state.join("config")
    }
    fn kubelet_dir(&self) -> PathBuf {
        self.state.join("kubelet")
    }
    fn containerd_sock(&self) -> PathBuf {
        self.run.join("containerd.sock")
    }
    fn pid_file(&self, component: &str) -> PathBuf {
        self.run.join("pids").join(format!("{component}.pid"))
    }
    fn log(&self, component: &str) -> PathBuf {
        self.logs.join(format!("{component}.log"))
    }
    /// The program a component runs as (its argv[0], which `down` checks before signalling a pid).
    fn program(&self, component: &str) -> PathBuf {
        match component {
            "containerd" => PathBuf::from("/usr/bin/containerd"),
            c => self.bin.join(c),
        }
    }
}

fn admin_kubeconfig() -> PathBuf {
    Paths::new().pki().join("admin.kubeconfig")
}

fn netns_path() -> String {
    format!("/run/netns/{NETNS}")
}

// ---------------------------------------------------------------------------------------------- up

pub fn up(proxy_mode: ProxyMode, agent: bool) -> Result<()> {
    if !is_root() {
        bail!("the cluster creates a network namespace, mounts and cgroups: run it as root");
    }
    let started = Instant::now();
    let p = Paths::new();
    let running: Vec<&str> = COMPONENTS
        .iter()
        .copied()
        .filter(|c| running_pid(&p, c).is_some())
        .collect();
    if running.len() == COMPONENTS.len() {
        eprintln!("the cluster is already up");
        return status();
    }
    if !running.is_empty() {
        bail!(
            "a cluster is partly up (running: {}): `cargo xtask cluster down` first",
            running.join(", ")
        );
    }
    if Path::new(&netns_path()).exists() || p.state.exists() || p.run.exists() {
        // Whatever stopped the last cluster (the end of a session ends its processes) left its
        // namespace, mounts and state behind.
        eprintln!("nothing runs, but a previous cluster left state behind: cleaning it up first");
        down()?;
    }

    install_packages()?;
    let version = build_binaries(&p)?;
    if agent {
        crate::build_agent(true)?;
    }
    step("cluster: images (OCI archives for containerd)");
    let images = build_images(&p, &version)?;

    step(&format!(
        "cluster: node network namespace {NETNS} (node IP {NODE_IP})"
    ));
    create_dirs(&p)?;
    create_network()?;
    mount_bpffs()?;
    step("cluster: PKI and kubeconfigs");
    let mut pki = Command::new(p.bin.join("ztrust-k8s-tool"));
    pki.args([
        "pki",
        "--node-name",
        NODE_NAME,
        "--node-ip",
        NODE_IP,
        "--service-ip",
        API_SERVICE_IP,
        "--san",
        HOST_IP,
        "--san",
        NODE_IP6,
    ])
    .arg("--dir")
    .arg(p.pki())
    .arg("--server")
    .arg(format!("https://{NODE_IP}:6443"));
    run(pki)?;
    write_configs(&p, proxy_mode)?;

    step("cluster: control plane");
    start(&p, "etcd", &args_of(&p, "etcd"))?;
    wait_until("etcd", Duration::from_secs(60), &p, "etcd", || {
        Ok(fs::read_to_string(p.log("etcd")).is_ok_and(|l| l.contains("etcd: ready")))
    })?;
    start(&p, "kube-apiserver", &args_of(&p, "kube-apiserver"))?;
    wait_until(
        "kube-apiserver /readyz",
        Duration::from_secs(120),
        &p,
        "kube-apiserver",
        || Ok(output(kubectl_cmd(&["get", "--raw", "/readyz"])).is_some_and(|o| o.trim() == "ok")),
    )?;
    start(
        &p,
        "kube-controller-manager",
        &args_of(&p, "kube-controller-manager"),
    )?;
    start(&p, "kube-scheduler", &args_of(&p, "kube-scheduler"))?;

    step("cluster: node (containerd, kubelet, kube-proxy)");
    start(&p, "containerd", &args_of(&p, "containerd"))?;
    wait_until("containerd", Duration::from_secs(30), &p, "containerd", || {
        Ok(ctr(&p, &["version"]).output()?.status.success())
    })?;
    for (name, archive) in &images {
        let t = Instant::now();
        let mut c = ctr(&p, &["images", "import"]);
        c.arg(archive).stdout(Stdio::null());
        run(c).with_context(|| format!("importing {name}"))?;
        eprintln!("imported {name} ({:.1}s)", t.elapsed().as_secs_f64());
    }
    // The kubelet's volumes (projected tokens, ConfigMaps) are mounted under its root directory in its
    // own mount namespace; a shared mount there carries them to containerd's and runc's.
    let kubelet_dir = path_str(&p.kubelet_dir());
    run(cmd("mount", &["--bind", &kubelet_dir, &kubelet_dir]))?;
    run(cmd("mount", &["--make-rshared", &kubelet_dir]))?;
    start(&p, "kubelet", &args_of(&p, "kubelet"))?;
    start(&p, "kube-proxy", &args_of(&p, "kube-proxy"))?;
    wait_until(
        &format!("node {NODE_NAME} Ready"),
        Duration::from_secs(120),
        &p,
        "kubelet",
        || Ok(node_ready()),
    )?;

    step("cluster: CoreDNS (Deployment coredns, Service kube-dns 10.96.0.10)");
    let mut apply = kubectl_cmd(&["apply", "-f", "-"]);
    pipe(&mut apply, &coredns_manifest(&version.coredns_image))?;
    wait_until(
        "CoreDNS available",
        Duration::from_secs(120),
        &p,
        "kubelet",
        || {
            Ok(output(kubectl_cmd(&[
                "-n",
                "kube-system",
                "get",
                "deployment",
                "coredns",
                "-o",
                "jsonpath={.status.availableReplicas}",
            ]))
            .is_some_and(|o| o.trim() == "1"))
        },
    )?;

    eprintln!(
        "\ncluster up in {:.0}s: Kubernetes {} (kube-proxy {}), node {NODE_NAME} at {NODE_IP}\n  \
         export KUBECONFIG={}\n  kubectl: {} (or `cargo xtask cluster kubectl -- get pods -A`)\n  logs: {}",
        started.elapsed().as_secs_f64(),
        version.kubernetes,
        proxy_mode.as_str(),
        admin_kubeconfig().display(),
        p.bin.join("kubectl").display(),
        p.logs.display()
    );
    Ok(())
}

fn install_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(cmd("dpkg-query", &["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("cluster: apt packages {}", missing.join(" ")));
    run(cmd("apt-get", &["update", "-q"]))?;
    let mut c = cmd("apt-get", &["install", "-y", "-q", "--no-install-recommends"]);
    c.args(&missing).env("DEBIAN_FRONTEND", "noninteractive");
    run(c)
}

fn create_dirs(p: &Paths) -> Result<()> {
    for dir in [
        p.pki(),
        p.config(),
        p.kubelet_dir(),
        p.state.join("cni/net.d"),
        p.state.join("pod-logs"),
        p.run.join("pids"),
    ] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::create_dir_all(&p.logs)?;
    for c in COMPONENTS {
        let _ = fs::remove_file(p.log(c));
    }
    Ok(())
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_owned()
}

pub fn down() -> Result<()> {
    if !is_root() {
        bail!("run it as root");
    }
    let started = Instant::now();
    let p = Paths::new();
    step("cluster down");
    // The node first, so that nothing restarts the containers being killed.
    for component in ["kube-proxy", "kubelet"] {
        stop(&p, component);
    }
    kill_pod_processes();
    stop(&p, "containerd");
    kill_shims(&p);
    for component in [
        "kube-scheduler",
        "kube-controller-manager",
        "kube-apiserver",
        "etcd",
    ] {
        stop(&p, component);
    }
    // Containers' root filesystems and /dev/shm, the pods' network namespaces, the kubelet's volumes
    // and its root directory's own bind mount: deepest first.
    let mut mounts = our_mounts(&p);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in &mounts {
        if !Command::new("umount").arg(m).status().is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
    }
    if let Err(e) = delete_netns(EXT_NETNS) {
        eprintln!("warning: {e:#}; going on");
    }
    // The DaemonSet's agent pinned its programs and maps on the host's bpffs so that they outlive it;
    // with the node gone they enforce nothing (their interfaces are gone), and the next cluster's agent
    // must not adopt them.
    if Path::new(AGENT_PIN_DIR).exists()
        && let Err(e) = fs::remove_dir_all(AGENT_PIN_DIR)
    {
        eprintln!("warning: removing {AGENT_PIN_DIR}: {e}; going on");
    }
    // The node's sockets: an orphaned TCP connection to a pod that is gone retransmits for minutes and
    // keeps the namespace, and so its devices, alive after it is deleted.
    if Path::new(&netns_path()).exists() {
        let mut ss = cmd(
            "nsenter",
            &[
                &format!("--net={}", netns_path()),
                "--",
                "ss",
                "-K",
                "-t",
                "-u",
                "-a",
                "-n",
            ],
        );
        ss.stdout(Stdio::null());
        if let Err(e) = run(ss) {
            eprintln!("warning: closing the node's sockets: {e:#}; going on");
        }
    }
    // The host's end of the node's link first, by itself: deleting a veth takes its peer with it at
    // once, while a deleted namespace's devices go only when the kernel's deferred clean-up of the
    // namespace runs, which a `cluster up` right after this one can beat ("File exists").
    if link_exists(HOST_IF)
        && let Err(e) = run(cmd("ip", &["link", "del", HOST_IF]))
    {
        eprintln!("warning: {e:#}; going on");
    }
    // Its other veths, kube-proxy's rules and conntrack entries go with it.
    delete_netns(NETNS)?;
    remove_cgroups();
    // libcni's cache of our pods' results (containerd 1.6 does not move it from /var/lib/cni): the
    // network of the configuration and containerd's loopback.
    if let Ok(entries) = fs::read_dir("/var/lib/cni/results") {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("ztrust-cluster-") || name.starts_with("cni-loopback-") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    // The kubelet's links to container logs (its ContainerLogsDir is not configurable).
    if let Ok(entries) = fs::read_dir("/var/log/containers") {
        for e in entries.flatten() {
            if fs::read_link(e.path()).is_ok_and(|t| t.starts_with(p.state.join("pod-logs"))) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    for dir in [&p.state, &p.run] {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    eprintln!(
        "cluster down in {:.1}s (logs kept in {})",
        started.elapsed().as_secs_f64(),
        p.logs.display()
    );
    Ok(())
}

/// Whether any component of a cluster runs.
pub fn is_running() -> bool {
    let p = Paths::new();
    COMPONENTS.iter().any(|c| running_pid(&p, c).is_some())
}

pub fn status() -> Result<()> {
    let p = Paths::new();
    println!("{:<24} {:<8} STATE", "COMPONENT", "PID");
    for c in COMPONENTS {
        match running_pid(&p, c) {
            Some(pid) => println!("{c:<24} {pid:<8} running"),
            None => println!("{c:<24} {:<8} stopped", "-"),
        }
    }
    if running_pid(&p, "kube-apiserver").is_none() {
        println!("\nno apiserver: `cargo xtask cluster up`");
        return Ok(());
    }
    println!("\nkubeconfig: {}", admin_kubeconfig().display());
    for args in [
        &["get", "nodes", "-o", "wide"][..],
        &["get", "pods", "-A", "-o", "wide"][..],
    ] {
        println!();
        let _ = kubectl_cmd(args).status();
    }
    Ok(())
}

mod build;
mod config;
mod network;
mod process;
mod teardown;

pub use self::build::prebuild_in_background;
use self::build::*;
use self::config::*;
use self::network::*;
use self::process::*;
use self::teardown::*;

#[cfg(test)]
mod tests;
