//! The steps of [`super::serve`] before it serves: each checks or changes one thing, and
//! everything that can be refused is refused before the kernel is touched.

use std::{net::SocketAddrV4, path::Path, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Config;
use crate::{
    control,
    controller::{Controller, Phase},
    cutover::recover,
    datapath::{self, BackendAddr, InstallReport, Maps, Spec},
    fleet::{self, Fleet, state::Committed},
    net,
};

/// The host's side, checked before anything changes: root, the kernel, the interfaces,
/// the VIP and SNAT addresses, the bpffs, and what a pinned datapath already holds.
pub(super) fn preflight(config: &Config) -> anyhow::Result<(Vec<(String, u32)>, Spec)> {
    net::require_root()?;
    net::require_kernel()?;
    let mut ifaces = Vec::new();
    for name in &config.ifaces {
        ifaces.push((name.clone(), net::ifindex(name)?));
    }
    if let datapath::Mode::Socket { cgroup } = &config.mode {
        datapath::socket::check_cgroup(cgroup)?;
        check_socket_vip(config.vip)?;
        check_uplinks(config)?;
    } else if config.fleet.is_none() {
        // A fleet member may be a keepalived standby: the VIP arrives when keepalived moves
        // it, and the datapath (already following the committed state) serves it from then.
        net::require_local("VIP", *config.vip.ip())?;
    } else if net::require_local("VIP", *config.vip.ip()).is_err() {
        warn!(vip = %config.vip, "the VIP is not on this host (yet): a standby member serves it once keepalived (or an operator) moves it here");
    }
    if let Some(ip) = config.snat_ip {
        net::require_local("SNAT address", ip)?;
    }
    let backend = |addr: SocketAddrV4| -> anyhow::Result<BackendAddr> {
        let snat = match config.snat_ip {
            Some(ip) => ip,
            None => net::route_source(*addr.ip())?,
        };
        Ok(BackendAddr { addr, snat })
    };
    net::require_bpffs(&config.pin_dir)?;
    let spec = Spec {
        vip: config.vip,
        source: backend(config.source)?,
        target: backend(config.target)?,
        snat_ports: config.snat_ports,
        drop_nonsyn_miss: config.drop_untracked,
        fib_every_packet: config.fib_every_packet,
        replace_backends: config.replace_backends,
        mode: config.mode.clone(),
    };
    // Refuse a different VIP or backends, or a mix of hooks, now, before sysctls or the kernel
    // are touched.
    datapath::one_hook(
        &datapath::PinDir(config.pin_dir.clone()),
        &ifaces,
        config.hook,
    )?;
    for c in datapath::check_adoption(&config.pin_dir, &spec)? {
        warn!(
            role = %c.role,
            old = %c.pinned,
            new = %c.requested,
            "--replace-backends: new connections for this role go to the new address; live ones stay on the old one"
        );
    }
    Ok((ifaces, spec))
}

/// Socket mode's VIP: not an address of this host (a connection held during a cutover keeps
/// the VIP as its destination until it is released, and one to a local address never leaves
/// by the uplink, whose egress hook holds and releases it), and routed.
fn check_socket_vip(vip: SocketAddrV4) -> anyhow::Result<()> {
    if net::require_local("VIP", *vip.ip()).is_ok() {
        anyhow::bail!(
            "--vip {vip} is an address of this host: in socket mode the VIP must be an address clients connect to that this host does not own (a connection held during a cutover leaves by the uplink toward it)"
        );
    }
    net::route_source(*vip.ip()).map_err(|e| {
        anyhow::anyhow!("--vip {vip} has no route on this host ({e}): in socket mode connections to it leave by the uplink, so route it (the default route does)")
    })?;
    Ok(())
}

/// Socket mode's uplinks: the hold parks a held connection's SYN, and the fence drops data to
/// the old server, on the way out of an `--iface`: traffic to each backend must leave by one,
/// and its frames must be Ethernet, which the hooks parse. Otherwise a held connection would
/// reach the backend it presumed before the flip, and a session's data would pass the fence.
fn check_uplinks(config: &Config) -> anyhow::Result<()> {
    for name in &config.ifaces {
        anyhow::ensure!(
            net::is_ethernet(name),
            "--iface {name} does not carry Ethernet frames (a tunnel or L3 device): socket mode's hooks on it could not see held connections"
        );
    }
    for (what, backend) in [("source", config.source), ("target", config.target)] {
        let via = net::route_iface(*backend.ip())?;
        anyhow::ensure!(
            via.as_ref().is_some_and(|i| config.ifaces.contains(i)),
            "traffic to the {what} ({backend}) leaves by {}, not by an --iface ({}): socket mode holds and fences connections on the way out of its uplinks; add that interface with --iface",
            via.as_deref().unwrap_or("an unknown interface"),
            config.ifaces.join(", ")
        );
    }
    Ok(())
}

/// Two controllers on one datapath would drain, GC and recover against each other.
pub(super) async fn refuse_a_second_controller(socket: &Path) -> anyhow::Result<()> {
    if tokio::net::UnixStream::connect(socket).await.is_ok() {
        anyhow::bail!(
            "another controller already serves {} (stop it first)",
            socket.display()
        );
    }
    Ok(())
}

/// Fails before touching the kernel if a server cannot be reached at all; but never refuses
/// to start when a cutover was interrupted (recovery must run, and it copes with an
/// unreachable server) or when a datapath pinned by an earlier run is serving clients (it
/// needs its controller, for GC, status and metrics, even while a server is down).
pub(super) async fn check_servers(config: &Config) -> anyhow::Result<()> {
    let Some(db) = &config.databases else {
        return Ok(());
    };
    let interrupted = crate::journal::read(&config.journal)
        .ok()
        .and_then(|e| crate::journal::unfinished(&e))
        .is_some();
    let serving = datapath::PinDir(config.pin_dir.clone()).is_pinned();
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
    Ok(())
}

/// Forwarding on, and the SNAT ports out of the host's ephemeral range; the values before
/// the first change are recorded for `detach` to restore.
pub(super) fn set_sysctls(config: &Config, ifaces: &[(String, u32)]) -> anyhow::Result<()> {
    let names: Vec<String> = ifaces.iter().map(|(n, _)| n.clone()).collect();
    let record = net::host_settings::HostSettings::new(&config.journal, &config.pin_dir)?;
    for change in net::ensure_forwarding(&names, &record)? {
        info!(sysctl = %change, record = %record.path().display(), "set");
    }
    match net::reserve_ports(config.snat_ports.0, config.snat_ports.1, &record) {
        Ok(Some(change)) => {
            info!(sysctl = %change, "set: the host's own connections stay out of the SNAT range");
        }
        Ok(None) => {}
        Err(e) => {
            warn!(error = %e, "could not reserve the SNAT ports; the host's own connections may collide with them");
        }
    }
    Ok(())
}

/// A fleet member that has read the committed state, before anything is attached.
pub(super) struct Joined {
    settings: fleet::Settings,
    client: etcd_client::Client,
    committed: Committed,
}

/// A fleet member reads the committed state before anything is attached, and applies it
/// whatever its pins say (the joining-host invariant). etcd unreachable: fail here, having
/// changed nothing; a datapath pinned by an earlier run keeps serving as it was.
pub(super) async fn join_fleet(config: &Config) -> anyhow::Result<Option<Joined>> {
    let Some(settings) = &config.fleet else {
        return Ok(None);
    };
    let pinned = if datapath::PinDir(config.pin_dir.clone()).is_pinned() {
        Maps::open(&config.pin_dir)?.active()?
    } else {
        None
    };
    let (client, committed) = fleet::join(settings, pinned).await?;
    info!(
        fleet = %settings.fleet,
        member = %settings.member,
        epoch = %committed.state.epoch,
        active = %committed.state.active,
        pinned = pinned.map_or("none", |r| r.name()),
        "joined the fleet: applying its committed backend before attaching"
    );
    Ok(Some(Joined {
        settings: settings.clone(),
        client,
        committed,
    }))
}

/// Loads (or adopts), attaches and pins the datapath, with the fleet's committed backend
/// if this host joined one; gives the program and its maps, opened from the pins.
pub(super) fn install(
    config: &Config,
    ifaces: &[(String, u32)],
    spec: &Spec,
    joined: Option<&Joined>,
) -> anyhow::Result<(InstallReport, Maps)> {
    let joining = joined.map(|j| datapath::Joining {
        active: j.committed.state.active,
        in_hold: j.committed.state.phase == fleet::state::FleetPhase::Hold,
    });
    let report =
        datapath::install_with_active(&config.pin_dir, ifaces, config.hook, spec, joining)?;
    if joining.is_some_and(|j| j.in_hold) {
        // Read back from the kernel's map, not assumed: what the first packets met.
        let cutover = Maps::open(&config.pin_dir)?.cutover()?;
        if cutover.flags & redirect_common::cutover::LAPSE_CLOSED != 0 {
            info!(
                fenced = cutover.fence_until_ns != 0,
                "the fleet is in a cutover's hold: new connections were held (and are dropped unless this member confirms the hold) from before the datapath attached"
            );
        }
    }
    info!(
        pin_dir = %config.pin_dir.display(),
        vip = %spec.vip,
        source = %spec.source.addr,
        source_snat = %spec.source.snat,
        target = %spec.target.addr,
        target_snat = %spec.target.snat,
        adopted = report.adopted_maps,
        attached = ?report.attached,
        upgraded = ?report.upgraded,
        databases = config.databases.as_ref().map_or("none (flips are immediate)".to_owned(), |d| format!("{:?} / {:?}", d.source, d.target)),
        "datapath ready"
    );
    let maps = Maps::open(&config.pin_dir)?;
    info!(active = %maps.active()?.map_or("none", |r| r.name()), "new connections go to this backend");
    Ok((report, maps))
}

/// Registers this host as a fleet member (its lease, its SNAT addresses).
pub(super) async fn register(
    joined: Option<Joined>,
    spec: &Spec,
    fleet_stop: &CancellationToken,
) -> anyhow::Result<Option<Arc<Fleet>>> {
    let Some(Joined {
        settings,
        client,
        committed,
    }) = joined
    else {
        return Ok(None);
    };
    let snat = vec![spec.source.snat.to_string(), spec.target.snat.to_string()];
    let fleet = Fleet::register(settings, client, committed, snat, fleet_stop.clone()).await?;
    info!(fleet = %fleet.settings.fleet, member = %fleet.settings.member, "registered as a fleet member");
    Ok(Some(Arc::new(fleet)))
}

/// systemd (Type=notify) starts the units ordered after this one once the datapath is
/// attached and the control socket answers: `redirect status` works from then on.
pub(super) async fn tell_systemd_when_ready(
    config: &Config,
    spec: &Spec,
    ctl: &Controller,
    control: &tokio::task::JoinHandle<std::io::Result<()>>,
) -> anyhow::Result<()> {
    if wait_for_control(&config.socket, control).await {
        crate::notify::ready(&format!(
            "serving {} -> {}",
            spec.vip,
            crate::sync::lock(&ctl.host.maps)
                .active()?
                .map_or("none", |r| r.name())
        ));
    }
    Ok(())
}

/// Waits (up to 10 s) until the control socket answers a request; false if its task ended
/// (it logs why when awaited) or it never did.
async fn wait_for_control(
    socket: &Path,
    control: &tokio::task::JoinHandle<std::io::Result<()>>,
) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // Every 10 ms: the socket is bound within milliseconds, and systemd waits on this.
    let answered = crate::poll::until(deadline, Duration::from_millis(10), || async {
        if control.is_finished() {
            return Err(());
        }
        // A real request, answered: what `redirect status` will do.
        Ok(matches!(
            control::ask(socket, control::protocol::StateRequest, |_| {}).await,
            Ok(Some(_))
        )
        .then_some(()))
    })
    .await;
    if matches!(answered, Ok(Some(()))) {
        return true;
    }
    warn!(socket = %socket.display(), "the control socket does not answer; not telling systemd the controller is ready");
    false
}

/// Under the cutover lock, so a flip that arrives meanwhile is refused as busy: finish or
/// undo what a previous controller left, prepare the barrier, then resume its drain in the
/// background (the controller serves status, metrics and GC meanwhile).
pub(super) async fn recover_and_prepare(ctl: &Arc<Controller>) {
    let busy = ctl.busy.clone().lock_owned().await;
    let pending = match recover::recover(ctl).await {
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
        prepare_the_barrier(ctl).await;
    }
    let Some(p) = pending else {
        ctl.set_phase(Phase::Idle);
        return;
    };
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
}

/// Bounded: a server that accepts but never answers must not keep the controller (and a
/// resumed drain) waiting.
async fn prepare_the_barrier(ctl: &Controller) {
    match tokio::time::timeout(Duration::from_secs(30), crate::cutover::prepare(ctl)).await {
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
