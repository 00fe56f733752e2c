//! The node's local addresses as its routing knows them, mirrored into [`names::NODE_LOCAL`] for node
//! ports on every local address (`run --nodeport-addresses all`).
//!
//! kube-proxy in iptables mode without `--nodeport-addresses` translates a node port at every address
//! whose type is `local` (`-m addrtype --dst-type LOCAL`, and `fib daddr type local` in nftables mode):
//! the type of the longest route of the node's `local` routing table (255) that covers the address.
//! That table holds the `local` routes of the node's own addresses, of 127.0.0.0/8 and `::1`, of an
//! address range on the loopback device, and of whatever AnyIP range an operator declares with
//! `ip route add local <prefix> dev lo`; and beside them `broadcast`, `anycast` and `multicast` routes,
//! which win where they are longer (a subnet's broadcast address inside a local range is broadcast).
//! The mirror holds every route of the table with its answer (1: local, 0: another type), so that the
//! kernel program's longest-prefix lookup answers as the node's routing does.
//!
//! An address no route of the table covers is not the node's; the kernel program then asks the node's
//! FIB, and one the FIB does not forward either (an address added since the last mirror) is
//! `unknown-service`: the program cannot tell what the node will do, so it denies and says so.
//!
//! IPv6 link-local addresses (`fe80::/10`) are left out: a link-local address is local only on its own
//! link, which a table without interfaces cannot say. A pod's connection to one at a node port is
//! therefore denied as `unknown-service` (kube-proxy's own treatment of them depends on the interface).

use std::collections::BTreeMap;
use std::io;

use aya::maps::{MapData, lpm_trie::Key, lpm_trie::LpmTrie};
use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use ztrust_common::{IpcacheKey, capacity, names};

use super::keys::{ipcache_key, ipcache_net};

/// The routing table kube-proxy's "destination type" reads.
const RT_TABLE_LOCAL: u32 = 255;

/// The routes of the node's `local` table (prefix → whether it is a `local` route), IPv6 link-local
/// ones left out (see the module's documentation).
pub fn local_routes() -> io::Result<BTreeMap<IpNet, bool>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut out = BTreeMap::new();
    for (seq, family) in [(1, AddressFamily::Inet), (2, AddressFamily::Inet6)] {
        let mut request = RouteMessage::default();
        request.header.address_family = family;
        let mut msg = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(RouteNetlinkMessage::GetRoute(request)),
        );
        msg.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        msg.header.sequence_number = seq;
        msg.finalize();
        let mut buf = vec![0; msg.header.length as usize];
        msg.serialize(&mut buf);
        socket.send(&buf, 0)?;
        dump(&socket, seq, &mut out)?;
    }
    Ok(out)
}

/// Reads the answers to dump request `seq` until its end. A dump the kernel says a change interrupted
/// (`NLM_F_DUMP_INTR`) may miss routes: an error, so that nothing is taken from it.
fn dump(socket: &Socket, seq: u32, out: &mut BTreeMap<IpNet, bool>) -> io::Result<()> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, format!("route dump: {what}"));
    let mut buf = vec![0u8; 1 << 16];
    let mut interrupted = false;
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < n {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..n])
                .map_err(|e| bad(e.to_string()))?;
            let len = msg.header.length as usize;
            if len == 0 {
                return Err(bad("a message of length 0".into()));
            }
            offset += len;
            if msg.header.sequence_number != seq {
                continue;
            }
            interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
            match msg.payload {
                NetlinkPayload::Done(_) if interrupted => {
                    return Err(bad("interrupted by a change (read again)".into()));
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => return Err(bad(e.to_string())),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => {
                    if let Some((net, local)) = local_table_entry(&r) {
                        // Two routes of one prefix (two interfaces): local if either is.
                        *out.entry(net).or_default() |= local;
                    }
                }
                _ => {}
            }
        }
    }
}

/// A route of the `local` table (not IPv6 link-local): its prefix, and whether it is a `local` route.
fn local_table_entry(r: &RouteMessage) -> Option<(IpNet, bool)> {
    // The attribute holds the table's id past 255; the header's field, up to it.
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table));
    if table != RT_TABLE_LOCAL {
        return None;
    }
    let len = r.header.destination_prefix_length;
    let net = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => IpNet::new((*v4).into(), len).ok(),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => IpNet::new((*v6).into(), len).ok(),
        _ => None,
    })?;
    let link_local = matches!(net, IpNet::V6(n) if n.addr().segments()[0] & 0xffc0 == 0xfe80);
    (!link_local).then(|| (net.trunc(), r.header.kind == RouteType::Local))
}

/// The single addresses among `routes`' `local` ones, the loopback range's left out: where the node's
/// own traffic to a pod may come from.
pub fn host_addresses(routes: &BTreeMap<IpNet, bool>) -> std::collections::BTreeSet<std::net::IpAddr> {
    routes
        .iter()
        .filter(|(net, local)| **local && net.prefix_len() == net.max_prefix_len())
        .map(|(net, _)| net.addr())
        .filter(|ip| !ip.is_loopback())
        .collect()
}

/// What the map holds, as this agent wrote or adopted it.
#[derive(Debug, Default)]
pub struct NodeLocal {
    written: BTreeMap<IpNet, bool>,
    /// The capacity was exceeded at the last sync (said once until it no longer is).
    overflowing: bool,
}

impl NodeLocal {
    /// The entries an earlier agent left.
    pub fn adopt(map: &LpmTrie<MapData, IpcacheKey, u32>) -> Self {
        let written = map
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((ipcache_net(k.prefix_len(), &k.data())?, v != 0)))
            .collect();
        Self {
            written,
            overflowing: false,
        }
    }

    /// The prefixes mirrored that are `local` routes.
    pub fn local(&self) -> usize {
        self.written.values().filter(|l| **l).count()
    }

    /// Makes the map hold `desired`: the prefixes that went first (a miss meanwhile is decided by the
    /// FIB: not forwarded is `unknown-service`, denied), then new and changed ones. Past the capacity
    /// the rest is left out, `local` routes rather than others: a left-out `local` route's addresses
    /// miss (denied, as above), whereas a left-out broadcast or anycast route inside a local range would
    /// make its address look local. Returns whether anything changed.
    pub fn sync(
        &mut self,
        map: &mut LpmTrie<MapData, IpcacheKey, u32>,
        desired: &BTreeMap<IpNet, bool>,
    ) -> Result<bool, aya::maps::MapError> {
        let mut changed = false;
        let room = capacity::NODE_LOCAL as usize;
        let mut left_out = 0;
        let gone: Vec<IpNet> = self
            .written
            .keys()
            .filter(|n| !desired.contains_key(n))
            .copied()
            .collect();
        for net in gone {
            let (prefix, key) = ipcache_key(&net);
            match map.remove(&Key::new(prefix, key)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
            self.written.remove(&net);
            changed = true;
        }
        // Routes of the other types first, so that what is left out past the capacity is `local`.
        let ordered = desired
            .iter()
            .filter(|(_, l)| !**l)
            .chain(desired.iter().filter(|(_, l)| **l));
        for (net, local) in ordered {
            if self.written.get(net) == Some(local) {
                continue;
            }
            if !self.written.contains_key(net) && self.written.len() >= room {
                left_out += 1;
                continue;
            }
            let (prefix, key) = ipcache_key(net);
            map.insert(&Key::new(prefix, key), u32::from(*local), 0)?;
            self.written.insert(*net, *local);
            changed = true;
        }
        if left_out > 0 && !self.overflowing {
            tracing::warn!(
                left_out,
                capacity = room,
                map = names::NODE_LOCAL,
                "more routes in the node's local table than the mirror holds: node ports at addresses only they cover are denied (unknown-service)"
            );
        }
        self.overflowing = left_out > 0;
        Ok(changed)
    }
}

/// The node's local routing table as the agent's loop reads it on every wake-up (a route announcement
/// wakes the loop, the tick catches what one would hide): the node's addresses, for the engine (its
/// traffic to a pod may come from any of them), and, with node ports on every local address, the
/// mirror for the kernel.
#[derive(Debug)]
pub struct Mirror {
    written: NodeLocal,
    /// Node ports on every local address (`--nodeport-addresses all`): else the map is kept empty.
    any_local: bool,
    /// Consecutive failed reads.
    failed: u32,
}

impl Mirror {
    /// Until the first mirror, a node port at a local address is denied as `unknown-service`, never
    /// misjudged.
    pub fn adopt(map: &LpmTrie<MapData, IpcacheKey, u32>, any_local: bool) -> Self {
        Self {
            written: NodeLocal::adopt(map),
            any_local,
            failed: 0,
        }
    }

    /// Reads the routes and mirrors them. Returns the node's local addresses but those in
    /// `service_cidrs` (IPVS binds every ClusterIP to the node's `kube-ipvs0`: they are frontends, not
    /// the node's traffic), or `None` when the routes could not be read (the addresses stay as last
    /// read).
    pub fn refresh(
        &mut self,
        map: &mut LpmTrie<MapData, IpcacheKey, u32>,
        service_cidrs: &[IpNet],
    ) -> Option<std::collections::BTreeSet<std::net::IpAddr>> {
        let routes = match local_routes() {
            Ok(routes) => routes,
            Err(e) => {
                self.failed += 1;
                // A dump a route change interrupted is read again at the next wake-up; failing three
                // times in a row, what the mirror holds may be stale (an address gone): emptied, every
                // node port at an address other than a frontend's then misses and the FIB decides (not
                // forwarded: denied).
                if self.failed == 3 {
                    tracing::error!(error = %e, "cannot read the node's local routes (rtnetlink): the node's addresses stay as last read; node ports at any local address are denied (unknown-service) until they can be read");
                    if let Err(e) = self.written.sync(map, &BTreeMap::new()) {
                        tracing::error!(error = %e, "cannot empty the mirror of the node's local routes");
                    }
                } else if self.failed < 3 {
                    tracing::warn!(error = %e, "reading the node's local routes (rtnetlink) failed; reading again");
                }
                return None;
            }
        };
        self.failed = 0;
        let mut host = host_addresses(&routes);
        host.retain(|ip| !service_cidrs.iter().any(|n| n.contains(ip)));
        let mirrored = if self.any_local { routes } else { BTreeMap::new() };
        match self.written.sync(map, &mirrored) {
            Ok(true) => tracing::info!(
                local_routes = self.written.local(),
                "node ports on every local address: the node's local routes mirrored"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot write the node's local routes; node ports at the missing addresses are denied (unknown-service)")
            }
        }
        Some(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteHeader;

    fn route(kind: RouteType, table: u32, dst: RouteAddress, len: u8) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header = RouteHeader {
            kind,
            destination_prefix_length: len,
            table: table.min(252) as u8,
            ..r.header
        };
        r.attributes.push(RouteAttribute::Table(table));
        r.attributes.push(RouteAttribute::Destination(dst));
        r
    }

    #[test]
    fn the_local_tables_routes_are_mirrored_with_whether_they_are_local() {
        let v4 = |s: &str| RouteAddress::Inet(s.parse().unwrap());
        let v6 = |s: &str| RouteAddress::Inet6(s.parse().unwrap());
        let entry = |s: &str, local| Some((s.parse::<IpNet>().unwrap(), local));
        let local = |dst, len| local_table_entry(&route(RouteType::Local, 255, dst, len));
        assert_eq!(local(v4("192.0.2.7"), 32), entry("192.0.2.7/32", true));
        assert_eq!(local(v4("127.0.0.0"), 8), entry("127.0.0.0/8", true));
        assert_eq!(local(v6("fd00::2"), 128), entry("fd00::2/128", true));
        // An AnyIP range, its host bits set by whoever declared it: the prefix.
        assert_eq!(local(v4("198.51.100.9"), 24), entry("198.51.100.0/24", true));
        // The other types of the table: mirrored as not local (they win where they are longer).
        for (kind, dst, len, net) in [
            (
                RouteType::Broadcast,
                v4("198.51.100.255"),
                32,
                "198.51.100.255/32",
            ),
            (RouteType::Anycast, v6("fd00::"), 128, "fd00::/128"),
            (RouteType::Multicast, v6("ff00::"), 8, "ff00::/8"),
        ] {
            assert_eq!(
                local_table_entry(&route(kind, 255, dst, len)),
                entry(net, false),
                "{kind:?}"
            );
        }
        // Other tables, and IPv6 link-local addresses (local on their own link only): not mirrored.
        assert_eq!(
            local_table_entry(&route(RouteType::Unicast, 254, v4("192.0.2.0"), 24)),
            None
        );
        assert_eq!(
            local_table_entry(&route(RouteType::Local, 1000, v4("192.0.2.8"), 32)),
            None
        );
        assert_eq!(local(v6("fe80::1"), 128), None);
    }

    #[test]
    fn the_nodes_addresses_are_its_single_local_routes_but_loopback() {
        let routes: BTreeMap<IpNet, bool> = [
            ("127.0.0.0/8", true),
            ("127.0.0.1/32", true),
            ("::1/128", true),
            ("10.244.0.1/32", true),
            ("198.51.100.0/24", true),
            ("198.51.100.255/32", false),
            ("fd00::2/128", true),
        ]
        .into_iter()
        .map(|(n, l)| (n.parse().unwrap(), l))
        .collect();
        let want: std::collections::BTreeSet<std::net::IpAddr> = ["10.244.0.1", "fd00::2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(host_addresses(&routes), want);
    }
}
