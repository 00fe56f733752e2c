//! Header parsing: Ethernet → IPv4 / IPv6 (with extension headers) → TCP, UDP, SCTP, ICMP, ICMPv6; ARP
//! and IPv6 link control (neighbour and multicast listener discovery) recognised as such only when they
//! are what the RFCs say they must be.
//!
//! The common case (IPv4 with TCP, UDP or SCTP, headers in the linear part of the buffer) is read in
//! place (direct packet access: no helper call). Everything else goes through `bpf_skb_load_bytes`,
//! which checks bounds itself, so a short packet is an error (→ `Malformed`) rather than a verifier
//! rejection; the fast path only ever accepts, and leaves every other decision to that path.
//!
//! What this module cannot turn into something the pipeline judges is never passed as harmless: a frame
//! of another ethertype (VLAN tags included: the node would strip them and forward the packet inside) is
//! `Unsupported`, a header chain longer than the walk is `Malformed`.

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use ztrust_common::{addr_words, dir, proto};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86DD;

/// ARP for IPv4 over Ethernet (RFC 826): hardware type 1, protocol type IPv4, address lengths 6 and 4,
/// operation request (1) or reply (2).
const ARP_HRD_ETHER: u16 = 1;
const ARP_OP_REQUEST: u16 = 1;
const ARP_OP_REPLY: u16 = 2;

/// IPv6 extension headers that may precede the transport header (RFC 8200 §4): all but the fragment
/// header and AH measure their length in 8-octet units. (Mobility, HIP and Shim6 headers are in the
/// registry too, but the kernel delivers them as protocols of their own, to raw sockets: so are they
/// judged here, never walked past as if a TCP header followed.)
/// IPv4 options (RFC 791 §3.1): end of list, no operation, loose and strict source route.
const IPOPT_END: u8 = 0;
const IPOPT_NOP: u8 = 1;
const IPOPT_LSRR: u8 = 131;
const IPOPT_SSRR: u8 = 137;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
/// Authentication header (RFC 4302 §2.2): length in 4-octet units, minus 2.
const IPV6_AH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
/// Bounded walk (the verifier needs a fixed loop count). A chain longer than this is dropped as
/// malformed, never judged as if its last extension header were the transport protocol.
const IPV6_MAX_EXT: usize = 8;

/// ICMP echo request/reply (RFC 792) and ICMPv6 echo request/reply (RFC 4443): the identifier plays the
/// role of a port so that conntrack can match replies.
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// ICMPv6 multicast listener discovery: query, report and done (RFC 2710), version 2 report (RFC 3810).
const ICMPV6_MLD_QUERY: u8 = 130;
const ICMPV6_MLD_REPORT: u8 = 131;
const ICMPV6_MLD_DONE: u8 = 132;
const ICMPV6_MLDV2_REPORT: u8 = 143;
/// ICMPv6 neighbour discovery (RFC 4861 §4): router solicitation and advertisement, neighbour
/// solicitation and advertisement, redirect.
const ICMPV6_ROUTER_SOLICIT: u8 = 133;
const ICMPV6_ROUTER_ADVERT: u8 = 134;
const ICMPV6_NEIGH_SOLICIT: u8 = 135;
const ICMPV6_NEIGH_ADVERT: u8 = 136;
const ICMPV6_REDIRECT: u8 = 137;

/// What the pipeline needs of a packet. Addresses first and the struct 8-byte aligned, so that they are
/// copied in words (the BPF backend splits any access it cannot prove aligned into byte or half-word
/// accesses, and a packet's fields are copied into several map keys per run).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network byte order as on the wire.
    pub sport_be: u16,
    pub dport_be: u16,
    pub family: u8,
    pub protocol: u8,
    pub tcp_flags: u8,
}

impl Packet {
    const ZERO: Packet = Packet {
        saddr: [0; 16],
        daddr: [0; 16],
        sport_be: 0,
        dport_be: 0,
        family: 0,
        protocol: 0,
        tcp_flags: 0,
    };
}

/// What a frame is. `Packet` is written whole whatever the result: for link control it holds the
/// sender's and target's addresses (ARP: IPv4-mapped), for fragments and malformed packets whatever of
/// the addresses could be read (zeros otherwise), so that every drop can be reported with them.
pub enum Parsed {
    /// An IP packet to judge.
    Ip,
    /// Well-formed ARP, or neighbour / multicast listener discovery as RFC 4861 / RFC 3810 require it for
    /// this direction: it cannot leave the link. The caller still checks whose address a pod sends from.
    Link,
    /// A non-first fragment: its transport header (ports) is in another packet.
    Fragment,
    /// Its sender chose the route: an IPv4 loose or strict source route option, an IPv6 routing header
    /// with segments left. A node that honours it (`accept_source_route`, `seg6_enabled`) forwards the
    /// packet to an address the judged destination does not name.
    SourceRouted,
    Malformed,
    /// Not IPv4, IPv6 or ARP.
    Unsupported,
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}

/// Out of line (a BPF-to-BPF call) so that its temporaries do not share the 512-byte stack frame of the
/// verdict pipeline. Takes the raw context: a register keeps its pointer type across the call.
///
/// `pkt` is written whole, whatever the result (the fast path writes it once; the others start from
/// zeros). `direction` decides which link-control messages a pod may send and receive.
#[inline(never)]
pub fn parse(skb: *mut __sk_buff, pkt: &mut MaybeUninit<Packet>, direction: u8) -> Parsed {
    let parsed = parse_frame(skb, pkt, direction);
    // A frame's outer VLAN tag is taken into the skb's metadata before TC runs: what was parsed is the
    // packet inside it, which the node would forward once the tag is gone. A tagged frame is not judged.
    // SAFETY: the context is valid for the whole run; `vlan_present` is readable by TC programs.
    if unsafe { (*skb).vlan_present } != 0 {
        return Parsed::Unsupported;
    }
    parsed
}

#[inline(always)]
fn parse_frame(skb: *mut __sk_buff, pkt: &mut MaybeUninit<Packet>, direction: u8) -> Parsed {
    if parse_v4_direct(skb, pkt) {
        return Parsed::Ip;
    }
    let pkt = pkt.write(Packet::ZERO);
    let ctx = TcContext::new(skb);
    let Some(ethertype) = load::<u16>(&ctx, 12) else {
        return Parsed::Malformed;
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => parse_v4(&ctx, pkt),
        ETH_P_IPV6 => parse_v6(&ctx, pkt, direction),
        ETH_P_ARP => parse_arp(&ctx, pkt),
        _ => Parsed::Unsupported,
    }
}

/// ARP for IPv4 over Ethernet, request or reply; its sender and target protocol addresses go to
/// `saddr` and `daddr`.
#[inline(always)]
fn parse_arp(ctx: &TcContext, pkt: &mut Packet) -> Parsed {
    // Fixed part (8 bytes), sender hardware (6) and protocol (4) address, target hardware (6) and
    // protocol (4) address.
    let Some(a) = load::<[u8; 28]>(ctx, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    let hrd = u16::from_be_bytes([a[0], a[1]]);
    let pro = u16::from_be_bytes([a[2], a[3]]);
    let op = u16::from_be_bytes([a[6], a[7]]);
    if hrd != ARP_HRD_ETHER
        || pro != ETH_P_IP
        || a[4] != 6
        || a[5] != 4
        || (op != ARP_OP_REQUEST && op != ARP_OP_REPLY)
    {
        return Parsed::Malformed;
    }
    pkt.family = 4;
    pkt.saddr = mapped_v4(u32::from_ne_bytes([a[14], a[15], a[16], a[17]]));
    pkt.daddr = mapped_v4(u32::from_ne_bytes([a[24], a[25], a[26], a[27]]));
    Parsed::Link
}

/// `::ffff:a.b.c.d` from the address as it is on the wire, read into a native word; built from words (a
/// byte array with ten zeros would become a memset loop).
#[inline(always)]
fn mapped_v4(addr: u32) -> [u8; 16] {
    let words: [u32; 4] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), addr];
    // SAFETY: [u32; 4] and [u8; 16] have the same size, and every bit pattern is valid for both.
    unsafe { core::mem::transmute(words) }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, pkt: &mut Packet) -> Parsed {
    // The fixed 20 bytes of the header in one helper call (each call costs; a packet is parsed on every
    // hook it crosses).
    let Some(h) = load::<[u8; 20]>(ctx, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Parsed::Malformed;
    }
    pkt.family = 4;
    pkt.protocol = h[9];
    pkt.saddr = mapped_v4(u32::from_ne_bytes([h[12], h[13], h[14], h[15]]));
    pkt.daddr = mapped_v4(u32::from_ne_bytes([h[16], h[17], h[18], h[19]]));
    // Fragment offset ≠ 0: not the first fragment. (A first fragment too short for the transport
    // header it starts is malformed below: ports and flags must be in the fragment that is judged.)
    if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
        return Parsed::Fragment;
    }
    if ihl > 20 {
        match source_routed_v4(ctx, ihl) {
            Some(false) => {}
            Some(true) => {
                // Ports too, where they can be read, for the flow that reports the drop.
                let _ = l4(ctx, ETH_HLEN + ihl, pkt);
                return Parsed::SourceRouted;
            }
            None => return Parsed::Malformed,
        }
    }
    if l4(ctx, ETH_HLEN + ihl, pkt) {
        Parsed::Ip
    } else {
        Parsed::Malformed
    }
}

/// Does the options part of an IPv4 header of `ihl` bytes carry a loose (131) or strict (137) source
/// route (RFC 791 §3.1)? `None` when an option's length runs past the header or is below 2.
#[inline(always)]
fn source_routed_v4(ctx: &TcContext, ihl: usize) -> Option<bool> {
    let end = ETH_HLEN + ihl;
    let mut off = ETH_HLEN + 20;
    // At most 40 bytes of options: at most 40 options (one byte each at the least).
    for _ in 0..40 {
        if off >= end {
            break;
        }
        match load::<u8>(ctx, off)? {
            IPOPT_END => break,
            IPOPT_NOP => off += 1,
            IPOPT_LSRR | IPOPT_SSRR => return Some(true),
            _ => {
                let len = load::<u8>(ctx, off + 1)? as usize;
                if len < 2 || off + len > end {
                    return None;
                }
                off += len;
            }
        }
    }
    Some(false)
}

/// IPv4 + TCP/UDP/SCTP read in place. True when `pkt` was written; false (nothing decided) when the
/// packet is anything else, a non-first fragment, or its headers are not all in the linear buffer.
#[inline(always)]
fn parse_v4_direct(skb: *mut __sk_buff, pkt: &mut MaybeUninit<Packet>) -> bool {
    // SAFETY: the context is valid for the run; `data`/`data_end` bound the linear part of the packet,
    // and every read below is checked against `data_end` first (the verifier enforces it too).
    unsafe {
        let data = (*skb).data as usize;
        let data_end = (*skb).data_end as usize;
        if data + ETH_HLEN + 20 > data_end {
            return false;
        }
        if u16::from_be(*((data + 12) as *const u16)) != ETH_P_IP {
            return false;
        }
        let ip = data + ETH_HLEN;
        // Options (rare) are read on the slow path, which looks for source routes among them.
        if *(ip as *const u8) != 0x45 || u16::from_be(*((ip + 6) as *const u16)) & 0x1fff != 0 {
            return false;
        }
        let protocol = *((ip + 9) as *const u8);
        let l4 = ip + 20;
        let need = match protocol {
            proto::TCP => 14,
            proto::UDP | proto::SCTP => 4,
            _ => return false,
        };
        if l4 + need > data_end {
            return false;
        }
        let ports = *(l4 as *const u32);
        let tcp_flags = if protocol == proto::TCP {
            *((l4 + 13) as *const u8)
        } else {
            0
        };
        pkt.write(Packet {
            saddr: mapped_v4(*((ip + 12) as *const u32)),
            daddr: mapped_v4(*((ip + 16) as *const u32)),
            // Ports as on the wire: the first two bytes of the word are the source port.
            sport_be: ports as u16,
            dport_be: (ports >> 16) as u16,
            family: 4,
            protocol,
            tcp_flags,
        });
        true
    }
}

#[inline(always)]
fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, pkt: &mut Packet, direction: u8) -> Parsed {
    let (Some(vtc), Some(mut next), Some(hop_limit), Some(saddr), Some(daddr)) = (
        load::<u8>(ctx, ETH_HLEN),
        load::<u8>(ctx, ETH_HLEN + 6),
        load::<u8>(ctx, ETH_HLEN + 7),
        load::<[u8; 16]>(ctx, ETH_HLEN + 8),
        load::<[u8; 16]>(ctx, ETH_HLEN + 24),
    ) else {
        return Parsed::Malformed;
    };
    // IPv4-mapped addresses (::ffff:0:0/96) never appear on the wire (RFC 4291 §2.5.5.2); the ipcache
    // stores IPv4 that way, so such a packet would be judged as IPv4 traffic. It is malformed.
    if vtc >> 4 != 6 || is_v4_mapped(&saddr) || is_v4_mapped(&daddr) {
        return Parsed::Malformed;
    }
    pkt.family = 6;
    pkt.saddr = saddr;
    pkt.daddr = daddr;
    let mut off = ETH_HLEN + 40;
    for _ in 0..IPV6_MAX_EXT {
        match next {
            IPV6_HOP_BY_HOP | IPV6_DEST_OPTS => {
                let (Some(n), Some(len)) = (load::<u8>(ctx, off), load::<u8>(ctx, off + 1)) else {
                    return Parsed::Malformed;
                };
                next = n;
                off += (len as usize + 1) * 8;
            }
            IPV6_ROUTING => {
                // Next header, length, routing type, segments left (RFC 8200 §4.4).
                let Some(r) = load::<[u8; 4]>(ctx, off) else {
                    return Parsed::Malformed;
                };
                if r[3] != 0 {
                    return Parsed::SourceRouted;
                }
                next = r[0];
                off += (r[1] as usize + 1) * 8;
            }
            IPV6_AH => {
                let (Some(n), Some(len)) = (load::<u8>(ctx, off), load::<u8>(ctx, off + 1)) else {
                    return Parsed::Malformed;
                };
                next = n;
                off += (len as usize + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let (Some(n), Some(frag)) = (load::<u8>(ctx, off), load::<u16>(ctx, off + 2)) else {
                    return Parsed::Malformed;
                };
                if u16::from_be(frag) & 0xfff8 != 0 {
                    pkt.protocol = n;
                    return Parsed::Fragment;
                }
                next = n;
                off += 8;
            }
            _ => break,
        }
    }
    pkt.protocol = next;
    if is_v6_extension(next) {
        return Parsed::Malformed;
    }
    if next == proto::ICMPV6
        && let Some(t) = load::<u8>(ctx, off)
        && is_link_control(direction, t, hop_limit, &saddr, &daddr)
    {
        return Parsed::Link;
    }
    if l4(ctx, off, pkt) {
        Parsed::Ip
    } else {
        Parsed::Malformed
    }
}

#[inline(always)]
fn is_v6_extension(next: u8) -> bool {
    matches!(
        next,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_AH | IPV6_DEST_OPTS
    )
}

/// Is an ICMPv6 message of type `t` neighbour or multicast listener discovery that cannot leave the
/// link, for a pod's interface in `direction`? Anything else is judged by policy like any ICMPv6.
///
/// - Neighbour discovery (RFC 4861 §6.1, §7.1): hop limit 255, which no router forwards, so the
///   receiver knows it came from the link. A pod sends solicitations and advertisements only to
///   link-local or link-scope multicast addresses (its gateway is link-local): one addressed to another
///   pod or the world would be forwarded by the node (with hop limit 254) and carry data there. Towards
///   the pod, hop limit 255 proves that the node itself sent it (on a pod's veth the node is the only
///   neighbour), whatever the addresses (neighbour unreachability detection probes the pod's own;
///   a node that is not a router solicits routers too). Pods do not advertise routes or send redirects.
/// - Multicast listener discovery (RFC 3810 §5, RFC 2710 §3): hop limit 1, a link-local or unspecified
///   source, a link-scope multicast destination, which no router forwards. Pods report and leave; only
///   the node queries.
#[inline(always)]
fn is_link_control(direction: u8, t: u8, hop_limit: u8, saddr: &[u8; 16], daddr: &[u8; 16]) -> bool {
    let from_pod = direction == dir::EGRESS;
    match t {
        ICMPV6_ROUTER_SOLICIT | ICMPV6_NEIGH_SOLICIT | ICMPV6_NEIGH_ADVERT if from_pod => {
            hop_limit == 255 && (is_link_local(daddr) || is_link_scope_multicast(daddr))
        }
        ICMPV6_ROUTER_SOLICIT
        | ICMPV6_ROUTER_ADVERT
        | ICMPV6_NEIGH_SOLICIT
        | ICMPV6_NEIGH_ADVERT
        | ICMPV6_REDIRECT
            if !from_pod =>
        {
            hop_limit == 255
        }
        ICMPV6_MLD_REPORT | ICMPV6_MLD_DONE | ICMPV6_MLDV2_REPORT | ICMPV6_MLD_QUERY => {
            (!from_pod || t != ICMPV6_MLD_QUERY)
                && hop_limit == 1
                && (is_link_local(saddr) || is_unspecified(saddr))
                && is_link_scope_multicast(daddr)
        }
        _ => false,
    }
}

/// fe80::/10 (RFC 4291 §2.5.6).
#[inline(always)]
pub fn is_link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// ff02::/16 and its flagged forms (ffX2::): multicast of link-local scope (RFC 4291 §2.7), never
/// forwarded.
#[inline(always)]
fn is_link_scope_multicast(a: &[u8; 16]) -> bool {
    a[0] == 0xff && a[1] & 0x0f == 0x02
}

/// An IPv4 address as the maps hold it (`::ffff:a.b.c.d`).
#[inline(always)]
pub fn is_mapped(a: &[u8; 16]) -> bool {
    let w = addr_words(a);
    w[0] == 0
        && w[1] & u64::from_ne_bytes([0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0])
            == u64::from_ne_bytes([0, 0, 0xff, 0xff, 0, 0, 0, 0])
}

/// `::`, or for IPv4 (mapped) `0.0.0.0`: "no address yet" (duplicate address detection, ARP probes).
#[inline(always)]
pub fn is_unspecified(a: &[u8; 16]) -> bool {
    let w = addr_words(a);
    w[0] == 0 && (w[1] == 0 || w[1] == u64::from_ne_bytes([0, 0, 0xff, 0xff, 0, 0, 0, 0]))
}

/// Reads the transport header at `off`. Protocols without ports keep 0/0. False when the header of a
/// protocol with ports is cut short.
#[inline(always)]
fn l4(ctx: &TcContext, off: usize, pkt: &mut Packet) -> bool {
    match pkt.protocol {
        proto::TCP => {
            // Ports and flags (byte 13) in one call.
            let Some(t) = load::<[u8; 14]>(ctx, off) else {
                return false;
            };
            pkt.sport_be = u16::from_ne_bytes([t[0], t[1]]);
            pkt.dport_be = u16::from_ne_bytes([t[2], t[3]]);
            pkt.tcp_flags = t[13];
            true
        }
        proto::UDP | proto::SCTP => {
            let Some(t) = load::<[u8; 4]>(ctx, off) else {
                return false;
            };
            pkt.sport_be = u16::from_ne_bytes([t[0], t[1]]);
            pkt.dport_be = u16::from_ne_bytes([t[2], t[3]]);
            true
        }
        proto::ICMP | proto::ICMPV6 => {
            let Some(t) = load::<u8>(ctx, off) else {
                return false;
            };
            let echo = matches!(
                (pkt.protocol, t),
                (proto::ICMP, ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY)
                    | (proto::ICMPV6, ICMPV6_ECHO_REQUEST | ICMPV6_ECHO_REPLY)
            );
            if echo {
                let Some(id) = load::<u16>(ctx, off + 4) else {
                    return false;
                };
                pkt.sport_be = id;
                pkt.dport_be = id;
            }
            true
        }
        _ => true,
    }
}
