//! Facts about the host the controller needs before it touches the datapath: privileges,
//! interfaces, local addresses, routes, bpffs and the forwarding sysctls.

pub mod host_settings;
pub mod sock_diag;

use std::{
    ffi::CString,
    fs,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
};

/// Why the host cannot run the datapath as asked.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Loading BPF programs and pinning them needs root (`CAP_BPF` + `CAP_NET_ADMIN`).
    #[error("redirect must run as root (it loads BPF programs and pins them)")]
    NotRoot,
    /// The kernel lacks what the datapath needs.
    #[error(
        "kernel {release} is too old: redirect needs {}.{} or newer (bpf_xdp_load_bytes to park SYNs, BPF_PROG_TEST_RUN live frames to re-inject them)",
        MIN_KERNEL.0,
        MIN_KERNEL.1
    )]
    KernelTooOld { release: String },
    /// The kernel release string has no `major.minor` version.
    #[error("cannot tell the kernel version from {release:?} (/proc/sys/kernel/osrelease)")]
    KernelVersion { release: String },
    /// The interface name does not exist in this network namespace.
    #[error("unknown interface {0:?} (see `ip link`)")]
    UnknownInterface(String),
    /// The VIP or SNAT address is not configured on any interface of this host.
    #[error(
        "{what} {addr} is not a local address of this host (add it with `ip addr add {addr}/32 dev <iface>`)"
    )]
    NotLocal { what: &'static str, addr: Ipv4Addr },
    /// The kernel has no route to a backend, so there is no source address to SNAT to.
    #[error("no route to backend {addr}: {source}")]
    NoRoute {
        addr: Ipv4Addr,
        source: std::io::Error,
    },
    /// The pin directory is not on a BPF filesystem.
    #[error("{} is not on a bpffs mount (mount one with `mount -t bpf bpf {}`)", path.display(), path.parent().unwrap_or(path).display())]
    NotBpffs { path: PathBuf },
    /// The record of the host settings `run` changed cannot be used.
    #[error("host settings record {}: {reason}", path.display())]
    HostSettings { path: PathBuf, reason: String },
    /// Reading host state failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// Fails unless the effective user is root.
pub fn require_root() -> Result<(), NetError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err(NetError::NotRoot)
    }
}

/// The oldest kernel the datapath runs on: `bpf_xdp_load_bytes` (parking held SYNs) and
/// `BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES` (re-injecting them) came in 5.18.
pub const MIN_KERNEL: (u32, u32) = (5, 18);

/// `major.minor` of a kernel release string such as `6.8.0-45-generic` or `5.18`.
#[must_use]
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().splitn(3, '.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?;
    let digits = minor
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(minor.len());
    Some((major, minor[..digits].parse().ok()?))
}

/// Fails unless the running kernel is [`MIN_KERNEL`] or newer.
pub fn require_kernel() -> Result<(), NetError> {
    let release =
        fs::read_to_string("/proc/sys/kernel/osrelease").map_err(|source| NetError::Io {
            what: "reading /proc/sys/kernel/osrelease".into(),
            source,
        })?;
    let release = release.trim().to_owned();
    match kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        Some(_) => Err(NetError::KernelTooOld { release }),
        None => Err(NetError::KernelVersion { release }),
    }
}

/// The kernel index of an interface.
pub fn ifindex(name: &str) -> Result<u32, NetError> {
    let c = CString::new(name).map_err(|_| NetError::UnknownInterface(name.to_owned()))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(NetError::UnknownInterface(name.to_owned())),
        i => Ok(i),
    }
}

/// The name of an interface index, if it exists.
#[must_use]
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Every IPv4 address configured on this host (this network namespace).
pub fn local_ipv4_addrs() -> Result<Vec<Ipv4Addr>, NetError> {
    Ok(ipv4_addrs_by_iface()?.into_iter().map(|(_, a)| a).collect())
}

/// Every IPv4 address of this host, with the interface it is on.
pub fn ipv4_addrs_by_iface() -> Result<Vec<(String, Ipv4Addr)>, NetError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(NetError::Io {
            what: "getifaddrs".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr; sa_family says which kind.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if i32::from(family) == libc::AF_INET {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                #[expect(
                    clippy::cast_ptr_alignment,
                    reason = "getifaddrs returns properly aligned sockaddr_in for AF_INET"
                )]
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                // SAFETY: ifa_name is a NUL-terminated interface name.
                let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                    .to_string_lossy()
                    .into_owned();
                out.push((name, Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The interface traffic to `dst` leaves by, as far as the address the kernel picks for it
/// says: the interface holding that source address.
pub fn route_iface(dst: Ipv4Addr) -> Result<Option<String>, NetError> {
    let source = route_source(dst)?;
    Ok(ipv4_addrs_by_iface()?
        .into_iter()
        .find(|(_, a)| *a == source)
        .map(|(name, _)| name))
}

/// Whether `iface` carries Ethernet frames (ARPHRD_ETHER), what the TC hooks parse. Unknown
/// (no sysfs for this namespace) counts as Ethernet.
#[must_use]
pub fn is_ethernet(iface: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/type"))
        .map_or(true, |t| t.trim() == "1")
}

/// Fails unless `addr` is configured on this host.
pub fn require_local(what: &'static str, addr: Ipv4Addr) -> Result<(), NetError> {
    if local_ipv4_addrs()?.contains(&addr) {
        Ok(())
    } else {
        Err(NetError::NotLocal { what, addr })
    }
}

/// The source address the kernel picks for traffic to `dst`: the proxy's own address on the
/// route to that backend (a connected UDP socket sends nothing, it only resolves the route).
pub fn route_source(dst: Ipv4Addr) -> Result<Ipv4Addr, NetError> {
    let resolve = || -> std::io::Result<Ipv4Addr> {
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        sock.connect(SocketAddrV4::new(dst, 9))?;
        match sock.local_addr()? {
            std::net::SocketAddr::V4(a) => Ok(*a.ip()),
            std::net::SocketAddr::V6(_) => Err(std::io::Error::other("IPv6 source")),
        }
    };
    resolve().map_err(|source| NetError::NoRoute { addr: dst, source })
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` (which must exist) is on a bpffs mount.
#[must_use]
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid output buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is writable.
    let rc = unsafe { libc::statfs(c.as_ptr(), &raw mut st) };
    let magic = st.f_type;
    rc == 0 && magic == BPF_FS_MAGIC
}

/// Fails unless `dir`, or its nearest existing ancestor, is on bpffs.
pub fn require_bpffs(dir: &Path) -> Result<(), NetError> {
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    if is_bpffs(probe) {
        Ok(())
    } else {
        Err(NetError::NotBpffs {
            path: dir.to_path_buf(),
        })
    }
}

/// The /proc/sys file of a dotted sysctl name. An interface name may itself contain dots
/// (`eth0.100`, a VLAN), so under `net.ipv4.conf.` only the last dot separates the key.
#[must_use]
pub fn sysctl_path(name: &str) -> PathBuf {
    let root = Path::new("/proc/sys");
    if let Some(rest) = name.strip_prefix("net.ipv4.conf.")
        && let Some((iface, key)) = rest.rsplit_once('.')
    {
        return root.join("net/ipv4/conf").join(iface).join(key);
    }
    root.join(name.replace('.', "/"))
}

/// Sets a sysctl under /proc/sys (dotted name) if it differs, recording its value before the
/// first change in `record` (for `detach`); returns whether it changed.
pub fn ensure_sysctl(
    name: &str,
    value: &str,
    record: &host_settings::HostSettings,
) -> Result<bool, NetError> {
    let path = sysctl_path(name);
    let io = |source| NetError::Io {
        what: format!("sysctl {name}"),
        source,
    };
    let current = fs::read_to_string(&path).map_err(io)?;
    if current.trim() == value {
        return Ok(false);
    }
    record.remember(name, &current)?;
    fs::write(&path, value).map_err(io)?;
    Ok(true)
}

/// What the `XDP_PASS` fallback needs: forwarding on (also what `bpf_fib_lookup` honours),
/// rewritten packets whose source is a local address accepted (`accept_local`), and no strict
/// reverse-path filter (the effective value is the maximum of `all` and the interface's).
/// The value each had before is kept in `record`, for `detach` to restore.
pub fn ensure_forwarding(
    ifaces: &[String],
    record: &host_settings::HostSettings,
) -> Result<Vec<String>, NetError> {
    let mut wanted = vec![
        ("net.ipv4.ip_forward".to_owned(), "1"),
        ("net.ipv4.conf.all.accept_local".to_owned(), "1"),
        ("net.ipv4.conf.all.rp_filter".to_owned(), "0"),
    ];
    for i in ifaces {
        wanted.push((format!("net.ipv4.conf.{i}.forwarding"), "1"));
        wanted.push((format!("net.ipv4.conf.{i}.accept_local"), "1"));
        wanted.push((format!("net.ipv4.conf.{i}.rp_filter"), "0"));
    }
    let mut changed = Vec::new();
    for (name, value) in wanted {
        if ensure_sysctl(&name, value, record)? {
            changed.push(format!("{name}={value}"));
        }
    }
    Ok(changed)
}

/// Keeps the host's own ephemeral ports (the controller's database sessions, health checks)
/// out of the SNAT range, so they can never collide with a translated connection's tuple
/// (cilium#30858). Only sets `ip_local_reserved_ports` when it is empty or already ours; the
/// empty value is kept in `record`, for `detach` to restore.
pub fn reserve_ports(
    lo: u16,
    hi: u16,
    record: &host_settings::HostSettings,
) -> Result<Option<String>, NetError> {
    let name = "net.ipv4.ip_local_reserved_ports";
    let path = Path::new("/proc/sys/net/ipv4/ip_local_reserved_ports");
    let io = |source| NetError::Io {
        what: format!("sysctl {name}"),
        source,
    };
    let current = fs::read_to_string(path).map_err(io)?;
    let want = if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    };
    if current.trim() == want {
        return Ok(None);
    }
    if !current.trim().is_empty() {
        return Err(NetError::Io {
            what: format!(
                "{name} is already {:?}; add {want} to it yourself",
                current.trim()
            ),
            source: std::io::Error::other("not changed"),
        });
    }
    record.remember(name, &current)?;
    fs::write(path, &want).map_err(io)?;
    Ok(Some(format!("{name}={want}")))
}

/// Where this namespace's reserved local ports are: the kernel never picks them for a
/// `connect()` (an explicit `bind()` may still take one).
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Makes `add` reserved and `remove` no longer reserved, leaving every other reservation
/// (the operator's) as it was. Returns whether the list changed.
pub fn change_reserved_ports(add: &[u16], remove: &[u16]) -> Result<bool, NetError> {
    let io = |source| NetError::Io {
        what: "sysctl net.ipv4.ip_local_reserved_ports".into(),
        source,
    };
    let current = fs::read_to_string(RESERVED_PORTS).map_err(io)?;
    let mut ports = parse_port_list(&current);
    let before = ports.clone();
    ports.extend(add.iter().copied());
    for p in remove {
        ports.remove(p);
    }
    if ports == before {
        return Ok(false);
    }
    fs::write(RESERVED_PORTS, format_port_list(&ports)).map_err(io)?;
    Ok(true)
}

/// `8080,9148-9150` as a set of ports.
fn parse_port_list(s: &str) -> std::collections::BTreeSet<u16> {
    let mut out = std::collections::BTreeSet::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(lo), Ok(hi)) = (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
            out.extend(lo..=hi);
        }
    }
    out
}

/// A set of ports as the kernel's list, runs joined into ranges.
fn format_port_list(ports: &std::collections::BTreeSet<u16>) -> String {
    let mut runs: Vec<(u16, u16)> = Vec::new();
    for &p in ports {
        match runs.last_mut() {
            Some((_, hi)) if u32::from(*hi) + 1 == u32::from(p) => *hi = p,
            _ => runs.push((p, p)),
        }
    }
    runs.iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Sends a TCP RST from `from` to `to` with sequence number `seq` through a raw socket: the
/// kernel routes it like any packet of this host. With `seq` equal to what the peer expects
/// next, the peer's stack drops the connection at once (RFC 5961 §3.2).
pub fn send_rst(from: SocketAddrV4, to: SocketAddrV4, seq: u32) -> std::io::Result<()> {
    let mut pkt = [0u8; 40];
    pkt[0] = 0x45;
    pkt[2..4].copy_from_slice(&40u16.to_be_bytes());
    pkt[6] = 0x40; // don't fragment
    pkt[8] = 64;
    pkt[9] = 6;
    pkt[12..16].copy_from_slice(&from.ip().octets());
    pkt[16..20].copy_from_slice(&to.ip().octets());
    let ip_check = redirect_common::csum::ipv4_header(&pkt[..20]);
    pkt[10..12].copy_from_slice(&ip_check.to_ne_bytes());
    pkt[20..22].copy_from_slice(&from.port().to_be_bytes());
    pkt[22..24].copy_from_slice(&to.port().to_be_bytes());
    pkt[24..28].copy_from_slice(&seq.to_be_bytes());
    pkt[32] = 5 << 4;
    pkt[33] = redirect_common::tcp::RST;
    let tcp_check =
        redirect_common::csum::tcp_ipv4(from.ip().octets(), to.ip().octets(), &pkt[20..]);
    pkt[36..38].copy_from_slice(&tcp_check.to_ne_bytes());
    // SAFETY: plain socket syscalls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::sa_family_t::try_from(libc::AF_INET)
                .expect("AF_INET fits sa_family_t"),
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(*to.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const addr).cast(),
            u32::try_from(std::mem::size_of::<libc::sockaddr_in>()).expect("small"),
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_paths() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward"),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net.ipv4.conf.all.rp_filter"),
            Path::new("/proc/sys/net/ipv4/conf/all/rp_filter")
        );
        assert_eq!(
            sysctl_path("net.ipv4.conf.eth0.100.accept_local"),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/accept_local")
        );
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0-1034-aws"), Some((5, 15)));
        assert_eq!(kernel_version("5.18"), Some((5, 18)));
        assert_eq!(kernel_version("6.1-rc3"), Some((6, 1)));
        assert_eq!(kernel_version("6"), None);
        assert_eq!(kernel_version("linux"), None);
        assert_eq!(kernel_version("6.x"), None);
        assert!(kernel_version("5.15.0").unwrap() < MIN_KERNEL);
        assert!(kernel_version("5.18.0").unwrap() >= MIN_KERNEL);
        assert!(kernel_version("6.0.0").unwrap() >= MIN_KERNEL);
        let e = NetError::KernelTooOld {
            release: "5.15.0".into(),
        }
        .to_string();
        assert!(
            e.starts_with("kernel 5.15.0 is too old: redirect needs 5.18 or newer")
                && !e.contains('\n'),
            "{e}"
        );
    }

    #[test]
    fn reserved_port_lists_round_trip_and_keep_the_operators_ports() {
        let ports = parse_port_list("8080,9148-9150\n");
        assert_eq!(ports.len(), 4);
        let mut more = ports.clone();
        more.extend([9151, 40000]);
        assert_eq!(format_port_list(&more), "8080,9148-9151,40000");
        assert_eq!(format_port_list(&parse_port_list("")), "");
    }
}
