//! The kernel's packet counters as `/metrics` exports them (`ztrust_datapath_packets_total`,
//! `ztrust_datapath_bytes_total`): read at every scrape ([`CounterMaps`]) and attributed to the pod
//! whose interface they are on (the pod an ingress packet goes to, or an egress packet comes from — the
//! judged pod, as in flows).
//!
//! The kernel counts by interface; the metrics are by namespace (and pod). An interface's counts belong
//! to the pod bound to it when they are read. When that changes — the pod goes, the interface goes, or
//! an interface first seen without a pod is bound to one — the counts so far are *retired*: added to
//! a per-namespace sum that only grows (the pod label empty), and the interface's hash entries deleted,
//! so that the next owner starts from zero and the kernel map holds no entries of interfaces that are
//! gone. A namespace's series therefore never decreases while the agent runs, and removed pods leave no
//! series behind. Packets on an interface no pod is bound to (a pod the agent does not know yet, held
//! closed) are in the series with an empty namespace.
//!
//! Each reported value is at least the one reported before: an endpoint's slot counts vanish with its
//! entry, before the pod leaves the view; the last value read stands for them. A packet counted between
//! the read that retires an interface and the delete is not counted.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ztrust_common::CounterValue;

use crate::datapath::loader::{Counted, CounterTotals};
use crate::flows::{Direction, Reason, Verdict};
use crate::metrics::PacketCount;
use crate::model::ObjectRef;

/// (namespace, pod, direction, verdict, reason) → counts.
type Series = BTreeMap<(String, String, u8, u8, u8), CounterValue>;

#[derive(Debug, Default)]
pub struct Attribution {
    /// Each interface's owner at the last read (`None`: no pod bound).
    owners: HashMap<u32, Option<ObjectRef>>,
    /// The value reported for each counter at the last read.
    last: CounterTotals,
    /// Counts of interfaces whose owner changed, by namespace (pod empty).
    retired: Series,
}

/// What a read found to do: the series to export, and the interfaces whose hash entries to delete.
#[derive(Debug, Default)]
pub struct Read {
    pub series: Vec<PacketCount>,
    pub forget: Vec<u32>,
}

fn max(a: &CounterValue, b: &CounterValue) -> CounterValue {
    CounterValue {
        packets: a.packets.max(b.packets),
        bytes: a.bytes.max(b.bytes),
    }
}

impl Attribution {
    /// Attributes `now` (the kernel's totals, empty when they could not be read) to the pods
    /// `owner_of` names, `exists` telling which interfaces are still there.
    pub fn read(
        &mut self,
        now: &CounterTotals,
        owner_of: impl Fn(u32) -> Option<ObjectRef>,
        exists: impl Fn(u32) -> bool,
    ) -> Read {
        let mut by_ifindex: BTreeMap<u32, BTreeMap<Counted, CounterValue>> = BTreeMap::new();
        for (key, v) in now.iter().chain(self.last.iter()) {
            let seen = by_ifindex
                .entry(key.ifindex)
                .or_default()
                .entry(*key)
                .or_default();
            *seen = max(seen, v);
        }
        let ifindexes: BTreeSet<u32> = by_ifindex.keys().chain(self.owners.keys()).copied().collect();
        let mut read = Read::default();
        let mut live = Series::new();
        self.last.clear();
        for ifindex in ifindexes {
            let counts = by_ifindex.remove(&ifindex).unwrap_or_default();
            let here = exists(ifindex);
            let owner = if here { owner_of(ifindex) } else { None };
            let before = self.owners.get(&ifindex).cloned();
            if !here || before.as_ref().is_some_and(|b| *b != owner) {
                // Retired under the owner the counts accrued under.
                let namespace = before.flatten().map(|p| p.namespace).unwrap_or_default();
                for (key, v) in &counts {
                    let at = (
                        namespace.clone(),
                        String::new(),
                        key.direction,
                        key.verdict,
                        key.reason,
                    );
                    crate::datapath::loader::add_counts(self.retired.entry(at).or_default(), v);
                }
                if !counts.is_empty() {
                    read.forget.push(ifindex);
                }
                if here {
                    self.owners.insert(ifindex, owner);
                } else {
                    self.owners.remove(&ifindex);
                }
                continue;
            }
            let (namespace, pod) = owner
                .as_ref()
                .map(|p| (p.namespace.clone(), p.name.clone()))
                .unwrap_or_default();
            for (key, v) in counts {
                let at = (
                    namespace.clone(),
                    pod.clone(),
                    key.direction,
                    key.verdict,
                    key.reason,
                );
                crate::datapath::loader::add_counts(live.entry(at).or_default(), &v);
                self.last.insert(key, v);
            }
            self.owners.insert(ifindex, owner);
        }
        for (at, v) in &self.retired {
            crate::datapath::loader::add_counts(live.entry(at.clone()).or_default(), v);
        }
        read.series = live
            .into_iter()
            .map(|((namespace, pod, direction, verdict, reason), v)| PacketCount {
                direction: Direction::from_code(direction).name(),
                verdict: Verdict::from_code(verdict).name(),
                reason: Reason::from_code(reason).name(),
                namespace,
                pod,
                packets: v.packets,
                bytes: v.bytes,
            })
            .collect();
        read
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

    fn totals(entries: &[(u32, u64)]) -> CounterTotals {
        entries
            .iter()
            .map(|&(i, n)| {
                (
                    drop_key(i),
                    CounterValue {
                        packets: n,
                        bytes: n * 100,
                    },
                )
            })
            .collect()
    }

    fn pod(ns: &str, name: &str) -> ObjectRef {
        ObjectRef::new(ns, name)
    }

    /// (namespace, pod) → dropped packets.
    fn dropped(r: &Read) -> BTreeMap<(String, String), u64> {
        let mut out = BTreeMap::new();
        for s in &r.series {
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
    fn counts_are_the_bound_pods_and_a_departed_pods_stay_in_its_namespace() {
        let mut a = Attribution::default();
        let owners = |i: u32| match i {
            IF_A => Some(pod("payments", "database")),
            IF_B => Some(pod("payments", "backend")),
            _ => None,
        };
        let r = a.read(&totals(&[(IF_A, 5), (IF_B, 2)]), owners, |_| true);
        assert_eq!(
            dropped(&r),
            series(&[("payments", "backend", 2), ("payments", "database", 5)])
        );
        assert!(r.forget.is_empty());

        // database's interface goes: its 6 packets stay in payments (pod empty), its entries go.
        let r = a.read(&totals(&[(IF_A, 6), (IF_B, 3)]), owners, |i| i != IF_A);
        assert_eq!(
            dropped(&r),
            series(&[("payments", "", 6), ("payments", "backend", 3)])
        );
        assert_eq!(r.forget, vec![IF_A]);
        // After the delete the kernel has none of IF_A: nothing is counted twice.
        let r = a.read(&totals(&[(IF_B, 3)]), owners, |i| i != IF_A);
        assert_eq!(
            dropped(&r),
            series(&[("payments", "", 6), ("payments", "backend", 3)])
        );
        assert!(r.forget.is_empty());
    }

    #[test]
    fn an_interface_bound_later_starts_from_zero_and_its_earlier_drops_stay_unattributed() {
        let mut a = Attribution::default();
        // Held closed before its pod is known: 4 packets dropped, no namespace.
        let r = a.read(&totals(&[(IF_A, 4)]), |_| None, |_| true);
        assert_eq!(dropped(&r), series(&[("", "", 4)]));
        // The pod is bound: the 4 are retired (still no namespace), the entries deleted.
        let bound = |i: u32| (i == IF_A).then(|| pod("payments", "frontend"));
        let r = a.read(&totals(&[(IF_A, 5)]), bound, |_| true);
        assert_eq!(dropped(&r), series(&[("", "", 5)]));
        assert_eq!(r.forget, vec![IF_A]);
        let r = a.read(&totals(&[(IF_A, 2)]), bound, |_| true);
        assert_eq!(dropped(&r), series(&[("", "", 5), ("payments", "frontend", 2)]));
    }

    #[test]
    fn a_value_never_falls_when_slot_counts_vanish_before_the_pod_leaves() {
        let mut a = Attribution::default();
        let owners = |i: u32| (i == IF_A).then(|| pod("payments", "database"));
        a.read(&totals(&[(IF_A, 10)]), owners, |_| true);
        // The endpoint's entry (and its slot) went first: fewer packets read, the last value stands.
        let r = a.read(&totals(&[(IF_A, 3)]), owners, |_| true);
        assert_eq!(dropped(&r), series(&[("payments", "database", 10)]));
        // A failed read (nothing) changes nothing either.
        let r = a.read(&CounterTotals::new(), owners, |_| true);
        assert_eq!(dropped(&r), series(&[("payments", "database", 10)]));
        let r = a.read(&totals(&[(IF_A, 12)]), owners, |_| true);
        assert_eq!(dropped(&r), series(&[("payments", "database", 12)]));
    }

    #[test]
    fn removed_pods_leave_no_series_behind() {
        let mut a = Attribution::default();
        for round in 0..100u32 {
            let ifindex = 100 + round;
            let owners = move |i: u32| (i == ifindex).then(|| pod("churn", &format!("pod-{round}")));
            let r = a.read(&totals(&[(ifindex, 1)]), owners, move |i| i == ifindex);
            assert!(r.series.len() <= 2, "round {round}: {:?}", r.series);
        }
        assert!(a.owners.len() <= 1 && a.last.len() <= 1);
        let r = a.read(&CounterTotals::new(), |_| None, |_| false);
        assert_eq!(dropped(&r), series(&[("churn", "", 100)]));
    }
}
