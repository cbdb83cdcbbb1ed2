//! The controller's shared state: this host, the two servers, the journal's path, the fleet
//! this host belongs to, and where a cutover is. The cutover ([`crate::cutover`]), the
//! control socket, `/metrics` and the snapshot all work on one [`Controller`]; it knows how
//! to reach and measure the servers, not how to cut over between them.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    datapath::{self, Role},
    journal::{self, Step},
    pg::{
        Dsn, PgError,
        lag::{self, ReplicaLag, Replication, Watch},
    },
    sync::lock,
};

/// The name of the reverse publication, slot and subscription used for lossless rollback.
pub const REVERSE: &str = "redirect_reverse";

/// Why the controller could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("no databases configured: start `redirect run` with --source-dsn and --target-dsn")]
    NoDatabases,
    #[error("datapath: {0}")]
    Datapath(#[from] datapath::DatapathError),
    #[error(transparent)]
    Pg(#[from] PgError),
}

/// What `/metrics` keeps of the last cutover.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    /// Each journaled step and how long it took since its start, in order.
    pub steps: Vec<(Step, f64)>,
    /// From the fence to the flip: the longest a write could pause.
    pub write_pause_ms: f64,
}

/// Where a cutover is; `/metrics` and error messages show it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Idle,
    Preflight,
    Hold,
    Fence,
    Barrier,
    Sequences,
    Reverse,
    Promote,
    Flip,
    Release,
    Drain,
    Aborting,
    Recovering,
    Finishing,
}

impl Phase {
    pub const ALL: [Self; 14] = [
        Self::Idle,
        Self::Preflight,
        Self::Hold,
        Self::Fence,
        Self::Barrier,
        Self::Sequences,
        Self::Reverse,
        Self::Promote,
        Self::Flip,
        Self::Release,
        Self::Drain,
        Self::Aborting,
        Self::Recovering,
        Self::Finishing,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Preflight => "preflight",
            Self::Hold => "hold",
            Self::Fence => "fence",
            Self::Barrier => "barrier",
            Self::Sequences => "sequences",
            Self::Reverse => "reverse",
            Self::Promote => "promote",
            Self::Flip => "flip",
            Self::Release => "release",
            Self::Drain => "drain",
            Self::Aborting => "aborting",
            Self::Recovering => "recovering",
            Self::Finishing => "finishing",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How to reach the two servers.
#[derive(Clone, Debug)]
pub struct Databases {
    pub source: Dsn,
    pub target: Dsn,
    pub replication: Replication,
    /// The forward subscription on the target in the DSN's database (logical).
    pub subscription: Option<String>,
    /// Forward subscriptions named for other databases (`--subscription DB=NAME`).
    pub subscriptions: std::collections::BTreeMap<String, String>,
    /// Which databases the cutover covers (`--databases`, `--exclude-databases`).
    pub scope: lag::Scope,
    /// How the source reaches the target for reverse replication (default: the target DSN).
    pub reverse_conninfo: Option<String>,
    pub query_timeout: Duration,
}

/// The controller state a cutover works on, shared with the control socket and `/metrics`.
pub struct Controller {
    /// This host's datapath.
    pub host: Arc<crate::host::Host>,
    pub db: Option<Databases>,
    pub journal_path: PathBuf,
    /// Held for the whole of a cutover, a recovery or a `finish`.
    pub busy: Arc<tokio::sync::Mutex<()>>,
    pub phase: Mutex<Phase>,
    pub last_lag: Mutex<Option<ReplicaLag>>,
    /// The step timings and write pause of the last cutover, for `/metrics`.
    pub last_cutover: Mutex<Option<Timings>>,
    /// What the last recovery of an interrupted cutover did.
    pub last_recovery: Mutex<Option<String>>,
    /// The last conntrack GC pass: `/metrics` reads port use from it instead of walking maps.
    pub last_gc: Mutex<Option<crate::conntrack::GcReport>>,
    /// The fleet this host is a member of (`run --etcd`); `None`: a host on its own.
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
}

/// Puts the controller back to idle however a cutover ends (an error, a `?`, a panic), so a
/// failed step can never wedge later cutovers.
pub struct PhaseGuard<'a>(pub &'a Controller);

impl Drop for PhaseGuard<'_> {
    fn drop(&mut self) {
        self.0.set_phase(Phase::Idle);
    }
}

impl Controller {
    /// How to reach the two servers; `run` without `--source-dsn`/`--target-dsn` has none.
    pub fn databases(&self) -> Result<&Databases, ControllerError> {
        self.db.as_ref().ok_or(ControllerError::NoDatabases)
    }

    pub fn set_phase(&self, p: Phase) {
        *lock(&self.phase) = p;
    }

    #[must_use]
    pub fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    pub fn dsn(&self, role: Role) -> Result<&Dsn, ControllerError> {
        let db = self.databases()?;
        Ok(match role {
            Role::Source => &db.source,
            Role::Target => &db.target,
        })
    }

    /// The backend new connections go to now.
    pub fn active(&self) -> Result<Role, ControllerError> {
        Ok(lock(&self.host.maps).active()?.unwrap_or(Role::Source))
    }

    /// The replication that carries `to.other()`'s writes to `to`: the forward subscription
    /// (configured, else the one an earlier cutover journaled, else discovered), or the
    /// reverse one set up by an earlier cutover.
    pub fn watch_for(&self, to: Role) -> Result<Watch, ControllerError> {
        let db = self.databases()?;
        let home = db.source.database().to_owned();
        Ok(match to {
            Role::Target => Watch {
                replication: db.replication,
                subscription: self.forward_subscription(),
                named: db.subscriptions.clone(),
                home,
                reverse: false,
                scope: db.scope.clone(),
            },
            Role::Source => Watch {
                replication: Replication::Logical,
                subscription: Some(REVERSE.to_owned()),
                named: std::collections::BTreeMap::new(),
                home,
                reverse: true,
                scope: db.scope.clone(),
            },
        })
    }

    /// The forward subscription's name if configured or remembered from the journal.
    #[must_use]
    pub fn forward_subscription(&self) -> Option<String> {
        self.db
            .as_ref()
            .and_then(|d| d.subscription.clone())
            .or_else(|| {
                journal::read(&self.journal_path)
                    .ok()
                    .and_then(|e| journal::known_subscription(&e, Role::Source, Role::Target))
                    .map(|(s, _)| s)
            })
    }

    /// The forward subscription of `database`: named for it (`--subscription DB=NAME`), the
    /// DSNs' database's [`Self::forward_subscription`], or the one an earlier cutover stopped.
    #[must_use]
    pub fn forward_subscription_for(&self, database: &str) -> Option<String> {
        let db = self.db.as_ref()?;
        let home = db.source.database();
        if let Some(s) = db.subscriptions.get(database) {
            return Some(s.clone());
        }
        if database == home
            && let Some(s) = self.forward_subscription()
        {
            return Some(s);
        }
        journal::read(&self.journal_path)
            .ok()
            .and_then(|e| journal::known_subscription_in(&e, database, home))
    }

    /// Every database on the two servers and what a cutover to the backend that is not
    /// active now would do with it (what its preflight finds).
    pub async fn discover(&self) -> Result<Vec<crate::pg::cluster::Database>, ControllerError> {
        let db = self.databases()?;
        let from = self.active()?;
        let to = from.other();
        let (old, new) = (
            self.dsn(from)?.connect().await?,
            self.dsn(to)?.connect().await?,
        );
        Ok(crate::pg::cluster::discover(
            self.dsn(from)?,
            &old,
            &new,
            &self.watch_for(to)?,
            db.query_timeout,
        )
        .await?)
    }

    /// Lag of the replication feeding the backend that is not active now.
    pub async fn measure_lag(&self) -> Result<ReplicaLag, ControllerError> {
        let db = self.databases()?;
        let from = self.active()?;
        let to = from.other();
        let (publisher, subscriber) = (
            self.dsn(from)?.connect().await?,
            self.dsn(to)?.connect().await?,
        );
        let lag = lag::measure(
            &publisher,
            &subscriber,
            &self.watch_for(to)?,
            db.query_timeout,
        )
        .await?;
        *lock(&self.last_lag) = Some(lag.clone());
        Ok(lag)
    }

    /// How long a statement on either server may take.
    #[must_use]
    pub fn query_timeout(&self) -> Duration {
        self.db
            .as_ref()
            .map_or(Duration::from_secs(5), |d| d.query_timeout)
    }
}
