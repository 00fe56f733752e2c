//! Pinned links are removed only for interfaces that are really gone (root only; `cargo xtask test`
//! runs it). An agent started where it cannot see the pods' interfaces (another network namespace: a
//! DaemonSet that lost hostNetwork, a debug run in a container, the same command line in the root
//! namespace) refuses to start and leaves enforcement as it is; an interface deleted while no agent runs
//! loses its pins at the next start, and only it; a running agent keeps the links of interfaces renamed or
//! moved to another namespace. The kernel tells which is which: a TCX link whose interface was deleted
//! is detached and reports ifindex 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::payments::{PaymentsLab, cmdline, connects, kill9, respawn, wait_in_sync};
use crate::common::{agent_bin, require_root};
use ztrust_agent::datapath::pins::{self, LinkInfo};
use ztrust_lab as lab;

const HOOKS: [&str; 2] = ["from-pod", "to-pod"];

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn v4(p: &lab::PodState, port: u16) -> SocketAddr {
    SocketAddr::new(p.ips.iter().find(|a| a.is_ipv4()).copied().unwrap(), port)
}

fn pin(pin_dir: &Path, hook: &str, ifname: &str) -> PathBuf {
    pin_dir.join("links").join(hook).join(ifname)
}

/// The links pinned for `ifname`, per hook (panics if one is missing).
fn links(pin_dir: &Path, ifname: &str) -> Vec<LinkInfo> {
    HOOKS
        .iter()
        .map(|h| {
            pins::link_info(&pin(pin_dir, h, ifname))
                .unwrap_or_else(|e| panic!("link of {ifname} ({h}): {e}"))
        })
        .collect()
}

/// Which links, attached where (an agent that adopts a link swaps its own program in).
fn ids_and_ifindexes(links: &[LinkInfo]) -> Vec<(u32, u32)> {
    links.iter().map(|l| (l.id, l.ifindex)).collect()
}

/// Waits until `cond` holds (5 s at most).
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "not within 5 s: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the agent with `args` in `netns` (`None`: this process's, the root namespace) until it exits;
/// killed after 20 s. Its status and output.
fn run_to_exit(netns: Option<&str>, args: &[String]) -> (ExitStatus, String) {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(agent_bin());
            c
        }
        None => Command::new(agent_bin()),
    };
    let mut child = cmd
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the agent in {netns:?} kept running:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Adds a veth pair in the node's namespace whose node side (`name`) the agent attaches to by prefix;
/// waits until it has.
fn spare(node: &str, pin_dir: &Path, name: &str, peer: &str) {
    ip(&[
        "-n", node, "link", "add", name, "type", "veth", "peer", "name", peer,
    ]);
    eventually(&format!("links pinned for {name}"), || {
        HOOKS.iter().all(|h| pin(pin_dir, h, name).exists())
    });
}

#[test]
fn an_agent_that_cannot_see_the_pods_interfaces_refuses_to_start_and_enforcement_stays() {
    require_root();
    let lab = PaymentsLab::up("zwn", agent_bin(), &["--metrics-addr", "none"]);
    let state = lab.state.clone();
    let (frontend, backend, database) = (lab.pod("frontend"), lab.pod("backend"), lab.pod("database"));
    let allowed = || connects(&frontend.netns, v4(&backend, 8080), Duration::from_secs(2));
    let denied = || !connects(&frontend.netns, v4(&database, 5432), Duration::from_millis(500));
    assert!(allowed(), "positive control: frontend -> backend:8080 connects");
    assert!(denied(), "frontend -> database:5432 is denied");

    let agent = lab.agent();
    let args: Vec<String> = cmdline(agent.pid).into_iter().skip(1).collect();
    kill9(agent.pid);
    let host_ifs: Vec<String> = state.pods.iter().filter_map(|p| p.host_if.clone()).collect();
    assert!(host_ifs.len() >= 5, "{host_ifs:?}");
    let before: Vec<Vec<LinkInfo>> = host_ifs.iter().map(|i| links(&agent.pin_dir, i)).collect();
    assert!(before.iter().flatten().all(|l| l.ifindex != 0), "{:?}", before);

    // Another namespace, where an interface has the very name and index of the frontend's host-side one
    // (namespaces number their interfaces each on its own): the name and index alone would pass it.
    let elsewhere = format!("{}-elsewhere", lab.prefix);
    ip(&["netns", "add", &elsewhere]);
    let front_if = frontend.host_if.clone().unwrap();
    let front_index =
        lab::net::ifindexes(&state.first_node().name, std::slice::from_ref(&front_if)).unwrap()[0].unwrap();
    let index = front_index.to_string();
    let peer_index = (front_index + 1000).to_string();
    let peer = format!("{}q", lab.prefix);
    ip(&[
        "-n",
        &elsewhere,
        "link",
        "add",
        &front_if,
        "index",
        &index,
        "type",
        "veth",
        "peer",
        "name",
        &peer,
        "index",
        &peer_index,
    ]);

    for netns in [Some(elsewhere.as_str()), None] {
        let where_ = netns.unwrap_or("the root namespace");
        let (status, out) = run_to_exit(netns, &args);
        assert!(
            !status.success(),
            "the agent in {where_} must refuse to start:\n{out}"
        );
        let said = format!(
            "pinned links for {} interfaces that this network namespace cannot see",
            host_ifs.len()
        );
        assert!(
            out.contains(&said) && out.contains("hostNetwork") && out.contains("run --cleanup"),
            "{where_}:\n{out}"
        );
        for name in &host_ifs {
            assert!(
                out.contains(name.as_str()),
                "{where_}: the message names {name}:\n{out}"
            );
        }
        // Nothing changed: the same links, attached where they were.
        let now: Vec<Vec<LinkInfo>> = host_ifs.iter().map(|i| links(&agent.pin_dir, i)).collect();
        assert_eq!(now, before, "{where_}: the pinned links are untouched");
        assert!(denied(), "{where_}: frontend -> database:5432 still denied");
        assert!(allowed(), "{where_}: frontend -> backend:8080 still connects");
    }

    // The same command line where it belongs adopts the very same links.
    let log = lab.state_dir.join("agent-right-netns.log");
    let started = Instant::now();
    respawn(&state.first_node().name, agent_bin(), &args, &log);
    wait_in_sync(&log, started);
    for (name, was) in host_ifs.iter().zip(&before) {
        assert_eq!(
            ids_and_ifindexes(&links(&agent.pin_dir, name)),
            ids_and_ifindexes(was),
            "{name}: adopted, not replaced"
        );
    }
    assert!(denied(), "after the restart: frontend -> database:5432 denied");
    assert!(allowed(), "after the restart: frontend -> backend:8080 connects");
}

#[test]
fn an_interface_deleted_while_no_agent_runs_loses_its_pins_and_only_it() {
    require_root();
    let lab = PaymentsLab::up("zgn", agent_bin(), &["--metrics-addr", "none"]);
    let state = lab.state.clone();
    let agent = lab.agent();
    let node = state.first_node().name.clone();
    let (frontend, backend, database) = (lab.pod("frontend"), lab.pod("backend"), lab.pod("database"));
    let allowed = || connects(&frontend.netns, v4(&backend, 8080), Duration::from_secs(2));
    let denied = || !connects(&backend.netns, v4(&frontend, 8080), Duration::from_millis(500));
    assert!(allowed() && denied(), "positive control and a denied connection");
    // An interface the agent attached to by its prefix, renamed below.
    let renamed_from = format!("{}s1", state.if_prefix);
    let renamed_to = format!("{}r1", lab.prefix);
    spare(&node, &agent.pin_dir, &renamed_from, &format!("{}q1", lab.prefix));

    let args: Vec<String> = cmdline(agent.pid).into_iter().skip(1).collect();
    kill9(agent.pid);
    let db_if = database.host_if.clone().unwrap();
    let kept: Vec<String> = state
        .pods
        .iter()
        .filter_map(|p| p.host_if.clone())
        .filter(|i| *i != db_if)
        .collect();
    let kept_before: Vec<Vec<LinkInfo>> = kept.iter().map(|i| links(&agent.pin_dir, i)).collect();
    let spare_before = links(&agent.pin_dir, &renamed_from);

    // The database pod's interface is deleted while no agent runs (the pair goes with its node side):
    // the kernel detaches its links, which then report ifindex 0.
    assert!(links(&agent.pin_dir, &db_if).iter().all(|l| l.ifindex != 0));
    ip(&["-n", &node, "link", "del", &db_if]);
    eventually("the kernel detaches the deleted interface's links", || {
        links(&agent.pin_dir, &db_if).iter().all(|l| l.ifindex == 0)
    });
    // Renamed while no agent runs: the link stays attached to it, under its index.
    ip(&["-n", &node, "link", "set", &renamed_from, "name", &renamed_to]);
    assert_eq!(
        links(&agent.pin_dir, &renamed_from),
        spare_before,
        "a rename leaves the links attached"
    );

    let log = lab.state_dir.join("agent-after-delete.log");
    let started = Instant::now();
    respawn(&node, agent_bin(), &args, &log);
    wait_in_sync(&log, started);
    let text = std::fs::read_to_string(&log).unwrap();
    for hook in HOOKS {
        assert!(
            !pin(&agent.pin_dir, hook, &db_if).exists(),
            "{db_if} ({hook}): pin removed\n{text}"
        );
        assert!(
            !pin(&agent.pin_dir, hook, &renamed_from).exists(),
            "{renamed_from} ({hook}): pinned under the new name\n{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.contains("interface gone while no agent ran") && l.contains(db_if.as_str())),
        "the removal is logged, naming {db_if}:\n{text}"
    );
    assert_eq!(
        ids_and_ifindexes(&links(&agent.pin_dir, &renamed_to)),
        ids_and_ifindexes(&spare_before),
        "the renamed interface's links, pinned under its new name"
    );
    for (name, was) in kept.iter().zip(&kept_before) {
        assert_eq!(
            ids_and_ifindexes(&links(&agent.pin_dir, name)),
            ids_and_ifindexes(was),
            "{name}: its links kept and adopted"
        );
    }
    assert!(denied(), "backend -> frontend:8080 still denied");
    assert!(allowed(), "frontend -> backend:8080 still connects");
}

#[test]
fn a_running_agent_keeps_the_links_of_interfaces_renamed_or_moved_away() {
    require_root();
    let lab = PaymentsLab::up("zrn", agent_bin(), &["--metrics-addr", "none"]);
    let state = lab.state.clone();
    let agent = lab.agent();
    let node = state.first_node().name.clone();
    let (frontend, backend, database) = (lab.pod("frontend"), lab.pod("backend"), lab.pod("database"));
    let allowed = || connects(&frontend.netns, v4(&backend, 8080), Duration::from_secs(2));
    let denied = || !connects(&frontend.netns, v4(&database, 5432), Duration::from_millis(500));
    assert!(allowed() && denied(), "positive control and a denied connection");

    let name = |n: &str| format!("{}{n}", state.if_prefix);
    let peer = |n: u32| format!("{}q{n}", lab.prefix);
    let (out_of_scope, in_scope, moved, deleted) = (name("s1"), name("s2"), name("s3"), name("s5"));
    for (i, n) in [&out_of_scope, &in_scope, &moved, &deleted]
        .into_iter()
        .enumerate()
    {
        spare(&node, &agent.pin_dir, n, &peer(i as u32 + 1));
    }
    let before = |n: &str| links(&agent.pin_dir, n);
    let (l_out, l_in, l_moved) = (before(&out_of_scope), before(&in_scope), before(&moved));

    let (renamed_out, renamed_in) = (format!("{}r1", lab.prefix), name("s4"));
    let elsewhere = format!("{}-elsewhere", lab.prefix);
    ip(&["netns", "add", &elsewhere]);
    ip(&["-n", &node, "link", "set", &out_of_scope, "name", &renamed_out]);
    ip(&["-n", &node, "link", "set", &in_scope, "name", &renamed_in]);
    ip(&["-n", &node, "link", "set", &moved, "netns", &elsewhere]);
    ip(&["-n", &node, "link", "del", &deleted]);

    let gone = |n: &str| HOOKS.iter().all(|h| !pin(&agent.pin_dir, h, n).exists());
    eventually("the running agent follows every change", || {
        [&out_of_scope, &in_scope, &moved, &deleted]
            .iter()
            .all(|n| gone(n))
            && HOOKS.iter().all(|h| {
                pin(&agent.pin_dir, h, &renamed_out).exists() && pin(&agent.pin_dir, h, &renamed_in).exists()
            })
    });
    // Renamed, in the agent's scope or not: the same links, pinned under the new name (and adopted).
    assert_eq!(
        ids_and_ifindexes(&links(&agent.pin_dir, &renamed_out)),
        ids_and_ifindexes(&l_out)
    );
    assert_eq!(
        ids_and_ifindexes(&links(&agent.pin_dir, &renamed_in)),
        ids_and_ifindexes(&l_in)
    );
    // Moved to another namespace: still attached there, the pins kept aside.
    let kept = pins::kept(&agent.pin_dir, &HOOKS);
    let kept_ids: Vec<u32> = kept
        .iter()
        .filter_map(|(_, i)| i.as_ref().ok())
        .filter(|i| i.ifindex != 0)
        .map(|i| i.id)
        .collect();
    for l in &l_moved {
        assert!(
            kept_ids.contains(&l.id),
            "the moved interface's link {} is kept: {kept:?}",
            l.id
        );
    }
    assert!(
        kept.iter().all(|(p, _)| p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(moved.as_str())),
        "{kept:?}"
    );
    assert!(denied() && allowed(), "the pods are enforced as before");

    // A new agent starts: kept links do not stop it, and stay.
    let args: Vec<String> = cmdline(agent.pid).into_iter().skip(1).collect();
    kill9(agent.pid);
    let log = lab.state_dir.join("agent-after-moves.log");
    let started = Instant::now();
    respawn(&node, agent_bin(), &args, &log);
    wait_in_sync(&log, started);
    assert_eq!(pins::kept(&agent.pin_dir, &HOOKS).len(), kept.len());
    assert!(denied() && allowed(), "the pods are enforced after the restart");

    // The moved interface comes back: its kept links go back under its name and are adopted.
    ip(&["-n", &elsewhere, "link", "set", &moved, "netns", &node]);
    eventually("the kept links are adopted again", || {
        HOOKS.iter().all(|h| pin(&agent.pin_dir, h, &moved).exists())
    });
    let link_ids = |l: &[LinkInfo]| l.iter().map(|l| l.id).collect::<Vec<_>>();
    assert_eq!(
        link_ids(&links(&agent.pin_dir, &moved)),
        link_ids(&l_moved),
        "the same links"
    );
    assert!(
        pins::kept(&agent.pin_dir, &HOOKS).is_empty(),
        "{:?}",
        pins::kept(&agent.pin_dir, &HOOKS)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("cannot attach"), "{text}");
}
