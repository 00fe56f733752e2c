//! Services and EndpointSlices into the [`crate::model`], validated as the API server would: what is
//! invalid is left out with an error naming the object and the field. (A frontend left out is judged as
//! its address, or as `unknown-service` inside the Service ranges; a backend left out is one the node
//! cannot translate to either.)

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{object_name, protocol};
use crate::model;
use crate::source::problem::{Converted, Effect, ObjectError, Problem};

/// The label of an EndpointSlice that names its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Service with this label is left to another proxy: kube-proxy does not translate it.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

struct Errors<'a> {
    object: &'a str,
    list: Vec<ObjectError>,
}

impl Errors<'_> {
    fn push(&mut self, field: String, problem: Problem, effect: Effect) {
        self.list.push(ObjectError {
            object: self.object.to_owned(),
            field,
            problem,
            effect,
        });
    }

    fn ip(&mut self, field: String, text: &str) -> Option<IpAddr> {
        let ip = text.parse().ok();
        if ip.is_none() {
            self.push(field, Problem::BadIp(text.to_owned()), Effect::ValueDropped);
        }
        ip
    }

    fn port(&mut self, field: String, n: i32) -> Option<u16> {
        let p = u16::try_from(n).ok().filter(|p| *p != 0);
        if p.is_none() {
            self.push(field, Problem::PortRange(n.into()), Effect::ValueDropped);
        }
        p
    }

    fn protocol(&mut self, field: String, p: Option<&str>) -> Option<model::Protocol> {
        let proto = protocol(p);
        if proto.is_none() {
            self.push(
                field,
                Problem::Protocol(p.unwrap_or_default().to_owned()),
                Effect::ValueDropped,
            );
        }
        proto
    }
}

/// Converts a Service: its cluster IPs, external IPs and load-balancer ingress addresses, and its ports
/// with their node ports — the frontends kube-proxy translates. A Service kube-proxy leaves alone has
/// none (so its addresses are judged as what they are, never by backends the node does not translate
/// to): an ExternalName or headless one, one labelled [`SERVICE_PROXY_NAME_LABEL`]; so has a
/// load-balancer address with `ipMode: Proxy` (the load balancer, not the node, translates it).
pub fn convert_service(svc: &Service) -> Converted<model::Service> {
    let object = object_name("Service", &svc.metadata, true);
    let mut e = Errors {
        object: &object,
        list: Vec::new(),
    };
    let Some(name) = svc.metadata.name.clone() else {
        e.push("metadata.name".into(), Problem::Missing, Effect::ObjectDropped);
        return Converted {
            value: None,
            errors: e.list,
        };
    };
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let mut out = model::Service {
        namespace,
        name,
        ..Default::default()
    };
    let other_proxy = svc
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL));
    let spec = svc.spec.as_ref();
    let headless = spec.and_then(|s| s.cluster_ip.as_deref()) == Some("None");
    let external_name = spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName");
    if other_proxy || headless || external_name {
        return Converted {
            value: Some(out),
            errors: e.list,
        };
    }
    if let Some(spec) = spec {
        // `clusterIPs[0]` equals `clusterIP` when both are set.
        let listed: Vec<(String, &str)> = match spec.cluster_ips.as_deref() {
            Some(list) if !list.is_empty() => list
                .iter()
                .enumerate()
                .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
                .collect(),
            _ => spec
                .cluster_ip
                .iter()
                .map(|ip| ("spec.clusterIP".to_owned(), ip.as_str()))
                .collect(),
        };
        for (field, text) in listed.into_iter().filter(|(_, t)| !t.is_empty() && *t != "None") {
            out.cluster_ips.extend(e.ip(field, text));
        }
        for (i, text) in spec.external_ips.iter().flatten().enumerate() {
            out.external_ips
                .extend(e.ip(format!("spec.externalIPs[{i}]"), text));
        }
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let field = format!("spec.ports[{i}]");
            let (Some(port), Some(protocol)) = (
                e.port(format!("{field}.port"), p.port),
                e.protocol(format!("{field}.protocol"), p.protocol.as_deref()),
            ) else {
                continue;
            };
            let node_port = match p.node_port {
                None | Some(0) => None,
                Some(n) => e.port(format!("{field}.nodePort"), n),
            };
            out.ports.push(model::ServicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                protocol,
                port,
                node_port,
            });
        }
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        if let Some(text) = ing
            .ip
            .as_ref()
            .filter(|_| ing.ip_mode.as_deref() != Some("Proxy"))
        {
            out.external_ips
                .extend(e.ip(format!("status.loadBalancer.ingress[{i}].ip"), text));
        }
    }
    Converted {
        value: Some(out),
        errors: e.list,
    }
}

/// Converts an EndpointSlice of address type IPv4 or IPv6 (FQDN slices name no address the node
/// translates to, and are left out). An endpoint without `conditions.ready` is ready, as the API says.
pub fn convert_endpoint_slice(slice: &EndpointSlice) -> Converted<model::EndpointSlice> {
    let object = object_name("EndpointSlice", &slice.metadata, true);
    let mut e = Errors {
        object: &object,
        list: Vec::new(),
    };
    let Some(name) = slice.metadata.name.clone() else {
        e.push("metadata.name".into(), Problem::Missing, Effect::ObjectDropped);
        return Converted {
            value: None,
            errors: e.list,
        };
    };
    let Some(service) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
    else {
        e.push(
            format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
            Problem::Missing,
            Effect::ObjectDropped,
        );
        return Converted {
            value: None,
            errors: e.list,
        };
    };
    if slice.address_type == "FQDN" {
        return Converted {
            value: None,
            errors: e.list,
        };
    }
    let namespace = slice
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let mut out = model::EndpointSlice {
        namespace,
        name,
        service,
        ..Default::default()
    };
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        let Some(n) = p.port else { continue };
        if let (Some(port), Some(protocol)) = (
            e.port(format!("{field}.port"), n),
            e.protocol(format!("{field}.protocol"), p.protocol.as_deref()),
        ) {
            out.ports.push(model::SlicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                protocol,
                port,
            });
        }
    }
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let addresses = ep
            .addresses
            .iter()
            .enumerate()
            .filter_map(|(j, a)| e.ip(format!("endpoints[{i}].addresses[{j}]"), a))
            .collect();
        let c = ep.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        out.endpoints.push(model::SliceEndpoint {
            addresses,
            ready,
            serving: c.and_then(|c| c.serving).unwrap_or(ready),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
        });
    }
    Converted {
        value: Some(out),
        errors: e.list,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Converted<model::Service> {
        convert_service(&serde_yaml::from_str(yaml).unwrap())
    }

    #[test]
    fn a_service_names_its_frontends() {
        let c = service(
            "metadata: {name: web, namespace: x}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.20\n  clusterIPs: [10.96.0.20, 'fd00:96::20']\n  externalIPs: [203.0.113.7, nonsense]\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}\n  - {name: dns, port: 53, protocol: UDP}\n  - {name: bad, port: 70000}\nstatus:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.9}, {hostname: lb.example}]\n",
        );
        let s = c.value.unwrap();
        assert_eq!(
            s.cluster_ips,
            vec![
                "10.96.0.20".parse::<IpAddr>().unwrap(),
                "fd00:96::20".parse().unwrap()
            ]
        );
        assert_eq!(
            s.external_ips,
            vec![
                "203.0.113.7".parse::<IpAddr>().unwrap(),
                "198.51.100.9".parse().unwrap()
            ]
        );
        assert_eq!(s.ports.len(), 2);
        assert_eq!(
            s.ports[0],
            model::ServicePort {
                name: Some("http".into()),
                protocol: model::Protocol::Tcp,
                port: 80,
                node_port: Some(30080)
            }
        );
        assert_eq!(s.ports[1].protocol, model::Protocol::Udp);
        let fields: Vec<&str> = c.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.externalIPs[1]", "spec.ports[2].port"]);
        assert!(
            c.errors[0].to_string().contains("Service x/web"),
            "{}",
            c.errors[0]
        );
        // What kube-proxy does not translate has no frontend.
        for (what, yaml) in [
            (
                "headless",
                "metadata: {name: h, namespace: x}\nspec: {clusterIP: None, externalIPs: [203.0.113.8], ports: [{port: 80}]}\n",
            ),
            (
                "another proxy's",
                "metadata: {name: p, namespace: x, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 10.96.0.9, externalIPs: [203.0.113.8], ports: [{port: 80}]}\n",
            ),
            (
                "ExternalName",
                "metadata: {name: n, namespace: x}\nspec: {type: ExternalName, externalName: db.example, externalIPs: [203.0.113.8], ports: [{port: 80}]}\n",
            ),
        ] {
            let c = service(yaml);
            let s = c.value.unwrap();
            assert!(
                s.cluster_ips.is_empty() && s.external_ips.is_empty(),
                "{what}: {s:?}"
            );
            assert!(c.errors.is_empty());
        }
        let proxied = service(
            "metadata: {name: l, namespace: x}\nspec: {type: LoadBalancer, clusterIP: 10.96.0.9, ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.1, ipMode: Proxy}, {ip: 198.51.100.2, ipMode: VIP}]}}\n",
        );
        assert_eq!(
            proxied.value.unwrap().external_ips,
            vec!["198.51.100.2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn an_endpoint_slice_names_its_backends_and_their_conditions() {
        let slice: EndpointSlice = serde_yaml::from_str(
            "metadata:\n  name: web-abc\n  namespace: x\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [10.0.0.11]\n- addresses: [10.0.0.12]\n  conditions: {ready: false, serving: true, terminating: true}\n",
        )
        .unwrap();
        let c = convert_endpoint_slice(&slice);
        let s = c.value.unwrap();
        assert_eq!(s.service, "web");
        assert_eq!(
            s.ports,
            vec![model::SlicePort {
                name: Some("http".into()),
                protocol: model::Protocol::Tcp,
                port: 8080
            }]
        );
        assert!(s.endpoints[0].ready && s.endpoints[0].serving && !s.endpoints[0].terminating);
        assert!(!s.endpoints[1].ready && s.endpoints[1].serving && s.endpoints[1].terminating);
        // Without the Service label it names nothing.
        let mut unlabelled = slice.clone();
        unlabelled.metadata.labels = None;
        let c = convert_endpoint_slice(&unlabelled);
        assert!(c.value.is_none());
        assert_eq!(c.errors[0].field, "metadata.labels[kubernetes.io/service-name]");
    }
}
