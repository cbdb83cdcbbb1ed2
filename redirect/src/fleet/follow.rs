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
    Fleet, FleetError, keys,
    state::{self, Epoch, FleetState},
};
use crate::{cutover::Controller, datapath::Role, sync::lock};

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
}

/// Follows the committed state until `shutdown`. `ctl.fleet` must be set.
pub async fn follow(ctl: Arc<Controller>, shutdown: CancellationToken) {
    let Some(fleet) = ctl.fleet.as_ref() else {
        return;
    };
    let mut client = fleet.client();
    let key = keys::state(&fleet.settings.fleet);
    loop {
        let from = fleet.applied_revision() + 1;
        let options = WatchOptions::new().with_start_revision(from);
        match client.watch(key.clone(), Some(options)).await {
            Ok(mut stream) => loop {
                let message = tokio::select! {
                    () = shutdown.cancelled() => return,
                    m = stream.message() => m,
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
                        Ok(s) => apply(&ctl, fleet, s, kv.mod_revision()).await,
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
            apply(&ctl, fleet, c.state, c.mod_revision).await;
        }
    }
}

/// Applies one committed state if it is newer than what this member applied, then
/// acknowledges it.
async fn apply(ctl: &Controller, fleet: &Fleet, committed: FleetState, revision: i64) {
    {
        let mut applied = lock(&fleet.applied);
        if committed.epoch <= applied.0.epoch {
            applied.1 = applied.1.max(revision);
            return;
        }
    }
    let result = lock(&ctl.maps).set_active(committed.active);
    let ack = Ack {
        epoch: committed.epoch,
        member: fleet.settings.member.clone(),
        applied: result.is_ok().then_some(committed.active),
        error: result.as_ref().err().map(ToString::to_string),
    };
    match &result {
        Ok(()) => {
            info!(epoch = %committed.epoch, active = %committed.active, by = %committed.written_by, "applied the fleet's committed epoch: new connections go to this backend");
            *lock(&fleet.applied) = (committed.clone(), revision);
            let mut me = lock(&fleet.me);
            me.applied_epoch = committed.epoch;
            me.applied_active = committed.active;
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
    super::member::publish(&mut client, &fleet.settings.fleet, &me, lease).await?;
    let key = keys::ack(&fleet.settings.fleet, ack.epoch, &ack.member);
    let value = serde_json::to_vec(ack).expect("an ack serializes");
    super::retry(|| {
        let (mut client, key, value) = (client.clone(), key.clone(), value.clone());
        async move {
            client
                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
        }
    })
    .await?;
    Ok(())
}
