//! The controller as a library call: [`serve`] loads, attaches and pins the datapath, joins
//! the fleet, recovers an interrupted cutover, and serves the control socket, `/metrics`,
//! lag and conntrack GC until `shutdown` fires (as mini-redis's `server::run`). `redirect
//! run` parses its flags into a [`Config`] and calls it; so can a test.
//!
//! The datapath outlives it: when `serve` returns, the program, its maps and its links stay
//! pinned and keep forwarding with the last `ACTIVE`.

mod gc;
mod start;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use self::gc::serve_gc;
use crate::{
    conntrack::Timeouts,
    control,
    controller::{Controller, Databases, Phase},
    datapath::{Hook, Maps},
    fleet::{self, Fleet},
    metrics,
};

/// Everything [`serve`] needs, checked: `redirect run`'s flags (or its TOML file) after
/// parsing, with the DSNs' passwords read.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the datapath is pinned, the control socket, and the journal.
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub journal: PathBuf,
    /// Interfaces that receive client or backend traffic.
    pub ifaces: Vec<String>,
    pub vip: SocketAddrV4,
    pub source: SocketAddrV4,
    pub target: SocketAddrV4,
    /// Source address the backends see (`None`: this host's address on the route to each).
    pub snat_ip: Option<Ipv4Addr>,
    pub snat_ports: (u16, u16),
    /// Proxy (NAT on the interfaces) or socket (at `connect()`, this host's own clients).
    pub mode: crate::datapath::Mode,
    pub hook: Hook,
    pub drop_untracked: bool,
    pub fib_every_packet: bool,
    pub replace_backends: bool,
    /// Set the forwarding sysctls and reserve the SNAT ports (each change logged).
    pub set_sysctls: bool,
    pub gc_interval: Duration,
    pub timeouts: Timeouts,
    /// Load, attach and configure, then return instead of serving.
    pub once: bool,
    /// The two servers; `None`: flips are immediate, nothing is fenced or verified.
    pub databases: Option<Databases>,
    pub lag_interval: Duration,
    pub metrics_addr: SocketAddr,
    /// Fleet membership through etcd; `None`: a host on its own.
    pub fleet: Option<fleet::Settings>,
}

/// Runs the controller until `shutdown` fires, then lets a cutover in progress reach its
/// flip or undo itself, and leaves the fleet. Fails, having changed nothing in the kernel,
/// when the host, the servers or etcd are not fit to start on.
pub async fn serve(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (ifaces, spec) = start::preflight(&config)?;
    start::refuse_a_second_controller(&config.socket).await?;
    start::check_servers(&config).await?;
    // Socket mode forwards nothing and allocates no SNAT port.
    if config.set_sysctls && !config.mode.is_socket() {
        start::set_sysctls(&config, &ifaces)?;
    }
    let joined = start::join_fleet(&config).await?;
    let (mut installed, maps) = start::install(&config, &ifaces, &spec, joined.as_ref())?;
    if config.once {
        return Ok(());
    }
    let events = installed
        .ebpf
        .take_map("EVENTS")
        .and_then(|m| aya::maps::RingBuf::try_from(m).ok());
    // The fleet's tasks (membership, following the committed state) outlive `shutdown`: a
    // member stopped in the middle of a fleet hold keeps following until the next epoch
    // lifts it (see `stop`), or its kernel would drop every new connection until a restart.
    let fleet_stop = CancellationToken::new();
    let fleet = Box::pin(start::register(joined, &spec, &fleet_stop)).await?;
    let ctl = controller(&config, (maps, installed.ebpf, ifaces), fleet);
    if let Some(fleet) = &ctl.fleet {
        tokio::spawn(fleet::follow::follow(
            follower(&ctl, fleet),
            fleet_stop.clone(),
        ));
    }
    let control = tokio::spawn(control::serve(
        config.socket.clone(),
        ctl.clone(),
        shutdown.clone(),
    ));
    start::tell_systemd_when_ready(&config, &spec, &ctl, &control).await?;
    start::recover_and_prepare(&ctl).await;
    serve_the_rest(&config, &ctl, events, &shutdown).await;
    serve_gc(&ctl, config.timeouts, config.gc_interval, &shutdown).await;
    stop(&ctl, control, &fleet_stop).await;
    Ok(())
}

/// The controller's shared state, idle, over the datapath just installed.
fn controller(
    config: &Config,
    (maps, ebpf, ifaces): (Maps, aya::Ebpf, Vec<(String, u32)>),
    fleet: Option<Arc<Fleet>>,
) -> Arc<Controller> {
    Arc::new(Controller {
        host: Arc::new(crate::host::Host::new(maps, ebpf, ifaces)),
        db: config.databases.clone(),
        journal_path: config.journal.clone(),
        busy: Arc::new(tokio::sync::Mutex::new(())),
        phase: Mutex::new(Phase::Idle),
        last_lag: Mutex::new(None),
        last_cutover: Mutex::new(None),
        last_recovery: Mutex::new(None),
        last_gc: Mutex::new(None),
        fleet,
    })
}

/// What this member needs to follow the fleet's committed state on its own datapath.
fn follower(ctl: &Controller, fleet: &Arc<Fleet>) -> fleet::follow::Follower {
    fleet::follow::Follower {
        host: ctl.host.clone(),
        fleet: fleet.clone(),
        servers: ctl.db.as_ref().map(|d| fleet::hold::Servers {
            source: d.source.clone(),
            target: d.target.clone(),
            query_timeout: d.query_timeout,
        }),
    }
}

/// The background services: the datapath's event log, `/metrics`, and the lag reading.
async fn serve_the_rest(
    config: &Config,
    ctl: &Arc<Controller>,
    events: Option<aya::maps::RingBuf<aya::maps::MapData>>,
    shutdown: &CancellationToken,
) {
    if let Some(ring) = events {
        drop(tokio::spawn(crate::events::log(ring, shutdown.clone())));
    } else {
        warn!("the datapath has no event ring; its events are only counted");
    }
    match tokio::net::TcpListener::bind(config.metrics_addr).await {
        Ok(l) => {
            info!(addr = %config.metrics_addr, "serving /metrics");
            tokio::spawn(metrics::serve(l, ctl.clone(), shutdown.clone()));
        }
        Err(e) => warn!(addr = %config.metrics_addr, error = %e, "cannot serve /metrics"),
    }
    if ctl.db.is_some() {
        tokio::spawn(watch_lag(
            ctl.clone(),
            config.lag_interval,
            shutdown.clone(),
        ));
    }
}

/// Keeps `last_lag` fresh for `/metrics` and `status`.
async fn watch_lag(ctl: Arc<Controller>, interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if ctl.phase() != Phase::Idle {
            continue;
        }
        if let Err(e) = ctl.measure_lag().await {
            warn!(error = %e, "measuring replication lag");
            // The last figures stay (status, /metrics and the watch view show them), but not
            // as healthy: a server that cannot be reached must fire the unhealthy alert, not
            // keep the last good reading green.
            if let Some(lag) = crate::sync::lock(&ctl.last_lag).as_mut() {
                lag.healthy = false;
                lag.problems = vec![format!("lag cannot be measured: {e}")];
            }
        }
    }
}

/// SIGTERM (`systemctl stop/restart`) in the middle of a cutover: let it reach the flip or
/// undo itself rather than drop it mid-step. The drain is not waited for: it can be long,
/// and a restarted controller resumes it from the journal. Bounded, for a cutover that
/// cannot end.
async fn stop(
    ctl: &Controller,
    control: tokio::task::JoinHandle<std::io::Result<()>>,
    fleet_stop: &CancellationToken,
) {
    crate::notify::stopping();
    let stop_by = std::time::Instant::now() + Duration::from_secs(120);
    // Checked every 20 ms: the phase changes in memory, and a stop should not add latency.
    let every = Duration::from_millis(20);
    if !matches!(ctl.phase(), Phase::Idle | Phase::Drain) {
        warn!(phase = %ctl.phase(), "stopping: waiting for the cutover in progress to flip or undo itself");
        crate::poll::until_true(stop_by, every, || {
            matches!(ctl.phase(), Phase::Idle | Phase::Drain)
        })
        .await;
    }
    if let Some(fleet) = &ctl.fleet
        && crate::sync::lock(&fleet.holding).is_some()
    {
        warn!("stopping: waiting for the fleet's next epoch to lift this member's hold");
        crate::poll::until_true(stop_by, every, || {
            crate::sync::lock(&fleet.holding).is_none()
        })
        .await;
    }
    fleet_stop.cancel();
    if let Ok(Err(e)) = control.await {
        warn!(error = %e, "control socket");
    }
    if let Some(fleet) = &ctl.fleet {
        fleet.leave().await;
        info!(fleet = %fleet.settings.fleet, "left the fleet");
    }
    info!("controller stopped; the datapath stays attached and pinned");
}
