//! The cluster's binaries (Go, from their modules) and OCI images.

use super::*;

/// What the binaries were built from, read from tests/cluster/go.mod.
pub(super) struct Versions {
    pub(super) kubernetes: String,
    pub(super) coredns_image: String,
}

pub(super) fn module_version(go_mod: &str, module: &str) -> Option<String> {
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
pub(super) fn build_binaries(p: &Paths) -> Result<Versions> {
    build_binaries_with(p, false)
}

pub(super) fn build_binaries_with(p: &Paths, background: bool) -> Result<Versions> {
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
        drop_go_cache_if_disk_is_short(&p.bin);
    }
    for link in LINKS {
        let path = p.bin.join(link);
        if fs::symlink_metadata(&path).is_err() {
            std::os::unix::fs::symlink("ztrust-k8s", &path)?;
        }
    }
    Ok(versions)
}

/// Below this much free space after a Kubernetes build, Go's build cache (≈3 GB for it) goes: the
/// binaries are built, and the Rust builds and the cluster's images still need room.
const LOW_DISK_BYTES: u64 = 12 << 30;

fn drop_go_cache_if_disk_is_short(built: &Path) {
    match free_bytes(built) {
        Some(avail) if avail < LOW_DISK_BYTES => {
            eprintln!(
                "{} free: dropping Go's build cache (`go clean -cache`; the next Go build starts cold)",
                gib(avail)
            );
            if let Err(e) = run(cmd("go", &["clean", "-cache"])) {
                eprintln!("go clean -cache failed: {e:#}");
            }
        }
        Some(_) => {}
        None => eprintln!("could not read the free space under {} (df)", built.display()),
    }
}

/// The version stamps upstream's build (hack/lib/version.sh) sets, so that `kubectl version`, the
/// apiserver's /version and the node's kubeletVersion say what was built. There is no git commit: the
/// sources come from the module proxy.
pub(super) fn version_ldflags(kubernetes: &str) -> Result<String> {
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

pub(super) fn newest_mtime(dir: &Path) -> Result<std::time::SystemTime> {
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
pub(super) fn build_images(p: &Paths, version: &Versions) -> Result<Vec<(String, PathBuf)>> {
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
pub(super) fn agent_image_args(agent: &Path) -> Result<Vec<String>> {
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
