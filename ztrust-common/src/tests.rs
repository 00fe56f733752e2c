use super::*;

#[test]
fn named_codes_round_trip_and_cover_every_code() {
    for v in Verdict::ALL {
        assert_eq!(Verdict::from_code(v.code()), *v);
        assert_eq!(Verdict::from_name(v.name()), Some(*v));
    }
    for d in Direction::ALL {
        assert_eq!(Direction::from_code(d.code()), *d);
    }
    // Every code the kernel can give a reason is named (the codes are sparse: 1.. and 64..).
    let named: Vec<u8> = Reason::ALL.iter().map(|r| r.code()).collect();
    for code in 0..=u8::MAX {
        let r = Reason::from_code(code);
        assert_eq!(r != Reason::Unknown, named.contains(&code), "{code}");
        if r != Reason::Unknown {
            assert_eq!(Reason::from_name(r.name()), Some(r));
        }
    }
    assert_eq!(
        named,
        reason::ALL,
        "a reason added to `reason` needs its name in `Reason`"
    );
    assert_eq!(Reason::from_code(u8::MAX), Reason::Unknown);
    assert_eq!(
        Direction::from_code(Direction::Unknown.code()),
        Direction::Unknown
    );
}

fn v4(a: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]
}

#[test]
fn a_packet_and_its_reply_share_the_conntrack_key() {
    let tuples = [
        (v4([10, 0, 0, 1]), v4([10, 0, 0, 2]), 40000u16, 80u16),
        (v4([10, 0, 0, 2]), v4([10, 0, 0, 1]), 80, 40000),
        (v4([10, 0, 0, 1]), v4([10, 0, 0, 1]), 1, 2),
        (v4([192, 168, 0, 1]), v4([10, 0, 0, 1]), 53, 53),
        (
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            5,
            5,
        ),
    ];
    for (s, d, sp, dp) in tuples {
        for direction in [dir::INGRESS, dir::EGRESS] {
            let reply_dir = if direction == dir::INGRESS {
                dir::EGRESS
            } else {
                dir::INGRESS
            };
            let k = CtKey::new(7, direction, &s, &d, sp.to_be(), dp.to_be(), proto::TCP);
            let r = CtKey::new(7, reply_dir, &d, &s, dp.to_be(), sp.to_be(), proto::TCP);
            assert_eq!(k, r, "{s:?}:{sp} -> {d:?}:{dp}");
            // Stored in one order: the packet's own, or the reply's.
            assert!(k.saddr == s && k.sport == sp.to_be() || k.saddr == d && k.sport == dp.to_be());
            // The other direction at the same hook, or another hook, or protocol, is another connection.
            assert_ne!(
                k,
                CtKey::new(7, reply_dir, &s, &d, sp.to_be(), dp.to_be(), proto::TCP)
            );
            assert_ne!(
                k,
                CtKey::new(8, direction, &s, &d, sp.to_be(), dp.to_be(), proto::TCP)
            );
            assert_ne!(
                k,
                CtKey::new(7, direction, &s, &d, sp.to_be(), dp.to_be(), proto::UDP)
            );
        }
    }
}

#[test]
fn slot_counters_count_exactly_the_established_forwarded_packets() {
    let mut c = SlotCounters::default();
    let mut counted = 0;
    for direction in [dir::INGRESS, dir::EGRESS] {
        for v in [verdict::FORWARDED, verdict::DROPPED, verdict::WOULD_DROP] {
            for r in 0..=u8::MAX {
                assert_eq!(c.get_mut(direction, v, r).is_some(), SlotCounters::counts(v, r));
                if let Some(x) = c.get_mut(direction, v, r) {
                    assert_eq!(v, verdict::FORWARDED);
                    assert!(r == reason::ESTABLISHED || r == reason::REPLY, "reason {r}");
                    assert_eq!(x.packets, 0, "two kinds share a counter");
                    x.packets = 1;
                    x.bytes = u64::from(direction) * 1000 + u64::from(r);
                    counted += 1;
                }
            }
        }
    }
    assert_eq!(counted, 4);
    // `entries` names each counter with what `get_mut` counts in it.
    for ((direction, v, r), value) in c.entries() {
        assert_eq!(
            value,
            CounterValue {
                packets: 1,
                bytes: u64::from(direction) * 1000 + u64::from(r)
            }
        );
        assert_eq!(v, verdict::FORWARDED);
    }
}

#[test]
fn different_connections_get_different_keys() {
    let (a, b) = (v4([10, 0, 0, 1]), v4([10, 0, 0, 2]));
    let k =
        |s: &[u8; 16], d: &[u8; 16], sp: u16, dp: u16| CtKey::new(1, dir::EGRESS, s, d, sp, dp, proto::UDP);
    assert_ne!(k(&a, &b, 1000, 53), k(&a, &b, 1001, 53));
    assert_ne!(k(&a, &b, 1000, 53), k(&a, &b, 53, 1000));
    assert_ne!(k(&a, &b, 1000, 53), k(&b, &a, 1000, 53));
}
