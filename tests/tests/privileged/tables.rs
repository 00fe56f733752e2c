//! Full tables. A full conntrack table evicts (LRU), and eviction never opens anything: a new disallowed
//! connection is still judged by policy, and an allowed live connection whose entry was evicted is not
//! cut off (its replies are re-admitted because the policy allows the connection in its opening
//! direction). A policy map at capacity refuses the update whole and keeps the last good state.

use crate::common;

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::common::model;
use ztrust_agent::datapath::loader::{Capacities, Datapath};
use ztrust_agent::datapath::sync::{Error as SyncError, KernelMaps, Syncer};
use ztrust_agent::model::{Cluster, ObjectRef, Protocol, Rule};
use ztrust_agent::policy::Engine;
use ztrust_common::{CtKey, dir, names, proto, reason, verdict};

const OK: u32 = 0;
const SHOT: u32 = 2;
const A: [u8; 4] = [10, 244, 205, 10];
const B: [u8; 4] = [10, 244, 205, 11];

/// Pod a may open TCP connections to app=b on `ports`; nothing may connect to a.
fn cluster(ports: &[(u16, Option<u16>)], peers: usize) -> Cluster {
    let mut pods = vec![
        model::pod("a", vec![IpAddr::from(A)]),
        model::pod("b", vec![IpAddr::from(B)]),
    ];
    // More peers with distinct labels: each is an identity, and so allow entries of its own.
    for i in 0..peers {
        let mut p = model::pod(&format!("peer{i}"), vec![IpAddr::from([10, 244, 206, i as u8])]);
        p.labels = [
            ("app".to_owned(), "b".to_owned()),
            ("n".to_owned(), i.to_string()),
        ]
        .into();
        pods.push(p);
    }
    let egress = Rule {
        peers: vec![model::peer("b")],
        ports: ports
            .iter()
            .map(|(p, end)| model::port(Protocol::Tcp, *p, *end))
            .collect(),
    };
    model::cluster(pods, [model::policy("a", "a", Some(vec![]), Some(vec![egress]))])
}

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![
        2,
        0,
        0,
        0,
        0,
        1,
        2,
        0,
        0,
        0,
        0,
        2,
        0x08,
        0x00,
        0x45,
        0,
        0,
        40,
        0,
        1,
        0,
        0,
        64,
        proto::TCP,
        0,
        0,
    ];
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

use crate::common::{counter, test_run as run, test_run_marked as run_marked};

fn mapped(ip: [u8; 4]) -> [u8; 16] {
    std::net::Ipv4Addr::from(ip).to_ipv6_mapped().octets()
}

#[test]
fn conntrack_eviction_never_opens_and_never_cuts() {
    let (topo, ifindex) = common::node_with_one_pod("ztct", 205);
    let caps = Capacities {
        conntrack: 64,
        ..Default::default()
    };
    let mut dp = Datapath::load_with(&topo.pin_dir, caps).expect("load");
    let desired = Engine::new().compile(&cluster(&[(80, None)], 0));
    let bindings: BTreeMap<ObjectRef, u32> = [(ObjectRef::new("x", "a"), ifindex)].into();
    Syncer::new()
        .sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings)
        .expect("sync");
    let (from, to) = (names::PROG_FROM_POD, names::PROG_TO_POD);

    // a's connection to b:80, then a flood of other allowed connections that fills the table.
    assert_eq!(run(&dp, from, ifindex, &tcp(A, B, 1000, 80, 0x02)), OK);
    let first = CtKey::new(
        ifindex,
        dir::EGRESS,
        &mapped(A),
        &mapped(B),
        1000u16.to_be(),
        80u16.to_be(),
        proto::TCP,
    );
    assert!(
        dp.maps.conntrack.get(&first, 0).is_ok(),
        "the connection is tracked"
    );
    for sport in 2000..2600 {
        assert_eq!(run(&dp, from, ifindex, &tcp(A, B, sport, 80, 0x02)), OK);
    }
    assert!(
        dp.maps.conntrack.get(&first, 0).is_err(),
        "the flood evicted the first connection's entry"
    );
    let entries = dp.maps.conntrack.keys().count();
    assert!(entries <= 64, "the table holds at most its capacity ({entries})");

    // The evicted connection is not cut: a's next segment is judged in its own direction (a -> b:80 is
    // allowed, as its SYN was), passes and makes the entry again, and b's answers are replies once more.
    // b's segment alone, before that, is judged in its own direction too (into a, whose ingress admits
    // nothing): a packet never picks the reverse direction for its judgment.
    assert_eq!(
        run(&dp, to, ifindex, &tcp(B, A, 80, 1000, 0x10)),
        SHOT,
        "b's segment of the evicted connection, on its own"
    );
    assert_eq!(
        counter(&dp, ifindex, dir::INGRESS, verdict::DROPPED, reason::NO_CT_ENTRY),
        1
    );
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 1000, 80, 0x10)),
        OK,
        "a's segment of the evicted connection"
    );
    assert_eq!(
        counter(
            &dp,
            ifindex,
            dir::EGRESS,
            verdict::FORWARDED,
            reason::CT_RECOVERED
        ),
        1
    );
    assert_eq!(
        run(&dp, to, ifindex, &tcp(B, A, 80, 1000, 0x10)),
        OK,
        "and it is tracked again"
    );
    assert!(counter(&dp, ifindex, dir::INGRESS, verdict::FORWARDED, reason::REPLY) >= 1);

    // Nothing the policy forbids gets in through the full table.
    assert_eq!(
        run(&dp, to, ifindex, &tcp(B, A, 81, 1000, 0x10)),
        SHOT,
        "ACK from a port a never connected to"
    );
    assert_eq!(
        counter(&dp, ifindex, dir::INGRESS, verdict::DROPPED, reason::NO_CT_ENTRY),
        2
    );
    assert_eq!(
        run(&dp, to, ifindex, &tcp(B, A, 5555, 80, 0x02)),
        SHOT,
        "new connection into a"
    );
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 3000, 81, 0x02)),
        SHOT,
        "a -> b:81 stays denied"
    );
}

#[test]
fn policy_map_at_capacity_refuses_the_update_and_keeps_the_last_state() {
    let (topo, ifindex) = common::node_with_one_pod("ztcap", 206);
    let caps = Capacities {
        policy: 16,
        ..Default::default()
    };
    let mut dp = Datapath::load_with(&topo.pin_dir, caps).expect("load");
    let bindings: BTreeMap<ObjectRef, u32> = [(ObjectRef::new("x", "a"), ifindex)].into();
    let mut engine = Engine::new();
    let mut syncer = Syncer::new();
    syncer.capacities = dp.capacities();
    let from = names::PROG_FROM_POD;

    let small = engine.compile(&cluster(&[(80, None)], 0));
    syncer
        .sync(&mut KernelMaps(&mut dp.maps), &small, &bindings)
        .expect("fits");
    let before = dp.maps.policy.entries().count();
    assert_eq!(run(&dp, from, ifindex, &tcp(A, B, 1000, 80, 0x02)), OK);
    assert_eq!(run(&dp, from, ifindex, &tcp(A, B, 1001, 443, 0x02)), SHOT);

    // Ports 443 and 1000-1999 towards 20 peer identities: far more than 16 entries.
    let big = engine.compile(&cluster(&[(443, None), (1000, Some(1999))], 20));
    match syncer.sync(&mut KernelMaps(&mut dp.maps), &big, &bindings) {
        Err(SyncError::Capacity {
            map,
            needed,
            capacity,
        }) => {
            assert_eq!(map, "policy");
            assert!(needed > 16 && capacity == 16);
        }
        other => panic!("the update must be refused for capacity, got {other:?}"),
    }
    assert_eq!(dp.maps.policy.entries().count(), before, "nothing was written");
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 1002, 80, 0x02)),
        OK,
        "the last good state enforces"
    );
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 1003, 443, 0x02)),
        SHOT,
        "nothing of the refused update"
    );
}

fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut f = vec![
        2,
        0,
        0,
        0,
        0,
        1,
        2,
        0,
        0,
        0,
        0,
        2,
        0x08,
        0x00,
        0x45,
        0,
        0,
        28,
        0,
        1,
        0,
        0,
        64,
        proto::UDP,
        0,
        0,
    ];
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 8, 0, 0]);
    f
}

/// After a narrowing update, a datagram flow admitted before is judged again (no stale-open conntrack
/// entry), an established TCP connection keeps going, and a new TCP connection reusing its ports is
/// judged as new.
#[test]
fn narrowing_rejudges_datagram_flows_and_reused_tcp_ports() {
    let (topo, ifindex) = common::node_with_one_pod("ztrev", 207);
    let mut dp = Datapath::load(&topo.pin_dir).expect("load");
    let bindings: BTreeMap<ObjectRef, u32> = [(ObjectRef::new("x", "a"), ifindex)].into();
    let mut engine = Engine::new();
    let mut syncer = Syncer::new();
    let (from, to) = (names::PROG_FROM_POD, names::PROG_TO_POD);

    // a may reach b on TCP 80 and UDP 53.
    let mut open = cluster(&[(80, None)], 0);
    if let Some(p) = open.policies.values_mut().next() {
        p.egress[0].ports.push(model::port(Protocol::Udp, 53, None));
    }
    syncer
        .sync(&mut KernelMaps(&mut dp.maps), &engine.compile(&open), &bindings)
        .unwrap();
    assert_eq!(run(&dp, from, ifindex, &udp(A, B, 1000, 53)), OK);
    assert_eq!(run(&dp, to, ifindex, &udp(B, A, 53, 1000)), OK, "the reply");
    assert_eq!(run(&dp, from, ifindex, &tcp(A, B, 2000, 80, 0x02)), OK);
    assert_eq!(run(&dp, from, ifindex, &tcp(A, B, 2000, 80, 0x10)), OK);
    let rev_before = dp.maps.revision.get(&0, 0).unwrap();

    // Now a may reach nothing.
    let mut closed = open.clone();
    for p in closed.policies.values_mut() {
        p.egress.clear();
    }
    syncer
        .sync(&mut KernelMaps(&mut dp.maps), &engine.compile(&closed), &bindings)
        .unwrap();
    assert!(
        dp.maps.revision.get(&0, 0).unwrap() > rev_before,
        "a narrowing bumps the revision"
    );
    assert_eq!(
        run(&dp, from, ifindex, &udp(A, B, 1000, 53)),
        SHOT,
        "the old datagram flow is judged again"
    );
    assert_eq!(
        run(&dp, to, ifindex, &udp(B, A, 53, 1000)),
        SHOT,
        "and so are its replies"
    );
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 2000, 80, 0x10)),
        OK,
        "an established TCP connection keeps going"
    );
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 2000, 80, 0x02)),
        SHOT,
        "a new connection on the same ports is new"
    );

    // A pure widening does not bump the revision.
    let rev = dp.maps.revision.get(&0, 0).unwrap();
    syncer
        .sync(&mut KernelMaps(&mut dp.maps), &engine.compile(&open), &bindings)
        .unwrap();
    assert_eq!(dp.maps.revision.get(&0, 0).unwrap(), rev);
    assert_eq!(run(&dp, from, ifindex, &udp(A, B, 1001, 53)), OK);
}

/// The peer mark (`--peer-mark`) is what a receiving pod's interface trusts without judging, so: the
/// sending side strips it from whatever a pod sends (leaving other bits alone), and an interface honours
/// it only when the agent configured it, and then only for a TCP packet of a conntrack entry linked to
/// the interface the packet came from.
#[test]
fn the_peer_mark_is_stripped_from_what_pods_send_and_honoured_only_when_configured() {
    use ztrust_agent::datapath::loader::DEFAULT_PEER_MARK as MARK;
    let (topo, ifindex) = common::node_with_one_pod("ztmk", 212);
    let mut dp = Datapath::load(&topo.pin_dir).expect("load");
    let desired = Engine::new().compile(&cluster(&[(80, None)], 0));
    let bindings: BTreeMap<ObjectRef, u32> = [(ObjectRef::new("x", "a"), ifindex)].into();
    Syncer::new()
        .sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings)
        .expect("sync");
    let (from, to) = (names::PROG_FROM_POD, names::PROG_TO_POD);
    let judged = |dp: &Datapath| -> u64 {
        dp.maps
            .stats
            .get(&ztrust_common::stat::PEER_JUDGED, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    };

    // What a pod sends leaves its interface without the bit (whatever else is marked stays).
    let (ret, mark) = run_marked(&dp, from, ifindex, &tcp(A, B, 1000, 80, 0x02), MARK | 0x4000);
    assert_eq!((ret, mark), (OK, 0x4000));
    let (ret, mark) = run_marked(&dp, from, ifindex, &tcp(A, B, 1001, 81, 0x02), MARK);
    assert_eq!((ret, mark), (SHOT, 0), "a denied packet is dropped, mark or not");

    // Towards a pod, the mark alone passes nothing (anything on the node could have set the bit); it is
    // removed and the packet judged.
    let denied_in = tcp(B, A, 5555, 80, 0x02);
    assert_eq!(
        run_marked(&dp, to, ifindex, &denied_in, 0).0,
        SHOT,
        "a's ingress is isolated"
    );
    assert_eq!(
        common::test_run_ctx(&dp, to, ifindex, &denied_in, MARK, 7),
        (SHOT, 0),
        "a marked SYN"
    );
    let ack_in = tcp(B, A, 5556, 80, 0x10);
    assert_eq!(
        common::test_run_ctx(&dp, to, ifindex, &ack_in, MARK, 7),
        (SHOT, 0),
        "a marked ACK of no connection"
    );
    assert_eq!(judged(&dp), 0);

    // A connection into a whose entry is linked to the sender's interface 7 (as a's interface records
    // when it admits a SYN that interface 7 admitted first): the mark is honoured for packets entering
    // from 7, and from nowhere else (those are judged as any established packet).
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    // A second back: the programs read the coarse clock, which lags the precise one by up to a tick.
    let now_ns = (now.tv_sec() as u64 - 1) * 1_000_000_000 + now.tv_nsec() as u64;
    let key = CtKey::new(
        ifindex,
        dir::INGRESS,
        &mapped(B),
        &mapped(A),
        5556u16.to_be(),
        80u16.to_be(),
        proto::TCP,
    );
    let linked = ztrust_common::CtValue {
        last_seen_ns: now_ns,
        origin: dir::INGRESS,
        peer_ifindex: 7,
        ..Default::default()
    };
    dp.maps.conntrack.insert(key, linked, 0).expect("linked entry");
    assert_eq!(
        common::test_run_ctx(&dp, to, ifindex, &ack_in, MARK, 7),
        (OK, 0),
        "marked, from the linked interface"
    );
    assert_eq!(judged(&dp), 1);
    let established = counter(
        &dp,
        ifindex,
        dir::INGRESS,
        verdict::FORWARDED,
        reason::ESTABLISHED,
    );
    assert_eq!(
        common::test_run_ctx(&dp, to, ifindex, &ack_in, MARK, 8),
        (OK, 0),
        "marked, from another interface"
    );
    assert_eq!(judged(&dp), 1, "not taken at the peer's word");
    assert_eq!(
        counter(
            &dp,
            ifindex,
            dir::INGRESS,
            verdict::FORWARDED,
            reason::ESTABLISHED
        ),
        established + 1
    );
    let udp_in = udp(B, A, 5557, 80);
    assert_eq!(
        common::test_run_ctx(&dp, to, ifindex, &udp_in, MARK, 7).0,
        SHOT,
        "a marked datagram"
    );
    assert_eq!(judged(&dp), 1);

    // Programs loaded without a peer mark honour none.
    drop(dp);
    let dp =
        Datapath::load_with_mark(&topo.pin_dir, Capacities::default(), 0).expect("load without a peer mark");
    assert_eq!(
        common::test_run_ctx(&dp, to, ifindex, &ack_in, MARK, 7).0,
        OK,
        "the linked connection is established"
    );
    assert_eq!(
        common::test_run_ctx(&dp, to, ifindex, &denied_in, MARK, 7).0,
        SHOT
    );
    assert_eq!(judged(&dp), 1);
}

/// Single-port allow entries go to the exact-port hash, wider ones (ranges) to the trie, and the
/// endpoint's flags tell the programs which protocols and directions have trie entries at all. Entries
/// an agent from before the split left in the trie keep enforcing until the new agent has copied them
/// to the hash, and are removed from the trie after that.
#[test]
fn policy_entries_split_between_the_exact_hash_and_the_trie() {
    use aya::maps::lpm_trie::Key;
    use ztrust_common::{PolicyKey, PolicyValue, ep_flags};

    let (topo, ifindex) = common::node_with_one_pod("ztpsp", 213);
    let mut dp = Datapath::load(&topo.pin_dir).expect("load");
    let bindings: BTreeMap<ObjectRef, u32> = [(ObjectRef::new("x", "a"), ifindex)].into();
    let mut engine = Engine::new();
    let mut syncer = Syncer::new();
    let from = names::PROG_FROM_POD;
    let flags = |dp: &Datapath| dp.maps.endpoints.get(&ifindex, 0).expect("endpoint").flags;

    // Port 80 and the range 1000-1999 (TCP, egress).
    syncer
        .sync(
            &mut KernelMaps(&mut dp.maps),
            &engine.compile(&cluster(&[(80, None), (1000, Some(1999))], 0)),
            &bindings,
        )
        .unwrap();
    let exact: Vec<PolicyKey> = dp.maps.policy.exact.keys().map(Result::unwrap).collect();
    assert_eq!(exact.len(), 1, "the single port is one exact entry: {exact:?}");
    assert_eq!(u16::from_be_bytes(exact[0].port), 80);
    let trie: Vec<u32> = dp
        .maps
        .policy
        .prefixes
        .keys()
        .map(|k| k.unwrap().prefix_len())
        .collect();
    assert!(
        !trie.is_empty() && trie.iter().all(|p| *p < PolicyKey::PREFIX_FULL),
        "the range is in the trie: {trie:?}"
    );
    assert_eq!(
        flags(&dp) & ep_flags::ALL_NO_WIDE,
        ep_flags::ALL_NO_WIDE & !ep_flags::NO_WIDE_EGRESS_TCP
    );
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 1000, 80, 0x02)),
        OK,
        "exact port"
    );
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 1001, 1500, 0x02)),
        OK,
        "in the range"
    );
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 1002, 2000, 0x02)),
        SHOT,
        "past the range"
    );
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 1003, 443, 0x02)),
        SHOT,
        "another port"
    );

    // Without the range, TCP egress has no trie entry: the flag says so, and the trie is not walked.
    syncer
        .sync(
            &mut KernelMaps(&mut dp.maps),
            &engine.compile(&cluster(&[(80, None)], 0)),
            &bindings,
        )
        .unwrap();
    assert_eq!(dp.maps.policy.prefixes.keys().count(), 0);
    assert_eq!(flags(&dp) & ep_flags::ALL_NO_WIDE, ep_flags::ALL_NO_WIDE);
    assert_eq!(run(&dp, from, ifindex, &tcp(A, B, 1004, 80, 0x02)), OK);
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 1005, 1500, 0x02)),
        SHOT,
        "the range is gone"
    );
    // A range entry written behind the flags' back is not looked at while the flag says there is none:
    // the flag is what makes the denied lookup flat, so it must be what the programs trust.
    let range = PolicyKey::new(
        ifindex,
        exact_identity(&dp, ifindex),
        dir::EGRESS,
        proto::TCP,
        1024,
    );
    dp.maps
        .policy
        .prefixes
        .insert(
            &Key::new(PolicyKey::PREFIX_FULL - 10, range),
            PolicyValue { rule_id: 9, _pad: 0 },
            0,
        )
        .unwrap();
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 1006, 1500, 0x02)),
        SHOT,
        "flag set: the trie is not walked"
    );
    dp.maps
        .policy
        .prefixes
        .remove(&Key::new(PolicyKey::PREFIX_FULL - 10, range))
        .unwrap();

    // An agent from before the split: its single-port entries are in the trie, its endpoint flags know
    // nothing of wide entries (so the trie is walked).
    let key443 = PolicyKey::new(
        ifindex,
        exact_identity(&dp, ifindex),
        dir::EGRESS,
        proto::TCP,
        443,
    );
    dp.maps
        .policy
        .prefixes
        .insert(
            &Key::new(PolicyKey::PREFIX_FULL, key443),
            PolicyValue { rule_id: 7, _pad: 0 },
            0,
        )
        .unwrap();
    let mut info = dp.maps.endpoints.get(&ifindex, 0).unwrap();
    info.flags &= !ep_flags::ALL_NO_WIDE;
    dp.maps.endpoints.insert(ifindex, info, 0).unwrap();
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 1007, 443, 0x02)),
        OK,
        "the earlier agent's entry, in the trie"
    );
    drop(dp);

    // The new agent loads: the entry is copied to the hash, listed once, and found there once the flags
    // say the trie holds nothing wide; after its first sync the trie's copy goes.
    let mut dp = Datapath::load(&topo.pin_dir).expect("reload");
    assert!(dp.maps.policy.exact.get(&key443, 0).is_ok(), "copied to the hash");
    assert_eq!(
        dp.maps.policy.entries().filter(|(_, k, _)| *k == key443).count(),
        1,
        "listed once"
    );
    info.flags |= ep_flags::ALL_NO_WIDE;
    dp.maps.endpoints.insert(ifindex, info, 0).unwrap();
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 1008, 443, 0x02)),
        OK,
        "found in the hash"
    );
    assert_eq!(dp.maps.policy.drop_legacy_exact().unwrap(), 1);
    assert_eq!(
        dp.maps.policy.prefixes.keys().count(),
        0,
        "the trie's copy is gone"
    );
    assert_eq!(
        run(&dp, from, ifindex, &tcp(A, B, 1009, 443, 0x02)),
        OK,
        "still allowed"
    );
    // And the sync removes it from wherever it is, like any entry the desired state does not have.
    let mut syncer = Syncer::adopt(&dp.maps);
    syncer
        .sync(
            &mut KernelMaps(&mut dp.maps),
            &engine.compile(&cluster(&[(80, None)], 0)),
            &bindings,
        )
        .unwrap();
    assert!(
        dp.maps.policy.exact.get(&key443, 0).is_err(),
        "removed by the sync"
    );
    assert_eq!(run(&dp, from, ifindex, &tcp(A, B, 1010, 443, 0x02)), SHOT);
    assert_eq!(run(&dp, from, ifindex, &tcp(A, B, 1011, 80, 0x02)), OK);
}

/// The remote identity of the (single) exact entry of `ifindex`: b's identity, as the engine numbered it.
fn exact_identity(dp: &Datapath, ifindex: u32) -> u32 {
    let key = dp
        .maps
        .policy
        .exact
        .keys()
        .map(Result::unwrap)
        .find(|k| u32::from_be_bytes(k.endpoint) == ifindex)
        .expect("an exact entry");
    u32::from_be_bytes(key.identity)
}
