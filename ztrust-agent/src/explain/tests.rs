use std::collections::{BTreeMap, BTreeSet};

use aya::maps::MapError;
use ztrust_common::{
    EndpointInfo, IpcacheKey, IpcacheValue, PolicyKey, PolicyValue, ServiceKey, ServiceValue,
};

use super::*;
use crate::datapath::sync::{MapOps, Result as SyncResult, Syncer, audit_namespaces};
use crate::policy::Engine;
use crate::source::dir;

/// The seed's payments exercise: three tiers, DNS, a Service per tier, default deny.
pub(crate) const PAYMENTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: payments, labels: {kubernetes.io/metadata.name: payments}}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system, labels: {kubernetes.io/metadata.name: kube-system}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: payments, labels: {app: frontend}}
spec: {containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: backend, namespace: payments, labels: {app: backend}}
spec: {containers: [{name: api, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: database, namespace: payments, labels: {app: database}}
spec: {containers: [{name: pg, ports: [{name: pg, containerPort: 5432}]}]}
status: {podIP: 10.244.0.12}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec: {containers: [{name: dns, ports: [{containerPort: 53, protocol: UDP}]}]}
status: {podIP: 10.244.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: payments}
spec: {clusterIP: 10.96.0.21, selector: {app: backend}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: backend-1, namespace: payments, labels: {kubernetes.io/service-name: backend}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.0.11], conditions: {ready: true}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-all, namespace: payments}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-dns, namespace: payments}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}]
    ports: [{protocol: UDP, port: 53}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend-egress, namespace: payments}
spec:
  podSelector: {matchLabels: {app: frontend}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: backend}}}]
    ports: [{port: http}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-ingress, namespace: payments}
spec:
  podSelector: {matchLabels: {app: backend}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
    ports: [{port: 8080}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-egress, namespace: payments}
spec:
  podSelector: {matchLabels: {app: backend}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: database}}}]
    ports: [{port: 5432}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: database-ingress, namespace: payments}
spec:
  podSelector: {matchLabels: {app: database}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: backend}}}]
    ports: [{port: 5432}]
"#;

struct Fixture {
    cluster: Cluster,
    desired: Desired,
    audit: BTreeSet<String>,
}

impl Fixture {
    fn new(yaml: &str) -> Self {
        let loaded = dir::parse_str("payments.yaml", yaml);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let mut cluster = loaded.cluster;
        cluster.node_ips = vec!["192.168.1.10".parse().unwrap()];
        cluster.service_cidrs = vec!["10.96.0.0/16".parse().unwrap()];
        let desired = Engine::new().compile(&cluster);
        let audit = audit_namespaces(&cluster);
        Self {
            cluster,
            desired,
            audit,
        }
    }

    fn state(&self) -> State<'_> {
        State {
            cluster: &self.cluster,
            desired: &self.desired,
            node: None,
            audit_namespaces: &self.audit,
            audit_all: false,
        }
    }

    fn explain(&self, from: &str, to: &str) -> Explanation {
        explain(&self.state(), &Query::parse(from, to).unwrap(), None).unwrap()
    }
}

fn end<'a>(x: &'a Explanation, pod: &str, direction: Direction) -> &'a End {
    x.ends
        .iter()
        .find(|e| e.pod.to_string() == pod && e.direction == direction)
        .unwrap_or_else(|| panic!("no {direction} end of {pod} in {x:#?}"))
}

#[test]
fn queries_are_read_as_pods_or_addresses_with_port_and_protocol() {
    let q = Query::parse("payments/frontend", "payments/database:5432/tcp").unwrap();
    assert_eq!(q.from, Target::Pod(ObjectRef::new("payments", "frontend")));
    assert_eq!(q.to, Target::Pod(ObjectRef::new("payments", "database")));
    assert_eq!((q.port, q.protocol), (5432, Protocol::Tcp));
    let q = Query::parse("10.244.0.10", "10.96.0.10:53/UDP").unwrap();
    assert_eq!(q.to, Target::Address("10.96.0.10".parse().unwrap()));
    assert_eq!(q.protocol, Protocol::Udp);
    let q = Query::parse("[fd00::1]", "[fd00::5]:80").unwrap();
    assert_eq!(q.to, Target::Address("fd00::5".parse().unwrap()));
    assert_eq!((q.port, q.protocol), (80, Protocol::Tcp), "TCP by default");

    for (to, want) in [
        (
            "payments/database",
            QueryError::NoPort("payments/database".into()),
        ),
        ("payments/database:0", QueryError::Port("0".into())),
        ("payments/database:99999", QueryError::Port("99999".into())),
        ("payments/database:5432/icmp", QueryError::Protocol("icmp".into())),
        ("fd00::5:80", QueryError::Brackets("fd00::5:80".into())),
        ("nonsense:80", QueryError::Target("nonsense".into())),
    ] {
        assert_eq!(Query::parse("payments/frontend", to), Err(want), "{to}");
    }
    assert_eq!(
        Query::parse("frontend", "payments/database:5432"),
        Err(QueryError::Target("frontend".into()))
    );
}

#[test]
fn an_allowed_connection_names_the_rule_peer_and_port_at_both_ends() {
    let f = Fixture::new(PAYMENTS);
    let x = f.explain("payments/frontend", "payments/backend:8080");
    assert_eq!(x.verdict, Verdict::Forwarded, "{}", render(&x));
    assert!(x.consistent(), "{}", render(&x));
    let eg = end(&x, "payments/frontend", Direction::Egress);
    assert_eq!(eg.reason, Reason::AllowedByPolicy);
    let rule = eg.allowed_by.as_ref().unwrap();
    assert_eq!(
        (rule.policy.to_string().as_str(), rule.index),
        ("payments/frontend-egress", 0)
    );
    assert_eq!(rule.peer, "to[0]: pods app=backend of namespace payments");
    assert_eq!(rule.port, "ports[0]: http (8080/TCP on payments/backend)");
    assert_ne!(eg.rule_id, 0);
    let ing = end(&x, "payments/backend", Direction::Ingress);
    assert_eq!(ing.reason, Reason::AllowedByPolicy);
    assert_eq!(
        ing.allowed_by.as_ref().unwrap().policy,
        ObjectRef::new("payments", "backend-ingress")
    );
    assert_eq!(
        ing.isolating,
        [
            ObjectRef::new("payments", "backend-ingress"),
            ObjectRef::new("payments", "default-deny-all")
        ]
    );
    assert!(ing.not_allowed_by.is_empty());
}

#[test]
fn a_denied_connection_says_why_each_rule_does_not_allow_it() {
    let f = Fixture::new(PAYMENTS);
    let x = f.explain("payments/frontend", "payments/database:5432/tcp");
    assert_eq!(x.verdict, Verdict::Dropped, "{}", render(&x));
    assert!(x.consistent(), "{}", render(&x));
    let eg = end(&x, "payments/frontend", Direction::Egress);
    assert_eq!((eg.verdict, eg.reason), (Verdict::Dropped, Reason::PolicyDenied));
    assert!(eg.allowed_by.is_none());
    let whys: Vec<String> = eg
        .not_allowed_by
        .iter()
        .map(|m| format!("{}[{}]: {}", m.policy, m.index, m.why))
        .collect();
    assert_eq!(
        whys,
        [
            "payments/allow-dns[0]: pod payments/database (labels app=database) is none of its peers (to[0]: pods \
             k8s-app=kube-dns of namespaces kubernetes.io/metadata.name=kube-system), and port 5432/TCP is none of \
             its ports (ports[0]: 53/UDP)",
            "payments/frontend-egress[0]: pod payments/database (labels app=database) is none of its peers (to[0]: \
             pods app=backend of namespace payments), and port 5432/TCP is none of its ports (ports[0]: http/TCP \
             (payments/database declares no such port))",
        ]
    );
    let ing = end(&x, "payments/database", Direction::Ingress);
    assert_eq!(ing.reason, Reason::PolicyDenied);
    assert_eq!(ing.not_allowed_by.len(), 1);
    assert!(
        ing.not_allowed_by[0]
            .why
            .starts_with("pod payments/frontend (labels app=frontend) is none of its peers"),
        "{}",
        ing.not_allowed_by[0].why
    );
    let text = render(&x);
    for want in [
        "Verdict  dropped",
        "egress of payments/frontend",
        "no rule allows it:",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }
}

#[test]
fn a_service_frontend_is_judged_by_its_backends_and_each_backend_at_its_ingress() {
    let f = Fixture::new(PAYMENTS);
    let x = f.explain("payments/frontend", "10.96.0.21:80");
    assert_eq!(x.verdict, Verdict::Forwarded, "{}", render(&x));
    let hop = x.service.as_ref().unwrap();
    assert_eq!(hop.services, [ObjectRef::new("payments", "backend")]);
    assert_eq!(hop.backends.len(), 1);
    assert_eq!(hop.backends[0].port, 8080);
    let eg = end(&x, "payments/frontend", Direction::Egress);
    assert_eq!(eg.backends.len(), 1);
    assert!(eg.backends[0].allowed);
    let ing = end(&x, "payments/backend", Direction::Ingress);
    assert_eq!((ing.port, ing.reason), (8080, Reason::AllowedByPolicy));
    assert!(x.consistent(), "{}", render(&x));

    // The database's egress to the same Service: its backends allow none of it.
    let x = f.explain("payments/database", "10.96.0.21:80");
    let eg = end(&x, "payments/database", Direction::Egress);
    assert_eq!(eg.reason, Reason::PolicyDenied, "{}", render(&x));
    assert!(!eg.backends[0].allowed);
    assert!(
        !eg.not_allowed_by.is_empty()
            && eg
                .not_allowed_by
                .iter()
                .all(|m| m.why.starts_with("to backend payments/backend at port 8080: ")),
        "why none allows it is told of the backends, not of the ClusterIP: {:?}",
        eg.not_allowed_by
    );

    // An address of the Service range that no Service has.
    let x = f.explain("payments/frontend", "10.96.0.99:80");
    let eg = end(&x, "payments/frontend", Direction::Egress);
    assert_eq!(
        (eg.verdict, eg.reason),
        (Verdict::Dropped, Reason::UnknownService)
    );
    assert!(x.consistent(), "{}", render(&x));
}

#[test]
fn the_node_is_let_in_and_audit_mode_would_drop() {
    let f = Fixture::new(PAYMENTS);
    let x = f.explain("192.168.1.10", "payments/database:5432");
    assert_eq!(x.verdict, Verdict::Forwarded, "{}", render(&x));
    assert_eq!(
        end(&x, "payments/database", Direction::Ingress).reason,
        Reason::FromHost
    );
    assert!(x.from.host);

    let audited = PAYMENTS.replace(
        "metadata: {name: payments, labels:",
        "metadata: {name: payments, annotations: {ztrust.io/mode: audit}, labels:",
    );
    let f = Fixture::new(&audited);
    let x = f.explain("payments/frontend", "payments/database:5432");
    assert_eq!(x.verdict, Verdict::WouldDrop, "{}", render(&x));
    assert!(x.ends.iter().all(|e| e.mode == Mode::Audit));
}

#[test]
fn unknown_pods_and_addressless_pods_are_errors_naming_them() {
    let f = Fixture::new(PAYMENTS);
    let q = Query::parse("payments/nope", "payments/database:5432").unwrap();
    assert_eq!(
        explain(&f.state(), &q, None).unwrap_err().to_string(),
        "pod payments/nope: no such pod in the cluster the agent watches"
    );
    let q = Query::parse("payments/frontend", "[fd00::9]:80").unwrap();
    assert!(matches!(
        explain(&f.state(), &q, None),
        Err(ExplainError::NoCommonFamily { .. })
    ));
}

#[test]
fn a_pod_of_another_node_is_explained_from_the_objects_and_said_to_be_elsewhere() {
    let yaml = PAYMENTS.replace(
        "spec: {containers: [{name: pg,",
        "spec: {nodeName: node-2, containers: [{name: pg,",
    );
    let loaded = dir::parse_str("payments.yaml", &yaml);
    let cluster = loaded.cluster;
    let desired = Engine::for_node("node-1").compile(&cluster);
    let audit = BTreeSet::new();
    let state = State {
        cluster: &cluster,
        desired: &desired,
        node: Some("node-1"),
        audit_namespaces: &audit,
        audit_all: false,
    };
    let x = explain(
        &state,
        &Query::parse("payments/backend", "payments/database:5432").unwrap(),
        None,
    )
    .unwrap();
    let ing = end(&x, "payments/database", Direction::Ingress);
    assert!(!ing.here);
    assert_eq!(ing.reason, Reason::AllowedByPolicy);
    assert!(
        x.notes.iter().any(|n| n.contains("runs on node-2")),
        "{:?}",
        x.notes
    );
}

/// The kernel maps as a test double: what the sync writes, looked up by longest prefix.
#[derive(Default)]
struct Maps {
    endpoints: BTreeMap<u32, EndpointInfo>,
    ipcache: BTreeMap<(u32, IpcacheKey), u32>,
    policy: BTreeMap<(u32, PolicyKey), u32>,
    services: BTreeMap<ServiceKey, ServiceValue>,
    ranges: BTreeSet<(u32, IpcacheKey)>,
}

fn prefix_matches(prefix: u32, a: &[u8], b: &[u8]) -> bool {
    (0..prefix as usize).all(|i| (a[i / 8] >> (7 - i % 8)) & 1 == (b[i / 8] >> (7 - i % 8)) & 1)
}

fn policy_bytes(k: &PolicyKey) -> Vec<u8> {
    [&k.endpoint[..], &k.identity, &[k.direction, k.protocol], &k.port].concat()
}

impl MapOps for Maps {
    fn set_endpoint(&mut self, ifindex: u32, info: &EndpointInfo) -> SyncResult<()> {
        self.endpoints.insert(ifindex, *info);
        Ok(())
    }
    fn del_endpoint(&mut self, ifindex: u32) -> SyncResult<()> {
        self.endpoints.remove(&ifindex);
        Ok(())
    }
    fn set_ipcache(&mut self, prefix: u32, key: &IpcacheKey, value: &IpcacheValue) -> SyncResult<()> {
        self.ipcache.insert((prefix, *key), value.identity);
        Ok(())
    }
    fn del_ipcache(&mut self, prefix: u32, key: &IpcacheKey) -> SyncResult<()> {
        self.ipcache.remove(&(prefix, *key));
        Ok(())
    }
    fn set_policy(&mut self, prefix: u32, key: &PolicyKey, value: &PolicyValue) -> SyncResult<()> {
        self.policy.insert((prefix, *key), value.rule_id);
        Ok(())
    }
    fn del_policy(&mut self, prefix: u32, key: &PolicyKey) -> SyncResult<()> {
        self.policy.remove(&(prefix, *key));
        Ok(())
    }
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> SyncResult<()> {
        self.services.insert(*key, *value);
        Ok(())
    }
    fn del_service(&mut self, key: &ServiceKey) -> SyncResult<()> {
        self.services.remove(key);
        Ok(())
    }
    fn set_service_range(&mut self, prefix: u32, key: &IpcacheKey) -> SyncResult<()> {
        self.ranges.insert((prefix, *key));
        Ok(())
    }
    fn del_service_range(&mut self, prefix: u32, key: &IpcacheKey) -> SyncResult<()> {
        self.ranges.remove(&(prefix, *key));
        Ok(())
    }
    fn bump_revision(&mut self) -> SyncResult<()> {
        Ok(())
    }
}

impl kernel::Lookup for Maps {
    fn endpoint(&self, ifindex: u32) -> Result<Option<EndpointInfo>, MapError> {
        Ok(self.endpoints.get(&ifindex).copied())
    }
    fn ipcache_host(&self, addr: &[u8; 16]) -> Result<Option<u32>, MapError> {
        Ok(self.ipcache.get(&(128, IpcacheKey { addr: *addr })).copied())
    }
    fn ipcache_longest(&self, addr: &[u8; 16]) -> Result<Option<u32>, MapError> {
        Ok(self
            .ipcache
            .iter()
            .filter(|((p, k), _)| *p < 128 && prefix_matches(*p, &k.addr, addr))
            .max_by_key(|((p, _), _)| *p)
            .map(|(_, id)| *id))
    }
    fn policy_exact(&self, key: &PolicyKey) -> Result<Option<u32>, MapError> {
        Ok(self.policy.get(&(PolicyKey::PREFIX_FULL, *key)).copied())
    }
    fn policy_longest(&self, key: &PolicyKey) -> Result<Option<u32>, MapError> {
        let want = policy_bytes(key);
        Ok(self
            .policy
            .iter()
            .filter(|((p, k), _)| *p < PolicyKey::PREFIX_FULL && prefix_matches(*p, &policy_bytes(k), &want))
            .max_by_key(|((p, _), _)| *p)
            .map(|(_, r)| *r))
    }
    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, MapError> {
        Ok(self.services.get(key).copied())
    }
    fn in_service_ranges(&self, addr: &[u8; 16]) -> Result<bool, MapError> {
        Ok(self.ranges.iter().any(|(p, k)| prefix_matches(*p, &k.addr, addr)))
    }
    fn node_ports(&self) -> Result<u32, MapError> {
        Ok(ztrust_common::node_ports::LISTED)
    }
    fn node_local(&self, _: &[u8; 16]) -> Result<Option<u32>, MapError> {
        Ok(None)
    }
}

/// The fixture synced into the double, with each pod on an interface of its own.
fn synced(f: &Fixture) -> (Maps, BTreeMap<ObjectRef, u32>) {
    let interfaces: BTreeMap<ObjectRef, u32> = f
        .desired
        .endpoints
        .keys()
        .enumerate()
        .map(|(i, p)| (p.clone(), 10 + i as u32))
        .collect();
    let mut maps = Maps::default();
    let mut syncer = Syncer::new();
    syncer.audit_namespaces = f.audit.clone();
    syncer.sync(&mut maps, &f.desired, &interfaces).unwrap();
    (maps, interfaces)
}

#[test]
fn the_kernel_lookups_agree_with_the_compiled_state_for_every_pair_and_port() {
    let f = Fixture::new(PAYMENTS);
    let (maps, interfaces) = synced(&f);
    let ifindex_of = |p: &ObjectRef| interfaces.get(p).copied();
    let mut targets: Vec<String> = f.cluster.pods.keys().map(ToString::to_string).collect();
    targets.extend(["192.168.1.10", "10.96.0.21", "10.96.0.99", "1.1.1.1"].map(String::from));
    let (mut checked, mut dropped) = (0, 0);
    for from in &targets {
        for to in &targets {
            for port in ["53/udp", "80", "5432", "8080", "9090"] {
                let q = Query::parse(from, &format!("{to}:{port}")).unwrap();
                let x = explain(&f.state(), &q, Some((&maps, &ifindex_of))).unwrap();
                assert!(x.consistent(), "{from} → {to}:{port}\n{}", render(&x));
                for e in &x.ends {
                    let k = e.kernel.as_ref().expect("every pod is bound");
                    assert!(k.agrees);
                    checked += 1;
                    dropped += usize::from(k.verdict == Verdict::Dropped);
                }
            }
        }
    }
    assert!(
        checked > 200 && dropped > 50 && dropped < checked,
        "{checked} checked, {dropped} dropped"
    );
}

#[test]
fn a_kernel_map_that_differs_from_the_compiled_state_is_said() {
    let f = Fixture::new(PAYMENTS);
    let (mut maps, interfaces) = synced(&f);
    let ifindex_of = |p: &ObjectRef| interfaces.get(p).copied();
    let backend = interfaces[&ObjectRef::new("payments", "backend")];
    let endpoint_id = maps.endpoints[&backend].endpoint_id;
    // The backend's ingress allow entries go, as if a write had been lost.
    maps.policy.retain(|(_, k), _| {
        u32::from_be_bytes(k.endpoint) != endpoint_id || k.direction != ztrust_common::dir::INGRESS
    });
    let q = Query::parse("payments/frontend", "payments/backend:8080").unwrap();
    let x = explain(&f.state(), &q, Some((&maps, &ifindex_of))).unwrap();
    assert!(!x.consistent());
    let ing = end(&x, "payments/backend", Direction::Ingress);
    let k = ing.kernel.as_ref().unwrap();
    assert_eq!(
        (k.verdict, k.reason, k.agrees),
        (Verdict::Dropped, Reason::PolicyDenied, false)
    );
    assert_eq!(
        ing.verdict,
        Verdict::Forwarded,
        "the compiled state's answer stays the answer"
    );
    assert!(
        ing.disagreements[0].starts_with("the kernel maps say dropped (policy-denied)"),
        "{:?}",
        ing.disagreements
    );
    assert!(render(&x).contains("DIFFERS"));

    // An interface with no endpoint entry.
    maps.endpoints.remove(&backend);
    let x = explain(&f.state(), &q, Some((&maps, &ifindex_of))).unwrap();
    let ing = end(&x, "payments/backend", Direction::Ingress);
    assert_eq!(ing.kernel.as_ref().unwrap().reason, Reason::UnknownEndpoint);
}

#[test]
fn explanations_cross_the_wire_unchanged() {
    use crate::observer::explain::{
        explanation_from_proto, explanation_to_proto, query_from_proto, query_to_proto,
    };
    let f = Fixture::new(PAYMENTS);
    let (mut maps, interfaces) = synced(&f);
    maps.endpoints
        .remove(&interfaces[&ObjectRef::new("payments", "database")]);
    let ifindex_of = |p: &ObjectRef| interfaces.get(p).copied();
    for (from, to) in [
        ("payments/frontend", "payments/backend:8080"),
        ("payments/frontend", "payments/database:5432/tcp"),
        ("payments/frontend", "10.96.0.21:80"),
        ("192.168.1.10", "payments/database:5432"),
        ("payments/backend", "1.1.1.1:53/udp"),
        ("payments/frontend", "payments/frontend:8080"),
    ] {
        let q = Query::parse(from, to).unwrap();
        assert_eq!(query_from_proto(&query_to_proto(&q)).unwrap(), q);
        let x = explain(&f.state(), &q, Some((&maps, &ifindex_of))).unwrap();
        assert_eq!(
            explanation_from_proto(&explanation_to_proto(&x)).unwrap(),
            x,
            "{from} → {to}"
        );
    }
    let mut bad = query_to_proto(&Query::parse("payments/frontend", "payments/backend:8080").unwrap());
    bad.port = 70_000;
    assert_eq!(
        query_from_proto(&bad).unwrap_err().to_string(),
        "port (1–65535): missing or invalid"
    );
    bad.port = 80;
    bad.ip_protocol = 1;
    assert!(query_from_proto(&bad).is_err());
    bad.ip_protocol = 6;
    bad.from = None;
    assert_eq!(
        query_from_proto(&bad).unwrap_err().to_string(),
        "from: missing or invalid"
    );
}

/// The database's ingress policy audited: `annotation` on `database-ingress`, and `default-deny-all`
/// kept (enforced) or left out.
fn audited_database(default_deny: bool) -> String {
    let yaml = PAYMENTS.replace(
        "metadata: {name: database-ingress, namespace: payments}",
        "metadata: {name: database-ingress, namespace: payments, annotations: {ztrust.io/mode: audit}}",
    );
    if default_deny {
        return yaml;
    }
    yaml.replace(
        "spec: {podSelector: {}, policyTypes: [Ingress, Egress]}",
        "spec: {podSelector: {matchLabels: {app: none}}, policyTypes: [Ingress, Egress]}",
    )
}

#[test]
fn a_policy_audited_alone_reports_would_drop_and_the_kernel_entry_says_so() {
    let f = Fixture::new(&audited_database(false));
    let ep = &f.desired.endpoints[&ObjectRef::new("payments", "database")];
    assert!(
        ep.isolated_ingress && ep.audit_ingress,
        "isolated by the audited policy alone"
    );
    assert!(!ep.audit_egress, "its egress is another matter");
    let (maps, interfaces) = synced(&f);
    let ifindex = interfaces[&ObjectRef::new("payments", "database")];
    assert_ne!(
        maps.endpoints[&ifindex].flags & ztrust_common::ep_flags::AUDIT_INGRESS,
        0
    );
    assert_eq!(
        maps.endpoints[&ifindex].flags & ztrust_common::ep_flags::AUDIT_EGRESS,
        0
    );
    let ifindex_of = |p: &ObjectRef| interfaces.get(p).copied();
    // The frontend's egress to the database is not isolated by the ingress policy; monitoring's pod is
    // not isolated at all: the database's audited ingress alone judges.
    let yaml = audited_database(false).replace(
        "metadata: {name: frontend-egress, namespace: payments}",
        "metadata: {name: frontend-egress, namespace: payments, annotations: {ztrust.io/mode: enforce}}",
    );
    let f2 = Fixture::new(&yaml);
    assert_eq!(f2.desired, f.desired, "`enforce` is the default");
    let q = Query::parse("192.168.1.10", "payments/database:5432").unwrap();
    let x = explain(&f.state(), &q, Some((&maps, &ifindex_of))).unwrap();
    assert_eq!(
        x.verdict,
        Verdict::Forwarded,
        "the node is let in: {}",
        render(&x)
    );
    let q = Query::parse("payments/backend", "payments/database:5432").unwrap();
    let x = explain(&f.state(), &q, Some((&maps, &ifindex_of))).unwrap();
    assert_eq!(x.verdict, Verdict::Forwarded, "{}", render(&x));
    let q = Query::parse("payments/backend", "payments/database:9999").unwrap();
    let x = explain(&f.state(), &q, Some((&maps, &ifindex_of))).unwrap();
    let ing = end(&x, "payments/database", Direction::Ingress);
    assert_eq!(
        (ing.verdict, ing.reason, ing.mode),
        (Verdict::WouldDrop, Reason::PolicyDenied, Mode::Audit),
        "{}",
        render(&x)
    );
    assert_eq!(ing.isolating, [ObjectRef::new("payments", "database-ingress")]);
    let k = ing.kernel.as_ref().unwrap();
    assert!(
        k.agrees && k.audit && k.verdict == Verdict::WouldDrop,
        "{}",
        render(&x)
    );
    assert!(x.consistent(), "{}", render(&x));
}

#[test]
fn an_audited_policy_beside_an_enforced_one_is_left_out() {
    // default-deny-all (enforced) isolates the database's ingress: the audited database-ingress, which
    // would allow the backend, allows nothing, and drops stay drops.
    let f = Fixture::new(&audited_database(true));
    let ep = &f.desired.endpoints[&ObjectRef::new("payments", "database")];
    assert!(ep.isolated_ingress && !ep.audit_ingress);
    assert_eq!(
        ep.ingress_policies,
        [ObjectRef::new("payments", "default-deny-all")]
    );
    let (maps, interfaces) = synced(&f);
    let ifindex_of = |p: &ObjectRef| interfaces.get(p).copied();
    let q = Query::parse("payments/backend", "payments/database:5432").unwrap();
    let x = explain(&f.state(), &q, Some((&maps, &ifindex_of))).unwrap();
    let ing = end(&x, "payments/database", Direction::Ingress);
    assert_eq!(
        (ing.verdict, ing.mode),
        (Verdict::Dropped, Mode::Enforce),
        "{}",
        render(&x)
    );
    assert_eq!(ing.isolating, [ObjectRef::new("payments", "default-deny-all")]);
    assert!(x.consistent(), "{}", render(&x));
}

#[test]
fn host_network_pods_pass_no_hook_and_only_this_nodes_are_let_in() {
    let yaml = format!(
        "{PAYMENTS}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: exporter, namespace: payments, labels: {{app: exporter}}}}\n\
         spec: {{hostNetwork: true, nodeName: node-1}}\nstatus: {{podIP: 192.168.1.10}}\n---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: exporter-2, namespace: payments, labels: {{app: exporter}}}}\n\
         spec: {{hostNetwork: true, nodeName: node-2}}\nstatus: {{podIP: 192.168.1.20}}\n"
    );
    let loaded = dir::parse_str("payments.yaml", &yaml);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let mut cluster = loaded.cluster;
    cluster.node_ips = vec!["192.168.1.10".parse().unwrap()];
    let desired = Engine::for_node("node-1").compile(&cluster);
    let audit = BTreeSet::new();
    let state = State {
        cluster: &cluster,
        desired: &desired,
        node: Some("node-1"),
        audit_namespaces: &audit,
        audit_all: false,
    };
    // Named by name, a host-network pod has no egress hook (a namespace-wide default deny selects it
    // in the objects, yet nothing enforces it).
    let x = explain(
        &state,
        &Query::parse("payments/exporter", "payments/database:5432").unwrap(),
        None,
    )
    .unwrap();
    assert!(x.ends.iter().all(|e| e.pod.name != "exporter"), "{}", render(&x));
    assert_eq!(
        end(&x, "payments/database", Direction::Ingress).reason,
        Reason::FromHost
    );
    // Another node's host-network pod enters on the uplink: judged by policy, and the database's
    // ingress admits only the backend.
    let x = explain(
        &state,
        &Query::parse("payments/exporter-2", "payments/database:5432").unwrap(),
        None,
    )
    .unwrap();
    let ing = end(&x, "payments/database", Direction::Ingress);
    assert_eq!(
        (ing.verdict, ing.reason),
        (Verdict::Dropped, Reason::PolicyDenied),
        "{}",
        render(&x)
    );
    assert!(x.consistent(), "{}", render(&x));
    // IPv4-mapped IPv6 is no address a packet carries.
    assert_eq!(
        Query::parse("[::ffff:10.244.0.10]", "payments/database:5432"),
        Err(QueryError::Mapped("[::ffff:10.244.0.10]".into()))
    );
}
