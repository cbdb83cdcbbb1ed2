//! Socket mode (`redirect run --mode socket`, zero-hop) on this host: the cgroup hooks that
//! choose the backend inside `connect()`, and the TC hooks on the uplink for connections
//! opened during a hold (see `redirect-common/src/socket.rs` for what each does).
//!
//! Its pins sit beside the proxy's maps, in the same pin dir: the same `CONFIG`, `BACKENDS`,
//! `ACTIVE`, `CUTOVER` and `HELD` (so the flip, the hold, the journal and `status` are the
//! proxy's), plus `SOCKETS`, `FLOWS`, `FLOW_GATE` and `SOCK_STATS`, and one link per hook:
//! `sockhook_<hook>` for the cgroup's, `sockhook_<hook>_<iface>` for the uplink's. A restart
//! attaches the new program beside the pinned one, then lets the old link go: both read the
//! same maps, and each hook does nothing to what the other already did, so no `connect()` and
//! no packet is missed in between.
//!
//! The cgroup hooks stay attached. The uplink's are *armed* only while a cutover needs them:
//! a cutover arms them before its hold (they park held SYNs and raise the datapath fence), and
//! the controller disarms them once it is idle and no flow is parked or translated. Between
//! cutovers no program runs on any packet: a connection costs what a direct one does.

use std::{
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
};

use super::{DatapathError, PinDir, TC_REINJECT_PROGRAM};

/// `statfs` magic of a cgroup v2 mount (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// ... and of a cgroup v1 hierarchy (`CGROUP_SUPER_MAGIC`), to say what is wrong.
const CGROUP1_SUPER_MAGIC: i64 = 0x0027_e0eb;

/// The cgroup hooks, by program name (the pin is `sockhook_<name>`).
const ADDR_HOOKS: [&str; 4] = ["connect4", "connect6", "getpeername4", "getpeername6"];
const RELEASE_HOOK: &str = "sock_release";
/// The uplink's hooks: (program, direction, pin name part).
const UPLINK_HOOKS: [(&str, TcAttachType, &str); 2] = [
    ("socket_egress", TcAttachType::Egress, "egress"),
    ("socket_ingress", TcAttachType::Ingress, "ingress"),
];

/// Where the hooks attach: every process in `cgroup` and below it (the root cgroup is every
/// process on the host), and the interfaces held connections leave by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub cgroup: PathBuf,
    pub uplinks: Vec<(String, u32)>,
}

/// Checks that `path` is a cgroup v2 directory, before anything is loaded.
pub fn check_cgroup(path: &Path) -> Result<(), DatapathError> {
    let bad = |why: String| DatapathError::Cgroup {
        path: path.to_path_buf(),
        why,
    };
    if !path.is_dir() {
        return Err(bad(
            "does not exist (give a cgroup v2 directory: /sys/fs/cgroup for every process on this host, or a slice's or pod's directory under it)".into(),
        ));
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| bad("has a NUL byte".into()))?;
    // SAFETY: a zeroed statfs is valid to pass for the kernel to fill.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &raw mut fs) } != 0 {
        return Err(bad(std::io::Error::last_os_error().to_string()));
    }
    match fs.f_type {
        CGROUP2_SUPER_MAGIC => Ok(()),
        CGROUP1_SUPER_MAGIC => Err(bad(
            "is a cgroup v1 hierarchy: socket mode needs cgroup v2 (the unified hierarchy; boot with systemd.unified_cgroup_hierarchy=1)".into(),
        )),
        other => Err(bad(format!(
            "is not a cgroup v2 directory (filesystem magic {other:#x})"
        ))),
    }
}

/// The root of this host's cgroup v2 hierarchy, from `/proc/self/mountinfo`:
/// `/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a hybrid one. Every
/// process is in the v2 hierarchy even where the controllers are v1, so hooks there cover
/// every process.
pub fn default_cgroup() -> Result<PathBuf, DatapathError> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| DatapathError::Io {
            what: "reading /proc/self/mountinfo".into(),
            source,
        })?;
    cgroup2_root(&mountinfo).ok_or_else(|| DatapathError::Cgroup {
        path: "(default)".into(),
        why: "this host has no cgroup v2 hierarchy mounted (cgroup v1 only): socket mode needs cgroup v2 (boot with systemd.unified_cgroup_hierarchy=1, or mount -t cgroup2 none /sys/fs/cgroup/unified and pass --cgroup)".into(),
    })
}

/// The mount point of the first cgroup2 mount of its hierarchy's root in a mountinfo text.
fn cgroup2_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER`
        let (fields, after) = line.split_once(" - ")?;
        let fields: Vec<&str> = fields.split(' ').collect();
        let fstype = after.split(' ').next()?;
        let point = fields.get(4)?;
        (fstype == "cgroup2" && fields.get(3) == Some(&"/"))
            .then(|| PathBuf::from(point.replace("\\040", " ")))
    })
}

/// Writes this process's network namespace (its cookie) into `SOCK_NETNS`: the hooks redirect
/// only sockets of the namespace whose sockets the controller lists and fences.
pub fn own_netns(pins: &PinDir) -> Result<(), DatapathError> {
    /// `SO_NETNS_COOKIE` (Linux 5.14+), which libc does not name.
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| DatapathError::Io { what, source }
    };
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").map_err(io("opening a probe socket"))?;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).expect("8 bytes");
    // SAFETY: a valid socket, and an out-buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&probe),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io(
            "reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+)",
        )(std::io::Error::last_os_error()));
    }
    let path = pins.map(redirect_common::map_names::SOCK_NETNS);
    let data = aya::maps::MapData::from_pin(&path).map_err(|source| DatapathError::OpenMap {
        path: path.clone(),
        source,
    })?;
    let mut map: aya::maps::Array<_, u64> = aya::maps::Array::try_from(aya::maps::Map::Array(data))
        .map_err(|source| DatapathError::OpenMap { path, source })?;
    map.set(0, cookie, 0).map_err(|source| DatapathError::Map {
        what: "writing SOCK_NETNS".into(),
        source,
    })
}

/// The name of a cgroup hook's pin.
fn cgroup_pin(pins: &PinDir, hook: &str) -> PathBuf {
    pins.0.join(format!("sockhook_{hook}"))
}

/// The name of an uplink hook's pin.
fn uplink_pin(pins: &PinDir, part: &str, iface: &str) -> PathBuf {
    pins.0.join(format!("sockhook_{part}_{iface}"))
}

/// Every socket-mode link pinned under `pins` (file names).
#[must_use]
pub fn pinned_links(pins: &PinDir) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(&pins.0)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            name.starts_with("sockhook_").then_some(name)
        })
        .collect();
    out.sort();
    out
}

/// Loads every socket-mode program (the verifier's verdict comes before any attachment).
pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let verifier = |name: &str| {
        let what = format!("loading the socket-mode program {name} (verifier)");
        move |source| DatapathError::Program { what, source }
    };
    for name in ADDR_HOOKS {
        addr_hook(ebpf, name).load().map_err(verifier(name))?;
    }
    release_hook(ebpf).load().map_err(verifier(RELEASE_HOOK))?;
    for name in [UPLINK_HOOKS[0].0, UPLINK_HOOKS[1].0, TC_REINJECT_PROGRAM] {
        classifier(ebpf, name).load().map_err(verifier(name))?;
    }
    Ok(())
}

/// Attaches (or re-attaches) the cgroup hooks, each under its pin; re-attaches the uplink's
/// if they are armed (a restart mid-cutover, or with translated flows). Returns what was
/// attached.
pub fn attach_all(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    at: &Attachment,
) -> Result<Vec<String>, DatapathError> {
    let mut attached = attach_cgroup(ebpf, pins, &at.cgroup)?;
    if uplinks_armed(pins) {
        attached.extend(arm_uplinks(ebpf, pins, &at.uplinks)?);
    }
    Ok(attached)
}

/// Attaches the cgroup hooks to `cgroup`, each under its pin.
fn attach_cgroup(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    cgroup_path: &Path,
) -> Result<Vec<String>, DatapathError> {
    let cgroup = File::open(cgroup_path).map_err(|source| DatapathError::Io {
        what: format!("opening the cgroup {}", cgroup_path.display()),
        source,
    })?;
    let hooks_missing = |hook: &str| {
        let what = format!(
            "attaching {hook} to the cgroup {} (the kernel needs cgroup sock_addr hooks: Linux 5.8+ with CONFIG_CGROUP_BPF)",
            cgroup_path.display()
        );
        move |source| DatapathError::Program { what, source }
    };
    // A bpf_link takes no attach flags (the kernel refuses them: EINVAL), and cgroup links
    // always stack with the cgroup's other programs: `Single` is aya's "no flags".
    let mode = CgroupAttachMode::Single;
    let mut attached = Vec::new();
    for hook in ADDR_HOOKS {
        let prog = addr_hook(ebpf, hook);
        let id = prog
            .attach(cgroup.as_fd(), mode)
            .map_err(hooks_missing(hook))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(hooks_missing(hook))?
            .try_into()
            .map_err(|e| link_error(hook, e))?;
        replace_pin(link, &cgroup_pin(pins, hook))?;
        attached.push(hook.to_owned());
    }
    let prog = release_hook(ebpf);
    let id = prog
        .attach(cgroup.as_fd(), mode)
        .map_err(hooks_missing(RELEASE_HOOK))?;
    let link: FdLink = prog
        .take_link(id)
        .map_err(hooks_missing(RELEASE_HOOK))?
        .try_into()
        .map_err(|e| link_error(RELEASE_HOOK, e))?;
    replace_pin(link, &cgroup_pin(pins, RELEASE_HOOK))?;
    attached.push(RELEASE_HOOK.to_owned());
    Ok(attached)
}

/// Whether the uplink's hooks are pinned (armed).
#[must_use]
pub fn uplinks_armed(pins: &PinDir) -> bool {
    pinned_links(pins).iter().any(|n| is_uplink_pin(n))
}

fn is_uplink_pin(name: &str) -> bool {
    UPLINK_HOOKS
        .iter()
        .any(|(_, _, part)| name.starts_with(&format!("sockhook_{part}_")))
}

/// Attaches the uplink's hooks (egress and ingress on each of `uplinks`), each under its pin,
/// replacing any pinned before. Returns what was attached.
pub fn arm_uplinks(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    uplinks: &[(String, u32)],
) -> Result<Vec<String>, DatapathError> {
    let mut attached = Vec::new();
    for (iface, _) in uplinks {
        for (program, direction, part) in UPLINK_HOOKS {
            let prog = classifier(ebpf, program);
            let tc_missing = |source| DatapathError::Program {
                what: format!("attaching {program} (a TCX {part} link, kernel 6.6+) to {iface}"),
                source,
            };
            let id = prog
                .attach_with_options(
                    iface,
                    direction,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(tc_missing)?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(tc_missing)?
                .try_into()
                .map_err(|e| link_error(program, e))?;
            replace_pin(link, &uplink_pin(pins, part, iface))?;
            attached.push(format!("{part}@{iface}"));
        }
    }
    Ok(attached)
}

/// Detaches the uplink's hooks; returns their pin names.
pub fn disarm_uplinks(pins: &PinDir) -> Result<Vec<String>, DatapathError> {
    let names: Vec<String> = pinned_links(pins)
        .into_iter()
        .filter(|n| is_uplink_pin(n))
        .collect();
    for name in &names {
        unpin(&pins.0.join(name))?;
    }
    Ok(names)
}

fn link_error(hook: &str, e: aya::programs::links::LinkError) -> DatapathError {
    DatapathError::Pin {
        what: format!("{hook}: the link is not a bpf_link (kernel too old?)"),
        source: Box::new(e),
    }
}

/// Pins `link` at `path`, letting go of a link pinned there before (whose program the new one
/// replaces: both ran, harmlessly, for a moment).
fn replace_pin(link: FdLink, path: &Path) -> Result<(), DatapathError> {
    // bpffs refuses names with a dot.
    let mut fresh = path.as_os_str().to_owned();
    fresh.push("_new");
    let fresh = PathBuf::from(fresh);
    let _ = std::fs::remove_file(&fresh);
    link.pin(&fresh).map_err(|e| DatapathError::Pin {
        what: format!("pinning {}", fresh.display()),
        source: Box::new(e),
    })?;
    if path.exists() {
        unpin(path)?;
    }
    std::fs::rename(&fresh, path).map_err(|source| DatapathError::Io {
        what: format!("renaming {} to {}", fresh.display(), path.display()),
        source,
    })
}

/// Unpins (and so detaches) the link pinned at `path`.
fn unpin(path: &Path) -> Result<(), DatapathError> {
    let link = PinnedLink::from_pin(path).map_err(|e| DatapathError::Pin {
        what: format!("opening {}", path.display()),
        source: Box::new(e),
    })?;
    drop(link.unpin().map_err(|source| DatapathError::Io {
        what: format!("unpinning {}", path.display()),
        source,
    })?);
    Ok(())
}

/// Detaches every socket-mode hook pinned under `pins`; returns their pin names.
pub fn detach_all(pins: &PinDir) -> Result<Vec<String>, DatapathError> {
    let names = pinned_links(pins);
    for name in &names {
        unpin(&pins.0.join(name))?;
    }
    Ok(names)
}

fn addr_hook<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut CgroupSockAddr {
    ebpf.program_mut(name)
        .expect("the object has its socket-mode hooks")
        .try_into()
        .expect("a connect/getpeername hook is a cgroup sock_addr program")
}

fn release_hook(ebpf: &mut Ebpf) -> &mut CgroupSock {
    ebpf.program_mut(RELEASE_HOOK)
        .expect("the object has its socket-mode hooks")
        .try_into()
        .expect("sock_release is a cgroup sock program")
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut SchedClassifier {
    ebpf.program_mut(name)
        .expect("the object has its TC programs")
        .try_into()
        .expect("a TC program is a classifier")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_root_is_found_on_unified_and_hybrid_hosts() {
        let unified = "25 30 0:23 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_root(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let hybrid = "24 30 0:22 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755\n\
            25 24 0:23 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw\n\
            26 24 0:24 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_root(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let v1_only = "26 24 0:24 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_root(v1_only), None);
        // A container's view of a sub-tree is not the host's root.
        let nested = "25 30 0:23 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_root(nested), None);
    }
}
