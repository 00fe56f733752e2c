//! The sections of `ztrust-bench` (`cargo xtask bench [datapath|throughput|control-plane|flows|all]`):
//! - [`datapath`]: per-packet cost of the real programs (BPF_PROG_TEST_RUN) as the maps grow;
//! - [`throughput`]: iperf3 and a TCP ping-pong through a veth pair, without enforcement, with ztrust,
//!   with the same policy as iptables rules and as an ipset;
//! - [`control`]: cold compile + map sync of synthetic clusters, peak RSS, single-change latency;
//! - [`flows`]: denied-flow events from the kernel ring buffer to a `flows --follow` gRPC client.

pub mod control;
pub mod datapath;
pub mod flows;
pub mod synth;
pub mod throughput;

use std::os::fd::AsFd;
use std::process::Command;

/// Runs a command, panicking with its stderr when it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command, ignoring failure (cleanup).
pub fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

/// Runs a command with `input` on its standard input.
pub fn sh_stdin(args: &[&str], input: &str) {
    use std::io::Write as _;
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Moves the calling thread into a network namespace (threads keep their own).
pub fn enter_netns(name: &str) {
    let f = std::fs::File::open(format!("/run/netns/{name}")).expect("open netns");
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// The process id in the name of a namespace or pin directory a section made (`ztbt1234n`,
/// `ztbdp1234`: `ztb`, the section's letters, the id, maybe a suffix).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix("ztb")?
        .trim_start_matches(|c: char| c.is_ascii_lowercase());
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Removes the network namespaces and pins of benchmark runs that ended without removing them (killed),
/// leaving those of runs still alive alone. Their servers die with them (`kill_with_parent`).
pub fn remove_leftovers() {
    let dead = |name: &str| {
        owner_pid(name).is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            eprintln!("removing network namespace {name}, left by an interrupted benchmark");
            sh_quiet(&["ip", "netns", "del", &name]);
        }
    }
    for entry in std::fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            eprintln!("removing pins /sys/fs/bpf/{name}, left by an interrupted benchmark");
            let _ = ztrust_agent::datapath::loader::cleanup(&entry.path());
        }
    }
}

/// Makes a child process get SIGKILL when the thread that started it ends, the benchmark killed
/// included (a server left running would hold its namespace).
pub fn kill_with_parent(c: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: only an async-signal-safe system call between fork and exec.
    unsafe {
        c.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
        })
    }
}

/// A field of /proc/self/status in KiB (`VmHWM`, `VmRSS`).
pub fn proc_status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The `q` quantile (0..=1) of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The middle value (the mean of the two middle ones for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Skb context for BPF_PROG_TEST_RUN with the given ifindex (`__sk_buff.ifindex` at offset 40).
pub fn skb_ctx(ifindex: u32) -> [u8; 192] {
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// An Ethernet frame with an IPv4 or IPv6 header and a TCP or UDP header.
pub fn frame(v6: bool, src: &[u8], dst: &[u8], protocol: u8, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    if protocol == ztrust_common::proto::TCP {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&[0, 8, 0, 0]);
    }
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    if v6 {
        f.extend_from_slice(&0x86DDu16.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        f.extend_from_slice(&[protocol, 64]);
    } else {
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0, 0, 64, protocol, 0, 0]);
    }
    f.extend_from_slice(src);
    f.extend_from_slice(dst);
    f.extend_from_slice(&l4);
    f
}

pub fn mapped(ip: [u8; 4]) -> [u8; 16] {
    std::net::Ipv4Addr::from(ip).to_ipv6_mapped().octets()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_owner_of_a_leftover_is_read_from_its_name() {
        assert_eq!(super::owner_pid("ztbt1234n"), Some(1234));
        assert_eq!(super::owner_pid("ztbt1234"), Some(1234));
        assert_eq!(super::owner_pid("ztbdp77"), Some(77));
        assert_eq!(super::owner_pid("ztbfl5"), Some(5));
        assert_eq!(super::owner_pid("ztlab-node"), None, "not a benchmark's");
        assert_eq!(super::owner_pid("ztrust"), None);
        assert_eq!(super::owner_pid("ztbx"), None, "no id: never removed");
    }
}
