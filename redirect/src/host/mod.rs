//! This host's kernel levers, below both the cutover and the fleet.
//!
//! A cutover on one host and a fleet member applying a committed hold do the same things to
//! their own datapath: take a hold under a renewed lease, let young connections settle,
//! raise the fence, release the parked SYNs, drain the old backend's connections. Those
//! live here, once, over a [`Host`]: the loaded program and its pinned maps. What decides
//! *when* (the cutover's steps, the fleet's committed epochs) lives above and calls down.

pub mod drain;
pub mod lease;
pub mod settle;
pub mod sockets;

use std::{sync::Mutex, time::Duration};

use aya::Ebpf;

use crate::{
    datapath::{self, DatapathError, Maps},
    sync::lock,
};

/// The loaded datapath of this host: its pinned maps and the program (whose
/// `bpf_prog_test_run` re-injects held SYNs).
pub struct Host {
    pub maps: Mutex<Maps>,
    pub ebpf: Mutex<Ebpf>,
    /// The interfaces the datapath is attached to (socket mode: the uplinks its TC hooks
    /// are armed on for a cutover).
    pub ifaces: Vec<(String, u32)>,
    /// Socket mode: the local ports this controller reserved for held connections.
    pub reserved_ports: Mutex<std::collections::BTreeSet<u16>>,
}

impl Host {
    #[must_use]
    pub fn new(maps: Maps, ebpf: Ebpf, ifaces: Vec<(String, u32)>) -> Self {
        Self {
            maps: Mutex::new(maps),
            ebpf: Mutex::new(ebpf),
            ifaces,
            reserved_ports: Mutex::new(std::collections::BTreeSet::new()),
        }
    }

    /// Re-injects every parked SYN through the datapath; returns how many.
    pub fn release_held(&self) -> Result<u64, DatapathError> {
        let (mut ring, pins, on_egress) = {
            let maps = lock(&self.maps);
            (maps.held()?, maps.dir.clone(), maps.is_socket_mode()?)
        };
        if on_egress {
            // Before any held connection can be sent elsewhere (an aborted cutover): its port
            // must not be given to a new connection to that backend.
            self.reserve_held_ports()?;
        }
        let mut ebpf = lock(&self.ebpf);
        let mut n = 0;
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<redirect_common::cutover::HeldSyn>() {
                continue;
            }
            // SAFETY: the datapath wrote a HeldSyn into this record; read it unaligned.
            let held: redirect_common::cutover::HeldSyn =
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            // One SYN that cannot be re-injected must not strand the rest in the ring (its
            // client retransmits); the count says how many went.
            match datapath::reinject(&mut ebpf, &pins, &held, on_egress) {
                Ok(()) => n += 1,
                Err(e) => tracing::warn!(error = %e, "a held SYN was not re-injected"),
            }
        }
        Ok(n)
    }

    /// Two passes: a CPU that read the hold just before it was lifted may park its SYN a
    /// moment after the first; the second picks it up instead of leaving it to a 1 s client
    /// retransmit.
    pub fn release_twice(&self) -> Result<u64, DatapathError> {
        let mut n = self.release_held()?;
        std::thread::sleep(Duration::from_millis(2));
        n += self.release_held()?;
        Ok(n)
    }
}
