//! Lateral-movement detector: watches the denied flows and raises an alert when one source
//!
//! * is denied towards at least `scan_threshold` distinct destinations (address, port) within a
//!   sliding `window` — a scan, like `nmap` sweeping ports or hosts; or
//! * is denied towards a pod of the sensitive tier (a label selector such as `tier=database`) — an
//!   attempt at the crown jewels, which a correct application never makes.
//!
//! One alert per source, kind and window, never one per flow: after an alert the same source raises
//! the same kind again only once `window` has passed. Only drops that policy decided count
//! (`policy-denied`, `no-conntrack-entry`): a pod still starting (`unknown-endpoint`) or a malformed
//! packet says nothing about intent. Alerts go to `GetAlerts` streams, `ztrust_alerts_total` and the
//! log. Memory is bounded: per source at most `MAX_EVENTS` recent drops and `max_evidence` flows, at
//! most `max_sources` sources (idle ones are forgotten first).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::debug;

use crate::flows::{Flow, Observed, Reason};
use crate::labels::{InvalidSelector, Selector};

/// Recent drops remembered per source (the sliding window holds at most this many).
const MAX_EVENTS: usize = 4_096;

#[derive(Clone, Debug)]
pub struct DetectorOptions {
    /// Distinct denied destinations within `window` that make a scan (`--scan-threshold`).
    pub scan_threshold: usize,
    /// `--scan-window`.
    pub window: Duration,
    /// Label selectors of the sensitive tier (`--sensitive-selector`, repeatable), e.g. `tier=database`.
    pub sensitive: Vec<String>,
    /// Flows attached to an alert as evidence.
    pub max_evidence: usize,
    /// Sources tracked at once.
    pub max_sources: usize,
}

impl Default for DetectorOptions {
    fn default() -> Self {
        Self {
            scan_threshold: 10,
            window: Duration::from_secs(10),
            sensitive: vec!["tier=database".into()],
            max_evidence: 16,
            max_sources: 16_384,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sensitive tier selector: {0}")]
    Selector(#[from] InvalidSelector),
}

type Dest = (IpAddr, u16);

/// What an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertKind {
    /// Denied towards many distinct destinations within the window.
    Scan,
    /// Denied towards a pod of the sensitive tier.
    SensitiveTier,
}

impl AlertKind {
    /// The stable name (metric label, JSON).
    pub fn name(self) -> &'static str {
        match self {
            AlertKind::Scan => "scan",
            AlertKind::SensitiveTier => "sensitive_tier",
        }
    }
}

/// An alert, with the denied flows that raised it.
#[derive(Clone, Debug)]
pub struct Alert {
    pub time: SystemTime,
    pub kind: AlertKind,
    /// The source, as flows name it (`namespace/pod`, or the address).
    pub source: String,
    pub summary: String,
    pub distinct_destinations: u32,
    pub denied_flows: u64,
    /// The oldest denied flow of the source within the window.
    pub window_start: Option<SystemTime>,
    /// The last flows of the source (at most `max_evidence`), shared with the observer's ring.
    pub evidence: Vec<Arc<Observed>>,
}

#[derive(Default)]
struct Source {
    events: VecDeque<(SystemTime, Dest)>,
    distinct: HashMap<Dest, u32>,
    /// Shared with the hub's ring: keeping a flow as evidence copies nothing.
    evidence: VecDeque<Arc<Observed>>,
    last_scan_alert: Option<SystemTime>,
    last_sensitive_alert: Option<SystemTime>,
    last_seen: Option<SystemTime>,
}

impl Source {
    fn expire(&mut self, before: SystemTime) {
        while let Some((t, d)) = self.events.front().copied() {
            if t >= before && self.events.len() <= MAX_EVENTS {
                break;
            }
            self.events.pop_front();
            if let Some(n) = self.distinct.get_mut(&d) {
                *n -= 1;
                if *n == 0 {
                    self.distinct.remove(&d);
                }
            }
        }
    }
}

pub struct Detector {
    opts: DetectorOptions,
    sensitive: Vec<Selector>,
    sources: HashMap<String, Source>,
}

fn counts(f: &Flow) -> bool {
    f.is_drop() && matches!(f.reason, Reason::PolicyDenied | Reason::NoCtEntry)
}

fn within(last: Option<SystemTime>, now: SystemTime, window: Duration) -> bool {
    last.is_some_and(|t| now.duration_since(t).unwrap_or_default() < window)
}

impl Detector {
    pub fn new(opts: DetectorOptions) -> Result<Self, Error> {
        let sensitive = opts
            .sensitive
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()?;
        Ok(Self {
            opts,
            sensitive,
            sources: HashMap::new(),
        })
    }

    /// Looks at one flow (at `time`); returns the alerts it completes (usually none).
    pub fn observe(&mut self, flow: &Flow, time: SystemTime) -> Vec<Alert> {
        if !counts(flow) {
            return Vec::new();
        }
        self.observe_shared(&Arc::new(Observed {
            seq: 0,
            time,
            flow: flow.clone(),
        }))
    }

    /// [`Self::observe`] for a flow as the hub keeps it.
    pub fn observe_shared(&mut self, observed: &Arc<Observed>) -> Vec<Alert> {
        let (flow, time) = (&observed.flow, observed.time);
        if !counts(flow) {
            return Vec::new();
        }
        let key = flow.source.display_name();
        if !self.sources.contains_key(&key) && self.sources.len() >= self.opts.max_sources {
            self.forget_idle(time);
            if self.sources.len() >= self.opts.max_sources {
                debug!(source = %key, "detector: too many sources tracked; ignoring a new one");
                return Vec::new();
            }
        }
        let window = self.opts.window;
        let max_evidence = self.opts.max_evidence;
        let sensitive_hit = self.sensitive.iter().any(|s| s.matches(&flow.destination.labels));
        let src = self.sources.entry(key.clone()).or_default();
        let dest = (flow.destination.ip, flow.destination.port.unwrap_or(0));
        src.last_seen = Some(time);
        src.events.push_back((time, dest));
        *src.distinct.entry(dest).or_default() += 1;
        src.expire(time.checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH));
        src.evidence.push_back(observed.clone());
        while src.evidence.len() > max_evidence.max(1) {
            src.evidence.pop_front();
        }

        let mut alerts = Vec::new();
        let make = |src: &Source, kind: AlertKind, summary: String| Alert {
            time,
            kind,
            source: key.clone(),
            summary,
            distinct_destinations: src.distinct.len() as u32,
            denied_flows: src.events.len() as u64,
            window_start: src.events.front().map(|(t, _)| *t),
            evidence: src.evidence.iter().cloned().collect(),
        };
        if src.distinct.len() >= self.opts.scan_threshold && !within(src.last_scan_alert, time, window) {
            src.last_scan_alert = Some(time);
            let summary = format!(
                "{key} denied towards {} distinct destinations within {}: possible scan",
                src.distinct.len(),
                humantime::format_duration(window)
            );
            alerts.push(make(src, AlertKind::Scan, summary));
        }
        if sensitive_hit && !within(src.last_sensitive_alert, time, window) {
            src.last_sensitive_alert = Some(time);
            let port = flow.destination.port.map(|p| format!(":{p}")).unwrap_or_default();
            let summary = format!(
                "{key} denied towards sensitive {}{port} {}",
                flow.destination.display_name(),
                flow.protocol
            );
            alerts.push(make(src, AlertKind::SensitiveTier, summary));
        }
        alerts
    }

    fn forget_idle(&mut self, now: SystemTime) {
        let window = self.opts.window;
        self.sources.retain(|_, s| within(s.last_seen, now, window));
    }

    pub fn tracked_sources(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{allowed, denied};

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000) + Duration::from_millis(ms)
    }

    fn probe(ip: &str, port: u16) -> Flow {
        let mut f = denied();
        f.destination.ip = ip.parse().unwrap();
        f.destination.port = Some(port);
        f.destination.labels.clear();
        f.destination.pod = None;
        f
    }

    fn detector() -> Detector {
        Detector::new(DetectorOptions::default()).unwrap()
    }

    #[test]
    fn a_port_scan_raises_one_alert_per_window() {
        let mut d = detector();
        let mut alerts = Vec::new();
        // 1000 ports in 5 seconds.
        for port in 1..=1000u16 {
            alerts.extend(d.observe(&probe("10.244.0.12", port), at(u64::from(port) * 5)));
        }
        assert_eq!(alerts.len(), 1, "{alerts:#?}");
        let a = &alerts[0];
        assert_eq!(a.kind, AlertKind::Scan);
        assert_eq!(a.source, "payments/frontend-7d9");
        assert_eq!(
            a.distinct_destinations, 10,
            "raised as soon as the threshold is reached"
        );
        assert_eq!(a.evidence.len(), 10);
        assert!(a.summary.contains("possible scan"), "{}", a.summary);
        // After the window, a scan still going on raises again.
        let again = d.observe(&probe("10.244.0.12", 2000), at(11_000));
        assert_eq!(again.len(), 1);
        assert!(again[0].evidence.len() <= 16, "evidence is bounded");
    }

    #[test]
    fn a_host_sweep_is_a_scan_too() {
        let mut d = detector();
        let alerts: Vec<_> = (1..=20)
            .flat_map(|i| d.observe(&probe(&format!("10.244.3.{i}"), 22), at(i * 100)))
            .collect();
        assert_eq!(alerts.len(), 1);
    }

    #[test]
    fn retries_towards_few_destinations_are_no_scan() {
        let mut d = detector();
        // A misconfigured client retrying 3 services for a minute: many drops, few destinations.
        for i in 0..600u64 {
            let port = [5432, 6379, 8080][(i % 3) as usize];
            assert!(d.observe(&probe("10.244.0.12", port), at(i * 100)).is_empty());
        }
    }

    #[test]
    fn slow_scans_below_the_window_rate_are_not_flagged() {
        let mut d = detector();
        // One new port every 2 s: never 10 within 10 s.
        for port in 1..=100u16 {
            assert!(
                d.observe(&probe("10.244.0.12", port), at(u64::from(port) * 2_000))
                    .is_empty()
            );
        }
    }

    #[test]
    fn legitimate_allowed_traffic_raises_nothing() {
        let mut d = detector();
        for i in 0..10_000u64 {
            let mut f = allowed();
            f.destination.port = Some((i % 2000) as u16);
            assert!(d.observe(&f, at(i)).is_empty());
            // Forwarded flows to the sensitive tier are fine too.
            let mut db = denied();
            db.verdict = crate::flows::Verdict::Forwarded;
            db.reason = crate::flows::Reason::AllowedByPolicy;
            db.destination.port = Some((i % 3000) as u16);
            assert!(d.observe(&db, at(i)).is_empty());
        }
        assert_eq!(d.tracked_sources(), 0);
    }

    #[test]
    fn fail_closed_drops_of_a_starting_pod_do_not_count() {
        let mut d = detector();
        for port in 1..=50u16 {
            let mut f = probe("10.244.0.12", port);
            f.reason = crate::flows::Reason::UnknownEndpoint;
            assert!(d.observe(&f, at(u64::from(port))).is_empty());
        }
    }

    #[test]
    fn a_denial_towards_the_sensitive_tier_alerts_once_per_window() {
        let mut d = detector();
        let a = d.observe(&denied(), at(0));
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].kind, AlertKind::SensitiveTier);
        assert!(
            a[0].summary.contains("payments/database-0:5432"),
            "{}",
            a[0].summary
        );
        assert!(d.observe(&denied(), at(5_000)).is_empty());
        assert_eq!(d.observe(&denied(), at(10_001)).len(), 1);
        // Another source is another alert.
        let mut other = denied();
        other.source.pod = Some(crate::model::ObjectRef::new("payments", "intruder"));
        assert_eq!(d.observe(&other, at(10_002)).len(), 1);
    }

    #[test]
    fn audit_mode_would_drops_count() {
        let mut d = Detector::new(DetectorOptions {
            sensitive: vec![],
            ..Default::default()
        })
        .unwrap();
        let alerts: Vec<_> = (1..=10u16)
            .flat_map(|p| {
                let mut f = probe("10.244.0.12", p);
                f.verdict = crate::flows::Verdict::WouldDrop;
                d.observe(&f, at(u64::from(p)))
            })
            .collect();
        assert_eq!(alerts.len(), 1);
    }

    #[test]
    fn sources_are_bounded() {
        let mut d = Detector::new(DetectorOptions {
            max_sources: 4,
            sensitive: vec![],
            ..Default::default()
        })
        .unwrap();
        for i in 0..100u64 {
            let mut f = probe("10.244.0.12", 80);
            f.source.pod = Some(crate::model::ObjectRef::new("payments", format!("p{i}")));
            d.observe(&f, at(i * 20_000));
        }
        assert!(d.tracked_sources() <= 4);
    }

    #[test]
    fn bad_selectors_are_refused() {
        assert!(
            Detector::new(DetectorOptions {
                sensitive: vec!["=x".into()],
                ..Default::default()
            })
            .is_err()
        );
    }
}
