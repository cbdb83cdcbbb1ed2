//! The controller's side of the control socket: one task per connection, one function per
//! request, each returning its request's typed answer ([`Ask::Answer`]).

use std::{os::unix::fs::PermissionsExt as _, path::PathBuf, sync::Arc, time::Duration};

use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream, unix::OwnedReadHalf, unix::OwnedWriteHalf},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    DEFAULT_MAX_TRANSACTION_AGE,
    protocol::{self as ask, Ask, Reply, Request, State},
};
use crate::{controller::Controller, cutover::FlipRequest, fleet::FleetError};

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

/// Writes one line of an answer.
async fn send<T: Serialize>(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    reply: &Reply<T>,
) -> std::io::Result<()> {
    let mut line = serde_json::to_string(reply).expect("replies serialize");
    line.push('\n');
    w.write_all(line.as_bytes()).await
}

/// The end of an answer: the typed answer, or why there is none.
fn reply<Q: Ask>(answer: Result<Q::Answer, impl std::fmt::Display>) -> Reply<Q::Answer> {
    match answer {
        Ok(a) => Reply::Ok(a),
        Err(e) => Reply::Error(e.to_string()),
    }
}

/// A typed answer that cannot fail.
fn ok<Q: Ask>(answer: Q::Answer) -> Reply<Q::Answer> {
    Reply::Ok(answer)
}

/// Reads one request and answers it.
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
        Err(e) => {
            return send(&mut w, &Reply::<()>::Error(format!("bad request: {e}"))).await;
        }
    };
    match request {
        Request::HasDatabases => send(&mut w, &ok::<ask::HasDatabases>(ctl.db.is_some())).await,
        Request::State => send(&mut w, &ok::<ask::StateRequest>(state(&ctl))).await,
        // The maps lock may be held by a GC pass for a while: wait for it off the runtime.
        Request::Snapshot => {
            let snapshot = tokio::task::block_in_place(|| crate::snapshot::take(&ctl));
            send(&mut w, &ok::<ask::SnapshotRequest>(snapshot)).await
        }
        Request::Fleet => {
            let view = match &ctl.fleet {
                Some(fleet) => Some(fleet.view().await),
                None => None,
            };
            send(&mut w, &ok::<ask::FleetRequest>(view)).await
        }
        Request::FleetFlip(r) => {
            send(
                &mut w,
                &reply::<ask::FleetFlipRequest>(fleet_flip(&ctl, r).await),
            )
            .await
        }
        Request::FleetForget(r) => {
            send(
                &mut w,
                &reply::<ask::FleetForget>(fleet_forget(&ctl, r).await),
            )
            .await
        }
        Request::Finish(r) => {
            let done = crate::cutover::finish::finish(&ctl, r.execute, r.force).await;
            send(&mut w, &reply::<ask::Finish>(done)).await
        }
        Request::FixReplicaIdentity(r) => {
            info!(table = %r.table, identity = ?r.identity, apply = r.apply, "fix replica-identity requested");
            let fixed = crate::cutover::guardrails::fix::replica_identity(
                &ctl,
                &r.table,
                &r.identity,
                r.apply,
            )
            .await;
            send(&mut w, &reply::<ask::FixReplicaIdentity>(fixed)).await
        }
        Request::FixPublication(r) => {
            info!(table = %r.table, apply = r.apply, "fix publication requested");
            let fixed =
                crate::cutover::guardrails::fix::publish_table(&ctl, &r.table, r.apply).await;
            send(&mut w, &reply::<ask::FixPublication>(fixed)).await
        }
        Request::Databases => send(&mut w, &reply::<ask::Databases>(ctl.discover().await)).await,
        Request::Lag => send(&mut w, &reply::<ask::Lag>(ctl.measure_lag().await)).await,
        Request::Verify(r) => verify(&ctl, r, w).await,
        Request::Flip(r) => flip(&ctl, r, reader, w, &shutdown).await,
    }
}

fn state(ctl: &Controller) -> State {
    State {
        phase: ctl.phase(),
        last_recovery: crate::sync::lock(&ctl.last_recovery).clone(),
    }
}

async fn fleet_flip(
    ctl: &Controller,
    r: ask::FleetFlipRequest,
) -> Result<crate::fleet::commit::FleetFlip, FleetError> {
    let Some(fleet) = &ctl.fleet else {
        return Err(FleetError::NotAMember);
    };
    let etcd_timeout = r
        .etcd_timeout_ms
        .map_or(crate::cutover::DEFAULT_ETCD_TIMEOUT, Duration::from_millis);
    fleet
        .ready(etcd_timeout)
        .await
        .map_err(|e| FleetError::Refused(format!("{e}; nothing was changed")))?;
    crate::fleet::commit::flip(fleet, r.to, Duration::from_millis(r.ack_timeout_ms)).await
}

async fn fleet_forget(
    ctl: &Controller,
    r: ask::FleetForget,
) -> Result<crate::fleet::member::Enrolled, FleetError> {
    let member = r.member;
    match &ctl.fleet {
        Some(fleet) if member == fleet.settings.member => Err(FleetError::ForgetSelf(member)),
        Some(fleet) => {
            let mut client = fleet.client();
            let forgotten =
                crate::fleet::member::forget(&mut client, &fleet.settings.fleet, &member).await?;
            info!(%member, "forgot a fleet member: cutovers no longer wait for it");
            Ok(forgotten)
        }
        None => Err(FleetError::NotAMember),
    }
}

/// Compares the databases, streaming progress; a CLI that went away stops it (nobody reads
/// its report).
async fn verify(
    ctl: &Arc<Controller>,
    r: ask::Verify,
    mut w: OwnedWriteHalf,
) -> std::io::Result<()> {
    let req = crate::verify::VerifyRequest {
        databases: r.databases,
        tables: r.tables,
        chunk_rows: r.chunk_rows,
        rate: r.rate,
        catch_up_timeout: Duration::from_millis(r.catch_up_timeout_ms),
        statement_timeout: Duration::from_millis(r.statement_timeout_ms),
        max_keys: r.max_keys,
    };
    info!(tables = ?req.tables, chunk_rows = req.chunk_rows, rate = req.rate, "verify requested");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn({
        let ctl = ctl.clone();
        async move { crate::verify::verify(&ctl, req, tx).await }
    });
    while let Some(p) = rx.recv().await {
        if send(&mut w, &Reply::<()>::Progress(p)).await.is_err() {
            task.abort();
            break;
        }
    }
    let answer: Reply<<ask::Verify as Ask>::Answer> = match task.await {
        Ok(Ok(report)) => {
            info!(equal = report.equal, differ = report.differ, "verify done");
            Reply::Ok(report)
        }
        Ok(Err(e)) => Reply::Error(e.to_string()),
        Err(e) if e.is_cancelled() => return Ok(()),
        Err(e) => Reply::Error(format!("verify task failed: {e}")),
    };
    send(&mut w, &answer).await
}

/// What the operator asked for, with the defaults an older CLI leaves out.
fn flip_request(r: ask::Flip, called_off: CancellationToken) -> FlipRequest {
    FlipRequest {
        // An older CLI, which never asked to wait, is not made to.
        lag_wait: r.lag_wait_ms.map_or(Duration::ZERO, Duration::from_millis),
        called_off,
        etcd_timeout: r
            .etcd_timeout_ms
            .map_or(crate::cutover::DEFAULT_ETCD_TIMEOUT, Duration::from_millis),
        allow: r.allow,
        max_transaction_age: r
            .max_transaction_age_ms
            .map_or(DEFAULT_MAX_TRANSACTION_AGE, Duration::from_millis),
        to: r.to,
        max_lag_bytes: r.max_lag_bytes,
        max_lag_time: Duration::from_millis(r.max_lag_time_ms),
        timeout: Duration::from_millis(r.timeout_ms),
        drain_timeout: Duration::from_millis(r.drain_timeout_ms),
        dry_run: r.dry_run,
        force: r.force,
    }
}

/// Runs a cutover, streaming its progress.
async fn flip(
    ctl: &Arc<Controller>,
    r: ask::Flip,
    mut reader: BufReader<OwnedReadHalf>,
    mut w: OwnedWriteHalf,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let called_off = shutdown.child_token();
    let req = flip_request(r, called_off.clone());
    info!(to = %req.to, dry_run = req.dry_run, force = req.force, "cutover requested");
    // Until the hold, a cutover nobody is watching any more is called off: the CLI that asked
    // for it went away, or the controller is stopping. The CLI sends nothing after its
    // request: the end of its side is its going away (Ctrl-C, a killed script).
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
        let _ = send(&mut w, &Reply::<()>::Progress(p)).await;
    }
    let outcome = task.await;
    gone.abort();
    let answer: Reply<<ask::Flip as Ask>::Answer> = match outcome {
        Ok(Ok(report)) => Reply::Ok(report),
        Ok(Err(e)) => {
            warn!(error = %e, "cutover failed");
            Reply::Error(e.to_string())
        }
        Err(e) => Reply::Error(format!("cutover task failed: {e}")),
    };
    send(&mut w, &answer).await
}
