//! The lab's agents, one in each node's namespace: started, and waited for until they have attached to
//! and bound their node's interfaces and settled after a change.

use super::*;
use crate::AgentProblem;

/// Starts the agent of the node at `position` in `state.nodes`.
pub(super) fn start_agent(state: &mut LabState, position: usize, spec: AgentSpec) -> Result<()> {
    let bin = match spec.bin {
        Some(bin) => bin,
        None => agent_beside(&state.lab_bin)?,
    };
    let suffix = node_suffix(position);
    let mut pin_dir = spec
        .pin_dir
        .unwrap_or_else(|| default_agent_pin_dir(&state.prefix))
        .into_os_string();
    pin_dir.push(&suffix);
    let pin_dir = PathBuf::from(pin_dir);
    let with_suffix = |file: &str| {
        let (stem, ext) = file.split_once('.').unwrap_or((file, ""));
        format!("{stem}{suffix}.{ext}")
    };
    let socket = state.state_dir.join(with_suffix(AGENT_SOCKET));
    let flow_log = state.state_dir.join(with_suffix(FLOW_LOG));
    let log = state.state_dir.join(LOGS_DIR).join(with_suffix("agent.log"));
    let node = &state.nodes[position];
    let node_ips = node
        .ips
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut args: Vec<String> = vec![
        "run".into(),
        "--source".into(),
        agent_tag(&state.state_dir),
        "--pin-path".into(),
        pin_dir.display().to_string(),
        "--node-ip".into(),
        node_ips,
        "--interface-prefix".into(),
        state.if_prefix.clone(),
        "--node-name".into(),
        node.name.clone(),
        "--flow-log".into(),
        flow_log.display().to_string(),
        "--grpc-socket".into(),
        socket.display().to_string(),
        "--service-cidr".into(),
        crate::services::SERVICE_CIDR.into(),
    ];
    args.extend(spec.extra_args);
    let pid = net::spawn_in_netns(&node.name, &bin, &args, &log)?;
    state.nodes[position].agent = Some(AgentState {
        pid,
        pin_dir,
        socket,
        flow_log,
        log,
        attach_timeout_ms: u64::try_from(spec.attach_timeout.as_millis()).unwrap_or(u64::MAX),
    });
    Ok(())
}

/// Whether the agent has pinned a link on `ifname` for each of its hooks (`<pin>/links/<hook>/<ifname>`).
pub(super) fn attached(pin_dir: &Path, ifname: &str) -> bool {
    let hooks: Vec<PathBuf> = std::fs::read_dir(pin_dir.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    !hooks.is_empty() && hooks.iter().all(|h| h.join(ifname).exists())
}

/// The last `n` lines of a log file.
pub(super) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub(super) fn wait_attached(agent: &AgentState, ifnames: &[String]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_millis(agent.attach_timeout_ms);
    let fail = |problem: AgentProblem| Error::Agent {
        problem,
        log: tail(&agent.log, 20),
        log_path: agent.log.clone(),
    };
    for ifname in ifnames {
        while !attached(&agent.pin_dir, ifname) {
            if net::is_gone(agent.pid) {
                return Err(fail(AgentProblem::Exited));
            }
            if Instant::now() > deadline {
                return Err(fail(AgentProblem::NotAttached {
                    ifname: ifname.clone(),
                    within: Duration::from_millis(agent.attach_timeout_ms),
                    pin_dir: agent.pin_dir.clone(),
                }));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Waits until the agent has bound each interface to its pod (an entry in its endpoint map): until then
/// the interface is attached but fails closed, and a probe would see drops no policy asked for.
pub(super) fn wait_bound(agent: &AgentState, node_netns: &str, ifnames: &[String]) -> Result<()> {
    if ifnames.is_empty() {
        return Ok(());
    }
    let wanted: Vec<u32> = net::ifindexes(node_netns, ifnames)?
        .into_iter()
        .flatten()
        .collect();
    let deadline = Instant::now() + Duration::from_millis(agent.attach_timeout_ms);
    loop {
        let bound: Vec<u32> = ztrust_agent::status::read(&agent.pin_dir)
            .map(|st| st.endpoints.iter().map(|e| e.ifindex).collect())
            .unwrap_or_default();
        if wanted.iter().all(|i| bound.contains(i)) {
            return Ok(());
        }
        if net::is_gone(agent.pid) {
            return Err(Error::Agent {
                problem: AgentProblem::Exited,
                log: tail(&agent.log, 20),
                log_path: agent.log.clone(),
            });
        }
        if Instant::now() > deadline {
            return Err(Error::Agent {
                problem: AgentProblem::NotBound(ifnames.to_vec()),
                log: tail(&agent.log, 20),
                log_path: agent.log.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where each node's agent log ends now (in the order of `state.nodes`; 0 for a node without agent).
pub(super) fn agent_log_len(state: &LabState) -> Vec<u64> {
    state
        .nodes
        .iter()
        .map(|n| {
            n.agent
                .as_ref()
                .and_then(|a| std::fs::metadata(&a.log).ok())
                .map_or(0, |m| m.len())
        })
        .collect()
}

/// After manifests changed: waits until every agent has compiled them (its log says `policy compiled`
/// after its offset in `from`, [`agent_log_len`]) and then stayed quiet for a few of its polls, so that
/// a probe right after `apply` sees the new policies on every node. `Ok(false)` if that did not happen
/// within a few seconds (nothing an agent had to change, or a slow agent); the caller may say so.
pub(super) fn wait_settled(state: &LabState, from: &[u64]) -> Result<bool> {
    const QUIET: Duration = Duration::from_millis(300);
    let deadline = Instant::now() + Duration::from_secs(5);
    // Per agent: its log offset, the compiles seen after it, when the last one was seen.
    let mut agents: Vec<(&AgentState, u64, usize, Option<Instant>)> = state
        .nodes
        .iter()
        .zip(from.iter().copied().chain(std::iter::repeat(0)))
        .filter_map(|(n, from)| n.agent.as_ref().map(|a| (a, from, 0, None)))
        .collect();
    loop {
        for (agent, from, compiles, last_change) in &mut agents {
            let text = std::fs::read(&agent.log).unwrap_or_default();
            let fresh = String::from_utf8_lossy(text.get(*from as usize..).unwrap_or_default()).into_owned();
            let n = fresh.matches("policy compiled").count();
            if n > *compiles {
                *compiles = n;
                *last_change = Some(Instant::now());
            }
            if net::is_gone(agent.pid) {
                return Err(Error::Agent {
                    problem: AgentProblem::Exited,
                    log: tail(&agent.log, 20),
                    log_path: agent.log.clone(),
                });
            }
        }
        if agents.iter().all(|a| a.3.is_some_and(|t| t.elapsed() >= QUIET)) {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `ztrust-agent` in the directory of the lab's binary: where `cargo build` and a release archive put it.
fn agent_beside(lab_bin: &Path) -> Result<PathBuf> {
    let bin = lab_bin.with_file_name("ztrust-agent");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(Error::NoAgent {
            lab_bin: lab_bin.to_owned(),
        })
    }
}
