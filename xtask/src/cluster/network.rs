//! The node's network namespace, its link to the host, the outside host, bpffs.

use super::*;

/// Kills what still runs in the named network namespace and deletes it; nothing to do if it is not there.
pub(super) fn delete_netns(name: &str) -> Result<()> {
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

pub(super) fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

pub(super) fn create_network() -> Result<()> {
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
pub(super) fn create_outside() -> Result<()> {
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
pub(super) fn mount_bpffs() -> Result<()> {
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
