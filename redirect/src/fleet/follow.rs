//! Following the committed state: every member watches `/redirect/<fleet>/state` and applies
//! each newly committed epoch to its datapath, then acknowledges it (`acks/<epoch>/<member>`,
//! under its lease) and republishes its member record.
//!
//! A member applies only what it read from etcd (invariant 1). When the watch breaks (etcd
//! away, compaction), it keeps what it applied (invariant 4), re-reads the state once etcd
//! answers, and watches again from there, so no committed epoch is skipped for long.

use std::{sync::Arc, time::Duration};

use etcd_client::{EventType, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    Fleet, FleetError,
    hold::{self, Proxied},
    keys,
    state::{self, Epoch, FleetPhase, FleetState},
};
use crate::{datapath::Role, host::Host, sync::lock};

/// How long a member waits before watching again after the watch broke.
const RETRY: Duration = Duration::from_secs(1);

/// A member's acknowledgement of an epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub epoch: Epoch,
    pub member: String,
    /// The backend it applied (`None`: applying failed, see `error`).
    pub applied: Option<Role>,
    pub error: Option<String>,
    /// For a `Hold`: where this member's sessions on the old backend come from, so the
    /// leader's fence ends them too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxied: Option<Proxied>,
}

/// What a member applies the committed state to.
pub struct Follower {
    /// This host's datapath.
    pub host: Arc<Host>,
    pub fleet: Arc<Fleet>,
    /// The servers the drain after a committed flip ends old sessions on.
    pub servers: Option<hold::Servers>,
}

/// Follows the committed state until `shutdown`.
pub async fn follow(f: Follower, shutdown: CancellationToken) {
    let fleet = &*f.fleet;
    let mut client = fleet.client();
    let key = keys::state(&fleet.settings.fleet);
    // Joined (or restarted) in the middle of a fleet cutover: hold like every other member,
    // so the leader's ack wait counts this member too. Otherwise lift a hold a dead
    // controller left closed in the kernel: the committed state was just applied.
    let joined = fleet.applied();
    if joined.phase == FleetPhase::Hold {
        let revision = fleet.applied_revision();
        lock(&fleet.applied).0.epoch = Epoch(joined.epoch.0.saturating_sub(1));
        apply(&f, joined, revision).await;
    } else if let Err(e) = hold::clear_stale(&f.host, joined.active) {
        warn!(error = %e, "could not lift a fleet hold left by an earlier controller");
    }
    loop {
        let from = fleet.applied_revision() + 1;
        let options = WatchOptions::new().with_start_revision(from);
        match client.watch(key.clone(), Some(options)).await {
            Ok(mut stream) => loop {
                let message = tokio::select! {
                    () = shutdown.cancelled() => return,
                    m = stream.message() => m,
                    () = tokio::time::sleep(RECONCILE_EVERY) => {
                        // A quiet watch: check that what is applied is what is committed (an
                        // apply that failed is otherwise retried only at the next epoch).
                        reconcile(&f, &mut client).await;
                        continue;
                    }
                };
                let response = match message {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        warn!(error = %e, "the fleet state watch broke; the datapath keeps epoch {}", fleet.applied().epoch);
                        break;
                    }
                };
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    if event.event_type() != EventType::Put {
                        warn!("the fleet state was deleted; the datapath keeps what it applied");
                        continue;
                    }
                    match serde_json::from_slice::<FleetState>(kv.value()) {
                        Ok(s) => apply(&f, s, kv.mod_revision()).await,
                        Err(e) => {
                            warn!(error = %e, "an unreadable fleet state was committed; ignoring it");
                        }
                    }
                }
                if response.canceled() {
                    break;
                }
            },
            Err(e) => warn!(error = %e, "cannot watch the fleet state; retrying"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
        // Catch up on whatever was committed while the watch was down.
        if let Ok(Ok(Some(c))) =
            tokio::time::timeout(RETRY, state::read(&mut client, &fleet.settings.fleet)).await
        {
            apply(&f, c.state, c.mod_revision).await;
        }
    }
}

/// How long a quiet watch waits before re-reading the committed state.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// Re-reads the committed state and applies it if this member is behind (bounded: etcd away
/// changes nothing).
async fn reconcile(f: &Follower, client: &mut etcd_client::Client) {
    let fleet = &*f.fleet;
    let read = tokio::time::timeout(RETRY, state::read(client, &fleet.settings.fleet)).await;
    if let Ok(Ok(Some(c))) = read {
        if c.state.epoch > fleet.applied().epoch {
            warn!(committed = %c.state.epoch, applied = %fleet.applied().epoch, "this member is behind the fleet's committed epoch; applying it again");
            apply(f, c.state, c.mod_revision).await;
        }
    }
}

/// Applies one committed state if it is newer than what this member applied, then
/// acknowledges it: a `Hold` holds and fences ([`hold::hold`]); the epoch after it lifts the
/// hold towards whichever backend it names ([`hold::release`]); any other writes `ACTIVE`.
async fn apply(f: &Follower, committed: FleetState, revision: i64) {
    let fleet = &*f.fleet;
    {
        let mut applied = lock(&fleet.applied);
        if committed.epoch < applied.0.epoch {
            // Epochs only grow: etcd lost what this member applied (a restore from an old
            // snapshot). Keep what is applied; say so on every event until an operator acts.
            warn!(committed = %committed.epoch, applied = %applied.0.epoch, "the fleet's committed epoch went BACKWARDS (etcd restored from an old snapshot?): this member keeps epoch {} and ignores it; fix the state in etcd", applied.0.epoch);
            return;
        }
        if committed.epoch == applied.0.epoch {
            applied.1 = applied.1.max(revision);
            return;
        }
    }
    let mut proxied = None;
    let result: Result<(), String> = match committed.phase {
        FleetPhase::Hold => match hold::hold(&f.host, fleet, &committed).await {
            Ok((held, p)) => {
                *lock(&fleet.holding) = Some(held);
                proxied = Some(p);
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
        FleetPhase::Idle => {
            let held = lock(&fleet.holding).take();
            if let Some(held) = held {
                hold::release(&f.host, f.servers.as_ref(), held, &committed)
                    .map(|r| {
                        info!(epoch = %committed.epoch, active = %r.active, held_syns = r.held_syns, "fleet hold lifted");
                    })
                    .map_err(|e| e.to_string())
            } else {
                // Its own statement: the maps lock is released before `clear_stale` takes
                // it again (a std mutex is not reentrant).
                let set = lock(&f.host.maps).set_active(committed.active);
                set.map_err(|e| e.to_string()).and_then(|()| {
                    hold::clear_stale(&f.host, committed.active).map_err(|e| e.to_string())
                })
            }
        }
    };
    let ack = Ack {
        epoch: committed.epoch,
        member: fleet.settings.member.clone(),
        applied: result.is_ok().then_some(committed.active),
        error: result.as_ref().err().cloned(),
        proxied,
    };
    match &result {
        Ok(()) => {
            info!(epoch = %committed.epoch, phase = ?committed.phase, active = %committed.active, by = %committed.written_by, "applied the fleet's committed epoch");
            *lock(&fleet.applied) = (committed.clone(), revision);
            let mut me = lock(&fleet.me);
            me.applied_epoch = committed.epoch;
            me.applied_active = committed.active;
            me.applied_at_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        }
        Err(e) => {
            warn!(epoch = %committed.epoch, error = %e, "could not apply the fleet's committed epoch");
        }
    }
    if let Err(e) = acknowledge(fleet, &ack).await {
        warn!(epoch = %committed.epoch, error = %e, "could not acknowledge the epoch (it is applied)");
    }
}

async fn acknowledge(fleet: &Fleet, ack: &Ack) -> Result<(), FleetError> {
    let mut client = fleet.client();
    let lease = fleet.lease();
    let me = lock(&fleet.me).clone();
    let key = keys::ack(&fleet.settings.fleet, ack.epoch, &ack.member);
    let value = serde_json::to_vec(ack).expect("an ack serializes");
    // Owed until written: a member that is away (or whose lease just ended) writes it when
    // it rejoins, so a leader still waiting for it is not left to abort for nothing.
    fleet.standing.owe_ack(key.clone(), value.clone());
    super::member::publish(&mut client, &fleet.settings.fleet, &me, lease).await?;
    super::retry(|| {
        let (mut client, key, value) = (client.clone(), key.clone(), value.clone());
        async move {
            client
                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
        }
    })
    .await?;
    fleet.standing.acked(&key);
    Ok(())
}
