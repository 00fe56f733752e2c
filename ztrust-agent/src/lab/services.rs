//! Services in the lab, the way a cluster has them: the lab plays the EndpointSlice controller (one
//! slice per Service and target-port resolution, from the pods its selector selects) and kube-proxy in
//! nftables mode (DNAT rules in the node's namespace, a random backend per connection; node ports on
//! the node's addresses).
//!
//! A Service without `spec.clusterIP` gets one from [`SERVICE_CIDR`], which the lab's agent is told
//! (`--service-cidr`). The slices are written next to the other copies in `manifests/`, which the agent
//! reads; the rules are rewritten whole (one `nft -f` transaction) after every change of Services or pods.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde_json::{Value, json};

use super::manifests::{self, Kind};
use super::state::{LabState, PodState, write_atomic};
use super::{Result, io_err};
use crate::model::Protocol;

/// The lab's Service address range.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The nftables table (in the node's namespace) that holds the lab's Service rules.
const TABLE: &str = "ztlab-services";

/// A Service port as the lab translates it.
struct Port {
    name: Option<String>,
    protocol: Protocol,
    port: u16,
    node_port: Option<u16>,
    /// `targetPort`: a number, a container port name, or absent (the port itself).
    target: Option<Value>,
}

struct Svc {
    namespace: String,
    name: String,
    cluster_ips: Vec<IpAddr>,
    selector: BTreeMap<String, String>,
    ports: Vec<Port>,
}

fn protocol_of(v: &Value) -> Option<Protocol> {
    match v.get("protocol").and_then(Value::as_str) {
        None | Some("TCP") => Some(Protocol::Tcp),
        Some("UDP") => Some(Protocol::Udp),
        Some("SCTP") => Some(Protocol::Sctp),
        Some(_) => None,
    }
}

fn parse(value: &Value) -> Option<Svc> {
    let meta = value.get("metadata")?;
    let spec = value.get("spec")?;
    let ips = |v: Option<&Value>| -> Vec<IpAddr> {
        v.and_then(Value::as_array).into_iter().flatten().filter_map(|x| x.as_str()?.parse().ok()).collect()
    };
    let mut cluster_ips = ips(spec.get("clusterIPs"));
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.get("clusterIP").and_then(Value::as_str).and_then(|s| s.parse::<IpAddr>().ok()));
    }
    let selector = spec
        .get("selector")
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
        .unwrap_or_default();
    let ports = spec
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(Port {
                name: p.get("name").and_then(Value::as_str).map(str::to_owned),
                protocol: protocol_of(p)?,
                port: u16::try_from(p.get("port")?.as_u64()?).ok()?,
                node_port: p.get("nodePort").and_then(Value::as_u64).and_then(|n| u16::try_from(n).ok()),
                target: p.get("targetPort").cloned(),
            })
        })
        .collect();
    Some(Svc {
        namespace: meta.get("namespace")?.as_str()?.to_owned(),
        name: meta.get("name")?.as_str()?.to_owned(),
        cluster_ips,
        selector,
        ports,
    })
}

/// The port `target` names on `pod` for `port` (`None`: the pod has no container port of that name).
fn resolve(port: &Port, pod: &PodState) -> Option<u16> {
    match &port.target {
        None => Some(port.port),
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Some(Value::String(s)) => match s.parse::<u16>() {
            Ok(n) => Some(n),
            Err(_) => pod.ports.iter().find(|c| c.name.as_deref() == Some(s) && c.protocol == port.protocol).map(|c| c.port),
        },
        Some(_) => None,
    }
}

/// Gives a cluster IP to a Service manifest that has none (the next free one of [`SERVICE_CIDR`], after
/// `taken`); `None` when it has one already, or is headless.
pub fn assign_cluster_ip(value: &mut Value, taken: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    let spec = value.get("spec")?;
    if spec.get("clusterIP").and_then(Value::as_str).is_some_and(|s| !s.is_empty()) {
        return None;
    }
    let ip = (10..u32::from(u16::MAX))
        .map(|n| IpAddr::from((10u32 << 24 | 96 << 16 | n).to_be_bytes()))
        .find(|ip| !taken.contains(ip))?;
    value["spec"]["clusterIP"] = json!(ip.to_string());
    value["spec"]["clusterIPs"] = json!([ip.to_string()]);
    Some(ip)
}

/// The cluster IPs of the Services whose copies are in the lab's `manifests/`.
pub fn cluster_ips(state: &LabState) -> Result<BTreeSet<IpAddr>> {
    Ok(services(state)?.into_iter().flat_map(|s| s.cluster_ips).collect())
}

fn services(state: &LabState) -> Result<Vec<Svc>> {
    let dir = state.manifests_dir();
    let read = manifests::read_path(&dir)?;
    Ok(read.objects.iter().filter(|o| o.kind == Kind::Service).filter_map(|o| parse(&o.value)).collect())
}

/// A Service's backends: one EndpointSlice per distinct resolution of its ports (pods whose named
/// target ports resolve alike share one), as the EndpointSlice controller makes them.
type SlicePorts = Vec<(Option<String>, Protocol, u16)>;

fn slices<'a>(svc: &Svc, pods: &'a [PodState]) -> Vec<(SlicePorts, Vec<&'a PodState>)> {
    let mut by_ports: BTreeMap<SlicePorts, Vec<&PodState>> = BTreeMap::new();
    if svc.selector.is_empty() {
        return Vec::new();
    }
    for pod in pods.iter().filter(|p| {
        p.namespace == svc.namespace && !p.host_network && svc.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
    }) {
        let ports: Option<Vec<_>> =
            svc.ports.iter().map(|port| resolve(port, pod).map(|n| (port.name.clone(), port.protocol, n))).collect();
        if let Some(ports) = ports {
            by_ports.entry(ports).or_default().push(pod);
        }
    }
    by_ports.into_iter().collect()
}

/// Writes every Service's EndpointSlices into `manifests/` (removing those of Services or resolutions
/// that are gone) and rewrites the node's DNAT rules.
pub fn realise(state: &LabState) -> Result<()> {
    let services = services(state)?;
    let dir = state.manifests_dir();
    let mut keep = BTreeSet::new();
    let mut rules = Vec::new();
    for svc in &services {
        let slices = slices(svc, &state.pods);
        for (i, (ports, pods)) in slices.iter().enumerate() {
            let name = format!("{}-{i}", svc.name);
            let file = format!("endpointslice-{}-{name}.yaml", svc.namespace);
            for family_v4 in [true, false] {
                let addrs: Vec<String> = pods
                    .iter()
                    .flat_map(|p| p.ips.iter().filter(|ip| ip.is_ipv4() == family_v4).map(ToString::to_string))
                    .collect();
                if addrs.is_empty() {
                    continue;
                }
                let file = if family_v4 { file.clone() } else { file.replace(".yaml", "-v6.yaml") };
                let slice = json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": if family_v4 { name.clone() } else { format!("{name}-v6") },
                        "namespace": svc.namespace,
                        "labels": { crate::source::services::SERVICE_NAME_LABEL: svc.name },
                    },
                    "addressType": if family_v4 { "IPv4" } else { "IPv6" },
                    "ports": ports.iter().map(|(n, p, port)| json!({ "name": n, "protocol": p.as_str(), "port": port })).collect::<Vec<_>>(),
                    "endpoints": addrs.iter().map(|a| json!({ "addresses": [a], "conditions": { "ready": true } })).collect::<Vec<_>>(),
                });
                write_atomic(&dir.join(&file), manifests::to_yaml(&slice).as_bytes())?;
                keep.insert(file);
            }
        }
        // The rules: each frontend to a random backend of its port.
        for (pi, port) in svc.ports.iter().enumerate() {
            let backends: Vec<(IpAddr, u16)> = slices
                .iter()
                .flat_map(|(ports, pods)| pods.iter().flat_map(move |p| p.ips.iter().map(move |ip| (*ip, ports[pi].2))))
                .collect();
            let proto = port.protocol.as_str().to_ascii_lowercase();
            for vip in &svc.cluster_ips {
                rules.extend(dnat(&format!("{} daddr {vip} {proto} dport {}", family(vip), port.port), vip.is_ipv4(), &backends));
            }
            // Node ports on the node's addresses (kube-proxy's `--nodeport-addresses primary`, the
            // nftables mode's default: the addresses the agent knows as the node's).
            if let Some(np) = port.node_port {
                for ip in &state.node_ips {
                    rules.extend(dnat(&format!("{} daddr {ip} {proto} dport {np}", family(ip)), ip.is_ipv4(), &backends));
                }
            }
        }
    }
    // Slices of what is gone.
    for entry in std::fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("endpointslice-") && !keep.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    apply_rules(state, &rules)
}

fn family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "ip" } else { "ip6" }
}

/// The rule (in the `inet` table's prerouting and output chains) sending what `matches` to a random one
/// of `backends` of the family (none: no rule, the packet stays untranslated).
fn dnat(matches: &str, v4: bool, backends: &[(IpAddr, u16)]) -> Option<String> {
    let of_family: Vec<&(IpAddr, u16)> = backends.iter().filter(|(ip, _)| ip.is_ipv4() == v4).collect();
    let fam = if v4 { "ip" } else { "ip6" };
    let addr = |ip: &IpAddr| if v4 { ip.to_string() } else { format!("[{ip}]") };
    let to = match of_family.as_slice() {
        [] => return None,
        [(ip, port)] => format!("{}:{port}", addr(ip)),
        many => {
            let map: Vec<String> = many.iter().enumerate().map(|(i, (ip, port))| format!("{i} : {ip} . {port}")).collect();
            format!("numgen random mod {} map {{ {} }}", many.len(), map.join(", "))
        }
    };
    let proto_guard = format!("meta nfproto {}", if v4 { "ipv4" } else { "ipv6" });
    Some(format!("{proto_guard} {matches} dnat {fam} to {to}"))
}

/// Where the lab notes that it wrote the table (the script it applied), so that a lab that never had a
/// Service never needs `nft`.
const APPLIED: &str = "services.nft";

/// Replaces the lab's nftables table in the node's namespace with `rules` (one transaction); with no
/// rules, removes the table if the lab ever wrote it.
fn apply_rules(state: &LabState, rules: &[String]) -> Result<()> {
    let applied = state.state_dir.join(APPLIED);
    if rules.is_empty() {
        if applied.exists() {
            clear(state)?;
            let _ = std::fs::remove_file(&applied);
        }
        return Ok(());
    }
    let mut script = format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    for chain in [("pre", "prerouting"), ("out", "output")] {
        // -100: NF_IP_PRI_NAT_DST, where kube-proxy's rules are.
        script.push_str(&format!("  chain {} {{\n    type nat hook {} priority -100; policy accept;\n", chain.0, chain.1));
        for r in rules {
            script.push_str(&format!("    {r}\n"));
        }
        script.push_str("  }\n");
    }
    script.push_str("}\n");
    super::net::nft(&state.node_netns, &script)?;
    write_atomic(&applied, script.as_bytes())
}

/// Removes the lab's table (for `down`; the namespace goes too, this only tidies a running node).
pub fn clear(state: &LabState) -> Result<()> {
    super::net::nft(&state.node_netns, &format!("table inet {TABLE}\ndelete table inet {TABLE}\n"))
}
