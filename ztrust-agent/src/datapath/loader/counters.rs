//! The datapath's packet counters as user space reads them: every packet a classifier judges is counted
//! once, by interface, direction, verdict and reason — in its endpoint's slot
//! ([`names::SLOT_COUNTERS`]) when it is part of an established stream, else in the hash
//! ([`names::COUNTERS`]). The two add up; [`totals`] sums them over the CPUs. `status` reads them
//! through [`PinnedMaps`]; the agent's `/metrics` through [`CounterMaps`], its own descriptors of the
//! same pins.

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

/// Adds `v` to `total`.
pub fn add_counts(total: &mut CounterValue, v: &CounterValue) {
    total.packets += v.packets;
    total.bytes += v.bytes;
}

/// The counters of the endpoints' slots and of the hash, summed over the CPUs. An endpoint without a
/// slot (or pins from before the slots: `slots` is `None`) has all its packets in the hash.
pub(super) fn totals(
    endpoints: &HashMap<MapData, u32, EndpointInfo>,
    slots: Option<&PerCpuArray<MapData, SlotCounters>>,
    counters: &PerCpuHashMap<MapData, CounterKey, CounterValue>,
) -> Result<CounterTotals, MapError> {
    let mut out = CounterTotals::new();
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
                    add_counts(out.entry(key).or_default(), &v);
                }
            }
        }
    }
    for entry in counters.iter() {
        let (key, per_cpu) = entry?;
        let key = Counted {
            ifindex: key.ifindex,
            direction: key.direction,
            verdict: key.verdict,
            reason: key.reason,
        };
        let total = out.entry(key).or_default();
        for v in per_cpu.iter() {
            add_counts(total, v);
        }
    }
    Ok(out)
}

/// The packet counters of a running agent's pins, opened on their own descriptors (the reconcile loop
/// keeps its [`Maps`]): read at every scrape of `/metrics`, and emptied of an interface's entries once
/// its counts have been handed on ([`CounterMaps::forget`]).
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

    pub fn totals(&self) -> Result<CounterTotals, MapError> {
        totals(&self.endpoints, self.slots.as_ref(), &self.counters)
    }

    /// Deletes the hash's counters of the interface (the slot of an endpoint goes with its entry, and is
    /// zeroed before it is handed out again); how many went. A packet counted between the last read and
    /// the delete is not counted anywhere.
    pub fn forget(&mut self, ifindex: u32) -> Result<usize, MapError> {
        let keys: Vec<CounterKey> = self
            .counters
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.ifindex == ifindex)
            .collect();
        let mut gone = 0;
        for k in &keys {
            match self.counters.remove(k) {
                Ok(()) => gone += 1,
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(gone)
    }
}
