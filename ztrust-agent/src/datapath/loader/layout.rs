//! The pinned maps' layouts: what an earlier agent pinned is checked against this agent's types before
//! the programs load, and the map sizes ([`Capacities`]) it plans with.

use std::path::Path;

use tracing::warn;

use ztrust_common::{
    Config, CounterKey, CounterValue, CtKey, CtValue, EndpointInfo, EventWindow, IpcacheKey, IpcacheValue,
    PolicyKey, PolicyValue, ServiceKey, ServiceValue, SlotCounters, capacity, names,
};

use super::{Error, Result};

/// Key and value sizes of the pinned maps whose entries the agent and the programs read and write
/// field by field; the capacity a map gets from [`Capacities`], if any.
fn pinned_layouts(caps: &Capacities) -> [(&'static str, usize, usize, Option<u32>); 16] {
    use std::mem::size_of;
    [
        (
            names::ENDPOINTS,
            size_of::<u32>(),
            size_of::<EndpointInfo>(),
            Some(caps.endpoints),
        ),
        (
            names::IPCACHE,
            4 + size_of::<IpcacheKey>(),
            size_of::<IpcacheValue>(),
            Some(caps.ipcache),
        ),
        (
            names::IPCACHE_HOSTS,
            size_of::<IpcacheKey>(),
            size_of::<IpcacheValue>(),
            Some(caps.ipcache),
        ),
        (
            names::POLICY,
            4 + size_of::<PolicyKey>(),
            size_of::<PolicyValue>(),
            Some(caps.policy),
        ),
        (
            names::POLICY_EXACT,
            size_of::<PolicyKey>(),
            size_of::<PolicyValue>(),
            Some(caps.policy),
        ),
        (
            names::CONNTRACK,
            size_of::<CtKey>(),
            size_of::<CtValue>(),
            Some(caps.conntrack),
        ),
        (
            names::COUNTERS,
            size_of::<CounterKey>(),
            size_of::<CounterValue>(),
            None,
        ),
        // Sized after the endpoint map's pinned capacity (the loader asks for that + 1).
        (
            names::SLOT_COUNTERS,
            size_of::<u32>(),
            size_of::<SlotCounters>(),
            None,
        ),
        (names::EVENT_RATE, size_of::<CtKey>(), size_of::<u64>(), None),
        (
            names::EVENT_BUDGET,
            size_of::<u32>(),
            size_of::<EventWindow>(),
            None,
        ),
        (
            names::SERVICES,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
            None,
        ),
        (
            names::SERVICE_RANGES,
            4 + size_of::<IpcacheKey>(),
            size_of::<u32>(),
            None,
        ),
        (
            names::NODE_LOCAL,
            4 + size_of::<IpcacheKey>(),
            size_of::<u32>(),
            None,
        ),
        (names::STATS, size_of::<u32>(), size_of::<u64>(), None),
        (names::CONFIG, size_of::<u32>(), size_of::<Config>(), None),
        (names::REVISION, size_of::<u32>(), size_of::<u32>(), None),
    ]
}

/// Maps pinned by an earlier agent are adopted as they are (that is what keeps enforcement going across
/// restarts). Before loading: a map whose key or value size differs from this agent's cannot be used by
/// its programs, which is said plainly here rather than as a verifier error; a map pinned with another
/// capacity than asked for keeps its own (a pinned map cannot be resized), and the agent plans with it.
pub(super) fn check_pinned(pin_dir: &Path, mut caps: Capacities) -> Result<Capacities> {
    let mut ipcache: Option<u32> = None;
    let mut policy: Option<u32> = None;
    for (name, key_size, value_size, capacity) in pinned_layouts(&caps) {
        let path = pin_dir.join("maps").join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|source| Error::Map { name, source })?;
        let layout = |what, pinned: u32, wanted: usize| Error::PinnedLayout {
            name,
            path: path.clone(),
            what,
            pinned,
            wanted: wanted as u32,
            pin_dir: pin_dir.to_owned(),
        };
        if info.key_size() as usize != key_size {
            return Err(layout("keys", info.key_size(), key_size));
        }
        if info.value_size() as usize != value_size {
            return Err(layout("values", info.value_size(), value_size));
        }
        let pinned = info.max_entries();
        if name == names::IPCACHE || name == names::IPCACHE_HOSTS {
            // The two halves of the ipcache share one capacity: the smaller pinned one.
            ipcache = Some(ipcache.map_or(pinned, |c: u32| c.min(pinned)));
        }
        if name == names::POLICY || name == names::POLICY_EXACT {
            // So do the two halves of the policy.
            policy = Some(policy.map_or(pinned, |c: u32| c.min(pinned)));
        }
        if let Some(wanted) = capacity
            && pinned != wanted
        {
            warn!(
                map = name,
                pinned,
                requested = wanted,
                "the pinned map keeps its capacity (remove the pins to resize it); planning with the pinned one"
            );
            match name {
                n if n == names::ENDPOINTS => caps.endpoints = pinned,
                n if n == names::CONNTRACK => caps.conntrack = pinned,
                _ => {}
            }
        }
    }
    if let Some(pinned) = ipcache {
        caps.ipcache = pinned;
    }
    if let Some(pinned) = policy {
        caps.policy = pinned;
    }
    Ok(caps)
}

/// Map sizes, when the defaults ([`ztrust_common::capacity`]) do not fit the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub endpoints: u32,
    pub ipcache: u32,
    pub policy: u32,
    pub conntrack: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            endpoints: capacity::ENDPOINTS,
            ipcache: capacity::IPCACHE,
            policy: capacity::POLICY,
            conntrack: capacity::CONNTRACK,
        }
    }
}
