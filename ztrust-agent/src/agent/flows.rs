//! The flow pipeline: kernel events from the ring buffer, enriched through the [`View`], to metrics,
//! the observer hub, the flow log and the drop log.

use std::io::Write as _;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::unix::AsyncFd;
use tracing::{error, info};
use ztrust_common::FlowEvent;

use crate::flows::{Flow, View};

/// Every enriched flow passes here: metrics, the observer hub (flow API, detector), the flow log (JSON
/// lines) and, for drops, the log (rate-limited: see [`crate::flows::DropLog`]). Called from the task that reads the
/// kernel ring buffer, once per batch of events (what one wake-up found, at most [`MAX_BATCH`]): the
/// view is locked once per batch, the metric families and the hub once per batch, the clocks read once
/// per batch. Nothing here waits (the hub never blocks on a client).
pub struct FlowSink {
    pub file: Option<std::fs::File>,
    pub seen: u64,
    pub hub: Arc<crate::observer::Hub>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// [`FlowSink`] with what it needs per batch, reused from batch to batch.
struct Batches {
    sink: FlowSink,
    /// The flow log, written per batch.
    file: Option<std::io::BufWriter<std::fs::File>>,
    log: crate::flows::DropLog,
    flows: Vec<(Flow, SystemTime)>,
    published: Vec<Arc<crate::observer::hub::Observed>>,
}

/// Events taken from the ring buffer per batch. Enough to spread the per-batch costs thin, few enough
/// that a batch's flows stay in the CPU cache from enrichment to publishing (1,024 was slower), and
/// well below the per-client queue (`--client-queue`, default 4,096): a subscriber drains its queue
/// between batches, so a batch must fit in it with room to spare.
const MAX_BATCH: usize = 256;

impl Batches {
    fn new(mut sink: FlowSink) -> Self {
        let file = sink.file.take().map(std::io::BufWriter::new);
        Self {
            sink,
            file,
            log: crate::flows::DropLog::new(),
            flows: Vec::new(),
            published: Vec::new(),
        }
    }

    fn enrich(&mut self, view: &View, events: &[FlowEvent]) {
        let clock = crate::flows::Clock::now();
        self.flows.clear();
        self.flows.extend(events.iter().map(|ev| {
            let time = clock.system_time(ev.ts_ns);
            (view.enrich_at(ev, time), time)
        }));
    }

    /// Records the batch [`Self::enrich`] made.
    fn record(&mut self) {
        self.sink.seen += self.flows.len() as u64;
        self.sink.metrics.observe_flows(self.flows.iter().map(|(f, _)| f));
        self.log.roll(Instant::now());
        for (flow, _) in &self.flows {
            if flow.is_drop() && self.log.admit() {
                info!(target: "ztrust::flows", "{}", crate::flows::render_line(flow));
            }
            if let Some(f) = &mut self.file
                && serde_json::to_writer(&mut *f, flow).is_ok()
            {
                let _ = f.write_all(b"\n");
            }
        }
        if let Some(f) = &mut self.file {
            let _ = f.flush();
        }
        self.sink
            .hub
            .publish_batch(self.flows.drain(..), &mut self.published);
    }
}

pub async fn read_events(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    view: Arc<RwLock<View>>,
    sink: FlowSink,
) {
    // SAFETY: the ring buffer owns its map descriptor, which stays open for as long as the AsyncFd
    // (which owns the ring buffer) lives.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            error!(error = %e, "cannot poll the event ring buffer; no flows will be reported");
            return;
        }
    };
    let mut sink = Batches::new(sink);
    let mut batch: Vec<FlowEvent> = Vec::with_capacity(MAX_BATCH);
    // Sums up suppressed drop lines even when no new drop comes.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut guard = tokio::select! {
            g = fd.readable_mut() => match g {
                Ok(g) => g,
                Err(e) => {
                    error!(error = %e, "event ring buffer");
                    return;
                }
            },
            _ = tick.tick() => {
                sink.log.roll(Instant::now());
                continue;
            }
        };
        let ring = guard.get_inner_mut();
        batch.clear();
        while batch.len() < MAX_BATCH
            && let Some(item) = ring.next()
        {
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: the kernel writes whole FlowEvent records (see ztrust-ebpf emit()).
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
            }
        }
        // A full batch may have left events behind: stay ready, and come back after the others
        // (the readiness await yields to other tasks once this task's budget is spent).
        if batch.len() < MAX_BATCH {
            guard.clear_ready();
        }
        drop(guard);
        if batch.is_empty() {
            continue;
        }
        sink.enrich(&view.read().expect("view lock"), &batch);
        sink.record();
    }
}
