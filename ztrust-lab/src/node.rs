//! A node network namespace and its pods' links, wired the way a routed per-pod CNI (Calico) does it:
//! a /32 and /128 host route per pod on the node, the pod's default route through a link-local gateway
//! that exists on every node-side interface, the node's own addresses on its `lo`.
//!
//! The one place that builds a node: `lab up` uses it, and so do the privileged tests' topologies
//! (`tests/tests/privileged/common`), so what the tests prove holds for the lab's wiring.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Result;
use super::alloc::{GATEWAY_V4, GATEWAY_V6};
use super::net;

/// The node's own addresses (on its `lo`): the source of what the node sends to its pods, the HOST
/// identity of Kubernetes policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeAddrs {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl NodeAddrs {
    pub fn ips(self) -> [IpAddr; 2] {
        [IpAddr::V4(self.v4), IpAddr::V6(self.v6)]
    }
}

/// Every namespace's: addresses usable at once (no duplicate address detection delay), replies free to
/// leave by another interface than the request came in (no strict reverse-path filter).
const AT_ONCE: [(&str, &str); 4] = [
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
];

/// The node's namespace `netns`: a router for pods, with `addrs` on its `lo` ([`AT_ONCE`] too).
pub fn make_node(netns: &str, addrs: NodeAddrs) -> Result<()> {
    net::add_netns(netns)?;
    let router = [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
    ];
    net::sysctls(netns, &[&router[..], &AT_ONCE[..]].concat())?;
    net::ip_batch(
        netns,
        &[
            "link set lo up".into(),
            format!("addr add {}/32 dev lo", addrs.v4),
            format!("addr add {}/128 dev lo nodad", addrs.v6),
        ],
    )
}

/// A pod's (or an external host's) namespace `netns` with `ips` on its `eth0`, and its veth to node
/// `node_netns`, whose side `host_if` is left down: [`link_up`] brings it up, once whatever must
/// judge its first packet is attached.
pub fn make_endpoint(node_netns: &str, netns: &str, host_if: &str, ips: &[IpAddr]) -> Result<()> {
    net::add_netns(netns)?;
    net::sysctls(netns, &AT_ONCE)?;
    net::ip_batch(
        node_netns,
        &[format!(
            "link add {host_if} type veth peer name eth0 netns {netns}"
        )],
    )?;
    let mut pod = vec!["link set lo up".to_owned(), "link set eth0 up".into()];
    for ip in ips {
        match ip {
            IpAddr::V4(v4) => pod.push(format!("addr add {v4}/32 dev eth0")),
            IpAddr::V6(v6) => pod.push(format!("addr add {v6}/128 dev eth0 nodad")),
        }
    }
    if ips.iter().any(IpAddr::is_ipv4) {
        pod.push(format!("route add {GATEWAY_V4}/32 dev eth0 scope link"));
        pod.push(format!("route add 0.0.0.0/0 via {GATEWAY_V4} dev eth0 onlink"));
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        pod.push(format!("route add ::/0 via {GATEWAY_V6} dev eth0"));
    }
    net::ip_batch(netns, &pod)?;
    net::ip_batch(
        node_netns,
        &[
            format!("addr add {GATEWAY_V4}/32 dev {host_if}"),
            format!("addr add {GATEWAY_V6}/64 dev {host_if} nodad"),
        ],
    )
}

/// Node side `host_if` up, then the host routes to `ips` through it, which tell the node (and the
/// agent) which pod is behind it; the node sends to them from `node`'s address of their family.
pub fn link_up(node_netns: &str, host_if: &str, ips: &[IpAddr], node: NodeAddrs) -> Result<()> {
    let mut lines = vec![format!("link set {host_if} up")];
    for ip in ips {
        match ip {
            IpAddr::V4(v4) => lines.push(format!("route add {v4}/32 dev {host_if} src {}", node.v4)),
            IpAddr::V6(v6) => lines.push(format!("route add {v6}/128 dev {host_if} src {}", node.v6)),
        }
    }
    net::ip_batch(node_netns, &lines)
}
