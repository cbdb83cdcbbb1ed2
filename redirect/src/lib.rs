//! `redirect`: move a live `PostgreSQL` database to a new server without downtime.
//!
//! The kernel half ([`datapath`]) is an XDP full-NAT program that sends each new TCP connection
//! for the VIP to the active backend and keeps every established connection on the backend it
//! started on. This crate loads it, pins it, flips it, inspects it and garbage-collects its
//! connection table.
//!
//! When the controller (`redirect run`) exits, traffic is unaffected: the program, its maps
//! and its XDP links stay pinned under the pin directory and keep forwarding with the last
//! `ACTIVE` value. Only conntrack garbage collection pauses until a controller re-adopts them.

pub mod cli;
pub mod clock;
pub mod conntrack;
pub mod control;
pub mod controller;
pub mod cutover;
pub mod daemon;
pub mod datapath;
pub mod events;
pub mod fleet;
pub mod host;
pub mod journal;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod pg;
pub mod poll;
pub mod snapshot;
pub mod sync;
pub mod verify;

pub use daemon::{Config, serve};
