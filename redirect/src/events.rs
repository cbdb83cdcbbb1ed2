//! The datapath's rare events (`EVENTS` ring buffer) turned into `tracing` lines with the flow's
//! addresses, so an operator reading journald sees what the counters only count.

use std::net::SocketAddrV4;

use aya::maps::{MapData, RingBuf};
use redirect_common::events::{DatapathEvent, EventKind};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::datapath::ip_from_be;

/// Logs every event the datapath sends until `shutdown`.
pub async fn log(ring: RingBuf<MapData>, shutdown: CancellationToken) {
    // SAFETY: the AsyncFd owns the ring buffer, and with it the fd, for as long as the fd is
    // registered: nothing else can close it meanwhile.
    let mut fd = match unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1) {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot watch the datapath's event ring; events are only counted");
            return;
        }
    };
    loop {
        let mut guard = tokio::select! {
            () = shutdown.cancelled() => return,
            g = fd.readable_mut() => match g {
                Ok(g) => g,
                Err(e) => {
                    warn!(error = %e, "watching the datapath's event ring");
                    return;
                }
            },
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<DatapathEvent>() {
                // SAFETY: the datapath writes whole `DatapathEvent`s; read unaligned.
                let event: DatapathEvent =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                report(&event);
            }
        }
        guard.clear_ready();
    }
}

fn report(e: &DatapathEvent) {
    let client = SocketAddrV4::new(ip_from_be(e.client_addr_be), u16::from_be(e.client_port_be));
    let backend = SocketAddrV4::new(
        ip_from_be(e.backend_addr_be),
        u16::from_be(e.backend_port_be),
    );
    match EventKind::from_u32(e.kind) {
        Some(EventKind::SnatExhausted) => warn!(
            %client, %backend,
            "datapath: SYN dropped, no free SNAT port toward the backend (the client retries); widen --snat-ports"
        ),
        Some(EventKind::CtFull) => error!(
            %client, %backend,
            "datapath: SYN dropped, the connection table is full (the client retries)"
        ),
        Some(EventKind::Unconfirmed) => warn!(
            %client, fenced = %backend,
            "datapath: SYN dropped: this fleet member cannot confirm the fleet's cutover (etcd unreachable, or its controller down), so it neither holds on nor guesses a backend (the client retries)"
        ),
        Some(EventKind::LeaseExpired) => warn!(
            %client, fenced = %backend,
            "datapath: the cutover lease expired in the kernel; hold and fence are lifted and new connections go to the fenced backend again (is the controller stuck?)"
        ),
        Some(EventKind::HoldRingFull) => warn!(
            %client,
            "datapath: SYN dropped during a hold, the parked-SYN ring is full (the client retries)"
        ),
        Some(EventKind::BadActive) => error!(
            %client, active = e.detail,
            "datapath: SYN dropped, ACTIVE names a backend that is not configured; run `redirect flip --immediate --to source|target`"
        ),
        None => warn!(kind = e.kind, "datapath: unknown event (a newer datapath?)"),
    }
}
