//! Fleets: several proxy hosts that follow one committed state kept in etcd (issue 10; the
//! design, and what is still to build, is in docs/fleet.md).
//!
//! What a member does today:
//! 1. [`join`]: connect to etcd, read the committed state (founding it at epoch 0 if this is
//!    the fleet's first member), before the datapath is attached, so a joining or restarting
//!    host never sends a new connection anywhere the fleet has not committed;
//! 2. register under a lease, kept alive ([`member`]);
//! 3. answer `status` with the fleet's members and committed epoch ([`Fleet::view`]).
//!
//! Nothing on the packet path depends on etcd: losing it changes nothing on the datapath.

pub mod commit;
pub mod follow;
pub mod hold;
pub mod keepalive;
pub mod lead;
pub mod member;
pub mod state;

use std::{path::PathBuf, time::Duration};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use self::{
    member::Member,
    state::{Committed, FleetState},
};
use crate::datapath::Role;

/// How long `run` waits for etcd before it gives up (it then fails, touching nothing).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `status` waits for etcd.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// `redirect run`'s fleet options. Without `--etcd`, the host runs alone, exactly as before.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Join a fleet coordinated through these etcd endpoints (comma-separated URLs, e.g.
    /// https://etcd1:2379,https://etcd2:2379). Requires --fleet.
    #[arg(long, value_delimiter = ',', requires = "fleet")]
    pub etcd: Vec<String>,
    /// The fleet's name: every proxy host in front of the same database uses the same one.
    #[arg(long, requires = "etcd")]
    pub fleet: Option<String>,
    /// This member's name in the fleet (default: the host name and the VIP).
    #[arg(long, requires = "etcd")]
    pub fleet_member: Option<String>,
    /// etcd user (its password: --etcd-password-file, else REDIRECT_ETCD_PASSWORD).
    #[arg(long, requires = "etcd")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the etcd servers' certificates; enables TLS.
    #[arg(long, requires = "etcd")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long, requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("{key} in etcd is not a record this version understands: {source}")]
    BadRecord {
        key: String,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error("this controller is not a fleet member (run --etcd)")]
    NotAMember,
    /// `fleet forget` names the member that was asked: it is live by definition.
    #[error(
        "{0} is this controller: stop it and detach its datapath, then forget it from another member"
    )]
    ForgetSelf(String),
    /// etcd did not answer in time: one line, with the endpoints, never a raw gRPC dump.
    #[error(
        "etcd is unreachable at {endpoints} ({why}); check its quorum with `etcdctl endpoint health`"
    )]
    Unreachable { endpoints: String, why: String },
    /// Members on the roster whose keys are not live: they cannot be fenced, so no cutover
    /// can pass (a member that lost its lease rejoins by itself once etcd answers).
    #[error("fleet member(s) {} not live (cut off from etcd, down, or rejoining); a cutover needs every rostered member: wait for them to rejoin (`redirect status`), or `redirect fleet forget` a host that is gone for good", .0.join(", "))]
    NotLive(Vec<String>),
}

/// Why an etcd request failed, in a few words: gRPC's own message, not its debug dump.
#[must_use]
pub fn brief(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) if s.code() as i32 == GRPC_UNAVAILABLE => {
            "no etcd server answered".to_owned()
        }
        etcd_client::Error::GRpcStatus(s) => s.message().to_owned(),
        etcd_client::Error::TransportError(_) => "could not connect".to_owned(),
        other => other.to_string(),
    }
}

/// Runs one etcd request, again (up to 5 times) when it never reached a server.
/// etcd-client's balanced channel sends each request to one endpoint and fails it when that
/// endpoint is down instead of trying another, so with one node of three down, a third of all
/// requests would fail. Retrying is safe: reads and puts are idempotent, and state changes are
/// compare-and-swap transactions.
pub async fn retry<T, F, Fut>(op: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    // 5 tries, 20 ms apart: a request that never reached a server failed at once, and the
    // next one may go to another endpoint.
    crate::poll::retry_times(5, Duration::from_millis(20), unreached, op).await
}

/// The request did not reach a server that could answer it (connection refused or reset,
/// endpoint unavailable).
fn unreached(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        // gRPC's UNAVAILABLE (14); etcd-client does not re-export tonic's `Code`.
        etcd_client::Error::GRpcStatus(s) => s.code() as i32 == GRPC_UNAVAILABLE,
        _ => false,
    }
}

const GRPC_UNAVAILABLE: i32 = 14;

/// The etcd keys of a fleet (docs/fleet.md has the whole layout).
pub mod keys {
    #[must_use]
    pub fn root(fleet: &str) -> String {
        format!("/redirect/{fleet}/")
    }
    #[must_use]
    pub fn state(fleet: &str) -> String {
        format!("{}state", root(fleet))
    }
    #[must_use]
    pub fn members(fleet: &str) -> String {
        format!("{}members/", root(fleet))
    }
    #[must_use]
    pub fn member(fleet: &str, id: &str) -> String {
        format!("{}{id}", members(fleet))
    }
    /// Every member that ever joined and was not forgotten: no lease, so a member whose
    /// controller is down, or cut off from etcd, is still one the leader must hear from.
    #[must_use]
    pub fn roster(fleet: &str) -> String {
        format!("{}roster/", root(fleet))
    }
    #[must_use]
    pub fn enrolled(fleet: &str, id: &str) -> String {
        format!("{}{id}", roster(fleet))
    }
    /// The etcd election whose leader runs the fleet's cutovers.
    #[must_use]
    pub fn election(fleet: &str) -> String {
        format!("{}leader/", root(fleet))
    }
    #[must_use]
    pub fn acks(fleet: &str, epoch: super::state::Epoch) -> String {
        format!("{}acks/{epoch}/", root(fleet))
    }
    #[must_use]
    pub fn ack(fleet: &str, epoch: super::state::Epoch, member: &str) -> String {
        format!("{}{member}", acks(fleet, epoch))
    }
}

/// A fleet name goes into etcd keys: keep it to characters that cannot change the key's shape.
fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')),
        "--{what} {name:?}: use letters, digits, '-', '_', '.' or ':' (it becomes part of etcd keys)"
    );
    Ok(())
}

/// Checks the options and reads the secrets, before anything connects or touches the kernel.
/// `None` without `--etcd`.
pub fn settings(opts: &Options, vip: std::net::SocketAddrV4) -> anyhow::Result<Option<Settings>> {
    if opts.etcd.is_empty() {
        return Ok(None);
    }
    let fleet = opts
        .fleet
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--etcd needs --fleet NAME"))?;
    check_name("fleet", &fleet)?;
    let member = match &opts.fleet_member {
        Some(m) => m.clone(),
        None => format!("{}-{vip}", hostname()),
    };
    check_name("fleet-member", &member)?;
    // HTTP/2 keep-alives notice a dead path in seconds, so the state watch breaks and is
    // re-established (catching up on missed epochs) instead of hanging on a dead connection.
    let mut connect = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    if let Some(user) = &opts.etcd_user {
        let password = match &opts.etcd_password_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading --etcd-password-file {}: {e}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            None => std::env::var("REDIRECT_ETCD_PASSWORD").map_err(|_| {
                anyhow::anyhow!(
                    "--etcd-user {user} needs a password: --etcd-password-file FILE or REDIRECT_ETCD_PASSWORD (never on the command line)"
                )
            })?,
        };
        connect = connect.with_user(user.clone(), password);
    }
    if let Some(ca) = &opts.etcd_ca {
        let read = |what: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("reading --{what} {}: {e}", p.display()))
        };
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("etcd-ca", ca)?));
        if let (Some(cert), Some(key)) = (&opts.etcd_cert, &opts.etcd_key) {
            tls = tls.identity(Identity::from_pem(
                read("etcd-cert", cert)?,
                read("etcd-key", key)?,
            ));
        }
        connect = connect.with_tls(tls);
        anyhow::ensure!(
            opts.etcd.iter().all(|e| e.starts_with("https://")),
            "--etcd-ca is given but an --etcd endpoint is not https:// ({})",
            opts.etcd.join(",")
        );
    }
    Ok(Some(Settings {
        endpoints: opts.etcd.clone(),
        fleet,
        member,
        vip: vip.to_string(),
        connect,
    }))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "host".into(), |h| h.trim().to_owned())
}

/// Checked fleet options.
#[derive(Clone)]
pub struct Settings {
    pub endpoints: Vec<String>,
    pub fleet: String,
    pub member: String,
    pub vip: String,
    connect: ConnectOptions,
}

impl std::fmt::Debug for Settings {
    // The connect options hold the password: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("endpoints", &self.endpoints)
            .field("fleet", &self.fleet)
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

/// Connects and reads (or founds) the committed state: step 1 of a member's start, before the
/// datapath is attached. `pinned` is what the local datapath holds, if anything: it founds a
/// fleet that has no state yet, and is overruled by one that has.
pub async fn join(
    settings: &Settings,
    pinned: Option<Role>,
) -> anyhow::Result<(Client, Committed)> {
    let unreachable = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "cannot reach etcd at {} ({e}): a fleet member must read the fleet's committed state before it attaches, so nothing was changed on this host. Check the endpoints and that etcd has quorum (etcdctl endpoint health), then start again",
            settings.endpoints.join(",")
        )
    };
    let attempt = async {
        let mut client =
            Client::connect(&settings.endpoints, Some(settings.connect.clone())).await?;
        let committed = state::found_or_read(
            &mut client,
            &settings.fleet,
            pinned.unwrap_or(Role::Source),
            &settings.member,
        )
        .await?;
        // On the roster before the datapath attaches: a cutover that begins from now on waits
        // for this member, or (if its acknowledgements were counted already) its commit is
        // refused by the roster guard. Enrolled later, a host that attached just before a
        // hold would serve the old server unfenced past the barrier.
        let me = member::Enrolled {
            id: settings.member.clone(),
            vip: settings.vip.clone(),
            joined_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            instance: member::instance(),
        };
        member::enroll(&mut client, &settings.fleet, &me).await?;
        Ok::<_, FleetError>((client, committed))
    };
    match tokio::time::timeout(CONNECT_TIMEOUT * 2, attempt).await {
        Ok(Ok(joined)) => Ok(joined),
        Ok(Err(FleetError::Refused(why))) => {
            Err(anyhow::anyhow!("{why}; nothing was changed on this host"))
        }
        Ok(Err(e)) => Err(unreachable(&e)),
        Err(_) => Err(unreachable(&format!(
            "no answer within {:?}",
            CONNECT_TIMEOUT * 2
        ))),
    }
}

/// A joined member, kept by the controller: for `status`, for following the committed
/// state ([`follow`]) and for committing a fleet flip ([`commit`]).
pub struct Fleet {
    pub settings: Settings,
    client: Client,
    /// The committed state this member's datapath applied, and the etcd revision it came at.
    pub applied: std::sync::Mutex<(FleetState, i64)>,
    /// This member's record.
    pub me: std::sync::Arc<std::sync::Mutex<Member>>,
    /// Its lease and whether etcd confirms it live (the keep-alive renews or replaces it).
    pub standing: std::sync::Arc<member::Standing>,
    /// The keep-alive task: it revokes the lease when `shutdown` fires (see [`Fleet::leave`]).
    keep_alive: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The hold of a fleet cutover this member applied, until the next epoch lifts it.
    pub holding: std::sync::Mutex<Option<hold::MemberHold>>,
}

/// What `status` shows about the fleet.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct View {
    pub fleet: String,
    pub member: String,
    pub endpoints: Vec<String>,
    pub applied_epoch: state::Epoch,
    pub applied_active: Role,
    /// The committed state as etcd has it now (`None` when etcd did not answer).
    #[serde(default)]
    pub committed: Option<FleetState>,
    #[serde(default)]
    pub members: Vec<Member>,
    /// Every member a cutover must hear from: the live ones and those whose lease lapsed
    /// (down, or cut off from etcd) until an operator forgets them.
    #[serde(default)]
    pub roster: Vec<member::Enrolled>,
    /// This member's key exists under its current lease, as etcd confirmed within the last
    /// few seconds. False while it is cut off from etcd or has lost its lease: the leader
    /// then cannot hear from it, so no cutover can pass.
    pub live: bool,
    /// This member is live and applies the committed epoch (false, or unknown, while etcd is
    /// away).
    pub in_sync: bool,
    /// Why etcd could not be read, if it could not.
    #[serde(default)]
    pub etcd_error: Option<String>,
}

impl Fleet {
    /// Registers this member under a lease and keeps it alive until `shutdown`.
    pub async fn register(
        settings: Settings,
        mut client: Client,
        applied: Committed,
        snat: Vec<String>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let me = Member {
            id: settings.member.clone(),
            vip: settings.vip.clone(),
            applied_epoch: applied.state.epoch,
            applied_active: applied.state.active,
            joined_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            applied_at_ms: 0,
            snat,
            instance: member::instance(),
        };
        let lease = tokio::time::timeout(
            CONNECT_TIMEOUT,
            member::register(&mut client, &settings.fleet, &me),
        )
        .await
        .map_err(|_| anyhow::anyhow!("etcd did not answer the member registration"))??;
        let me = std::sync::Arc::new(std::sync::Mutex::new(me));
        let standing = std::sync::Arc::new(member::Standing::new(lease));
        let keep_alive = tokio::spawn(member::keep_membership(
            client.clone(),
            settings.fleet.clone(),
            me.clone(),
            standing.clone(),
            shutdown,
        ));
        Ok(Self {
            settings,
            client,
            applied: std::sync::Mutex::new((applied.state, applied.mod_revision)),
            me,
            standing,
            keep_alive: std::sync::Mutex::new(Some(keep_alive)),
            holding: std::sync::Mutex::new(None),
        })
    }

    /// The committed state this member's datapath applies.
    pub fn applied(&self) -> FleetState {
        crate::sync::lock(&self.applied).0.clone()
    }

    /// The etcd revision of [`Fleet::applied`].
    pub fn applied_revision(&self) -> i64 {
        crate::sync::lock(&self.applied).1
    }

    /// A handle on etcd (cheap: clients share one channel).
    #[must_use]
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The lease this member's keys live under now.
    pub fn lease(&self) -> i64 {
        self.standing.lease()
    }

    /// This member's key exists under its current lease, as etcd confirmed lately.
    pub fn live(&self) -> bool {
        self.standing.live()
    }

    /// Before anything that changes the fleet (a cutover's preflight, an immediate fleet
    /// flip): etcd answers a read of the committed state within `timeout`, and every member on
    /// the roster is live, this one included (waited for, within the same `timeout`, so a
    /// flip asked just as etcd comes back finds the members rejoined). Changes nothing.
    pub async fn ready(&self, timeout: Duration) -> Result<(), FleetError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let unreachable = |why: String| FleetError::Unreachable {
            endpoints: self.settings.endpoints.join(","),
            why,
        };
        let mut client = self.client.clone();
        let fleet = &self.settings.fleet;
        // The members found away at the last answer: what a deadline that passes while
        // waiting for them reports (etcd did answer).
        let mut last_away: Option<Vec<String>> = None;
        let mut last_error: Option<String> = None;
        // Not a `crate::poll` wait: each look is itself cut off at the deadline, the next
        // one starts only if a whole interval fits before it, and what running out reports
        // depends on how the last look ended (members away, or etcd's last error).
        loop {
            let read = async {
                state::read(&mut client, fleet).await?;
                let (roster, _) = member::roster(&mut client, fleet).await?;
                let live = member::list(&mut client, fleet).await?;
                Ok::<_, FleetError>(
                    roster
                        .into_iter()
                        .map(|m| m.id)
                        .filter(|id| !live.iter().any(|l| &l.id == id))
                        .collect::<Vec<_>>(),
                )
            };
            let mut away = match (tokio::time::timeout_at(deadline, read).await, &last_away) {
                (Ok(Ok(away)), _) => away,
                // A leader election or a dead endpoint: try again until the deadline.
                (Ok(Err(FleetError::Etcd(e))), _)
                    if tokio::time::Instant::now() + Duration::from_millis(250) < deadline =>
                {
                    last_error = Some(brief(&e));
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                (Ok(Err(FleetError::Etcd(e))), _) => return Err(unreachable(brief(&e))),
                (Ok(Err(other)), _) => return Err(other),
                (Err(_), Some(away)) => return Err(FleetError::NotLive(away.clone())),
                (Err(_), None) => {
                    return Err(unreachable(last_error.map_or_else(
                        || format!("no answer within {timeout:?}"),
                        |e| format!("{e}; no answer within {timeout:?}"),
                    )));
                }
            };
            if !self.live() && !away.contains(&self.settings.member) {
                away.push(self.settings.member.clone());
            }
            away.sort();
            if away.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() + Duration::from_millis(250) >= deadline {
                return Err(FleetError::NotLive(away));
            }
            last_away = Some(away);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// After `shutdown`: waits (bounded) for the keep-alive task to revoke the lease, so a
    /// cleanly stopped member leaves the fleet at once rather than after the lease's TTL.
    pub async fn leave(&self) {
        let task = crate::sync::lock(&self.keep_alive).take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
    }

    /// Every member's SNAT addresses (this one's included), as their records say; empty
    /// if etcd does not answer within [`STATUS_TIMEOUT`].
    pub async fn members_snat(&self) -> Vec<String> {
        let mut client = self.client.clone();
        let fleet = &self.settings.fleet;
        match tokio::time::timeout(STATUS_TIMEOUT, member::list(&mut client, fleet)).await {
            Ok(Ok(members)) => members.into_iter().flat_map(|m| m.snat).collect(),
            _ => Vec::new(),
        }
    }

    /// The fleet as etcd has it now, bounded by [`STATUS_TIMEOUT`].
    pub async fn view(&self) -> View {
        let mut client = self.client.clone();
        let fleet = &self.settings.fleet;
        let read = async {
            let committed = state::read(&mut client, fleet).await?;
            let members = member::list(&mut client, fleet).await?;
            let (roster, _) = member::roster(&mut client, fleet).await?;
            Ok::<_, FleetError>((committed, members, roster))
        };
        let (committed, members, roster, etcd_error) =
            match tokio::time::timeout(STATUS_TIMEOUT, read).await {
                Ok(Ok((c, m, r))) => (c.map(|c| c.state), m, r, None),
                Ok(Err(e)) => (None, Vec::new(), Vec::new(), Some(e.to_string())),
                Err(_) => (
                    None,
                    Vec::new(),
                    Vec::new(),
                    Some(format!("no answer within {STATUS_TIMEOUT:?}")),
                ),
            };
        let applied = self.applied();
        let live = self.live();
        View {
            fleet: fleet.clone(),
            member: self.settings.member.clone(),
            endpoints: self.settings.endpoints.clone(),
            applied_epoch: applied.epoch,
            applied_active: applied.active,
            live,
            in_sync: live
                && committed
                    .as_ref()
                    .is_some_and(|c| c.epoch == applied.epoch && c.active == applied.active),
            committed,
            members,
            roster,
            etcd_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(etcd: &[&str]) -> Options {
        Options {
            etcd: etcd.iter().map(|s| (*s).to_owned()).collect(),
            fleet: Some("prod-db".into()),
            fleet_member: None,
            etcd_user: None,
            etcd_password_file: None,
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
        }
    }

    fn vip() -> std::net::SocketAddrV4 {
        "10.0.0.5:5432".parse().unwrap()
    }

    #[test]
    fn without_etcd_nothing_changes() {
        assert!(settings(&opts(&[]), vip()).unwrap().is_none());
    }

    #[test]
    fn names_that_would_change_the_keys_are_refused() {
        let mut o = opts(&["http://e1:2379"]);
        o.fleet = Some("a/b".into());
        let e = settings(&o, vip()).unwrap_err().to_string();
        assert!(e.contains("--fleet \"a/b\""), "{e}");
        o.fleet = Some("prod-db".into());
        o.fleet_member = Some(String::new());
        assert!(settings(&o, vip()).is_err());
    }

    #[test]
    fn the_password_comes_from_a_file_or_the_environment_never_argv() {
        let mut o = opts(&["http://e1:2379"]);
        o.etcd_user = Some("redirect".into());
        // SAFETY: this test alone reads or writes this variable.
        unsafe { std::env::remove_var("REDIRECT_ETCD_PASSWORD") };
        let e = settings(&o, vip()).unwrap_err().to_string();
        assert!(e.contains("--etcd-password-file"), "{e}");
        let file = std::env::temp_dir().join(format!("etcd-pw-{}", std::process::id()));
        std::fs::write(&file, "s3cret\n").unwrap();
        o.etcd_password_file = Some(file.clone());
        let s = settings(&o, vip()).unwrap().unwrap();
        assert!(
            !format!("{s:?}").contains("s3cret"),
            "the password is never printed"
        );
        std::fs::remove_file(&file).unwrap();
        let e = settings(&o, vip()).unwrap_err().to_string();
        assert!(e.contains("reading --etcd-password-file"), "{e}");
    }

    #[test]
    fn tls_needs_https_endpoints() {
        let mut o = opts(&["http://e1:2379"]);
        let ca = std::env::temp_dir().join(format!("etcd-ca-{}", std::process::id()));
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        o.etcd_ca = Some(ca.clone());
        let e = settings(&o, vip()).unwrap_err().to_string();
        assert!(e.contains("not https://"), "{e}");
        o.etcd = vec!["https://e1:2379".into()];
        assert!(settings(&o, vip()).is_ok());
        std::fs::remove_file(&ca).unwrap();
    }

    #[test]
    fn the_default_member_name_is_the_host_and_the_vip() {
        let s = settings(&opts(&["http://e1:2379"]), vip())
            .unwrap()
            .unwrap();
        assert!(s.member.ends_with("-10.0.0.5:5432"), "{}", s.member);
    }
}
