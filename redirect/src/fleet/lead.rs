//! The leader's side of a fleet cutover. The member that is asked to `flip` becomes the
//! fleet's leader for that cutover (an etcd election on a lease of its own, so a dead leader
//! loses the office within the lease's TTL), then drives two committed epochs:
//!
//! 1. [`commit_hold`]: `Hold` with the old backend still active. [`await_acks`] waits until
//!    every live member has held, settled and fenced, and says where its sessions come from.
//!    A missing or failed ack aborts (see [`commit_next`] with the old backend).
//! 2. The database side runs here alone (barrier, sequences, replication).
//! 3. [`commit_next`] with the new backend: the commit point, a compare-and-swap on the
//!    `Hold`'s revision, so it fails if a member aborted a cutover it thought leaderless.

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::ControlFlow,
    time::{Duration, Instant},
};

use etcd_client::{GetOptions, LeaderKey, ResignOptions};

use super::{
    Fleet, FleetError,
    follow::Ack,
    hold::Proxied,
    keepalive, keys, member,
    state::{self, Committed, Epoch, FleetPhase, FleetState, Guard},
};
use crate::datapath::Role;

/// How long `flip` waits to become the leader before it reports who leads.
const CAMPAIGN_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the office outlives a leader that stopped renewing it (it died, or lost etcd).
const LEADERSHIP_TTL: i64 = 10;

/// This member leads the fleet's cutovers until [`Leadership::resign`]ed or dropped. The
/// office lives on a lease of its own, kept alive only while this value lives: a failed
/// `resign` (or a dropped one) frees it within [`LEADERSHIP_TTL`], not when the member stops.
pub struct Leadership {
    key: LeaderKey,
    lease: i64,
    client: etcd_client::Client,
    keep_alive: tokio::task::JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keep_alive.abort();
    }
}

impl Leadership {
    /// The election key this leader holds: it exists exactly while the office is held.
    #[must_use]
    pub fn key(&self) -> Vec<u8> {
        self.key.key().to_vec()
    }

    /// Steps down at once (otherwise the office lapses with its lease).
    pub async fn resign(mut self) {
        self.keep_alive.abort();
        let (key, lease) = (self.key.clone(), self.lease);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self
                .client
                .resign(Some(ResignOptions::new().with_leader(key)))
                .await;
            let _ = self.client.lease_revoke(lease).await;
        })
        .await;
    }
}

/// Renews the office's lease every third of its TTL on one keep-alive stream. A stream that
/// breaks is re-opened at once (retried off a dead endpoint: with one etcd node of three down,
/// a third of new streams land on it), so one broken stream cannot cost the office mid-cutover.
/// Once the lease is gone the office is lost for good: the commit's guard requires the
/// election key, so a leader whose office lapsed cannot commit; this only stops renewing.
async fn keep_office(client: etcd_client::Client, lease: i64) {
    let every = Duration::from_secs(u64::try_from(LEADERSHIP_TTL).unwrap_or(10) / 3);
    let mut stream: Option<keepalive::Renewer> = None;
    let mut due = tokio::time::Instant::now() + every;
    loop {
        tokio::time::sleep_until(due).await;
        let attempt = tokio::time::timeout(every, async {
            if stream.is_none() {
                let opened = super::retry(|| {
                    let mut client = client.clone();
                    async move {
                        keepalive::Renewer::open(&mut client, lease)
                            .await
                            .map_err(keepalive::Broken::into_etcd)
                    }
                })
                .await?;
                match opened {
                    Some(opened) => stream = Some(opened),
                    None => return Ok(keepalive::Renewal::Gone),
                }
            }
            stream
                .as_mut()
                .expect("opened")
                .renew()
                .await
                .map_err(keepalive::Broken::into_etcd)
        })
        .await;
        match attempt {
            Ok(Ok(keepalive::Renewal::Alive)) => due += every,
            Ok(Ok(keepalive::Renewal::Gone)) => {
                tracing::warn!(
                    "the fleet leadership lease ended (etcd was away longer than its TTL): this leader cannot commit"
                );
                return;
            }
            // Re-open at once, then every half second while it fails.
            Ok(Err(e)) => {
                tracing::warn!(error = %super::brief(&e), "renewing the fleet leadership lease failed; re-opening its stream");
                stream = None;
                due = tokio::time::Instant::now() + Duration::from_millis(500);
            }
            Err(_) => {
                tracing::warn!(
                    "renewing the fleet leadership lease: no answer; re-opening its stream"
                );
                stream = None;
                due = tokio::time::Instant::now();
            }
        }
    }
}

/// Becomes the fleet's leader, or says who is.
pub async fn lead(fleet: &Fleet) -> Result<Leadership, FleetError> {
    let mut client = fleet.client();
    let name = keys::election(&fleet.settings.fleet);
    let grant = super::retry(|| {
        let mut client = client.clone();
        async move { client.lease_grant(LEADERSHIP_TTL, None).await }
    });
    let lease = match tokio::time::timeout(CAMPAIGN_TIMEOUT, grant).await {
        Ok(granted) => granted?.id(),
        Err(_) => {
            return Err(FleetError::Unreachable {
                endpoints: fleet.settings.endpoints.join(","),
                why: format!("no answer to the leadership lease within {CAMPAIGN_TIMEOUT:?}"),
            });
        }
    };
    let campaign = client.campaign(name.clone(), fleet.settings.member.clone(), lease);
    let outcome = tokio::time::timeout(CAMPAIGN_TIMEOUT, campaign).await;
    let outcome = match outcome {
        Ok(Ok(mut won)) => match won.take_leader() {
            Some(key) => {
                return Ok(Leadership {
                    key,
                    lease,
                    keep_alive: tokio::spawn(keep_office(client.clone(), lease)),
                    client,
                });
            }
            None => Ok(Ok(())),
        },
        Ok(Err(e)) => Ok(Err(e)),
        Err(e) => Err(e),
    };
    // Not elected: the lease must not keep a queued campaign alive.
    let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
    match outcome {
        Ok(Ok(())) => Err(FleetError::Refused("etcd elected no leader key".into())),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => {
            let leader = client
                .get(name, Some(GetOptions::new().with_prefix()))
                .await
                .ok()
                .and_then(|r| {
                    r.kvs()
                        .first()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                })
                .unwrap_or_else(|| "another member".into());
            Err(FleetError::Refused(format!(
                "{leader} is leading a cutover of fleet {}; wait for it to end (redirect status)",
                fleet.settings.fleet
            )))
        }
    }
}

/// Commits a `Hold` of `from` (still active) for a cutover to `to`.
pub async fn commit_hold(
    fleet: &Fleet,
    from: Role,
    to: Role,
    hold: Duration,
    drain: Duration,
) -> Result<Committed, FleetError> {
    let mut client = fleet.client();
    let name = &fleet.settings.fleet;
    let current = state::read(&mut client, name)
        .await?
        .ok_or_else(|| FleetError::Refused(format!("fleet {name} has no committed state")))?;
    if current.state.phase != FleetPhase::Idle || current.state.active != from {
        return Err(FleetError::Refused(format!(
            "fleet {name} is at epoch {} ({:?}, active {}), not idle on the {from}: see `redirect status`",
            current.state.epoch, current.state.phase, current.state.active
        )));
    }
    let mut next = current
        .state
        .next(FleetPhase::Hold, from, &fleet.settings.member);
    next.to = Some(to);
    next.hold_ms = Some(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX));
    next.drain_ms = Some(u64::try_from(drain.as_millis()).unwrap_or(u64::MAX));
    let revision = write_or_read_back(
        &mut client,
        name,
        current.mod_revision,
        &Guard::StateOnly,
        &next,
    )
    .await?
    .ok_or_else(|| {
        FleetError::Refused(format!(
            "another member committed a new epoch of fleet {name} meanwhile; retry"
        ))
    })?;
    Ok(Committed {
        state: next,
        mod_revision: revision,
    })
}

/// Commits the epoch after `hold`: `active` is the new backend (the commit point) or the
/// old one (an abort, `guard` [`Guard::StateOnly`]). Fails if anyone wrote the state since
/// the `Hold`, or if `guard` fails: a member enrolled after the acknowledgements were
/// counted was not fenced with the others, so the new backend must not be committed.
pub async fn commit_next(
    fleet: &Fleet,
    hold: &Committed,
    active: Role,
    guard: &Guard,
) -> Result<Committed, FleetError> {
    let mut client = fleet.client();
    let name = &fleet.settings.fleet;
    let next = hold
        .state
        .next(FleetPhase::Idle, active, &fleet.settings.member);
    if let Some(revision) =
        write_or_read_back(&mut client, name, hold.mod_revision, guard, &next).await?
    {
        return Ok(Committed {
            state: next,
            mod_revision: revision,
        });
    }
    let still_held = state::read(&mut client, name)
        .await
        .ok()
        .flatten()
        .is_some_and(|now| now.mod_revision == hold.mod_revision);
    let office_lapsed = match guard {
        Guard::Commit { leader_key, .. } => client
            .get(leader_key.clone(), None)
            .await
            .is_ok_and(|r| r.kvs().is_empty()),
        Guard::StateOnly => false,
    };
    Err(FleetError::Refused(if still_held && office_lapsed {
        "this leader's office lapsed (its lease went unrenewed: etcd was slow or unreachable), so the members may be aborting the hold; not committing (flip again)".to_owned()
    } else if still_held {
        "a member joined the fleet after the others acknowledged the hold, so it was not fenced with them; not committing (flip again once it has joined)".to_owned()
    } else {
        format!(
            "the fleet's state moved past epoch {} (a member aborted the cutover: its leader seemed gone, or its --timeout passed)",
            hold.state.epoch
        )
    }))
}

/// Writes `next` by compare-and-swap on `seen`; `Some(revision)` if it is committed, `None`
/// if someone else wrote first. A request that never reached etcd is retried, and an answer
/// that was lost (or a retry refused because the first try did land) is settled by reading
/// what etcd holds now: a lost answer cannot tell "written" from "refused".
pub(super) async fn write_or_read_back(
    client: &mut etcd_client::Client,
    name: &str,
    seen: i64,
    guard: &Guard,
    next: &FleetState,
) -> Result<Option<i64>, FleetError> {
    let written = super::retry(|| {
        let mut client = client.clone();
        async move {
            state::compare_and_swap(&mut client, name, seen, guard, next)
                .await
                .map_err(|e| match e {
                    FleetError::Etcd(e) => e,
                    other => etcd_client::Error::InvalidArgs(other.to_string()),
                })
        }
    })
    .await;
    match written {
        Ok(Some(r)) => Ok(Some(r)),
        // The same epoch, phase and backend is the same outcome, whoever wrote it (a member's
        // abort and the leader's are one decision).
        _ => Ok(read_back(client, name)
            .await?
            .filter(|now| {
                (now.state.epoch, now.state.phase, now.state.active)
                    == (next.epoch, next.phase, next.active)
            })
            .map(|now| now.mod_revision)),
    }
}

/// Reads the committed state after a write whose outcome is unknown, for up to
/// [`READ_BACK`]: etcd electing a new leader takes a second or two, and giving up sooner
/// would undo a cutover etcd may have committed.
pub async fn read_back(
    client: &mut etcd_client::Client,
    name: &str,
) -> Result<Option<Committed>, FleetError> {
    // Every 200 ms: an election settles within a few of them. Boxed: etcd's read future
    // is large, and every step that may read back would carry it.
    Box::pin(crate::poll::retry(
        Instant::now() + READ_BACK,
        Duration::from_millis(200),
        || {
            let mut client = client.clone();
            async move { state::read(&mut client, name).await }
        },
    ))
    .await
}

/// How long [`read_back`] keeps trying.
const READ_BACK: Duration = Duration::from_secs(6);

/// The acknowledgements of one epoch.
#[derive(Debug, Default)]
pub struct Acks {
    /// Members that applied it, with their proxied sessions (for a `Hold`).
    pub applied: BTreeMap<String, Option<Proxied>>,
    /// Members the leader had to hear from and did not, with why.
    pub missing: BTreeMap<String, Missing>,
    /// The etcd revision the roster was read at: a member enrolled after it was not waited
    /// for (the commit refuses then; see [`commit_next`]).
    pub roster_revision: i64,
}

/// Why a member's acknowledgement is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// Live, but it has not answered yet.
    NotYet,
    /// It answered that applying the epoch failed.
    Failed(String),
    /// On the roster but not live: its controller is down or cut off from etcd, and its
    /// datapath may still be serving. It cannot be fenced, so a cutover cannot go on.
    NotLive,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotYet => f.write_str("no acknowledgement yet"),
            Self::Failed(why) => f.write_str(why),
            Self::NotLive => f.write_str(
                "enrolled but not live: its controller is down or cut off from etcd, and its datapath may still serve; bring it back, or if the host is gone for good, `redirect fleet forget` it",
            ),
        }
    }
}

/// Waits up to `timeout` until every member on the roster (and every live one) acknowledged
/// `epoch` as applied. A member that failed, or is enrolled but not live, ends the wait.
pub async fn await_acks(
    fleet: &Fleet,
    epoch: Epoch,
    timeout: Duration,
) -> Result<Acks, FleetError> {
    let name = &fleet.settings.fleet;
    // Every 20 ms: the cutover waits on the slowest member's acknowledgement, and each look
    // is only a few etcd reads.
    let acks = crate::poll::until_with(
        Instant::now() + timeout,
        Duration::from_millis(20),
        Acks::default(),
        |_| {
            let mut client = fleet.client();
            async move {
                let acks = read_acks(&mut client, name, epoch).await?;
                let settled = acks.missing.values().any(|why| *why != Missing::NotYet);
                Ok::<_, FleetError>(if acks.missing.is_empty() || settled {
                    ControlFlow::Break(acks)
                } else {
                    ControlFlow::Continue(acks)
                })
            }
        },
    )
    .await?;
    // Out of time: the last look's, with whoever had not applied it yet.
    let (ControlFlow::Break(acks) | ControlFlow::Continue(acks)) = acks;
    Ok(acks)
}

/// One look at the acknowledgements of `epoch`: who applied it, who failed, and who on the
/// roster (or live) has not answered yet.
async fn read_acks(
    client: &mut etcd_client::Client,
    name: &str,
    epoch: Epoch,
) -> Result<Acks, FleetError> {
    let (roster, roster_revision) = member::roster(client, name).await?;
    let live: BTreeSet<String> = member::list(client, name)
        .await?
        .into_iter()
        .map(|m| m.id)
        .collect();
    let resp = super::retry(|| {
        let mut client = client.clone();
        async move {
            client
                .get(
                    keys::acks(name, epoch),
                    Some(GetOptions::new().with_prefix()),
                )
                .await
        }
    })
    .await?;
    let mut acks = Acks {
        roster_revision,
        ..Acks::default()
    };
    for ack in resp
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Ack>(kv.value()).ok())
    {
        match (&ack.applied, &ack.error) {
            (Some(_), _) => {
                acks.applied.insert(ack.member, ack.proxied);
            }
            (None, error) => {
                acks.missing.insert(
                    ack.member,
                    Missing::Failed(error.clone().unwrap_or_else(|| "failed".into())),
                );
            }
        }
    }
    let expected = live.iter().chain(roster.iter().map(|m| &m.id));
    for m in expected {
        if !acks.applied.contains_key(m) && !acks.missing.contains_key(m) {
            let why = if live.contains(m) {
                Missing::NotYet
            } else {
                Missing::NotLive
            };
            acks.missing.insert(m.clone(), why);
        }
    }
    Ok(acks)
}

/// Deletes the acknowledgements of a cutover's epochs once the leader has counted them:
/// they live on the members' leases, which last as long as their controllers, so without
/// this every cutover would leave two keys per member behind. Best effort.
pub async fn forget_acks(fleet: &Fleet, epochs: &[Epoch]) {
    let mut client = fleet.client();
    for epoch in epochs {
        let prefix = keys::acks(&fleet.settings.fleet, *epoch);
        let deleted = tokio::time::timeout(
            Duration::from_secs(2),
            client.delete(
                prefix,
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ),
        )
        .await;
        if !matches!(deleted, Ok(Ok(_))) {
            tracing::debug!(%epoch, "could not delete the epoch's acknowledgements");
        }
    }
}

impl Acks {
    /// "proxy-b (no acknowledgement yet), proxy-c (...)".
    #[must_use]
    pub fn describe_missing(&self) -> String {
        self.missing
            .iter()
            .map(|(m, why)| format!("{m} ({why})"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
