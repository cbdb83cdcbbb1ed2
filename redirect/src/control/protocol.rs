//! What travels on the control socket: one [`Request`] per connection, answered by JSON lines of
//! [`Reply`]. Each request is a type that names its answer ([`Ask::Answer`]): the controller
//! encodes that type and the CLI decodes the same one, so neither side indexes JSON by name.
//!
//! The wire form is serde's default for an enum: `"Lag"` for a request without fields,
//! `{"Flip": {...}}` for one with them.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    controller::Phase,
    cutover::{
        FlipReport,
        finish::FinishReport,
        guardrails::{
            Guardrail,
            fix::{FixReport, Identity},
        },
    },
    datapath::Role,
    fleet::{View, commit::FleetFlip, member::Enrolled},
    pg::{cluster::Database, lag::ReplicaLag},
    snapshot::Snapshot,
    verify::report::Report as VerifyReport,
};

/// A request and the type of its answer.
pub trait Ask: Into<Request> {
    type Answer: Serialize + DeserializeOwned;
}

/// One line of the controller's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply<T> {
    /// A long step's progress, for the operator (any number, before the end).
    Progress(String),
    /// The answer: the last line.
    Ok(T),
    /// Why there is no answer: the last line.
    Error(String),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Flip(Flip),
    FixReplicaIdentity(FixReplicaIdentity),
    FixPublication(FixPublication),
    Lag,
    Databases,
    HasDatabases,
    Finish(Finish),
    State,
    Snapshot,
    Fleet,
    FleetFlip(FleetFlipRequest),
    FleetForget(FleetForget),
    Verify(Verify),
}

/// A safe cutover (`redirect flip`); streams progress, answers what it did.
#[derive(Debug, Serialize, Deserialize)]
pub struct Flip {
    pub to: Role,
    pub max_lag_bytes: u64,
    pub max_lag_time_ms: u64,
    pub timeout_ms: u64,
    pub drain_timeout_ms: u64,
    pub dry_run: bool,
    pub force: bool,
    /// Guardrails allowed for this cutover (`--allow`).
    #[serde(default)]
    pub allow: Vec<Guardrail>,
    /// `--max-transaction-age`; absent: the default.
    #[serde(default)]
    pub max_transaction_age_ms: Option<u64>,
    /// `--etcd-timeout`; absent: the default.
    #[serde(default)]
    pub etcd_timeout_ms: Option<u64>,
    /// `--lag-wait`; absent: the default.
    #[serde(default)]
    pub lag_wait_ms: Option<u64>,
}

/// A mechanical fix for a guardrail finding: printed, and applied only with `apply`.
#[derive(Debug, Serialize, Deserialize)]
pub struct FixReplicaIdentity {
    pub table: String,
    pub identity: Identity,
    pub apply: bool,
}

/// Add a table to the publication feeding the new server, and have it copied.
#[derive(Debug, Serialize, Deserialize)]
pub struct FixPublication {
    pub table: String,
    pub apply: bool,
}

/// Replication lag between the active server and the other one, per database.
#[derive(Debug)]
pub struct Lag;

/// Every database on the two servers and what a cutover now would do with it.
#[derive(Debug)]
pub struct Databases;

/// Whether the controller knows both servers (was started with their DSNs).
#[derive(Debug)]
pub struct HasDatabases;

/// Plan (and with `execute`, carry out) the end of the migration.
#[derive(Debug, Serialize, Deserialize)]
pub struct Finish {
    pub execute: bool,
    pub force: bool,
}

/// What the controller is doing, and what its last recovery did.
#[derive(Debug)]
pub struct StateRequest;

/// Counters, connections, port use, lag and phase in one cheap answer (no table walk): what
/// `status --watch` asks for every interval.
#[derive(Debug)]
pub struct SnapshotRequest;

/// The fleet this controller is a member of (`None` without `--etcd`).
#[derive(Debug)]
pub struct FleetRequest;

/// A fleet-wide immediate flip (`flip --immediate` on a fleet member): commit the next epoch
/// in etcd and wait for every live member to apply it.
#[derive(Debug, Serialize, Deserialize)]
pub struct FleetFlipRequest {
    pub to: Role,
    pub ack_timeout_ms: u64,
    /// `--etcd-timeout`; absent: the default.
    #[serde(default)]
    pub etcd_timeout_ms: Option<u64>,
}

/// Take a member that is not live off the fleet's roster (`redirect fleet forget`).
#[derive(Debug, Serialize, Deserialize)]
pub struct FleetForget {
    pub member: String,
}

/// Compare the two databases (`redirect verify`); streams progress, answers the report.
#[derive(Debug, Serialize, Deserialize)]
pub struct Verify {
    pub tables: Vec<String>,
    pub chunk_rows: u64,
    pub rate: Option<u64>,
    pub catch_up_timeout_ms: u64,
    pub statement_timeout_ms: u64,
    pub max_keys: usize,
    /// Only these databases (empty: every replicated one).
    #[serde(default)]
    pub databases: Vec<String>,
}

/// The answer to [`StateRequest`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub phase: Phase,
    /// What the last recovery of an interrupted cutover did.
    pub last_recovery: Option<String>,
}

/// Pairs each request type with its variant and its answer.
macro_rules! asks {
    ($($ty:ident => $variant:ident $( ( $_field:tt ) )? : $answer:ty;)*) => {$(
        impl Ask for $ty {
            type Answer = $answer;
        }
        asks!(@into $ty => $variant $( ( $_field ) )?);
    )*};
    (@into $ty:ident => $variant:ident (_)) => {
        impl From<$ty> for Request {
            fn from(request: $ty) -> Self {
                Request::$variant(request)
            }
        }
    };
    (@into $ty:ident => $variant:ident) => {
        impl From<$ty> for Request {
            fn from(_: $ty) -> Self {
                Request::$variant
            }
        }
    };
}

asks! {
    Flip => Flip(_): FlipReport;
    FixReplicaIdentity => FixReplicaIdentity(_): FixReport;
    FixPublication => FixPublication(_): FixReport;
    Lag => Lag: ReplicaLag;
    Databases => Databases: Vec<Database>;
    HasDatabases => HasDatabases: bool;
    Finish => Finish(_): FinishReport;
    StateRequest => State: State;
    SnapshotRequest => Snapshot: Snapshot;
    FleetRequest => Fleet: Option<View>;
    FleetFlipRequest => FleetFlip(_): FleetFlip;
    FleetForget => FleetForget(_): Enrolled;
    Verify => Verify(_): VerifyReport;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire form stays what older CLIs and controllers send: a request with fields is
    /// the same JSON as the struct variant it replaced.
    #[test]
    fn requests_keep_their_wire_form() {
        let finish: Request = Finish {
            execute: true,
            force: false,
        }
        .into();
        assert_eq!(
            serde_json::to_string(&finish).unwrap(),
            r#"{"Finish":{"execute":true,"force":false}}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::from(Lag)).unwrap(),
            r#""Lag""#
        );
        let old_flip = r#"{"Flip":{"to":"target","max_lag_bytes":1,"max_lag_time_ms":2,
            "timeout_ms":3,"drain_timeout_ms":4,"dry_run":true,"force":false}}"#;
        let Request::Flip(flip) = serde_json::from_str(old_flip).unwrap() else {
            panic!("a flip request decodes as a flip");
        };
        assert_eq!(
            (flip.to, flip.lag_wait_ms, flip.allow.len()),
            (Role::Target, None, 0)
        );
    }

    /// Every request's JSON, as CLIs and controllers of earlier versions send and read it.
    #[test]
    fn every_request_keeps_its_wire_form() {
        let cases: Vec<(Request, &str)> = vec![
            (Lag.into(), r#""Lag""#),
            (Databases.into(), r#""Databases""#),
            (HasDatabases.into(), r#""HasDatabases""#),
            (StateRequest.into(), r#""State""#),
            (SnapshotRequest.into(), r#""Snapshot""#),
            (FleetRequest.into(), r#""Fleet""#),
            (
                Finish {
                    execute: false,
                    force: true,
                }
                .into(),
                r#"{"Finish":{"execute":false,"force":true}}"#,
            ),
            (
                FleetForget {
                    member: "p-1".into(),
                }
                .into(),
                r#"{"FleetForget":{"member":"p-1"}}"#,
            ),
            (
                FleetFlipRequest {
                    to: Role::Source,
                    ack_timeout_ms: 5,
                    etcd_timeout_ms: None,
                }
                .into(),
                r#"{"FleetFlip":{"to":"source","ack_timeout_ms":5,"etcd_timeout_ms":null}}"#,
            ),
            (
                FixPublication {
                    table: "public.t".into(),
                    apply: true,
                }
                .into(),
                r#"{"FixPublication":{"table":"public.t","apply":true}}"#,
            ),
            (
                FixReplicaIdentity {
                    table: "public.t".into(),
                    identity: Identity::Full,
                    apply: false,
                }
                .into(),
                r#"{"FixReplicaIdentity":{"table":"public.t","identity":"full","apply":false}}"#,
            ),
            (
                Verify {
                    tables: vec!["public.t".into()],
                    chunk_rows: 10,
                    rate: None,
                    catch_up_timeout_ms: 1,
                    statement_timeout_ms: 2,
                    max_keys: 3,
                    databases: vec![],
                }
                .into(),
                r#"{"Verify":{"tables":["public.t"],"chunk_rows":10,"rate":null,"catch_up_timeout_ms":1,"statement_timeout_ms":2,"max_keys":3,"databases":[]}}"#,
            ),
            (
                Flip {
                    to: Role::Target,
                    max_lag_bytes: 1,
                    max_lag_time_ms: 2,
                    timeout_ms: 3,
                    drain_timeout_ms: 4,
                    dry_run: false,
                    force: false,
                    allow: vec![],
                    max_transaction_age_ms: Some(5),
                    etcd_timeout_ms: None,
                    lag_wait_ms: Some(6),
                }
                .into(),
                r#"{"Flip":{"to":"target","max_lag_bytes":1,"max_lag_time_ms":2,"timeout_ms":3,"drain_timeout_ms":4,"dry_run":false,"force":false,"allow":[],"max_transaction_age_ms":5,"etcd_timeout_ms":null,"lag_wait_ms":6}}"#,
            ),
        ];
        for (request, wire) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), wire);
            let back: Request = serde_json::from_str(wire).unwrap();
            assert_eq!(
                serde_json::to_string(&back).unwrap(),
                wire,
                "{wire} reads back"
            );
        }
    }

    #[test]
    fn a_reply_decodes_into_the_answer_its_request_names() {
        let line = serde_json::to_string(&Reply::Ok(State {
            phase: Phase::Idle,
            last_recovery: Some("rolled back".into()),
        }))
        .unwrap();
        let Reply::Ok(state) =
            serde_json::from_str::<Reply<<StateRequest as Ask>::Answer>>(&line).unwrap()
        else {
            panic!("an ok line decodes as ok");
        };
        assert_eq!(state.last_recovery.as_deref(), Some("rolled back"));
        let error: Reply<bool> = serde_json::from_str(r#"{"error":"no"}"#).unwrap();
        assert!(matches!(error, Reply::Error(e) if e == "no"));
    }
}
