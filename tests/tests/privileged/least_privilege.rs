//! Least privilege (root only; `cargo xtask test` runs it): the agent enforces with exactly CAP_BPF,
//! CAP_NET_ADMIN and CAP_PERFMON (every other capability dropped with capsh), refuses to start with a
//! clear error when any of the three is missing, and its flow API socket is 0600.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::payments::PaymentsLab;
use crate::common::{agent_bin, require_root};
use ztrust_agent::model::Protocol;
use ztrust_lab::{self as lab, ProbeOptions, Verdict};
const NEEDED: [&str; 3] = ["cap_bpf", "cap_net_admin", "cap_perfmon"];
/// CAP_NET_ADMIN = 12, CAP_PERFMON = 38, CAP_BPF = 39.
const NEEDED_MASK: u64 = (1 << 12) | (1 << 38) | (1 << 39);

/// Every capability of this kernel but `keep`, comma-separated, for `capsh --drop`.
fn all_but(keep: &[&str]) -> String {
    let out = Command::new("capsh")
        .arg("--print")
        .output()
        .expect("capsh (libcap2-bin)");
    let text = String::from_utf8_lossy(&out.stdout);
    let bounding = text
        .lines()
        .find_map(|l| l.strip_prefix("Bounding set ="))
        .expect("bounding set");
    bounding
        .split(',')
        .filter(|c| !keep.contains(c))
        .collect::<Vec<_>>()
        .join(",")
}

/// A wrapper that runs the agent with only `keep` in its bounding set (uid 0 then gets exactly those).
fn wrapper(dir: &Path, keep: &[&str]) -> PathBuf {
    let path = dir.join(format!("agent-{}", keep.join("-")));
    let script = format!(
        "#!/bin/sh\nexec capsh --drop={} -- -c 'exec \"$0\" \"$@\"' {} \"$@\"\n",
        all_but(keep),
        agent_bin().display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn cap_eff(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn enforces_with_three_capabilities_and_no_more() {
    require_root();
    assert!(nix::unistd::geteuid().is_root(), "run as root");
    let scratch = PathBuf::from(format!("/run/ztrust/caps-test-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();

    // Without any one of the three, the agent stops at once and says why.
    for missing in NEEDED {
        let keep: Vec<&str> = NEEDED.iter().copied().filter(|c| *c != missing).collect();
        let bin = wrapper(&scratch, &keep);
        let src = scratch.join("empty");
        std::fs::create_dir_all(&src).unwrap();
        let out = Command::new("timeout")
            .arg("10")
            .arg(&bin)
            .args([
                "run",
                "--metrics-addr",
                "none",
                "--grpc-socket",
                "none",
                "--interface-prefix",
                "ztnone",
            ])
            .arg(format!("--source=dir:{}", src.display()))
            .arg(format!("--pin-path=/sys/fs/bpf/ztcaps{}", std::process::id()))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the agent ran without {missing}");
        assert!(
            err.contains("Error:") && (err.contains("map") || err.contains("program")),
            "without {missing}: {err}"
        );
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/ztcaps{}", std::process::id()));
    }

    // With exactly the three: the payments lab is enforced.
    let bin = wrapper(&scratch, &NEEDED);
    let lab = PaymentsLab::up("ztc", &bin, &["--metrics-addr", "none"]);
    let agent = lab.agent();
    // The lab started the wrapper; capsh exec'd the agent in the same process.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        cap_eff(agent.pid),
        NEEDED_MASK,
        "the agent holds exactly CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON"
    );
    let m = lab::probe(
        &lab.state_dir,
        &ProbeOptions {
            timeout: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        m.verdict("payments/frontend", "payments/backend", 8080, Protocol::Tcp),
        Some(Verdict::Allowed)
    );
    assert_eq!(
        m.verdict("payments/frontend", "payments/database", 5432, Protocol::Tcp),
        Some(Verdict::Denied)
    );
    assert_eq!(
        m.verdict("payments/backend", "payments/database", 5432, Protocol::Tcp),
        Some(Verdict::Allowed)
    );
    let mode = std::fs::metadata(&agent.socket)
        .expect("flow API socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the flow API socket is private");
    drop(lab);
    let _ = std::fs::remove_dir_all(&scratch);
}
