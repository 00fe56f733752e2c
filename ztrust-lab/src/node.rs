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

/// Name of the link to node `block` in every other node's namespace (`tonode1` leads to the first).
pub const NODE_LINK: &str = "tonode";

pub fn node_link(block: u8) -> String {
    format!("{NODE_LINK}{}", u16::from(block) + 1)
}

/// The IPv6 link-local address of node `block` on its links to other nodes (the next hop of routes to
/// its pods).
fn link_local(block: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xffff, u16::from(block) + 1)
}

/// One node of a multi-node lab, as the wiring between nodes needs it.
#[derive(Clone, Copy, Debug)]
pub struct Peer<'a> {
    pub netns: &'a str,
    pub block: u8,
}

impl Peer<'_> {
    fn addrs(self) -> NodeAddrs {
        let (v4, v6) = super::alloc::node_addrs(self.block);
        NodeAddrs { v4, v6 }
    }
}

/// The link between nodes `a` and `b`, and each one's routes to the other's pod block through it (a
/// routed CNI's per-node routes: Calico without encapsulation, kube-router, flannel's host-gw). What a
/// node sends over it leaves from the node's own address.
pub fn connect_nodes(a: Peer<'_>, b: Peer<'_>) -> Result<()> {
    net::ip_batch(
        a.netns,
        &[format!(
            "link add {} type veth peer name {} netns {}",
            node_link(b.block),
            node_link(a.block),
            b.netns
        )],
    )?;
    for (me, other) in [(a, b), (b, a)] {
        let dev = node_link(other.block);
        let (v4, v6) = super::alloc::block_cidrs(other.block);
        let (mine, theirs) = (me.addrs(), other.addrs());
        net::ip_batch(
            me.netns,
            &[
                format!("link set {dev} up"),
                format!("addr add {}/64 dev {dev} nodad", link_local(me.block)),
                format!(
                    "route add {v4} via {} dev {dev} onlink src {}",
                    theirs.v4, mine.v4
                ),
                format!(
                    "route add {v6} via {} dev {dev} src {}",
                    link_local(other.block),
                    mine.v6
                ),
            ],
        )?;
    }
    Ok(())
}

/// At node `at`, host routes to `ips` (a pod's or an external host's, outside the pod block of the node
/// they are on) through the link to node `on`, as a routed CNI announces an address borrowed from
/// another node's block.
pub fn route_via(at: Peer<'_>, on: Peer<'_>, ips: &[IpAddr]) -> Result<()> {
    let dev = node_link(on.block);
    let (mine, theirs) = (at.addrs(), on.addrs());
    let lines: Vec<String> = ips
        .iter()
        .map(|ip| match ip {
            IpAddr::V4(v4) => format!(
                "route replace {v4}/32 via {} dev {dev} onlink src {}",
                theirs.v4, mine.v4
            ),
            IpAddr::V6(v6) => format!(
                "route replace {v6}/128 via {} dev {dev} src {}",
                link_local(on.block),
                mine.v6
            ),
        })
        .collect();
    net::ip_batch(at.netns, &lines)
}

/// Undoes [`route_via`] (what is not there any more is no error).
pub fn unroute(at: &str, ips: &[IpAddr]) {
    for ip in ips {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        let _ = net::ip_batch(at, &[format!("route del {ip}/{prefix}")]);
    }
}
