//! Every map of the datapath. All are pinned by name so that a restarted agent adopts them and the kernel
//! keeps enforcing with the last state while no agent runs.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use ztrust_common::{
    Config, CounterKey, CounterValue, CtKey, CtValue, EndpointInfo, EventWindow, IpcacheKey, IpcacheValue,
    PolicyKey, PolicyValue, ServiceKey, ServiceValue, SlotCounters, capacity,
};

/// Host-side interface index → endpoint. An interface that carries the programs but has no entry here
/// drops everything (the pod is not yet known: fail closed).
#[map(name = "ZT_ENDPOINTS")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// Single address → identity (pods, the node, /32 and /128 ipBlocks): one hash lookup, whatever the
/// number of pods. Allocated as entries come (the agent sizes it like the trie).
#[map(name = "ZT_IPCACHE_HOSTS")]
pub static IPCACHE_HOSTS: HashMap<IpcacheKey, IpcacheValue> =
    HashMap::pinned(capacity::IPCACHE, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Address prefix → identity for prefixes shorter than one address (ipBlock CIDRs), looked up when the
/// address is not in [`IPCACHE_HOSTS`] (a single address is always the longest matching prefix).
#[map(name = "ZT_IPCACHE")]
pub static IPCACHE: LpmTrie<IpcacheKey, IpcacheValue> = LpmTrie::pinned(capacity::IPCACHE, 0);

/// Allow entries for one port: (endpoint, remote identity, direction, protocol, port) → rule. One hash
/// lookup, whatever the number of entries. Allocated as entries come.
#[map(name = "ZT_POLICY_EXACT")]
pub static POLICY_EXACT: HashMap<PolicyKey, PolicyValue> =
    HashMap::pinned(capacity::POLICY, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Allow entries wider than one port: (endpoint, remote identity, direction, protocol, port prefix) →
/// rule. Walked only for an endpoint that has such entries for the packet's direction and protocol
/// (`ep_flags::NO_WIDE_*`).
#[map(name = "ZT_POLICY")]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(capacity::POLICY, 0);

/// Connections admitted at an endpoint and direction. LRU: when full, the least recently used entry goes;
/// a connection that loses its entry is re-judged by policy, never admitted for free.
#[map(name = "ZT_CONNTRACK")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(capacity::CONNTRACK, 0);

#[map(name = "ZT_COUNTERS")]
pub static COUNTERS: PerCpuHashMap<CounterKey, CounterValue> = PerCpuHashMap::pinned(capacity::COUNTERS, 0);

/// Endpoint slot ([`EndpointInfo::slot`]) → the counters of its established connections' packets:
/// an index, not a hash lookup, for the packets a stream is made of. Entry 0 is never handed out. Sized
/// by the agent (one entry more than the endpoint map).
#[map(name = "ZT_SLOT_COUNTERS")]
pub static SLOT_COUNTERS: PerCpuArray<SlotCounters> = PerCpuArray::pinned(capacity::ENDPOINTS + 1, 0);

#[map(name = "ZT_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);

/// Last time (ns) an event was emitted for a flow, to rate-limit events per flow.
#[map(name = "ZT_EVENT_RATE")]
pub static EVENT_RATE: LruHashMap<CtKey, u64> = LruHashMap::pinned(capacity::EVENT_RATE, 0);

/// Service frontend → the classes of its backends (identity, translated port): a pod's new connection to
/// a Service is judged by the pods it can reach, not by the Service's address. Allocated as entries come.
#[map(name = "ZT_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(capacity::SERVICES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// The Service address ranges: an address in them that is not in [`SERVICES`] has no known translation.
#[map(name = "ZT_SERVICE_RANGES")]
pub static SERVICE_RANGES: LpmTrie<IpcacheKey, u32> = LpmTrie::pinned(capacity::SERVICE_RANGES, 0);

/// The node's `local` routes, mirrored by the agent: where a node port is the Service's with node ports
/// on every local address.
#[map(name = "ZT_NODE_LOCAL")]
pub static NODE_LOCAL: LpmTrie<IpcacheKey, u32> = LpmTrie::pinned(capacity::NODE_LOCAL, 0);

/// Interface → the events it sent in the current one-second window ([`Config::event_budget`]).
#[map(name = "ZT_EVENT_BUDGET")]
pub static EVENT_BUDGET: LruHashMap<u32, EventWindow> = LruHashMap::pinned(capacity::ENDPOINTS, 0);

#[map(name = "ZT_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(ztrust_common::stat::COUNT, 0);

#[map(name = "ZT_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Policy revision: bumped by the agent after any update that may have narrowed what is allowed, so that
/// connectionless flows admitted earlier are judged again (TCP connections keep their admission).
#[map(name = "ZT_REVISION")]
pub static REVISION: Array<u32> = Array::pinned(1, 0);
