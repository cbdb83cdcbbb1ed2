//! systemd's readiness protocol (`Type=notify`): a datagram such as `READY=1` to the unix
//! socket named by `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). Without the
//! variable (not started by systemd) every call does nothing. Small enough not to need a crate.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (newline-separated `KEY=value` lines) to systemd, if it is listening.
/// A failure is logged, never fatal: the service works without its supervisor's bookkeeping.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let send = || -> std::io::Result<()> {
        let addr = match path.to_str().and_then(|p| p.strip_prefix('@')) {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(&path)?,
        };
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    };
    if let Err(e) = send() {
        tracing::warn!(socket = ?path, error = %e, state, "could not notify systemd");
    }
}

/// The datapath is attached and the control socket serves.
pub fn ready(status: &str) {
    notify(&format!(
        "READY=1\nSTATUS={status}\nMAINPID={}",
        std::process::id()
    ));
}

/// The controller is stopping (the datapath stays).
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=stopping; the datapath stays attached");
}
