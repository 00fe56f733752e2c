//! Objects into the lab: namespaces, pods (their network namespaces, servers), policies, Services and
//! external hosts, each copied into the lab's manifests.

use super::*;
use crate::Conflict;

/// The shared part of `up` and `apply`.
pub(super) fn add_objects(
    state: &mut LabState,
    objects: Vec<RawObject>,
    hook: Option<LinkHook<'_>>,
    server_timeout: Duration,
    report: &mut Report,
) -> Result<()> {
    let log_from = agent_log_len(state);
    let mut alloc = Allocator::new(
        state
            .pods
            .iter()
            .flat_map(|p| p.ips.clone())
            .chain(state.all_node_ips()),
    );
    // Addresses the manifests give are taken before any is handed out.
    let mut models = Vec::new();
    for obj in &objects {
        if obj.kind == Kind::Pod {
            let (model, warnings) = manifests::pod_model(obj);
            report.warnings.extend(warnings);
            if let Some(m) = &model
                && state.pod(&format!("{}/{}", m.namespace, m.name)).is_none()
            {
                for ip in &m.ips {
                    alloc.mark_used(*ip);
                }
            }
            models.push(model);
        } else {
            models.push(None);
        }
    }
    // Cluster IPs the manifests give are taken before any is handed out.
    let explicit_ips: Vec<IpAddr> = objects
        .iter()
        .filter(|o| o.kind == Kind::Service)
        .filter_map(|o| o.value["spec"]["clusterIP"].as_str()?.parse().ok())
        .collect();
    // (node position, host_if, ips, is_pod)
    let mut new_links: Vec<(usize, String, Vec<IpAddr>, bool)> = Vec::new();
    let mut to_start: Vec<(String, usize, bool)> = Vec::new(); // (netns, index into pods/externals, is_pod)
    for (obj, model) in objects.into_iter().zip(models) {
        match obj.kind {
            Kind::Namespace | Kind::NetworkPolicy => {
                write_copy(state, &obj)?;
                report.changed.push(obj.display());
            }
            Kind::Service => {
                let mut obj = obj;
                // Its cluster IP: the one it had (a Service keeps it across re-applies), else a new one.
                let copy = state.manifests_dir().join(obj.file_name());
                let before = manifests::read_path(&copy)
                    .ok()
                    .and_then(|r| r.objects.into_iter().next());
                let kept = before
                    .as_ref()
                    .and_then(|b| b.value["spec"]["clusterIP"].as_str().map(str::to_owned));
                match kept {
                    Some(ip) if obj.value["spec"]["clusterIP"].as_str().is_none_or(str::is_empty) => {
                        obj.value["spec"]["clusterIP"] = serde_json::json!(ip);
                        obj.value["spec"]["clusterIPs"] = serde_json::json!([ip]);
                    }
                    _ => {
                        let mut taken = crate::services::cluster_ips(state)?;
                        taken.extend(&explicit_ips);
                        let _ = crate::services::assign_cluster_ip(&mut obj.value, &taken);
                    }
                }
                write_copy(state, &obj)?;
                report.changed.push(obj.display());
            }
            Kind::Pod => {
                let Some(model) = model else { continue };
                let key = format!("{}/{}", model.namespace, model.name);
                if let Some(i) = state.pods.iter().position(|p| p.key() == key) {
                    let pod = &mut state.pods[i];
                    pod.labels = model.labels.clone();
                    if model.node_name.as_ref().is_some_and(|n| *n != pod.node) {
                        report.warnings.push(format!(
                            "Pod {key}: stays on {} (the lab does not move a running pod)",
                            pod.node
                        ));
                    }
                    if !model.ips.is_empty() && model.ips != pod.ips {
                        report.warnings.push(format!(
                            "Pod {key}: keeps its addresses {:?} (the lab does not re-address a running pod)",
                            pod.ips
                        ));
                    }
                    if pod.ports != model.ports {
                        pod.ports = model.ports.clone();
                        if let Some(pid) = pod.server_pid.take() {
                            net::kill_servers(&[pid], &state.state_dir);
                        }
                        to_start.push((pod.netns.clone(), i, true));
                    }
                    let mut obj = obj;
                    manifests::set_pod_ips(&mut obj.value, &state.pods[i].ips);
                    manifests::set_pod_node(&mut obj.value, &state.pods[i].node);
                    write_copy(state, &obj)?;
                    report.changed.push(obj.display());
                    continue;
                }
                let at =
                    match &model.node_name {
                        Some(name) => state.nodes.iter().position(|n| n.name == *name).ok_or_else(|| {
                            Error::Conflict {
                                object: obj.display(),
                                conflict: Conflict::UnknownNode {
                                    node: name.clone(),
                                    nodes: state.node_names(),
                                },
                            }
                        })?,
                        None => {
                            let at = state.next_node % state.nodes.len();
                            state.next_node = at + 1;
                            at
                        }
                    };
                let node = state.nodes[at].clone();
                let index = state.next_index;
                state.next_index += 1;
                let ips = if model.host_network {
                    node.ips.clone()
                } else if !model.ips.is_empty() {
                    if let Some(other) = state
                        .pods
                        .iter()
                        .find(|p| !p.host_network && p.ips.iter().any(|ip| model.ips.contains(ip)))
                    {
                        return Err(Error::Conflict {
                            object: obj.display(),
                            conflict: Conflict::AddressOf(other.key()),
                        });
                    }
                    model.ips.clone()
                } else {
                    let (v4, v6) = alloc.next_pair(node.block).ok_or_else(|| Error::Conflict {
                        object: obj.display(),
                        conflict: Conflict::NoFreeAddress(format!(
                            "{}'s {}",
                            node.name,
                            crate::alloc::block_cidrs(node.block).0
                        )),
                    })?;
                    vec![IpAddr::V4(v4), IpAddr::V6(v6)]
                };
                let (netns, host_if) = if model.host_network {
                    (node.name.clone(), None)
                } else {
                    (
                        format!("{}-p{index}", state.prefix),
                        Some(format!("{}{index}", state.if_prefix)),
                    )
                };
                state.pods.push(PodState {
                    namespace: model.namespace.clone(),
                    name: model.name.clone(),
                    labels: model.labels.clone(),
                    ips: ips.clone(),
                    ports: model.ports.clone(),
                    host_network: model.host_network,
                    node: node.name.clone(),
                    netns: netns.clone(),
                    host_if: host_if.clone(),
                    index,
                    server_pid: None,
                });
                state.save()?;
                if let Some(host_if) = host_if {
                    node::make_endpoint(&node.name, &netns, &host_if, &ips)?;
                    new_links.push((at, host_if, ips.clone(), true));
                }
                to_start.push((netns, state.pods.len() - 1, true));
                let mut obj = obj;
                manifests::set_pod_ips(&mut obj.value, &ips);
                manifests::set_pod_node(&mut obj.value, &node.name);
                write_copy(state, &obj)?;
                report.changed.push(obj.display());
            }
            Kind::ExternalHost => {
                let x = manifests::external_host(&obj)?;
                if let Some(i) = state.externals.iter().position(|e| e.name == x.name) {
                    if state.externals[i].ips != x.ips {
                        report.warnings.push(format!(
                            "{}: keeps its addresses (the lab does not re-address)",
                            obj.display()
                        ));
                    }
                    if state.externals[i].ports != x.ports {
                        state.externals[i].ports = x.ports;
                        if let Some(pid) = state.externals[i].server_pid.take() {
                            net::kill_servers(&[pid], &state.state_dir);
                        }
                        to_start.push((state.externals[i].netns.clone(), i, false));
                        report.changed.push(obj.display());
                    }
                    continue;
                }
                let taken = state
                    .pods
                    .iter()
                    .filter(|p| !p.host_network)
                    .flat_map(|p| p.ips.iter());
                if let Some(ip) = taken
                    .chain(state.externals.iter().flat_map(|e| e.ips.iter()))
                    .find(|ip| x.ips.contains(ip))
                {
                    return Err(Error::Conflict {
                        object: obj.display(),
                        conflict: Conflict::Taken(*ip),
                    });
                }
                let index = state.next_index;
                state.next_index += 1;
                let netns = format!("{}-x{index}", state.prefix);
                let host_if = format!("{}{index}", state.ext_if_prefix);
                state.externals.push(ExternalState {
                    name: x.name,
                    ips: x.ips.clone(),
                    ports: x.ports,
                    netns: netns.clone(),
                    host_if: host_if.clone(),
                    index,
                    server_pid: None,
                });
                state.save()?;
                // External hosts hang off the first node.
                node::make_endpoint(&state.first_node().name, &netns, &host_if, &x.ips)?;
                new_links.push((0, host_if, x.ips, false));
                to_start.push((netns, state.externals.len() - 1, false));
                report.changed.push(obj.display());
            }
        }
    }
    let pod_links: Vec<String> = new_links.iter().filter(|l| l.3).map(|l| l.1.clone()).collect();
    if let Some(hook) = hook
        && !pod_links.is_empty()
    {
        hook(&pod_links).map_err(Error::Hook)?;
    }
    // Per node: its new pod interfaces, attached by its agent before they come up, bound after.
    let links_of = |at: usize| -> Vec<String> {
        new_links
            .iter()
            .filter(|l| l.0 == at && l.3)
            .map(|l| l.1.clone())
            .collect()
    };
    for (at, n) in state.nodes.iter().enumerate() {
        if let Some(agent) = &n.agent {
            wait_attached(agent, &links_of(at))?;
        }
    }
    for (at, host_if, ips, _) in &new_links {
        let n = &state.nodes[*at];
        node::link_up(&n.name, host_if, ips, node_addrs(n))?;
        // The other nodes reach the block of this one through its link; addresses outside the block
        // (given by the manifest, an external host's) get host routes of their own.
        let (v4, v6) = crate::alloc::block_cidrs(n.block);
        let borrowed: Vec<IpAddr> = ips
            .iter()
            .copied()
            .filter(|ip| match ip {
                IpAddr::V4(a) => !v4.contains(a),
                IpAddr::V6(a) => !v6.contains(a),
            })
            .collect();
        if !borrowed.is_empty() {
            for other in state.nodes.iter().filter(|o| o.name != n.name) {
                node::route_via(peer(other), peer(n), &borrowed)?;
            }
        }
    }
    for (at, n) in state.nodes.iter().enumerate() {
        if let Some(agent) = &n.agent {
            wait_bound(agent, &n.name, &links_of(at))?;
        }
    }
    let mut started = Vec::new();
    for (netns, i, is_pod) in to_start {
        let (name, ports, index) = if is_pod {
            let p = &state.pods[i];
            (p.key(), p.ports.clone(), p.index)
        } else {
            let x = &state.externals[i];
            (x.key(), x.ports.clone(), x.index)
        };
        let args = serve_args(state, &name, &ports, index);
        let s = start_server(state, &netns, args, index)?;
        if is_pod {
            state.pods[i].server_pid = Some(s.pid);
        } else {
            state.externals[i].server_pid = Some(s.pid);
        }
        started.push(s);
    }
    state.save()?;
    wait_ready(&started, server_timeout)?;
    // Services, and pods (new ones, changed labels), change what Services translate to.
    crate::services::realise(state)?;
    if !report.changed.is_empty() && !wait_settled(state, &log_from)? {
        report
            .warnings
            .push("an agent has not picked up the change yet (see logs/agent*.log)".into());
    }
    Ok(())
}

pub(super) fn write_copy(state: &LabState, obj: &RawObject) -> Result<()> {
    let path = state.manifests_dir().join(obj.file_name());
    write_atomic(&path, manifests::to_yaml(&obj.value).as_bytes())
}
