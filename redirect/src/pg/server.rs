//! Which server a session, a query or an error is about, named the same way everywhere.

use crate::datapath::Role;

/// Which server a connection, a query or an error is about. Its `Display` is what every
/// message calls that server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// The server a cutover moves new connections away from.
    Old,
    /// The server a cutover moves new connections to.
    New,
    /// The source or the target, by role.
    Is(Role),
    /// The publishing side of a logical replication, whichever role it has.
    Publisher,
    /// The subscribing side of a logical replication.
    Subscriber,
    /// Whichever server the session is to, where the message says more (a statement).
    Either,
}

impl From<Role> for Server {
    fn from(role: Role) -> Self {
        Self::Is(role)
    }
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Old => "old server",
            Self::New => "new server",
            Self::Is(role) => role.name(),
            Self::Publisher => "publisher",
            Self::Subscriber => "subscriber",
            Self::Either => "server",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_server_is_named_as_messages_always_named_it() {
        let names: Vec<String> = [
            Server::Old,
            Server::New,
            Role::Source.into(),
            Role::Target.into(),
            Server::Publisher,
            Server::Subscriber,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            names,
            [
                "old server",
                "new server",
                "source",
                "target",
                "publisher",
                "subscriber"
            ]
        );
    }
}
