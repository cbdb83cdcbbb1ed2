//! The fleet's committed state: the one record every member obeys. Stored as JSON at
//! `/redirect/<fleet>/state`, written only by compare-and-swap transactions, so two writers
//! can never both advance it (see docs/fleet.md).

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::{FleetError, keys};
use crate::datapath::Role;

/// Which step of a fleet cutover the committed epoch is in. Only `Idle` is written by this
/// foundation; the leader-driven phases are the next step (docs/fleet.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetPhase {
    #[default]
    Idle,
    Hold,
    Flip,
    Drain,
    Rollback,
}

/// An epoch number: grows by one at every committed transition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What the last committed epoch says: where every member sends new connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetState {
    pub epoch: Epoch,
    pub active: Role,
    pub phase: FleetPhase,
    /// The member that wrote this epoch.
    pub written_by: String,
}

/// A committed state as read, with the etcd revision that last changed it (the compare of
/// the next transaction).
#[derive(Clone, Debug)]
pub struct Committed {
    pub state: FleetState,
    pub mod_revision: i64,
}

/// Reads the committed state (a linearizable read: it reflects every committed write, or
/// fails when etcd has no quorum).
pub async fn read(client: &mut Client, fleet: &str) -> Result<Option<Committed>, FleetError> {
    let key = keys::state(fleet);
    let resp = super::retry(|| {
        let (mut client, key) = (client.clone(), key.clone());
        async move { client.get(key, None).await }
    })
    .await?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(None);
    };
    let state = serde_json::from_slice(kv.value())
        .map_err(|source| FleetError::BadRecord { key, source })?;
    Ok(Some(Committed {
        state,
        mod_revision: kv.mod_revision(),
    }))
}

/// Founds the fleet's state at epoch 0 with `active` if no state exists yet; otherwise the
/// existing state wins. Returns what is committed afterwards.
pub async fn found_or_read(
    client: &mut Client,
    fleet: &str,
    active: Role,
    member: &str,
) -> Result<Committed, FleetError> {
    let key = keys::state(fleet);
    let founding = FleetState {
        epoch: Epoch(0),
        active,
        phase: FleetPhase::Idle,
        written_by: member.to_owned(),
    };
    let value = serde_json::to_vec(&founding).expect("the state serializes");
    // Create only if absent: of two members founding at once, one wins and both read it.
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, value, None)]);
    super::retry(|| {
        let (mut client, txn) = (client.clone(), txn.clone());
        async move { client.txn(txn).await }
    })
    .await?;
    read(client, fleet)
        .await?
        .ok_or_else(|| FleetError::Vanished(keys::state(fleet)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_is_typed_json() {
        let s = FleetState {
            epoch: Epoch(7),
            active: Role::Target,
            phase: FleetPhase::Idle,
            written_by: "proxy-a".into(),
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"epoch":7,"active":"target","phase":"idle","written_by":"proxy-a"}"#
        );
        assert_eq!(serde_json::from_str::<FleetState>(&json).unwrap(), s);
        assert!(
            serde_json::from_str::<FleetState>(
                r#"{"epoch":7,"active":"elsewhere","phase":"idle","written_by":"x"}"#
            )
            .is_err(),
            "an unknown backend is refused, not guessed"
        );
    }
}
