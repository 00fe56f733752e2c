//! The observer hub: the last N flows in memory, and fan-out of new flows (and alerts) to subscribers.
//!
//! Publishing is called by the task that reads the kernel ring buffer, once per batch of flows (all the
//! events one wake-up found), so it must never wait and must cost little per flow: it takes the ring's
//! mutex once, pushes the batch into the ring (overwriting the oldest flows when full, as Hubble's ring
//! does), and appends the batch to each subscriber's bounded queue under that queue's lock, with one
//! wake-up per subscriber and batch. A subscriber whose queue is full loses what does not fit; the loss
//! is counted per subscriber and handed to it as a `LostEvents { SLOW_CLIENT }` record the next time it
//! reads, so neither the publisher nor any other client is slowed down by one slow reader.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime};

use tokio::sync::Notify;

use crate::flows::Flow;
use crate::observer::proto::{Alert, LostEventSource};

pub use crate::flows::Observed;

/// What a subscriber reads.
#[derive(Debug)]
pub enum Item<T> {
    Value(Arc<T>),
    Lost(LostEventSource, u64),
}

/// One subscriber's bounded queue. `pending` counts the values published to it and not yet returned by
/// [`Subscription::next`] (also those already moved to the subscriber's side), so the bound holds
/// however the subscriber takes them.
struct Queue<T> {
    items: Mutex<VecDeque<Item<T>>>,
    pending: AtomicUsize,
    notify: Notify,
    lost: AtomicU64,
    /// The hub is gone: nothing more will come.
    closed: AtomicBool,
}

impl<T> Queue<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Item<T>>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct State<T> {
    ring: VecDeque<Arc<T>>,
    /// Weak: a dropped [`Subscription`] is forgotten at the next publish.
    subscribers: Vec<Weak<Queue<T>>>,
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

/// A subscriber's end. Dropping it unsubscribes. It takes everything queued at once and hands it out
/// one by one, so a fast reader locks the queue once per batch, not once per value.
pub struct Subscription<T> {
    queue: Arc<Queue<T>>,
    taken: VecDeque<Item<T>>,
}

impl<T> Subscription<T> {
    /// The next value, or the number of values this subscriber lost since it last read, as soon as it
    /// is known. `None` when the hub is gone.
    pub async fn next(&mut self) -> Option<Item<T>> {
        loop {
            if let Some(item) = self.try_next() {
                return Some(item);
            }
            if self.queue.closed.load(Ordering::Acquire) {
                // Whatever was published before the hub went away has been taken above.
                return self.try_next();
            }
            // `notify_one` stores a permit when nobody waits: a batch published between the check
            // above and this await is not missed.
            self.queue.notify.notified().await;
        }
    }

    /// Non-blocking [`Self::next`], for tests and draining.
    pub fn try_next(&mut self) -> Option<Item<T>> {
        let lost = self.queue.lost.swap(0, Ordering::Relaxed);
        if lost > 0 {
            return Some(Item::Lost(LostEventSource::SlowClient, lost));
        }
        if self.taken.is_empty() {
            std::mem::swap(&mut self.taken, &mut *self.queue.lock());
        }
        let item = self.taken.pop_front()?;
        if matches!(item, Item::Value(_)) {
            self.queue.pending.fetch_sub(1, Ordering::Relaxed);
        }
        Some(item)
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
        self.publish_batch(std::slice::from_ref(&value));
    }

    /// Keeps and fans out `values`, oldest first: one lock of the ring and, per subscriber, one lock
    /// of its queue and one wake-up. A subscriber with room for only some of them gets the oldest.
    pub fn publish_batch(&self, values: &[Arc<T>]) {
        if values.is_empty() {
            return;
        }
        let mut st = self.lock();
        for value in values {
            if st.ring.len() >= self.capacity {
                st.ring.pop_front();
                self.overwritten.fetch_add(1, Ordering::Relaxed);
            }
            st.ring.push_back(value.clone());
        }
        self.published.fetch_add(values.len() as u64, Ordering::Relaxed);
        st.subscribers.retain(|s| {
            let Some(q) = s.upgrade() else { return false };
            let room = self.queue.saturating_sub(q.pending.load(Ordering::Relaxed));
            let fit = room.min(values.len());
            if fit > 0 {
                q.pending.fetch_add(fit, Ordering::Relaxed);
                q.lock()
                    .extend(values[..fit].iter().map(|v| Item::Value(v.clone())));
                q.notify.notify_one();
            }
            let lost = (values.len() - fit) as u64;
            if lost > 0 {
                q.lost.fetch_add(lost, Ordering::Relaxed);
                self.lost_slow.fetch_add(lost, Ordering::Relaxed);
                // A subscriber with an empty queue learns of the loss now rather than at the next value.
                q.notify.notify_one();
            }
            true
        });
    }

    /// Tells every subscriber that `n` values were lost before reaching the hub. The record is queued
    /// even when a subscriber's queue is full of values, so a slow subscriber still hears of it; while
    /// its queue is full, further reports of the same source add up in its last record (a subscriber
    /// that stopped reading does not collect a record per report).
    pub fn publish_lost(&self, source: LostEventSource, n: u64) {
        let mut st = self.lock();
        st.subscribers.retain(|s| {
            let Some(q) = s.upgrade() else { return false };
            let full = q.pending.load(Ordering::Relaxed) >= self.queue;
            let mut items = q.lock();
            match items.back_mut() {
                Some(Item::Lost(last, total)) if full && *last == source => *total += n,
                _ => items.push_back(Item::Lost(source, n)),
            }
            drop(items);
            q.notify.notify_one();
            true
        });
    }

    /// The ring as it is now and, with `follow`, a subscription to every value published after it
    /// (taken under the same lock: nothing is missed or seen twice between the two).
    pub fn subscribe(&self, follow: bool) -> Snapshot<T> {
        let mut st = self.lock();
        let subscription = follow.then(|| {
            let queue = Arc::new(Queue {
                items: Mutex::new(VecDeque::new()),
                pending: AtomicUsize::new(0),
                notify: Notify::new(),
                lost: AtomicU64::new(0),
                closed: AtomicBool::new(false),
            });
            st.subscribers.push(Arc::downgrade(&queue));
            Subscription {
                queue,
                taken: VecDeque::new(),
            }
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
        st.subscribers.retain(|s| s.strong_count() > 0);
        st.subscribers.len()
    }
}

impl<T> Drop for Fanout<T> {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for q in st.subscribers.iter().filter_map(Weak::upgrade) {
            q.closed.store(true, Ordering::Release);
            q.notify.notify_one();
        }
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
        Self {
            node: "local".into(),
            flow_buffer: 65_536,
            client_queue: 4_096,
            alert_buffer: 1_024,
        }
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
    /// The OTLP exporter's endpoint, once it follows the hub, and its counters.
    otlp_endpoint: std::sync::OnceLock<String>,
    pub otlp: crate::otlp::OtlpCounters,
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
    /// `Some` while flows are exported over OTLP.
    pub otlp: Option<crate::otlp::OtlpStatus>,
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
            otlp_endpoint: std::sync::OnceLock::new(),
            otlp: crate::otlp::OtlpCounters::default(),
        }
    }

    /// Keeps and fans out one flow. Cheap: never waits for a subscriber.
    pub fn publish(&self, flow: Flow) {
        let time = flow.time;
        self.publish_at(flow, time);
    }

    pub fn publish_at(&self, flow: Flow, time: SystemTime) {
        self.publish_batch(std::iter::once((flow, time)), &mut Vec::with_capacity(1));
    }

    /// Keeps and fans out flows, oldest first, each with its time (the time its `time` field says,
    /// unrounded). `scratch` is the caller's buffer, reused from batch to batch (left empty).
    pub fn publish_batch(
        &self,
        flows: impl ExactSizeIterator<Item = (Flow, SystemTime)>,
        scratch: &mut Vec<Arc<Observed>>,
    ) {
        let n = flows.len() as u64;
        let first = self.seq.fetch_add(n, Ordering::Relaxed) + 1;
        scratch.clear();
        scratch.extend(
            flows
                .zip(first..)
                .map(|((flow, time), seq)| Arc::new(Observed { seq, time, flow })),
        );
        self.flows.publish_batch(scratch);
        scratch.clear();
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
            self.flows
                .publish_lost(LostEventSource::KernelRingBuffer, total - before);
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
            otlp: self.otlp_endpoint.get().map(|_| self.otlp.status()),
        }
    }

    /// Says that flows are exported to `endpoint` (once: the agent has one exporter).
    pub fn set_otlp_endpoint(&self, endpoint: String) {
        let _ = self.otlp_endpoint.set(endpoint);
    }

    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.get().map(String::as_str)
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
    fn a_batch_goes_out_whole_or_its_oldest_part_and_the_rest_is_counted() {
        let f = Fanout::new(100, 5);
        let mut sub = f.subscribe(true).subscription.unwrap();
        let batch: Vec<_> = (0..3u32).map(Arc::new).collect();
        f.publish_batch(&batch);
        // Two taken, one still pending: room for 5 - 1 = 4 of the next 6.
        assert!(matches!(sub.try_next(), Some(Item::Value(v)) if *v == 0));
        assert!(matches!(sub.try_next(), Some(Item::Value(v)) if *v == 1));
        let batch: Vec<_> = (3..9u32).map(Arc::new).collect();
        f.publish_batch(&batch);
        let mut got = Vec::new();
        while let Some(item) = sub.try_next() {
            got.push(match item {
                Item::Value(v) => format!("{v}"),
                Item::Lost(src, n) => format!("lost {} {n}", src.as_str_name()),
            });
        }
        assert_eq!(got, ["lost SLOW_CLIENT 2", "2", "3", "4", "5", "6"]);
        assert_eq!((f.published(), f.lost_slow()), (9, 2));
        assert_eq!(values(&f.subscribe(false)), (0..9).collect::<Vec<_>>());
    }

    #[test]
    fn a_follower_is_woken_per_batch_and_ends_with_the_hub() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let f = Arc::new(Fanout::new(10, 100));
            let mut sub = f.subscribe(true).subscription.unwrap();
            let publisher = f.clone();
            let task = tokio::spawn(async move {
                tokio::task::yield_now().await;
                publisher.publish_batch(&[Arc::new(1u32), Arc::new(2)]);
            });
            assert!(matches!(sub.next().await, Some(Item::Value(v)) if *v == 1));
            assert!(matches!(sub.next().await, Some(Item::Value(v)) if *v == 2));
            task.await.unwrap();
            f.publish_lost(LostEventSource::KernelRingBuffer, 3);
            drop(f);
            assert!(matches!(
                sub.next().await,
                Some(Item::Lost(LostEventSource::KernelRingBuffer, 3))
            ));
            assert!(sub.next().await.is_none(), "the hub is gone");
        });
    }

    #[test]
    fn loss_reports_reach_a_full_queue_and_add_up_there() {
        let f = Fanout::new(10, 2);
        let mut sub = f.subscribe(true).subscription.unwrap();
        f.publish_batch(&[Arc::new(1u32), Arc::new(2)]);
        for _ in 0..3 {
            f.publish_lost(LostEventSource::KernelRingBuffer, 4);
        }
        assert!(matches!(sub.try_next(), Some(Item::Value(v)) if *v == 1));
        assert!(matches!(sub.try_next(), Some(Item::Value(v)) if *v == 2));
        assert!(matches!(
            sub.try_next(),
            Some(Item::Lost(LostEventSource::KernelRingBuffer, 12))
        ));
        assert!(sub.try_next().is_none());
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
        let hub = Hub::new(HubOptions {
            flow_buffer: 8,
            ..Default::default()
        });
        let mut sub = hub.flows.subscribe(true).subscription.unwrap();
        hub.set_kernel_lost(0);
        hub.set_kernel_lost(5);
        hub.set_kernel_lost(5);
        hub.set_kernel_lost(7);
        assert!(matches!(
            sub.try_next(),
            Some(Item::Lost(LostEventSource::KernelRingBuffer, 5))
        ));
        assert!(matches!(
            sub.try_next(),
            Some(Item::Lost(LostEventSource::KernelRingBuffer, 2))
        ));
        assert!(sub.try_next().is_none());
        assert_eq!(hub.status().lost_kernel_ring_buffer, 7);
    }

    #[test]
    fn hub_status_counts() {
        let hub = Hub::new(HubOptions {
            flow_buffer: 2,
            client_queue: 1,
            ..Default::default()
        });
        let _sub = hub.flows.subscribe(true);
        for _ in 0..3 {
            hub.publish(crate::flows::testing::denied());
        }
        let st = hub.status();
        assert_eq!(
            (st.seen_flows, st.num_flows, st.max_flows, st.ring_overwritten),
            (3, 2, 2, 1)
        );
        assert_eq!(st.lost_slow_clients, 2);
        assert_eq!(st.subscribers, 1);
    }
}
