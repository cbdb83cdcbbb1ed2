//! Between the hold and the fence: connections that began moments ago and are still
//! exchanging packets (a connection-per-request client in its startup or its one
//! transaction) get a short, bounded moment to finish on the old server. Their writes commit
//! before the fence, so the barrier covers them. Long-lived (pooled) connections do not wait.

use std::time::{Duration, Instant};

use super::Host;
use crate::{
    conntrack,
    datapath::{DatapathError, Role},
    sync::lock,
};

/// The longest the fence waits for short-lived connections to finish.
const SETTLE_MAX: Duration = Duration::from_millis(250);
/// A connection this young that saw a packet this recently is mid-startup or mid-work.
const YOUNG: Duration = Duration::from_secs(2);
const ACTIVE: Duration = Duration::from_millis(25);

/// Waits (at most [`SETTLE_MAX`]) until no young, busy connection to `from` is left; returns
/// how many still are. A cutover on one host and a fleet member holding for the fleet both
/// settle this host's connections before the fence.
pub async fn settle(host: &Host, from: Role) -> Result<usize, DatapathError> {
    let t = Instant::now();
    let mut busy = 0;
    // Every 5 ms: new connections are held meanwhile, and a short-lived connection's
    // exchange takes a few milliseconds.
    crate::poll::until(t + SETTLE_MAX, Duration::from_millis(5), || {
        std::future::ready(busy_to(host, from).map(|n| {
            busy = n;
            (n == 0).then_some(())
        }))
    })
    .await?;
    Ok(busy)
}

/// The young, busy connections to `from` now. Socket mode has no connection table:
/// there, the hooked sockets to it still in their handshake.
fn busy_to(host: &Host, from: Role) -> Result<usize, DatapathError> {
    let from_addr = lock(&host.maps).backend(from)?.map(|b| b.addr);
    if host.is_socket_mode()? {
        return Ok(host
            .hooked_to(from)?
            .iter()
            .filter(|h| h.state == Some(super::sockets::SYN_SENT))
            .count());
    }
    let conns = conntrack::list(&lock(&host.maps))?;
    Ok(conns
        .iter()
        .filter(|c| {
            Some(c.backend_addr) == from_addr
                && c.state.is_live()
                && c.age < YOUNG
                && c.idle < ACTIVE
        })
        .count())
}
