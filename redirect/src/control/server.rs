//! The control socket: a root-only Unix socket on which the running controller serves the CLI
//! (`flip`, `lag`, `status`, `status --watch`, `verify`). One JSON request per connection; the
//! answer is JSON lines: `{"progress": "..."}` while a long step runs, then `{"ok": ...}` or
//! `{"error": "..."}`.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    controller::Controller,
    cutover::{
        FlipRequest,
        guardrails::{Guardrail, fix::Identity},
    },
    datapath::Role,
};

/// A transaction open longer than this on the old server blocks a cutover (`long-transaction`):
/// long enough that no OLTP transaction trips it, short enough that a batch job does.
pub const DEFAULT_MAX_TRANSACTION_AGE: Duration = Duration::from_secs(300);

/// Where the CLI finds the controller by default.
pub const DEFAULT_SOCKET: &str = "/run/redirect/control.sock";

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Flip {
        to: Role,
        max_lag_bytes: u64,
        max_lag_time_ms: u64,
        timeout_ms: u64,
        drain_timeout_ms: u64,
        dry_run: bool,
        force: bool,
        /// Guardrails allowed for this cutover (`--allow`).
        #[serde(default)]
        allow: Vec<Guardrail>,
        /// `--max-transaction-age`; absent: the default.
        #[serde(default)]
        max_transaction_age_ms: Option<u64>,
        /// `--etcd-timeout`; absent: the default.
        #[serde(default)]
        etcd_timeout_ms: Option<u64>,
        /// `--lag-wait`; absent: the default.
        #[serde(default)]
        lag_wait_ms: Option<u64>,
    },
    /// A mechanical fix for a guardrail finding: printed, and applied only with `apply`.
    FixReplicaIdentity {
        table: String,
        identity: Identity,
        apply: bool,
    },
    /// Add a table to the publication feeding the new server, and have it copied.
    FixPublication {
        table: String,
        apply: bool,
    },
    Lag,
    /// Every database on the two servers and what a cutover now would do with it.
    Databases,
    HasDatabases,
    /// Plan (and with `execute`, carry out) the end of the migration.
    Finish {
        execute: bool,
        force: bool,
    },
    /// What the controller is doing, and what its last recovery did.
    State,
    /// Counters, connections, port use, lag and phase in one cheap answer (no table walk):
    /// what `status --watch` asks for every interval.
    Snapshot,
    /// The fleet this controller is a member of (`null` without `--etcd`).
    Fleet,
    /// A fleet-wide immediate flip (`flip --immediate` on a fleet member): commit the next
    /// epoch in etcd and wait for every live member to apply it.
    FleetFlip {
        to: Role,
        ack_timeout_ms: u64,
        /// `--etcd-timeout`; absent: the default.
        #[serde(default)]
        etcd_timeout_ms: Option<u64>,
    },
    /// Take a member that is not live off the fleet's roster (`redirect fleet forget`).
    FleetForget {
        member: String,
    },
    /// Compare the two databases (`redirect verify`); streams progress, answers the report.
    Verify {
        tables: Vec<String>,
        chunk_rows: u64,
        rate: Option<u64>,
        catch_up_timeout_ms: u64,
        statement_timeout_ms: u64,
        max_keys: usize,
        /// Only these databases (empty: every replicated one).
        #[serde(default)]
        databases: Vec<String>,
    },
}

/// The answer to [`Request::State`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub phase: crate::controller::Phase,
    /// What the last recovery of an interrupted cutover did.
    pub last_recovery: Option<String>,
}

/// Asks the controller at `socket` for its [`State`]; `None` when none answers (or it answers
/// something that is not one).
pub async fn state(socket: &std::path::Path) -> Option<State> {
    call(socket, &Request::State, |_| {})
        .await
        .ok()
        .flatten()
        .and_then(|v| serde_json::from_value(v).ok())
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    Progress(String),
    Ok(serde_json::Value),
    Error(String),
}

/// Serves `ctl` on `path` until `shutdown`.
pub async fn serve(
    path: PathBuf,
    ctl: Arc<Controller>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            return Err(std::io::Error::other(format!(
                "another controller already serves {}",
                path.display()
            )));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %path.display(), "control socket ready");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let (ctl, shutdown) = (ctl.clone(), shutdown.clone());
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, ctl, shutdown).await {
                        warn!(error = %e, "control connection");
                    }
                });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn send(w: &mut (impl tokio::io::AsyncWrite + Unpin), reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_string(reply).expect("replies serialize");
    line.push('\n');
    w.write_all(line.as_bytes()).await
}

async fn handle(
    stream: UnixStream,
    ctl: Arc<Controller>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => return send(&mut w, &Reply::Error(format!("bad request: {e}"))).await,
    };
    let reply = match request {
        Request::HasDatabases => Reply::Ok(serde_json::json!(ctl.db.is_some())),
        Request::State => Reply::Ok(
            serde_json::to_value(State {
                phase: ctl.phase(),
                last_recovery: crate::sync::lock(&ctl.last_recovery).clone(),
            })
            .expect("the state serializes"),
        ),
        // The maps lock may be held by a GC pass for a while: wait for it off the runtime.
        Request::Snapshot => Reply::Ok(
            serde_json::to_value(tokio::task::block_in_place(|| crate::snapshot::take(&ctl)))
                .expect("the snapshot serializes"),
        ),
        Request::Fleet => match &ctl.fleet {
            Some(fleet) => {
                Reply::Ok(serde_json::to_value(fleet.view().await).expect("the view serializes"))
            }
            None => Reply::Ok(serde_json::Value::Null),
        },
        Request::FleetFlip {
            to,
            ack_timeout_ms,
            etcd_timeout_ms,
        } => match &ctl.fleet {
            Some(fleet) => {
                let etcd_timeout = etcd_timeout_ms
                    .map_or(crate::cutover::DEFAULT_ETCD_TIMEOUT, Duration::from_millis);
                let flipped = async {
                    fleet.ready(etcd_timeout).await.map_err(|e| {
                        crate::fleet::FleetError::Refused(format!("{e}; nothing was changed"))
                    })?;
                    crate::fleet::commit::flip(fleet, to, Duration::from_millis(ack_timeout_ms))
                        .await
                };
                match flipped.await {
                    Ok(r) => Reply::Ok(serde_json::to_value(r).expect("the report serializes")),
                    Err(e) => Reply::Error(e.to_string()),
                }
            }
            None => Reply::Error("this controller is not a fleet member (run --etcd)".into()),
        },
        Request::FleetForget { member } => match &ctl.fleet {
            Some(fleet) if member == fleet.settings.member => Reply::Error(format!(
                "{member} is this controller: stop it and detach its datapath, then forget it from another member"
            )),
            Some(fleet) => {
                let mut client = fleet.client();
                match crate::fleet::member::forget(&mut client, &fleet.settings.fleet, &member)
                    .await
                {
                    Ok(r) => {
                        info!(%member, "forgot a fleet member: cutovers no longer wait for it");
                        Reply::Ok(serde_json::to_value(r).expect("a roster record serializes"))
                    }
                    Err(e) => Reply::Error(e.to_string()),
                }
            }
            None => Reply::Error("this controller is not a fleet member (run --etcd)".into()),
        },
        Request::Finish { execute, force } => {
            match crate::cutover::finish::finish(&ctl, execute, force).await {
                Ok(r) => Reply::Ok(serde_json::to_value(r).expect("report serializes")),
                Err(e) => Reply::Error(e.to_string()),
            }
        }
        Request::FixReplicaIdentity {
            table,
            identity,
            apply,
        } => {
            info!(%table, ?identity, apply, "fix replica-identity requested");
            match crate::cutover::guardrails::fix::replica_identity(&ctl, &table, &identity, apply)
                .await
            {
                Ok(r) => Reply::Ok(serde_json::to_value(r).expect("report serializes")),
                Err(e) => Reply::Error(e.to_string()),
            }
        }
        Request::FixPublication { table, apply } => {
            info!(%table, apply, "fix publication requested");
            match crate::cutover::guardrails::fix::publish_table(&ctl, &table, apply).await {
                Ok(r) => Reply::Ok(serde_json::to_value(r).expect("report serializes")),
                Err(e) => Reply::Error(e.to_string()),
            }
        }
        Request::Verify {
            tables,
            chunk_rows,
            rate,
            catch_up_timeout_ms,
            statement_timeout_ms,
            max_keys,
            databases,
        } => {
            let req = crate::verify::VerifyRequest {
                databases,
                tables,
                chunk_rows,
                rate,
                catch_up_timeout: Duration::from_millis(catch_up_timeout_ms),
                statement_timeout: Duration::from_millis(statement_timeout_ms),
                max_keys,
            };
            info!(tables = ?req.tables, chunk_rows, rate, "verify requested");
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let task = tokio::spawn({
                let ctl = ctl.clone();
                async move { crate::verify::verify(&ctl, req, tx).await }
            });
            while let Some(p) = rx.recv().await {
                // A CLI that went away stops the verify: nobody reads its report.
                if send(&mut w, &Reply::Progress(p)).await.is_err() {
                    task.abort();
                    break;
                }
            }
            match task.await {
                Ok(Ok(report)) => {
                    info!(equal = report.equal, differ = report.differ, "verify done");
                    Reply::Ok(serde_json::to_value(report).expect("report serializes"))
                }
                Ok(Err(e)) => Reply::Error(e.to_string()),
                Err(e) if e.is_cancelled() => return Ok(()),
                Err(e) => Reply::Error(format!("verify task failed: {e}")),
            }
        }
        Request::Databases => match ctl.discover().await {
            Ok(d) => Reply::Ok(serde_json::to_value(d).expect("databases serialize")),
            Err(e) => Reply::Error(e.to_string()),
        },
        Request::Lag => match ctl.measure_lag().await {
            Ok(l) => Reply::Ok(serde_json::to_value(l).expect("lag serializes")),
            Err(e) => Reply::Error(e.to_string()),
        },
        Request::Flip {
            to,
            max_lag_bytes,
            max_lag_time_ms,
            timeout_ms,
            drain_timeout_ms,
            dry_run,
            force,
            allow,
            max_transaction_age_ms,
            etcd_timeout_ms,
            lag_wait_ms,
        } => {
            let called_off = shutdown.child_token();
            let req = FlipRequest {
                // An older CLI, which never asked to wait, is not made to.
                lag_wait: lag_wait_ms.map_or(Duration::ZERO, Duration::from_millis),
                called_off: called_off.clone(),
                etcd_timeout: etcd_timeout_ms
                    .map_or(crate::cutover::DEFAULT_ETCD_TIMEOUT, Duration::from_millis),
                allow,
                max_transaction_age: max_transaction_age_ms
                    .map_or(DEFAULT_MAX_TRANSACTION_AGE, Duration::from_millis),
                to,
                max_lag_bytes,
                max_lag_time: Duration::from_millis(max_lag_time_ms),
                timeout: Duration::from_millis(timeout_ms),
                drain_timeout: Duration::from_millis(drain_timeout_ms),
                dry_run,
                force,
            };
            info!(to = %to, dry_run, force, "cutover requested");
            // Until the hold, a cutover nobody is watching any more is called off: the CLI
            // that asked for it went away, or the controller is stopping.
            // The CLI sends nothing after its request: the end of its side is its going away
            // (Ctrl-C, a killed script).
            let gone = tokio::spawn({
                let called_off = called_off.clone();
                async move {
                    let mut rest = Vec::new();
                    let _ = reader.read_to_end(&mut rest).await;
                    called_off.cancel();
                }
            });
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let task = tokio::spawn({
                let ctl = ctl.clone();
                async move { Box::pin(crate::cutover::run(&ctl, req, tx)).await }
            });
            while let Some(p) = rx.recv().await {
                info!(progress = %p, "cutover");
                // Past preflight, a CLI that went away does not stop the cutover.
                let _ = send(&mut w, &Reply::Progress(p)).await;
            }
            let outcome = task.await;
            gone.abort();
            match outcome {
                Ok(Ok(report)) => {
                    Reply::Ok(serde_json::to_value(report).expect("report serializes"))
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "cutover failed");
                    Reply::Error(e.to_string())
                }
                Err(e) => Reply::Error(format!("cutover task failed: {e}")),
            }
        }
    };
    send(&mut w, &reply).await
}

/// Sends `request` to the controller at `path`, passing progress lines to `on_progress`.
/// `Ok(None)` means no controller is listening there.
pub async fn call(
    path: &Path,
    request: &Request,
    mut on_progress: impl FnMut(&str),
) -> anyhow::Result<Option<serde_json::Value>> {
    let Ok(stream) = UnixStream::connect(path).await else {
        return Ok(None);
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    w.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(r).lines();
    while let Some(l) = lines.next_line().await? {
        match serde_json::from_str::<Reply>(&l)? {
            Reply::Progress(p) => on_progress(&p),
            Reply::Ok(v) => return Ok(Some(v)),
            Reply::Error(e) => anyhow::bail!("{e}"),
        }
    }
    anyhow::bail!("the controller closed the connection without an answer")
}
