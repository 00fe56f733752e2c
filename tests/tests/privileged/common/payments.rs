//! The payments lab with the real agent enforcing, for the privileged end-to-end tests: brought up with
//! names of its own (so tests never collide with each other or with a user's lab), policies applied,
//! and taken down by `Drop` however the test ends.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ztrust_lab::{self as lab, ApplyOptions, DownOptions, LabState, UpOptions};

pub fn payments() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/payments")
}

pub struct PaymentsLab {
    pub state_dir: PathBuf,
    pub prefix: String,
    /// The lab as it stands after the policies were applied.
    pub state: LabState,
}

impl PaymentsLab {
    /// `tag` (two or three letters) keeps names apart; `agent_bin` runs the agent (a wrapper, or
    /// [`super::agent_bin`]); `extra_args` go to `ztrust-agent run`.
    pub fn up(tag: &str, agent_bin: &Path, extra_args: &[&str]) -> Self {
        Self::up_with(tag, agent_bin, extra_args, lab::ProxyMode::default())
    }

    /// [`PaymentsLab::up`] with the node translating Services in `proxy_mode`.
    pub fn up_with(tag: &str, agent_bin: &Path, extra_args: &[&str], proxy_mode: lab::ProxyMode) -> Self {
        Self::up_on(tag, agent_bin, extra_args, proxy_mode, 1)
    }

    /// [`PaymentsLab::up_with`] over `nodes` nodes, the pods spread over them in turn.
    pub fn up_on(
        tag: &str,
        agent_bin: &Path,
        extra_args: &[&str],
        proxy_mode: lab::ProxyMode,
        nodes: usize,
    ) -> Self {
        super::require_root();
        std::fs::create_dir_all("/run/ztrust").unwrap();
        let prefix = format!("{tag}{}", std::process::id() % 10_000);
        let state_dir = PathBuf::from(format!("/run/ztrust/{tag}-test-{}", std::process::id()));
        // The guard exists before anything is made, so a failing `up` is cleaned up too.
        let mut me = Self {
            state_dir: state_dir.clone(),
            prefix: prefix.clone(),
            state: LabState::default(),
        };
        lab::up(
            &payments().join("cluster.yaml"),
            UpOptions {
                state_dir: state_dir.clone(),
                prefix: prefix.clone(),
                if_prefix: format!("{prefix}l"),
                ext_if_prefix: format!("{prefix}x"),
                lab_bin: Some(super::lab_bin().into()),
                agent: Some(lab::AgentSpec {
                    bin: Some(agent_bin.to_owned()),
                    extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
                    ..Default::default()
                }),
                proxy_mode,
                nodes,
                ..Default::default()
            },
        )
        .expect("lab up");
        me.apply(&payments().join("policies"));
        me
    }

    pub fn apply(&mut self, path: &Path) {
        let report = lab::apply(
            path,
            ApplyOptions {
                state_dir: self.state_dir.clone(),
                ..Default::default()
            },
        )
        .expect("lab apply");
        for w in &report.warnings {
            eprintln!("lab apply {}: {w}", path.display());
        }
        self.state = lab::status(&self.state_dir).expect("lab status");
    }

    pub fn pod(&self, name: &str) -> lab::PodState {
        self.state
            .pods
            .iter()
            .find(|p| p.name == name)
            .expect("pod")
            .clone()
    }

    pub fn agent(&self) -> lab::AgentState {
        self.state
            .first_node()
            .agent
            .clone()
            .expect("the lab runs an agent")
    }

    /// Where the CLI reaches the lab's agent: its unix socket.
    pub fn connect(&self) -> ztrust_agent::cli_flows::Connect {
        ztrust_agent::cli_flows::Connect {
            socket: self.agent().socket,
            server: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_server_name: None,
        }
    }
}

impl Drop for PaymentsLab {
    fn drop(&mut self) {
        let _ = lab::down(&DownOptions {
            state_dir: self.state_dir.clone(),
            prefix: self.prefix.clone(),
        });
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Joins the network namespace `/run/netns/<netns>` (the calling thread only).
pub fn enter(netns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{netns}")).expect("netns");
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Whether a TCP connection from namespace `netns` to `dst` is set up within `timeout`.
pub fn connects(netns: &str, dst: SocketAddr, timeout: Duration) -> bool {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        enter(&netns);
        TcpStream::connect_timeout(&dst, timeout).is_ok()
    })
    .join()
    .unwrap()
}

/// A process's command line, argument by argument.
pub fn cmdline(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("agent cmdline");
    raw.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// `kill -9`, and waits until the process is gone.
pub fn kill9(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab::net::is_gone(pid) {
        assert!(
            Instant::now() < deadline,
            "agent {pid} still there 5 s after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts the agent again in the node namespace with the same arguments, from `bin`, logging to `log`.
/// Returns its pid.
pub fn respawn(node: &str, bin: &Path, args: &[String], log: &Path) -> u32 {
    let out = std::fs::File::create(log).unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{node}"))
        .arg(bin)
        .args(args)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn agent");
    let pid = child.id();
    // The lab stops it by pid; reap it when it exits.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    pid
}

/// Waits for the agent's "in sync" log line; returns how long it took from `since`.
pub fn wait_in_sync(log: &Path, since: Instant) -> Duration {
    wait_loaded_and_in_sync(log, since).1
}

/// Waits for the agent's "agent running" log line (its programs loaded and verified, the maps adopted)
/// and then its "in sync" line; returns when each appeared, from `since`. Loading is CPU-bound (the
/// verifier) and grows with the machine's load; what follows is the agent's own work.
pub fn wait_loaded_and_in_sync(log: &Path, since: Instant) -> (Duration, Duration) {
    let mut loaded = None;
    let deadline = since + Duration::from_secs(30);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if loaded.is_none() && text.contains("agent running") {
            loaded = Some(since.elapsed());
        }
        if text.contains("in sync with the source") {
            let loaded =
                loaded.unwrap_or_else(|| panic!("in sync, but no \"agent running\" line before:\n{text}"));
            return (loaded, since.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!(
        "the agent did not sync within 30 s:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}
