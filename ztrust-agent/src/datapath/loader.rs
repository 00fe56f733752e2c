//! Loads the kernel programs, adopts or creates the pinned maps, and attaches programs to interfaces
//! with pinned links, so that enforcement outlives the agent process.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf},
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
    },
};
use tracing::{debug, info, warn};
use ztrust_common::{
    Config, CounterKey, CounterValue, CtKey, CtValue, EndpointInfo, IpcacheKey, IpcacheValue, PolicyKey,
    PolicyValue, ServiceKey, ServiceValue, SlotCounters, names,
};

use super::{EBPF_OBJECT, pins};

mod counters;
mod layout;
mod maps;

pub use self::counters::{Counted, CounterMaps, CounterReading, CounterTotals, Origin, add_counts, sum};
pub use self::layout::Capacities;
use self::layout::check_pinned;
pub use self::maps::{Endpoints, IPCACHE_HOST_PREFIX, Ipcache, Maps, NO_SLOT, PinnedMaps, Policy};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ztrust";

/// The default peer mark ([`Datapath::load_with_mark`]): bit 12, outside the bits kube-proxy (0x4000,
/// 0x8000) and Calico (0xffff0000 by default) use.
pub const DEFAULT_PEER_MARK: u32 = 0x1000;
const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bpffs: {doing}: {source}")]
    Bpffs {
        doing: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("attaching to {ifname} ({hook}): {source}")]
    Attach {
        ifname: String,
        hook: &'static str,
        source: ProgramError,
    },
    #[error("taking the link for {ifname} ({hook}) as a pinnable link: {source}")]
    LinkFd {
        ifname: String,
        hook: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("pinning link for {ifname} ({hook}) at {path}: {source}")]
    PinLink {
        ifname: String,
        hook: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("adopting pinned link {path}: {source}")]
    AdoptLink { path: PathBuf, source: LinkError },
    #[error("moving aside pinned link {path}, which is not {ifname}'s: {source}")]
    KeepLink {
        path: PathBuf,
        ifname: String,
        source: io::Error,
    },
    #[error(
        "map {name} pinned at {path} has {pinned}-byte {what}, this agent's programs need {wanted}-byte {what}: it \
         was made by an agent with another map layout. The pinned programs keep enforcing with it; to replace it, stop the \
         agent and remove the pins (`ztrust-agent run --cleanup --pin-path {pin_dir}`: enforcement stops until \
         the new agent has synced)"
    )]
    PinnedLayout {
        name: &'static str,
        path: PathBuf,
        what: &'static str,
        pinned: u32,
        wanted: u32,
        pin_dir: PathBuf,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How programs are attached to interfaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links (pinned, so enforcement outlives the agent) where the kernel has them (≥ 6.6), else
    /// clsact.
    #[default]
    Auto,
    /// A clsact qdisc with a BPF filter (netlink), as on kernels before 6.6. These attachments are not
    /// pinnable: they end with the agent process.
    Clsact,
}

/// The two hooks of a pod's host-side interface.
const HOOKS: [(&str, TcAttachType, &str); 2] = [
    (names::PROG_FROM_POD, TcAttachType::Ingress, "from-pod"),
    (names::PROG_TO_POD, TcAttachType::Egress, "to-pod"),
];

/// The hooks' directories under `<pin_dir>/links/`.
const HOOK_DIRS: [&str; 2] = [HOOKS[0].2, HOOKS[1].2];

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    pub maps: Maps,
    pub events: Option<RingBuf<MapData>>,
    /// Interfaces the programs are attached to: name → ifindex at attach time.
    attached: BTreeMap<String, u32>,
    caps: Capacities,
    pub attach_mode: AttachMode,
    /// clsact attachments (not pinnable): dropping one detaches it.
    netlink_links: BTreeMap<String, Vec<SchedClassifierLink>>,
}

/// Mounts bpffs at /sys/fs/bpf when it is not mounted yet (a bare node or container). Callers of one
/// process take turns: two threads that both found it missing would mount it twice, one over the other
/// (and a kubelet then reads the lower, private one for a DaemonSet's hostPath).
pub fn ensure_bpffs() -> Result<()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mounts = fs::read_to_string("/proc/self/mounts").map_err(|source| Error::Bpffs {
        doing: "reading /proc/self/mounts",
        source,
    })?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(BPFFS) && l.contains(" bpf "))
    {
        return Ok(());
    }
    fs::create_dir_all(BPFFS).map_err(|source| Error::Bpffs {
        doing: "creating /sys/fs/bpf",
        source,
    })?;
    nix::mount::mount(
        Some("bpffs"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| Error::Bpffs {
        doing: "mounting bpffs at /sys/fs/bpf",
        source: io::Error::from(errno),
    })?;
    info!("mounted bpffs at {BPFFS}");
    Ok(())
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

impl Datapath {
    /// Loads the programs with the default map sizes.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        Self::load_with(pin_dir, Capacities::default())
    }

    /// Loads the programs with [`DEFAULT_PEER_MARK`]: see [`Datapath::load_with_mark`].
    pub fn load_with(pin_dir: &Path, caps: Capacities) -> Result<Self> {
        Self::load_with_mark(pin_dir, caps, DEFAULT_PEER_MARK)
    }

    /// Loads the programs. Maps already pinned under `pin_dir/maps` (by an earlier agent) are reused with
    /// their content, so enforcement continues across restarts; missing ones are created and pinned.
    /// `peer_mark` is the `skb->mark` bit with which the interface of a pod sending on a TCP connection
    /// that both ends (pods of this node) have admitted tells the receiving pod's interface so, which
    /// then passes the packet without judging it again (0: every interface judges every packet).
    pub fn load_with_mark(pin_dir: &Path, caps: Capacities, peer_mark: u32) -> Result<Self> {
        ensure_bpffs()?;
        let maps_dir = pin_dir.join("maps");
        let links = pin_dir.join("links");
        for dir in [&maps_dir, &links.join("from-pod"), &links.join("to-pod")] {
            fs::create_dir_all(dir).map_err(|source| Error::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        let caps = check_pinned(pin_dir, caps)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(names::ENDPOINTS, caps.endpoints)
            .map_max_entries(names::SLOT_COUNTERS, caps.endpoints + 1)
            .map_max_entries(names::IPCACHE, caps.ipcache)
            .map_max_entries(names::IPCACHE_HOSTS, caps.ipcache)
            .map_max_entries(names::POLICY, caps.policy)
            .map_max_entries(names::POLICY_EXACT, caps.policy)
            .map_max_entries(names::CONNTRACK, caps.conntrack)
            .override_global("PEER_MARK", &peer_mark, true)
            .load(EBPF_OBJECT)?;
        for (name, _, _) in HOOKS {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(Error::Program {
                    name,
                    source: ProgramError::UnexpectedProgramType,
                })?
                .try_into()
                .map_err(|source| Error::Program { name, source })?;
            prog.load().map_err(|source| Error::Program { name, source })?;
        }
        let mut maps = Maps {
            endpoints: Endpoints::adopt(
                take(&mut ebpf, names::ENDPOINTS)?,
                take(&mut ebpf, names::SLOT_COUNTERS)?,
            )
            .map_err(|source| Error::Map {
                name: names::ENDPOINTS,
                source,
            })?,
            ipcache: Ipcache {
                hosts: take(&mut ebpf, names::IPCACHE_HOSTS)?,
                prefixes: take(&mut ebpf, names::IPCACHE)?,
            },
            policy: Policy {
                exact: take(&mut ebpf, names::POLICY_EXACT)?,
                prefixes: take(&mut ebpf, names::POLICY)?,
            },
            conntrack: take(&mut ebpf, names::CONNTRACK)?,
            counters: take(&mut ebpf, names::COUNTERS)?,
            stats: take(&mut ebpf, names::STATS)?,
            config: take(&mut ebpf, names::CONFIG)?,
            revision: take(&mut ebpf, names::REVISION)?,
            services: take(&mut ebpf, names::SERVICES)?,
            service_ranges: take(&mut ebpf, names::SERVICE_RANGES)?,
            node_local: take(&mut ebpf, names::NODE_LOCAL)?,
        };
        let legacy = maps.policy.copy_legacy_exact().map_err(|source| Error::Map {
            name: names::POLICY_EXACT,
            source,
        })?;
        if legacy > 0 {
            info!(
                entries = legacy,
                "single-port allow entries of an earlier agent copied from the policy trie to the exact-port map"
            );
        }
        let events = Some(take(&mut ebpf, names::EVENTS)?);
        info!(pin_dir = %pin_dir.display(), "datapath loaded");
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            maps,
            events,
            attached: BTreeMap::new(),
            caps,
            attach_mode: AttachMode::Auto,
            netlink_links: BTreeMap::new(),
        })
    }

    pub fn capacities(&self) -> Capacities {
        self.caps
    }

    /// A loaded program, e.g. to run it on prepared packets (`BPF_PROG_TEST_RUN`) in tests and benchmarks.
    pub fn program(&self, name: &str) -> Option<&SchedClassifier> {
        self.ebpf
            .program(name)
            .and_then(|p| <&SchedClassifier>::try_from(p).ok())
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// `links/<hook>/<ifname>`: bpffs reserves names with a dot for itself.
    fn link_path(&self, ifname: &str, hook: &str) -> PathBuf {
        self.pin_dir.join("links").join(hook).join(ifname)
    }

    pub fn is_attached(&self, ifname: &str) -> bool {
        self.attached.contains_key(ifname)
    }

    pub fn attached(&self) -> impl Iterator<Item = (&str, u32)> {
        self.attached.iter().map(|(n, i)| (n.as_str(), *i))
    }

    /// Attaches both programs to `ifname` (TCX where the kernel has it, else clsact) and pins the links.
    /// A link pinned by an earlier agent is adopted and switched to this agent's programs atomically
    /// (TCX replaces the program in place: no packet goes unfiltered).
    pub fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<()> {
        let tcx = self.attach_mode == AttachMode::Auto
            && aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        if !tcx {
            return self.attach_clsact(ifname, ifindex);
        }
        for (name, attach_type, hook) in HOOKS {
            let path = self.link_path(ifname, hook);
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or(Error::Program {
                    name,
                    source: ProgramError::UnexpectedProgramType,
                })?
                .try_into()
                .map_err(|source| Error::Program { name, source })?;
            // Only a link on this very interface is adopted: a pin of that name can hold the link of an
            // interface deleted since (defunct: removed), or of one renamed or moved to another network
            // namespace, which still enforces there (moved aside, and kept).
            let only_this = BTreeMap::from([(ifname.to_owned(), ifindex)]);
            let mut adoptable = match pins::inspect(&path, ifname, hook, &only_this) {
                None => false,
                Some(pins::Pinned {
                    state: pins::State::Here { .. },
                    ..
                }) => true,
                Some(pins::Pinned {
                    state: pins::State::Gone,
                    ..
                }) => {
                    // It holds nothing.
                    debug!(%ifname, hook, "pinned link defunct (its interface was deleted): attaching anew");
                    let _ = fs::remove_file(&path);
                    false
                }
                Some(other) => {
                    let to = pins::keep_aside(&self.pin_dir, &other).map_err(|source| Error::KeepLink {
                        path: path.clone(),
                        ifname: ifname.into(),
                        source,
                    })?;
                    warn!(%ifname, ifindex, hook, state = ?other.state, kept = %to.display(),
                        "the link pinned under this interface's name is another interface's; it is kept, and this one gets its own");
                    false
                }
            };
            if !adoptable && let Some(kept) = pins::kept_here(&self.pin_dir, hook, ifname, ifindex) {
                // A link kept aside earlier is on this very interface (it came back from another
                // namespace, or took the name of another): it goes back under the name, and is adopted.
                adoptable = pins::move_pin(&kept, &path).is_ok();
                info!(%ifname, ifindex, hook, kept = %kept.display(), adopted = adoptable, "a kept link is on this interface");
            }
            let adopted = match adoptable.then(|| PinnedLink::from_pin(&path)) {
                Some(Ok(pinned)) => {
                    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
                        Error::AdoptLink {
                            path: path.clone(),
                            source,
                        }
                    })?;
                    match prog.attach_to_link(link) {
                        Ok(id) => Some(id),
                        Err(e) => {
                            // Attach anew below; the pin is replaced only once the new link is attached,
                            // so the interface is never without a program.
                            debug!(%ifname, hook, error = %e, "pinned link not reusable");
                            None
                        }
                    }
                }
                _ => None,
            };
            let id = match adopted {
                Some(id) => id,
                None => prog.attach(ifname, attach_type).map_err(|source| Error::Attach {
                    ifname: ifname.into(),
                    hook,
                    source,
                })?,
            };
            let link = prog.take_link(id).map_err(|source| Error::Attach {
                ifname: ifname.into(),
                hook,
                source,
            })?;
            let fd_link = FdLink::try_from(link).map_err(|source| Error::LinkFd {
                ifname: ifname.into(),
                hook,
                source,
            })?;
            let _ = fs::remove_file(&path);
            let pinned = fd_link.pin(&path).map_err(|source| Error::PinLink {
                ifname: ifname.into(),
                hook,
                path: path.clone(),
                source,
            })?;
            // The pin keeps the link (and so the attachment) alive; our descriptor is not needed.
            drop(pinned);
        }
        self.attached.insert(ifname.to_owned(), ifindex);
        info!(%ifname, ifindex, "programs attached");
        Ok(())
    }

    /// The fallback for kernels without TCX: a clsact qdisc and a BPF filter per direction. The
    /// attachment lives as long as this process (netlink filters cannot be pinned).
    fn attach_clsact(&mut self, ifname: &str, ifindex: u32) -> Result<()> {
        if let Err(e) = aya::programs::tc::qdisc_add_clsact(ifname) {
            // EEXIST: a clsact qdisc is there already (ours from before, or the CNI's).
            debug!(%ifname, error = %e, "clsact qdisc not added");
        }
        let mut links = Vec::new();
        for (name, attach_type, hook) in HOOKS {
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or(Error::Program {
                    name,
                    source: ProgramError::UnexpectedProgramType,
                })?
                .try_into()
                .map_err(|source| Error::Program { name, source })?;
            let options =
                aya::programs::tc::TcAttachOptions::Netlink(aya::programs::tc::NlOptions::default());
            let id = prog
                .attach_with_options(ifname, attach_type, options)
                .map_err(|source| Error::Attach {
                    ifname: ifname.into(),
                    hook,
                    source,
                })?;
            links.push(prog.take_link(id).map_err(|source| Error::Attach {
                ifname: ifname.into(),
                hook,
                source,
            })?);
        }
        self.netlink_links.insert(ifname.to_owned(), links);
        self.attached.insert(ifname.to_owned(), ifindex);
        warn!(%ifname, ifindex, "programs attached with clsact (no TCX): enforcement on this interface ends with the agent");
        Ok(())
    }

    /// Detaches from `ifname` by removing its pinned links (the last reference to them).
    pub fn detach(&mut self, ifname: &str) {
        // clsact filters detach when their link is dropped.
        self.netlink_links.remove(ifname);
        for (_, _, hook) in HOOKS {
            let path = self.link_path(ifname, hook);
            if let Err(e) = fs::remove_file(&path)
                && e.kind() != io::ErrorKind::NotFound
            {
                warn!(%ifname, path = %path.display(), error = %e, "removing pinned link");
            }
        }
        self.attached.remove(ifname);
    }

    /// For an interface this agent attached to that the namespace no longer lists under that name and
    /// index. Its pins go only if the kernel detached their links (the interface was deleted). Those of
    /// a renamed interface are pinned under its new name (an agent attaching to it adopts them). Those of
    /// an interface moved to another network namespace keep enforcing there: they move to
    /// [`pins::KEPT_DIR`], freeing the name. The agent stops tracking the interface in every case.
    pub fn release(&mut self, ifname: &str, ifaces: &BTreeMap<String, u32>) -> Released {
        self.attached.remove(ifname);
        if self.netlink_links.remove(ifname).is_some() {
            // clsact filters: no pins; they go with the interface, or with their link handles here.
            return Released::Gone;
        }
        let mut released = Released::Gone;
        for hook in HOOK_DIRS {
            let path = self.link_path(ifname, hook);
            let Some(pinned) = pins::inspect(&path, ifname, hook, ifaces) else {
                continue;
            };
            match &pinned.state {
                pins::State::Gone => {
                    if let Err(e) = fs::remove_file(&path)
                        && e.kind() != io::ErrorKind::NotFound
                    {
                        warn!(%ifname, path = %path.display(), error = %e, "removing pinned link");
                    }
                }
                // Pinned again, for the interface of that name now: not this agent's to touch.
                pins::State::Here { .. } => {}
                pins::State::Renamed { now, .. }
                    if pins::move_pin(&path, &self.link_path(now, hook)).is_ok() =>
                {
                    released = Released::Renamed(now.clone());
                }
                _ => {
                    let kept = match pins::keep_aside(&self.pin_dir, &pinned) {
                        Ok(to) => to,
                        Err(e) => {
                            warn!(%ifname, path = %path.display(), error = %e, "moving aside a pinned link that still enforces; left where it is");
                            path.clone()
                        }
                    };
                    match &mut released {
                        Released::Kept(k) => k.push((pinned.state.clone(), kept)),
                        other => *other = Released::Kept(vec![(pinned.state.clone(), kept)]),
                    }
                }
            }
        }
        released
    }

    /// Interfaces whose links were pinned by an earlier agent (names from the pin directory).
    pub fn pinned_interfaces(&self) -> Vec<String> {
        let mut names: Vec<String> = HOOKS
            .iter()
            .flat_map(|(_, _, hook)| {
                fs::read_dir(self.pin_dir.join("links").join(hook))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// What [`Datapath::release`] did with the pins of an interface.
#[derive(Debug, PartialEq, Eq)]
pub enum Released {
    /// Removed: the kernel had detached the links (the interface was deleted), or there were none.
    Gone,
    /// The interface was renamed to this: its links are pinned under the new name.
    Renamed(String),
    /// Still attached to an interface this namespace does not list (moved to another namespace): moved
    /// aside (where to), and kept.
    Kept(Vec<(pins::State, PathBuf)>),
}

/// What the kernel says of every link pinned under `pin_dir` (see [`pins::survey`]), from this network
/// namespace, whose interfaces are `ifaces`. Reads only.
pub fn survey_pins(pin_dir: &Path, ifaces: &BTreeMap<String, u32>) -> Vec<pins::Pinned> {
    pins::survey(pin_dir, &HOOK_DIRS, ifaces)
}

/// At start, once the agent knows it runs where the pinned links are: removes the pins of links the
/// kernel detached (their interface was deleted while no agent ran), here and among the kept ones;
/// pins those of renamed interfaces under the new name (or, if that is taken, moves them aside: they
/// keep enforcing there); leaves the rest as it is.
pub fn settle_pins(pin_dir: &Path, survey: &[pins::Pinned]) {
    for p in survey {
        match &p.state {
            pins::State::Here { .. } | pins::State::Unseen { .. } => {}
            pins::State::Gone => match fs::remove_file(&p.path) {
                Ok(()) => {
                    info!(ifname = %p.ifname, hook = p.hook, "interface gone while no agent ran (the kernel detached its link): pin removed")
                }
                Err(e) => {
                    warn!(ifname = %p.ifname, path = %p.path.display(), error = %e, "removing the pin of a detached link")
                }
            },
            pins::State::Renamed { ifindex, now } => {
                let to = pin_dir.join("links").join(p.hook).join(now);
                match pins::move_pin(&p.path, &to)
                    .map(|()| to)
                    .or_else(|_| pins::keep_aside(pin_dir, p))
                {
                    Ok(to) => info!(ifname = %p.ifname, %now, ifindex, hook = p.hook, pin = %to.display(),
                        "interface renamed while no agent ran: its link, still attached, is pinned under the new name"),
                    Err(e) => {
                        warn!(ifname = %p.ifname, %now, error = %e, "moving the pin of a renamed interface's link; left where it is")
                    }
                }
            }
            pins::State::Unreadable(why) => {
                warn!(ifname = %p.ifname, path = %p.path.display(), reason = %why, "cannot tell what this pinned link is attached to: left as it is (`run --cleanup` removes it)");
            }
        }
    }
    for (path, info) in pins::kept(pin_dir, &HOOK_DIRS) {
        if matches!(info, Ok(i) if i.ifindex == 0) {
            match fs::remove_file(&path) {
                Ok(()) => {
                    info!(path = %path.display(), "kept link detached by the kernel (its interface was deleted): pin removed")
                }
                Err(e) => warn!(path = %path.display(), error = %e, "removing the pin of a detached link"),
            }
        }
    }
}

/// Removes every pin the agent made (links first, so programs detach, then maps).
pub fn cleanup(pin_dir: &Path) -> io::Result<()> {
    for (_, _, hook) in HOOKS {
        for parent in ["links", pins::KEPT_DIR] {
            let dir = pin_dir.join(parent).join(hook);
            if dir.exists() {
                for e in fs::read_dir(&dir)? {
                    fs::remove_file(e?.path())?;
                }
            }
        }
    }
    match fs::remove_dir_all(pin_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The kernel's statistics (`ZT_STATS`, one counter per CPU and index), opened from the pins on their
/// own: what the observer's tick reads, without the rest of the maps.
pub struct Stats(PerCpuArray<MapData, u64>);

impl Stats {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self(open_pinned(pin_dir, names::STATS)?))
    }

    /// The counter `index` (a `ztrust_common::stat` code) summed over the CPUs; `None` if it cannot be
    /// read (not 0: a counter that seemed to fall to 0 would be reported again in full at the next read).
    pub fn get(&self, index: u32) -> Option<u64> {
        self.0.get(&index, 0).ok().map(|v| v.iter().sum())
    }
}

/// Opens a pinned map of a running (or exited) agent, for `status` and tests.
pub fn open_pinned<T>(pin_dir: &Path, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let path = pin_dir.join("maps").join(name);
    let data = MapData::from_pin(&path).map_err(|source| Error::Map { name, source })?;
    let map = aya::maps::Map::from_map_data(data).map_err(|source| Error::Map { name, source })?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}
