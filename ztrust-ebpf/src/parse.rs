//! Header parsing: Ethernet → IPv4 / IPv6 (with extension headers) → TCP, UDP, SCTP, ICMP, ICMPv6.
//!
//! The common case (IPv4 with TCP, UDP or SCTP, headers in the linear part of the buffer) is read in
//! place (direct packet access: no helper call). Everything else goes through `bpf_skb_load_bytes`,
//! which checks bounds itself, so a short packet is an error (→ `Malformed`) rather than a verifier
//! rejection; the fast path only ever accepts, and leaves every other decision to that path.

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use ztrust_common::proto;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

/// IPv6 extension headers that may precede the transport header (RFC 8200 §4).
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
/// Bounded walk: the verifier needs a fixed loop count, and real traffic has few extension headers.
const IPV6_MAX_EXT: usize = 4;

/// ICMP echo request/reply (RFC 792) and ICMPv6 echo request/reply (RFC 4443): the identifier plays the
/// role of a port so that conntrack can match replies.
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// ICMPv6 link control: multicast listener discovery (RFC 2710 types 130–132, RFC 3810 type 143) and
/// neighbour discovery (RFC 4861 §4, types 133–137: router/neighbour solicitation/advertisement,
/// redirect). Addressing itself needs them, so they are never subject to policy (like ARP for IPv4).
const ICMPV6_MLD_FIRST: u8 = 130;
const ICMPV6_ND_LAST: u8 = 137;
const ICMPV6_MLDV2_REPORT: u8 = 143;

/// What the pipeline needs of a packet. Addresses first and the struct 8-byte aligned, so that they are
/// copied in words (the BPF backend splits any access it cannot prove aligned into byte or half-word
/// accesses, and a packet's fields are copied into several map keys per run).
#[repr(C, align(8))]
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

pub enum Parsed {
    /// `Packet` was filled in.
    Ip,
    NotIp,
    /// A non-first fragment: its transport header (ports) is in another packet.
    Fragment,
    Malformed,
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}

/// Out of line (a BPF-to-BPF call) so that its temporaries do not share the 512-byte stack frame of the
/// verdict pipeline. Takes the raw context: a register keeps its pointer type across the call.
///
/// `pkt` is written whole when the result is [`Parsed::Ip`] and may be left uninitialised otherwise (no
/// zeroing on every run: the BPF backend has no memset but a byte loop).
#[inline(never)]
pub fn parse(skb: *mut __sk_buff, pkt: &mut MaybeUninit<Packet>) -> Parsed {
    if parse_v4_direct(skb, pkt) {
        return Parsed::Ip;
    }
    let ctx = TcContext::new(skb);
    let Some(ethertype) = load::<u16>(&ctx, 12) else {
        return Parsed::Malformed;
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => parse_v4(&ctx, pkt),
        ETH_P_IPV6 => parse_v6(&ctx, pkt),
        _ => Parsed::NotIp,
    }
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
fn parse_v4(ctx: &TcContext, pkt: &mut MaybeUninit<Packet>) -> Parsed {
    // The fixed 20 bytes of the header in one helper call (each call costs; a packet is parsed on every
    // hook it crosses).
    let Some(h) = load::<[u8; 20]>(ctx, ETH_HLEN) else { return Parsed::Malformed };
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Parsed::Malformed;
    }
    // Fragment offset ≠ 0: not the first fragment.
    if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
        return Parsed::Fragment;
    }
    let pkt = pkt.write(Packet {
        family: 4,
        protocol: h[9],
        saddr: mapped_v4(u32::from_ne_bytes([h[12], h[13], h[14], h[15]])),
        daddr: mapped_v4(u32::from_ne_bytes([h[16], h[17], h[18], h[19]])),
        sport_be: 0,
        dport_be: 0,
        tcp_flags: 0,
    });
    if l4(ctx, ETH_HLEN + ihl, pkt) { Parsed::Ip } else { Parsed::Malformed }
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
        let vihl = *(ip as *const u8);
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 || u16::from_be(*((ip + 6) as *const u16)) & 0x1fff != 0 {
            return false;
        }
        let protocol = *((ip + 9) as *const u8);
        let l4 = ip + ihl;
        let need = match protocol {
            proto::TCP => 14,
            proto::UDP | proto::SCTP => 4,
            _ => return false,
        };
        if l4 + need > data_end {
            return false;
        }
        let ports = *(l4 as *const u32);
        let tcp_flags = if protocol == proto::TCP { *((l4 + 13) as *const u8) } else { 0 };
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
fn parse_v6(ctx: &TcContext, pkt: &mut MaybeUninit<Packet>) -> Parsed {
    let (Some(vtc), Some(mut next), Some(saddr), Some(daddr)) = (
        load::<u8>(ctx, ETH_HLEN),
        load::<u8>(ctx, ETH_HLEN + 6),
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
    let mut off = ETH_HLEN + 40;
    for _ in 0..IPV6_MAX_EXT {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let (Some(n), Some(len)) = (load::<u8>(ctx, off), load::<u8>(ctx, off + 1)) else {
                    return Parsed::Malformed;
                };
                next = n;
                off += (len as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let (Some(n), Some(frag)) = (load::<u8>(ctx, off), load::<u16>(ctx, off + 2)) else {
                    return Parsed::Malformed;
                };
                if u16::from_be(frag) & 0xfff8 != 0 {
                    return Parsed::Fragment;
                }
                next = n;
                off += 8;
            }
            _ => break,
        }
    }
    let pkt = pkt.write(Packet { family: 6, protocol: next, saddr, daddr, sport_be: 0, dport_be: 0, tcp_flags: 0 });
    if next == proto::ICMPV6 {
        if let Some(t) = load::<u8>(ctx, off) {
            if (ICMPV6_MLD_FIRST..=ICMPV6_ND_LAST).contains(&t) || t == ICMPV6_MLDV2_REPORT {
                return Parsed::NotIp;
            }
        }
    }
    if l4(ctx, off, pkt) { Parsed::Ip } else { Parsed::Malformed }
}

/// Reads the transport header at `off`. Protocols without ports keep 0/0. False when the header of a
/// protocol with ports is cut short.
#[inline(always)]
fn l4(ctx: &TcContext, off: usize, pkt: &mut Packet) -> bool {
    match pkt.protocol {
        proto::TCP => {
            // Ports and flags (byte 13) in one call.
            let Some(t) = load::<[u8; 14]>(ctx, off) else { return false };
            pkt.sport_be = u16::from_ne_bytes([t[0], t[1]]);
            pkt.dport_be = u16::from_ne_bytes([t[2], t[3]]);
            pkt.tcp_flags = t[13];
            true
        }
        proto::UDP | proto::SCTP => {
            let Some(t) = load::<[u8; 4]>(ctx, off) else { return false };
            pkt.sport_be = u16::from_ne_bytes([t[0], t[1]]);
            pkt.dport_be = u16::from_ne_bytes([t[2], t[3]]);
            true
        }
        proto::ICMP | proto::ICMPV6 => {
            let Some(t) = load::<u8>(ctx, off) else { return false };
            let echo = matches!(
                (pkt.protocol, t),
                (proto::ICMP, ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY)
                    | (proto::ICMPV6, ICMPV6_ECHO_REQUEST | ICMPV6_ECHO_REPLY)
            );
            if echo {
                let Some(id) = load::<u16>(ctx, off + 4) else { return false };
                pkt.sport_be = id;
                pkt.dport_be = id;
            }
            true
        }
        _ => true,
    }
}
