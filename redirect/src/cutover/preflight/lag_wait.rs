//! Waiting, bounded, for replication that is only behind.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::cutover::FlipRequest;
use crate::pg::lag::{self, Watch};

/// The lag, measured until it passes the gate, or fails it for a reason waiting will not
/// mend, or `--lag-wait` has passed. Nothing is held meanwhile: clients keep writing to the
/// old server. A dry run and `--force` measure once.
pub(super) async fn settle_lag(
    from_db: &Client,
    to_db: &Client,
    watch: &Watch,
    req: &FlipRequest,
    qt: Duration,
    say: &impl Fn(String),
) -> Result<lag::ReplicaLag, crate::pg::PgError> {
    const EVERY: Duration = Duration::from_millis(250);
    const SAY_EVERY: Duration = Duration::from_secs(2);
    let wait = if req.dry_run || req.force {
        Duration::ZERO
    } else {
        req.lag_wait
    };
    let started = Instant::now();
    let mut said: Option<Instant> = None;
    let mut measured_once = false;
    loop {
        let l = match lag::measure(from_db, to_db, watch, qt).await {
            Ok(l) => l,
            // Once it has been read, one reading that fails is a blip while waiting: the
            // error is the answer only at the end of the wait.
            Err(_) if measured_once && started.elapsed() < wait => {
                if !pause(req, EVERY).await {
                    return lag::measure(from_db, to_db, watch, qt).await;
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        measured_once = true;
        match lag::gate(&l, req.max_lag_bytes, req.max_lag_time) {
            Err(why) if why.is_catching_up() && started.elapsed() < wait => {
                if said.is_none_or(|t| t.elapsed() >= SAY_EVERY) {
                    say(format!(
                        "waiting for replication to catch up: {why} ({:.0}s of --lag-wait {:?} left)",
                        wait.saturating_sub(started.elapsed()).as_secs_f64(),
                        wait
                    ));
                    said = Some(Instant::now());
                }
                if !pause(req, EVERY).await {
                    return Ok(l);
                }
            }
            _ => return Ok(l),
        }
    }
}

/// Sleeps `d`; `false` if the cutover was called off meanwhile.
pub(super) async fn pause(req: &FlipRequest, d: Duration) -> bool {
    tokio::select! {
        () = req.called_off.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}
