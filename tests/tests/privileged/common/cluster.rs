//! The real cluster of `cargo xtask cluster up` (xtask/src/cluster.rs): its kubectl with the admin
//! kubeconfig, and the checks the seed's exercise makes with `kubectl exec … -- wget`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use std::io::Write as _;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The workload image of the cluster (busybox: httpd on port 80 by default, wget, nc, nslookup).
pub const WORKLOAD_IMAGE: &str = "ztrust.test/workload:1";
/// The outside world's web server (xtask/src/cluster.rs, `EXT_*`), answered by CoreDNS for example.com.
pub const EXT_NAME: &str = "example.com";
pub const EXT_IP: &str = "192.0.2.80";
/// The node's network namespace, where the agent, kube-proxy and the pods' host veths are.
pub const NODE_NETNS: &str = "ztcluster-node";

/// Why a [`Cluster::wget`] got no page.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// No answer within the timeout.
    Blocked,
    /// Anything else: the check is broken, not the connection blocked.
    Broken(String),
}

pub struct Cluster {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl Cluster {
    /// The running cluster; panics (never skips) when there is none.
    pub fn get() -> Self {
        let kubeconfig = PathBuf::from("/var/lib/ztrust-cluster/pki/admin.kubeconfig");
        let kubectl = root().join("target/cluster/bin/kubectl");
        assert!(
            kubeconfig.exists() && kubectl.exists(),
            "no cluster ({} or {} is missing): these tests run against `cargo xtask cluster up --agent` \
             (cargo xtask test starts it)",
            kubeconfig.display(),
            kubectl.display()
        );
        let c = Cluster { kubectl, kubeconfig };
        let nodes = c.ok(&["get", "nodes", "-o", "name"]);
        assert!(
            nodes.contains("node/"),
            "the cluster answers but has no node: {nodes}"
        );
        c
    }

    /// The cluster admin's kubeconfig.
    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running kubectl")
    }

    /// kubectl `args`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> String {
        self.stdin(&["apply", "-f", "-"], yaml)
    }

    /// kubectl `args` with `input` on stdin, which must succeed.
    pub fn stdin(&self, args: &[&str], input: &str) -> String {
        let mut c = self.command(args);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("running kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("writing to kubectl");
        let out = child.wait_with_output().expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Deletes namespace `ns` if it exists and waits until it is gone, then creates it.
    pub fn fresh_namespace(&self, ns: &str) {
        self.run(&[
            "delete",
            "namespace",
            ns,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
        ]);
        self.ok(&["create", "namespace", ns]);
    }

    /// `kubectl apply -k deploy/` (what a user runs) and the DaemonSet's rollout; its pod's name.
    pub fn deploy_agent(&self) -> String {
        let deploy = root().join("deploy");
        self.ok(&["apply", "-k", deploy.to_str().expect("utf-8")]);
        self.ok(&[
            "-n",
            "ztrust-system",
            "rollout",
            "status",
            "ds/ztrust-agent",
            "--timeout=180s",
        ]);
        self.agent_pod()
    }

    /// The first pod with label `app=APP` in `ns`.
    pub fn pod_of(&self, ns: &str, app: &str) -> String {
        let name = self.ok(&[
            "-n",
            ns,
            "get",
            "pods",
            "-l",
            &format!("app={app}"),
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ]);
        assert!(!name.is_empty(), "no pod app={app} in {ns}");
        name
    }

    /// The agent's pod that is not being deleted (during a rollout the old one lingers for a while);
    /// panics if there is not exactly one.
    pub fn agent_pod(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let list: serde_json::Value = serde_json::from_str(&self.ok(&[
                "-n",
                "ztrust-system",
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=ztrust-agent",
                "-o",
                "json",
            ]))
            .expect("pod list");
            let live: Vec<String> = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
                .collect();
            if let [one] = live.as_slice() {
                return one.clone();
            }
            assert!(
                Instant::now() < deadline,
                "not exactly one live agent pod: {live:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `ztrust-agent ARGS` in the agent's container (`kubectl exec ds/ztrust-agent`).
    pub fn agent(&self, args: &[&str]) -> String {
        let mut full = vec![
            "-n",
            "ztrust-system",
            "exec",
            "ds/ztrust-agent",
            "--",
            "ztrust-agent",
        ];
        full.extend_from_slice(args);
        self.ok(&full)
    }

    /// The seed's check: `kubectl exec -n NS deploy/FROM -- wget -qO- URL` (busybox's `wget -T` crashes,
    /// `timeout` stands in for it). `Ok(page)` if it answered; [`Failure::Blocked`] if it got no answer
    /// within 3 s (`timeout` ended it: exit 143), the signature of a dropped SYN; anything else (a DNS
    /// failure, a refused connection, kubectl's own error) is [`Failure::Broken`], which no test takes
    /// for "blocked".
    pub fn wget(&self, ns: &str, from: &str, url: &str) -> Result<String, Failure> {
        let target = if from.contains('/') {
            from.to_owned()
        } else {
            format!("deploy/{from}")
        };
        let out = self.run(&[
            "exec", "-n", ns, &target, "--", "timeout", "3", "wget", "-qO-", url,
        ]);
        let text = || {
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        };
        match out.status.code() {
            Some(0) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            Some(143) => Err(Failure::Blocked),
            code => Err(Failure::Broken(format!("exit {code:?}: {}", text()))),
        }
    }

    /// [`Self::wget`] until it has the expected outcome (`pass`: answered; otherwise blocked) twice in a
    /// row: policy changes reach the kernel asynchronously. Panics with the last outcome if that does
    /// not happen within `timeout`, or at once on a [`Failure::Broken`] when `pass` is false.
    pub fn wget_until(&self, ns: &str, from: &str, url: &str, pass: bool, timeout: Duration) -> String {
        let started = Instant::now();
        let mut streak = 0;
        loop {
            let r = self.wget(ns, from, url);
            if let (false, Err(Failure::Broken(e))) = (pass, &r) {
                panic!("{from} → {url}: expected blocked, but the check itself failed: {e}");
            }
            if r.is_ok() == pass {
                streak += 1;
                if streak == 2 {
                    return r.unwrap_or_default();
                }
            } else {
                streak = 0;
            }
            assert!(
                started.elapsed() < timeout,
                "{from} → {url}: not {} twice in a row within {timeout:?}; last: {r:?}",
                if pass { "PASS" } else { "BLOCKED" }
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The current time as the cluster's clocks (this machine's) write it, for `flows --since`.
    pub fn now_rfc3339() -> String {
        let out = Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .expect("date");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The agent's denied flows since `since` (RFC 3339) as JSON objects (`flows --denied -o jsonl`).
    pub fn denied_flows(&self, since: &str) -> Vec<serde_json::Value> {
        self.agent(&["flows", "--denied", "--since", since, "-o", "jsonl"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("flow line {l:?}: {e}")))
            .collect()
    }
}

/// The seed's Task 2 application with the cluster's local image for nginx:1.27.3 (no registry here);
/// everything else as the seed writes it.
pub fn seed_app() -> String {
    let yaml =
        std::fs::read_to_string(root().join("tests/cluster/seed/task2-app.yaml")).expect("task2-app.yaml");
    assert!(yaml.contains("image: nginx:1.27.3"), "the seed's image line");
    yaml.replace(
        "image: nginx:1.27.3",
        &format!("image: {WORKLOAD_IMAGE}\n        imagePullPolicy: Never"),
    )
}

/// The seed's Task 4 policies, exactly.
pub fn seed_policies() -> String {
    std::fs::read_to_string(root().join("tests/cluster/seed/task4-policies.yaml"))
        .expect("task4-policies.yaml")
}

/// Debian's Prometheus on the node, discovering the agent through its metrics Service: the headless
/// Service's DNS records (`dns_sd_configs`, asked of the cluster DNS), scraping every second. Debian
/// builds Prometheus without `kubernetes_sd_configs`; DNS is what a Service gives any client. Runs in
/// the node's network namespace with a resolv.conf of its own (cluster DNS), as a pod's would be.
/// Stopped on drop.
pub struct Prometheus {
    child: std::process::Child,
    dir: PathBuf,
    pub port: u16,
}

impl Prometheus {
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("ztrust-cluster-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let config = r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: ztrust-agent
    dns_sd_configs:
      - names: [ztrust-agent-metrics.ztrust-system.svc.cluster.local]
        type: A
        port: 9965
        refresh_interval: 5s
"#;
        std::fs::write(dir.join("prometheus.yml"), config).expect("prometheus.yml");
        std::fs::write(
            dir.join("resolv.conf"),
            "nameserver 10.96.0.10\noptions ndots:5\n",
        )
        .expect("resolv.conf");
        let port = 19090;
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus.log");
        let script = format!(
            "mount --make-rprivate / && mount --bind {}/resolv.conf /etc/resolv.conf && exec prometheus \
             --config.file={}/prometheus.yml --storage.tsdb.path={}/data --web.listen-address=127.0.0.1:{port}",
            dir.display(),
            dir.display(),
            dir.display()
        );
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{NODE_NETNS}"))
            .args(["--", "unshare", "--mount", "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting prometheus (Debian's package)");
        Prometheus { child, dir, port }
    }

    /// An instant query's first value (`None`: no series), through the HTTP API.
    pub fn query(&self, promql: &str) -> Option<f64> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{NODE_NETNS}"))
            .args(["--", "curl", "-sf", "--max-time", "3", "--data-urlencode"])
            .arg(format!("query={promql}"))
            .arg(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .output()
            .expect("curl");
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `promql` has a value that `ok` accepts; that value.
    pub fn wait_for(&self, promql: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> f64 {
        let started = Instant::now();
        loop {
            let v = self.query(promql);
            if let Some(v) = v.filter(|v| ok(*v)) {
                return v;
            }
            assert!(
                started.elapsed() < timeout,
                "Prometheus: {promql} = {v:?} after {timeout:?}; its log: {}",
                std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The pid of a running cluster component (`/run/ztrust-cluster/pids/NAME.pid`, written by xtask).
pub fn component_pid(name: &str) -> i32 {
    let path = format!("/run/ztrust-cluster/pids/{name}.pid");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// containerd's `ctr` in the cluster's image namespace.
pub fn ctr(args: &[&str]) -> String {
    let out = Command::new("ctr")
        .args([
            "--address",
            "/run/ztrust-cluster/containerd.sock",
            "--namespace",
            "k8s.io",
        ])
        .args(args)
        .output()
        .expect("ctr");
    assert!(
        out.status.success(),
        "ctr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loop in pod `pod` (`pod/NAME`) that tries `url` (`timeout` seconds each) until
/// [`stop_attempts`] (or 600 s) and writes one line per attempt to /tmp/NAME in the container: `pass T`,
/// `blocked T` (no answer in time: `timeout`'s exit 143) or `error N T` (any other exit), T the attempt's
/// start in Unix seconds (the pod's clock is the node's), then `done`. It runs in the pod (started with
/// `kubectl exec`, detached), so it keeps going while the API server or the agent is away.
pub fn start_attempts(c: &Cluster, ns: &str, pod: &str, name: &str, url: &str, timeout: u32) {
    let script = attempts_script(name, url, timeout);
    c.ok(&[
        "exec",
        "-n",
        ns,
        pod,
        "--",
        "sh",
        "-c",
        &format!("({script}) >/dev/null 2>&1 &"),
    ]);
}

/// The shell loop of [`start_attempts`] (also a container's command, to try from its first instruction).
pub fn attempts_script(name: &str, url: &str, timeout: u32) -> String {
    format!(
        "rm -f /tmp/{name} /tmp/{name}.stop; end=$(( $(date +%s) + 600 )); \
         while [ ! -e /tmp/{name}.stop ] && [ $(date +%s) -lt $end ]; do \
           t=$(date +%s); timeout {timeout} wget -qO- {url} >/dev/null 2>&1; rc=$?; \
           if [ $rc = 0 ]; then echo pass $t; elif [ $rc = 143 ]; then echo blocked $t; else echo \"error $rc $t\"; fi >> /tmp/{name}; \
         done; echo done >> /tmp/{name}"
    )
}

/// Ends a loop of [`start_attempts`] after its current attempt.
pub fn stop_attempts(c: &Cluster, ns: &str, pod: &str, name: &str) {
    c.ok(&["exec", "-n", ns, pod, "--", "touch", &format!("/tmp/{name}.stop")]);
}

/// What a loop of [`start_attempts`] recorded so far.
#[derive(Debug, Default)]
pub struct Attempts {
    pub passed: usize,
    pub blocked: usize,
    pub errors: Vec<String>,
    pub done: bool,
    /// Start of the first and of the last attempt recorded (Unix seconds).
    pub first: Option<u64>,
    pub last: Option<u64>,
}

/// The attempts [`start_attempts`] recorded so far.
pub fn attempts(c: &Cluster, ns: &str, pod: &str, name: &str) -> Attempts {
    let out = c.ok(&[
        "exec",
        "-n",
        ns,
        pod,
        "--",
        "sh",
        "-c",
        &format!("cat /tmp/{name} 2>/dev/null || true"),
    ]);
    let mut a = Attempts::default();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line == "done" {
            a.done = true;
            continue;
        }
        let (outcome, start) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("{name}: an attempt line without its time: {line:?}"));
        let start: u64 = start
            .parse()
            .unwrap_or_else(|_| panic!("{name}: an attempt line without its time: {line:?}"));
        a.first.get_or_insert(start);
        a.last = Some(start);
        match outcome {
            "pass" => a.passed += 1,
            "blocked" => a.blocked += 1,
            _ => a.errors.push(line.to_owned()),
        }
    }
    a
}

/// The running agent's process (`ztrust-agent run` in its container, seen from the host's pid
/// namespace); panics unless there is exactly one within 60 s (the agent of an earlier rollout may
/// still be shutting down).
pub fn agent_pid() -> i32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let mut argv = cmdline.split(|b| *b == 0);
            let (Some(argv0), Some(argv1)) = (argv.next(), argv.next()) else {
                continue;
            };
            if argv0.ends_with(b"ztrust-agent") && argv1 == b"run" {
                found.push(pid);
            }
        }
        if let [pid] = found[..] {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "not exactly one `ztrust-agent run` process on the node: {found:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `args` in the node's network namespace (the control plane listens on its loopback); their stdout.
pub fn in_node(args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{NODE_NETNS}"))
        .arg("--")
        .args(args)
        .output()
        .expect("nsenter");
    assert!(
        out.status.success(),
        "{args:?} in the node: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A request to etcd's JSON gateway (`/v3/...`) on the node; the answer.
pub fn etcd(path: &str, body: &serde_json::Value) -> serde_json::Value {
    let out = in_node(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-X",
        "POST",
        &format!("http://127.0.0.1:2379{path}"),
        "-d",
        &body.to_string(),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("etcd {path}: {e}: {out}"));
    assert!(
        v.get("error").is_none() && v.get("code").is_none(),
        "etcd {path}: {v}"
    );
    v
}

/// `cargo xtask cluster restart [--kill] COMPONENT`, with the xtask binary `cargo xtask` built.
pub fn restart_component(name: &str, kill: bool) {
    let xtask = root().join("target/debug/xtask");
    assert!(
        xtask.exists(),
        "{} is missing: run the cluster tier with `cargo xtask test`",
        xtask.display()
    );
    let mut c = Command::new(&xtask);
    c.args(["cluster", "restart", name]);
    if kill {
        c.arg("--kill");
    }
    let out = c.output().expect("xtask");
    assert!(
        out.status.success(),
        "cargo xtask cluster restart {name}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Now, as the RFC 3339 time `kubectl logs --since-time` takes.
pub fn rfc3339_now() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
