//! The observer hub: the last N flows in memory, and fan-out of new flows (and alerts) to subscribers.
//!
//! Publishing is called for every flow by the task that reads the kernel ring buffer, so it must never
//! wait: it takes one short mutex, pushes into the ring (overwriting the oldest flow when full, as
//! Hubble's ring does) and `try_send`s an `Arc` into each subscriber's bounded queue. A subscriber whose
//! queue is full loses that flow; the loss is counted per subscriber and handed to it as a
//! `LostEvents { SLOW_CLIENT }` record the next time it reads, so neither the publisher nor any other
//! client is slowed down by one slow reader.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;

use crate::flows::Flow;
use crate::observer::convert;
use crate::observer::proto::{Alert, LostEventSource};

/// A flow as the hub keeps it: the record, its time parsed once, and its sequence number.
#[derive(Debug)]
pub struct Observed {
    pub seq: u64,
    pub time: SystemTime,
    pub flow: Flow,
}

/// What a subscriber reads.
#[derive(Debug)]
pub enum Item<T> {
    Value(Arc<T>),
    Lost(LostEventSource, u64),
}

struct Subscriber<T> {
    tx: mpsc::Sender<Item<T>>,
    lost: Arc<AtomicU64>,
}

struct State<T> {
    ring: VecDeque<Arc<T>>,
    subscribers: Vec<Subscriber<T>>,
}

/// A ring of the last `capacity` values and a set of subscribers with bounded queues.
pub struct Fanout<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    queue: usize,
    published: AtomicU64,
    overwritten: AtomicU64,
    lost_slow: AtomicU64,
}

/// A subscriber's end. Dropping it unsubscribes (the publisher forgets it at the next publish).
pub struct Subscription<T> {
    rx: mpsc::Receiver<Item<T>>,
    lost: Arc<AtomicU64>,
}

impl<T> Subscription<T> {
    /// The next value, or the number of values this subscriber lost since it last read, as soon as it
    /// is known. `None` when the hub is gone.
    pub async fn next(&mut self) -> Option<Item<T>> {
        let lost = self.lost.swap(0, Ordering::Relaxed);
        if lost > 0 {
            return Some(Item::Lost(LostEventSource::SlowClient, lost));
        }
        self.rx.recv().await
    }

    /// Non-blocking [`Self::next`], for tests and draining.
    pub fn try_next(&mut self) -> Option<Item<T>> {
        let lost = self.lost.swap(0, Ordering::Relaxed);
        if lost > 0 {
            return Some(Item::Lost(LostEventSource::SlowClient, lost));
        }
        self.rx.try_recv().ok()
    }
}

/// What a subscriber got at the moment it subscribed.
pub struct Snapshot<T> {
    /// The ring, oldest first.
    pub kept: Vec<Arc<T>>,
    /// Values overwritten in the ring before this moment (since start).
    pub overwritten: u64,
    pub subscription: Option<Subscription<T>>,
}

impl<T: Send + Sync + 'static> Fanout<T> {
    pub fn new(capacity: usize, queue: usize) -> Self {
        Self {
            state: Mutex::new(State {
                ring: VecDeque::with_capacity(capacity.min(1 << 16)),
                subscribers: Vec::new(),
            }),
            capacity: capacity.max(1),
            queue: queue.max(1),
            published: AtomicU64::new(0),
            overwritten: AtomicU64::new(0),
            lost_slow: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // A panic while holding the lock leaves a consistent ring (every step is a single push/pop).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn publish(&self, value: Arc<T>) {
        let mut st = self.lock();
        if st.ring.len() >= self.capacity {
            st.ring.pop_front();
            self.overwritten.fetch_add(1, Ordering::Relaxed);
        }
        st.ring.push_back(value.clone());
        self.published.fetch_add(1, Ordering::Relaxed);
        self.fan_out(&mut st, true, || Item::Value(value.clone()));
    }

    /// Tells every subscriber that `n` values were lost before reaching the hub.
    pub fn publish_lost(&self, source: LostEventSource, n: u64) {
        let mut st = self.lock();
        // A subscriber too slow to take this record misses it; it is not counted as a lost value.
        self.fan_out(&mut st, false, || Item::Lost(source, n));
    }

    fn fan_out(&self, st: &mut State<T>, count_loss: bool, item: impl Fn() -> Item<T>) {
        st.subscribers.retain(|s| match s.tx.try_send(item()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) if !count_loss => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                s.lost.fetch_add(1, Ordering::Relaxed);
                self.lost_slow.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    /// The ring as it is now and, with `follow`, a subscription to every value published after it
    /// (taken under the same lock: nothing is missed or seen twice between the two).
    pub fn subscribe(&self, follow: bool) -> Snapshot<T> {
        let mut st = self.lock();
        let subscription = follow.then(|| {
            let (tx, rx) = mpsc::channel(self.queue);
            let lost = Arc::new(AtomicU64::new(0));
            st.subscribers.push(Subscriber { tx, lost: lost.clone() });
            Subscription { rx, lost }
        });
        Snapshot {
            kept: st.ring.iter().cloned().collect(),
            overwritten: self.overwritten.load(Ordering::Relaxed),
            subscription,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    pub fn overwritten(&self) -> u64 {
        self.overwritten.load(Ordering::Relaxed)
    }

    /// Values not delivered to slow subscribers, summed over all of them.
    pub fn lost_slow(&self) -> u64 {
        self.lost_slow.load(Ordering::Relaxed)
    }

    pub fn subscribers(&self) -> usize {
        let mut st = self.lock();
        st.subscribers.retain(|s| !s.tx.is_closed());
        st.subscribers.len()
    }
}

#[derive(Clone, Debug)]
pub struct HubOptions {
    pub node: String,
    /// Flows kept in memory (`--flow-buffer`).
    pub flow_buffer: usize,
    /// Per-client queue of flows not yet sent (`--client-queue`).
    pub client_queue: usize,
    /// Alerts kept in memory.
    pub alert_buffer: usize,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self { node: "local".into(), flow_buffer: 65_536, client_queue: 4_096, alert_buffer: 1_024 }
    }
}

/// Flows and alerts of this node, and the observer's own counters.
pub struct Hub {
    pub node: String,
    pub flows: Fanout<Observed>,
    pub alerts: Fanout<Alert>,
    started: Instant,
    seq: AtomicU64,
    kernel_lost: AtomicU64,
    endpoints: AtomicU64,
    /// (`namespace/name`, reason) of this node's pods the datapath does not enforce.
    not_enforced: std::sync::Mutex<Vec<(String, String)>>,
}

/// The observer's counters (`ServerStatus`, metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubStatus {
    pub seen_flows: u64,
    pub num_flows: u64,
    pub max_flows: u64,
    pub uptime_ns: u64,
    pub endpoints_enforced: u64,
    pub lost_kernel_ring_buffer: u64,
    pub ring_overwritten: u64,
    pub lost_slow_clients: u64,
    pub subscribers: u64,
    pub alerts_raised: u64,
}

impl Hub {
    pub fn new(opts: HubOptions) -> Self {
        Self {
            node: opts.node,
            flows: Fanout::new(opts.flow_buffer, opts.client_queue),
            alerts: Fanout::new(opts.alert_buffer, opts.client_queue.min(1_024)),
            started: Instant::now(),
            seq: AtomicU64::new(0),
            kernel_lost: AtomicU64::new(0),
            endpoints: AtomicU64::new(0),
            not_enforced: std::sync::Mutex::default(),
        }
    }

    /// Keeps and fans out one flow. Cheap: never waits for a subscriber.
    pub fn publish(&self, flow: Flow) {
        let time = convert::flow_time(&flow);
        self.publish_at(flow, time);
    }

    pub fn publish_at(&self, flow: Flow, time: SystemTime) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.flows.publish(Arc::new(Observed { seq, time, flow }));
    }

    pub fn publish_alert(&self, alert: Alert) {
        self.alerts.publish(Arc::new(alert));
    }

    /// The kernel's events-lost counter (sum over CPUs) as last read. An increase is told to every
    /// follower as `LostEvents { KERNEL_RING_BUFFER }`. A counter that went down (datapath re-created)
    /// starts a new baseline.
    pub fn set_kernel_lost(&self, total: u64) {
        let before = self.kernel_lost.swap(total, Ordering::Relaxed);
        if total > before {
            self.flows.publish_lost(LostEventSource::KernelRingBuffer, total - before);
        }
    }

    pub fn set_endpoints(&self, n: u64) {
        self.endpoints.store(n, Ordering::Relaxed);
    }

    /// This node's pods the datapath does not enforce, as (`namespace/name`, reason).
    pub fn set_not_enforced(&self, pods: Vec<(String, String)>) {
        *self.not_enforced.lock().unwrap_or_else(|e| e.into_inner()) = pods;
    }

    pub fn not_enforced(&self) -> Vec<(String, String)> {
        self.not_enforced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn status(&self) -> HubStatus {
        HubStatus {
            seen_flows: self.flows.published(),
            num_flows: self.flows.len() as u64,
            max_flows: self.flows.capacity() as u64,
            uptime_ns: self.started.elapsed().as_nanos() as u64,
            endpoints_enforced: self.endpoints.load(Ordering::Relaxed),
            lost_kernel_ring_buffer: self.kernel_lost.load(Ordering::Relaxed),
            ring_overwritten: self.flows.overwritten(),
            lost_slow_clients: self.flows.lost_slow() + self.alerts.lost_slow(),
            subscribers: (self.flows.subscribers() + self.alerts.subscribers()) as u64,
            alerts_raised: self.alerts.published(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(s: &Snapshot<u32>) -> Vec<u32> {
        s.kept.iter().map(|v| **v).collect()
    }

    #[test]
    fn ring_keeps_the_last_n_and_counts_overwrites() {
        let f = Fanout::new(3, 8);
        for i in 0..5u32 {
            f.publish(Arc::new(i));
        }
        let s = f.subscribe(false);
        assert_eq!(values(&s), [2, 3, 4]);
        assert_eq!(s.overwritten, 2);
        assert_eq!((f.published(), f.len(), f.capacity()), (5, 3, 3));
        assert!(s.subscription.is_none());
    }

    #[test]
    fn followers_get_what_comes_after_the_snapshot_exactly_once() {
        let f = Fanout::new(10, 8);
        f.publish(Arc::new(1u32));
        let mut s = f.subscribe(true);
        f.publish(Arc::new(2));
        assert_eq!(values(&s), [1]);
        let sub = s.subscription.as_mut().unwrap();
        assert!(matches!(sub.try_next(), Some(Item::Value(v)) if *v == 2));
        assert!(sub.try_next().is_none());
    }

    #[test]
    fn a_slow_subscriber_loses_and_is_told_how_many_without_hurting_others() {
        let f = Fanout::new(100, 4);
        let mut slow = f.subscribe(true).subscription.unwrap();
        let mut fast = f.subscribe(true).subscription.unwrap();
        for i in 0..10u32 {
            f.publish(Arc::new(i));
            // The fast one keeps up.
            assert!(matches!(fast.try_next(), Some(Item::Value(v)) if *v == i));
        }
        // The slow one got the first 4 (its queue), lost 6, and hears of the loss first.
        let mut got = Vec::new();
        while let Some(item) = slow.try_next() {
            got.push(match item {
                Item::Value(v) => format!("{v}"),
                Item::Lost(src, n) => format!("lost {} {n}", src.as_str_name()),
            });
        }
        assert_eq!(got, ["lost SLOW_CLIENT 6", "0", "1", "2", "3"]);
        assert_eq!(f.lost_slow(), 6);
        // After catching up it gets new values again.
        f.publish(Arc::new(10));
        assert!(matches!(slow.try_next(), Some(Item::Value(v)) if *v == 10));
    }

    #[test]
    fn dropped_subscriptions_are_forgotten() {
        let f = Fanout::new(10, 4);
        let s = f.subscribe(true);
        assert_eq!(f.subscribers(), 1);
        drop(s);
        f.publish(Arc::new(1u32));
        assert_eq!(f.subscribers(), 0);
    }

    #[test]
    fn kernel_losses_reach_followers_as_increases() {
        let hub = Hub::new(HubOptions { flow_buffer: 8, ..Default::default() });
        let mut sub = hub.flows.subscribe(true).subscription.unwrap();
        hub.set_kernel_lost(0);
        hub.set_kernel_lost(5);
        hub.set_kernel_lost(5);
        hub.set_kernel_lost(7);
        assert!(matches!(sub.try_next(), Some(Item::Lost(LostEventSource::KernelRingBuffer, 5))));
        assert!(matches!(sub.try_next(), Some(Item::Lost(LostEventSource::KernelRingBuffer, 2))));
        assert!(sub.try_next().is_none());
        assert_eq!(hub.status().lost_kernel_ring_buffer, 7);
    }

    #[test]
    fn hub_status_counts() {
        let hub = Hub::new(HubOptions { flow_buffer: 2, client_queue: 1, ..Default::default() });
        let _sub = hub.flows.subscribe(true);
        for _ in 0..3 {
            hub.publish(crate::observer::filters::testing::denied());
        }
        let st = hub.status();
        assert_eq!((st.seen_flows, st.num_flows, st.max_flows, st.ring_overwritten), (3, 2, 2, 1));
        assert_eq!(st.lost_slow_clients, 2);
        assert_eq!(st.subscribers, 1);
    }
}
