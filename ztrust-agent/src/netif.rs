//! The node's interfaces and host routes: how a pod's address leads to its host-side interface.
//!
//! Per-pod routed CNIs (Calico's `cali*`, kind's `veth*` with ptp, the lab's `ztl*`) install a host route
//! `<podIP>/32 dev <host side>` (or `/128`) for every pod. That route, read from the kernel's routing
//! table of the agent's network namespace, binds a pod to the interface where the TC programs go.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Interface name → index, as the kernel lists them now.
pub fn interfaces() -> io::Result<BTreeMap<String, u32>> {
    let list = nix::net::if_::if_nameindex().map_err(io::Error::from)?;
    Ok(list
        .iter()
        .map(|i| (i.name().to_string_lossy().into_owned(), i.index()))
        .collect())
}

/// The kernel's announcements of interfaces and routes coming, changing and going (rtnetlink groups
/// `RTMGRP_LINK`, `RTMGRP_IPV4_ROUTE`, `RTMGRP_IPV6_ROUTE`), so that the agent attaches to a pod's new
/// interface (closed until its pod is known) within milliseconds of the CNI creating it, before the
/// pod's containers start, rather than at its next poll. The messages are not parsed: each is only a
/// reason to look again (the poll stays, for anything a lost announcement would hide).
pub struct LinkEvents {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl LinkEvents {
    pub fn open() -> io::Result<Self> {
        use nix::sys::socket::{AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket};
        const RTMGRP_LINK: u32 = 0x1;
        const RTMGRP_IPV4_ROUTE: u32 = 0x40;
        const RTMGRP_IPV6_ROUTE: u32 = 0x400;
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(io::Error::from)?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE),
        )
        .map_err(io::Error::from)?;
        // SAFETY: the AsyncFd owns the socket, which stays open for as long as it is registered.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(fd)? };
        Ok(Self { fd })
    }

    /// Waits for the next announcement, then takes whatever else is queued with it.
    pub async fn next(&mut self) -> io::Result<()> {
        use nix::errno::Errno;
        use nix::sys::socket::{MsgFlags, recv};
        let mut buf = [0u8; 16 * 1024];
        loop {
            let mut guard = self.fd.readable().await?;
            let mut got = false;
            // At most this many at a time: under a flood the caller still gets to run (the socket
            // stays readable, so the next call returns at once).
            for _ in 0..256 {
                match recv(
                    std::os::fd::AsRawFd::as_raw_fd(guard.get_inner()),
                    &mut buf,
                    MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(_) => got = true,
                    // The socket's queue overflowed: announcements were lost, which is itself news.
                    Err(Errno::ENOBUFS) => got = true,
                    Err(Errno::EAGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if got {
                return Ok(());
            }
        }
    }
}

/// Host routes (a whole /32 or /128 through an interface, no gateway): address → interface name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HostRoutes(pub BTreeMap<IpAddr, String>);

impl HostRoutes {
    pub fn read() -> io::Result<Self> {
        let mut routes = BTreeMap::new();
        parse_ipv4(&fs::read_to_string("/proc/net/route")?, &mut routes);
        // A node without IPv6 has no such file.
        if let Ok(text) = fs::read_to_string("/proc/net/ipv6_route") {
            parse_ipv6(&text, &mut routes);
        }
        Ok(Self(routes))
    }

    pub fn interface_of(&self, ip: &IpAddr) -> Option<&str> {
        self.0.get(ip).map(String::as_str)
    }
}

/// `/proc/net/route`: `Iface Destination Gateway Flags RefCnt Use Metric Mask ...`, addresses as
/// little-endian hex.
fn parse_ipv4(text: &str, out: &mut BTreeMap<IpAddr, String>) {
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(dst), Ok(gw), Ok(mask)) = (
            u32::from_str_radix(f[1], 16),
            u32::from_str_radix(f[2], 16),
            u32::from_str_radix(f[7], 16),
        ) else {
            continue;
        };
        if mask == u32::MAX && gw == 0 {
            out.insert(IpAddr::V4(Ipv4Addr::from(u32::from_be(dst))), f[0].to_owned());
        }
    }
}

/// `/proc/net/ipv6_route`: `dst dst_len src src_len next_hop metric refcnt use flags iface`, hex.
fn parse_ipv6(text: &str, out: &mut BTreeMap<IpAddr, String>) {
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[1] != "80" || f[4] != "00000000000000000000000000000000" {
            continue;
        }
        let Ok(dst) = u128::from_str_radix(f[0], 16) else {
            continue;
        };
        let iface = f[9];
        // Local addresses of the node itself show up as /128 routes through `lo`.
        if iface == "lo" {
            continue;
        }
        out.insert(IpAddr::V6(Ipv6Addr::from(dst)), iface.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_routes_are_read_from_both_tables() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  ztl1\t0A00F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                  eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  cni0\t0000F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let v6 = "fd000010024400000000000000000010 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     ztl1\n\
                  fd000010024400000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000001 00000000 80200001       lo\n";
        let mut out = BTreeMap::new();
        parse_ipv4(v4, &mut out);
        parse_ipv6(v6, &mut out);
        let r = HostRoutes(out);
        assert_eq!(r.interface_of(&"10.244.0.10".parse().unwrap()), Some("ztl1"));
        assert_eq!(r.interface_of(&"fd00:10:244::10".parse().unwrap()), Some("ztl1"));
        // Gateways, subnets (bridges) and the node's own addresses bind nothing.
        assert_eq!(r.0.len(), 2);
    }
}
