//! What the kernel says about the links an agent pinned (`<pin_dir>/links/<hook>/<ifname>`), so that
//! an agent removes enforcement only from interfaces that are really gone.
//!
//! A TCX link is attached to one interface, named by its index in the network namespace that interface
//! is in. When the interface is deleted, the kernel detaches the link, which then reports ifindex 0; a
//! renamed interface keeps its index, and an interface moved to another network namespace keeps its links
//! (with its index there). The name in the pin path is only what the interface was called when the link
//! was pinned. So the agent asks the kernel: the link's own info (`BPF_OBJ_GET_INFO_BY_FD`) for its
//! ifindex, and the interface's hook (`BPF_PROG_QUERY` on that ifindex, in the agent's namespace) whether
//! the link is among those attached there: the same index can name another interface in another
//! namespace. aya 0.14 exposes neither the TCX ifindex of a link nor the link ids of a query, hence the
//! system calls here.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
/// `enum bpf_link_type`.
pub const BPF_LINK_TYPE_TCX: u32 = 11;

/// Where pins go of links still attached to an interface that this namespace no longer lists (moved to
/// another network namespace; or renamed, when the new name's pin is taken):
/// `<pin_dir>/kept-links/<hook>/<ifname>-<link id>`. The link keeps enforcing there, and the name is free
/// for a new interface.
/// `run --cleanup` removes them; an agent removes those whose interface is gone at start.
pub const KEPT_DIR: &str = "kept-links";

/// The part of `struct bpf_link_info` the agent reads (the union starts 8-aligned, at 16).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawLinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    /// `tcx.ifindex`
    ifindex: u32,
    /// `tcx.attach_type`
    attach_type: u32,
    _rest: [u64; 8],
}

/// A pinned link, as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// The interface the link is attached to, in the namespace of that interface; 0 once the interface
    /// was deleted (the kernel detached the link).
    pub ifindex: u32,
    /// `BPF_TCX_INGRESS` or `BPF_TCX_EGRESS`.
    pub attach_type: u32,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, zeroed where unused, and
    // lives across the call; the kernel reads and writes at most `size_of::<T>()` bytes of it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a pinned object (`BPF_OBJ_GET`).
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The link pinned at `path`: `NotFound` when there is no pin.
pub fn link_info(path: &Path) -> io::Result<LinkInfo> {
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let fd = obj_get(path)?;
    let mut raw = RawLinkInfo::default();
    let mut attr = Attr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<RawLinkInfo>() as u32,
        info: std::ptr::from_mut(&mut raw) as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo {
        link_type: raw.type_,
        id: raw.id,
        prog_id: raw.prog_id,
        ifindex: raw.ifindex,
        attach_type: raw.attach_type,
    })
}

/// The ids of the links attached to the TCX hook `attach_type` of interface `ifindex` of this network
/// namespace (`BPF_PROG_QUERY`); `ENODEV` when this namespace has no such interface.
pub fn tcx_link_ids(ifindex: u32, attach_type: u32) -> io::Result<Vec<u32>> {
    #[repr(C)]
    struct Attr {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        count: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let mut room = 64;
    loop {
        let mut progs = vec![0u32; room];
        let mut links = vec![0u32; room];
        let mut attr = Attr {
            target_ifindex: ifindex,
            attach_type,
            query_flags: 0,
            attach_flags: 0,
            prog_ids: progs.as_mut_ptr() as u64,
            count: room as u32,
            _pad: 0,
            prog_attach_flags: 0,
            link_ids: links.as_mut_ptr() as u64,
            link_attach_flags: 0,
            revision: 0,
        };
        match sys_bpf(BPF_PROG_QUERY, &mut attr) {
            Ok(_) => {
                links.truncate(attr.count as usize);
                return Ok(links);
            }
            // More attached than there was room for: `count` says how many.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && (attr.count as usize) > room => {
                room = attr.count as usize;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Where a pinned link stands, for the agent in this network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Attached to the interface of that name and index here, and listed on its hook: the agent adopts it.
    Here { ifindex: u32 },
    /// Its interface was deleted: the kernel detached the link (its info reports ifindex 0). The pin
    /// holds nothing and goes.
    Gone,
    /// Attached to an interface of this namespace that has another name now (renamed): it still
    /// enforces there.
    Renamed { ifindex: u32, now: String },
    /// Attached to an interface this namespace does not have: the interface is in another network
    /// namespace (an agent started in the wrong one, or the interface was moved). It still enforces there.
    Unseen { ifindex: u32 },
    /// Not a TCX link, or the kernel would not say: left as it is.
    Unreadable(String),
}

/// A link pinned at `path`, for interface `ifname` (its name at the time) and hook `hook`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pinned {
    pub ifname: String,
    pub hook: &'static str,
    pub path: PathBuf,
    pub state: State,
}

/// Whether the kernel lists link `id` on the hook of `ifindex` here: `Some(false)` when it does not (or
/// this namespace has no such interface), `None` when the query failed otherwise.
fn listed_here(ifindex: u32, attach_type: u32, id: u32) -> Option<bool> {
    match tcx_link_ids(ifindex, attach_type) {
        Ok(ids) => Some(ids.contains(&id)),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Some(false),
        Err(e) => {
            tracing::debug!(ifindex, error = %e, "querying the links of an interface");
            None
        }
    }
}

/// [`State`] of a link pinned for `ifname` whose info is `info`, with this namespace's interfaces
/// (`ifaces`, name → index) and `listed` saying whether the kernel lists the link on an index's hook here.
pub fn classify(
    ifname: &str,
    info: &LinkInfo,
    ifaces: &BTreeMap<String, u32>,
    listed: impl Fn(u32) -> Option<bool>,
) -> State {
    if info.link_type != BPF_LINK_TYPE_TCX {
        return State::Unreadable(format!("not a TCX link (link type {})", info.link_type));
    }
    let ifindex = info.ifindex;
    if ifindex == 0 {
        return State::Gone;
    }
    if ifaces.get(ifname) == Some(&ifindex) {
        // A namespace of its own numbers its interfaces on its own: the same name and index can be
        // another interface elsewhere. The kernel's list on the hook tells; if it cannot be asked, the
        // name and index are all there is to go by.
        return match listed(ifindex) {
            Some(false) => State::Unseen { ifindex },
            Some(true) | None => State::Here { ifindex },
        };
    }
    match ifaces.iter().find(|(_, i)| **i == ifindex) {
        Some((now, _)) if listed(ifindex) == Some(true) => State::Renamed {
            ifindex,
            now: now.clone(),
        },
        _ => State::Unseen { ifindex },
    }
}

/// The link pinned at `path` for `ifname`: `None` when there is no pin.
pub fn inspect(
    path: &Path,
    ifname: &str,
    hook: &'static str,
    ifaces: &BTreeMap<String, u32>,
) -> Option<Pinned> {
    let state = match link_info(path) {
        Ok(info) => classify(ifname, &info, ifaces, |ifindex| {
            listed_here(ifindex, info.attach_type, info.id)
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => State::Unreadable(e.to_string()),
    };
    Some(Pinned {
        ifname: ifname.to_owned(),
        hook,
        path: path.to_owned(),
        state,
    })
}

/// Every link pinned under `<pin_dir>/links/<hook>/` for `hooks`, by interface name then hook.
pub fn survey(pin_dir: &Path, hooks: &[&'static str], ifaces: &BTreeMap<String, u32>) -> Vec<Pinned> {
    let mut out = Vec::new();
    for hook in hooks {
        let dir = pin_dir.join("links").join(hook);
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            out.extend(inspect(&entry.path(), &name, hook, ifaces));
        }
    }
    out.sort_by(|a, b| (&a.ifname, a.hook).cmp(&(&b.ifname, b.hook)));
    out
}

/// Every pin under `<pin_dir>/kept-links/<hook>/`, with the kernel's info (or why there is none).
pub fn kept(pin_dir: &Path, hooks: &[&'static str]) -> Vec<(PathBuf, io::Result<LinkInfo>)> {
    let mut out = Vec::new();
    for hook in hooks {
        let dir = pin_dir.join(KEPT_DIR).join(hook);
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            out.push((entry.path(), link_info(&entry.path())));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A kept link (see [`KEPT_DIR`]) of hook `hook` that is attached to interface `ifindex` of this
/// namespace, now called `ifname`: the interface came back, or had its name taken by another.
pub fn kept_here(pin_dir: &Path, hook: &'static str, ifname: &str, ifindex: u32) -> Option<PathBuf> {
    let only_this = BTreeMap::from([(ifname.to_owned(), ifindex)]);
    kept(pin_dir, &[hook]).into_iter().find_map(|(path, info)| {
        let info = info.ok()?;
        let state = classify(ifname, &info, &only_this, |i| {
            listed_here(i, info.attach_type, info.id)
        });
        matches!(state, State::Here { .. }).then_some(path)
    })
}

/// Renames the pin `from` to `to` within bpffs (the link stays pinned all along); `AlreadyExists` if
/// `to` is taken.
pub fn move_pin(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let ret = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Moves the pin of a link that still enforces somewhere but no longer belongs under its name to
/// [`KEPT_DIR`]. Returns the new path.
pub fn keep_aside(pin_dir: &Path, pinned: &Pinned) -> io::Result<PathBuf> {
    let dir = pin_dir.join(KEPT_DIR).join(pinned.hook);
    std::fs::create_dir_all(&dir)?;
    let id = link_info(&pinned.path)
        .map(|i| i.id.to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut to = dir.join(format!("{}-{id}", pinned.ifname));
    for n in 2.. {
        match move_pin(&pinned.path, &to) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                to = dir.join(format!("{}-{id}-{n}", pinned.ifname))
            }
            other => return other.map(|()| to),
        }
    }
    unreachable!()
}

/// The interface names of `pins` in state `Unseen`, once each, sorted.
pub fn unseen(pins: &[Pinned]) -> Vec<String> {
    let mut names: Vec<String> = pins
        .iter()
        .filter(|p| matches!(p.state, State::Unseen { .. }))
        .map(|p| p.ifname.clone())
        .collect();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(ifindex: u32) -> LinkInfo {
        LinkInfo {
            link_type: BPF_LINK_TYPE_TCX,
            id: 7,
            prog_id: 3,
            ifindex,
            attach_type: 46,
        }
    }

    fn ifaces(list: &[(&str, u32)]) -> BTreeMap<String, u32> {
        list.iter().map(|(n, i)| ((*n).to_owned(), *i)).collect()
    }

    #[test]
    fn a_link_is_here_only_where_name_index_and_hook_agree() {
        let here = ifaces(&[("lo", 1), ("ztl3", 5), ("ztl9", 8)]);
        assert_eq!(
            classify("ztl3", &info(5), &here, |_| Some(true)),
            State::Here { ifindex: 5 }
        );
        // The kernel cannot be asked: the name and index decide.
        assert_eq!(
            classify("ztl3", &info(5), &here, |_| None),
            State::Here { ifindex: 5 }
        );
        // Same name, same index, but the link is not on that interface's hook: another namespace's.
        assert_eq!(
            classify("ztl3", &info(5), &here, |_| Some(false)),
            State::Unseen { ifindex: 5 }
        );
        // Deleted: detached by the kernel, whatever is called so here now.
        assert_eq!(classify("ztl3", &info(0), &here, |_| Some(true)), State::Gone);
        assert_eq!(classify("ztl4", &info(0), &here, |_| Some(true)), State::Gone);
    }

    #[test]
    fn an_index_here_under_another_name_is_a_rename_only_if_the_kernel_lists_the_link_there() {
        let here = ifaces(&[("lo", 1), ("ztl9", 8)]);
        assert_eq!(
            classify("ztl3", &info(8), &here, |_| Some(true)),
            State::Renamed {
                ifindex: 8,
                now: "ztl9".into()
            }
        );
        assert_eq!(
            classify("ztl3", &info(8), &here, |_| Some(false)),
            State::Unseen { ifindex: 8 }
        );
        assert_eq!(
            classify("ztl3", &info(8), &here, |_| None),
            State::Unseen { ifindex: 8 }
        );
        // The wrong namespace: no such index at all (the root namespace, a container's).
        assert_eq!(
            classify("ztl3", &info(12), &here, |_| Some(false)),
            State::Unseen { ifindex: 12 }
        );
        // The same name with another index.
        assert_eq!(
            classify("ztl9", &info(12), &here, |_| Some(false)),
            State::Unseen { ifindex: 12 }
        );
    }

    #[test]
    fn what_is_not_a_tcx_link_is_left_alone() {
        let here = ifaces(&[("ztl3", 5)]);
        let other = LinkInfo {
            link_type: 6,
            ..info(5)
        };
        assert!(matches!(
            classify("ztl3", &other, &here, |_| Some(true)),
            State::Unreadable(_)
        ));
    }

    #[test]
    fn unseen_names_are_listed_once() {
        let pin = |ifname: &str, hook, state| Pinned {
            ifname: ifname.into(),
            hook,
            path: PathBuf::new(),
            state,
        };
        let pins = [
            pin("a", "from-pod", State::Unseen { ifindex: 4 }),
            pin("a", "to-pod", State::Unseen { ifindex: 4 }),
            pin("b", "from-pod", State::Gone),
            pin("c", "from-pod", State::Here { ifindex: 6 }),
            pin("d", "to-pod", State::Unseen { ifindex: 9 }),
        ];
        assert_eq!(unseen(&pins), ["a", "d"]);
    }
}
