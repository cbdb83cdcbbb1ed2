//! Conntrack garbage collection, the controller's one periodic kernel chore.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    conntrack::{self, Timeouts},
    controller::Controller,
};

/// Runs GC passes until `shutdown`, more often while a SNAT port range fills up.
pub async fn serve_gc(
    ctl: &Controller,
    timeouts: Timeouts,
    interval: Duration,
    shutdown: &CancellationToken,
) {
    let mut wait = interval;
    let mut pressured = false;
    let mut forgotten_total = conntrack::Forgotten::default();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        // A pass is a few map syscalls per entry; at 1M entries it takes seconds, which is
        // fine for a dedicated task (block_in_place keeps the runtime's other tasks running).
        let result = tokio::task::block_in_place(|| {
            {
                let mut maps = crate::sync::lock(&ctl.host.maps);
                forget_closed_flows(&mut maps);
            }
            reserve_held_ports(ctl);
            disarm_when_done(ctl);
            let mut maps = crate::sync::lock(&ctl.host.maps);
            conntrack::gc(&mut maps, &timeouts, pressured)
        });
        match result {
            Ok(mut r) => {
                if r.errors > 0 {
                    warn!(
                        entries = r.errors,
                        "conntrack gc: map operations failed on some entries; retrying them next pass"
                    );
                }
                forgotten_total.add(&r.forgotten);
                r.forgotten_total = forgotten_total;
                let pressure = r.max_pressure();
                if r.ct_expired + r.ports_quarantined + r.ports_released > 0 {
                    debug!(
                        expired = r.ct_expired,
                        released_at_once = r.ports_released_at_once,
                        quarantined = r.ports_quarantined,
                        released = r.ports_released,
                        live = r.ct_live,
                        pressure = format!("{:.0}%", pressure * 100.0),
                        took_ms = r.took_ms,
                        "conntrack gc"
                    );
                }
                let now_pressured = conntrack::pressured(pressured, pressure);
                if now_pressured != pressured {
                    if now_pressured {
                        warn!(
                            pressure = format!("{:.0}%", pressure * 100.0),
                            "SNAT ports are running short: collecting every 250 ms, forgetting closed connections after {:?} and unanswered SYNs after {:?}; widen --snat-ports or add SNAT addresses",
                            conntrack::PRESSURED_CLOSE_TIMEOUT,
                            conntrack::PRESSURED_SYN_TIMEOUT
                        );
                    } else {
                        info!(
                            pressure = format!("{:.0}%", pressure * 100.0),
                            "SNAT port pressure back to normal"
                        );
                    }
                }
                pressured = now_pressured;
                // A pass over a million entries takes seconds: never let the GC take more than
                // a third of a core, whatever the interval asks for.
                wait = conntrack::next_gc_interval(interval, pressure)
                    .max(Duration::from_millis(r.took_ms.saturating_mul(2)));
                *crate::sync::lock(&ctl.last_gc) = Some(r);
            }
            Err(e) => warn!(error = %e, "conntrack gc failed; retrying next interval"),
        }
    }
}

/// Socket mode: the held flows whose socket has closed, and the gate of the translated ones
/// (see [`crate::host::sockets::gc_flows`]).
fn forget_closed_flows(maps: &mut crate::datapath::Maps) {
    if !matches!(maps.is_socket_mode(), Ok(true)) {
        return;
    }
    match crate::host::sockets::gc_flows(maps) {
        Ok(gc) if gc.forgotten > 0 => debug!(
            forgotten = gc.forgotten,
            translated = gc.translated,
            "held flows whose socket closed"
        ),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "socket-mode gc failed; retrying next pass"),
    }
}

/// Socket mode: the uplink's hooks go once no cutover needs them.
fn disarm_when_done(ctl: &Controller) {
    let idle = ctl.phase() == crate::controller::Phase::Idle;
    match ctl.host.disarm_when_done(idle) {
        Ok(true) => info!(
            "disarmed the uplink's hooks: no cutover needs them, and no program runs on any packet"
        ),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "could not disarm the uplink's hooks; retrying next pass"),
    }
}

/// Socket mode: the held connections' ports stay reserved while they live (see
/// [`crate::host::Host::reserve_held_ports`]).
fn reserve_held_ports(ctl: &Controller) {
    if !matches!(ctl.host.is_socket_mode(), Ok(true)) {
        return;
    }
    if let Err(e) = ctl.host.reserve_held_ports() {
        warn!(error = %e, "could not reserve held connections' ports; retrying next pass");
    }
}
