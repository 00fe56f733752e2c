//! What `cluster down` removes besides the components: pods' processes, cgroups, mounts.

use super::*;

/// The cgroup v1 hierarchies (and the v2 one) where the kubelet made `kubepods`.
pub(super) fn kubepods_cgroups() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path().join("kubepods"))
        .filter(|p| p.is_dir())
        .collect()
}

pub(super) fn cgroup_tree(dir: &Path, out: &mut Vec<PathBuf>) {
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
pub(super) fn kill_pod_processes() {
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
pub(super) fn kill_shims(p: &Paths) {
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
pub(super) fn our_mounts(p: &Paths) -> Vec<String> {
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

pub(super) fn unescape_mount_path(s: &str) -> String {
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

pub(super) fn remove_cgroups() {
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
