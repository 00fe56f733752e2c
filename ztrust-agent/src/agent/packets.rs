//! The kernel's packet counters as `/metrics` exports them (`ztrust_datapath_packets_total`,
//! `ztrust_datapath_bytes_total`): read at every scrape ([`CounterMaps`]) and attributed to the pod
//! whose interface they are on (the pod an ingress packet goes to, or an egress packet comes from — the
//! judged pod, as in flows).
//!
//! The kernel counts by interface, in a slot of the endpoint's or in a hash entry; the metrics are by
//! namespace (and pod). Each read measures every kernel counter's increase since the last read and adds
//! it to the series of the pod bound to the counter's interface at that read: a series only ever
//! grows, whatever happens to the kernel's counters (a slot handed out again and zeroed, an entry
//! deleted: a counter below its last value counts from zero). A pod that is bound to no interface
//! any longer has its series folded into its namespace's with an empty pod label, so that removed pods
//! leave no series behind and a namespace's sum never falls. Increases on an interface no pod is bound
//! to (a pod the agent does not know yet, held closed) are in the series with an empty namespace. The
//! hash entries of interfaces that are gone are deleted, so that the kernel map does not fill with
//! them; a packet counted between that read and the delete is not counted.
//!
//! The series count from the agent's start: what the pinned counters held then (an earlier agent's
//! packets) is the baseline ([`Attribution::baseline`]), not counted again.
//!
//! Packets are counted to the pod bound at the read after them, or at the read before when none is
//! bound any longer (a pod's last packets): around a pod's binding, what its interface counted before
//! (dropped while the pod was unknown) is counted with it if it came within one scrape interval.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ztrust_common::CounterValue;

use crate::datapath::loader::{Counted, CounterReading, Origin, add_counts};
use crate::flows::{Direction, Reason, Verdict};
use crate::metrics::PacketCount;
use crate::model::ObjectRef;

/// (namespace, pod, direction, verdict, reason) → counts.
type Series = BTreeMap<(String, String, u8, u8, u8), CounterValue>;

#[derive(Debug, Default)]
pub struct Attribution {
    /// Each kernel counter's value at the last read.
    last: CounterReading,
    /// The pods bound at the last read: an interface's increase since then is its pod's even when the
    /// view has let it go meanwhile (its last packets).
    bound_before: HashMap<u32, ObjectRef>,
    series: Series,
}

/// What a read found: the hash counters of interfaces that are gone, to delete.
#[derive(Debug, Default)]
pub struct Read {
    pub forget: Vec<Counted>,
}

/// How much `now` grew since `last` (all of it when it is below: the counter started anew).
fn increase(now: &CounterValue, last: Option<&CounterValue>) -> CounterValue {
    match last {
        Some(l) if now.packets >= l.packets && now.bytes >= l.bytes => CounterValue {
            packets: now.packets - l.packets,
            bytes: now.bytes - l.bytes,
        },
        _ => *now,
    }
}

impl Attribution {
    /// Takes `now` as what was counted before (an earlier agent's packets, in the pinned counters):
    /// only what the counters add after it is counted.
    pub fn baseline(&mut self, now: &CounterReading) {
        self.last = now.clone();
    }

    /// Adds what the kernel's counters (`now`, a whole read) counted since the last read to the pods
    /// `owners` binds to their interfaces; `exists` tells which interfaces are still there.
    pub fn read(
        &mut self,
        now: &CounterReading,
        owners: &HashMap<u32, ObjectRef>,
        exists: impl Fn(u32) -> bool,
    ) -> Read {
        let mut read = Read::default();
        for (source, v) in now {
            let (origin, key) = source;
            let grew = increase(v, self.last.get(source));
            if grew.packets > 0 || grew.bytes > 0 {
                let (namespace, pod) = owners
                    .get(&key.ifindex)
                    .or_else(|| self.bound_before.get(&key.ifindex))
                    .map(|p| (p.namespace.clone(), p.name.clone()))
                    .unwrap_or_default();
                let at = (namespace, pod, key.direction, key.verdict, key.reason);
                add_counts(self.series.entry(at).or_default(), &grew);
            }
            if *origin == Origin::Hash && !exists(key.ifindex) {
                read.forget.push(*key);
            }
        }
        // A counter missing from this read keeps its last value while its interface is there (a
        // counter the iteration skipped, or a slot whose entry comes back, is not counted again).
        let mut last = std::mem::take(&mut self.last);
        last.retain(|(_, key), _| exists(key.ifindex));
        last.extend(now.iter().map(|(k, v)| (*k, *v)));
        self.last = last;
        self.bound_before = owners.clone();
        // Pods bound to no interface: into their namespace's series.
        let bound: BTreeSet<(&str, &str)> = owners
            .values()
            .map(|p| (p.namespace.as_str(), p.name.as_str()))
            .collect();
        let departed: Vec<_> = self
            .series
            .keys()
            .filter(|(ns, pod, ..)| !pod.is_empty() && !bound.contains(&(ns.as_str(), pod.as_str())))
            .cloned()
            .collect();
        for at in departed {
            if let Some(v) = self.series.remove(&at) {
                let (namespace, _, direction, verdict, reason) = at;
                let folded = (namespace, String::new(), direction, verdict, reason);
                add_counts(self.series.entry(folded).or_default(), &v);
            }
        }
        read
    }

    /// The series, as the metrics take them.
    pub fn series(&self) -> Vec<PacketCount> {
        self.series
            .iter()
            .map(|((namespace, pod, direction, verdict, reason), v)| PacketCount {
                direction: Direction::from_code(*direction).name(),
                verdict: Verdict::from_code(*verdict).name(),
                reason: Reason::from_code(*reason).name(),
                namespace: namespace.clone(),
                pod: pod.clone(),
                packets: v.packets,
                bytes: v.bytes,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztrust_common::{dir, reason, verdict};

    const IF_A: u32 = 7;
    const IF_B: u32 = 9;

    fn drop_key(ifindex: u32) -> Counted {
        Counted {
            ifindex,
            direction: dir::INGRESS,
            verdict: verdict::DROPPED,
            reason: reason::POLICY_DENIED,
        }
    }

    fn value(n: u64) -> CounterValue {
        CounterValue {
            packets: n,
            bytes: n * 100,
        }
    }

    /// Hash counters of (interface, packets).
    fn hash(entries: &[(u32, u64)]) -> CounterReading {
        entries
            .iter()
            .map(|&(i, n)| ((Origin::Hash, drop_key(i)), value(n)))
            .collect()
    }

    fn owners(entries: &[(u32, &str, &str)]) -> HashMap<u32, ObjectRef> {
        entries
            .iter()
            .map(|(i, ns, name)| (*i, ObjectRef::new(*ns, *name)))
            .collect()
    }

    /// (namespace, pod) → dropped packets.
    fn dropped(a: &Attribution) -> BTreeMap<(String, String), u64> {
        let mut out = BTreeMap::new();
        for s in a.series() {
            assert_eq!(
                (s.verdict, s.reason, s.direction),
                ("dropped", "policy-denied", "ingress")
            );
            assert_eq!(s.bytes, s.packets * 100, "{s:?}");
            *out.entry((s.namespace.clone(), s.pod.clone())).or_default() += s.packets;
        }
        out
    }

    fn series(entries: &[(&str, &str, u64)]) -> BTreeMap<(String, String), u64> {
        entries
            .iter()
            .map(|(ns, p, n)| ((ns.to_string(), p.to_string()), *n))
            .collect()
    }

    #[test]
    fn increases_go_to_the_bound_pods_and_a_departed_pods_stay_in_its_namespace() {
        let backend = owners(&[(IF_B, "payments", "backend")]);
        let departed = || {
            let mut a = Attribution::default();
            let both = owners(&[(IF_A, "payments", "database"), (IF_B, "payments", "backend")]);
            let r = a.read(&hash(&[(IF_A, 5), (IF_B, 2)]), &both, |_| true);
            assert_eq!(
                dropped(&a),
                series(&[("payments", "backend", 2), ("payments", "database", 5)])
            );
            assert!(r.forget.is_empty());
            // database's interface goes: its increase is counted, its series folds into the
            // namespace's, its hash entry is to be deleted.
            let r = a.read(&hash(&[(IF_A, 6), (IF_B, 3)]), &backend, |i| i != IF_A);
            assert_eq!(
                dropped(&a),
                series(&[("payments", "", 6), ("payments", "backend", 3)])
            );
            assert_eq!(r.forget, vec![drop_key(IF_A)]);
            a
        };
        // Deleted, or the delete failed and the entry stays: nothing is counted twice.
        for leftover in [hash(&[(IF_B, 3)]), hash(&[(IF_A, 6), (IF_B, 3)])] {
            let mut a = departed();
            for _ in 0..2 {
                a.read(&leftover, &backend, |i| i != IF_A);
                assert_eq!(
                    dropped(&a),
                    series(&[("payments", "", 6), ("payments", "backend", 3)])
                );
            }
        }
    }

    #[test]
    fn counts_before_a_binding_stay_unattributed_and_a_slot_is_not_counted_twice() {
        let mut a = Attribution::default();
        let slot = |n| ((Origin::Slot(4), drop_key(IF_A)), value(n));
        // The agent's first read, before its view names the pod: 4 in the hash, 10 in the slot.
        let none = HashMap::new();
        let mut now = hash(&[(IF_A, 4)]);
        now.extend([slot(10)]);
        a.read(&now, &none, |_| true);
        assert_eq!(dropped(&a), series(&[("", "", 14)]));
        // The pod is bound: only what came since is its.
        let bound = owners(&[(IF_A, "payments", "frontend")]);
        let mut now = hash(&[(IF_A, 5)]);
        now.extend([slot(12)]);
        a.read(&now, &bound, |_| true);
        assert_eq!(dropped(&a), series(&[("", "", 14), ("payments", "frontend", 3)]));
        // The endpoint's entry (and the slot with it) is gone for a read, then back: not counted again.
        a.read(&hash(&[(IF_A, 5)]), &bound, |_| true);
        let mut now = hash(&[(IF_A, 5)]);
        now.extend([slot(13)]);
        a.read(&now, &bound, |_| true);
        assert_eq!(dropped(&a), series(&[("", "", 14), ("payments", "frontend", 4)]));
    }

    #[test]
    fn a_counter_that_starts_anew_counts_from_zero_and_a_read_twice_changes_nothing() {
        let mut a = Attribution::default();
        let bound = owners(&[(IF_A, "payments", "database")]);
        a.read(&hash(&[(IF_A, 10)]), &bound, |_| true);
        // The slot or entry was handed out again, zeroed: 3 new packets.
        a.read(&hash(&[(IF_A, 3)]), &bound, |_| true);
        assert_eq!(dropped(&a), series(&[("payments", "database", 13)]));
        a.read(&hash(&[(IF_A, 3)]), &bound, |_| true);
        assert_eq!(dropped(&a), series(&[("payments", "database", 13)]));
        a.read(&hash(&[(IF_A, 5)]), &bound, |_| true);
        assert_eq!(dropped(&a), series(&[("payments", "database", 15)]));
    }

    #[test]
    fn a_gone_interface_whose_entry_stays_is_counted_once() {
        let mut a = Attribution::default();
        let bound = owners(&[(IF_A, "payments", "database")]);
        let slot = |n| -> CounterReading { [((Origin::Slot(2), drop_key(IF_A)), value(n))].into() };
        a.read(&slot(8), &bound, |_| true);
        // The interface is gone, the endpoint entry (with its slot) not yet: read again and again.
        for _ in 0..3 {
            let r = a.read(&slot(8), &HashMap::new(), |_| false);
            assert!(r.forget.is_empty(), "a slot goes with its entry, not by a delete");
        }
        assert_eq!(dropped(&a), series(&[("payments", "", 8)]));
    }

    #[test]
    fn what_the_pinned_counters_held_at_the_start_is_not_counted() {
        let mut a = Attribution::default();
        a.baseline(&hash(&[(IF_A, 1_000)]));
        let bound = owners(&[(IF_A, "payments", "database")]);
        a.read(&hash(&[(IF_A, 1_007)]), &bound, |_| true);
        assert_eq!(dropped(&a), series(&[("payments", "database", 7)]));
    }

    #[test]
    fn removed_pods_leave_no_series_behind() {
        let mut a = Attribution::default();
        for round in 0..100u32 {
            let ifindex = 100 + round;
            let bound = owners(&[(ifindex, "churn", &format!("pod-{round}"))]);
            a.read(&hash(&[(ifindex, 1)]), &bound, |i| i == ifindex);
            assert!(a.series.len() <= 2, "round {round}: {:?}", a.series);
            assert!(a.last.len() <= 1, "round {round}: {:?}", a.last);
        }
        a.read(&CounterReading::new(), &HashMap::new(), |_| false);
        assert_eq!(dropped(&a), series(&[("churn", "", 100)]));
        assert!(a.last.is_empty());
    }
}
