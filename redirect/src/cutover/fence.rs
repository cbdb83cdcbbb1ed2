//! Step 3: the fence in the database.
//!
//! The datapath already drops every data packet a proxied client sends to the old server.
//! What it cannot stop is a query that arrived *before* the fence and still sits unread in a
//! backend's socket (the backend was not scheduled, or looked idle in `pg_stat_activity` a
//! moment before reading it). So every proxied session on the old server is ended, busy or
//! idle, whatever `pg_stat_activity` says its state is, and the cutover waits until each
//! one has exited. After that, no commit on the old server can happen that is not already in
//! its WAL before the barrier's marker. Idle pooled clients lose a connection they could no
//! longer use anyway (the fence drops their data) and learn it now, from the server's FATAL,
//! instead of at the drain.

use std::{
    ops::ControlFlow,
    time::{Duration, Instant},
};

use super::{CutoverError, Phase, Run, journal::Step};
use crate::pg::Server;

/// Every proxied session: it comes from a proxy's SNAT address and a port in its SNAT range
/// (`run` reserves that range from the host's own ephemeral ports, so the controller's own
/// sessions are never in it). One (address, range) per proxy: this host's, and in a fleet
/// every member's. The candidates are materialized first: in a single WHERE the planner may
/// evaluate `pg_terminate_backend()` before the other conditions.
const END_PROXIED: &str = "WITH proxied AS MATERIALIZED (SELECT pid FROM pg_stat_activity a \
     WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
     AND EXISTS (SELECT 1 FROM unnest($1::text[], $2::int4[], $3::int4[]) p(addr, lo, hi) \
     WHERE host(a.client_addr) = p.addr AND a.client_port BETWEEN p.lo AND p.hi)) \
     SELECT pid FROM proxied WHERE pg_terminate_backend(pid)";
/// Every proxied session still there, whoever ended it or not.
const PROXIED_LEFT: &str = "SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity a \
     WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
     AND EXISTS (SELECT 1 FROM unnest($1::text[], $2::int4[], $3::int4[]) p(addr, lo, hi) \
     WHERE host(a.client_addr) = p.addr AND a.client_port BETWEEN p.lo AND p.hi)";

/// Between the hold and the fence: no new connection starts, and connections that began
/// moments ago and are still exchanging packets (a connection-per-request client in its
/// startup or its one transaction) get a short, bounded moment to finish on the old server.
/// Their writes commit before the fence, so the barrier covers them; without this they
/// would be cut mid-startup. Long-lived (pooled) connections do not wait.
pub async fn let_short_connections_finish(run: &mut Run) -> Result<(), CutoverError> {
    let t = Instant::now();
    let busy = crate::host::settle::settle(&run.ctl.host, run.from).await?;
    run.rec.say(format!(
        "settle   {:>8.1} ms  {}",
        t.elapsed().as_secs_f64() * 1000.0,
        if busy == 0 {
            "no short-lived connection in progress".to_owned()
        } else {
            format!("{busy} short-lived connection(s) still busy; fencing anyway")
        }
    ));
    Ok(())
}

/// Ends every proxied session on the old server and waits until none is left.
///
/// "None left" is checked over every proxied session, not only the ones this call signalled:
/// a session the role could not end (another superuser's) or one that was not being scheduled
/// still counts, and the cutover aborts rather than put a barrier in front of it.
pub async fn end_old_sessions(run: &mut Run) -> Result<(), CutoverError> {
    run.ctl.set_phase(Phase::Fence);
    let t = Instant::now();
    // Packets already past the datapath get a moment to reach their sockets.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let socket_mode = run.ctl.host.is_socket_mode()?;
    let ended = if socket_mode {
        end_until_none_left(run, || hooked_sessions(run)).await?
    } else {
        let proxied = proxied_sessions(run);
        end_until_none_left(run, || Ok(proxied.clone())).await?
    };
    run.report.terminated_at_fence = ended.len() as u64;
    run.rec.step(
        Step::Fence,
        t,
        format!(
            "{} {} session(s) on the {} ended; none left",
            ended.len(),
            if socket_mode { "hooked" } else { "proxied" },
            run.from
        ),
    )
}

/// Which sessions the fence ends: clients at `addrs`, with ports `los[i]..=his[i]`.
#[derive(Clone, Debug, Default)]
struct Clients {
    addrs: Vec<String>,
    los: Vec<i32>,
    his: Vec<i32>,
}

impl Clients {
    fn push(&mut self, addr: String, ports: (u16, u16)) {
        self.addrs.push(addr);
        self.los.push(i32::from(ports.0));
        self.his.push(i32::from(ports.1));
    }
}

/// Proxy mode: this host's proxied sessions (its SNAT address and port range), and every
/// other fleet member's.
fn proxied_sessions(run: &Run) -> Clients {
    let mut c = Clients::default();
    c.push(run.from_snat.clone(), run.snat_ports);
    for p in run.members_proxied() {
        c.push(p.snat.clone(), p.ports);
    }
    c
}

/// Socket mode: this host's connections to the old server (all but the controller's own:
/// [`crate::host::sockets::fence_targets`]), each by its own address and port, listed afresh
/// on every pass (a `connect()` the hook sent there just before the hold may only now have
/// its socket).
fn hooked_sessions(run: &Run) -> Result<Clients, CutoverError> {
    let mut c = Clients::default();
    let targets = {
        let maps = crate::sync::lock(&run.ctl.host.maps);
        crate::host::sockets::fence_targets(&maps, run.from)?
    };
    for h in targets {
        c.push(
            h.client.ip().to_string(),
            (h.client.port(), h.client.port()),
        );
    }
    Ok(c)
}

/// What the fence has done so far: the sessions it ended, and the ones its last look found.
struct Fencing {
    ended: Vec<i32>,
    left: Vec<i32>,
}

/// Ends the sessions of the clients `clients()` names until none is left, within the
/// cutover's deadline; returns every session it ended.
async fn end_until_none_left(
    run: &Run,
    clients: impl Fn() -> Result<Clients, CutoverError>,
) -> Result<Vec<i32>, CutoverError> {
    let first = Fencing {
        ended: Vec::new(),
        left: Vec::new(),
    };
    // Every 2 ms: held clients wait for as long as the fence does, and an ended session
    // exits within a few.
    let fenced = crate::poll::until_with(run.deadline, Duration::from_millis(2), first, |mut f| {
        let clients = clients();
        async move {
            let Clients { addrs, los, his } = clients?;
            let pids: Vec<i32> = run
                .query(
                    Phase::Fence,
                    Server::Old,
                    "ending proxied sessions",
                    run.from_db.query(END_PROXIED, &[&addrs, &los, &his]),
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for p in pids {
                if !f.ended.contains(&p) {
                    f.ended.push(p);
                }
            }
            f.left = run
                .query(
                    Phase::Fence,
                    Server::Old,
                    "waiting for proxied sessions to exit",
                    run.from_db.query_one(PROXIED_LEFT, &[&addrs, &los, &his]),
                )
                .await?
                .get(0);
            Ok::<_, CutoverError>(if f.left.is_empty() {
                ControlFlow::Break(f.ended)
            } else {
                ControlFlow::Continue(f)
            })
        }
    })
    .await?;
    match fenced {
        ControlFlow::Break(ended) => Ok(ended),
        ControlFlow::Continue(Fencing { left, .. }) => Err(CutoverError::abort(
            Phase::Fence,
            format!(
                "proxied session(s) {left:?} on the {} did not exit before --timeout {:?} (not being scheduled, or not ours to end); every one must be gone before the barrier",
                run.from, run.req.timeout
            ),
        )),
    }
}
