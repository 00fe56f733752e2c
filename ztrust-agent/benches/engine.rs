//! Micro-benchmarks of the policy engine's hot functions (`cargo bench -p ztrust-agent --bench engine`):
//! selector matching, a cold compile of synthetic clusters (100 and 1,000 policies), an incremental
//! update for one changed pod (of this node, of another node), the expansion of allow entries into
//! policy-map keys, and a sync that finds nothing to change.
//!
//! The clusters are the ones of `ztrust-bench control-plane` (`tests/src/bench/synth.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ztrust_agent::datapath::keys::policy_keys;
use ztrust_agent::datapath::sync::{MapOps, Result as SyncResult, Syncer};
use ztrust_agent::model::{LabelSelector, Labels, Operator, Requirement};
use ztrust_agent::policy::{AllowKey, Changes, Engine, matches};
use ztrust_common::{
    EndpointInfo, IpcacheKey, IpcacheValue, PolicyKey, PolicyValue, ServiceKey, ServiceValue, dir, proto,
};

#[path = "../../tests/src/bench/synth.rs"]
#[allow(dead_code, reason = "shared with ztrust-bench, which uses more of it")]
mod synth;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn req(key: &str, operator: Operator, values: &[&str]) -> Requirement {
    Requirement {
        key: key.into(),
        operator,
        values: values.iter().map(|v| (*v).to_owned()).collect::<BTreeSet<_>>(),
    }
}

fn selectors(c: &mut Criterion) {
    let pod = labels(&[
        ("app", "checkout"),
        ("tier", "api"),
        ("version", "v2"),
        ("team", "payments"),
        ("pod-template-hash", "5d9c7b8f4"),
    ]);
    let cases = [
        (
            "match_labels_hit",
            LabelSelector {
                match_labels: labels(&[("app", "checkout"), ("tier", "api")]),
                match_expressions: vec![],
            },
        ),
        (
            "match_labels_miss",
            LabelSelector {
                match_labels: labels(&[("app", "billing")]),
                match_expressions: vec![],
            },
        ),
        (
            "expressions",
            LabelSelector {
                match_labels: Labels::new(),
                match_expressions: vec![
                    req("tier", Operator::In, &["web", "api"]),
                    req("team", Operator::NotIn, &["infra"]),
                    req("version", Operator::Exists, &[]),
                    req("canary", Operator::DoesNotExist, &[]),
                ],
            },
        ),
        ("empty", LabelSelector::default()),
    ];
    let mut g = c.benchmark_group("selector");
    for (name, sel) in &cases {
        g.bench_function(*name, |b| b.iter(|| matches(black_box(sel), black_box(&pod))));
    }
    g.finish();
}

fn compile(c: &mut Criterion) {
    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    for (policies, pods) in [(100usize, 500usize), (1_000, 5_000)] {
        let s = synth::Synth::new(policies, pods, 100, true);
        g.bench_with_input(
            BenchmarkId::new("cold", format!("{policies}p_{pods}pods")),
            &s.cluster,
            |b, cluster| b.iter(|| Engine::new().compile(black_box(cluster))),
        );
        // The engine keeps its identity and rule numbers: a recompile of an unchanged cluster.
        let mut engine = Engine::new();
        engine.compile(&s.cluster);
        g.bench_with_input(
            BenchmarkId::new("warm", format!("{policies}p_{pods}pods")),
            &s.cluster,
            |b, cluster| b.iter(|| engine.compile(black_box(cluster))),
        );
    }
    g.finish();
}

/// One pod's `tier` label flipped back and forth, the engine told which pod changed (as a watch event
/// names it): the cost of an incremental update, for a pod of this node and for one of another node.
fn update(c: &mut Criterion) {
    let mut g = c.benchmark_group("update");
    for (policies, pods) in [(1_000usize, 5_000usize), (10_000, 50_000)] {
        let mut s = synth::Synth::new(policies, pods, 100, true);
        let mut engine = Engine::for_node(synth::THIS_NODE);
        engine.update(&s.cluster, &Changes::default());
        let local = s.interfaces.keys().next().expect("a local pod").clone();
        let remote = s
            .cluster
            .pods
            .keys()
            .find(|p| !s.interfaces.contains_key(*p))
            .expect("a remote pod")
            .clone();
        for (name, pod) in [("local_pod_label", local), ("remote_pod_label", remote)] {
            let changes = Changes {
                pods: [pod.clone()].into(),
                ..Changes::default()
            };
            let mut flip = false;
            g.bench_function(BenchmarkId::new(name, format!("{policies}p_{pods}pods")), |b| {
                b.iter(|| {
                    flip = !flip;
                    let tier = if flip { "db" } else { "web" };
                    s.cluster
                        .pods
                        .get_mut(&pod)
                        .expect("pod")
                        .labels
                        .insert("tier".into(), tier.into());
                    engine.update(black_box(&s.cluster), &changes);
                    engine.take_delta()
                })
            });
        }
    }
    g.finish();
}

fn keys(c: &mut Criterion) {
    let key = |protocol, lo, hi| AllowKey {
        direction: dir::INGRESS,
        remote: 300,
        protocol,
        port_lo: lo,
        port_hi: hi,
    };
    let cases = [
        ("one_port", key(proto::TCP, 8080, 8080)),
        ("range_30000_30100", key(proto::TCP, 30000, 30100)),
        ("range_1_65534", key(proto::TCP, 1, 65534)),
        ("any_port", key(proto::UDP, 0, u16::MAX)),
        ("any_protocol", key(proto::ANY, 0, u16::MAX)),
    ];
    let mut g = c.benchmark_group("policy_keys");
    for (name, k) in &cases {
        g.bench_function(*name, |b| b.iter(|| policy_keys(black_box(42), black_box(k))));
    }
    g.finish();
}

/// Map writes that go nowhere: the cost measured is the diff.
struct NoMaps(usize);
impl MapOps for NoMaps {
    fn set_endpoint(&mut self, _: u32, _: &EndpointInfo) -> SyncResult<()> {
        self.0 += 1;
        Ok(())
    }
    fn del_endpoint(&mut self, _: u32) -> SyncResult<()> {
        self.0 += 1;
        Ok(())
    }
    fn set_ipcache(&mut self, _: u32, _: &IpcacheKey, _: &IpcacheValue) -> SyncResult<()> {
        self.0 += 1;
        Ok(())
    }
    fn del_ipcache(&mut self, _: u32, _: &IpcacheKey) -> SyncResult<()> {
        self.0 += 1;
        Ok(())
    }
    fn set_policy(&mut self, _: u32, _: &PolicyKey, _: &PolicyValue) -> SyncResult<()> {
        self.0 += 1;
        Ok(())
    }
    fn del_policy(&mut self, _: u32, _: &PolicyKey) -> SyncResult<()> {
        self.0 += 1;
        Ok(())
    }
    fn set_service(&mut self, _: &ServiceKey, _: &ServiceValue) -> SyncResult<()> {
        self.0 += 1;
        Ok(())
    }
    fn del_service(&mut self, _: &ServiceKey) -> SyncResult<()> {
        self.0 += 1;
        Ok(())
    }
    fn set_service_range(&mut self, _: u32, _: &IpcacheKey) -> SyncResult<()> {
        self.0 += 1;
        Ok(())
    }
    fn del_service_range(&mut self, _: u32, _: &IpcacheKey) -> SyncResult<()> {
        self.0 += 1;
        Ok(())
    }
    fn bump_revision(&mut self) -> SyncResult<()> {
        Ok(())
    }
}

fn sync_unchanged(c: &mut Criterion) {
    let mut g = c.benchmark_group("sync_no_change");
    g.sample_size(20);
    for (policies, pods) in [(100usize, 500usize), (1_000, 5_000)] {
        let s = synth::Synth::new(policies, pods, 100, true);
        let desired = Engine::new().compile(&s.cluster);
        let interfaces: BTreeMap<_, _> = s.interfaces.clone();
        let mut syncer = Syncer::new();
        syncer.capacities.policy = 1 << 22;
        syncer.capacities.ipcache = 1 << 22;
        let mut maps = NoMaps(0);
        syncer.sync(&mut maps, &desired, &interfaces).expect("first sync");
        g.bench_function(
            BenchmarkId::from_parameter(format!("{policies}p_{pods}pods")),
            |b| {
                b.iter(|| {
                    let stats = syncer
                        .sync(&mut maps, black_box(&desired), &interfaces)
                        .expect("sync");
                    assert_eq!(stats.total(), 0);
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, selectors, compile, update, keys, sync_unchanged);
criterion_main!(benches);
