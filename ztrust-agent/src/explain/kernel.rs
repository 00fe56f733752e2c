//! The live kernel maps' answer for one hook, looked up in the order the programs look them up
//! (`ztrust-ebpf/src/judge.rs` `judge`, `policy.rs`, `services.rs`): the endpoint entry of the pod's
//! interface; for an isolated egress, the Service frontend (judged by its backend classes) or the
//! Service ranges; the remote's identity (ipcache hosts, then the longest prefix); the node's exemption on
//! ingress; the isolation flag; the allow entries for the remote's identity, then for any peer (exact,
//! then the trie where the endpoint has wide entries).

use aya::maps::MapError;
use aya::maps::lpm_trie::Key;
use ztrust_common::{
    EndpointInfo, IpcacheKey, PolicyKey, Reason, ServiceKey, ServiceValue, Verdict, dir, ep_flags, identity,
    node_ports,
};

use super::{End, KernelCheck};
use crate::datapath::keys::ip_to_mapped;
use crate::datapath::loader::Maps;
use crate::model::{ObjectRef, Protocol};

/// The lookups the kernel programs make, one method per map. `Ok(None)`: no entry.
pub trait Lookup {
    fn endpoint(&self, ifindex: u32) -> Result<Option<EndpointInfo>, MapError>;
    /// The ipcache's exact entry of a single address (its hash half).
    fn ipcache_host(&self, addr: &[u8; 16]) -> Result<Option<u32>, MapError>;
    /// The ipcache trie's longest entry that contains `addr`.
    fn ipcache_longest(&self, addr: &[u8; 16]) -> Result<Option<u32>, MapError>;
    /// The policy's exact (one-port) entry.
    fn policy_exact(&self, key: &PolicyKey) -> Result<Option<u32>, MapError>;
    /// The policy trie's longest entry that contains `key` (at [`PolicyKey::PREFIX_FULL`]).
    fn policy_longest(&self, key: &PolicyKey) -> Result<Option<u32>, MapError>;
    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, MapError>;
    fn in_service_ranges(&self, addr: &[u8; 16]) -> Result<bool, MapError>;
    /// [`ztrust_common::Config::node_ports`].
    fn node_ports(&self) -> Result<u32, MapError>;
    /// The type of the node's longest local route covering `addr` (1: `local`), if the mirror has one.
    fn node_local(&self, addr: &[u8; 16]) -> Result<Option<u32>, MapError>;
}

/// A lookup's value, `None` for a missing key.
fn found<T>(r: Result<T, MapError>) -> Result<Option<T>, MapError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Lookup for Maps {
    fn endpoint(&self, ifindex: u32) -> Result<Option<EndpointInfo>, MapError> {
        found(self.endpoints.get(&ifindex, 0))
    }
    fn ipcache_host(&self, addr: &[u8; 16]) -> Result<Option<u32>, MapError> {
        found(self.ipcache.hosts.get(&IpcacheKey { addr: *addr }, 0)).map(|v| v.map(|v| v.identity))
    }
    fn ipcache_longest(&self, addr: &[u8; 16]) -> Result<Option<u32>, MapError> {
        let key = Key::new(IpcacheKey::PREFIX_HOST, IpcacheKey { addr: *addr });
        found(self.ipcache.prefixes.get(&key, 0)).map(|v| v.map(|v| v.identity))
    }
    fn policy_exact(&self, key: &PolicyKey) -> Result<Option<u32>, MapError> {
        found(self.policy.exact.get(key, 0)).map(|v| v.map(|v| v.rule_id))
    }
    fn policy_longest(&self, key: &PolicyKey) -> Result<Option<u32>, MapError> {
        found(
            self.policy
                .prefixes
                .get(&Key::new(PolicyKey::PREFIX_FULL, *key), 0),
        )
        .map(|v| v.map(|v| v.rule_id))
    }
    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, MapError> {
        found(self.services.get(key, 0))
    }
    fn in_service_ranges(&self, addr: &[u8; 16]) -> Result<bool, MapError> {
        let key = Key::new(IpcacheKey::PREFIX_HOST, IpcacheKey { addr: *addr });
        found(self.service_ranges.get(&key, 0)).map(|v| v.is_some())
    }
    fn node_ports(&self) -> Result<u32, MapError> {
        self.config.get(&0, 0).map(|c| c.node_ports)
    }
    fn node_local(&self, addr: &[u8; 16]) -> Result<Option<u32>, MapError> {
        let key = Key::new(IpcacheKey::PREFIX_HOST, IpcacheKey { addr: *addr });
        found(self.node_local.get(&key, 0))
    }
}

/// The kernel's judgment of a new connection's first packet: reason, rule id, remote identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judged {
    pub reason: Reason,
    pub rule_id: u32,
    pub remote: u32,
    pub isolated: bool,
    pub audit: bool,
}

fn remote_identity(maps: &dyn Lookup, addr: &[u8; 16]) -> Result<u32, MapError> {
    if let Some(id) = maps.ipcache_host(addr)? {
        return Ok(id);
    }
    Ok(maps.ipcache_longest(addr)?.unwrap_or(identity::WORLD))
}

/// `policy.rs` `policy_lookup`: the remote's own entries, then the any-peer ones.
fn policy_lookup(
    maps: &dyn Lookup,
    ep: &EndpointInfo,
    remote: u32,
    direction: u8,
    protocol: u8,
    port: u16,
) -> Result<Option<u32>, MapError> {
    let wide = ep.flags & ep_flags::no_wide(direction, protocol) == 0;
    let allowed = |id: u32| -> Result<Option<u32>, MapError> {
        let key = PolicyKey::new(ep.endpoint_id, id, direction, protocol, port);
        if let Some(rule) = maps.policy_exact(&key)? {
            return Ok(Some(rule));
        }
        if wide { maps.policy_longest(&key) } else { Ok(None) }
    };
    if let Some(rule) = allowed(remote)? {
        return Ok(Some(rule));
    }
    let no_any = if direction == dir::INGRESS {
        ep_flags::NO_ANY_PEER_INGRESS
    } else {
        ep_flags::NO_ANY_PEER_EGRESS
    };
    if ep.flags & no_any != 0 {
        return Ok(None);
    }
    allowed(identity::ANY)
}

fn isolated(ep: &EndpointInfo, direction: u8) -> bool {
    let flag = if direction == dir::INGRESS {
        ep_flags::ISOLATED_INGRESS
    } else {
        ep_flags::ISOLATED_EGRESS
    };
    ep.flags & flag != 0
}

/// `admits_peer`: not isolated, or an allow entry.
fn admits_peer(
    maps: &dyn Lookup,
    ep: &EndpointInfo,
    remote: u32,
    direction: u8,
    protocol: u8,
    port: u16,
) -> Result<Option<(Reason, u32)>, MapError> {
    if !isolated(ep, direction) {
        return Ok(Some((Reason::NotIsolated, 0)));
    }
    Ok(policy_lookup(maps, ep, remote, direction, protocol, port)?.map(|r| (Reason::AllowedByPolicy, r)))
}

/// `services.rs` `judge_service`: every class admitted, none, or some.
fn judge_service(
    maps: &dyn Lookup,
    ep: &EndpointInfo,
    svc: &ServiceValue,
    protocol: u8,
) -> Result<(Reason, u32), MapError> {
    let n = svc.classes as usize;
    if n == 0 {
        return Ok((Reason::UnknownService, 0));
    }
    if n > svc.class.len() {
        return Ok((Reason::ServiceBackendsDiffer, 0));
    }
    let first = svc.class[0];
    let (admitted, why, rule) =
        match admits_peer(maps, ep, first.identity, dir::EGRESS, protocol, first.port)? {
            Some((why, rule)) => (true, why, rule),
            None => (false, Reason::PolicyDenied, 0),
        };
    for c in &svc.class[1..n] {
        if admits_peer(maps, ep, c.identity, dir::EGRESS, protocol, c.port)?.is_some() != admitted {
            return Ok((Reason::ServiceBackendsDiffer, 0));
        }
    }
    Ok((why, rule))
}

/// The kernel's judgment at `ifindex`'s hook in `direction` of a new connection with the remote at
/// `remote_addr` and destination `port`, not translated on the way; `node_sent`: the node itself sent it.
/// `None`: the interface has no endpoint entry (the kernel drops as `unknown-endpoint`).
pub fn judge(
    maps: &dyn Lookup,
    ifindex: u32,
    direction: u8,
    remote_addr: std::net::IpAddr,
    protocol: u8,
    port: u16,
    node_sent: bool,
) -> Result<Option<Judged>, MapError> {
    let Some(ep) = maps.endpoint(ifindex)? else {
        return Ok(None);
    };
    let addr = ip_to_mapped(remote_addr);
    let judged = |reason, rule_id, remote| Judged {
        reason,
        rule_id,
        remote,
        isolated: isolated(&ep, direction),
        audit: ep.flags & (ep_flags::AUDIT | ep_flags::audit_in(direction)) != 0,
    };
    if direction == dir::EGRESS && isolated(&ep, direction) && !remote_addr.is_unspecified() {
        let mut key = ServiceKey {
            addr,
            port_be: port.to_be(),
            protocol,
            _pad: 0,
        };
        if let Some(svc) = maps.service(&key)? {
            let (why, rule) = judge_service(maps, &ep, &svc, protocol)?;
            return Ok(Some(judged(why, rule, svc.class[0].identity)));
        }
        if maps.node_ports()? == node_ports::ANY_LOCAL {
            key.addr = ip_to_mapped(if remote_addr.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            });
            // An address the mirror of the node's local routes does not cover is taken as not the
            // node's: the kernel asks the node's routing then, which a lookup from here cannot do as the
            // packet would (a route added since the agent's last mirror makes the two differ).
            if let Some(svc) = maps.service(&key)?
                && maps.node_local(&addr)? == Some(1)
            {
                let (why, rule) = judge_service(maps, &ep, &svc, protocol)?;
                return Ok(Some(judged(why, rule, svc.class[0].identity)));
            }
        }
        if maps.in_service_ranges(&addr)? {
            return Ok(Some(judged(
                Reason::UnknownService,
                0,
                remote_identity(maps, &addr)?,
            )));
        }
    }
    let remote = remote_identity(maps, &addr)?;
    // `admits_from`: the node's address is exempt on a packet the node sent (`from` 0); one that entered on
    // the uplink (another node's host-network pod) is judged by policy.
    if direction == dir::INGRESS && remote == identity::HOST && node_sent {
        return Ok(Some(judged(Reason::FromHost, 0, remote)));
    }
    Ok(Some(
        match admits_peer(maps, &ep, remote, direction, protocol, port)? {
            Some((why, rule)) => judged(why, rule, remote),
            None => judged(Reason::PolicyDenied, 0, remote),
        },
    ))
}

/// Looks `end` up in the kernel maps and notes where they differ from the compiled state.
pub(super) fn check(
    maps: &dyn Lookup,
    ifindex_of: &dyn Fn(&ObjectRef) -> Option<u32>,
    end: &mut End,
    protocol: Protocol,
    node_sent: bool,
) {
    // No interface yet: nothing to look up (the caller says so).
    let Some(ifindex) = ifindex_of(&end.pod) else {
        return;
    };
    let judged = match judge(
        maps,
        ifindex,
        end.direction.code(),
        end.remote_ip,
        protocol.number(),
        end.port,
        node_sent,
    ) {
        Ok(j) => j,
        Err(e) => {
            end.disagreements.push(format!(
                "the kernel maps could not be read (ifindex {ifindex}): {e}"
            ));
            return;
        }
    };
    let Some(j) = judged else {
        end.disagreements.push(format!(
            "the kernel has no endpoint entry for ifindex {ifindex}: it drops the pod's traffic as unknown-endpoint"
        ));
        end.kernel = Some(KernelCheck {
            ifindex,
            verdict: Verdict::Dropped,
            reason: Reason::UnknownEndpoint,
            isolated: false,
            audit: false,
            remote_identity: 0,
            rule_id: 0,
            agrees: false,
        });
        return;
    };
    let allowed = matches!(
        j.reason,
        Reason::AllowedByPolicy | Reason::NotIsolated | Reason::FromHost
    );
    let verdict = match (allowed, j.audit) {
        (true, _) => Verdict::Forwarded,
        (false, true) => Verdict::WouldDrop,
        (false, false) => Verdict::Dropped,
    };
    let mut differs = Vec::new();
    if verdict != end.verdict || j.reason != end.reason {
        differs.push(format!(
            "the kernel maps say {verdict} ({}), the agent's compiled state {} ({})",
            j.reason, end.verdict, end.reason
        ));
    }
    if j.rule_id != end.rule_id && verdict == end.verdict {
        differs.push(format!(
            "the kernel's allow entry holds rule id {}, the compiled state's {}",
            j.rule_id, end.rule_id
        ));
    }
    let via_frontend = !end.backends.is_empty() || end.reason == Reason::UnknownService;
    if let Some(id) = end.remote_identity.filter(|id| *id != j.remote)
        && !via_frontend
    {
        differs.push(format!(
            "the kernel's ipcache gives the remote identity {}, the compiled state {id}",
            j.remote
        ));
    }
    if j.isolated != end.isolated {
        differs.push(format!(
            "the kernel's endpoint entry says {}isolated for {}, the compiled state {}",
            if j.isolated { "" } else { "not " },
            end.direction,
            if end.isolated { "isolated" } else { "not isolated" }
        ));
    }
    if j.audit != (end.mode == super::Mode::Audit) {
        differs.push(format!(
            "the kernel's endpoint entry is {}in audit mode, the compiled state {}",
            if j.audit { "" } else { "not " },
            if end.mode == super::Mode::Audit {
                "audits"
            } else {
                "enforces"
            }
        ));
    }
    let agrees = differs.is_empty();
    end.disagreements.extend(differs);
    end.kernel = Some(KernelCheck {
        ifindex,
        verdict,
        reason: j.reason,
        isolated: j.isolated,
        audit: j.audit,
        remote_identity: j.remote,
        rule_id: j.rule_id,
        agrees,
    });
}
