//! The datapath's packet counters as user space reads them: every packet a classifier judges is counted
//! once, by interface, direction, verdict and reason — in its endpoint's slot
//! ([`names::SLOT_COUNTERS`]) when it is part of an established stream, else in the hash
//! ([`names::COUNTERS`]). The two add up; [`read`] reads both, summed over the CPUs. `status` reads
//! them through [`PinnedMaps`]; the agent's `/metrics` through [`CounterMaps`], its own descriptors
//! of the same pins.

use super::*;

/// What one counter counts: packets of this interface, direction, verdict and reason (kernel codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Counted {
    pub ifindex: u32,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
}

/// Every counter with packets, summed over the CPUs.
pub type CounterTotals = BTreeMap<Counted, CounterValue>;

/// Where a counter is kept: an endpoint's slot (by its index) or the hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    Slot(u32),
    Hash,
}

/// Every counter with packets, each where it is kept, summed over the CPUs: what a reader measures
/// increases against (a slot handed out again, or a hash entry deleted and made again, starts anew).
pub type CounterReading = BTreeMap<(Origin, Counted), CounterValue>;

/// Adds `v` to `total`.
pub fn add_counts(total: &mut CounterValue, v: &CounterValue) {
    total.packets += v.packets;
    total.bytes += v.bytes;
}

/// [`CounterReading`] summed by what is counted, wherever it is kept.
pub fn sum(reading: &CounterReading) -> CounterTotals {
    let mut out = CounterTotals::new();
    for ((_, key), v) in reading {
        add_counts(out.entry(*key).or_default(), v);
    }
    out
}

/// The counters of the endpoints' slots and of the hash, summed over the CPUs. An endpoint without a
/// slot (or pins from before the slots: `slots` is `None`) has all its packets in the hash. A key the
/// kernel's iteration visits twice (it starts again when the entry it stood on is deleted meanwhile)
/// is read twice, not counted twice.
pub(super) fn read(
    endpoints: &HashMap<MapData, u32, EndpointInfo>,
    slots: Option<&PerCpuArray<MapData, SlotCounters>>,
    counters: &PerCpuHashMap<MapData, CounterKey, CounterValue>,
) -> Result<CounterReading, MapError> {
    let mut out = CounterReading::new();
    if let Some(slots) = slots {
        for entry in endpoints.iter() {
            let (ifindex, info) = entry?;
            if info.slot == NO_SLOT {
                continue;
            }
            let sum = SlotCounters::total(slots.get(&info.slot, 0)?.iter());
            for ((direction, verdict, reason), v) in sum.entries() {
                if v.packets > 0 {
                    let key = Counted {
                        ifindex,
                        direction,
                        verdict,
                        reason,
                    };
                    out.insert((Origin::Slot(info.slot), key), v);
                }
            }
        }
    }
    for entry in counters.iter() {
        let (key, per_cpu) = entry?;
        let mut total = CounterValue::default();
        for v in per_cpu.iter() {
            add_counts(&mut total, v);
        }
        out.insert((Origin::Hash, Counted::of(&key)), total);
    }
    Ok(out)
}

impl Counted {
    pub fn of(key: &CounterKey) -> Self {
        Self {
            ifindex: key.ifindex,
            direction: key.direction,
            verdict: key.verdict,
            reason: key.reason,
        }
    }

    pub fn key(&self) -> CounterKey {
        CounterKey {
            ifindex: self.ifindex,
            direction: self.direction,
            verdict: self.verdict,
            reason: self.reason,
            _pad: 0,
        }
    }
}

/// The packet counters of a running agent's pins, opened on their own descriptors (the reconcile loop
/// keeps its [`Maps`]): read at every scrape of `/metrics`, and emptied of an interface's entries once
/// their interface is gone ([`CounterMaps::forget`]).
pub struct CounterMaps {
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    slots: Option<PerCpuArray<MapData, SlotCounters>>,
    counters: PerCpuHashMap<MapData, CounterKey, CounterValue>,
}

impl CounterMaps {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let slots = if pin_dir.join("maps").join(names::SLOT_COUNTERS).exists() {
            Some(open_pinned(pin_dir, names::SLOT_COUNTERS)?)
        } else {
            None
        };
        Ok(Self {
            endpoints: open_pinned(pin_dir, names::ENDPOINTS)?,
            slots,
            counters: open_pinned(pin_dir, names::COUNTERS)?,
        })
    }

    pub fn read(&self) -> Result<CounterReading, MapError> {
        read(&self.endpoints, self.slots.as_ref(), &self.counters)
    }

    /// Deletes these counters from the hash (those of interfaces that are gone); how many went. A
    /// packet counted between the last read and the delete is not counted anywhere.
    pub fn forget(&mut self, keys: &[Counted]) -> Result<usize, MapError> {
        let mut gone = 0;
        for k in keys {
            match self.counters.remove(&k.key()) {
                Ok(()) => gone += 1,
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(gone)
    }
}
