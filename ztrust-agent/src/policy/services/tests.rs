use super::*;
use crate::model::{Pod, SliceEndpoint, SlicePort};
use crate::policy::Engine;
use ztrust_common::identity;

fn pod(name: &str, app: &str, ip: &str) -> Pod {
    Pod {
        namespace: "x".into(),
        name: name.into(),
        labels: [("app".to_owned(), app.to_owned())].into(),
        ips: vec![ip.parse().unwrap()],
        ..Default::default()
    }
}

fn endpoint(ip: &str, ready: bool, terminating: bool) -> SliceEndpoint {
    SliceEndpoint {
        addresses: vec![ip.parse().unwrap()],
        ready,
        serving: ready || terminating,
        terminating,
    }
}

fn cluster() -> Cluster {
    let mut c = Cluster::default();
    for p in [
        pod("b1", "b", "10.0.0.11"),
        pod("b2", "b", "10.0.0.12"),
        pod("c", "c", "10.0.0.13"),
    ] {
        c.pods.insert(p.object_ref(), p);
    }
    c.node_ips = vec!["192.168.0.5".parse().unwrap()];
    let svc = Service {
        namespace: "x".into(),
        name: "web".into(),
        cluster_ips: vec!["10.96.0.20".parse().unwrap(), "fd00:96::20".parse().unwrap()],
        external_ips: vec!["203.0.113.7".parse().unwrap()],
        ports: vec![
            ServicePort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: Some(30080),
            },
            ServicePort {
                name: Some("dns".into()),
                protocol: Protocol::Udp,
                port: 53,
                node_port: None,
            },
        ],
    };
    c.services.insert(svc.object_ref(), svc);
    let slice = EndpointSlice {
        namespace: "x".into(),
        name: "web-1".into(),
        service: "web".into(),
        ports: vec![
            SlicePort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 8080,
            },
            SlicePort {
                name: Some("dns".into()),
                protocol: Protocol::Udp,
                port: 5353,
            },
        ],
        endpoints: vec![
            endpoint("10.0.0.11", true, false),
            endpoint("10.0.0.12", true, false),
        ],
    };
    c.endpoint_slices.insert(slice.object_ref(), slice);
    c
}

fn classes(c: &Cluster, addr: &str, port: u16, protocol: Protocol) -> Option<Vec<BackendClass>> {
    let desired = Engine::new().compile(c);
    frontends(c, &desired)
        .get(&Frontend {
            addr: addr.parse().unwrap(),
            port,
            protocol,
        })
        .cloned()
}

fn select(pairs: &[(&str, &str)]) -> crate::model::LabelSelector {
    crate::model::LabelSelector {
        match_labels: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        match_expressions: vec![],
    }
}

/// `--nodeport-addresses all`: each node port also has a frontend at the unspecified address of each
/// of the Service's families, with the classes of the one at a node address; without it, none.
#[test]
fn node_ports_at_any_local_address_have_frontends_at_the_unspecified_addresses() {
    let mut c = cluster();
    for any in ["0.0.0.0", "::"] {
        assert_eq!(classes(&c, any, 30080, Protocol::Tcp), None, "{any}");
    }
    c.node_ports_any_local = true;
    let at_node = classes(&c, "192.168.0.5", 30080, Protocol::Tcp).expect("node-ip frontend");
    assert_eq!(at_node.len(), 1);
    assert_eq!(classes(&c, "0.0.0.0", 30080, Protocol::Tcp), Some(at_node));
    // The backends are IPv4 only: the IPv6 one has none, as the IPv6 cluster IP (unknown-service).
    let v6 = classes(&c, "fd00:96::20", 80, Protocol::Tcp).expect("IPv6 cluster IP frontend");
    assert_eq!(v6, vec![]);
    assert_eq!(classes(&c, "::", 30080, Protocol::Tcp), Some(v6));
    for any in ["0.0.0.0", "::"] {
        // Only node ports: the Service's own port has no such frontend.
        assert_eq!(classes(&c, any, 80, Protocol::Tcp), None, "{any}");
    }
    // A single-stack IPv4 Service: no IPv6 wildcard.
    let web = c.services.values_mut().next().unwrap();
    web.cluster_ips.retain(IpAddr::is_ipv4);
    assert!(classes(&c, "0.0.0.0", 30080, Protocol::Tcp).is_some());
    assert_eq!(classes(&c, "::", 30080, Protocol::Tcp), None);
}

/// A policy `name` that isolates the egress of pods app=c and admits `pods` on `ports`.
fn egress_of_c(
    name: &str,
    pods: crate::model::LabelSelector,
    ports: Vec<crate::model::PortSpec>,
) -> crate::model::NetworkPolicy {
    use crate::model::{NetworkPolicy, Peer, Rule};
    NetworkPolicy {
        namespace: "x".into(),
        name: name.into(),
        pod_selector: select(&[("app", "c")]),
        isolates_ingress: false,
        isolates_egress: true,
        audit: false,
        ingress: vec![],
        egress: vec![Rule {
            peers: vec![Peer::Pods {
                namespace_selector: None,
                pod_selector: Some(pods),
            }],
            ports,
        }],
    }
}

/// A policy whose egress (of pods app=c) admits app=b and not app=c: it tells b's identity from c's.
fn tell_b_from_c(c: &mut Cluster) {
    let p = egress_of_c("c-to-b", select(&[("app", "b")]), vec![]);
    c.policies.insert(p.object_ref(), p);
}

/// A backend a frontend lost (the node's proxy may still pick it) counts, by the identity its address
/// has now, until its grace ends, whatever else is refreshed meanwhile; back in the slice, it is
/// simply a backend again; with no grace it goes at once.
#[test]
fn a_lost_backend_counts_until_its_grace_ends() {
    use std::time::{Duration, Instant};
    let mut c = cluster();
    tell_b_from_c(&mut c);
    let web = Frontend {
        addr: "10.96.0.20".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let slice = crate::model::ObjectRef::new("x", "web-1");
    let slices_changed = crate::policy::Changes {
        endpoint_slices: [slice.clone()].into(),
        ..Default::default()
    };
    for grace in [Duration::from_secs(5), Duration::ZERO] {
        let mut e = Engine::new();
        e.set_service_grace(grace);
        e.compile(&c);
        let id = |e: &Engine, ip: &str| super::super::remote_identity(e.desired(), ip.parse().unwrap());
        let (b, cc) = (id(&e, "10.0.0.11"), id(&e, "10.0.0.13"));
        assert_ne!(b, cc, "c's egress tells b from c");
        let mut moved = c.clone();
        moved.endpoint_slices.get_mut(&slice).unwrap().endpoints = vec![endpoint("10.0.0.13", true, false)];
        let lost_at = Instant::now();
        e.update(&moved, &slices_changed);
        let classes = |e: &Engine| e.desired().services[&web].clone();
        if grace.is_zero() {
            assert_eq!(classes(&e), vec![(cc, 8080)]);
            assert_eq!(e.next_service_expiry(), None);
            continue;
        }
        assert_eq!(
            classes(&e),
            vec![(b, 8080), (cc, 8080)],
            "b1 and b2 lost, still counted"
        );
        let expiry = e.next_service_expiry().expect("a grace running");
        assert!(expiry >= lost_at + grace && expiry <= Instant::now() + grace);
        e.take_delta();
        e.expire_services(&moved, lost_at + grace / 2);
        assert!(!e.take_delta().services, "within the grace");
        assert_eq!(classes(&e), vec![(b, 8080), (cc, 8080)]);
        e.expire_services(&moved, expiry);
        assert!(e.take_delta().services, "the grace ended");
        assert_eq!(classes(&e), vec![(cc, 8080)]);
        assert_eq!(e.next_service_expiry(), None);
        // Lost (c, when the slice has b1 and b2 again) and back before its grace ends: a backend,
        // no grace left running.
        e.update(&c, &slices_changed);
        assert!(e.next_service_expiry().is_some(), "c lost");
        let mut all = c.clone();
        all.endpoint_slices
            .get_mut(&slice)
            .unwrap()
            .endpoints
            .push(endpoint("10.0.0.13", true, false));
        e.update(&all, &slices_changed);
        assert_eq!(e.next_service_expiry(), None, "c is a backend again");
        assert_eq!(classes(&e), vec![(b, 8080), (cc, 8080)]);
        // The Service deleted: its frontend lingers with the backends it had, for the grace.
        let mut deleted = all.clone();
        deleted.services.clear();
        let service_gone = crate::policy::Changes {
            services: all.services.keys().cloned().collect(),
            ..Default::default()
        };
        let gone_at = Instant::now();
        e.update(&deleted, &service_gone);
        assert_eq!(
            classes(&e),
            vec![(b, 8080), (cc, 8080)],
            "lingering after the deletion"
        );
        e.expire_services(&deleted, gone_at + grace + Duration::from_millis(50));
        assert!(!e.desired().services.contains_key(&web), "gone after the grace");
        assert_eq!(e.next_service_expiry(), None);
    }
}

#[test]
fn every_frontend_reaches_the_classes_of_its_backends() {
    let c = cluster();
    let desired = Engine::new().compile(&c);
    let b = super::super::remote_identity(&desired, "10.0.0.11".parse().unwrap());
    assert!(b >= identity::FIRST_DYNAMIC);
    // Two pods with the same labels: one class.
    assert_eq!(
        classes(&c, "10.96.0.20", 80, Protocol::Tcp),
        Some(vec![(b, 8080)])
    );
    assert_eq!(
        classes(&c, "10.96.0.20", 53, Protocol::Udp),
        Some(vec![(b, 5353)])
    );
    assert_eq!(
        classes(&c, "203.0.113.7", 80, Protocol::Tcp),
        Some(vec![(b, 8080)])
    );
    // The node port on this node's addresses.
    assert_eq!(
        classes(&c, "192.168.0.5", 30080, Protocol::Tcp),
        Some(vec![(b, 8080)])
    );
    assert_eq!(classes(&c, "192.168.0.5", 80, Protocol::Tcp), None);
    // A frontend of the other family has no IPv4 backend to reach.
    assert_eq!(classes(&c, "fd00:96::20", 80, Protocol::Tcp), Some(vec![]));
    // No frontend for a port the Service does not have, nor a protocol.
    assert_eq!(classes(&c, "10.96.0.20", 8080, Protocol::Tcp), None);
    assert_eq!(classes(&c, "10.96.0.20", 80, Protocol::Udp), None);
}

/// An external IP that is another Service's ClusterIP: the node may translate it to either's
/// backends, so it has the classes of both.
#[test]
fn a_frontend_two_services_claim_has_the_classes_of_both() {
    let mut c = cluster();
    let http = ServicePort {
        name: Some("http".into()),
        protocol: Protocol::Tcp,
        port: 80,
        node_port: None,
    };
    let backend = vec![endpoint("10.0.0.13", true, false)];
    add_service(&mut c, "y", "claim", vec![], http, 9999, backend);
    let claim = crate::model::ObjectRef::new("y", "claim");
    c.services.get_mut(&claim).unwrap().external_ips = vec!["10.96.0.20".parse().unwrap()];
    tell_b_from_c(&mut c);
    let desired = Engine::new().compile(&c);
    let id = |ip: &str| super::super::remote_identity(&desired, ip.parse().unwrap());
    let mut want = vec![(id("10.0.0.11"), 8080), (id("10.0.0.13"), 9999)];
    want.sort_unstable();
    assert_eq!(classes(&c, "10.96.0.20", 80, Protocol::Tcp), Some(want));
}

/// Backends that an egress rule tells apart are classes of their own (without the rule, b and c would be
/// one class: nothing would treat them differently).
#[test]
fn backends_of_other_labels_are_another_class_and_terminating_ones_only_as_a_fallback() {
    let mut c = cluster();
    let r = crate::model::ObjectRef::new("x", "web-1");
    c.endpoint_slices
        .get_mut(&r)
        .unwrap()
        .endpoints
        .push(endpoint("10.0.0.13", true, false));
    tell_b_from_c(&mut c);
    let desired = Engine::new().compile(&c);
    let id = |ip: &str| super::super::remote_identity(&desired, ip.parse().unwrap());
    let mut want = vec![(id("10.0.0.11"), 8080), (id("10.0.0.13"), 8080)];
    want.sort_unstable();
    assert_eq!(classes(&c, "10.96.0.20", 80, Protocol::Tcp), Some(want));
    // c terminating while others are ready: not a backend.
    c.endpoint_slices.get_mut(&r).unwrap().endpoints[2] = endpoint("10.0.0.13", false, true);
    assert_eq!(
        classes(&c, "10.96.0.20", 80, Protocol::Tcp),
        Some(vec![(id("10.0.0.11"), 8080)])
    );
    // Nothing ready: the serving terminating ones.
    for e in &mut c.endpoint_slices.get_mut(&r).unwrap().endpoints[..2] {
        *e = SliceEndpoint {
            ready: false,
            serving: false,
            ..e.clone()
        };
    }
    assert_eq!(
        classes(&c, "10.96.0.20", 80, Protocol::Tcp),
        Some(vec![(id("10.0.0.13"), 8080)])
    );
    // A slice of another Service, or without the port's name, adds nothing.
    c.endpoint_slices.get_mut(&r).unwrap().service = "other".into();
    assert_eq!(classes(&c, "10.96.0.20", 80, Protocol::Tcp), Some(vec![]));
}

/// The endpoint whose egress told two backends apart goes: the frontend kept between updates merges
/// them again, as one computed from scratch does (nothing about the backends themselves changed).
#[test]
fn the_classes_merge_again_when_the_endpoint_that_told_them_apart_goes() {
    let mut c = cluster();
    let b2 = crate::model::ObjectRef::new("x", "b2");
    c.pods.get_mut(&b2).unwrap().labels.insert("v".into(), "2".into());
    let p = egress_of_c("c-to-v2", select(&[("v", "2")]), vec![]);
    c.policies.insert(p.object_ref(), p);
    let web = Frontend {
        addr: "10.96.0.20".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let mut engine = Engine::new();
    engine.update(&c, &crate::policy::Changes::between(&Cluster::default(), &c));
    assert_eq!(
        engine.desired().services[&web].len(),
        2,
        "c's egress tells b1 from b2"
    );
    engine.take_delta();
    let mut without_c = c.clone();
    without_c.pods.remove(&crate::model::ObjectRef::new("x", "c"));
    engine.update(&without_c, &crate::policy::Changes::between(&c, &without_c));
    let d = engine.desired();
    assert_eq!(d.services[&web].len(), 1, "{:?}", d.services[&web]);
    assert_eq!(d.services, frontends(&without_c, d));
}

/// The pods of a StatefulSet: each has an identity of its own (its `pod-name` label), and they are
/// one class as long as no egress rule tells them apart; one that a rule names is a class of its own.
#[test]
fn identities_that_egress_rules_treat_alike_are_one_class() {
    use crate::model::{PortRef, PortSpec};
    let mut c = cluster();
    let r = crate::model::ObjectRef::new("x", "web-1");
    let slice = c.endpoint_slices.get_mut(&r).unwrap();
    slice.endpoints.clear();
    for n in 0..6u8 {
        let name = format!("db-{n}");
        let ip = format!("10.0.1.{n}");
        let mut p = pod(&name, "db", &ip);
        p.labels
            .insert("statefulset.kubernetes.io/pod-name".into(), name.clone());
        c.pods.insert(p.object_ref(), p);
        slice.endpoints.push(endpoint(&ip, true, false));
    }
    let egress_to = |name: &str, pods, port| {
        let tcp = PortSpec {
            protocol: Protocol::Tcp,
            port: Some(PortRef::Number(port)),
            end_port: None,
        };
        egress_of_c(name, pods, vec![tcp])
    };
    let id = |c: &Cluster, ip: &str| {
        let desired = Engine::new().compile(c);
        super::super::remote_identity(&desired, ip.parse().unwrap())
    };
    // Another Service in front of c, whose identity is older (smaller) than the db pods': it is
    // treated alike too, but it is no backend of web, so it does not name web's class.
    let port = ServicePort {
        name: None,
        protocol: Protocol::Tcp,
        port: 80,
        node_port: None,
    };
    let backend = vec![endpoint("10.0.0.13", true, false)];
    let cluster_ip = vec!["10.96.0.21".parse().unwrap()];
    add_service(&mut c, "x", "other", cluster_ip, port, 80, backend);
    assert!(id(&c, "10.0.0.13") < id(&c, "10.0.1.0"));
    // Six identities, no policy: one class, named by a db pod's identity.
    let ids: BTreeSet<u32> = (0..6).map(|n| id(&c, &format!("10.0.1.{n}"))).collect();
    assert_eq!(ids.len(), 6, "each pod-name label makes an identity");
    let first = *ids.first().unwrap();
    assert_eq!(
        classes(&c, "10.96.0.20", 80, Protocol::Tcp),
        Some(vec![(first, 8080)])
    );
    // c's egress admits app=db: still one class, the same for every endpoint.
    let p = egress_to("to-db", select(&[("app", "db")]), 8080);
    c.policies.insert(p.object_ref(), p);
    assert_eq!(
        classes(&c, "10.96.0.20", 80, Protocol::Tcp).map(|v| v.len()),
        Some(1)
    );
    // A rule that names db-3 alone (on another port) tells it apart.
    let p = egress_to(
        "to-db-3",
        select(&[("statefulset.kubernetes.io/pod-name", "db-3")]),
        9999,
    );
    c.policies.insert(p.object_ref(), p);
    let db3 = id(&c, "10.0.1.3");
    let got = classes(&c, "10.96.0.20", 80, Protocol::Tcp).unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.contains(&(db3, 8080)), "{got:?}");

    // The same policy added to an engine that is only told a policy changed (no address, no
    // identity changes): the classes are merged again from the new allow sets.
    let mut before = c.clone();
    before
        .policies
        .remove(&crate::model::ObjectRef::new("x", "to-db-3"));
    let mut engine = Engine::new();
    engine.update(
        &before,
        &crate::policy::Changes::between(&Cluster::default(), &before),
    );
    let f = Frontend {
        addr: "10.96.0.20".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    assert_eq!(engine.desired().services[&f].len(), 1);
    engine.take_delta();
    let changes = crate::policy::Changes::between(&before, &c);
    assert_eq!(changes.policies.len(), 1);
    assert!(changes.pods.is_empty());
    engine.update(&c, &changes);
    assert_eq!(engine.desired().services[&f].len(), 2);
    assert!(engine.take_delta().services);
}
