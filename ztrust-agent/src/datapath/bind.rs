//! Which interface each of this node's pods is behind, and the programs on it.
//!
//! A pod is bound to the interface its host route (a /32 or /128 with no gateway) leads through: the
//! CNI's host-side veth. Binding attaches the programs (before the pod's entry is written, the
//! interface drops everything: fail closed); interfaces matching `--interface-prefix` get them as soon
//! as they appear, before their pod is known. [`Binder`] keeps what was bound and said; [`Attach`] is
//! the datapath as binding uses it ([`super::loader::Datapath`] in the agent, a double in tests).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::loader::{Datapath, Released};
use crate::model::ObjectRef;
use crate::netif::HostRoutes;
use crate::policy::Desired;

/// How long an interface may be held closed with no pod before the agent says so.
pub const HELD_CLOSED_WARNING: Duration = Duration::from_secs(10);

/// The programs on interfaces, as binding needs them.
pub trait Attach {
    fn is_attached(&self, ifname: &str) -> bool;
    /// Attaches the programs to the interface (both directions). The error is said as it is.
    fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<(), String>;
}

impl Attach for Datapath {
    fn is_attached(&self, ifname: &str) -> bool {
        Datapath::is_attached(self, ifname)
    }

    fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<(), String> {
        Datapath::attach(self, ifname, ifindex).map_err(|e| with_sources(&e))
    }
}

/// The error and its sources (the errno an aya error keeps as its source), each once.
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The bindings of this node's pods to interfaces (pod → interface index), and what was said about the
/// pods and interfaces that have none.
#[derive(Debug, Default)]
pub struct Binder {
    bindings: BTreeMap<ObjectRef, u32>,
    /// Pods with no host route, said once each (again once they had one and lost it).
    unbound_reported: BTreeSet<ObjectRef>,
    /// Interfaces held closed by `--interface-prefix` that no pod's host route leads to: since when, and
    /// whether that was said.
    held_closed: HashMap<String, (Instant, bool)>,
    /// `--interface-prefix`.
    prefixes: Vec<String>,
}

impl Binder {
    pub fn new(prefixes: Vec<String>) -> Self {
        Self {
            prefixes,
            ..Self::default()
        }
    }

    pub fn bindings(&self) -> &BTreeMap<ObjectRef, u32> {
        &self.bindings
    }

    /// Binds every endpoint of `desired` (this node's pods: the engine compiles no other) to the
    /// interface its host route leads through, attaching the programs where they are not yet, and
    /// attaches them to every interface matching the prefixes. Returns whether the bindings changed.
    pub fn bind(
        &mut self,
        dp: &mut impl Attach,
        desired: &Desired,
        ifaces: &BTreeMap<String, u32>,
        routes: &HostRoutes,
    ) -> bool {
        let mut bindings = BTreeMap::new();
        for (pod, ep) in &desired.endpoints {
            let iface = ep.ips.iter().find_map(|ip| routes.interface_of(ip));
            match iface.and_then(|n| ifaces.get(n).map(|i| (n, *i))) {
                Some((name, index)) => {
                    self.unbound_reported.remove(pod);
                    if dp.is_attached(name) {
                        bindings.insert(pod.clone(), index);
                    } else if let Err(e) = dp.attach(name, index) {
                        error!(%pod, error = %e, "cannot attach; pod NOT enforced");
                    } else {
                        bindings.insert(pod.clone(), index);
                    }
                }
                None => {
                    if self.unbound_reported.insert(pod.clone()) {
                        warn!(%pod, ips = ?ep.ips, "no host route to the pod on this node; not enforced here");
                    }
                }
            }
        }
        for (name, index) in ifaces {
            if self.matches_prefix(name)
                && !dp.is_attached(name)
                && let Err(e) = dp.attach(name, *index)
            {
                error!(ifname = %name, error = %e, "cannot attach to new interface");
            }
        }
        self.say_held_closed(dp, ifaces, &bindings, Instant::now());
        if bindings == self.bindings {
            return false;
        }
        self.bindings = bindings;
        true
    }

    fn matches_prefix(&self, name: &str) -> bool {
        self.prefixes
            .iter()
            .any(|p| !p.is_empty() && name.starts_with(p.as_str()))
    }

    /// Warns once about each interface the prefixes attached to that no pod has been bound to for
    /// [`HELD_CLOSED_WARNING`]. Returns the interfaces warned about by this call.
    fn say_held_closed(
        &mut self,
        dp: &impl Attach,
        ifaces: &BTreeMap<String, u32>,
        bindings: &BTreeMap<ObjectRef, u32>,
        now: Instant,
    ) -> Vec<String> {
        let bound: BTreeSet<u32> = bindings.values().copied().collect();
        let mut said = Vec::new();
        self.held_closed.retain(|name, _| ifaces.contains_key(name));
        for (name, index) in ifaces {
            if !(self.matches_prefix(name) && dp.is_attached(name)) || bound.contains(index) {
                self.held_closed.remove(name);
                continue;
            }
            let (since, warned) = self.held_closed.entry(name.clone()).or_insert((now, false));
            if !*warned && now.duration_since(*since) > HELD_CLOSED_WARNING {
                *warned = true;
                said.push(name.clone());
                warn!(
                    ifname = %name,
                    "interface held closed for {}s: it matches --interface-prefix, but no pod of this node has a host \
                     route (/32, /128) through it. Either its pod is not in the API yet, or it is no pod's (another \
                     container runtime's veth), or the CNI bridges pods (flannel, the bridge plugin: not supported, \
                     every pod stays closed)",
                    HELD_CLOSED_WARNING.as_secs()
                );
            }
        }
        said
    }
}

/// Lets go of attached interfaces no longer listed under the name and index they had: deleted, renamed
/// or moved to another namespace. Only the kernel can tell which; their pins go only if it detached the
/// links (see [`Datapath::release`]). Run before binding, so that a recreated or renamed interface is
/// attached in the same pass.
pub fn release_gone(dp: &mut Datapath, ifaces: &BTreeMap<String, u32>) {
    let gone: Vec<String> = dp
        .attached()
        .filter(|(n, i)| ifaces.get(*n) != Some(i))
        .map(|(n, _)| n.to_owned())
        .collect();
    for name in gone {
        match dp.release(&name, ifaces) {
            Released::Gone => info!(ifname = %name, "interface gone"),
            Released::Renamed(now) => {
                info!(ifname = %name, %now, "interface renamed: its links are pinned under the new name")
            }
            Released::Kept(kept) => warn!(
                ifname = %name,
                kept = ?kept.iter().map(|(_, p)| p.display().to_string()).collect::<Vec<_>>(),
                state = ?kept.first().map(|(s, _)| s),
                "interface no longer in this network namespace under that name, but its links are still attached \
                 (moved to another namespace, or renamed to a name whose pins are taken): they keep enforcing \
                 there, kept aside; `run --cleanup` removes them"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::policy::EndpointPolicy;

    /// Interfaces the programs are on; attaching to a name in `broken` fails.
    #[derive(Default)]
    struct Fake {
        attached: BTreeMap<String, u32>,
        broken: BTreeSet<String>,
    }

    impl Attach for Fake {
        fn is_attached(&self, ifname: &str) -> bool {
            self.attached.contains_key(ifname)
        }

        fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<(), String> {
            if self.broken.contains(ifname) {
                return Err("no such device".into());
            }
            self.attached.insert(ifname.to_owned(), ifindex);
            Ok(())
        }
    }

    fn desired(pods: &[(&str, &str)]) -> Desired {
        let mut d = Desired::default();
        for (name, ip) in pods {
            d.endpoints.insert(
                ObjectRef::new("shop", *name),
                EndpointPolicy {
                    ips: vec![ip.parse().expect("ip")],
                    ..Default::default()
                },
            );
        }
        d
    }

    fn routes(r: &[(&str, &str)]) -> HostRoutes {
        HostRoutes(
            r.iter()
                .map(|(ip, dev)| (ip.parse::<IpAddr>().expect("ip"), (*dev).to_owned()))
                .collect(),
        )
    }

    fn ifaces(i: &[(&str, u32)]) -> BTreeMap<String, u32> {
        i.iter().map(|(n, x)| ((*n).to_owned(), *x)).collect()
    }

    #[test]
    fn pods_are_bound_by_their_host_route_and_only_once_attached() {
        let mut dp = Fake::default();
        dp.broken.insert("veth-b".into());
        let mut b = Binder::new(vec!["veth".into()]);
        let d = desired(&[("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")]);
        let r = routes(&[("10.0.0.1", "veth-a"), ("10.0.0.2", "veth-b")]);
        let i = ifaces(&[("veth-a", 7), ("veth-b", 8), ("veth-x", 9), ("eth0", 2)]);
        assert!(b.bind(&mut dp, &d, &i, &r));
        // a: bound; b: its interface refused the programs, so not bound (not enforced, said); c: no route.
        assert_eq!(
            b.bindings().iter().collect::<Vec<_>>(),
            [(&ObjectRef::new("shop", "a"), &7)]
        );
        // The prefix attached to the interface of no pod (fail closed), never to others.
        assert!(dp.is_attached("veth-x") && !dp.is_attached("eth0"));
        assert!(!b.bind(&mut dp, &d, &i, &r), "nothing changed");

        // c's route appears: bound in the same pass that attaches to its interface.
        let r = routes(&[("10.0.0.1", "veth-a"), ("10.0.0.3", "veth-c")]);
        let i = ifaces(&[("veth-a", 7), ("veth-c", 10)]);
        assert!(b.bind(&mut dp, &d, &i, &r));
        assert_eq!(b.bindings().get(&ObjectRef::new("shop", "c")), Some(&10));
        assert!(dp.is_attached("veth-c"));
    }

    #[test]
    fn an_attach_error_says_its_errno() {
        #[derive(Debug, thiserror::Error)]
        #[error("pinning link for veth0 (from-pod)")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::from_raw_os_error(1));
        assert_eq!(
            with_sources(&e),
            format!(
                "pinning link for veth0 (from-pod): {}",
                std::io::Error::from_raw_os_error(1)
            )
        );
    }

    #[test]
    fn an_interface_held_closed_with_no_pod_is_said_once_after_a_while() {
        let mut dp = Fake::default();
        let mut b = Binder::new(vec!["veth".into()]);
        let i = ifaces(&[("veth-x", 9), ("veth-a", 7)]);
        let d = desired(&[("a", "10.0.0.1")]);
        b.bind(&mut dp, &d, &i, &routes(&[("10.0.0.1", "veth-a")]));
        let t0 = Instant::now();
        let bindings = b.bindings().clone();
        assert!(b.say_held_closed(&dp, &i, &bindings, t0).is_empty(), "not yet");
        let later = t0 + HELD_CLOSED_WARNING + Duration::from_secs(1);
        assert_eq!(
            b.say_held_closed(&dp, &i, &bindings, later),
            ["veth-x"],
            "veth-a has its pod"
        );
        assert!(
            b.say_held_closed(&dp, &i, &bindings, later).is_empty(),
            "said once"
        );
        // Gone and back: a new interface, its own wait.
        b.say_held_closed(&dp, &ifaces(&[("veth-a", 7)]), &bindings, later);
        assert!(b.say_held_closed(&dp, &i, &bindings, later).is_empty());
    }
}
