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
    let from_addr = lock(&host.maps).backend(from)?.map(|b| b.addr);
    let mut busy = 0;
    while t.elapsed() < SETTLE_MAX {
        let conns = conntrack::list(&lock(&host.maps))?;
        busy = conns
            .iter()
            .filter(|c| {
                Some(c.backend_addr) == from_addr
                    && c.state.is_live()
                    && c.age < YOUNG
                    && c.idle < ACTIVE
            })
            .count();
        if busy == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(busy)
}
