//! `PostgreSQL` sessions for the controller: DSN parsing with libpq's TLS modes, passwords that
//! never come from argv, and queries that always have a timeout.

pub mod lag;
pub mod lsn;

pub use lsn::{Lsn, LsnError};

use std::{collections::BTreeMap, path::PathBuf, str::FromStr as _, time::Duration};

use tokio_postgres::{Client, config::SslMode};

/// Why a `PostgreSQL` operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The DSN is not `key=value ...` libpq syntax, or has an unsupported value.
    #[error("{which} DSN: {reason}")]
    BadDsn { which: &'static str, reason: String },
    /// Could not connect (network, auth, TLS).
    #[error("connecting to the {which} ({target}): {}", describe(source))]
    Connect {
        which: &'static str,
        target: String,
        source: tokio_postgres::Error,
    },
    /// Building the TLS connector failed (bad root certificate file, ...).
    #[error("{which} TLS: {reason}")]
    Tls { which: &'static str, reason: String },
    /// A query failed.
    #[error("{which}: {what}: {}", describe(source))]
    Query {
        which: &'static str,
        what: &'static str,
        source: tokio_postgres::Error,
    },
    /// A query answered with a WAL position that is not `pg_lsn` text: never read as zero.
    #[error("{which}: {what}: {value:?} is not a pg_lsn (X/Y in hex)")]
    BadLsn {
        which: &'static str,
        /// The query, as `what` in [`PgError::Query`].
        what: &'static str,
        value: String,
    },
    /// A query did not answer in time.
    #[error("{which}: {what}: no answer within {timeout:?}")]
    Timeout {
        which: &'static str,
        what: &'static str,
        timeout: Duration,
    },
}

/// libpq's `sslmode`, including the verifying modes tokio-postgres does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    /// Encrypt, but verify nothing (libpq's `require` without a root certificate).
    Require,
    /// Verify the certificate chain, not the host name.
    VerifyCa,
    /// Verify the chain and that the certificate names the host.
    VerifyFull,
}

/// A parsed connection string for one server, without any password in it.
#[derive(Clone)]
pub struct Dsn {
    pub which: &'static str,
    pub config: tokio_postgres::Config,
    pub tls: TlsMode,
    pub root_cert: Option<PathBuf>,
    /// `host=… port=… dbname=… user=…`: what logs and errors show.
    pub display: String,
    /// The original key/value pairs minus secrets, e.g. to hand to `CREATE SUBSCRIPTION`.
    pub pairs: BTreeMap<String, String>,
}

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// Splits libpq `key=value` pairs; values may be single-quoted with `\'` and `\\` escapes.
fn split_pairs(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!(
                "expected key=value, found {key:?} (URIs are not supported; use key=value pairs)"
            ));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.push(chars.next().ok_or("dangling backslash")?),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(format!("unterminated quote in the value of {key}")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

/// Where a password may come from: never the command line.
#[derive(Clone, Debug, Default)]
pub struct PasswordSources {
    /// A file holding only the password (its first line).
    pub file: Option<PathBuf>,
    /// The name of an environment variable holding it.
    pub env: Option<String>,
}

impl Dsn {
    /// Parses `dsn`, refusing an inline password, and finds the password in `sources`, then
    /// in the pgpass file (`PGPASSFILE`, else `~/.pgpass`).
    pub fn parse(
        which: &'static str,
        dsn: &str,
        sources: &PasswordSources,
    ) -> Result<Self, PgError> {
        let bad = |reason: String| PgError::BadDsn { which, reason };
        let pairs = split_pairs(dsn).map_err(bad)?;
        let mut tls = TlsMode::Prefer;
        let mut root_cert = None;
        let mut passthrough = Vec::new();
        let mut kept = BTreeMap::new();
        for (k, v) in pairs {
            match k.as_str() {
                "password" => {
                    return Err(bad(
                        "contains a password; passwords are never taken from the command line or the DSN: use PGPASSFILE, a password file or the environment".into(),
                    ));
                }
                "sslmode" => {
                    tls = match v.as_str() {
                        "disable" => TlsMode::Disable,
                        "allow" | "prefer" => TlsMode::Prefer,
                        "require" => TlsMode::Require,
                        "verify-ca" => TlsMode::VerifyCa,
                        "verify-full" => TlsMode::VerifyFull,
                        other => return Err(bad(format!("unknown sslmode {other:?}"))),
                    };
                    kept.insert(k, v);
                }
                "sslrootcert" => {
                    root_cert = Some(PathBuf::from(&v));
                    kept.insert(k, v);
                }
                _ => {
                    passthrough.push(format!(
                        "{k}='{}'",
                        v.replace('\\', "\\\\").replace('\'', "\\'")
                    ));
                    kept.insert(k, v);
                }
            }
        }
        let mut config = tokio_postgres::Config::from_str(&passthrough.join(" "))
            .map_err(|e| bad(e.to_string()))?;
        config.ssl_mode(match tls {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        });
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.application_name("redirect");
        let host = config
            .get_hosts()
            .first()
            .map_or_else(String::new, |h| match h {
                tokio_postgres::config::Host::Tcp(s) => s.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            });
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or("postgres").to_owned();
        let dbname = config.get_dbname().unwrap_or(&user).to_owned();
        if let Some(pw) = password(sources, &host, port, &dbname, &user).map_err(bad)? {
            config.password(pw);
        }
        let display = format!("host={host} port={port} dbname={dbname} user={user}");
        Ok(Self {
            which,
            config,
            tls,
            root_cert,
            display,
            pairs: kept,
        })
    }

    /// Opens a session; its connection task runs on the current runtime until the client drops.
    pub async fn connect(&self) -> Result<Client, PgError> {
        let err = |source| PgError::Connect {
            which: self.which,
            target: self.display.clone(),
            source,
        };
        if self.tls == TlsMode::Disable {
            let (client, conn) = self
                .config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(err)?;
            tokio::spawn(conn);
            return Ok(client);
        }
        let mut builder = native_tls::TlsConnector::builder();
        match self.tls {
            TlsMode::Prefer | TlsMode::Require => {
                builder
                    .danger_accept_invalid_certs(true)
                    .danger_accept_invalid_hostnames(true);
            }
            TlsMode::VerifyCa => {
                builder.danger_accept_invalid_hostnames(true);
            }
            TlsMode::VerifyFull | TlsMode::Disable => {}
        }
        if let Some(path) = &self.root_cert {
            let pem = std::fs::read(path).map_err(|e| PgError::Tls {
                which: self.which,
                reason: format!("{}: {e}", path.display()),
            })?;
            let cert = native_tls::Certificate::from_pem(&pem).map_err(|e| PgError::Tls {
                which: self.which,
                reason: format!("{}: {e}", path.display()),
            })?;
            builder.add_root_certificate(cert);
        }
        let connector = builder.build().map_err(|e| PgError::Tls {
            which: self.which,
            reason: e.to_string(),
        })?;
        let (client, conn) = self
            .config
            .connect(postgres_native_tls::MakeTlsConnector::new(connector))
            .await
            .map_err(err)?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// A libpq connection string for this server without secrets (for `CREATE SUBSCRIPTION`,
    /// where the server itself reads its password from its own pgpass).
    #[must_use]
    pub fn conninfo(&self) -> String {
        self.pairs
            .iter()
            .filter(|(k, _)| k.as_str() != "connect_timeout")
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn password(
    sources: &PasswordSources,
    host: &str,
    port: u16,
    db: &str,
    user: &str,
) -> Result<Option<String>, String> {
    if let Some(path) = &sources.file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("password file {}: {e}", path.display()))?;
        return Ok(text.lines().next().map(str::to_owned));
    }
    if let Some(var) = &sources.env
        && let Ok(pw) = std::env::var(var)
    {
        return Ok(Some(pw));
    }
    let pgpass = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass")));
    let Some(pgpass) = pgpass else {
        return Ok(None);
    };
    let Ok(text) = std::fs::read_to_string(&pgpass) else {
        return Ok(None);
    };
    Ok(pgpass_lookup(&text, host, port, db, user))
}

/// The first matching line of a pgpass file (`host:port:db:user:password`, `*` matches
/// anything, `\:` and `\\` escape).
#[must_use]
pub fn pgpass_lookup(text: &str, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let want = [host, port.as_str(), db, user];
        if fields[..4]
            .iter()
            .zip(want)
            .all(|(f, w)| f == "*" || f == w)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

/// The server's message for a database error (tokio-postgres only says "db error"), else the
/// error with its causes.
#[must_use]
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Runs one query with a timeout, mapping both failure kinds to [`PgError`].
pub async fn timed<T>(
    which: &'static str,
    what: &'static str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, PgError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(PgError::Query {
            which,
            what,
            source,
        }),
        Err(_) => Err(PgError::Timeout {
            which,
            what,
            timeout,
        }),
    }
}

/// Parses a `pg_lsn` text (`16/B374D848`) into its 64-bit position. Prefer [`Lsn`] and
/// [`parse_lsn_of`], which keep the bad value for the error instead of `None`.
#[must_use]
pub fn parse_lsn(s: &str) -> Option<u64> {
    s.parse::<Lsn>().ok().map(u64::from)
}

/// Parses the `pg_lsn` text a query (`which`, `what`) returned; a value that is not one is a
/// [`PgError::BadLsn`] naming the query and the value.
pub fn parse_lsn_of(which: &'static str, what: &'static str, s: &str) -> Result<Lsn, PgError> {
    s.parse()
        .map_err(|LsnError(value)| PgError::BadLsn { which, what, value })
}

/// Formats a 64-bit WAL position as `pg_lsn` text.
#[must_use]
pub fn format_lsn(lsn: u64) -> String {
    Lsn(lsn).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_pairs_and_quotes() {
        let p = split_pairs("host=db.example port = 5433 application_name='a b\\'c'").unwrap();
        assert_eq!(p[0], ("host".into(), "db.example".into()));
        assert_eq!(p[1], ("port".into(), "5433".into()));
        assert_eq!(p[2], ("application_name".into(), "a b'c".into()));
        assert!(split_pairs("postgres://u@h/db").is_err());
        assert!(split_pairs("host='x").is_err());
    }

    #[test]
    fn dsn_refuses_inline_passwords_and_maps_sslmodes() {
        let none = PasswordSources::default();
        let err = Dsn::parse("source", "host=h user=u password=secret", &none)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("contains a password") && !err.contains("secret"),
            "{err}"
        );
        let d = Dsn::parse(
            "target",
            "host=h user=u sslmode=verify-full sslrootcert=/x.pem",
            &none,
        )
        .unwrap();
        assert_eq!(
            (d.tls, d.config.get_ssl_mode()),
            (TlsMode::VerifyFull, SslMode::Require)
        );
        assert!(Dsn::parse("target", "host=h sslmode=bogus", &none).is_err());
        assert_eq!(format!("{d:?}"), "host=h port=5432 dbname=u user=u");
    }

    #[test]
    fn pgpass_matching() {
        let text = "# comment\nother:5432:*:u:no\nh:5432:*:u:pa\\:ss\n*:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(text, "h", 5432, "db", "u").as_deref(),
            Some("pa:ss")
        );
        assert_eq!(
            pgpass_lookup(text, "x", 1, "db", "v").as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup("h:5432:db:u:p", "h", 5433, "db", "u"), None);
    }

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("nope"), None);
        assert_eq!(parse_lsn("0/0"), Some(0));
        let e = parse_lsn_of("source", "pg_current_wal_lsn()", "nope")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("source: pg_current_wal_lsn(): \"nope\" is not a pg_lsn"),
            "{e}"
        );
    }
}
