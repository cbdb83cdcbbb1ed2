//! `redirect run`: its flags, checked into a [`Config`], then [`crate::serve`] until SIGINT
//! or SIGTERM. The datapath outlives this process.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use super::PortRange;
use crate::datapath::Role;
use crate::{
    conntrack::Timeouts,
    controller::Databases,
    daemon::Config,
    datapath::Hook,
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
    /// Interface that receives client or backend traffic (repeat for each). In socket mode:
    /// the uplink(s) this host reaches the VIP and the backends by.
    #[arg(long = "iface", required = true)]
    pub ifaces: Vec<String>,
    /// The address clients connect to. Proxy mode: local to this host. Socket mode: not
    /// local, and routed (by the default route, say) out of an --iface.
    #[arg(long, value_parser = ipv4_address)]
    pub vip: SocketAddrV4,
    /// `proxy`: translate packets on --iface for clients on other hosts. `socket` (zero-hop):
    /// redirect `connect()` of this host's own processes in --cgroup, so their connections go
    /// straight to the backend and no packet of them is translated.
    #[arg(long, value_enum, default_value = "proxy")]
    pub mode: ModeArg,
    /// Socket mode: the cgroup v2 directory whose processes (and every cgroup below it) are
    /// redirected. Default: the root of the cgroup v2 hierarchy (/sys/fs/cgroup, or
    /// /sys/fs/cgroup/unified on a hybrid host), so every process on this host; a systemd
    /// slice (/sys/fs/cgroup/app.slice) or a pod's directory narrows it.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
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

/// An IPv4 address and port, with a pointer for the IPv6 one a user may try.
fn ipv4_address(s: &str) -> Result<SocketAddrV4, String> {
    if let Ok(a) = s.parse::<SocketAddrV4>() {
        return Ok(a);
    }
    if s.parse::<std::net::SocketAddrV6>().is_ok() {
        return Err(
            "an IPv6 VIP is not supported yet: give an IPv4 address:port (dual-stack clients reach it as [::ffff:a.b.c.d]:port, which socket mode redirects too)".into(),
        );
    }
    Err("expected an IPv4 address and port, such as 10.0.0.10:5432".into())
}

/// `run --mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    Proxy,
    Socket,
}

impl Args {
    fn mode(&self) -> anyhow::Result<crate::datapath::Mode> {
        Ok(match self.mode {
            ModeArg::Proxy => {
                anyhow::ensure!(
                    self.cgroup.is_none(),
                    "--cgroup is for --mode socket (proxy mode redirects packets, not processes)"
                );
                crate::datapath::Mode::Proxy
            }
            ModeArg::Socket => crate::datapath::Mode::Socket {
                cgroup: match &self.cgroup {
                    Some(path) => path.clone(),
                    None => crate::datapath::socket::default_cgroup()?,
                },
            },
        })
    }

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
        Role::Source,
        source,
        &PasswordSources {
            file: args.source_password_file.clone(),
            env: Some("REDIRECT_SOURCE_PASSWORD".into()),
        },
    )?;
    let target = Dsn::parse(
        Role::Target,
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

/// Socket mode hooks the controller's own process too (its cgroup is usually covered): a DSN
/// naming the VIP would have its sessions redirected, held and fenced like a client's, and
/// after the flip its "source" queries would run on the target.
fn check_dsn_hosts(args: &Args) -> anyhow::Result<()> {
    if args.mode != ModeArg::Socket {
        return Ok(());
    }
    let vip = args.vip.ip().to_string();
    for (flag, dsn) in [
        ("--source-dsn", &args.source_dsn),
        ("--target-dsn", &args.target_dsn),
    ] {
        let Some(dsn) = dsn else { continue };
        let names_vip = crate::pg::split_pairs(dsn).is_ok_and(|pairs| {
            pairs
                .iter()
                .any(|(k, v)| (k == "host" || k == "hostaddr") && v.split(',').any(|h| h == vip))
        });
        anyhow::ensure!(
            !names_vip,
            "{flag} names the VIP {vip}: the controller must reach each server at its own address (the VIP is what socket mode redirects)"
        );
    }
    Ok(())
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
    checked(args).map(drop)
}

/// What [`check_settings`] checks, with what it read: the servers and the fleet settings.
fn checked(args: &Args) -> anyhow::Result<(Option<Databases>, Option<crate::fleet::Settings>)> {
    check_addresses(args)?;
    check_dsn_hosts(args)?;
    let fleet = crate::fleet::settings(&args.fleet, args.vip)?;
    if args.mode == ModeArg::Socket && fleet.is_some() {
        // Each member would have to fence its own host's sessions, which the fleet protocol
        // does not ask of members yet: refused rather than fence only the leader's.
        anyhow::bail!(
            "--mode socket does not run as a fleet member yet: run it on one host, or use proxy mode for a fleet"
        );
    }
    Ok((databases(args)?, fleet))
}

/// `redirect run`'s flags, checked, as the daemon's [`Config`].
fn config(args: Args, pin_dir: &Path, socket: &Path, journal: &Path) -> anyhow::Result<Config> {
    // The same checks as `config check`: what it accepts, `run` starts with.
    let (databases, fleet) = checked(&args)?;
    let mode = args.mode()?;
    Ok(Config {
        pin_dir: pin_dir.to_path_buf(),
        socket: socket.to_path_buf(),
        journal: journal.to_path_buf(),
        timeouts: args.timeouts(),
        ifaces: args.ifaces,
        vip: args.vip,
        source: args.source,
        target: args.target,
        snat_ip: args.snat_ip,
        snat_ports: (args.snat_ports.lo, args.snat_ports.hi),
        mode,
        hook: args.hook,
        drop_untracked: args.drop_untracked,
        fib_every_packet: args.fib_every_packet,
        replace_backends: args.replace_backends,
        set_sysctls: !args.no_sysctl,
        gc_interval: args.gc_interval,
        once: args.once,
        databases,
        lag_interval: args.lag_interval,
        metrics_addr: args.metrics_addr,
        fleet,
    })
}

/// Serves until SIGINT or SIGTERM.
pub async fn run(args: Args, pin_dir: &Path, socket: &Path, journal: &Path) -> anyhow::Result<()> {
    let config = config(args, pin_dir, socket, journal)?;
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            shutdown.cancel();
        }
    });
    Box::pin(crate::serve(config, shutdown)).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
