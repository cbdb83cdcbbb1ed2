//! Socket mode's view of this host's connections: which of this host's sessions on a server
//! came through the hook. There is no connection table to read: the kernel's own socket
//! list (`sock_diag`) says which sockets talk to the server, and `SOCKETS` (by cookie) which of
//! those the hook connected. Connections opened during a hold talk to the VIP and are
//! translated (`FLOWS`): those are the flows whose backend is the server.
//!
//! The server sees each of them at this host's address and the socket's own port, so the
//! fence and the drain end exactly those sessions, and no process that bypasses the hook.

use std::{collections::HashSet, net::SocketAddrV4};

use redirect_common::socket::PARKED;

use super::Host;
use crate::{
    datapath::{DatapathError, Maps, Role, ip_from_be},
    net::sock_diag::{self, TcpSocket},
    sync::lock,
};

/// `TCP_SYN_SENT` (`net/tcp_states.h`): `connect()` sent its SYN, no answer yet.
pub const SYN_SENT: u8 = 2;
/// `TCP_ESTABLISHED`.
pub const ESTABLISHED: u8 = 1;
/// `TCP_CLOSE_WAIT`: the server closed (its session ended), the client has not yet.
pub const CLOSE_WAIT: u8 = 8;

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

    /// Every connection of this host's hooked sockets to the backend of `role`: sockets the
    /// hook connected there, and held flows translated there.
    pub fn hooked_to(&self, role: Role) -> Result<Vec<Hooked>, DatapathError> {
        let maps = lock(&self.maps);
        let Some(backend) = maps.backend(role)? else {
            return Ok(Vec::new());
        };
        let sockets = sock_diag::tcp_sockets_to(backend.addr).map_err(|source| {
            DatapathError::Io {
                what: format!("listing this host's sockets to {} (sock_diag)", backend.addr),
                source,
            }
        })?;
        let mut out: Vec<Hooked> = hooked_sockets(&maps, &sockets)?
            .into_iter()
            .map(|s| Hooked {
                client: s.local,
                state: Some(s.state),
            })
            .collect();
        out.extend(held_flows_to(&maps, role)?.into_iter().map(|client| Hooked {
            client,
            state: None,
        }));
        Ok(out)
    }
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

/// This host's side (address, port) of every held flow sent to the backend of `role`.
fn held_flows_to(maps: &Maps, role: Role) -> Result<Vec<SocketAddrV4>, DatapathError> {
    let Some(socket_maps) = &maps.socket else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in socket_maps.flows.iter() {
        let (key, flow) = item.map_err(|source| DatapathError::Map {
            what: "reading FLOWS".into(),
            source,
        })?;
        if flow.backend_id != PARKED && flow.backend_id == role.index() {
            out.push(SocketAddrV4::new(
                ip_from_be(key.client_addr_be),
                u16::from_be(key.client_port_be),
            ));
        }
    }
    Ok(out)
}

/// How old a held flow must be before its socket's absence from a listing counts.
const FLOW_MIN_AGE_NS: u64 = 5_000_000_000;

/// Forgets the held flows whose socket is gone (the kernel no longer lists a socket from that
/// address and port to the VIP); returns how many. The release hook cannot: a closed socket's
/// FIN exchange still needs translating.
pub fn forget_closed_flows(maps: &mut Maps, vip: SocketAddrV4) -> Result<u64, DatapathError> {
    let Some(socket_maps) = &mut maps.socket else {
        return Ok(0);
    };
    let open: HashSet<SocketAddrV4> = sock_diag::tcp_sockets_to(vip)
        .map_err(|source| DatapathError::Io {
            what: format!("listing this host's sockets to {vip} (sock_diag)"),
            source,
        })?
        .into_iter()
        .map(|s| s.local)
        .collect();
    // A flow parked after the listing above is not in it: only flows older than this are
    // judged by it.
    let settled_before = crate::clock::monotonic_ns().saturating_sub(FLOW_MIN_AGE_NS);
    let gone: Vec<redirect_common::ct::CtKey> = socket_maps
        .flows
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, flow)| {
            flow.created_ns < settled_before
                && !open.contains(&SocketAddrV4::new(
                    ip_from_be(k.client_addr_be),
                    u16::from_be(k.client_port_be),
                ))
        })
        .map(|(k, _)| k)
        .collect();
    let mut n = 0;
    for k in &gone {
        if socket_maps.flows.remove(k).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}
