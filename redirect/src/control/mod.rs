//! The control socket: a root-only Unix socket on which the running controller serves the CLI
//! (`flip`, `lag`, `status`, `status --watch`, `verify`, `fix`, `finish`, `fleet`). One JSON
//! request per connection; the answer is JSON lines: `{"progress": "..."}` while a long step
//! runs, then `{"ok": ...}` or `{"error": "..."}`.
//!
//! - [`protocol`]: the requests, each with the type of its answer;
//! - [`server`]: the controller's side, one function per request;
//! - [`client`]: the CLI's side, [`ask`].

use std::time::Duration;

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{ask, state};
pub use protocol::{Ask, Request, State};
pub use server::serve;

/// A transaction open longer than this on the old server blocks a cutover (`long-transaction`):
/// long enough that no OLTP transaction trips it, short enough that a batch job does.
pub const DEFAULT_MAX_TRANSACTION_AGE: Duration = Duration::from_secs(300);

/// Where the CLI finds the controller by default.
pub const DEFAULT_SOCKET: &str = "/run/redirect/control.sock";
