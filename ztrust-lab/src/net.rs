//! Network namespaces, links and processes, through iproute2 and `setns(2)`.
//!
//! Every change happens inside a network namespace the lab made (`ip -n <netns>`, or a thread that has
//! joined it); nothing here touches the root namespace's addresses, routes or sysctls.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

use super::{Error, Result, io_err};

pub const NETNS_DIR: &str = "/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<String> {
    let text = format!("{cmd:?}").replace('"', "");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(io_err(format!("running {text}")))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes())
            .map_err(io_err(format!("writing to {text}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io_err(format!("running {text}")))?;
    if !out.status.success() {
        let command = match stdin {
            Some(input) => format!("{text} <<< {}", input.trim().replace('\n', "; ")),
            None => text,
        };
        return Err(Error::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip <args>` in the root namespace: only for `netns add/del/list`, which make or remove namespaces.
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args), None)
}

/// `ip -n <netns> -batch -`: many changes in one namespace with one process. Stops at the first error.
pub fn ip_batch(netns: &str, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    run(
        Command::new("ip").args(["-n", netns, "-batch", "-"]),
        Some(&(lines.join("\n") + "\n")),
    )
    .map(drop)
}

/// `nft -f -` with `script` in network namespace `netns` (one transaction: all of it or nothing).
pub fn nft(netns: &str, script: &str) -> Result<()> {
    run(
        Command::new("ip").args(["netns", "exec", netns, "nft", "-f", "-"]),
        Some(script),
    )
    .map(drop)
}

/// `program args…` in network namespace `netns`, with `stdin`; its standard output.
pub fn exec_in(netns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    run(
        Command::new("ip")
            .args(["netns", "exec", netns, program])
            .args(args),
        stdin,
    )
}

/// Every network namespace whose name starts with `<prefix>-`.
pub fn list_netns(prefix: &str) -> Vec<String> {
    let wanted = format!("{prefix}-");
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&wanted))
        .collect();
    names.sort();
    names
}

pub fn add_netns(name: &str) -> Result<()> {
    ip(&["netns", "add", name]).map(drop)
}

/// Deleting a namespace destroys its veths (and so their peers). Missing is fine.
pub fn del_netns(name: &str) -> Result<()> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name]).map(drop)
}

pub fn open_netns(name: &str) -> Result<File> {
    let path = netns_path(name);
    File::open(&path).map_err(io_err(format!("opening {}", path.display())))
}

/// Writes `/proc/sys/<key>` (dots as slashes) inside `netns`. `/proc/sys/net` shows the namespace of the
/// thread that opens it, so a short-lived thread joins the namespace and writes there.
pub fn sysctls(netns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let fd = open_netns(netns)?;
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.replace('.', "/"), (*v).to_owned()))
        .collect();
    let netns = netns.to_owned();
    std::thread::spawn(move || -> Result<()> {
        setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|e| io_err(format!("joining netns {netns}"))(e.into()))?;
        for (key, value) in settings {
            let path = format!("/proc/sys/{key}");
            std::fs::write(&path, &value)
                .map_err(io_err(format!("writing {value} to {path} in netns {netns}")))?;
        }
        Ok(())
    })
    .join()
    .expect("sysctl thread does not panic")
}

/// Interface indexes of `names` inside `netns` (`None` for a name that does not exist there).
pub fn ifindexes(netns: &str, names: &[String]) -> Result<Vec<Option<u32>>> {
    let fd = open_netns(netns)?;
    let names = names.to_vec();
    let netns = netns.to_owned();
    std::thread::spawn(move || -> Result<Vec<Option<u32>>> {
        setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|e| io_err(format!("joining netns {netns}"))(e.into()))?;
        Ok(names
            .iter()
            .map(|n| nix::net::if_::if_nametoindex(n.as_str()).ok())
            .collect())
    })
    .join()
    .expect("ifindex thread does not panic")
}

/// Starts `program args` detached (own session) inside `netns`, output appended to `log`.
pub fn spawn_in_netns(netns: &str, program: &Path, args: &[String], log: &Path) -> Result<u32> {
    let fd = open_netns(netns)?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(format!("opening {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(io_err(format!("opening {}", log.display())))?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: between fork and exec the child only makes two system calls (async-signal-safe), on a file
    // descriptor opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)?;
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(io_err(format!("starting {} in netns {netns}", program.display())))?;
    // The child is waited for by `kill_and_wait` (or by init once this process exits).
    Ok(child.id())
}

/// The command line of a process, arguments joined by spaces (empty if it is gone).
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Processes whose command line is a `serve` of the lab in `state_dir`.
pub fn lab_servers(state_dir: &Path) -> Vec<u32> {
    let tag = format!("--lab {}", state_dir.display());
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| is_lab_server(&cmdline(*pid), &tag))
        .collect();
    pids.sort_unstable();
    pids
}

/// Processes whose command line contains every one of `needles`.
pub fn processes_with(needles: &[&str]) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| {
            let c = cmdline(*pid);
            !c.is_empty() && needles.iter().all(|n| c.contains(n))
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// SIGTERM the processes, wait up to `grace`, then SIGKILL what is left (and reap our children).
pub fn terminate(pids: &[u32], grace: Duration) {
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && !pids.iter().all(|p| gone(*p)) {
        std::thread::sleep(Duration::from_millis(10));
    }
    for pid in pids.iter().filter(|p| !gone(**p)) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline && !pids.iter().all(|p| gone(*p)) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the process is gone (or a zombie).
pub fn is_gone(pid: u32) -> bool {
    gone(pid)
}

fn is_lab_server(cmdline: &str, tag: &str) -> bool {
    cmdline.contains(" serve --name ") && (cmdline.ends_with(tag) || cmdline.contains(&format!("{tag} ")))
}

fn gone(pid: u32) -> bool {
    // Reap it if it is our child; otherwise a zombie still counts as gone.
    let _ = nix::sys::wait::waitpid(
        nix::unistd::Pid::from_raw(pid as i32),
        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
    );
    let dead = |stat: &std::path::Path| match std::fs::read_to_string(stat) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(true),
    };
    let proc = std::path::PathBuf::from(format!("/proc/{pid}"));
    // A zombie leader is not enough: the other threads of a multi-threaded process (the servers, the
    // agent) may still be exiting and still hold its sockets.
    dead(&proc.join("stat"))
        && std::fs::read_dir(proc.join("task"))
            .map(|tasks| tasks.flatten().all(|t| dead(&t.path().join("stat"))))
            .unwrap_or(true)
}

/// SIGTERM each process that is still a `serve` of this lab (a recorded PID may have been reused),
/// wait up to a second, then SIGKILL what is left.
pub fn kill_servers(pids: &[u32], state_dir: &Path) {
    let tag = format!("--lab {}", state_dir.display());
    let ours: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|p| is_lab_server(&cmdline(*p), &tag))
        .collect();
    terminate(&ours, Duration::from_secs(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_servers_of_this_lab() {
        let tag = "--lab /run/ztrust/lab";
        assert!(is_lab_server(
            "/bin/ztrust-lab serve --name a/b --tcp 80 --lab /run/ztrust/lab",
            tag
        ));
        assert!(is_lab_server(
            "/x serve --name a/b --lab /run/ztrust/lab --tcp 80",
            tag
        ));
        assert!(!is_lab_server("/x serve --name a/b --lab /run/ztrust/lab2", tag));
        assert!(!is_lab_server("/x probe --lab /run/ztrust/lab", tag));
    }
}
