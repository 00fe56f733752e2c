use super::*;
use crate::policy::{AllowKey, EndpointPolicy};
use std::net::IpAddr;
use ztrust_common::{dir, proto};

/// Records every write and checks, after each one, that no packet of a fixed probe set is allowed
/// unless the old or the new state allows it.
#[derive(Default, Clone)]
struct Mem {
    endpoints: BTreeMap<u32, EndpointInfo>,
    ipcache: BTreeMap<(u32, IpcacheKey), IpcacheValue>,
    policy: BTreeMap<(u32, PolicyKey), PolicyValue>,
    services: BTreeMap<ServiceKey, ServiceValue>,
    service_ranges: BTreeSet<(u32, IpcacheKey)>,
    log: Vec<String>,
    snapshots: Vec<Mem>,
}

impl Mem {
    fn snap(&mut self) {
        let mut s = self.clone();
        s.snapshots.clear();
        self.snapshots.push(s);
    }
    fn identity_of(&self, ip: [u8; 16]) -> u32 {
        let mut best: Option<(u32, u32)> = None;
        for ((prefix, key), v) in &self.ipcache {
            let bits = *prefix as usize;
            let matches =
                (0..bits).all(|i| (key.addr[i / 8] >> (7 - i % 8)) & 1 == (ip[i / 8] >> (7 - i % 8)) & 1);
            if matches && best.is_none_or(|(p, _)| *prefix > p) {
                best = Some((*prefix, v.identity));
            }
        }
        best.map_or(ztrust_common::identity::WORLD, |(_, id)| id)
    }
    /// Ingress verdict at `ifindex` for a TCP packet from `src` to `port`, as the kernel decides it.
    fn allows(&self, ifindex: u32, src: [u8; 16], port: u16) -> bool {
        let Some(ep) = self.endpoints.get(&ifindex) else {
            return false;
        };
        if ep.flags & ep_flags::ISOLATED_INGRESS == 0 {
            return true;
        }
        let id = self.identity_of(src);
        [id, ztrust_common::identity::ANY].iter().any(|remote| {
            let want = PolicyKey::new(ep.endpoint_id, *remote, dir::INGRESS, proto::TCP, port);
            self.policy.keys().any(|(prefix, k)| {
                let a = bytes(k);
                let b = bytes(&want);
                (0..*prefix as usize).all(|i| (a[i / 8] >> (7 - i % 8)) & 1 == (b[i / 8] >> (7 - i % 8)) & 1)
            })
        })
    }
}

fn bytes(k: &PolicyKey) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..4].copy_from_slice(&k.endpoint);
    out[4..8].copy_from_slice(&k.identity);
    out[8] = k.direction;
    out[9] = k.protocol;
    out[10..].copy_from_slice(&k.port);
    out
}

impl MapOps for Mem {
    fn set_endpoint(&mut self, ifindex: u32, info: &EndpointInfo) -> Result<()> {
        self.endpoints.insert(ifindex, *info);
        self.log
            .push(format!("set_endpoint {ifindex} flags={}", info.flags));
        self.snap();
        Ok(())
    }
    fn del_endpoint(&mut self, ifindex: u32) -> Result<()> {
        self.endpoints.remove(&ifindex);
        self.log.push(format!("del_endpoint {ifindex}"));
        self.snap();
        Ok(())
    }
    fn set_ipcache(&mut self, prefix: u32, key: &IpcacheKey, value: &IpcacheValue) -> Result<()> {
        self.ipcache.insert((prefix, *key), *value);
        self.log.push("set_ipcache".into());
        self.snap();
        Ok(())
    }
    fn del_ipcache(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
        self.ipcache.remove(&(prefix, *key));
        self.log.push("del_ipcache".into());
        self.snap();
        Ok(())
    }
    fn set_policy(&mut self, prefix: u32, key: &PolicyKey, value: &PolicyValue) -> Result<()> {
        self.policy.insert((prefix, *key), *value);
        self.log.push("set_policy".into());
        self.snap();
        Ok(())
    }
    fn del_policy(&mut self, prefix: u32, key: &PolicyKey) -> Result<()> {
        self.policy.remove(&(prefix, *key));
        self.log.push("del_policy".into());
        self.snap();
        Ok(())
    }
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.services.insert(*key, *value);
        self.log
            .push(format!("set_service {}", u16::from_be(key.port_be)));
        Ok(())
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.services.remove(key);
        self.log
            .push(format!("del_service {}", u16::from_be(key.port_be)));
        Ok(())
    }
    fn set_service_range(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
        self.service_ranges.insert((prefix, *key));
        self.log.push(format!("set_service_range /{prefix}"));
        Ok(())
    }
    fn del_service_range(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
        self.service_ranges.remove(&(prefix, *key));
        self.log.push(format!("del_service_range /{prefix}"));
        Ok(())
    }
    fn bump_revision(&mut self) -> Result<()> {
        self.log.push("bump_revision".into());
        Ok(())
    }
}

/// Frontends are written after the ipcache and before the revision is bumped (a changed class can
/// narrow a datagram flow's admission); new ranges before frontends, old ones after; an unchanged
/// frontend is not written again.
#[test]
fn services_are_written_in_the_ipcache_step() {
    use crate::model::Protocol;
    use crate::policy::Frontend;
    let frontend = |port| Frontend {
        addr: "10.96.0.20".parse().unwrap(),
        port,
        protocol: Protocol::Tcp,
    };
    let mut desired = Desired::default();
    desired.services.insert(frontend(80), vec![(300, 8080)]);
    desired.services.insert(frontend(443), vec![]);
    desired.service_cidrs.insert("10.96.0.0/16".parse().unwrap());
    desired.ipcache.insert("10.0.0.11/32".parse().unwrap(), 300);
    let (mut mem, mut syncer) = (Mem::default(), Syncer::new());
    syncer.sync(&mut mem, &desired, &BTreeMap::new()).unwrap();
    let key80 = service_key(&frontend(80));
    assert_eq!(mem.services[&key80].classes, 1);
    assert_eq!(
        mem.services[&key80].class[0],
        BackendClass {
            identity: 300,
            port: 8080,
            _pad: 0
        }
    );
    assert_eq!(mem.services[&service_key(&frontend(443))].classes, 0);
    let at = |log: &[String], what: &str| {
        log.iter()
            .position(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("no {what} in {log:?}"))
    };
    assert!(at(&mem.log, "set_ipcache") < at(&mem.log, "set_service_range"));
    assert!(at(&mem.log, "set_service_range") < at(&mem.log, "set_service "));
    assert!(at(&mem.log, "set_service ") < at(&mem.log, "bump_revision"));

    // The backends of :80 change identity; :443 goes; the range is replaced.
    mem.log.clear();
    desired
        .services
        .insert(frontend(80), vec![(301, 8080), (300, 8080)]);
    desired.services.remove(&frontend(443));
    desired.service_cidrs = ["10.97.0.0/16".parse().unwrap()].into();
    let delta = Delta {
        services: true,
        ..Delta::default()
    };
    syncer
        .sync_delta(&mut mem, &desired, &BTreeMap::new(), &delta)
        .unwrap();
    assert_eq!(mem.services[&key80].classes, 2);
    assert_eq!(mem.services.len(), 1);
    assert_eq!(mem.service_ranges.len(), 1);
    let log = mem.log.clone();
    assert!(at(&log, "set_service_range") < at(&log, "set_service 80"));
    assert!(at(&log, "del_service 443") < at(&log, "del_service_range"));
    assert!(at(&log, "del_service_range") < at(&log, "bump_revision"));
    // Nothing changed: nothing written, no revision.
    mem.log.clear();
    syncer
        .sync_delta(&mut mem, &desired, &BTreeMap::new(), &delta)
        .unwrap();
    assert!(mem.log.is_empty(), "{:?}", mem.log);
}

fn pod(name: &str) -> ObjectRef {
    ObjectRef::new("x", name)
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, last])
}

/// Endpoint "server" (ifindex 7) isolated for ingress, allowing `allowed` identities on TCP `port`;
/// `clients` maps client addresses to identities.
fn desired(isolated: bool, allowed: &[u32], port: u16, clients: &[(u8, u32)]) -> Desired {
    let mut d = Desired::default();
    let mut allow = BTreeMap::new();
    for id in allowed {
        allow.insert(
            AllowKey {
                direction: dir::INGRESS,
                remote: *id,
                protocol: proto::TCP,
                port_lo: port,
                port_hi: port,
            },
            1,
        );
    }
    d.endpoints.insert(
        pod("server"),
        EndpointPolicy {
            identity: 300,
            ips: vec![ip(1)],
            isolated_ingress: isolated,
            isolated_egress: false,
            audit_ingress: false,
            audit_egress: false,
            ingress_policies: vec![],
            egress_policies: vec![],
            allow,
        },
    );
    d.ipcache.insert(IpNet::from(ip(1)), 300);
    for (last, id) in clients {
        d.ipcache.insert(IpNet::from(ip(*last)), *id);
    }
    d
}

fn check_transition(old: &Desired, new: &Desired) -> Mem {
    let ifs: BTreeMap<_, _> = [(pod("server"), 7u32)].into();
    let mut mem = Mem::default();
    let mut syncer = Syncer::new();
    syncer.sync(&mut mem, old, &ifs).unwrap();
    let before = mem.clone();
    mem.snapshots.clear();
    syncer.sync(&mut mem, new, &ifs).unwrap();
    let after = mem.clone();
    for snap in &mem.snapshots {
        for client in 2..6u8 {
            let src = ip_to_mapped(ip(client));
            for port in [80u16, 81] {
                if snap.allows(7, src, port) {
                    assert!(
                        before.allows(7, src, port) || after.allows(7, src, port),
                        "intermediate state opened 10.0.0.{client}:{port}; writes: {:?}",
                        mem.log
                    );
                }
            }
        }
    }
    mem
}

#[test]
fn relabel_and_policy_change_never_open_more_than_old_or_new() {
    // Old: client .2 is identity 400 (not allowed), 500 is allowed. New: the policy allows 400, and
    // client .2 moves to identity 600 at the same time. Allowing 400 before .2 leaves it would open
    // .2 for a moment; the sync must order the writes so that it never does.
    let old = desired(true, &[500], 80, &[(2, 400), (3, 500)]);
    let new = desired(true, &[400], 80, &[(2, 600), (3, 500), (4, 400)]);
    check_transition(&old, &new);
    check_transition(&new, &old);
}

#[test]
fn isolation_changes_are_ordered() {
    let open = desired(false, &[], 80, &[(2, 400)]);
    let closed = desired(true, &[400], 81, &[(2, 400)]);
    check_transition(&open, &closed);
    check_transition(&closed, &open);
}

#[test]
fn a_new_endpoint_becomes_known_only_after_its_rules() {
    let new = desired(true, &[400], 80, &[(2, 400)]);
    let mem = check_transition(&Desired::default(), &new);
    let first_endpoint = mem
        .log
        .iter()
        .position(|l| l.starts_with("set_endpoint"))
        .unwrap();
    let last_policy = mem.log.iter().rposition(|l| l == "set_policy").unwrap();
    assert!(first_endpoint > last_policy, "{:?}", mem.log);
}

#[test]
fn unchanged_state_writes_nothing() {
    let d = desired(true, &[400, 500], 80, &[(2, 400)]);
    let ifs: BTreeMap<_, _> = [(pod("server"), 7u32)].into();
    let mut mem = Mem::default();
    let mut syncer = Syncer::new();
    assert!(syncer.sync(&mut mem, &d, &ifs).unwrap().total() > 0);
    assert_eq!(syncer.sync(&mut mem, &d, &ifs).unwrap().total(), 0);
}

#[test]
fn the_any_peer_lookup_is_skipped_only_where_no_entry_is_for_any_peer() {
    let key = |direction, remote| AllowKey {
        direction,
        remote,
        protocol: proto::TCP,
        port_lo: 80,
        port_hi: 80,
    };
    let both = ep_flags::NO_ANY_PEER_INGRESS | ep_flags::NO_ANY_PEER_EGRESS;
    assert_eq!(no_any_peer_flags(&BTreeMap::new()), both);
    let some: BTreeMap<AllowKey, u32> = [(key(dir::INGRESS, 300), 1), (key(dir::EGRESS, 301), 2)].into();
    assert_eq!(no_any_peer_flags(&some), both, "entries for identities only");
    let mut any_in = some.clone();
    any_in.insert(key(dir::INGRESS, identity::ANY), 3);
    assert_eq!(no_any_peer_flags(&any_in), ep_flags::NO_ANY_PEER_EGRESS);
    let mut any_out = some;
    any_out.insert(
        AllowKey {
            direction: dir::EGRESS,
            remote: identity::ANY,
            protocol: 0,
            port_lo: 0,
            port_hi: u16::MAX,
        },
        4,
    );
    assert_eq!(no_any_peer_flags(&any_out), ep_flags::NO_ANY_PEER_INGRESS);
}

#[test]
fn the_policy_trie_is_walked_only_for_the_protocols_and_directions_with_wide_entries() {
    let key = |direction, protocol, port_lo, port_hi| AllowKey {
        direction,
        remote: 300,
        protocol,
        port_lo,
        port_hi,
    };
    assert_eq!(no_wide_flags(&BTreeMap::new()), ep_flags::ALL_NO_WIDE);
    let exact: BTreeMap<AllowKey, u32> = [
        (key(dir::INGRESS, proto::TCP, 80, 80), 1),
        (key(dir::EGRESS, proto::UDP, 53, 53), 2),
    ]
    .into();
    assert_eq!(no_wide_flags(&exact), ep_flags::ALL_NO_WIDE, "single ports only");
    let mut range = exact.clone();
    range.insert(key(dir::EGRESS, proto::UDP, 30000, 30031), 3);
    assert_eq!(
        no_wide_flags(&range),
        ep_flags::ALL_NO_WIDE & !ep_flags::NO_WIDE_EGRESS_UDP
    );
    let mut any_port = exact.clone();
    any_port.insert(key(dir::INGRESS, proto::SCTP, 0, u16::MAX), 4);
    assert_eq!(
        no_wide_flags(&any_port),
        ep_flags::ALL_NO_WIDE & !ep_flags::NO_WIDE_INGRESS_OTHER
    );
    let mut any_proto = exact;
    any_proto.insert(key(dir::INGRESS, proto::ANY, 0, u16::MAX), 5);
    let ingress =
        ep_flags::NO_WIDE_INGRESS_TCP | ep_flags::NO_WIDE_INGRESS_UDP | ep_flags::NO_WIDE_INGRESS_OTHER;
    assert_eq!(no_wide_flags(&any_proto), ep_flags::ALL_NO_WIDE & !ingress);
}

proptest::proptest! {
    /// `is_wide` says where `policy_keys` writes a key: exact entries (the hash) or the trie.
    #[test]
    fn a_key_is_wide_exactly_when_it_is_written_wider_than_one_port(
        protocol in proptest::sample::select(vec![proto::ANY, proto::TCP, proto::UDP, proto::SCTP]),
        port_lo in 0u16..=u16::MAX,
        span in proptest::prop_oneof![proptest::strategy::Just(0u16), 0u16..=u16::MAX],
    ) {
        let key = AllowKey { direction: dir::INGRESS, remote: 300, protocol, port_lo, port_hi: port_lo.saturating_add(span) };
        let written = policy_keys(7, &key);
        let all_exact = written.iter().all(|(prefix, _)| *prefix == PolicyKey::PREFIX_FULL);
        proptest::prop_assert_eq!(is_wide(&key), !all_exact, "{:?} -> {:?}", key, written);
    }
}

#[test]
fn ipcache_keys_round_trip() {
    for net in [
        "10.1.0.0/16",
        "0.0.0.0/0",
        "fd00::/64",
        "203.0.113.10/32",
        "::/0",
        "::/80",
    ] {
        let net: IpNet = net.parse().unwrap();
        let (prefix, key) = ipcache_key(&net);
        assert_eq!(ipcache_net(prefix, &key), Some(net));
    }
    // IPv6 inside ::ffff:0:0/96 has IPv4's keys: the engine gives it no entry.
    let mapped: IpNet = "::ffff:0:0/96".parse().unwrap();
    assert_eq!(ipcache_key(&mapped), ipcache_key(&v4_space()));
    assert!(crate::policy::keyed_as_ipv4(&mapped));
}

/// The engine's state for endpoint "server" (10.0.0.1, fd00::1; bound to ifindex 7) whose only
/// ingress rule is from `::/0`, beside a policy (selecting nothing) with the ipBlocks `others`.
fn from_v6_any(others: &[&str]) -> Desired {
    use crate::model::{Cluster, LabelSelector, NetworkPolicy, Peer, Pod, Rule};
    let block = |cidr: &str| Peer::IpBlock {
        cidr: cidr.parse().unwrap(),
        except: vec![],
    };
    let policy = |name: &str, selector: LabelSelector, peers: Vec<Peer>| NetworkPolicy {
        namespace: "x".into(),
        name: name.into(),
        pod_selector: selector,
        isolates_ingress: true,
        isolates_egress: false,
        audit: false,
        ingress: vec![Rule { peers, ports: vec![] }],
        egress: vec![],
    };
    let mut c = Cluster::default();
    let server = Pod {
        namespace: "x".into(),
        name: "server".into(),
        ips: vec![ip(1), "fd00::1".parse().unwrap()],
        ..Pod::default()
    };
    c.pods.insert(server.object_ref(), server);
    let mut pols = vec![policy("in", LabelSelector::default(), vec![block("::/0")])];
    if !others.is_empty() {
        let nothing = LabelSelector {
            match_labels: [("none".to_owned(), "none".to_owned())].into(),
            ..Default::default()
        };
        pols.push(policy(
            "other",
            nothing,
            others.iter().map(|c| block(c)).collect(),
        ));
    }
    for p in pols {
        c.policies.insert(p.object_ref(), p);
    }
    crate::policy::Engine::new().compile(&c)
}

fn v4_space_key() -> (u32, IpcacheKey) {
    ipcache_key(&v4_space())
}

const WORLD_V4: [u8; 4] = [8, 8, 8, 8];

fn world_v6() -> [u8; 16] {
    "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets()
}

#[test]
fn the_ipv4_space_entry_is_written_and_never_removed() {
    let ifs: BTreeMap<_, _> = [(pod("server"), 7u32)].into();
    let world = ip_to_mapped(IpAddr::from(WORLD_V4));
    let mut mem = Mem::default();
    let mut syncer = Syncer::new();
    let states = [
        &[][..],
        &["0.0.0.0/0"],
        &["10.0.0.0/8"],
        &["0.0.0.0/0", "10.0.0.0/8"],
        &[],
    ];
    for (i, others) in states.iter().enumerate() {
        let d = from_v6_any(others);
        mem.snapshots.clear();
        syncer.sync(&mut mem, &d, &ifs).unwrap();
        // From the first sync on, at every write: the entry is there and IPv4 world is not admitted.
        let during: &[Mem] = if i == 0 { &[] } else { &mem.snapshots };
        for snap in during.iter().chain([&mem]) {
            assert!(
                snap.ipcache.contains_key(&v4_space_key()),
                "state {i} ({others:?}): {:?}",
                mem.log
            );
            assert!(
                !snap.allows(7, world, 80),
                "state {i} ({others:?}) admits IPv4 world: {:?}",
                mem.log
            );
        }
        let want = d.ipcache[&v4_space()];
        assert_eq!(mem.ipcache[&v4_space_key()].identity, want, "state {i}");
        assert_eq!(
            want == identity::WORLD,
            !others.contains(&"0.0.0.0/0"),
            "state {i}"
        );
        assert!(
            mem.allows(7, world_v6(), 80),
            "IPv6 world is admitted by ::/0 (state {i})"
        );
    }
}

#[test]
fn maps_of_an_earlier_agent_without_the_ipv4_space_get_it() {
    let ifs: BTreeMap<_, _> = [(pod("server"), 7u32)].into();
    let world = ip_to_mapped(IpAddr::from(WORLD_V4));
    for full in [true, false] {
        for others in [&[][..], &["10.0.0.0/8"]] {
            // What an agent before the fix wrote: no entry for the IPv4 space, so IPv4 world matched
            // ::/0.
            let mut legacy = from_v6_any(others);
            legacy.ipcache.remove(&v4_space());
            let mut mem = Mem::default();
            let mut syncer = Syncer::new();
            syncer.sync(&mut mem, &legacy, &ifs).unwrap();
            assert!(!mem.ipcache.contains_key(&v4_space_key()));
            assert!(
                mem.allows(7, world, 80),
                "the earlier agent's state admits IPv4 world"
            );
            // This agent's first sync, whether it looks at everything or at a delta naming nothing.
            let d = from_v6_any(others);
            let delta = if full { Delta::full() } else { Delta::default() };
            let stats = syncer.sync_delta(&mut mem, &d, &ifs, &delta).unwrap();
            assert_eq!(stats.ipcache_writes, 1, "full {full}, {others:?}");
            assert_eq!(mem.ipcache[&v4_space_key()].identity, identity::WORLD);
            assert!(!mem.allows(7, world, 80), "full {full}, {others:?}");
            assert!(mem.allows(7, world_v6(), 80));
            assert_eq!(
                syncer
                    .sync_delta(&mut mem, &d, &ifs, &Delta::default())
                    .unwrap()
                    .total(),
                0
            );
        }
    }
}

#[test]
fn the_ipv4_space_counts_against_the_ipcache_capacity() {
    let ifs: BTreeMap<_, _> = [(pod("server"), 7u32)].into();
    let d = from_v6_any(&["10.0.0.0/8"]);
    // The server's two addresses, ::/0, 10.0.0.0/8 and the IPv4 space.
    assert_eq!(d.ipcache.len(), 5, "{:?}", d.ipcache);
    let mut syncer = Syncer::new();
    syncer.capacities.ipcache = 4;
    match syncer.sync(&mut Mem::default(), &d, &ifs) {
        Err(Error::Capacity {
            map: "ipcache",
            needed: 5,
            capacity: 4,
        }) => {}
        other => panic!("{other:?}"),
    }
    syncer.capacities.ipcache = 5;
    let mut mem = Mem::default();
    syncer.sync(&mut mem, &d, &ifs).unwrap();
    assert_eq!(mem.ipcache.len(), 5);
    assert_eq!(syncer.ipcache_entries(), 5);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// Syncing only what the engine's delta names (and changed bindings) leaves the maps exactly as
    /// a full sync from scratch would, at every step of an evolving cluster; interfaces come and go.
    #[test]
    fn delta_sync_writes_what_a_full_sync_writes(steps in crate::policy::proptests::evolution()) {
        let mut engine = crate::policy::Engine::for_node("here");
        let mut previous = crate::model::Cluster::default();
        let mut syncer = Syncer::new();
        let mut mem = Mem::default();
        let mut ifindexes: BTreeMap<ObjectRef, u32> = BTreeMap::new();
        for (k, c) in steps.iter().enumerate() {
            engine.update(c, &crate::policy::Changes::between(&previous, c));
            previous = c.clone();
            let delta = engine.take_delta();
            let d = engine.desired();
            let bindings: BTreeMap<ObjectRef, u32> = d
                .endpoints
                .keys()
                .enumerate()
                .filter(|(i, _)| (i + k) % 4 != 0)
                .map(|(_, pod)| {
                    let next = ifindexes.len() as u32 + 1;
                    (pod.clone(), *ifindexes.entry(pod.clone()).or_insert(next))
                })
                .collect();
            syncer.sync_delta(&mut mem, d, &bindings, &delta).expect("sync");
            let mut full = Mem::default();
            Syncer::new().sync(&mut full, d, &bindings).expect("full sync");
            proptest::prop_assert_eq!(&mem.endpoints, &full.endpoints, "step {}", k);
            proptest::prop_assert_eq!(&mem.ipcache, &full.ipcache, "step {}", k);
            proptest::prop_assert_eq!(&mem.policy, &full.policy, "step {}", k);
            proptest::prop_assert_eq!(syncer.policy_entries(), full.policy.len());
            mem.snapshots.clear();
        }
    }
}

/// [`Mem`] whose `n`-th write (1-based, any map) is refused as the kernel would refuse it, after the
/// capacity check: a sync that fails half-way.
struct FailingAt<'a> {
    mem: &'a mut Mem,
    writes: usize,
    fail_at: usize,
}

impl FailingAt<'_> {
    fn next(&mut self) -> Result<()> {
        self.writes += 1;
        if self.writes == self.fail_at {
            return Err(Error::Write {
                map: "test",
                source: aya::maps::MapError::KeyNotFound,
            });
        }
        Ok(())
    }
}

impl MapOps for FailingAt<'_> {
    fn set_endpoint(&mut self, ifindex: u32, info: &EndpointInfo) -> Result<()> {
        self.next()?;
        self.mem.set_endpoint(ifindex, info)
    }
    fn del_endpoint(&mut self, ifindex: u32) -> Result<()> {
        self.next()?;
        self.mem.del_endpoint(ifindex)
    }
    fn set_ipcache(&mut self, prefix: u32, key: &IpcacheKey, value: &IpcacheValue) -> Result<()> {
        self.next()?;
        self.mem.set_ipcache(prefix, key, value)
    }
    fn del_ipcache(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
        self.next()?;
        self.mem.del_ipcache(prefix, key)
    }
    fn set_policy(&mut self, prefix: u32, key: &PolicyKey, value: &PolicyValue) -> Result<()> {
        self.next()?;
        self.mem.set_policy(prefix, key, value)
    }
    fn del_policy(&mut self, prefix: u32, key: &PolicyKey) -> Result<()> {
        self.next()?;
        self.mem.del_policy(prefix, key)
    }
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.next()?;
        self.mem.set_service(key, value)
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.next()?;
        self.mem.del_service(key)
    }
    fn set_service_range(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
        self.next()?;
        self.mem.set_service_range(prefix, key)
    }
    fn del_service_range(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
        self.next()?;
        self.mem.del_service_range(prefix, key)
    }
    fn bump_revision(&mut self) -> Result<()> {
        self.next()?;
        self.mem.bump_revision()
    }
}

/// What the maps hold, for comparing two of them.
#[derive(Debug, PartialEq)]
struct Contents {
    endpoints: BTreeMap<u32, EndpointInfo>,
    ipcache: BTreeMap<(u32, IpcacheKey), IpcacheValue>,
    policy: BTreeMap<(u32, PolicyKey), PolicyValue>,
    services: BTreeMap<ServiceKey, ServiceValue>,
    service_ranges: BTreeSet<(u32, IpcacheKey)>,
}

fn contents(m: &Mem) -> Contents {
    Contents {
        endpoints: m.endpoints.clone(),
        ipcache: m.ipcache.clone(),
        policy: m.policy.clone(),
        services: m.services.clone(),
        service_ranges: m.service_ranges.clone(),
    }
}

/// A sync refused half-way (any of its writes: the kernel refused it after the capacity check passed)
/// leaves nothing a later sync does not correct: after the next sync that succeeds, the maps are what a
/// new agent would write for that state — also when that state no longer wants what the failed sync
/// had begun to write (a policy entry, a new endpoint, a Service frontend left behind would allow what
/// no policy allows any more).
#[test]
fn a_sync_refused_half_way_leaves_nothing_the_next_sync_does_not_correct() {
    use crate::model::Protocol;
    use crate::policy::Frontend;
    let ifs: BTreeMap<_, _> = [(pod("server"), 7u32), (pod("client"), 8u32)].into();
    let a = desired(true, &[500], 80, &[(2, 400), (3, 500)]);
    // b: other identities on another port, a new endpoint, a Service frontend and range.
    let mut b = desired(true, &[400, 600], 81, &[(2, 400), (3, 500), (4, 600)]);
    let mut client = b.endpoints[&pod("server")].clone();
    client.ips = vec![ip(9)];
    client.isolated_ingress = false;
    b.endpoints.insert(pod("client"), client);
    b.ipcache.insert(IpNet::from(ip(9)), 301);
    let frontend = Frontend {
        addr: "10.96.0.20".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    b.services.insert(frontend, vec![(300, 8080)]);
    b.service_cidrs.insert("10.96.0.0/16".parse().unwrap());
    // c: back to a, on port 82 (so that nothing of b is wanted).
    let c = desired(true, &[500], 82, &[(2, 400), (3, 500)]);
    let expected = {
        let (mut mem, mut syncer) = (Mem::default(), Syncer::new());
        syncer.sync(&mut mem, &c, &ifs).unwrap();
        contents(&mem)
    };
    // Every call the sync from a to b makes, the revision bump included.
    let writes = {
        let (mut mem, mut syncer) = (Mem::default(), Syncer::new());
        syncer.sync(&mut mem, &a, &ifs).unwrap();
        let mut counting = FailingAt {
            mem: &mut mem,
            writes: 0,
            fail_at: usize::MAX,
        };
        syncer.sync(&mut counting, &b, &ifs).unwrap();
        counting.writes
    };
    assert!(writes > 10, "{writes} writes from a to b");
    for fail_at in 1..=writes {
        let (mut mem, mut syncer) = (Mem::default(), Syncer::new());
        syncer.sync(&mut mem, &a, &ifs).unwrap();
        let refused = syncer.sync(
            &mut FailingAt {
                mem: &mut mem,
                writes: 0,
                fail_at,
            },
            &b,
            &ifs,
        );
        assert!(
            refused.is_err(),
            "write {fail_at} was refused, the sync succeeded"
        );
        syncer.sync(&mut mem, &c, &ifs).unwrap();
        assert_eq!(
            contents(&mem),
            expected,
            "after write {fail_at} of {writes} was refused"
        );
        // And a retry of b itself, after the refusal, is b.
        let (mut mem2, mut syncer2) = (Mem::default(), Syncer::new());
        syncer2.sync(&mut mem2, &a, &ifs).unwrap();
        let _ = syncer2.sync(
            &mut FailingAt {
                mem: &mut mem2,
                writes: 0,
                fail_at,
            },
            &b,
            &ifs,
        );
        syncer2.sync(&mut mem2, &b, &ifs).unwrap();
        let (mut fresh, mut s) = (Mem::default(), Syncer::new());
        s.sync(&mut fresh, &b, &ifs).unwrap();
        assert_eq!(
            contents(&mem2),
            contents(&fresh),
            "b retried after write {fail_at}"
        );
        // And back to a, whose entries the refused sync may have deleted: a again, not less.
        let (mut mem3, mut syncer3) = (Mem::default(), Syncer::new());
        syncer3.sync(&mut mem3, &a, &ifs).unwrap();
        let before = contents(&mem3);
        let _ = syncer3.sync(
            &mut FailingAt {
                mem: &mut mem3,
                writes: 0,
                fail_at,
            },
            &b,
            &ifs,
        );
        syncer3.sync(&mut mem3, &a, &ifs).unwrap();
        assert_eq!(
            contents(&mem3),
            before,
            "a again after write {fail_at} of the sync to b was refused"
        );
    }
}

#[test]
fn the_narrowing_step_keeps_a_direction_audited_where_neither_side_enforces_it() {
    use super::entries::narrowest;
    let info = |flags| EndpointInfo {
        flags,
        ..Default::default()
    };
    let (iso, aud) = (ep_flags::ISOLATED_EGRESS, ep_flags::AUDIT_EGRESS);
    // Not isolated → isolated by audited policies only (and back): both pass it, so does the step.
    for (a, b) in [(0, iso | aud), (iso | aud, 0), (iso | aud, iso | aud)] {
        assert_eq!(
            narrowest(&info(a), &info(b)).flags & (iso | aud),
            iso | aud,
            "{a:#x} → {b:#x}"
        );
    }
    // Enforced on one side: enforced in the step.
    for (a, b) in [(iso, iso | aud), (iso | aud, iso)] {
        assert_eq!(
            narrowest(&info(a), &info(b)).flags & (iso | aud),
            iso,
            "{a:#x} → {b:#x}"
        );
    }
    // The other direction is not touched by this one's audit.
    assert_eq!(
        narrowest(
            &info(ep_flags::ISOLATED_INGRESS),
            &info(ep_flags::ISOLATED_INGRESS | iso | aud)
        )
        .flags
            & (ep_flags::ISOLATED_INGRESS | ep_flags::AUDIT_INGRESS),
        ep_flags::ISOLATED_INGRESS
    );
}
