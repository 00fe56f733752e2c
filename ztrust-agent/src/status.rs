//! `ztrust-agent status`: what the kernel enforces on this node, read straight from the pinned maps, so
//! it answers even while no agent runs.

use std::path::Path;

use serde::Serialize;
use ztrust_common::{ep_flags, stat};

use crate::datapath::loader::{PinnedMaps, Result};
use crate::flows::{Direction, Reason, Verdict};

#[derive(Debug, Default, Serialize)]
pub struct Counter {
    pub interface: String,
    pub ifindex: u32,
    pub direction: String,
    pub verdict: String,
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct EndpointRow {
    pub ifindex: u32,
    pub interface: String,
    pub identity: u32,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    pub audit: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Status {
    pub endpoints: Vec<EndpointRow>,
    pub endpoints_capacity: u32,
    pub policy_entries: usize,
    pub policy_capacity: u32,
    pub ipcache_entries: usize,
    pub ipcache_capacity: u32,
    pub counters: Vec<Counter>,
    pub events_lost: u64,
    pub events_rate_limited: u64,
    /// Events left out because their interface had used its budget for the second (`--event-budget`).
    pub events_over_budget: u64,
    pub ct_insert_failed: u64,
    /// Packets passed on the peer mark (TCP between two pods of this node, judged once).
    pub peer_judged: u64,
}

fn ifname(index: u32) -> String {
    nix::net::if_::if_indextoname(index)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("#{index}"))
}

/// [`read`], with interface names resolved inside the network namespace `netns` (`/run/netns/<name>`),
/// where the endpoints' interfaces live (the lab's node, for one).
pub fn read_in_netns(pin_dir: &Path, netns: &str) -> Result<Status> {
    let path = format!("/run/netns/{netns}");
    let pin_dir = pin_dir.to_owned();
    std::thread::spawn(move || {
        // Only this thread moves; a failure to enter leaves names unresolved (shown as `#ifindex`).
        if let Ok(f) = std::fs::File::open(&path) {
            let _ = nix::sched::setns(std::os::fd::AsFd::as_fd(&f), nix::sched::CloneFlags::CLONE_NEWNET);
        }
        read(&pin_dir)
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// What the pinned maps under `pin_dir` hold, read through the loader's wrappers ([`PinnedMaps`]):
/// entries counted as the agent counts them, capacities as pinned.
pub fn read(pin_dir: &Path) -> Result<Status> {
    let maps = PinnedMaps::open(pin_dir)?;
    let mut st = Status {
        endpoints_capacity: maps.capacities.endpoints,
        policy_capacity: maps.capacities.policy,
        ipcache_capacity: maps.capacities.ipcache,
        policy_entries: maps.policy_entries(),
        ipcache_entries: maps.ipcache_entries(),
        events_lost: maps.stat(stat::EVENTS_LOST),
        events_rate_limited: maps.stat(stat::EVENTS_RATE_LIMITED),
        events_over_budget: maps.stat(stat::EVENTS_OVER_BUDGET),
        ct_insert_failed: maps.stat(stat::CT_INSERT_FAILED),
        peer_judged: maps.stat(stat::PEER_JUDGED),
        ..Default::default()
    };
    for (ifindex, info) in maps.endpoints.iter().flatten() {
        st.endpoints.push(EndpointRow {
            ifindex,
            interface: ifname(ifindex),
            identity: info.identity,
            ingress_isolated: info.flags & ep_flags::ISOLATED_INGRESS != 0,
            egress_isolated: info.flags & ep_flags::ISOLATED_EGRESS != 0,
            audit: info.flags & ep_flags::AUDIT != 0,
        });
    }
    st.endpoints.sort_by_key(|e| e.ifindex);
    let totals = maps
        .counter_totals()
        .map_err(|source| crate::datapath::loader::Error::Map {
            name: "packet counters (ZT_ENDPOINTS, ZT_SLOT_COUNTERS, ZT_COUNTERS)",
            source,
        })?;
    for (key, v) in totals {
        st.counters.push(Counter {
            interface: ifname(key.ifindex),
            ifindex: key.ifindex,
            direction: Direction::from_code(key.direction).name().into(),
            verdict: Verdict::from_code(key.verdict).name().into(),
            reason: Reason::from_code(key.reason).name().into(),
            packets: v.packets,
            bytes: v.bytes,
        });
    }
    Ok(st)
}

pub fn render(st: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "endpoints {}/{}   policy entries {}/{}   ipcache {}/{}   events lost {}   rate-limited {}   over budget {}   judged at the peer {}\n\n",
        st.endpoints.len(),
        st.endpoints_capacity,
        st.policy_entries,
        st.policy_capacity,
        st.ipcache_entries,
        st.ipcache_capacity,
        st.events_lost,
        st.events_rate_limited,
        st.events_over_budget,
        st.peer_judged
    ));
    out.push_str(&format!(
        "{:<30} {:>7} {:>9} {:<8} {:<8} {}\n",
        "INTERFACE", "IFINDEX", "IDENTITY", "INGRESS", "EGRESS", "MODE"
    ));
    for e in &st.endpoints {
        let iso = |b: bool| if b { "isolated" } else { "open" };
        out.push_str(&format!(
            "{:<30} {:>7} {:>9} {:<8} {:<8} {}\n",
            e.interface,
            e.ifindex,
            e.identity,
            iso(e.ingress_isolated),
            iso(e.egress_isolated),
            if e.audit { "audit" } else { "enforce" }
        ));
    }
    out.push_str(&format!(
        "\n{:<30} {:<8} {:<11} {:<20} {:>10} {:>12}\n",
        "INTERFACE", "DIR", "VERDICT", "REASON", "PACKETS", "BYTES"
    ));
    for c in &st.counters {
        out.push_str(&format!(
            "{:<30} {:<8} {:<11} {:<20} {:>10} {:>12}\n",
            c.interface, c.direction, c.verdict, c.reason, c.packets, c.bytes
        ));
    }
    out
}
