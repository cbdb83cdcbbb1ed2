//! The fleet's committed state: the one record every member obeys. Stored as JSON at
//! `/redirect/<fleet>/state`, written only by compare-and-swap transactions, so two writers
//! can never both advance it (see docs/fleet.md).

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::{FleetError, keys};
use crate::datapath::Role;

/// Where the fleet is in a cutover. A safe fleet cutover is two committed epochs after the
/// idle one it starts from: `Hold` (every member parks new SYNs and fences the old backend,
/// which is still `active`), then `Idle` again with the new `active` (the commit point) or
/// with the old one (an abort).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetPhase {
    #[default]
    Idle,
    Hold,
}

impl std::fmt::Display for FleetPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Idle => "idle",
            Self::Hold => "hold",
        })
    }
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
    /// In a `Hold`: the backend the cutover goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Role>,
    /// In a `Hold`: how long a member holds at most (the cutover's `--timeout`); past it, a
    /// member that has heard nothing more drops new connections rather than guess.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_ms: Option<u64>,
    /// In a `Hold`: how long members drain the old backend's connections after the commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_ms: Option<u64>,
}

impl FleetState {
    /// The next epoch after this one: `phase` with `active`, written by `member`.
    #[must_use]
    pub fn next(&self, phase: FleetPhase, active: Role, member: &str) -> Self {
        Self {
            epoch: Epoch(self.epoch.0 + 1),
            active,
            phase,
            written_by: member.to_owned(),
            to: None,
            hold_ms: None,
            drain_ms: None,
        }
    }
}

/// What else must hold for a state write to land, besides the state being unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Guard {
    /// Only that the state is still the one seen.
    StateOnly,
    /// The commit of a cutover: also that nobody joined the roster after `enrolled_by` (the
    /// new backend is committed only for the members that were fenced for it), and that the
    /// leader still holds the office (`leader_key` exists): a leader whose office lapsed may
    /// have been aborted by the members, and another may be cutting over already.
    Commit {
        enrolled_by: i64,
        leader_key: Vec<u8>,
    },
}

/// Writes `next` only if the state is still at `seen` (its mod revision) and `guard` holds:
/// of two writers, one wins. Returns the new revision, or `None` when the compare failed.
pub async fn compare_and_swap(
    client: &mut Client,
    fleet: &str,
    seen: i64,
    guard: &Guard,
    next: &FleetState,
) -> Result<Option<i64>, FleetError> {
    let key = keys::state(fleet);
    let mut compares = vec![Compare::mod_revision(key.clone(), CompareOp::Equal, seen)];
    if let Guard::Commit {
        enrolled_by,
        leader_key,
    } = guard
    {
        // A range compare holds when every key in the range satisfies it (or none exists).
        compares.push(
            Compare::create_revision(keys::roster(fleet), CompareOp::Less, enrolled_by + 1)
                .with_prefix(),
        );
        compares.push(Compare::create_revision(
            leader_key.clone(),
            CompareOp::NotEqual,
            0,
        ));
    }
    let txn = Txn::new().when(compares).and_then([TxnOp::put(
        key,
        serde_json::to_vec(next).expect("the state serializes"),
        None,
    )]);
    // Not retried: a transaction whose answer was lost may have been applied, and a retry
    // would then report a conflict with itself.
    let resp = client.txn(txn).await?;
    Ok(resp.succeeded().then(|| {
        resp.header()
            .map_or(0, etcd_client::ResponseHeader::revision)
    }))
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
        to: None,
        hold_ms: None,
        drain_ms: None,
    };
    let value = serde_json::to_vec(&founding).expect("the state serializes");
    // Create only if absent: of two members founding at once, one wins and both read it.
    // And only in a new fleet: with members enrolled, a missing state means etcd lost it (a
    // restore from an old snapshot, a hand delete), and founding it again from this host's
    // pins could name the other backend than the members serve.
    let txn = Txn::new()
        .when([
            Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            Compare::create_revision(keys::roster(fleet), CompareOp::Equal, 0).with_prefix(),
        ])
        .and_then([TxnOp::put(key, value, None)]);
    super::retry(|| {
        let (mut client, txn) = (client.clone(), txn.clone());
        async move { client.txn(txn).await }
    })
    .await?;
    read(client, fleet).await?.ok_or_else(|| {
        FleetError::Refused(format!(
            "fleet {fleet} has members enrolled (under {}) but no committed state at {}: etcd lost it (restored from an old snapshot?). Restore etcd, or write the state the members serve by hand (etcdctl put {} '{{\"epoch\":N,\"active\":\"source|target\",\"phase\":\"idle\",\"written_by\":\"operator\"}}' with N above every member's applied epoch)",
            keys::roster(fleet),
            keys::state(fleet),
            keys::state(fleet)
        ))
    })
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
            to: None,
            hold_ms: None,
            drain_ms: None,
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
