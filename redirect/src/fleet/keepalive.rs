//! Keeping an etcd lease alive on one long-lived keep-alive stream, as etcd's own clients do:
//! a request every renewal period on the same stream, each answered with the lease's TTL.
//! The stream is re-made only when it breaks. (One stream per renewal, as this module
//! replaced, hid the one answer that matters: etcd-client reads a new stream's first reply
//! itself and turns "this lease does not exist" into an error that looked like any other, so
//! a member whose lease expired while etcd was away never registered again.)

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};

/// What etcd said of the lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed: it lives another TTL.
    Alive,
    /// It does not exist (expired, revoked, or lost in a restore): the keys under it are gone.
    Gone,
}

/// Why a keep-alive stream stopped answering: it is re-made, on the same lease.
#[derive(Debug, thiserror::Error)]
pub enum Broken {
    #[error("{0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd closed the keep-alive stream")]
    Ended,
}

impl Broken {
    /// As an etcd error, for [`super::retry`] (which retries those that never reached etcd).
    #[must_use]
    pub fn into_etcd(self) -> etcd_client::Error {
        match self {
            Self::Etcd(e) => e,
            Self::Ended => etcd_client::Error::LeaseKeepAliveError("the stream ended".into()),
        }
    }
}

/// A lease's keep-alive stream.
pub struct Renewer {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

impl Renewer {
    /// Opens the stream with one renewal. `Ok(None)`: the lease does not exist.
    pub async fn open(client: &mut Client, lease: i64) -> Result<Option<Self>, Broken> {
        match client.lease_keep_alive(lease).await {
            Ok((keeper, stream)) => Ok(Some(Self { keeper, stream })),
            // etcd-client 0.21 reads the new stream's first reply and returns this error, and
            // only this one, when its TTL is 0: etcd's answer for a lease it does not have.
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// One renewal on the open stream. The caller bounds it: a paused etcd answers nothing.
    pub async fn renew(&mut self) -> Result<Renewal, Broken> {
        self.keeper.keep_alive().await?;
        match self.stream.message().await? {
            Some(reply) if reply.ttl() > 0 => Ok(Renewal::Alive),
            Some(_) => Ok(Renewal::Gone),
            None => Err(Broken::Ended),
        }
    }
}
