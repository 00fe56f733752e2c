//! The programs pass the verifier, maps and links are pinned, a second agent adopts them with their
//! content, and cleanup removes every pin.

use crate::common;

use std::collections::BTreeMap;

use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues};
use ipnet::IpNet;
use ztrust_agent::datapath::loader::{self, Datapath};
use ztrust_agent::datapath::sync::{KernelMaps, Syncer};
use ztrust_agent::policy::Desired;
use ztrust_common::{
    CounterKey, CounterValue, EndpointInfo, IpcacheKey, IpcacheValue, SlotCounters, dir, names, reason,
    verdict,
};

#[test]
fn load_pin_adopt_cleanup() {
    common::require_root();
    let topo = common::Topology::new("ztpin", 202, 1);
    common::enter_netns(&topo.node);
    let host_if = topo.pods[0].host_if.clone();
    let index = nix::net::if_::if_nametoindex(host_if.as_str()).unwrap();

    let mut first = Datapath::load(&topo.pin_dir).expect("programs load and pass the verifier");
    first.attach(&host_if, index).expect("attach");
    let info = EndpointInfo {
        endpoint_id: index,
        identity: 300,
        flags: 3,
        ..Default::default()
    };
    first.maps.endpoints.insert(index, info, 0).unwrap();
    let written = first.maps.endpoints.get(&index, 0).unwrap();
    assert_ne!(written.slot, 0, "the endpoint got a counter slot");
    for f in [
        "maps/ZT_ENDPOINTS",
        "maps/ZT_POLICY",
        "maps/ZT_POLICY_EXACT",
        "maps/ZT_IPCACHE",
        "maps/ZT_IPCACHE_HOSTS",
        "maps/ZT_CONNTRACK",
        "maps/ZT_SLOT_COUNTERS",
    ] {
        assert!(topo.pin_dir.join(f).exists(), "{f} pinned");
    }
    assert!(topo.pin_dir.join(format!("links/from-pod/{host_if}")).exists());
    assert!(topo.pin_dir.join(format!("links/to-pod/{host_if}")).exists());
    drop(first);

    // The agent is gone; the pinned state is still there and a new agent sees it.
    let mut second = Datapath::load(&topo.pin_dir).expect("reload");
    assert_eq!(
        second.maps.endpoints.get(&index, 0).unwrap(),
        written,
        "map content, the slot with it, survives the agent"
    );
    assert_eq!(second.pinned_interfaces(), vec![host_if.clone()]);
    second.attach(&host_if, index).expect("adopt pinned links");
    drop(second);

    loader::cleanup(&topo.pin_dir).unwrap();
    assert!(!topo.pin_dir.exists());
}

/// Counter slots: an endpoint keeps its slot across agents, an entry an agent from before the slots wrote
/// gets one at load, and a removed endpoint's slot goes to the next new endpoint zeroed.
#[test]
fn counter_slots_adopted_given_and_recycled_zeroed() {
    common::require_root();
    let topo = common::Topology::new("ztslot", 214, 1);
    let caps = loader::Capacities {
        endpoints: 3,
        ..Default::default()
    };
    let mut dp = Datapath::load_with(&topo.pin_dir, caps).expect("load");
    let ep = |i: u32| EndpointInfo {
        endpoint_id: i,
        identity: 300 + i,
        ..Default::default()
    };
    let slot = |dp: &Datapath, i: u32| dp.maps.endpoints.get(&i, 0).expect("endpoint").slot;
    dp.maps.endpoints.insert(1, ep(1), 0).unwrap();
    dp.maps.endpoints.insert(2, ep(2), 0).unwrap();
    assert_eq!((slot(&dp, 1), slot(&dp, 2)), (1, 2));
    // Rewriting an endpoint keeps its slot, whatever slot the caller's entry names.
    dp.maps
        .endpoints
        .insert(
            1,
            EndpointInfo {
                flags: 7,
                slot: 2,
                ..ep(1)
            },
            0,
        )
        .unwrap();
    assert_eq!(slot(&dp, 1), 1);

    // Counts in slot 2, as the programs would leave them; and an entry as an agent before the slots
    // wrote it (no slot), straight into the pinned map.
    let mut slots: PerCpuArray<MapData, SlotCounters> =
        loader::open_pinned(&topo.pin_dir, names::SLOT_COUNTERS).unwrap();
    let counted = SlotCounters {
        egress_established: CounterValue {
            packets: 5,
            bytes: 500,
        },
        ..Default::default()
    };
    let cpus = aya::util::nr_cpus().unwrap();
    slots
        .set(2, PerCpuValues::try_from(vec![counted; cpus]).unwrap(), 0)
        .unwrap();
    let mut raw: HashMap<MapData, u32, EndpointInfo> =
        loader::open_pinned(&topo.pin_dir, names::ENDPOINTS).unwrap();
    raw.insert(3, ep(3), 0).unwrap();
    drop(dp);

    let mut dp = Datapath::load_with(&topo.pin_dir, caps).expect("reload");
    assert_eq!((slot(&dp, 1), slot(&dp, 2)), (1, 2), "slots survive the agent");
    assert_eq!(
        dp.maps
            .endpoints
            .slot_counts(2)
            .unwrap()
            .egress_established
            .packets,
        5 * cpus as u64,
        "with their counts"
    );
    assert_eq!(slot(&dp, 3), 3, "a slot-less entry gets the free slot at load");
    // A removed endpoint's slot goes to the next new endpoint, zeroed.
    dp.maps.endpoints.remove(&2).unwrap();
    dp.maps.endpoints.insert(5, ep(5), 0).unwrap();
    assert_eq!(slot(&dp, 5), 2);
    assert_eq!(
        dp.maps.endpoints.slot_counts(5).unwrap(),
        SlotCounters::default(),
        "the recycled slot starts from zero"
    );

    // The packet counters as /metrics reads them (its own descriptors of the pins): slots and hash
    // summed over the CPUs, by interface; an interface's hash entries deleted once its counts are
    // handed on, the others kept.
    slots
        .set(1, PerCpuValues::try_from(vec![counted; cpus]).unwrap(), 0)
        .unwrap();
    let key = |ifindex| CounterKey {
        ifindex,
        direction: dir::INGRESS,
        verdict: verdict::DROPPED,
        reason: reason::POLICY_DENIED,
        _pad: 0,
    };
    let per_cpu = |packets: u64| {
        PerCpuValues::try_from(vec![
            CounterValue {
                packets,
                bytes: packets * 10
            };
            cpus
        ])
        .unwrap()
    };
    dp.maps.counters.insert(key(5), per_cpu(3), 0).unwrap();
    dp.maps.counters.insert(key(6), per_cpu(4), 0).unwrap();
    let mut counters = loader::CounterMaps::open(&topo.pin_dir).unwrap();
    let of = |r: &loader::CounterReading, ifindex: u32| -> (u64, u64) {
        r.iter()
            .filter(|((_, k), _)| k.ifindex == ifindex)
            .fold((0, 0), |(p, b), (_, v)| (p + v.packets, b + v.bytes))
    };
    let n = cpus as u64;
    let reading = counters.read().unwrap();
    assert_eq!(of(&reading, 1), (5 * n, 500 * n), "endpoint 1's slot");
    assert!(
        reading
            .keys()
            .any(|(o, k)| *o == loader::Origin::Slot(1) && k.ifindex == 1)
    );
    assert_eq!(of(&reading, 5), (3 * n, 30 * n));
    assert_eq!(of(&reading, 6), (4 * n, 40 * n));
    let of_5: Vec<loader::Counted> = reading
        .keys()
        .filter(|(o, k)| *o == loader::Origin::Hash && k.ifindex == 5)
        .map(|(_, k)| *k)
        .collect();
    assert_eq!(counters.forget(&of_5).unwrap(), 1);
    let totals = counters.read().unwrap();
    assert_eq!(
        (of(&totals, 5), of(&totals, 6), of(&totals, 1)),
        ((0, 0), (4 * n, 40 * n), (5 * n, 500 * n))
    );
    assert!(
        dp.maps.counters.get(&key(5), 0).is_err(),
        "gone from the kernel's map"
    );
    drop(dp);
    loader::cleanup(&topo.pin_dir).unwrap();
}

/// Kernels before 6.6 have no TCX: the programs go on a clsact qdisc as BPF filters instead. Forced here,
/// they filter real traffic (fail closed before the endpoint is known) and detach with the agent.
#[test]
fn clsact_fallback_filters_and_detaches() {
    common::require_root();
    let mut topo = common::Topology::new("ztcls", 208, 2);
    topo.serve(1, 80);
    common::enter_netns(&topo.node);
    assert!(topo.tcp(0, 1, 80), "no program yet: traffic flows");
    let mut dp = Datapath::load(&topo.pin_dir).expect("load");
    dp.attach_mode = ztrust_agent::datapath::loader::AttachMode::Clsact;
    for p in &topo.pods {
        let index = nix::net::if_::if_nametoindex(p.host_if.as_str()).unwrap();
        dp.attach(&p.host_if, index).expect("clsact attach");
    }
    let filters = std::process::Command::new("tc")
        .args(["filter", "show", "dev", &topo.pods[0].host_if, "ingress"])
        .output()
        .unwrap();
    let filters = String::from_utf8_lossy(&filters.stdout);
    assert!(
        filters.contains("bpf") && filters.contains("zt_from_pod"),
        "a BPF filter on the clsact qdisc: {filters}"
    );
    assert!(
        !topo.tcp(0, 1, 80),
        "the filter drops traffic of unknown endpoints"
    );
    assert!(
        !topo
            .pin_dir
            .join(format!("links/from-pod/{}", topo.pods[0].host_if))
            .exists(),
        "nothing pinned"
    );
    drop(dp);
    assert!(topo.tcp(0, 1, 80), "the filters went with the agent");
}

/// Single addresses go to the ipcache's hash, prefixes to its trie; a restarted agent adopts both, and an
/// address an agent from before the split left in the trie is removed when it goes.
#[test]
fn ipcache_split_between_hash_and_trie() {
    common::require_root();
    let topo = common::Topology::new("ztipc", 209, 1);
    let mut dp = Datapath::load(&topo.pin_dir).expect("load");
    let net = |s: &str| s.parse::<IpNet>().unwrap();
    let key = |n: &IpNet| ztrust_agent::datapath::sync::ipcache_key(n);
    let mut desired = Desired::default();
    desired.ipcache.insert(net("10.0.0.1/32"), 300);
    desired.ipcache.insert(net("fd00::1/128"), 301);
    desired.ipcache.insert(net("192.168.0.0/16"), 302);
    let bindings = BTreeMap::new();
    Syncer::new()
        .sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings)
        .expect("sync");
    for (n, id) in [("10.0.0.1/32", 300), ("fd00::1/128", 301)] {
        let (prefix, k) = key(&net(n));
        assert_eq!(prefix, 128);
        assert_eq!(
            dp.maps.ipcache.hosts.get(&k, 0).unwrap().identity,
            id,
            "{n} in the hash"
        );
        assert!(
            dp.maps.ipcache.prefixes.get(&Key::new(prefix, k), 0).is_err(),
            "{n} not in the trie"
        );
    }
    let (prefix, k) = key(&net("192.168.0.0/16"));
    assert_eq!(
        dp.maps
            .ipcache
            .prefixes
            .get(&Key::new(prefix, k), 0)
            .unwrap()
            .identity,
        302,
        "a CIDR in the trie"
    );
    assert_eq!(dp.maps.ipcache.hosts.keys().count(), 2);

    // As an agent before the split would have left it: a pod address in the trie.
    let (prefix, old) = key(&net("10.0.0.9/32"));
    dp.maps
        .ipcache
        .prefixes
        .insert(
            &Key::new(prefix, old),
            IpcacheValue {
                identity: 303,
                _pad: 0,
            },
            0,
        )
        .unwrap();
    drop(dp);

    let mut dp = Datapath::load(&topo.pin_dir).expect("reload");
    let mut syncer = Syncer::adopt(&dp.maps);
    assert_eq!(syncer.ipcache_entries(), 4, "adopted from both maps");
    desired.ipcache.remove(&net("10.0.0.9/32"));
    desired.ipcache.remove(&net("10.0.0.1/32"));
    syncer
        .sync(&mut KernelMaps(&mut dp.maps), &desired, &bindings)
        .expect("sync");
    assert!(
        dp.maps.ipcache.prefixes.get(&Key::new(prefix, old), 0).is_err(),
        "the old entry left the trie"
    );
    assert!(
        dp.maps.ipcache.hosts.get(&key(&net("10.0.0.1/32")).1, 0).is_err(),
        "a removed pod left the hash"
    );
    let left: Vec<IpcacheKey> = dp.maps.ipcache.entries().map(|(_, k, _)| k).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    drop(dp);
    loader::cleanup(&topo.pin_dir).unwrap();
}

/// A map pinned with another capacity keeps it, and the agent plans with it (a pinned map cannot be
/// resized); one pinned with another layout (an agent of another version) is refused before any program
/// is loaded, with an error that names the map and the remedy instead of a verifier log.
#[test]
fn pinned_maps_keep_their_capacity_and_a_foreign_layout_is_refused() {
    common::require_root();
    let topo = common::Topology::new("ztlay", 210, 1);
    let caps = |n| loader::Capacities {
        policy: n,
        ipcache: n / 2,
        ..Default::default()
    };
    drop(Datapath::load_with(&topo.pin_dir, caps(4096)).expect("load"));
    let dp = Datapath::load_with(&topo.pin_dir, caps(8192)).expect("reload with a larger capacity asked");
    assert_eq!(
        dp.capacities().policy,
        4096,
        "the pinned map's capacity is what the sync plans with"
    );
    assert_eq!(
        dp.capacities().ipcache,
        2048,
        "both halves of the ipcache were pinned with 2048"
    );
    drop(dp);

    // Conntrack values as an agent with a 16-byte value would have pinned them.
    let ct = topo.pin_dir.join("maps/ZT_CONNTRACK");
    std::fs::remove_file(&ct).unwrap();
    let made = std::process::Command::new("bpftool")
        .args([
            "map",
            "create",
            ct.to_str().unwrap(),
            "type",
            "lru_hash",
            "key",
            "44",
            "value",
            "16",
        ])
        .args(["entries", "64", "name", "ZT_CONNTRACK"])
        .status()
        .expect("bpftool");
    assert!(made.success(), "bpftool map create");
    let err = Datapath::load(&topo.pin_dir)
        .err()
        .expect("a foreign layout is refused")
        .to_string();
    for part in [
        "ZT_CONNTRACK",
        "16-byte values",
        "need 24-byte values",
        "--cleanup",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    loader::cleanup(&topo.pin_dir).unwrap();
}

/// `status` reads the pinned maps through the loader's wrappers: it reports the capacities the maps were
/// pinned with (not the compile-time defaults) and counts entries as the agent does (an exact entry an
/// agent before the policy split left in the trie as well is one entry).
#[test]
fn status_reports_pinned_capacities_and_counts_entries_as_the_agent_does() {
    common::require_root();
    let topo = common::Topology::new("ztsta", 211, 1);
    let caps = loader::Capacities {
        endpoints: 64,
        ipcache: 512,
        policy: 1024,
        conntrack: 4096,
    };
    let mut dp = Datapath::load_with(&topo.pin_dir, caps).expect("load");
    let net = |s: &str| s.parse::<IpNet>().unwrap();
    let mut desired = Desired::default();
    desired.ipcache.insert(net("10.0.0.1/32"), 300);
    desired.ipcache.insert(net("192.168.0.0/16"), 302);
    let mut syncer = Syncer::new();
    syncer
        .sync(&mut KernelMaps(&mut dp.maps), &desired, &BTreeMap::new())
        .expect("sync");
    dp.maps
        .endpoints
        .insert(7, EndpointInfo::default(), 0)
        .expect("endpoint");
    let key =
        ztrust_common::PolicyKey::new(7, 300, ztrust_common::dir::INGRESS, ztrust_common::proto::TCP, 80);
    let value = ztrust_common::PolicyValue { rule_id: 1, _pad: 0 };
    let full = ztrust_common::PolicyKey::PREFIX_FULL;
    dp.maps.policy.insert(full, &key, &value).expect("exact entry");
    // The same entry in the trie too, as an agent before the split kept it.
    dp.maps
        .policy
        .prefixes
        .insert(&Key::new(full, key), value, 0)
        .expect("legacy copy");
    let wide =
        ztrust_common::PolicyKey::new(7, 301, ztrust_common::dir::INGRESS, ztrust_common::proto::TCP, 0);
    dp.maps
        .policy
        .insert(full - 16, &wide, &value)
        .expect("any-port entry");

    let st = ztrust_agent::status::read(&topo.pin_dir).expect("status");
    assert_eq!(
        (st.endpoints_capacity, st.ipcache_capacity, st.policy_capacity),
        (64, 512, 1024),
        "the pinned capacities"
    );
    assert_eq!(st.endpoints.len(), 1);
    assert_eq!(
        st.ipcache_entries,
        syncer.ipcache_entries(),
        "as the sync counts them"
    );
    assert_eq!(st.ipcache_entries, 2);
    assert_eq!(st.policy_entries, 2, "the legacy copy is not a third entry");
    assert!(
        status_line(&st).contains("endpoints 1/64") && status_line(&st).contains("policy entries 2/1024"),
        "{}",
        status_line(&st)
    );

    // Pins as an agent from before the map splits and the counter slots left them: every entry in the
    // tries, no hash halves, no slots. `status` still reads them.
    for name in [names::POLICY_EXACT, names::IPCACHE_HOSTS, names::SLOT_COUNTERS] {
        std::fs::remove_file(topo.pin_dir.join("maps").join(name)).unwrap();
    }
    let st = ztrust_agent::status::read(&topo.pin_dir).expect("status of pre-split pins");
    assert_eq!((st.ipcache_capacity, st.policy_capacity), (512, 1024));
    assert_eq!(
        st.policy_entries, 2,
        "the trie's: the legacy copy and the any-port entry"
    );
    assert_eq!(st.ipcache_entries, 1, "the trie's: 192.168.0.0/16");
    assert_eq!(st.endpoints.len(), 1);
    drop(dp);
    loader::cleanup(&topo.pin_dir).unwrap();
}

fn status_line(st: &ztrust_agent::status::Status) -> String {
    ztrust_agent::status::render(st)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}
