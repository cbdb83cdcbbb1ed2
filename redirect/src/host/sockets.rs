//! Socket mode's view of this host's connections: which of this host's sessions on a server
//! came through the hook. There is no connection table to read: the kernel's own socket
//! list (`sock_diag`) says which sockets talk to the server, and `SOCKETS` (by cookie) which of
//! those the hook connected. Connections opened during a hold talk to the VIP and are
//! translated (`FLOWS`): those are the flows whose backend is the server.
//!
//! The server sees each of them at this host's address and the socket's own port, so the
//! fence and the drain end exactly those sessions, and no process that bypasses the hook.

use std::{collections::HashSet, net::SocketAddrV4};

use redirect_common::socket::{FLOW_GATE_NS, PARKED};

use super::Host;
use crate::{
    datapath::{DatapathError, Maps, Role, ip_from_be, socket},
    net::sock_diag::{self, TcpSocket},
    sync::lock,
};

/// `TCP_SYN_SENT` (`net/tcp_states.h`): `connect()` sent its SYN, no answer yet.
pub const SYN_SENT: u8 = 2;
/// `TCP_ESTABLISHED`.
pub const ESTABLISHED: u8 = 1;
/// `TCP_CLOSE_WAIT`: the server closed (its session ended), the client has not yet.
pub const CLOSE_WAIT: u8 = 8;
/// `TCP_TIME_WAIT` and `TCP_CLOSE`: closed both ways.
const TIME_WAIT: u8 = 6;
const CLOSE: u8 = 7;

/// One hooked connection to a server, as the server sees its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hooked {
    /// This host's address and port: `client_addr`, `client_port` in `pg_stat_activity`.
    pub client: SocketAddrV4,
    /// The kernel's TCP state (`None` for a held flow, whose socket talks to the VIP).
    pub state: Option<u8>,
}

impl Host {
    /// Whether this host's datapath runs in socket mode.
    pub fn is_socket_mode(&self) -> Result<bool, DatapathError> {
        lock(&self.maps).is_socket_mode()
    }

    /// Socket mode: keeps this host's held connections' local ports reserved
    /// (`ip_local_reserved_ports`), and only those this controller reserved. The kernel knows
    /// a held socket as talking to the backend it presumed; if the cutover does not flip, the
    /// connection is sent to the other backend from the same port, and without the
    /// reservation the kernel could give that port to a new connection to that backend: two
    /// connections on one tuple, on the wire. Returns how many ports are reserved now.
    pub fn reserve_held_ports(&self) -> Result<usize, DatapathError> {
        let wanted: std::collections::BTreeSet<u16> = {
            let maps = lock(&self.maps);
            let Some(s) = &maps.socket else {
                return Ok(0);
            };
            s.flows
                .keys()
                .filter_map(Result::ok)
                .map(|k| u16::from_be(k.client_port_be))
                .collect()
        };
        let mut ours = lock(&self.reserved_ports);
        let add: Vec<u16> = wanted.difference(&ours).copied().collect();
        let remove: Vec<u16> = ours.difference(&wanted).copied().collect();
        if !add.is_empty() || !remove.is_empty() {
            crate::net::change_reserved_ports(&add, &remove).map_err(|e| DatapathError::Io {
                what: "reserving held connections' ports".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
            *ours = wanted;
        }
        Ok(ours.len())
    }

    /// Socket mode: arms the uplink's hooks for a cutover (they park held SYNs and raise the
    /// datapath fence); nothing in proxy mode. Returns whether it attached them now.
    pub fn arm_for_cutover(&self) -> Result<bool, DatapathError> {
        if !self.is_socket_mode()? {
            return Ok(false);
        }
        let pins = lock(&self.maps).dir.clone();
        if socket::uplinks_armed(&pins) {
            return Ok(false);
        }
        socket::arm_uplinks(&mut lock(&self.ebpf), &pins, &self.ifaces)?;
        Ok(true)
    }

    /// Socket mode: disarms the uplink's hooks when no cutover runs (`idle`), no hold or fence
    /// is raised, and no flow is parked or translated: from then on no program runs on any
    /// packet. Returns whether it disarmed them now.
    pub fn disarm_when_done(&self, idle: bool) -> Result<bool, DatapathError> {
        let maps = lock(&self.maps);
        if !idle || !maps.is_socket_mode()? || !socket::uplinks_armed(&maps.dir) {
            return Ok(false);
        }
        let now = crate::clock::monotonic_ns();
        let cut = maps.cutover()?;
        let active = maps.active_index()?;
        let raised = cut.holds(active, now)
            || (cut.fenced_backend != redirect_common::cutover::NO_FENCE
                && cut.fenced_backend == active
                && cut.fences(active, active, now));
        let flows = maps
            .socket
            .as_ref()
            .is_some_and(|s| s.flows.keys().next().is_some());
        if raised || flows {
            return Ok(false);
        }
        socket::disarm_uplinks(&maps.dir)?;
        Ok(true)
    }

    /// Every connection of this host's hooked sockets to the backend of `role` (see
    /// [`hooked_to`]).
    pub fn hooked_to(&self, role: Role) -> Result<Vec<Hooked>, DatapathError> {
        hooked_to(&lock(&self.maps), role)
    }
}

/// Every connection of this host's hooked sockets to the backend of `role`: sockets the hook
/// connected there (minus those a translated flow sends elsewhere), and translated flows sent
/// there. `sock_diag` lists the sockets of the caller's network namespace: the host's.
pub fn hooked_to(maps: &Maps, role: Role) -> Result<Vec<Hooked>, DatapathError> {
    let sockets = sockets_to(maps, role)?;
    let translated = translated_flows(maps)?;
    let elsewhere: HashSet<SocketAddrV4> = translated
        .iter()
        .filter(|(_, to)| *to != role.index())
        .map(|(client, _)| *client)
        .collect();
    let mut out: Vec<Hooked> = hooked_sockets(maps, &sockets)?
        .into_iter()
        .filter(|s| !elsewhere.contains(&s.local))
        .map(|s| Hooked {
            client: s.local,
            state: Some(s.state),
        })
        .collect();
    out.extend(
        translated
            .into_iter()
            .filter(|(_, to)| *to == role.index())
            .map(|(client, _)| Hooked {
                client,
                state: None,
            }),
    );
    Ok(out)
}

/// Every connection of this host to the backend of `role` that is not the controller's own:
/// what the fence ends. Hooked or not: a socket connected before the hooks were attached (a
/// pool that outlived a `detach`), or by a process outside `--cgroup`, writes to the old
/// server all the same, and only the server-side fence can stop it. The controller's own
/// sessions (the barrier's, the lag's) are the sockets its own file descriptors hold.
pub fn fence_targets(maps: &Maps, role: Role) -> Result<Vec<Hooked>, DatapathError> {
    let own = own_socket_inodes();
    let sockets = sockets_to(maps, role)?;
    let translated = translated_flows(maps)?;
    let mut out: Vec<Hooked> = sockets
        .iter()
        // Closed both ways (TIME_WAIT, CLOSE): no session can be behind it.
        .filter(|s| !matches!(s.state, TIME_WAIT | CLOSE))
        .filter(|s| s.inode == 0 || !own.contains(&s.inode))
        .filter(|s| {
            !translated
                .iter()
                .any(|(c, to)| *c == s.local && *to != role.index())
        })
        .map(|s| Hooked {
            client: s.local,
            state: Some(s.state),
        })
        .collect();
    out.extend(
        translated
            .into_iter()
            .filter(|(_, to)| *to == role.index())
            .map(|(client, _)| Hooked {
                client,
                state: None,
            }),
    );
    Ok(out)
}

/// This host's TCP sockets to the backend of `role` (none if it is not configured).
fn sockets_to(maps: &Maps, role: Role) -> Result<Vec<TcpSocket>, DatapathError> {
    let Some(backend) = maps.backend(role)? else {
        return Ok(Vec::new());
    };
    sock_diag::tcp_sockets_to(backend.addr).map_err(|source| DatapathError::Io {
        what: format!(
            "listing this host's sockets to {} (sock_diag)",
            backend.addr
        ),
        source,
    })
}

/// How many of this host's connections to the backend of `role` did not come through the hook
/// and are still held open by a process (not the controller): a socket already closed by its
/// process (its hook entry went with `close()`, it lingers in `FIN_WAIT`) is fenced all the
/// same, but no client is behind it to reconnect anywhere.
pub fn unhooked_to(maps: &Maps, role: Role) -> Result<Vec<TcpSocket>, DatapathError> {
    let own = own_socket_inodes();
    let sockets = sockets_to(maps, role)?;
    let hooked: HashSet<u64> = hooked_sockets(maps, &sockets)?
        .iter()
        .map(|s| s.cookie)
        .collect();
    Ok(sockets
        .into_iter()
        .filter(|s| s.inode != 0 && !own.contains(&s.inode) && !hooked.contains(&s.cookie))
        .collect())
}

/// The inodes of the sockets this process holds (`socket:[N]` links in `/proc/self/fd`).
fn own_socket_inodes() -> HashSet<u32> {
    std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The sockets of `sockets` that the hook connected (their cookie is in `SOCKETS`).
fn hooked_sockets(maps: &Maps, sockets: &[TcpSocket]) -> Result<Vec<TcpSocket>, DatapathError> {
    let Some(socket_maps) = &maps.socket else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for s in sockets {
        match socket_maps.sockets.get(&s.cookie, 0) {
            Ok(_) => out.push(*s),
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(DatapathError::Map {
                    what: "reading SOCKETS".into(),
                    source,
                });
            }
        }
    }
    Ok(out)
}

/// How many translated flows live: detaching socket mode breaks those, and only those (a
/// direct connection never meets the datapath again after its `connect()`).
pub fn translated_count(maps: &Maps) -> Result<u64, DatapathError> {
    Ok(translated_flows(maps)?.len() as u64)
}

/// Every translated flow: this host's side (address, port), and the `BACKENDS` index its
/// packets are sent to.
fn translated_flows(maps: &Maps) -> Result<Vec<(SocketAddrV4, u32)>, DatapathError> {
    let Some(socket_maps) = &maps.socket else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in &socket_maps.flows {
        let (key, flow) = item.map_err(|source| DatapathError::Map {
            what: "reading FLOWS".into(),
            source,
        })?;
        if flow.backend_id != PARKED {
            out.push((
                SocketAddrV4::new(
                    ip_from_be(key.client_addr_be),
                    u16::from_be(key.client_port_be),
                ),
                flow.backend_id,
            ));
        }
    }
    Ok(out)
}

/// How old a flow must be before its socket's absence from a listing counts.
const FLOW_MIN_AGE_NS: u64 = 5_000_000_000;

/// What a pass of [`gc_flows`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowGc {
    /// Flows whose socket closed, forgotten.
    pub forgotten: u64,
    /// Translated flows still open (`FLOW_GATE` is kept open for them).
    pub translated: u64,
}

/// Forgets the flows whose socket is gone (the kernel no longer lists a socket from that
/// address and port to the backend it presumed), and keeps `FLOW_GATE` open while a
/// translated flow lives. The release hook cannot forget them: a closed socket's FIN
/// exchange still needs translating.
pub fn gc_flows(maps: &mut Maps) -> Result<FlowGc, DatapathError> {
    let backends: Vec<SocketAddrV4> = [Role::Source, Role::Target]
        .into_iter()
        .filter_map(|r| maps.backend(r).ok().flatten().map(|b| b.addr))
        .collect();
    let Some(socket_maps) = &mut maps.socket else {
        return Ok(FlowGc::default());
    };
    let open: HashSet<(SocketAddrV4, SocketAddrV4)> = sock_diag::tcp_sockets_to_any(&backends)
        .map_err(|source| DatapathError::Io {
            what: "listing this host's sockets to the backends (sock_diag)".into(),
            source,
        })?
        .into_iter()
        .map(|s| (s.local, s.remote))
        .collect();
    // A flow parked after the listing above is not in it: only flows older than this are
    // judged by it.
    let now = crate::clock::monotonic_ns();
    let settled_before = now.saturating_sub(FLOW_MIN_AGE_NS);
    let mut gc = FlowGc::default();
    let mut gone = Vec::new();
    for (k, flow) in socket_maps.flows.iter().filter_map(Result::ok) {
        let local = SocketAddrV4::new(ip_from_be(k.client_addr_be), u16::from_be(k.client_port_be));
        let presumed = SocketAddrV4::new(ip_from_be(k.vip_addr_be), u16::from_be(k.vip_port_be));
        if flow.created_ns < settled_before && !open.contains(&(local, presumed)) {
            gone.push(k);
        } else if flow.backend_id != PARKED {
            gc.translated += 1;
        }
    }
    for k in &gone {
        if socket_maps.flows.remove(k).is_ok() {
            gc.forgotten += 1;
        }
    }
    if gc.translated > 0 {
        socket_maps
            .gate
            .set(0, now + FLOW_GATE_NS, 0)
            .map_err(|source| DatapathError::Map {
                what: "writing FLOW_GATE".into(),
                source,
            })?;
    }
    Ok(gc)
}
