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

use crate::{cmd, is_root, output, root, run, step};

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
        crate::build(true)?;
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

/// What the binaries were built from, read from tests/cluster/go.mod.
struct Versions {
    kubernetes: String,
    coredns_image: String,
}

fn module_version(go_mod: &str, module: &str) -> Option<String> {
    go_mod.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some(module))
            .then(|| words.next().map(str::to_owned))
            .flatten()
    })
}

/// Builds the Go binaries in a thread of its own, at the lowest CPU priority (`nice -n 19`), so that
/// the first build (the whole of Kubernetes, ≈15 minutes on 2 cores) overlaps the privileged tests, which
/// mostly wait on packets; `up` then finds them built. Join it before `up`: if it failed, `up` builds
/// again in the foreground and reports.
pub fn prebuild_in_background() -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(|| build_binaries_with(&Paths::new(), true).map(|_| ()))
}

/// Builds the Go binaries when a source file of the module is newer than them: the first build takes
/// long (the whole of Kubernetes), later `up`s reuse it.
fn build_binaries(p: &Paths) -> Result<Versions> {
    build_binaries_with(p, false)
}

fn build_binaries_with(p: &Paths, background: bool) -> Result<Versions> {
    let go = |background: bool| {
        if background {
            let mut c = Command::new("nice");
            c.args(["-n", "19", "go"]);
            c
        } else {
            Command::new("go")
        }
    };
    let said = |what: &str| {
        if background {
            eprintln!("(in the background, nice 19) {what}");
        } else {
            step(what);
        }
    };
    let go_mod = fs::read_to_string(p.module.join("go.mod")).context("reading tests/cluster/go.mod")?;
    let kubernetes =
        module_version(&go_mod, "k8s.io/kubernetes").context("go.mod requires no k8s.io/kubernetes")?;
    let coredns =
        module_version(&go_mod, "github.com/coredns/coredns").context("go.mod requires no coredns")?;
    let versions = Versions {
        coredns_image: format!("ztrust.test/coredns:{coredns}"),
        kubernetes: kubernetes.clone(),
    };

    fs::create_dir_all(&p.bin)?;
    // A binary is stale when go.mod, go.sum or its own package changed after it was built.
    let stale = |name: &str| -> Result<bool> {
        let mut sources = newest_mtime(&p.module.join("cmd").join(name))?;
        for f in ["go.mod", "go.sum"] {
            sources = sources.max(fs::metadata(p.module.join(f))?.modified()?);
        }
        Ok(fs::metadata(p.bin.join(name))
            .and_then(|m| m.modified())
            .map_or(true, |t| t < sources))
    };

    if output(cmd("go", &["version"])).is_none() {
        bail!("the cluster's components are built with Go (1.26 or later on PATH as `go`)");
    }
    if stale("ztrust-k8s-tool")? || stale("pause")? {
        said("cluster: build ztrust-k8s-tool and pause (Go)");
        let mut c = go(background);
        c.args(["build", "-trimpath", "-ldflags", "-s -w", "-o"])
            .arg(format!("{}/", p.bin.display()))
            .args(["./cmd/ztrust-k8s-tool", "./cmd/pause"])
            .current_dir(&p.module)
            .env("CGO_ENABLED", "0");
        run(c)?;
    }
    if stale("ztrust-k8s")? {
        said(&format!(
            "cluster: build ztrust-k8s (Kubernetes {kubernetes}, etcd, CoreDNS {coredns}; the first build takes 10-20 minutes)"
        ));
        let t = Instant::now();
        let mut c = go(background);
        c.args([
            "build",
            "-trimpath",
            "-ldflags",
            &version_ldflags(&kubernetes)?,
            "-o",
        ])
        .arg(p.bin.join("ztrust-k8s"))
        .arg("./cmd/ztrust-k8s")
        .current_dir(&p.module)
        // Static, as upstream's release binaries: the same file runs on the node and, for CoreDNS,
        // in an image that has no C library.
        .env("CGO_ENABLED", "0");
        run(c)?;
        eprintln!("built ztrust-k8s in {:.0}s", t.elapsed().as_secs_f64());
    }
    for link in LINKS {
        let path = p.bin.join(link);
        if fs::symlink_metadata(&path).is_err() {
            std::os::unix::fs::symlink("ztrust-k8s", &path)?;
        }
    }
    Ok(versions)
}

/// The version stamps upstream's build (hack/lib/version.sh) sets, so that `kubectl version`, the
/// apiserver's /version and the node's kubeletVersion say what was built. There is no git commit: the
/// sources come from the module proxy.
fn version_ldflags(kubernetes: &str) -> Result<String> {
    let mut parts = kubernetes.trim_start_matches('v').split('.');
    let (major, minor) = (parts.next().context("version")?, parts.next().context("version")?);
    let date = output(cmd("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])).context("date")?;
    let mut flags = String::from("-s -w");
    for package in ["k8s.io/component-base/version", "k8s.io/client-go/pkg/version"] {
        for (var, value) in [
            ("gitVersion", kubernetes),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
            // Upstream's placeholder is "$Format:%H$"; empty says plainly that it is unknown.
            ("gitCommit", ""),
            ("buildDate", date.trim()),
        ] {
            flags.push_str(&format!(" -X {package}.{var}={value}"));
        }
    }
    Ok(flags)
}

fn newest_mtime(dir: &Path) -> Result<std::time::SystemTime> {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let meta = entry.metadata()?;
        if meta.is_dir() {
            newest = newest.max(newest_mtime(&path)?);
        } else if path
            .extension()
            .is_some_and(|e| e == "go" || e == "mod" || e == "sum")
        {
            newest = newest.max(meta.modified()?);
        }
    }
    Ok(newest)
}

/// Writes the OCI archives; the same inputs give the same bytes, so re-importing is cheap.
fn build_images(p: &Paths, version: &Versions) -> Result<Vec<(String, PathBuf)>> {
    fs::create_dir_all(&p.images)?;
    let tool = p.bin.join("ztrust-k8s-tool");
    let image = |name: &str, file: &str, args: Vec<String>| -> Result<(String, PathBuf)> {
        let out = p.images.join(file);
        let mut c = Command::new(&tool);
        c.args(["image", "--name", name, "--out"]).arg(&out).args(args);
        run(c)?;
        Ok((name.to_owned(), out))
    };
    let mut images = Vec::new();

    images.push(image(
        PAUSE_IMAGE,
        "pause.tar",
        vec![
            format!("--file={}=/pause", p.bin.join("pause").display()),
            "--entrypoint=/pause".into(),
        ],
    )?);

    // busybox: httpd, wget, nc, sh and the rest, as links to one static binary.
    let busybox = "/bin/busybox";
    let applets = output(cmd(busybox, &["--list-full"])).context("busybox --list-full")?;
    let mut args = vec![
        format!("--file={busybox}=/bin/busybox"),
        "--dir=/tmp=1777".into(),
        "--dir=/var/www".into(),
    ];
    args.extend(
        applets
            .lines()
            .filter(|a| *a != "bin/busybox")
            .map(|a| format!("--symlink=/{a}=/bin/busybox")),
    );
    let etc = p.images.join("workload-etc");
    fs::create_dir_all(&etc)?;
    fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    fs::write(etc.join("group"), "root:x:0:\nnogroup:x:65534:\n")?;
    args.push(format!("--file={}=/etc/passwd", etc.join("passwd").display()));
    args.push(format!("--file={}=/etc/group", etc.join("group").display()));
    // Like the seed's nginx: serves HTTP on port 80 unless told otherwise; the page names the pod.
    for word in [
        "sh",
        "-c",
        "echo \"hello from $(hostname)\" > /var/www/index.html && exec httpd -f -v -p 80 -h /var/www",
    ] {
        args.push(format!("--cmd={word}"));
    }
    images.push(image(WORKLOAD_IMAGE, "workload.tar", args)?);

    images.push(image(
        &version.coredns_image,
        "coredns.tar",
        vec![
            format!(
                "--file={}=/usr/local/bin/ztrust-k8s",
                p.bin.join("ztrust-k8s").display()
            ),
            "--symlink=/coredns=/usr/local/bin/ztrust-k8s".into(),
            "--dir=/etc/coredns".into(),
            "--entrypoint=/coredns".into(),
        ],
    )?);

    let agent = root().join("target/release/ztrust-agent");
    if agent.exists() {
        images.push(image(AGENT_IMAGE, "ztrust-agent.tar", agent_image_args(&agent)?)?);
    } else {
        eprintln!(
            "no agent image: {} is not built (`cargo xtask cluster up --agent` builds it)",
            agent.display()
        );
    }
    Ok(images)
}

/// deploy/Dockerfile's runtime stage without Debian's rootfs: the binary and the shared libraries the
/// dynamic loader resolves for it (glibc, libgcc_s), at the paths it resolved them from.
fn agent_image_args(agent: &Path) -> Result<Vec<String>> {
    let ldd = output(cmd("ldd", &[&path_str(agent)])).context("ldd on the agent")?;
    let mut args = vec![
        format!("--file={}=/usr/local/bin/ztrust-agent", agent.display()),
        "--dir=/tmp=1777".into(),
        "--user=0:0".into(),
        "--entrypoint=/usr/local/bin/ztrust-agent".into(),
        "--cmd=run".into(),
        "--cmd=--source".into(),
        "--cmd=kube".into(),
    ];
    for line in ldd.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)".
        let lib = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|w| w.starts_with('/')),
        };
        if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
            args.push(format!("--file={lib}={lib}"));
        }
    }
    Ok(args)
}

/// Kills what still runs in the named network namespace and deletes it; nothing to do if it is not there.
fn delete_netns(name: &str) -> Result<()> {
    if !Path::new(&format!("/run/netns/{name}")).exists() {
        return Ok(());
    }
    if let Some(pids) = output(cmd("ip", &["netns", "pids", name])) {
        for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
            signal(pid, "KILL");
        }
    }
    run(cmd("ip", &["netns", "del", name]))
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn create_network() -> Result<()> {
    // A previous cluster's link, if its namespace's deferred clean-up has not run yet: give the kernel
    // a moment, then delete it (a `cluster down` of an older xtask left it to that clean-up).
    let deadline = Instant::now() + Duration::from_secs(10);
    while link_exists(HOST_IF) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    if link_exists(HOST_IF) {
        eprintln!("{HOST_IF} of a previous cluster is still there: deleting it");
        run(cmd("ip", &["link", "del", HOST_IF]))?;
    }
    let host = format!("{HOST_IP}/{LINK_PREFIX_LEN}");
    let node = format!("{NODE_IP}/{LINK_PREFIX_LEN}");
    run(cmd("ip", &["netns", "add", NETNS]))?;
    run(cmd(
        "ip",
        &[
            "link", "add", HOST_IF, "type", "veth", "peer", "name", NODE_IF, "netns", NETNS,
        ],
    ))?;
    let host6 = format!("{HOST_IP6}/{LINK_PREFIX_LEN6}");
    let node6 = format!("{NODE_IP6}/{LINK_PREFIX_LEN6}");
    run(cmd("ip", &["addr", "add", &host, "dev", HOST_IF]))?;
    run(cmd("ip", &["addr", "add", &host6, "dev", HOST_IF, "nodad"]))?;
    run(cmd("ip", &["link", "set", HOST_IF, "up"]))?;
    // Host → pods and Services through the node, never out of the host's own uplink.
    for (range, via) in [
        (CLUSTER_CIDR, NODE_IP),
        (SERVICE_CIDR, NODE_IP),
        (CLUSTER_CIDR6, NODE_IP6),
        (SERVICE_CIDR6, NODE_IP6),
    ] {
        run(cmd("ip", &["route", "add", range, "via", via, "dev", HOST_IF]))?;
    }
    let ip_n = |args: &[&str]| {
        let mut c = cmd("ip", &["-n", NETNS]);
        c.args(args);
        run(c)
    };
    ip_n(&["link", "set", "lo", "up"])?;
    ip_n(&["addr", "add", &node, "dev", NODE_IF])?;
    ip_n(&["addr", "add", &node6, "dev", NODE_IF, "nodad"])?;
    ip_n(&["link", "set", NODE_IF, "up"])?;
    // A default route, as every node has: the kubelet and kube-proxy pick the node's addresses from it,
    // and the node's own connections to a ClusterIP need a route before kube-proxy's DNAT. It leads to
    // the host, which does not forward (net.ipv4.ip_forward=0 in its namespace), so nothing leaves.
    ip_n(&["route", "add", "default", "via", HOST_IP, "dev", NODE_IF])?;
    ip_n(&["-6", "route", "add", "default", "via", HOST_IP6, "dev", NODE_IF])?;
    // Per-namespace sysctls, written from inside the node's namespace: routing between pods and
    // Services.
    let mut c = cmd(
        "nsenter",
        &[&format!("--net={}", netns_path()), "--", "sysctl", "-q", "-w"],
    );
    c.args([
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ]);
    run(c)?;
    create_outside()
}

/// [`EXT_NETNS`]: a web server outside the cluster, reached through the node as the internet would be.
fn create_outside() -> Result<()> {
    run(cmd("ip", &["netns", "add", EXT_NETNS]))?;
    run(cmd(
        "ip",
        &[
            "-n",
            NETNS,
            "link",
            "add",
            EXT_NODE_IF,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            EXT_NETNS,
        ],
    ))?;
    let node = format!("{EXT_NODE_IP}/24");
    let ext = format!("{EXT_IP}/24");
    for args in [
        vec!["-n", NETNS, "addr", "add", &node, "dev", EXT_NODE_IF],
        vec!["-n", NETNS, "link", "set", EXT_NODE_IF, "up"],
        vec!["-n", EXT_NETNS, "link", "set", "lo", "up"],
        vec!["-n", EXT_NETNS, "addr", "add", &ext, "dev", "eth0"],
        vec!["-n", EXT_NETNS, "link", "set", "eth0", "up"],
        vec!["-n", EXT_NETNS, "route", "add", "default", "via", EXT_NODE_IP],
    ] {
        run(cmd("ip", &args))?;
    }
    let www = Paths::new().state.join("outside-www");
    fs::create_dir_all(&www)?;
    fs::write(
        www.join("index.html"),
        format!("hello from {EXT_NAME} (outside the cluster)\n"),
    )?;
    // busybox httpd puts itself in the background; `down` ends whatever runs in the namespace.
    run(cmd(
        "nsenter",
        &[
            &format!("--net=/run/netns/{EXT_NETNS}"),
            "--",
            "busybox",
            "httpd",
            "-p",
            &format!("{EXT_IP}:80"),
            "-h",
            &path_str(&www),
        ],
    ))
}

/// The host's bpffs at /sys/fs/bpf, as systemd mounts it on a node: the agent (no CAP_SYS_ADMIN in its
/// DaemonSet) pins there through its hostPath and cannot mount it itself. systemd also makes every
/// mount shared; here nothing does, and the kubelet refuses a `HostToContainer` hostPath on a private
/// mount ("is mounted on … but it is not a shared or slave mount"): the DaemonSet's bpffs and cgroup
/// volumes are made shared, as on any systemd node.
fn mount_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    if !mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        (f.nth(1), f.next()) == (Some("/sys/fs/bpf"), Some("bpf"))
    }) {
        run(cmd("mount", &["-t", "bpf", "bpffs", "/sys/fs/bpf"]))?;
    }
    run(cmd("mount", &["--make-shared", "/sys/fs/bpf"]))?;
    run(cmd("mount", &["--make-rshared", "/sys/fs/cgroup"]))
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

fn write_configs(p: &Paths, proxy_mode: ProxyMode) -> Result<()> {
    let pki = path_str(&p.pki());
    let cfg = p.config();
    let state = path_str(&p.state);
    let run_dir = path_str(&p.run);

    // containerd: Debian's binary with a configuration and directories of its own (its socket, root and
    // state are not the system containerd's), the cgroupfs driver (no systemd), our pause image, and the
    // pods' network namespaces under its state directory so that `down` finds every one of them.
    fs::write(
        cfg.join("containerd.toml"),
        format!(
            r#"version = 2
root = "{state}/containerd"
state = "{run_dir}/containerd"

[grpc]
  address = "{sock}"

# Not /opt/containerd.
[plugins."io.containerd.internal.v1.opt"]
  path = "{state}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  netns_mounts_under_state_dir = true
  # No OOM score below containerd's own: lowering one needs CAP_SYS_RESOURCE, which this machine's
  # root may lack (runc then fails every container with "failed to update /proc/self/oom_score_adj").
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{state}/cni/net.d"
"#,
            sock = path_str(&p.containerd_sock()),
        ),
    )?;

    // CNI: a veth per pod (ptp), addresses from the node's pod range (host-local), no masquerading:
    // nothing leaves the node.
    fs::write(
        p.state.join("cni/net.d/10-ztrust.conflist"),
        format!(
            r#"{{
  "cniVersion": "1.0.0",
  "name": "ztrust-cluster",
  "plugins": [
    {{
      "type": "ptp",
      "ipMasq": false,
      "mtu": 1500,
      "ipam": {{
        "type": "host-local",
        "dataDir": "{state}/cni/ipam",
        "ranges": [[{{ "subnet": "{POD_CIDR}" }}], [{{ "subnet": "{POD_CIDR6}" }}]],
        "routes": [{{ "dst": "0.0.0.0/0" }}, {{ "dst": "::/0" }}]
      }}
    }},
    {{ "type": "portmap", "capabilities": {{ "portMappings": true }} }}
  ]
}}
"#
        ),
    )?;

    // Pods' resolv.conf for dnsPolicy Default (CoreDNS itself, host-network pods): the cluster's DNS,
    // not the host's resolver, which is off this machine.
    fs::write(cfg.join("resolv.conf"), format!("nameserver {DNS_SERVICE_IP}\n"))?;

    fs::write(
        cfg.join("kubelet.yaml"),
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1 only; the kubelet refuses it unless told (KEP-5573).
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://{sock}
address: {NODE_IP}
healthzBindAddress: 127.0.0.1
# The apiserver's requests (logs, exec, port-forward) carry its client certificate; anything else is
# checked against the apiserver (TokenReview, SubjectAccessReview).
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {pki}/ca.crt
authorization:
  mode: Webhook
tlsCertFile: {pki}/kubelet-serving.crt
tlsPrivateKeyFile: {pki}/kubelet-serving.key
clusterDNS: [{DNS_SERVICE_IP}]
clusterDomain: {CLUSTER_DOMAIN}
resolvConf: {resolv}
podLogsDir: {state}/pod-logs
# The images were imported, not pulled: they cannot come back once collected.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
maxPods: 110
"#,
            sock = path_str(&p.containerd_sock()),
            resolv = path_str(&cfg.join("resolv.conf")),
        ),
    )?;

    fs::write(
        cfg.join("kube-proxy.yaml"),
        format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {pki}/kube-proxy.kubeconfig
mode: {mode}
clusterCIDR: {CLUSTER_CIDR},{CLUSTER_CIDR6}
hostnameOverride: {NODE_NAME}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Node ports on the node IP only (not on every pod veth's 10.244.0.1).
nodePortAddresses: [primary]
# nf_conntrack_max is the host's, not the node namespace's: leave it.
conntrack:
  maxPerCore: 0
  min: 0
"#,
            mode = proxy_mode.as_str(),
        ),
    )?;

    // The kernel tunables the kubelet checks at start, as it wants them (see the module comment).
    let tunables = p.config().join("tunables");
    fs::create_dir_all(&tunables)?;
    for (name, value) in KUBELET_TUNABLES {
        fs::write(tunables.join(name.replace('/', "_")), format!("{value}\n"))?;
    }
    Ok(())
}

/// /proc/sys paths and the values the kubelet's setupKernelTunables wants
/// (pkg/kubelet/cm/container_manager_linux.go); it rewrites the machine's otherwise.
const KUBELET_TUNABLES: &[(&str, u32)] = &[
    ("vm/overcommit_memory", 1),
    ("vm/panic_on_oom", 0),
    ("kernel/panic", 10),
    ("kernel/panic_on_oops", 1),
    ("kernel/keys/root_maxkeys", 1_000_000),
    ("kernel/keys/root_maxbytes", 25_000_000),
];

fn etcd_args(p: &Paths) -> Vec<String> {
    vec![
        format!("--data-dir={}", p.state.join("etcd").display()),
        format!("--name={NODE_NAME}"),
    ]
}

fn apiserver_args(p: &Paths) -> Vec<String> {
    let pki = path_str(&p.pki());
    [
        "--etcd-servers=http://127.0.0.1:2379".to_owned(),
        format!("--advertise-address={NODE_IP}"),
        "--bind-address=0.0.0.0".into(),
        "--secure-port=6443".into(),
        format!("--tls-cert-file={pki}/apiserver.crt"),
        format!("--tls-private-key-file={pki}/apiserver.key"),
        format!("--client-ca-file={pki}/ca.crt"),
        format!("--kubelet-client-certificate={pki}/apiserver-kubelet-client.crt"),
        format!("--kubelet-client-key={pki}/apiserver-kubelet-client.key"),
        format!("--kubelet-certificate-authority={pki}/ca.crt"),
        "--kubelet-preferred-address-types=InternalIP".into(),
        format!("--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}"),
        format!("--service-account-key-file={pki}/sa.pub"),
        format!("--service-account-signing-key-file={pki}/sa.key"),
        format!("--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR6}"),
        "--authorization-mode=Node,RBAC".into(),
        // The default plugins are on; NodeRestriction as kubeadm adds it (a kubelet edits only its node).
        "--enable-admission-plugins=NodeRestriction".into(),
        // The agent's DaemonSet is privileged.
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
        // The front proxy (aggregated APIs), as kubeadm sets it up; the controller-manager's and the
        // scheduler's delegated authentication also want its CA.
        format!("--requestheader-client-ca-file={pki}/front-proxy-ca.crt"),
        "--requestheader-allowed-names=front-proxy-client".into(),
        "--requestheader-username-headers=X-Remote-User".into(),
        "--requestheader-group-headers=X-Remote-Group".into(),
        "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
        format!("--proxy-client-cert-file={pki}/front-proxy-client.crt"),
        format!("--proxy-client-key-file={pki}/front-proxy-client.key"),
    ]
    .into()
}

fn controller_manager_args(p: &Paths) -> Vec<String> {
    let pki = path_str(&p.pki());
    let kubeconfig = format!("{pki}/controller-manager.kubeconfig");
    vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        "--bind-address=127.0.0.1".into(),
        "--leader-elect=false".into(),
        // One ServiceAccount per controller, as kubeadm: each controller has only its role's rights.
        "--use-service-account-credentials=true".into(),
        // The legacy token controller signs with the same key the apiserver verifies.
        format!("--service-account-private-key-file={pki}/sa.key"),
        format!("--root-ca-file={pki}/ca.crt"),
        format!("--cluster-signing-cert-file={pki}/ca.crt"),
        format!("--cluster-signing-key-file={pki}/ca.key"),
        // node.spec.podCIDRs = 10.244.0.0/24 and fd00:10:244::/64, the ranges the CNI configuration
        // hands out.
        "--allocate-node-cidrs=true".into(),
        format!("--cluster-cidr={CLUSTER_CIDR},{CLUSTER_CIDR6}"),
        "--node-cidr-mask-size-ipv4=24".into(),
        "--node-cidr-mask-size-ipv6=64".into(),
        format!("--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR6}"),
    ]
}

fn scheduler_args(p: &Paths) -> Vec<String> {
    let kubeconfig = format!("{}/scheduler.kubeconfig", p.pki().display());
    vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        "--bind-address=127.0.0.1".into(),
        "--leader-elect=false".into(),
    ]
}

fn kubelet_args(p: &Paths) -> Vec<String> {
    vec![
        format!("--config={}", p.config().join("kubelet.yaml").display()),
        format!("--kubeconfig={}", p.pki().join("kubelet.kubeconfig").display()),
        format!("--root-dir={}", p.kubelet_dir().display()),
        format!("--node-ip={NODE_IP},{NODE_IP6}"),
        format!("--hostname-override={NODE_NAME}"),
        "--v=1".into(),
    ]
}

fn coredns_manifest(image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: coredns
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:coredns
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:coredns
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:coredns
subjects:
  - kind: ServiceAccount
    name: coredns
    namespace: kube-system
---
# kubeadm's Corefile without `forward`: the node has no upstream resolver to reach, so names outside
# the cluster get SERVFAIL, but for example.com, the outside namespace's web server.
apiVersion: v1
kind: ConfigMap
metadata:
  name: coredns
  namespace: kube-system
data:
  Corefile: |
    .:53 {{
        errors
        health {{
            lameduck 5s
        }}
        ready
        kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
            ttl 30
        }}
        hosts {{
            {EXT_IP} {EXT_NAME}
            fallthrough
        }}
        prometheus :9153
        cache 30
        reload
        loadbalance
    }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  replicas: 1
  selector:
    matchLabels:
      k8s-app: kube-dns
  template:
    metadata:
      labels:
        k8s-app: kube-dns
    spec:
      serviceAccountName: coredns
      priorityClassName: system-cluster-critical
      dnsPolicy: Default
      containers:
        - name: coredns
          image: {image}
          imagePullPolicy: Never
          args: ["-conf", "/etc/coredns/Corefile"]
          ports:
            - {{ name: dns, containerPort: 53, protocol: UDP }}
            - {{ name: dns-tcp, containerPort: 53, protocol: TCP }}
            - {{ name: metrics, containerPort: 9153, protocol: TCP }}
          resources:
            requests: {{ cpu: 50m, memory: 64Mi }}
          volumeMounts:
            - {{ name: config, mountPath: /etc/coredns, readOnly: true }}
          livenessProbe:
            httpGet: {{ path: /health, port: 8080 }}
            initialDelaySeconds: 10
          readinessProbe:
            httpGet: {{ path: /ready, port: 8181 }}
      volumes:
        - name: config
          configMap:
            name: coredns
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
    kubernetes.io/name: CoreDNS
spec:
  selector:
    k8s-app: kube-dns
  clusterIP: {DNS_SERVICE_IP}
  ports:
    - {{ name: dns, port: 53, protocol: UDP }}
    - {{ name: dns-tcp, port: 53, protocol: TCP }}
    - {{ name: metrics, port: 9153, protocol: TCP }}
"#
    )
}

/// Starts `component` in the node's network namespace, in a session of its own (it outlives xtask),
/// its output to its log, its pid to its pid file. `setsid`, `nsenter` (and for the kubelet `unshare`
/// and `sh`) each exec the next, so the pid is the component's.
fn start(p: &Paths, component: &str, args: &[String]) -> Result<()> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p.log(component))?;
    let mut c = Command::new("setsid");
    c.arg("nsenter").arg(format!("--net={}", netns_path())).arg("--");
    if component == "kubelet" {
        // A mount namespace whose mounts stay shared where the host's are (the kubelet's root
        // directory), with the kernel tunables read from our files, privately.
        c.args([
            "unshare",
            "--mount",
            "--propagation",
            "unchanged",
            "--",
            "sh",
            "-c",
        ]);
        let mut script = String::from("set -e; mount --make-rprivate /proc; ");
        for (name, _) in KUBELET_TUNABLES {
            let file = p.config().join("tunables").join(name.replace('/', "_"));
            script.push_str(&format!("mount --bind '{}' /proc/sys/{name}; ", file.display()));
        }
        script.push_str("exec \"$0\" \"$@\"");
        c.arg(script);
    }
    c.arg(p.program(component))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .current_dir(&p.state);
    let mut child = c.spawn().with_context(|| format!("starting {component}"))?;
    fs::write(p.pid_file(component), format!("{}\n", child.id()))?;
    // Until the last exec, the pid runs setsid or nsenter: wait for the component itself, so that
    // running_pid() means what it says from here on.
    let started = Instant::now();
    while running_pid(p, component).is_none() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{component} exited at once ({status}); see {}",
                p.log(component).display()
            );
        }
        if started.elapsed() > Duration::from_secs(5) {
            bail!(
                "{component} did not start within 5 s; see {}",
                p.log(component).display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "started {component} (pid {}), log {}",
        child.id(),
        p.log(component).display()
    );
    Ok(())
}

/// Polls `ok` every half second; on timeout, or when `component` has exited, fails with the end of
/// its log.
fn wait_until(
    what: &str,
    timeout: Duration,
    p: &Paths,
    component: &str,
    mut ok: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let started = Instant::now();
    loop {
        if ok()? {
            eprintln!("{what}: ok after {:.1}s", started.elapsed().as_secs_f64());
            return Ok(());
        }
        let exited = running_pid(p, component).is_none();
        if exited || started.elapsed() > timeout {
            let log = fs::read_to_string(p.log(component)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{what}: {} (last lines of {}):\n{}",
                if exited {
                    format!("{component} exited")
                } else {
                    format!("not after {}s", timeout.as_secs())
                },
                p.log(component).display(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn kubectl_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(Paths::new().bin.join("kubectl"));
    c.arg(format!("--kubeconfig={}", admin_kubeconfig().display()))
        .args(args);
    c
}

fn ctr(p: &Paths, args: &[&str]) -> Command {
    let mut c = Command::new("ctr");
    c.arg("--address")
        .arg(p.containerd_sock())
        .args(["--namespace", "k8s.io"])
        .args(args);
    c
}

fn pipe(c: &mut Command, stdin: &str) -> Result<()> {
    let mut child = c.stdin(Stdio::piped()).spawn()?;
    child.stdin.take().expect("piped").write_all(stdin.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("{c:?} failed: {status}");
    }
    Ok(())
}

fn node_ready() -> bool {
    output(kubectl_cmd(&[
        "get",
        "node",
        NODE_NAME,
        "-o",
        r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
    ]))
    .is_some_and(|s| s.trim() == "True")
}

// -------------------------------------------------------------------------------------------- down

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
            &[&format!("--net={}", netns_path()), "--", "ss", "-K", "-a", "-n"],
        );
        ss.stdout(Stdio::null());
        if let Err(e) = run(ss) {
            eprintln!("warning: closing the node's sockets: {e:#}; going on");
        }
    }
    // The host's end of the node's link first, by itself: deleting a veth takes its peer with it at
    // once, while a deleted namespace's devices go only when the kernel's deferred clean-up of the
    // namespace runs, which a `cluster up` right after this one can beat ("File exists").
    if link_exists(HOST_IF) {
        run(cmd("ip", &["link", "del", HOST_IF]))?;
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

/// The pid in `component`'s pid file if that process is alive and still runs the component's program.
fn running_pid(p: &Paths, component: &str) -> Option<u32> {
    let pid: u32 = fs::read_to_string(p.pid_file(component))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmdline.split(|b| *b == 0).next()?;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // A zombie (state Z, after the comm in parentheses) has exited.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    (argv0 == p.program(component).as_os_str().as_encoded_bytes() && !zombie).then_some(pid)
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// The flags `up` starts `component` with (its configuration files are written by then).
fn args_of(p: &Paths, component: &str) -> Vec<String> {
    match component {
        "etcd" => etcd_args(p),
        "kube-apiserver" => apiserver_args(p),
        "kube-controller-manager" => controller_manager_args(p),
        "kube-scheduler" => scheduler_args(p),
        "containerd" => vec![
            "--config".to_owned(),
            path_str(&p.config().join("containerd.toml")),
        ],
        "kubelet" => kubelet_args(p),
        "kube-proxy" => vec![
            "--config".to_owned(),
            path_str(&p.config().join("kube-proxy.yaml")),
        ],
        other => unreachable!("not a component: {other}"),
    }
}

/// `cargo xtask cluster restart COMPONENT`.
fn restart(component: &str, kill: bool) -> Result<()> {
    if !is_root() {
        bail!("run it as root");
    }
    let p = Paths::new();
    if !is_running() {
        bail!("no cluster is running (`cargo xtask cluster up`)");
    }
    let t = Instant::now();
    match running_pid(&p, component) {
        Some(pid) if kill => {
            signal(pid, "KILL");
            while running_pid(&p, component).is_some() {
                if t.elapsed() > Duration::from_secs(10) {
                    bail!("{component} (pid {pid}) is still running 10 s after SIGKILL");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("killed {component} (pid {pid})");
        }
        _ => stop(&p, component),
    }
    start(&p, component, &args_of(&p, component))?;
    wait_until(
        "kube-apiserver /readyz",
        Duration::from_secs(120),
        &p,
        component,
        || Ok(output(kubectl_cmd(&["get", "--raw", "/readyz"])).is_some_and(|o| o.trim() == "ok")),
    )?;
    if component == "kubelet" {
        wait_until(
            &format!("node {NODE_NAME} Ready"),
            Duration::from_secs(120),
            &p,
            "kubelet",
            || Ok(node_ready()),
        )?;
    }
    eprintln!("restarted {component} in {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}

/// SIGTERM, up to 10 s to exit, then SIGKILL.
fn stop(p: &Paths, component: &str) {
    let Some(pid) = running_pid(p, component) else {
        return;
    };
    signal(pid, "TERM");
    let started = Instant::now();
    while running_pid(p, component).is_some() {
        if started.elapsed() > Duration::from_secs(10) {
            signal(pid, "KILL");
            std::thread::sleep(Duration::from_millis(200));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("stopped {component} (pid {pid})");
}

/// The cgroup v1 hierarchies (and the v2 one) where the kubelet made `kubepods`.
fn kubepods_cgroups() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path().join("kubepods"))
        .filter(|p| p.is_dir())
        .collect()
}

fn cgroup_tree(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                cgroup_tree(&e.path(), out);
            }
        }
    }
}

/// Every process in the kubelet's cgroups is a container's (or the pause's): kill them all, until none
/// is left (a dying process's children may land there meanwhile).
fn kill_pod_processes() {
    let started = Instant::now();
    loop {
        let mut dirs = Vec::new();
        for root in kubepods_cgroups() {
            cgroup_tree(&root, &mut dirs);
        }
        let pids: Vec<u32> = dirs
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        if pids.is_empty() || started.elapsed() > Duration::from_secs(10) {
            return;
        }
        for pid in pids {
            signal(pid, "KILL");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// containerd's shims live on after it (by design, to keep containers running): ours are the ones
/// started with our containerd's address.
fn kill_shims(p: &Paths) {
    let address = path_str(&p.containerd_sock());
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args
            .first()
            .is_some_and(|a| a.ends_with("containerd-shim-runc-v2"))
            && args.contains(&address)
        {
            signal(pid, "KILL");
        }
    }
}

/// Mount points under our state and run directories, from /proc/self/mountinfo (octal escapes
/// decoded).
fn our_mounts(p: &Paths) -> Vec<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let state = path_str(&p.state);
    let run_dir = path_str(&p.run);
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|m| {
            [&state, &run_dir]
                .iter()
                .any(|d| m == *d || m.starts_with(&format!("{d}/")))
        })
        .collect()
}

fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(b);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn remove_cgroups() {
    for root in kubepods_cgroups() {
        let mut dirs = Vec::new();
        cgroup_tree(&root, &mut dirs);
        // Children before parents: a cgroup with children cannot be removed.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let _ = fs::remove_dir(&d);
        }
    }
}

// ------------------------------------------------------------------------------------------ status

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

#[cfg(test)]
mod tests;
