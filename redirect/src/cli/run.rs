//! `redirect run`: load, attach and pin the datapath, then garbage-collect its connection
//! table until SIGINT or SIGTERM. The datapath outlives this process.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::PortRange;
use crate::{
    conntrack::{self, Timeouts},
    control,
    controller::{Controller, Databases, Phase},
    cutover::recover,
    datapath::{self, BackendAddr, Hook, Maps, Spec},
    metrics, net,
    pg::{Dsn, PasswordSources, lag::Replication},
};

/// Load the datapath on this host and keep its connection table clean.
///
/// Re-running it re-adopts the pinned state: ACTIVE and every tracked connection survive, and
/// the program on each existing link is swapped atomically.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Read the settings from this TOML file (see packaging/redirect.toml); flags given here
    /// override it. Its keys are these flags' long names.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Interface that receives client or backend traffic (repeat for each).
    #[arg(long = "iface", required = true)]
    pub ifaces: Vec<String>,
    /// The address clients connect to; must be local to this host.
    #[arg(long)]
    pub vip: SocketAddrV4,
    /// The server being migrated from.
    #[arg(long)]
    pub source: SocketAddrV4,
    /// The server being migrated to.
    #[arg(long)]
    pub target: SocketAddrV4,
    /// Source address the backends see (default: this host's address on the route to each).
    #[arg(long)]
    pub snat_ip: Option<Ipv4Addr>,
    /// SNAT ports; keep them out of the host's ephemeral range (`net.ipv4.ip_local_port_range`)
    /// or reserve them (`net.ipv4.ip_local_reserved_ports`).
    #[arg(long, default_value = "40000-59999")]
    pub snat_ports: PortRange,
    /// Kernel hook per interface: `auto` runs XDP on NICs and TC on virtual interfaces
    /// (containers' veths and bridges, whose GRO-merged frames and partial checksums XDP cannot
    /// handle) and on NICs without native XDP.
    #[arg(long, alias = "xdp-mode", value_enum, default_value = "auto")]
    pub hook: Hook,
    /// Drop (instead of answering with a RST) packets of connections that are not tracked.
    #[arg(long)]
    pub drop_untracked: bool,
    /// Ask the kernel's FIB for every packet instead of caching each destination's next hop
    /// for 100 ms: for hosts whose routes or neighbours change faster than that.
    #[arg(long)]
    pub fib_every_packet: bool,
    /// Let a restart change --source or --target from what the pinned datapath holds (refused
    /// otherwise). ACTIVE is kept by role, so new connections for that role go to the new
    /// address at once; live connections stay on the old address until they close.
    #[arg(long)]
    pub replace_backends: bool,
    /// Leave the forwarding sysctls alone (otherwise they are set, and each change is logged).
    #[arg(long)]
    pub no_sysctl: bool,
    /// How often to garbage-collect the connection table while SNAT ports are plentiful (the
    /// GC runs every 250 ms to 1 s as a port range fills).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub gc_interval: Duration,
    /// Forget a SYN that got no answer after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub syn_timeout: Duration,
    /// Forget an established connection idle this long; keep it above your pools' idle time.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "6h")]
    pub established_timeout: Duration,
    /// Forget a closed (both FINs, or RST) connection after this long: time for the last ACK
    /// and a retransmitted FIN. A stray packet after it gets a RST from this host, harmlessly.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub close_timeout: Duration,
    /// Keep a SNAT port unused this long after its connection is forgotten, when the backend
    /// closed first and holds `TIME_WAIT` (> the backend's `TIME_WAIT`, 60 s on Linux).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    pub port_quarantine: Duration,
    /// Load, attach and configure, then exit instead of serving (the datapath stays).
    #[arg(long)]
    pub once: bool,

    /// The source server, as a libpq key=value DSN (no password: see --source-password-file).
    #[arg(long, env = "REDIRECT_SOURCE_DSN")]
    pub source_dsn: Option<String>,
    /// The target server, as a libpq key=value DSN (sslmode=require/verify-full supported).
    #[arg(long, env = "REDIRECT_TARGET_DSN")]
    pub target_dsn: Option<String>,
    /// File holding the source password (else `REDIRECT_SOURCE_PASSWORD`, else PGPASSFILE/~/.pgpass).
    #[arg(long)]
    pub source_password_file: Option<PathBuf>,
    /// File holding the target password (else `REDIRECT_TARGET_PASSWORD`, else PGPASSFILE/~/.pgpass).
    #[arg(long)]
    pub target_password_file: Option<PathBuf>,
    /// How the target is kept in sync.
    #[arg(long, value_enum, default_value = "logical")]
    pub replication: Replication,
    /// The subscription on the target that carries a database (logical; default: the only
    /// one in each database). `NAME` for the DSN's database, `DB=NAME` for another; repeat it
    /// for several databases.
    #[arg(long, value_name = "[DB=]NAME")]
    pub subscription: Vec<String>,
    /// Cut over only these databases (default: every connectable database on the source).
    /// Databases left out are still moved with the VIP, but nothing protects their writes.
    #[arg(long, value_delimiter = ',', value_name = "DB,...")]
    pub databases: Vec<String>,
    /// Leave these databases out of the cutover (see --databases).
    #[arg(long, value_delimiter = ',', value_name = "DB,...")]
    pub exclude_databases: Vec<String>,
    /// How the source server reaches the target for reverse replication (default: --target-dsn).
    /// Its password, if any, belongs in the source server's ~/.pgpass, not here.
    #[arg(long, env = "REDIRECT_REVERSE_CONNINFO")]
    pub reverse_conninfo: Option<String>,
    /// Timeout of every database query.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub query_timeout: Duration,
    /// How often to measure replication lag.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub lag_interval: Duration,
    /// Serve Prometheus metrics at <http://ADDR/metrics>.
    #[arg(long, default_value = "127.0.0.1:9187")]
    pub metrics_addr: std::net::SocketAddr,

    /// Fleet membership through etcd (see docs/fleet.md).
    #[command(flatten)]
    pub fleet: crate::fleet::Options,
}

impl Args {
    fn timeouts(&self) -> Timeouts {
        Timeouts {
            syn: self.syn_timeout,
            established: self.established_timeout,
            close: self.close_timeout,
            port_quarantine: self.port_quarantine,
        }
    }
}

/// Checks everything that can be checked before touching the kernel, so a bad argument leaves
/// nothing half-done.
fn databases(args: &Args) -> anyhow::Result<Option<Databases>> {
    let (source, target) = match (&args.source_dsn, &args.target_dsn) {
        (None, None) => return Ok(None),
        (Some(s), Some(t)) => (s, t),
        _ => anyhow::bail!("give both --source-dsn and --target-dsn, or neither"),
    };
    let source = Dsn::parse(
        "source",
        source,
        &PasswordSources {
            file: args.source_password_file.clone(),
            env: Some("REDIRECT_SOURCE_PASSWORD".into()),
        },
    )?;
    let target = Dsn::parse(
        "target",
        target,
        &PasswordSources {
            file: args.target_password_file.clone(),
            env: Some("REDIRECT_TARGET_PASSWORD".into()),
        },
    )?;
    if args
        .reverse_conninfo
        .as_deref()
        .is_some_and(crate::pg::names_a_password)
    {
        anyhow::bail!(
            "--reverse-conninfo must be key=value pairs without a password (it would be stored in the source's catalog and shown in logs): put the password in the source server's ~/.pgpass"
        );
    }
    let (mut subscription, mut subscriptions) = subscriptions(&args.subscription)?;
    // `--subscription HOME=NAME` is the DSNs' database's, the same as `--subscription NAME`.
    if let Some(named) = subscriptions.remove(source.database()) {
        if subscription.as_ref().is_some_and(|s| *s != named) {
            anyhow::bail!(
                "--subscription names two subscriptions for database {:?}",
                source.database()
            );
        }
        subscription = Some(named);
    }
    for (flag, list) in [
        ("--databases", &args.databases),
        ("--exclude-databases", &args.exclude_databases),
    ] {
        if list.iter().any(|d| d.trim().is_empty()) {
            anyhow::bail!("{flag} has an empty database name");
        }
    }
    if source.database() != target.database() {
        anyhow::bail!(
            "--source-dsn names database {:?} and --target-dsn {:?}: a cutover carries each database to the one of the same name, so name the same database in both",
            source.database(),
            target.database()
        );
    }
    Ok(Some(Databases {
        source,
        target,
        replication: args.replication,
        subscription,
        subscriptions,
        scope: crate::pg::lag::Scope {
            only: args.databases.clone(),
            exclude: args.exclude_databases.clone(),
        },
        reverse_conninfo: args.reverse_conninfo.clone(),
        query_timeout: args.query_timeout,
    }))
}

/// `--subscription NAME` (the DSN's database) and `--subscription DB=NAME` (another).
fn subscriptions(
    given: &[String],
) -> anyhow::Result<(Option<String>, std::collections::BTreeMap<String, String>)> {
    let mut home = None;
    let mut named = std::collections::BTreeMap::new();
    for s in given {
        match s.split_once('=') {
            Some((db, name)) if !db.is_empty() && !name.is_empty() => {
                if named.insert(db.to_owned(), name.to_owned()).is_some() {
                    anyhow::bail!("--subscription names database {db:?} twice");
                }
            }
            Some(_) => anyhow::bail!("--subscription {s:?}: expected NAME or DB=NAME"),
            None if s.is_empty() => anyhow::bail!("--subscription has an empty name"),
            None if home.is_some() => anyhow::bail!(
                "--subscription given twice without a database: name the others' as DB=NAME"
            ),
            None => home = Some(s.clone()),
        }
    }
    Ok((home, named))
}

fn check_addresses(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.source != args.target,
        "--source and --target are the same address ({})",
        args.source
    );
    for (what, b) in [("source", args.source), ("target", args.target)] {
        anyhow::ensure!(
            b != args.vip,
            "--{what} is the VIP itself ({b}): that would loop"
        );
    }
    Ok(())
}

/// The checks of `run` that need neither root, the kernel, the databases nor etcd (what
/// `redirect config check` runs): the addresses, the DSNs and password sources, the fleet
/// options.
pub fn check_settings(args: &Args) -> anyhow::Result<()> {
    check_addresses(args)?;
    databases(args)?;
    crate::fleet::settings(&args.fleet, args.vip)?;
    Ok(())
}

fn preflight(args: &Args, pin_dir: &Path) -> anyhow::Result<(Vec<(String, u32)>, Spec)> {
    net::require_root()?;
    net::require_kernel()?;
    let mut ifaces = Vec::new();
    for name in &args.ifaces {
        ifaces.push((name.clone(), net::ifindex(name)?));
    }
    // A fleet member may be a keepalived standby: the VIP arrives when keepalived moves it,
    // and the datapath (already following the committed state) serves it from then on.
    if args.fleet.etcd.is_empty() {
        net::require_local("VIP", *args.vip.ip())?;
    } else if net::require_local("VIP", *args.vip.ip()).is_err() {
        tracing::warn!(vip = %args.vip, "the VIP is not on this host (yet): a standby member serves it once keepalived (or an operator) moves it here");
    }
    if let Some(ip) = args.snat_ip {
        net::require_local("SNAT address", ip)?;
    }
    check_addresses(args)?;
    let backend = |addr: SocketAddrV4| -> anyhow::Result<BackendAddr> {
        let snat = match args.snat_ip {
            Some(ip) => ip,
            None => net::route_source(*addr.ip())?,
        };
        Ok(BackendAddr { addr, snat })
    };
    net::require_bpffs(pin_dir)?;
    let spec = Spec {
        vip: args.vip,
        source: backend(args.source)?,
        target: backend(args.target)?,
        snat_ports: (args.snat_ports.lo, args.snat_ports.hi),
        drop_nonsyn_miss: args.drop_untracked,
        fib_every_packet: args.fib_every_packet,
        replace_backends: args.replace_backends,
    };
    // Refuse a different VIP or backends, or a mix of hooks, now, before sysctls or the kernel
    // are touched.
    datapath::one_hook(&datapath::PinDir(pin_dir.to_path_buf()), &ifaces, args.hook)?;
    for c in datapath::check_adoption(pin_dir, &spec)? {
        warn!(
            role = %c.role,
            old = %c.pinned,
            new = %c.requested,
            "--replace-backends: new connections for this role go to the new address; live ones stay on the old one"
        );
    }
    Ok((ifaces, spec))
}

pub async fn run(args: Args, pin_dir: &Path, socket: &Path, journal: &Path) -> anyhow::Result<()> {
    let (ifaces, spec) = preflight(&args, pin_dir)?;
    let fleet_settings = crate::fleet::settings(&args.fleet, args.vip)?;
    // Two controllers on one datapath would drain, GC and recover against each other.
    if tokio::net::UnixStream::connect(socket).await.is_ok() {
        anyhow::bail!(
            "another controller already serves {} (stop it first)",
            socket.display()
        );
    }
    let db = databases(&args)?;
    let interrupted = crate::journal::read(journal)
        .ok()
        .and_then(|e| crate::journal::unfinished(&e))
        .is_some();
    // A datapath pinned by an earlier run is serving clients: it needs its controller (the
    // connection table's GC, status, metrics) even while a server is down.
    let serving = datapath::PinDir(pin_dir.to_path_buf()).is_pinned();
    if let Some(db) = &db {
        // Fail before touching the kernel if a server cannot be reached at all; but never
        // refuse to start when a cutover was interrupted (recovery must run, and it copes
        // with an unreachable server) or when a pinned datapath is serving.
        let go_on = interrupted || serving;
        for dsn in [&db.source, &db.target] {
            match tokio::time::timeout(db.query_timeout * 2, dsn.connect()).await {
                Ok(Ok(c)) => drop(c),
                Ok(Err(e)) if !go_on => return Err(e.into()),
                Err(_) if !go_on => {
                    anyhow::bail!("{dsn:?} did not answer within {:?}", db.query_timeout * 2)
                }
                Ok(Err(e)) => {
                    warn!(error = %e, interrupted, serving, "a server is unreachable; starting anyway (an interrupted cutover to recover, or a pinned datapath to look after)");
                }
                Err(_) => {
                    warn!(server = ?dsn, interrupted, serving, "a server does not answer; starting anyway (an interrupted cutover to recover, or a pinned datapath to look after)");
                }
            }
        }
    }
    if !args.no_sysctl {
        let names: Vec<String> = ifaces.iter().map(|(n, _)| n.clone()).collect();
        // The values before the first change, for `detach` to restore.
        let record = net::host_settings::HostSettings::new(journal, pin_dir)?;
        for change in net::ensure_forwarding(&names, &record)? {
            info!(sysctl = %change, record = %record.path().display(), "set");
        }
        match net::reserve_ports(args.snat_ports.lo, args.snat_ports.hi, &record) {
            Ok(Some(change)) => {
                info!(sysctl = %change, "set: the host's own connections stay out of the SNAT range");
            }
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "could not reserve the SNAT ports; the host's own connections may collide with them");
            }
        }
    }
    // A fleet member reads the committed state before anything is attached, and applies it
    // whatever its pins say (the joining-host invariant). etcd unreachable: fail here, having
    // changed nothing; a datapath pinned by an earlier run keeps serving as it was.
    let joined = match &fleet_settings {
        Some(settings) => {
            let pinned = if datapath::PinDir(pin_dir.to_path_buf()).is_pinned() {
                Maps::open(pin_dir)?.active()?
            } else {
                None
            };
            let (client, committed) = crate::fleet::join(settings, pinned).await?;
            info!(
                fleet = %settings.fleet,
                member = %settings.member,
                epoch = %committed.state.epoch,
                active = %committed.state.active,
                pinned = pinned.map_or("none", |r| r.name()),
                "joined the fleet: applying its committed backend before attaching"
            );
            Some((settings.clone(), client, committed))
        }
        None => None,
    };
    let joining = joined.as_ref().map(|(_, _, c)| datapath::Joining {
        active: c.state.active,
        in_hold: c.state.phase == crate::fleet::state::FleetPhase::Hold,
    });
    let mut report = datapath::install_with_active(pin_dir, &ifaces, args.hook, &spec, joining)?;
    if joining.is_some_and(|j| j.in_hold) {
        // Read back from the kernel's map, not assumed: what the first packets met.
        let cutover = Maps::open(pin_dir)?.cutover()?;
        if cutover.flags & redirect_common::cutover::LAPSE_CLOSED != 0 {
            info!(
                fenced = cutover.fence_until_ns != 0,
                "the fleet is in a cutover's hold: new connections were held (and are dropped unless this member confirms the hold) from before the datapath attached"
            );
        }
    }
    info!(
        pin_dir = %pin_dir.display(),
        vip = %spec.vip,
        source = %spec.source.addr,
        source_snat = %spec.source.snat,
        target = %spec.target.addr,
        target_snat = %spec.target.snat,
        adopted = report.adopted_maps,
        attached = ?report.attached,
        upgraded = ?report.upgraded,
        databases = db.as_ref().map_or("none (flips are immediate)".to_owned(), |d| format!("{:?} / {:?}", d.source, d.target)),
        "datapath ready"
    );
    let maps = Maps::open(pin_dir)?;
    info!(active = %maps.active()?.map_or("none", |r| r.name()), "new connections go to this backend");
    if args.once {
        return Ok(());
    }
    let events = report
        .ebpf
        .take_map("EVENTS")
        .and_then(|m| aya::maps::RingBuf::try_from(m).ok());
    let shutdown = CancellationToken::new();
    // The fleet's tasks (membership, following the committed state) outlive `shutdown`: a
    // member stopped in the middle of a fleet hold keeps following until the next epoch
    // lifts it (below), or its kernel would drop every new connection until a restart.
    let fleet_stop = CancellationToken::new();
    let fleet = match joined {
        Some((settings, client, committed)) => {
            let snat = vec![spec.source.snat.to_string(), spec.target.snat.to_string()];
            let fleet = crate::fleet::Fleet::register(
                settings,
                client,
                committed,
                snat,
                fleet_stop.clone(),
            )
            .await?;
            info!(fleet = %fleet.settings.fleet, member = %fleet.settings.member, "registered as a fleet member");
            Some(Arc::new(fleet))
        }
        None => None,
    };
    let ctl = Arc::new(Controller {
        host: Arc::new(crate::host::Host::new(maps, report.ebpf)),
        db,
        journal_path: journal.to_path_buf(),
        busy: Arc::new(tokio::sync::Mutex::new(())),
        phase: Mutex::new(Phase::Idle),
        last_lag: Mutex::new(None),
        last_cutover: Mutex::new(None),
        last_recovery: Mutex::new(None),
        last_gc: Mutex::new(None),
        fleet,
    });
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            shutdown.cancel();
        }
    });
    if let Some(fleet) = &ctl.fleet {
        let follower = crate::fleet::follow::Follower {
            host: ctl.host.clone(),
            fleet: fleet.clone(),
            servers: ctl.db.as_ref().map(|d| crate::fleet::hold::Servers {
                source: d.source.clone(),
                target: d.target.clone(),
                query_timeout: d.query_timeout,
            }),
        };
        tokio::spawn(crate::fleet::follow::follow(follower, fleet_stop.clone()));
    }
    let control = tokio::spawn(control::serve(
        socket.to_path_buf(),
        ctl.clone(),
        shutdown.clone(),
    ));
    // systemd (Type=notify) starts the units ordered after this one once the datapath is
    // attached (above) and the control socket answers: `redirect status` works from then on.
    if wait_for_control(socket, &control).await {
        crate::notify::ready(&format!(
            "serving {} -> {}",
            spec.vip,
            crate::sync::lock(&ctl.host.maps)
                .active()?
                .map_or("none", |r| r.name())
        ));
    }
    // Under the cutover lock, so a flip that arrives meanwhile is refused as busy: finish or
    // undo what a previous controller left, prepare the barrier, then resume its drain in the
    // background (the controller serves status, metrics and GC meanwhile).
    let busy = ctl.busy.clone().lock_owned().await;
    let pending = match recover::recover(&ctl).await {
        Ok(Some((what, pending))) => {
            warn!(recovery = %what, "the previous controller stopped mid-cutover");
            pending
        }
        Ok(None) => None,
        Err(e) => {
            warn!(error = %e, "could not check the journal for an unfinished cutover");
            None
        }
    };
    if ctl.db.is_some() {
        // Bounded: a server that accepts but never answers must not keep the controller
        // (and a resumed drain) waiting.
        match tokio::time::timeout(Duration::from_secs(30), crate::cutover::prepare(&ctl)).await {
            Ok(Ok(())) => info!(
                table = crate::cutover::BARRIER_TABLE,
                "the barrier table replicates; cutovers are ready"
            ),
            Ok(Err(e)) => {
                warn!(error = %e, "could not prepare the barrier table; a cutover will try again");
            }
            Err(_) => {
                warn!("could not prepare the barrier table within 30 s; a cutover will try again");
            }
        }
    }
    if let Some(p) = pending {
        tokio::spawn({
            let ctl = ctl.clone();
            async move {
                let _busy = busy;
                match recover::resume_drain(&ctl, p).await {
                    Ok(what) => info!(recovery = %what, "the interrupted cutover is finished"),
                    Err(e) => warn!(error = %e, "resuming the drain"),
                }
                ctl.set_phase(Phase::Idle);
            }
        });
    } else {
        ctl.set_phase(Phase::Idle);
        drop(busy);
    }
    if let Some(ring) = events {
        drop(tokio::spawn(crate::events::log(ring, shutdown.clone())));
    } else {
        warn!("the datapath has no event ring; its events are only counted");
    }
    match tokio::net::TcpListener::bind(args.metrics_addr).await {
        Ok(l) => {
            info!(addr = %args.metrics_addr, "serving /metrics");
            tokio::spawn(metrics::serve(l, ctl.clone(), shutdown.clone()));
        }
        Err(e) => warn!(addr = %args.metrics_addr, error = %e, "cannot serve /metrics"),
    }
    if ctl.db.is_some() {
        tokio::spawn(watch_lag(ctl.clone(), args.lag_interval, shutdown.clone()));
    }
    serve_gc(&ctl, args.timeouts(), args.gc_interval, &shutdown).await;
    // SIGTERM (`systemctl stop/restart`) in the middle of a cutover: let it reach the flip
    // or undo itself rather than drop it mid-step. The drain is not waited for: it can be
    // long, and a restarted controller resumes it from the journal. Bounded, for a cutover
    // that cannot end.
    crate::notify::stopping();
    let stop_by = std::time::Instant::now() + Duration::from_secs(120);
    if !matches!(ctl.phase(), Phase::Idle | Phase::Drain) {
        warn!(phase = %ctl.phase(), "stopping: waiting for the cutover in progress to flip or undo itself");
        crate::poll::until_true(stop_by, Duration::from_millis(20), || {
            matches!(ctl.phase(), Phase::Idle | Phase::Drain)
        })
        .await;
    }
    if let Some(fleet) = &ctl.fleet {
        if crate::sync::lock(&fleet.holding).is_some() {
            warn!("stopping: waiting for the fleet's next epoch to lift this member's hold");
            crate::poll::until_true(stop_by, Duration::from_millis(20), || {
                crate::sync::lock(&fleet.holding).is_none()
            })
            .await;
        }
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
    Ok(())
}

/// Waits (up to 10 s) until the control socket answers a request; false if its task ended
/// (it logs why when awaited) or it never did.
async fn wait_for_control(
    socket: &Path,
    control: &tokio::task::JoinHandle<std::io::Result<()>>,
) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline && !control.is_finished() {
        // A real request, answered: what `redirect status` will do.
        if let Ok(Some(_)) = control::call(socket, &control::Request::State, |_| {}).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    warn!(socket = %socket.display(), "the control socket does not answer; not telling systemd the controller is ready");
    false
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

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
