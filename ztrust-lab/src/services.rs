//! Services in the lab, the way a cluster has them: the lab plays the EndpointSlice controller (one
//! slice per Service and target-port resolution, from the pods its selector selects) and kube-proxy in
//! nftables or iptables mode (`ztrust-lab up --proxy-mode`: DNAT rules in the node's namespace, a random backend
//! per connection, written as kube-proxy writes them in that mode; node ports on the node's addresses).
//!
//! A Service without `spec.clusterIP` gets one from [`SERVICE_CIDR`], which the lab's agent is told
//! (`--service-cidr`). The slices are written next to the other copies in `manifests/`, which the agent
//! reads; the rules are rewritten whole (one `nft -f` or `iptables-restore` transaction per family) after every
//! change of Services or pods.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde_json::{Value, json};

use super::manifests::{self, Kind};
use super::state::{LabState, PodState, ProxyMode, write_atomic};
use super::{Result, io_err};
use ztrust_agent::model::Protocol;

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
        v.and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str()?.parse().ok())
            .collect()
    };
    let mut cluster_ips = ips(spec.get("clusterIPs"));
    if cluster_ips.is_empty() {
        cluster_ips.extend(
            spec.get("clusterIP")
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<IpAddr>().ok()),
        );
    }
    let selector = spec
        .get("selector")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
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
                node_port: p
                    .get("nodePort")
                    .and_then(Value::as_u64)
                    .and_then(|n| u16::try_from(n).ok()),
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
            Err(_) => pod
                .ports
                .iter()
                .find(|c| c.name.as_deref() == Some(s) && c.protocol == port.protocol)
                .map(|c| c.port),
        },
        Some(_) => None,
    }
}

/// Gives a cluster IP to a Service manifest that has none (the next free one of [`SERVICE_CIDR`], after
/// `taken`); `None` when it has one already, or is headless.
pub fn assign_cluster_ip(value: &mut Value, taken: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    let spec = value.get("spec")?;
    if spec
        .get("clusterIP")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
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
    Ok(read
        .objects
        .iter()
        .filter(|o| o.kind == Kind::Service)
        .filter_map(|o| parse(&o.value))
        .collect())
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
        p.namespace == svc.namespace
            && !p.host_network
            && svc.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
    }) {
        let ports: Option<Vec<_>> = svc
            .ports
            .iter()
            .map(|port| resolve(port, pod).map(|n| (port.name.clone(), port.protocol, n)))
            .collect();
        if let Some(ports) = ports {
            by_ports.entry(ports).or_default().push(pod);
        }
    }
    by_ports.into_iter().collect()
}

/// One address and port a Service answers on, and where the node sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// `namespace/name` of the Service.
    pub service: String,
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// A node port (on every address of the node) rather than a cluster IP.
    pub node_port: bool,
    /// The pods it translates to (`namespace/name`, address, target port), of the frontend's family.
    pub backends: Vec<(String, IpAddr, u16)>,
    /// A node port's node: only that node translates it (kube-proxy translates node ports at its own
    /// node's addresses). `None` for a cluster IP, which every node translates.
    pub node: Option<String>,
}

/// Every frontend of the lab's Services, as the node translates them now (a frontend with no backend of
/// its family is left out: the node does not translate it).
pub fn frontends(state: &LabState) -> Result<Vec<Frontend>> {
    Ok(services(state)?
        .iter()
        .flat_map(|svc| frontends_of(svc, state))
        .collect())
}

fn frontends_of(svc: &Svc, state: &LabState) -> Vec<Frontend> {
    let slices = slices(svc, &state.pods);
    let mut out = Vec::new();
    for (pi, port) in svc.ports.iter().enumerate() {
        let backends = |v4: bool| -> Vec<(String, IpAddr, u16)> {
            slices
                .iter()
                .flat_map(|(ports, pods)| {
                    pods.iter().flat_map(move |p| {
                        p.ips
                            .iter()
                            .filter(move |ip| ip.is_ipv4() == v4)
                            .map(move |ip| (p.key(), *ip, ports[pi].2))
                    })
                })
                .collect()
        };
        let mut add = |ip: IpAddr, port_number: u16, node: Option<&str>| {
            let backends = backends(ip.is_ipv4());
            if !backends.is_empty() {
                out.push(Frontend {
                    service: format!("{}/{}", svc.namespace, svc.name),
                    ip,
                    port: port_number,
                    protocol: port.protocol,
                    node_port: node.is_some(),
                    backends,
                    node: node.map(str::to_owned),
                });
            }
        };
        for vip in &svc.cluster_ips {
            add(*vip, port.port, None);
        }
        // Node ports on each node's addresses (kube-proxy's `--nodeport-addresses primary`, the nftables
        // mode's default: the addresses the agent knows as the node's; iptables mode's rule takes any
        // local address, which in the lab's node are these).
        if let Some(np) = port.node_port {
            for n in &state.nodes {
                for ip in &n.ips {
                    add(*ip, np, Some(&n.name));
                }
            }
        }
    }
    out
}

/// Writes every Service's EndpointSlices into `manifests/` (removing those of Services or resolutions
/// that are gone) and rewrites the node's translation rules.
pub fn realise(state: &LabState) -> Result<()> {
    let services = services(state)?;
    let dir = state.manifests_dir();
    let mut keep = BTreeSet::new();
    let mut frontends = Vec::new();
    for svc in &services {
        let slices = slices(svc, &state.pods);
        for (i, (ports, pods)) in slices.iter().enumerate() {
            let name = format!("{}-{i}", svc.name);
            let file = format!("endpointslice-{}-{name}.yaml", svc.namespace);
            for family_v4 in [true, false] {
                let addrs: Vec<String> = pods
                    .iter()
                    .flat_map(|p| {
                        p.ips
                            .iter()
                            .filter(|ip| ip.is_ipv4() == family_v4)
                            .map(ToString::to_string)
                    })
                    .collect();
                if addrs.is_empty() {
                    continue;
                }
                let file = if family_v4 {
                    file.clone()
                } else {
                    file.replace(".yaml", "-v6.yaml")
                };
                let slice = json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": if family_v4 { name.clone() } else { format!("{name}-v6") },
                        "namespace": svc.namespace,
                        "labels": { ztrust_agent::source::convert::services::SERVICE_NAME_LABEL: svc.name },
                    },
                    "addressType": if family_v4 { "IPv4" } else { "IPv6" },
                    "ports": ports.iter().map(|(n, p, port)| json!({ "name": n, "protocol": p.as_str(), "port": port })).collect::<Vec<_>>(),
                    "endpoints": addrs.iter().map(|a| json!({ "addresses": [a], "conditions": { "ready": true } })).collect::<Vec<_>>(),
                });
                write_atomic(&dir.join(&file), manifests::to_yaml(&slice).as_bytes())?;
                keep.insert(file);
            }
        }
        frontends.extend(frontends_of(svc, state));
    }
    // Slices of what is gone.
    for entry in std::fs::read_dir(&dir)
        .map_err(io_err(format!("reading {}", dir.display())))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("endpointslice-") && !keep.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    apply(state, &frontends)
}

fn family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "ip" } else { "ip6" }
}

/// `ip:port`, with brackets for IPv6.
fn socket(ip: &IpAddr, port: u16) -> String {
    if ip.is_ipv4() {
        format!("{ip}:{port}")
    } else {
        format!("[{ip}]:{port}")
    }
}

/// nftables mode: the rule (in the `inet` table's prerouting and output chains) sending `f` to a random
/// one of its backends.
fn nft_rule(f: &Frontend) -> String {
    let fam = family(&f.ip);
    let proto = f.protocol.as_str().to_ascii_lowercase();
    let to = match f.backends.as_slice() {
        [(_, ip, port)] => socket(ip, *port),
        many => {
            let map: Vec<String> = many
                .iter()
                .enumerate()
                .map(|(i, (_, ip, port))| format!("{i} : {ip} . {port}"))
                .collect();
            format!("numgen random mod {} map {{ {} }}", many.len(), map.join(", "))
        }
    };
    let nfproto = if f.ip.is_ipv4() { "ipv4" } else { "ipv6" };
    format!(
        "meta nfproto {nfproto} {fam} daddr {} {proto} dport {} dnat {fam} to {to}",
        f.ip, f.port
    )
}

/// iptables mode: the rules (in the nat table's [`CHAIN`]) sending `f` to a random one of its backends,
/// as kube-proxy writes them: backend i of n taken with probability 1/(n-i), the last one always. A node
/// port matches any local address (`-m addrtype --dst-type LOCAL`, kube-proxy's KUBE-NODEPORTS).
fn iptables_rules(f: &Frontend) -> Vec<String> {
    let proto = f.protocol.as_str().to_ascii_lowercase();
    let dest = if f.node_port {
        "-m addrtype --dst-type LOCAL".to_owned()
    } else {
        format!("-d {}/{}", f.ip, if f.ip.is_ipv4() { 32 } else { 128 })
    };
    let n = f.backends.len();
    f.backends
        .iter()
        .enumerate()
        .map(|(i, (pod, ip, port))| {
            let pick = if i + 1 < n {
                format!(" -m statistic --mode random --probability {:.10}", 1.0 / (n - i) as f64)
            } else {
                String::new()
            };
            format!(
                "-A {CHAIN} {dest} -p {proto} -m {proto} --dport {}{pick} -m comment --comment \"{} -> {pod}\" -j DNAT --to-destination {}",
                f.port,
                f.service,
                socket(ip, *port)
            )
        })
        .collect()
}

/// Where the lab notes that it wrote rules (what it applied), so that a lab that never had a Service
/// never needs `nft` or `iptables`.
const APPLIED: &str = "services.rules";
/// The nat chain (iptables mode) that holds the lab's Service rules, jumped to from PREROUTING and OUTPUT.
const CHAIN: &str = "ZTLAB-SERVICES";

/// Replaces each node's translation of Services with `frontends` (each node: the cluster IPs and its own
/// node ports; each family in one transaction); with none, removes what the lab ever wrote.
fn apply(state: &LabState, frontends: &[Frontend]) -> Result<()> {
    let applied = state.state_dir.join(APPLIED);
    if frontends.is_empty() {
        if applied.exists() {
            clear(state)?;
            let _ = std::fs::remove_file(&applied);
        }
        return Ok(());
    }
    let mut written = String::new();
    for n in &state.nodes {
        let here: Vec<&Frontend> = frontends
            .iter()
            .filter(|f| f.node.as_ref().is_none_or(|at| *at == n.name))
            .collect();
        written.push_str(&format!("# {}\n", n.name));
        written.push_str(&apply_at(state.proxy_mode, &n.name, &here)?);
    }
    write_atomic(&applied, written.as_bytes())
}

/// The rules of `frontends` in node `netns`, as `mode` writes them; what was written.
fn apply_at(mode: ProxyMode, netns: &str, frontends: &[&Frontend]) -> Result<String> {
    Ok(match mode {
        ProxyMode::Nftables => {
            let mut script =
                format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
            for (name, hook) in [("pre", "prerouting"), ("out", "output")] {
                // -100: NF_IP_PRI_NAT_DST, where kube-proxy's rules are.
                script.push_str(&format!(
                    "  chain {name} {{\n    type nat hook {hook} priority -100; policy accept;\n"
                ));
                for f in frontends {
                    script.push_str(&format!("    {}\n", nft_rule(f)));
                }
                script.push_str("  }\n");
            }
            script.push_str("}\n");
            super::net::nft(netns, &script)?;
            script
        }
        ProxyMode::Iptables => {
            let mut all = String::new();
            for (tool, v4) in [("iptables", true), ("ip6tables", false)] {
                // Declaring the chain in a --noflush restore empties it: the whole family's rules in one
                // transaction, the other chains untouched.
                let mut script = format!("*nat\n:{CHAIN} - [0:0]\n");
                for f in frontends.iter().filter(|f| f.ip.is_ipv4() == v4) {
                    for rule in iptables_rules(f) {
                        script.push_str(&rule);
                        script.push('\n');
                    }
                }
                script.push_str("COMMIT\n");
                super::net::exec_in(netns, &format!("{tool}-restore"), &["--noflush"], Some(&script))?;
                for hook in ["PREROUTING", "OUTPUT"] {
                    let jump = ["-t", "nat", "-C", hook, "-j", CHAIN];
                    if super::net::exec_in(netns, tool, &jump, None).is_err() {
                        super::net::exec_in(netns, tool, &["-t", "nat", "-I", hook, "1", "-j", CHAIN], None)?;
                    }
                }
                all.push_str(&script);
            }
            all
        }
    })
}

/// Removes the lab's rules (for `down`; the namespaces go too, this only tidies running nodes).
pub fn clear(state: &LabState) -> Result<()> {
    for n in &state.nodes {
        let netns = n.name.as_str();
        match state.proxy_mode {
            ProxyMode::Nftables => {
                super::net::nft(netns, &format!("table inet {TABLE}\ndelete table inet {TABLE}\n"))?
            }
            ProxyMode::Iptables => {
                for tool in ["iptables", "ip6tables"] {
                    for hook in ["PREROUTING", "OUTPUT"] {
                        let _ =
                            super::net::exec_in(netns, tool, &["-t", "nat", "-D", hook, "-j", CHAIN], None);
                    }
                    let _ = super::net::exec_in(netns, tool, &["-t", "nat", "-F", CHAIN], None);
                    let _ = super::net::exec_in(netns, tool, &["-t", "nat", "-X", CHAIN], None);
                }
            }
        }
    }
    Ok(())
}
