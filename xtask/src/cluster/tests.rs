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
