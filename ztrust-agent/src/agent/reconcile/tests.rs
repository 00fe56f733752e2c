use std::path::PathBuf;

use ztrust_common::{
    EndpointInfo, IpcacheKey, IpcacheValue, PolicyKey, PolicyValue, ServiceKey, ServiceValue,
};

use super::*;
use crate::datapath::sync::{Error as SyncError, Result as SyncResult};
use crate::model::Pod;
use crate::source::dir::DirSource;

#[test]
fn a_warning_is_said_once_while_it_holds_and_again_when_it_recurs() {
    let mut warned = BTreeSet::new();
    let (a, b) = (
        "policy x/p: ingress[0].from[0].ipBlock.cidr invalid".to_owned(),
        "port name web unknown".to_owned(),
    );
    assert_eq!(fresh_warnings(&mut warned, std::slice::from_ref(&a)), vec![&a]);
    assert!(
        fresh_warnings(&mut warned, std::slice::from_ref(&a)).is_empty(),
        "a change elsewhere does not repeat it"
    );
    assert_eq!(fresh_warnings(&mut warned, &[a.clone(), b.clone()]), vec![&b]);
    assert!(fresh_warnings(&mut warned, &[]).is_empty());
    assert_eq!(
        fresh_warnings(&mut warned, std::slice::from_ref(&a)),
        vec![&a],
        "fixed, then broken again: said again"
    );
}

fn pod(ns: &str, name: &str, host_network: bool, node: Option<&str>) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        ips: vec!["10.0.0.5".parse().unwrap()],
        host_network,
        node_name: node.map(Into::into),
        ..Default::default()
    }
}

fn cluster(pods: Vec<Pod>) -> Cluster {
    Cluster {
        pods: pods.into_iter().map(|p| (p.object_ref(), p)).collect(),
        ..Default::default()
    }
}

#[test]
fn local_host_network_pods_are_this_nodes_only() {
    let c = cluster(vec![
        pod("kube-system", "node-exporter", true, Some("n1")),
        pod("kube-system", "kube-proxy", true, Some("n2")),
        pod("kube-system", "unscheduled", true, None),
        pod("shop", "web", false, Some("n1")),
    ]);
    let local: Vec<ObjectRef> = c
        .pods
        .values()
        .filter(|p| is_local_host_network(p, "n1"))
        .map(Pod::object_ref)
        .collect();
    assert_eq!(
        local,
        [
            ObjectRef::new("kube-system", "node-exporter"),
            ObjectRef::new("kube-system", "unscheduled")
        ]
    );
}

#[test]
fn not_enforced_pods_are_warned_once_and_counted() {
    let metrics = crate::metrics::Metrics::default();
    let hub = crate::observer::Hub::new(Default::default());
    let gauge = |m: &crate::metrics::Metrics| {
        m.render().lines().find_map(|l| {
            l.strip_prefix(r#"ztrust_pods_not_enforced{reason="host_network"} "#)
                .map(str::to_owned)
        })
    };
    let mut ne = NotEnforced::default();
    let exporter = ObjectRef::new("kube-system", "node-exporter");
    let with = cluster(vec![
        pod("kube-system", "node-exporter", true, Some("n1")),
        pod("shop", "web", false, Some("n1")),
    ]);
    let all: BTreeSet<ObjectRef> = with.pods.keys().cloned().collect();
    let report = |ne: &mut NotEnforced, c: &Cluster, node: &str| ne.report(c, &all, node, &metrics, &hub);
    assert_eq!(report(&mut ne, &with, "n1"), std::slice::from_ref(&exporter));
    assert_eq!(gauge(&metrics).as_deref(), Some("1"));
    assert_eq!(
        hub.not_enforced(),
        [("kube-system/node-exporter".to_owned(), "host_network".to_owned())]
    );
    // The next snapshot with the same pod: counted, not warned again.
    assert!(report(&mut ne, &with, "n1").is_empty());
    assert_eq!(gauge(&metrics).as_deref(), Some("1"));
    // A change that does not name it leaves it alone (only changed pods are looked at).
    let web_only: BTreeSet<ObjectRef> = [ObjectRef::new("shop", "web")].into();
    assert!(ne.report(&with, &web_only, "n1", &metrics, &hub).is_empty());
    assert_eq!(gauge(&metrics).as_deref(), Some("1"));
    // Gone: back to 0; back again: warned again.
    let without = cluster(vec![pod("shop", "web", false, Some("n1"))]);
    assert!(report(&mut ne, &without, "n1").is_empty());
    assert_eq!(gauge(&metrics).as_deref(), Some("0"));
    assert!(hub.not_enforced().is_empty());
    assert_eq!(report(&mut ne, &with, "n1"), [exporter]);
    // Another node's hostNetwork pods are not this agent's to report.
    assert!(report(&mut ne, &with, "n2").is_empty());
    assert_eq!(gauge(&metrics).as_deref(), Some("0"));
}

/// The maps as the sync writes them: endpoints by interface, and how many writes of any kind; every
/// write fails while `refuse` is set.
#[derive(Default)]
struct Maps {
    endpoints: BTreeMap<u32, EndpointInfo>,
    writes: usize,
    refuse: bool,
}

impl Maps {
    fn write(&mut self) -> SyncResult<()> {
        if self.refuse {
            return Err(SyncError::Write {
                map: "ZT_POLICY",
                source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_elem",
                    io_error: std::io::Error::from_raw_os_error(28),
                }),
            });
        }
        self.writes += 1;
        Ok(())
    }
}

impl MapOps for Maps {
    fn set_endpoint(&mut self, ifindex: u32, info: &EndpointInfo) -> SyncResult<()> {
        self.write()?;
        self.endpoints.insert(ifindex, *info);
        Ok(())
    }
    fn del_endpoint(&mut self, ifindex: u32) -> SyncResult<()> {
        self.write()?;
        self.endpoints.remove(&ifindex);
        Ok(())
    }
    fn set_ipcache(&mut self, _: u32, _: &IpcacheKey, _: &IpcacheValue) -> SyncResult<()> {
        self.write()
    }
    fn del_ipcache(&mut self, _: u32, _: &IpcacheKey) -> SyncResult<()> {
        self.write()
    }
    fn set_policy(&mut self, _: u32, _: &PolicyKey, _: &PolicyValue) -> SyncResult<()> {
        self.write()
    }
    fn del_policy(&mut self, _: u32, _: &PolicyKey) -> SyncResult<()> {
        self.write()
    }
    fn set_service(&mut self, _: &ServiceKey, _: &ServiceValue) -> SyncResult<()> {
        self.write()
    }
    fn del_service(&mut self, _: &ServiceKey) -> SyncResult<()> {
        self.write()
    }
    fn set_service_range(&mut self, _: u32, _: &IpcacheKey) -> SyncResult<()> {
        self.write()
    }
    fn del_service_range(&mut self, _: u32, _: &IpcacheKey) -> SyncResult<()> {
        self.write()
    }
    fn bump_revision(&mut self) -> SyncResult<()> {
        self.write()
    }
}

/// Interfaces the programs are on.
#[derive(Default)]
struct Links(BTreeMap<String, u32>);

impl Attach for Links {
    fn is_attached(&self, ifname: &str) -> bool {
        self.0.contains_key(ifname)
    }
    fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<(), String> {
        self.0.insert(ifname.to_owned(), ifindex);
        Ok(())
    }
}

const PAYMENTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: payments}
---
apiVersion: v1
kind: Pod
metadata: {name: backend, namespace: payments, labels: {app: backend}}
spec: {nodeName: n1, containers: []}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: database, namespace: payments, labels: {app: database}}
spec: {nodeName: n1, containers: []}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere, namespace: payments, labels: {app: database}}
spec: {nodeName: n2, containers: []}
status: {podIP: 10.0.1.9}
"#;

const DATABASE_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: database, namespace: payments}
spec:
  podSelector: {matchLabels: {app: database}}
  ingress: [{from: [{podSelector: {matchLabels: {app: backend}}}], ports: [{port: 5432}]}]
"#;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_pass_runs_source_bind_sync_and_report_in_order_without_root() {
    let dir = Dir(std::env::temp_dir().join(format!("ztrust-reconcile-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("mkdir");
    std::fs::write(dir.0.join("pods.yaml"), PAYMENTS).expect("write");
    std::fs::write(dir.0.join("policy.yaml"), DATABASE_POLICY).expect("write");
    let health = Health::default();
    let view = Arc::new(RwLock::new(View::default()));
    let mut r = Reconciler::new(
        DirSource::new(dir.0.clone(), &Cluster::default()),
        Engine::for_node("n1"),
        Syncer::new(),
        Binder::new(vec!["veth".into()]),
        Outputs {
            view: view.clone(),
            metrics: Arc::new(Metrics::default()),
            hub: Arc::new(Hub::new(Default::default())),
            health: health.clone(),
        },
    );
    let (mut maps, mut links) = (Maps::default(), Links::default());
    let ifaces: BTreeMap<String, u32> = [("veth-backend".into(), 7), ("veth-database".into(), 8)].into();
    let routes = HostRoutes(
        [
            ("10.0.0.1".parse().expect("ip"), "veth-backend".to_owned()),
            ("10.0.0.2".parse().expect("ip"), "veth-database".to_owned()),
        ]
        .into(),
    );
    let started = Instant::now();

    // No snapshot yet: nothing is written (an earlier agent's pinned state keeps enforcing).
    r.bind(&mut links, &ifaces, &routes);
    assert_eq!(r.sync(&mut maps, started), Synced::Nothing);
    assert_eq!(maps.writes, 0);
    assert!(!health.is_ready());

    // The first pass: both local pods bound (the other node's pod is a peer), written, ready.
    r.apply_source(None, Instant::now());
    r.bind(&mut links, &ifaces, &routes);
    assert_eq!(r.bindings().values().copied().collect::<Vec<_>>(), [7, 8]);
    assert_eq!(links.0.len(), 2);
    let Synced::First(stats) = r.sync(&mut maps, started) else {
        panic!("the first sync");
    };
    assert!(stats.total() > 0 && maps.writes == stats.total());
    assert_eq!(maps.endpoints.keys().copied().collect::<Vec<_>>(), [7, 8]);
    let isolated = |m: &Maps, i: u32| m.endpoints[&i].flags & ztrust_common::ep_flags::ISOLATED_INGRESS != 0;
    assert!(
        isolated(&maps, 8) && !isolated(&maps, 7),
        "the policy isolates the database only"
    );
    assert!(health.is_ready());
    r.report();
    let database_view = view
        .read()
        .expect("view")
        .endpoints
        .get(&8)
        .cloned()
        .expect("reported");
    assert_eq!(database_view.pod, ObjectRef::new("payments", "database"));
    assert_eq!(
        database_view.ingress_policies,
        [ObjectRef::new("payments", "database")]
    );

    // Nothing changed: nothing written.
    r.apply_source(None, Instant::now());
    r.bind(&mut links, &ifaces, &routes);
    assert_eq!(r.sync(&mut maps, started), Synced::Nothing);

    // The policy removed while the maps refuse writes: refused, and retried at the next pass.
    std::fs::remove_file(dir.0.join("policy.yaml")).expect("rm");
    r.apply_source(None, Instant::now());
    maps.refuse = true;
    assert_eq!(r.sync(&mut maps, started), Synced::Refused);
    assert!(isolated(&maps, 8), "the last applied state keeps enforcing");
    maps.refuse = false;
    assert!(matches!(r.sync(&mut maps, started), Synced::Again(s) if s.total() > 0));
    assert!(!isolated(&maps, 8));
    r.report();
    assert!(
        view.read().expect("view").endpoints[&8]
            .ingress_policies
            .is_empty()
    );
}
