//! The typed maps: what the agent writes through ([`Maps`] and its split-map wrappers [`Endpoints`],
//! [`Ipcache`], [`Policy`]) and what `status` reads through ([`PinnedMaps`]).

use super::*;

/// The typed maps the agent writes and reads.
pub struct Maps {
    pub endpoints: Endpoints,
    pub ipcache: Ipcache,
    pub policy: Policy,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub counters: PerCpuHashMap<MapData, CounterKey, CounterValue>,
    pub stats: PerCpuArray<MapData, u64>,
    pub config: Array<MapData, Config>,
    pub revision: Array<MapData, u32>,
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub service_ranges: LpmTrie<MapData, IpcacheKey, u32>,
    pub node_local: LpmTrie<MapData, IpcacheKey, u32>,
}

/// The endpoint map, and the counter slot each entry names ([`EndpointInfo::slot`]): the programs count
/// an established connection's packets at that index of [`names::SLOT_COUNTERS`], without the hash
/// lookup [`names::COUNTERS`] costs. An endpoint keeps its slot while it has an entry; a slot is zeroed
/// before it is handed out again (a packet judged with the old entry just before may still land in it).
/// Slots are this wrapper's business: the slot of an `EndpointInfo` given to [`Endpoints::insert`] is
/// ignored.
pub struct Endpoints {
    map: HashMap<MapData, u32, EndpointInfo>,
    slot_counters: PerCpuArray<MapData, SlotCounters>,
    /// ifindex → slot, for every entry that has one.
    slots: BTreeMap<u32, u32>,
    free: BTreeSet<u32>,
}

/// [`EndpointInfo::slot`] of an entry without a slot: its packets are all counted in the hash.
pub const NO_SLOT: u32 = EndpointInfo::NO_SLOT;

impl Endpoints {
    /// Takes over the slots of the entries found (an earlier agent's, with their counts); entries
    /// without one (an agent from before the slots) get one.
    pub(super) fn adopt(
        map: HashMap<MapData, u32, EndpointInfo>,
        slot_counters: PerCpuArray<MapData, SlotCounters>,
    ) -> Result<Self, MapError> {
        let mut me = Endpoints {
            map,
            free: (1..slot_counters.len()).collect(),
            slot_counters,
            slots: BTreeMap::new(),
        };
        let mut without = Vec::new();
        for (ifindex, info) in me.map.iter().flatten() {
            if info.slot != NO_SLOT && me.free.remove(&info.slot) {
                me.slots.insert(ifindex, info.slot);
            } else {
                without.push((ifindex, info));
            }
        }
        for (ifindex, info) in without {
            me.insert(ifindex, info, 0)?;
        }
        Ok(me)
    }

    /// Writes the endpoint's entry, with its slot (a new endpoint gets a zeroed one; when none is left,
    /// none: its packets are counted in the hash).
    pub fn insert(&mut self, ifindex: u32, mut info: EndpointInfo, flags: u64) -> Result<(), MapError> {
        info.slot = match self.slots.get(&ifindex) {
            Some(&slot) => slot,
            None => self.take_slot(ifindex)?,
        };
        self.map.insert(ifindex, info, flags)
    }

    fn take_slot(&mut self, ifindex: u32) -> Result<u32, MapError> {
        let Some(&slot) = self.free.first() else {
            return Ok(NO_SLOT);
        };
        let possible_cpus = |io_error| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "possible CPUs",
                io_error,
            })
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| possible_cpus(e))?;
        let zeros = PerCpuValues::try_from(vec![SlotCounters::default(); cpus]).map_err(possible_cpus)?;
        self.slot_counters.set(slot, zeros, 0)?;
        self.free.remove(&slot);
        self.slots.insert(ifindex, slot);
        Ok(slot)
    }

    /// Removes the endpoint's entry (`KeyNotFound` when there is none) and frees its slot.
    pub fn remove(&mut self, ifindex: &u32) -> Result<(), MapError> {
        let removed = self.map.remove(ifindex);
        if matches!(removed, Ok(()) | Err(MapError::KeyNotFound))
            && let Some(slot) = self.slots.remove(ifindex)
        {
            self.free.insert(slot);
        }
        removed
    }

    pub fn get(&self, ifindex: &u32, flags: u64) -> Result<EndpointInfo, MapError> {
        self.map.get(ifindex, flags)
    }

    pub fn iter(&self) -> impl Iterator<Item = Result<(u32, EndpointInfo), MapError>> + '_ {
        self.map.iter()
    }

    /// The slot counters of the endpoint, summed over the CPUs (zero without a slot).
    pub fn slot_counts(&self, ifindex: u32) -> Result<SlotCounters, MapError> {
        match self.slots.get(&ifindex) {
            Some(slot) => Ok(SlotCounters::total(self.slot_counters.get(slot, 0)?.iter())),
            None => Ok(SlotCounters::default()),
        }
    }
}

/// The ipcache, in two maps: single addresses (pods, the node, /32 and /128 ipBlocks) in a hash map,
/// found in one hash lookup whatever the number of pods; shorter prefixes (ipBlock CIDRs) in an LPM trie,
/// looked up only when the address is not in the hash. A single address is always the longest prefix
/// that contains it, so the split gives the trie's answer.
pub struct Ipcache {
    pub hosts: HashMap<MapData, IpcacheKey, IpcacheValue>,
    pub prefixes: LpmTrie<MapData, IpcacheKey, IpcacheValue>,
}

/// The prefix length of a single address in ipcache keys (IPv4 is stored IPv4-mapped).
pub const IPCACHE_HOST_PREFIX: u32 = IpcacheKey::PREFIX_HOST;

impl Ipcache {
    pub fn insert(&mut self, prefix: u32, key: &IpcacheKey, value: &IpcacheValue) -> Result<(), MapError> {
        if prefix == IPCACHE_HOST_PREFIX {
            self.hosts.insert(key, value, 0)
        } else {
            self.prefixes
                .insert(&aya::maps::lpm_trie::Key::new(prefix, *key), value, 0)
        }
    }

    /// Removes the entry; `KeyNotFound` when there is none. A single address is removed from the trie
    /// as well: an agent before the split kept every entry there.
    pub fn remove(&mut self, prefix: u32, key: &IpcacheKey) -> Result<(), MapError> {
        let in_trie = self.prefixes.remove(&aya::maps::lpm_trie::Key::new(prefix, *key));
        if prefix != IPCACHE_HOST_PREFIX {
            return in_trie;
        }
        match (self.hosts.remove(key), in_trie) {
            (Ok(()), _) | (_, Ok(())) => Ok(()),
            (Err(MapError::KeyNotFound), Err(e)) | (Err(e), _) => Err(e),
        }
    }

    /// Every entry, as (prefix length, key, value).
    pub fn entries(&self) -> impl Iterator<Item = (u32, IpcacheKey, IpcacheValue)> + '_ {
        let hosts = self
            .hosts
            .iter()
            .flatten()
            .map(|(k, v)| (IPCACHE_HOST_PREFIX, k, v));
        hosts.chain(
            self.prefixes
                .iter()
                .flatten()
                .map(|(k, v)| (k.prefix_len(), k.data(), v)),
        )
    }
}

/// The allow entries, in two maps: those for one port (prefix [`PolicyKey::PREFIX_FULL`]) in a hash map,
/// found in one lookup whatever their number; wider ones (port ranges, any port, any protocol) in an LPM
/// trie, which the programs walk only for an endpoint that has such entries for the packet's direction
/// and protocol (the `ep_flags::NO_WIDE_*` flags of its entry say it has none). An exact entry is the
/// longest match there can be, so the split gives the answer one trie of all entries gave.
pub struct Policy {
    pub exact: HashMap<MapData, PolicyKey, PolicyValue>,
    pub prefixes: LpmTrie<MapData, PolicyKey, PolicyValue>,
}

impl Policy {
    pub fn insert(&mut self, prefix: u32, key: &PolicyKey, value: &PolicyValue) -> Result<(), MapError> {
        if prefix == PolicyKey::PREFIX_FULL {
            self.exact.insert(key, value, 0)
        } else {
            self.prefixes
                .insert(&aya::maps::lpm_trie::Key::new(prefix, *key), value, 0)
        }
    }

    /// Removes the entry; `KeyNotFound` when there is none. An exact entry is removed from the trie as
    /// well: an agent before the split kept every entry there.
    pub fn remove(&mut self, prefix: u32, key: &PolicyKey) -> Result<(), MapError> {
        let in_trie = self.prefixes.remove(&aya::maps::lpm_trie::Key::new(prefix, *key));
        if prefix != PolicyKey::PREFIX_FULL {
            return in_trie;
        }
        match (self.exact.remove(key), in_trie) {
            (Ok(()), _) | (_, Ok(())) => Ok(()),
            (Err(MapError::KeyNotFound), Err(e)) | (Err(e), _) => Err(e),
        }
    }

    /// Every entry, as (prefix length, key, value); an exact entry that an agent before the split left
    /// in the trie too is listed once.
    pub fn entries(&self) -> impl Iterator<Item = (u32, PolicyKey, PolicyValue)> + '_ {
        let exact = self
            .exact
            .iter()
            .flatten()
            .map(|(k, v)| (PolicyKey::PREFIX_FULL, k, v));
        let wide = self
            .prefixes
            .iter()
            .flatten()
            .map(|(k, v)| (k.prefix_len(), k.data(), v));
        exact.chain(
            wide.filter(|(prefix, k, _)| *prefix != PolicyKey::PREFIX_FULL || self.exact.get(k, 0).is_err()),
        )
    }

    /// The exact entries an agent before the split left in the trie, copied into the hash, where these
    /// programs look first. The trie keeps them until [`Policy::drop_legacy_exact`]: the programs still
    /// attached may be the earlier agent's, which look only there. Returns how many were copied.
    pub fn copy_legacy_exact(&mut self) -> Result<usize, MapError> {
        let legacy: Vec<(PolicyKey, PolicyValue)> = self
            .prefixes
            .iter()
            .flatten()
            .filter(|(k, _)| k.prefix_len() == PolicyKey::PREFIX_FULL)
            .map(|(k, v)| (k.data(), v))
            .collect();
        for (key, value) in &legacy {
            self.exact.insert(key, value, 0)?;
        }
        Ok(legacy.len())
    }

    /// Removes from the trie the exact entries an earlier agent left there (once this agent's programs
    /// are attached: they find them in the hash). Returns how many were removed.
    pub fn drop_legacy_exact(&mut self) -> Result<usize, MapError> {
        let legacy: Vec<PolicyKey> = self
            .prefixes
            .keys()
            .flatten()
            .filter(|k| k.prefix_len() == PolicyKey::PREFIX_FULL)
            .map(|k| k.data())
            .collect();
        for key in &legacy {
            ignore_not_found(
                self.prefixes
                    .remove(&aya::maps::lpm_trie::Key::new(PolicyKey::PREFIX_FULL, *key)),
            )?;
        }
        Ok(legacy.len())
    }
}

fn ignore_not_found(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// The maps of a running (or exited) agent, opened from their pins to be read (`status`): through the
/// wrappers the agent writes with, so that entries are counted as it counts them, with the capacities
/// the maps were pinned with (which may not be the defaults: `--max-*`, or an earlier agent's).
pub struct PinnedMaps {
    pub endpoints: HashMap<MapData, u32, EndpointInfo>,
    /// `None` under pins of an agent from before the counter slots (every packet in the hash then).
    slot_counters: Option<PerCpuArray<MapData, SlotCounters>>,
    ipcache: Split<Ipcache, IpcacheKey, IpcacheValue>,
    policy: Split<Policy, PolicyKey, PolicyValue>,
    pub counters: PerCpuHashMap<MapData, CounterKey, CounterValue>,
    pub stats: PerCpuArray<MapData, u64>,
    pub capacities: Capacities,
}

/// A map split into a hash and a trie, or only the trie under pins of an agent from before the split
/// (every entry in the trie then).
enum Split<W, K, V> {
    Both(W),
    TrieOnly(LpmTrie<MapData, K, V>),
}

impl PinnedMaps {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let pinned = |name: &str| pin_dir.join("maps").join(name).exists();
        let required = |name: &'static str| -> Result<u32> {
            let path = pin_dir.join("maps").join(name);
            let info = aya::maps::MapInfo::from_pin(&path).map_err(|source| Error::Map { name, source })?;
            Ok(info.max_entries())
        };
        let max_entries = |name: &'static str| -> Result<Option<u32>> {
            if pinned(name) {
                required(name).map(Some)
            } else {
                Ok(None)
            }
        };
        // The two halves of the ipcache and of the policy share a capacity: the smaller pinned one.
        let half = |trie: &'static str, hash: &'static str| -> Result<u32> {
            let t = required(trie)?;
            Ok(max_entries(hash)?.map_or(t, |h| h.min(t)))
        };
        let capacities = Capacities {
            endpoints: required(names::ENDPOINTS)?,
            ipcache: half(names::IPCACHE, names::IPCACHE_HOSTS)?,
            policy: half(names::POLICY, names::POLICY_EXACT)?,
            conntrack: required(names::CONNTRACK)?,
        };
        let ipcache = if pinned(names::IPCACHE_HOSTS) {
            Split::Both(Ipcache {
                hosts: open_pinned(pin_dir, names::IPCACHE_HOSTS)?,
                prefixes: open_pinned(pin_dir, names::IPCACHE)?,
            })
        } else {
            Split::TrieOnly(open_pinned(pin_dir, names::IPCACHE)?)
        };
        let policy = if pinned(names::POLICY_EXACT) {
            Split::Both(Policy {
                exact: open_pinned(pin_dir, names::POLICY_EXACT)?,
                prefixes: open_pinned(pin_dir, names::POLICY)?,
            })
        } else {
            Split::TrieOnly(open_pinned(pin_dir, names::POLICY)?)
        };
        Ok(Self {
            endpoints: open_pinned(pin_dir, names::ENDPOINTS)?,
            slot_counters: if pinned(names::SLOT_COUNTERS) {
                Some(open_pinned(pin_dir, names::SLOT_COUNTERS)?)
            } else {
                None
            },
            ipcache,
            policy,
            counters: open_pinned(pin_dir, names::COUNTERS)?,
            stats: open_pinned(pin_dir, names::STATS)?,
            capacities,
        })
    }

    /// The ipcache's entries, counted as the agent counts them ([`Ipcache::entries`]).
    pub fn ipcache_entries(&self) -> usize {
        match &self.ipcache {
            Split::Both(i) => i.entries().count(),
            Split::TrieOnly(t) => t.keys().count(),
        }
    }

    /// The allow entries, counted as the agent counts them ([`Policy::entries`]: an exact entry an
    /// agent before the split left in the trie too is one).
    pub fn policy_entries(&self) -> usize {
        match &self.policy {
            Split::Both(p) => p.entries().count(),
            Split::TrieOnly(t) => t.keys().count(),
        }
    }

    /// Every packet counter, slots and hash summed over the CPUs ([`super::counters`]).
    pub fn counter_totals(&self) -> Result<super::CounterTotals, MapError> {
        super::counters::read(&self.endpoints, self.slot_counters.as_ref(), &self.counters)
            .map(|r| super::counters::sum(&r))
    }

    /// A [`ztrust_common::stat`] counter, summed over the CPUs.
    pub fn stat(&self, index: u32) -> u64 {
        self.stats.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}
