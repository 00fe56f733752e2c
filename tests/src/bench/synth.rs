//! Synthetic clusters for the control-plane benchmarks: namespaces with team/env labels, apps of ten
//! replicas with shared label sets (app, tier, version), named container ports, and policies that mix
//! `matchLabels` and `matchExpressions`, same-namespace and cross-namespace peers, named ports, ipBlocks
//! with excepts and egress rules. About `local` of the pods are on "this node" and get an interface.
//! With Services: one per app (a ClusterIP, port `http`), its EndpointSlice listing the app's pods,
//! kept current as pods are added.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use ztrust_agent::model::{
    Cluster, ContainerPort, EndpointSlice, LabelSelector, Labels, Namespace, NetworkPolicy, ObjectRef,
    Operator, Peer, Pod, PortRef, PortSpec, Protocol, Requirement, Rule, Service, ServicePort, SliceEndpoint,
    SlicePort,
};

use ztrust_agent::policy::Changes;

/// xorshift: deterministic, no dependency.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

pub const PODS_PER_NS: usize = 100;
pub const APPS_PER_NS: usize = 10;
const TIERS: [&str; 5] = ["web", "api", "db", "cache", "worker"];
const ENVS: [&str; 3] = ["prod", "staging", "dev"];
pub const THIS_NODE: &str = "this-node";

pub struct Synth {
    pub cluster: Cluster,
    /// Local pods → fake ifindex of their host-side interface.
    pub interfaces: BTreeMap<ObjectRef, u32>,
    pub next_pod: u32,
    pub next_ifindex: u32,
    pub rng: Rng,
    /// Whether each app has a Service (and its pods are in its EndpointSlice).
    pub services: bool,
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

fn ml(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        match_expressions: Vec::new(),
    }
}

fn expr(key: &str, operator: Operator, values: &[&str]) -> Requirement {
    Requirement {
        key: key.to_owned(),
        operator,
        values: values.iter().map(|v| (*v).to_owned()).collect::<BTreeSet<_>>(),
    }
}

pub fn pod_ip(k: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + k))
}

fn ns_name(i: usize) -> String {
    format!("ns-{i:05}")
}

fn tcp(port: PortRef) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        port: Some(port),
        end_port: None,
    }
}

impl Synth {
    /// A pod of app `app` in namespace `ns` (index `k` picks its address and replica labels).
    pub fn make_pod(&mut self, ns: usize, app: usize, local: bool) -> ObjectRef {
        let k = self.next_pod;
        self.next_pod += 1;
        let name = format!("app-{app}-{k:06}");
        let pod = Pod {
            namespace: ns_name(ns),
            name: name.clone(),
            labels: labels(&[
                ("app", format!("app-{app}")),
                ("tier", TIERS[app % TIERS.len()].to_owned()),
                ("version", format!("v{}", k % 2)),
            ]),
            annotations: Labels::new(),
            ips: vec![pod_ip(k)],
            ports: vec![
                ContainerPort {
                    name: Some("http".into()),
                    port: 8080 + (app % 2) as u16,
                    protocol: Protocol::Tcp,
                },
                ContainerPort {
                    name: Some("metrics".into()),
                    port: 9090,
                    protocol: Protocol::Tcp,
                },
            ],
            host_network: false,
            node_name: Some(if local {
                THIS_NODE.to_owned()
            } else {
                format!("node-{}", k % 50)
            }),
        };
        let r = pod.object_ref();
        self.cluster.pods.insert(r.clone(), pod);
        if self.services {
            self.serve(ns, app, pod_ip(k));
        }
        if local {
            self.interfaces.insert(r.clone(), self.next_ifindex);
            self.next_ifindex += 1;
        }
        r
    }

    /// The EndpointSlice of app `app`'s Service in namespace `ns`.
    fn slice_ref(ns: usize, app: usize) -> ObjectRef {
        ObjectRef::new(ns_name(ns), format!("svc-app-{app}-1"))
    }

    /// Adds `ip` to the EndpointSlice of the app's Service, creating the Service and the slice first.
    fn serve(&mut self, ns: usize, app: usize, ip: IpAddr) -> ObjectRef {
        let slice = Self::slice_ref(ns, app);
        if !self.cluster.endpoint_slices.contains_key(&slice) {
            let n = (ns * APPS_PER_NS + app) as u32;
            let svc = Service {
                namespace: ns_name(ns),
                name: format!("svc-app-{app}"),
                cluster_ips: vec![IpAddr::V4(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(10, 96, 0, 0)) + n,
                ))],
                external_ips: Vec::new(),
                ports: vec![ServicePort {
                    name: Some("http".into()),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: None,
                }],
            };
            self.cluster.services.insert(svc.object_ref(), svc);
            self.cluster.endpoint_slices.insert(
                slice.clone(),
                EndpointSlice {
                    namespace: ns_name(ns),
                    name: slice.name.clone(),
                    service: format!("svc-app-{app}"),
                    ports: vec![SlicePort {
                        name: Some("http".into()),
                        protocol: Protocol::Tcp,
                        port: 8080 + (app % 2) as u16,
                    }],
                    endpoints: Vec::new(),
                },
            );
        }
        let s = self.cluster.endpoint_slices.get_mut(&slice).expect("made above");
        s.endpoints.push(SliceEndpoint {
            addresses: vec![ip],
            ready: true,
            serving: true,
            terminating: false,
        });
        slice
    }

    /// `policies` policies over `pods` pods (100 per namespace), `local` of them on this node; with
    /// `services`, a Service per app.
    pub fn new(policies: usize, pods: usize, local: usize, services: bool) -> Self {
        let mut me = Synth {
            cluster: Cluster::default(),
            interfaces: BTreeMap::new(),
            next_pod: 0,
            next_ifindex: 10_000,
            rng: Rng(0x5eed_1234_abcd_ef01 ^ policies as u64),
            services,
        };
        let n_ns = pods.div_ceil(PODS_PER_NS).max(1);
        for i in 0..n_ns {
            let name = ns_name(i);
            me.cluster.namespaces.insert(
                name.clone(),
                Namespace {
                    name: name.clone(),
                    labels: labels(&[
                        ("kubernetes.io/metadata.name", name.clone()),
                        ("team", format!("team-{}", i % 20)),
                        ("env", ENVS[i % ENVS.len()].to_owned()),
                    ]),
                    annotations: Labels::new(),
                },
            );
        }
        let every = (pods / local.max(1)).max(1);
        for k in 0..pods {
            let ns = k / PODS_PER_NS;
            let app = (k % PODS_PER_NS) % APPS_PER_NS;
            me.make_pod(ns, app, k % every == every / 2);
        }
        for j in 0..policies {
            let p = me.make_policy(j % n_ns, j / n_ns, j);
            me.cluster.policies.insert(p.object_ref(), p);
        }
        me.cluster.node_ips = vec!["192.168.0.10".parse().unwrap()];
        me
    }

    /// Policy number `j` (the `idx`-th of namespace `ns`): four shapes in turn.
    fn make_policy(&mut self, ns: usize, idx: usize, j: usize) -> NetworkPolicy {
        let app = idx % APPS_PER_NS;
        let other_app = (idx + 3) % APPS_PER_NS;
        let pod_selector = ml(&[("app", format!("app-{app}"))]);
        let mut p = NetworkPolicy {
            namespace: ns_name(ns),
            name: format!("np-{idx:04}"),
            pod_selector,
            isolates_ingress: true,
            isolates_egress: false,
            ingress: Vec::new(),
            egress: Vec::new(),
            audit: false,
        };
        match j % 4 {
            // Same namespace, matchExpressions on tier, numeric port.
            0 => p.ingress.push(Rule {
                peers: vec![Peer::Pods {
                    namespace_selector: None,
                    pod_selector: Some(LabelSelector {
                        match_labels: Labels::new(),
                        match_expressions: vec![expr("tier", Operator::In, &["web", "api"])],
                    }),
                }],
                ports: vec![tcp(PortRef::Number(8080 + (idx % 8) as u16))],
            }),
            // Another team's prod namespaces, an app there, named port.
            1 => p.ingress.push(Rule {
                peers: vec![Peer::Pods {
                    namespace_selector: Some(LabelSelector {
                        match_labels: labels(&[("env", "prod".into())]),
                        match_expressions: vec![expr(
                            "team",
                            Operator::In,
                            &[
                                &format!("team-{}", (ns + 1) % 20),
                                &format!("team-{}", (ns + 2) % 20),
                            ],
                        )],
                    }),
                    pod_selector: Some(ml(&[("app", format!("app-{other_app}"))])),
                }],
                ports: vec![tcp(PortRef::Name("http".into()))],
            }),
            // Monitoring from any namespace with the label, plus an ipBlock with an except.
            2 => p.ingress.push(Rule {
                peers: vec![
                    Peer::Pods {
                        namespace_selector: Some(LabelSelector {
                            match_labels: Labels::new(),
                            match_expressions: vec![expr("env", Operator::NotIn, &["dev"])],
                        }),
                        pod_selector: Some(ml(&[("tier", "worker".into())])),
                    },
                    Peer::IpBlock {
                        cidr: format!("172.{}.0.0/16", 16 + (j / 4) % 16)
                            .parse::<IpNet>()
                            .unwrap(),
                        except: vec![
                            format!("172.{}.{}.0/24", 16 + (j / 4) % 16, (j / 64) % 256)
                                .parse()
                                .unwrap(),
                        ],
                    },
                ],
                ports: vec![tcp(PortRef::Name("metrics".into())), tcp(PortRef::Number(9443))],
            }),
            // Egress: to pods of the namespace that are not databases, and DNS in ns-00000.
            _ => {
                p.isolates_egress = true;
                p.isolates_ingress = false;
                p.egress.push(Rule {
                    peers: vec![Peer::Pods {
                        namespace_selector: None,
                        pod_selector: Some(LabelSelector {
                            match_labels: Labels::new(),
                            match_expressions: vec![
                                expr("tier", Operator::NotIn, &["db"]),
                                expr("version", Operator::Exists, &[]),
                            ],
                        }),
                    }],
                    ports: vec![
                        tcp(PortRef::Number(8080)),
                        PortSpec {
                            protocol: Protocol::Tcp,
                            port: Some(PortRef::Number(30000)),
                            end_port: Some(30100),
                        },
                    ],
                });
                p.egress.push(Rule {
                    peers: vec![Peer::Pods {
                        namespace_selector: Some(ml(&[("kubernetes.io/metadata.name", ns_name(0))])),
                        pod_selector: Some(ml(&[("app", "app-0".into())])),
                    }],
                    ports: vec![PortSpec {
                        protocol: Protocol::Udp,
                        port: Some(PortRef::Number(53)),
                        end_port: None,
                    }],
                });
            }
        }
        p
    }

    /// One change of kind `kind % 3`: a pod added, a pod's label changed, a policy edited. Returns the
    /// kind, for display, and the object changed (what a watch event names).
    pub fn change(&mut self, kind: usize) -> (&'static str, Changes) {
        let mut changes = Changes::default();
        let n_ns = self.cluster.namespaces.len();
        match kind % 3 {
            0 => {
                let ns = self.rng.below(n_ns as u64) as usize;
                let app = self.rng.below(APPS_PER_NS as u64) as usize;
                // Half the new pods land on this node.
                let local = self.rng.below(2) == 0;
                changes.pods.insert(self.make_pod(ns, app, local));
                if self.services {
                    // The EndpointSlice controller's update comes with it.
                    changes.endpoint_slices.insert(Self::slice_ref(ns, app));
                }
                ("pod added", changes)
            }
            1 => {
                // A pod of this node half the time (its endpoint's allow set changes), else any pod.
                let r = if self.rng.below(2) == 0 && !self.interfaces.is_empty() {
                    let i = self.rng.below(self.interfaces.len() as u64) as usize;
                    self.interfaces.keys().nth(i).cloned().unwrap()
                } else {
                    let i = self.rng.below(self.cluster.pods.len() as u64) as usize;
                    self.cluster.pods.keys().nth(i).cloned().unwrap()
                };
                let pod = self.cluster.pods.get_mut(&r).unwrap();
                let tier = pod.labels.get("tier").cloned().unwrap_or_default();
                let i = TIERS.iter().position(|t| *t == tier).unwrap_or(0);
                pod.labels
                    .insert("tier".into(), TIERS[(i + 1) % TIERS.len()].into());
                changes.pods.insert(r);
                ("label changed", changes)
            }
            _ => {
                let i = self.rng.below(self.cluster.policies.len() as u64) as usize;
                let (r, p) = self.cluster.policies.iter_mut().nth(i).unwrap();
                changes.policies.insert(r.clone());
                let rule = p.ingress.first_mut().or(p.egress.first_mut()).unwrap();
                match rule.ports.first_mut() {
                    Some(PortSpec {
                        port: Some(PortRef::Number(n)),
                        ..
                    }) => *n = if *n == 9999 { 8080 } else { 9999 },
                    _ => rule.ports.push(tcp(PortRef::Number(9998))),
                }
                ("policy edited", changes)
            }
        }
    }
}
