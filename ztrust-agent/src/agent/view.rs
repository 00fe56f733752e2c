//! The flow view ([`View`]) kept current from the cluster and the desired state, so that a kernel event
//! is enriched with pods, Services and rules without looking anything up in the engine.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::flows::{AllowedBy, EndpointView, PodView, View};
use crate::model::{Cluster, ObjectRef};
use crate::policy::Desired;

/// Keeps the view's address → pod index current for the pods in `changed` (`addrs` remembers the
/// addresses each pod had, to take them out when it changes or goes): a change costs what it touches.
pub fn update_pods(
    view: &mut View,
    cluster: &Cluster,
    changed: &BTreeSet<ObjectRef>,
    addrs: &mut HashMap<ObjectRef, Vec<IpAddr>>,
) {
    for r in changed {
        for ip in addrs.remove(r).unwrap_or_default() {
            if view.pods_by_ip.get(&ip).is_some_and(|p| &p.pod == r) {
                view.pods_by_ip.remove(&ip);
            }
        }
        if let Some(pod) = cluster.pods.get(r) {
            for ip in &pod.ips {
                view.pods_by_ip.insert(
                    *ip,
                    PodView {
                        pod: r.clone(),
                        labels: pod.labels.clone(),
                    },
                );
            }
            addrs.insert(r.clone(), pod.ips.clone());
        }
    }
}

/// The view's Service frontends, each with its Service and backend pods (by address: `pods_by_ip` must
/// be current).
pub fn update_services(view: &mut View, cluster: &Cluster) {
    let mut services: HashMap<(IpAddr, u16, u8), crate::flows::ServiceRef> = HashMap::new();
    let slices = crate::policy::services::Slices::new(cluster);
    for (svc, port, f) in crate::policy::services::each_frontend(cluster) {
        let backends = slices
            .backends(svc, port)
            .into_iter()
            .filter(|(ip, _)| ip.is_ipv4() == f.addr.is_ipv4())
            .map(|(ip, _)| {
                view.pods_by_ip
                    .get(&ip)
                    .map_or(crate::flows::Backend::Address(ip), |p| {
                        crate::flows::Backend::Pod(p.pod.clone())
                    })
            });
        // A frontend two Services claim names the first and the backends of both.
        let entry = services
            .entry((f.addr, f.port, f.protocol.number()))
            .or_insert_with(|| crate::flows::ServiceRef {
                name: svc.object_ref(),
                backends: Vec::new(),
            });
        entry.backends.extend(backends);
        // In the order of their names, as flow logs have always listed them.
        entry.backends.sort_by_cached_key(ToString::to_string);
        entry.backends.dedup();
    }
    view.services = services;
}

/// The view's endpoints (this node's bound pods) and, when `rules` is set, its rule names, from the
/// desired state.
pub fn update_policy(view: &mut View, desired: &Desired, bindings: &BTreeMap<ObjectRef, u32>, rules: bool) {
    view.endpoints.clear();
    for (pod, ifindex) in bindings {
        if let Some(ep) = desired.endpoints.get(pod) {
            view.endpoints.insert(
                *ifindex,
                EndpointView {
                    pod: pod.clone(),
                    ingress_policies: ep.ingress_policies.clone(),
                    egress_policies: ep.egress_policies.clone(),
                },
            );
        }
    }
    if rules {
        view.rules = desired
            .rules
            .iter()
            .map(|(id, rule)| {
                let by = AllowedBy {
                    policy: rule.policy.clone(),
                    direction: crate::flows::Direction::from_code(rule.direction),
                    rule: rule.index,
                };
                (*id, by)
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Pod;

    #[test]
    fn view_follows_changed_pods_only() {
        let mut view = View::default();
        let mut addrs = HashMap::new();
        let web = ObjectRef::new("shop", "web");
        let mut c = cluster(vec![pod("shop", "web", false, None)]);
        update_pods(&mut view, &c, &[web.clone()].into(), &mut addrs);
        assert_eq!(view.pods_by_ip[&"10.0.0.5".parse().unwrap()].pod, web);
        // A new address: the old one goes.
        c.pods.get_mut(&web).unwrap().ips = vec!["10.0.0.6".parse().unwrap()];
        update_pods(&mut view, &c, &[web.clone()].into(), &mut addrs);
        assert!(!view.pods_by_ip.contains_key(&"10.0.0.5".parse().unwrap()));
        assert_eq!(view.pods_by_ip[&"10.0.0.6".parse().unwrap()].pod, web);
        // Unchanged pods are not looked at; a deleted one goes.
        c.pods.clear();
        update_pods(&mut view, &c, &BTreeSet::new(), &mut addrs);
        assert_eq!(view.pods_by_ip.len(), 1);
        update_pods(&mut view, &c, &[web.clone()].into(), &mut addrs);
        assert!(view.pods_by_ip.is_empty() && addrs.is_empty());
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
}
