//! Starting, waiting for, restarting and stopping the components.

use super::*;

/// Starts `component` in the node's network namespace, in a session of its own (it outlives xtask),
/// its output to its log, its pid to its pid file. `setsid`, `nsenter` (and for the kubelet `unshare`
/// and `sh`) each exec the next, so the pid is the component's.
pub(super) fn start(p: &Paths, component: &str, args: &[String]) -> Result<()> {
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
pub(super) fn wait_until(
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

pub(super) fn kubectl_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(Paths::new().bin.join("kubectl"));
    c.arg(format!("--kubeconfig={}", admin_kubeconfig().display()))
        .args(args);
    c
}

pub(super) fn ctr(p: &Paths, args: &[&str]) -> Command {
    let mut c = Command::new("ctr");
    c.arg("--address")
        .arg(p.containerd_sock())
        .args(["--namespace", "k8s.io"])
        .args(args);
    c
}

pub(super) fn pipe(c: &mut Command, stdin: &str) -> Result<()> {
    let mut child = c.stdin(Stdio::piped()).spawn()?;
    child.stdin.take().expect("piped").write_all(stdin.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("{c:?} failed: {status}");
    }
    Ok(())
}

pub(super) fn node_ready() -> bool {
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

/// The pid in `component`'s pid file if that process is alive and still runs the component's program.
pub(super) fn running_pid(p: &Paths, component: &str) -> Option<u32> {
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

/// Whether `pid` has exited: gone, or a zombie with every thread gone. Not [`running_pid`]'s answer:
/// an exiting process lets go of its memory (its `/proc/<pid>/cmdline` reads empty) before it closes
/// its files, and a multi-threaded one (every Go component) has a zombie leader while its other threads
/// still exit and still hold its files: a component restarted then finds its port still bound ("address
/// already in use").
pub(super) fn exited(pid: u32) -> bool {
    let dead = |stat: &Path| match fs::read_to_string(stat) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    };
    let proc = PathBuf::from(format!("/proc/{pid}"));
    if !dead(&proc.join("stat")) {
        return false;
    }
    // The leader is dead; so must every thread be (a thread that is gone has left the listing).
    match fs::read_dir(proc.join("task")) {
        Err(_) => true,
        Ok(tasks) => tasks.flatten().all(|t| dead(&t.path().join("stat"))),
    }
}

pub(super) fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// The flags `up` starts `component` with (its configuration files are written by then).
pub(super) fn args_of(p: &Paths, component: &str) -> Vec<String> {
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
pub(super) fn restart(component: &str, kill: bool) -> Result<()> {
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
            while !exited(pid) {
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
pub(super) fn stop(p: &Paths, component: &str) {
    let Some(pid) = running_pid(p, component) else {
        return;
    };
    signal(pid, "TERM");
    let started = Instant::now();
    let mut killed = false;
    while !exited(pid) {
        if !killed && started.elapsed() > Duration::from_secs(10) {
            signal(pid, "KILL");
            killed = true;
        }
        if started.elapsed() > Duration::from_secs(20) {
            eprintln!("warning: {component} (pid {pid}) has not exited 10 s after SIGKILL; going on");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("stopped {component} (pid {pid})");
}
