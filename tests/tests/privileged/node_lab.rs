//! The node's own traffic in the payments lab with the real agent: Kubernetes lets no pod block its
//! node, from whichever of the node's addresses the traffic comes.
//!
//! `cargo test -p ztrust-tests --test privileged node_lab::` (root)

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::time::Duration;

use crate::common::payments::{PaymentsLab, connects, enter};
use crate::common::{agent_bin, require_root};

/// Whether a TCP connection from `src` in namespace `netns` to `dst` is set up within `timeout`.
fn connects_from(netns: &str, src: IpAddr, dst: SocketAddr, timeout: Duration) -> bool {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket, sockopt,
    };
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        enter(&netns);
        let family = if dst.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket");
        bind(fd.as_raw_fd(), &SockaddrStorage::from(SocketAddr::new(src, 0))).expect("bind");
        // connect(2) gives up after the send timeout.
        let t = nix::sys::time::TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as i64);
        setsockopt(&fd, sockopt::SendTimeout, &t).expect("SO_SNDTIMEO");
        connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)).is_ok()
    })
    .join()
    .unwrap()
}

/// The node connects to database (isolated: only backend may reach it) from an address it got after
/// the agent started — on its loopback, as a point-to-point CNI puts a gateway address on every pod's
/// host-side interface, which is where the kubelet's probes then come from. The agent reads the node's
/// local routing table and counts that address as the node's: the connection is set up. prometheus's
/// connection to database (its egress is not isolated) is not (the control: database's ingress is
/// enforced).
#[test]
fn the_nodes_traffic_from_any_of_its_addresses_reaches_isolated_pods() {
    require_root();
    let lab = PaymentsLab::up("znd", agent_bin(), &["--metrics-addr", "none"]);
    let node = format!("{}-node", lab.prefix);
    let log = lab.state_dir.join("logs/agent.log");
    let noticed = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("the node's local addresses changed")
            .count()
    };
    let before = noticed();
    let out = std::process::Command::new("ip")
        .args(["-n", &node, "addr", "add", "198.51.100.7/32", "dev", "lo"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while noticed() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not notice the node's new address:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let database = SocketAddr::new(lab.pod("database").ips[0], 5432);
    let t = Duration::from_secs(2);
    assert!(
        !connects(&lab.pod("prometheus").netns, database, t),
        "prometheus (egress not isolated) → database connected: database's ingress is not enforced"
    );
    assert!(
        connects_from(&node, "198.51.100.7".parse().unwrap(), database, t),
        "the node (from 198.51.100.7) → database: blocked"
    );
}
