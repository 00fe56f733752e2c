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
