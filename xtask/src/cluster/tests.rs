use super::*;

#[test]
fn mount_paths_are_unescaped() {
    assert_eq!(unescape_mount_path(r"/run/a\040b"), "/run/a b");
    assert_eq!(unescape_mount_path("/plain"), "/plain");
}

#[test]
fn module_versions_are_read_from_go_mod() {
    let go_mod = "require (\n\tk8s.io/kubernetes v1.36.3\n\tgithub.com/coredns/coredns v1.14.7\n)\n";
    assert_eq!(
        module_version(go_mod, "k8s.io/kubernetes").as_deref(),
        Some("v1.36.3")
    );
    assert_eq!(module_version(go_mod, "k8s.io/api"), None);
}

#[test]
fn a_process_has_exited_once_gone_or_a_zombie() {
    let mut running = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    assert!(!exited(running.id()), "still running");
    // Exited but not reaped: a zombie, whose files are closed.
    let zombie = std::process::Command::new("true").spawn().expect("true");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !exited(zombie.id()) {
        assert!(Instant::now() < deadline, "`true` did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    running.kill().expect("kill");
    running.wait().expect("reap");
    assert!(exited(running.id()), "gone");
    drop(zombie);
}

/// A zombie leader whose other thread still runs (as a SIGKILLed Go program is for a moment, holding
/// its files) has not exited.
#[test]
fn a_zombie_leader_with_a_live_thread_has_not_exited() {
    let mut p = std::process::Command::new("python3")
        .args([
            "-c",
            "import ctypes, threading, time\n\
             threading.Thread(target=time.sleep, args=(2,)).start()\n\
             ctypes.CDLL(None).pthread_exit(None)",
        ])
        .spawn()
        .expect("python3");
    let pid = p.id();
    let leader_dead = || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('Z')))
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !leader_dead() {
        assert!(Instant::now() < deadline, "the leader never became a zombie");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!exited(pid), "a thread still runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exited(pid) {
        assert!(Instant::now() < deadline, "the thread did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    p.wait().expect("reap");
}
