//! `PostgreSQL` sessions for the controller: DSN parsing with libpq's TLS modes, passwords that
//! never come from argv, and queries that always have a timeout.

pub mod cluster;
pub mod lag;
pub mod lsn;
pub mod quote;
pub mod server;

pub use lsn::{Lsn, LsnError};
pub use server::Server;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    str::FromStr as _,
    time::Duration,
};

use tokio_postgres::{Client, config::SslMode};

/// Why a `PostgreSQL` operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The DSN is not `key=value ...` libpq syntax, or has an unsupported value.
    #[error("{which} DSN: {reason}")]
    BadDsn { which: Server, reason: String },
    /// Could not connect (network, auth, TLS).
    #[error("connecting to the {which} ({target}): {}", describe(source))]
    Connect {
        which: Server,
        target: String,
        source: tokio_postgres::Error,
    },
    /// Building the TLS connector failed (bad root certificate file, ...).
    #[error("{which} TLS: {reason}")]
    Tls { which: Server, reason: String },
    /// A query failed.
    #[error("{which}: {what}: {}", describe(source))]
    Query {
        which: Server,
        what: &'static str,
        source: tokio_postgres::Error,
    },
    /// A query answered with a WAL position that is not `pg_lsn` text: never read as zero.
    #[error("{which}: {what}: {value:?} is not a pg_lsn (X/Y in hex)")]
    BadLsn {
        which: Server,
        /// The query, as `what` in [`PgError::Query`].
        what: &'static str,
        value: String,
    },
    /// A query did not answer in time.
    #[error("{which}: {what}: no answer within {timeout:?}")]
    Timeout {
        which: Server,
        what: &'static str,
        timeout: Duration,
    },
}

/// libpq's `sslmode`, including the modes tokio-postgres does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Plaintext only.
    Disable,
    /// libpq tries plaintext first, then TLS. tokio-postgres cannot start in plaintext and
    /// upgrade, so this connects as [`TlsMode::Prefer`] does: equally unverified, and it only
    /// differs in which one is tried first.
    Allow,
    /// TLS if the server offers it, else plaintext; nothing is verified (libpq's default).
    Prefer,
    /// Encrypt, but verify nothing (libpq's `require` without a root certificate).
    Require,
    /// Verify the certificate chain against the root certificate(s), not the host name.
    VerifyCa,
    /// Verify the chain and that the certificate names the host.
    VerifyFull,
}

impl TlsMode {
    /// The mode a libpq `sslmode` value names.
    #[must_use]
    pub fn from_libpq(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    /// The libpq `sslmode` value.
    #[must_use]
    pub const fn as_libpq(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// Whether the server's certificate is checked (against [`RootCerts`]).
    #[must_use]
    pub const fn verifies(self) -> bool {
        matches!(self, Self::VerifyCa | Self::VerifyFull)
    }
}

/// What a verifying [`TlsMode`] trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCerts {
    /// Only the certificate(s) in this PEM file: `sslrootcert`, else libpq's default
    /// `~/.postgresql/root.crt`. The system's roots are not trusted.
    File(PathBuf),
    /// The system's trust store (`sslrootcert=system`, as in libpq 16 and later).
    System,
}

/// libpq's default root certificate file, under `$HOME`.
const DEFAULT_ROOT_CERT: &str = ".postgresql/root.crt";

/// What libpq makes of `sslmode` and `sslrootcert`: the mode the connection really has, and
/// what it trusts when it verifies. `default_root` is libpq's `~/.postgresql/root.crt` (if
/// there is a home directory); `exists` tells whether a file exists.
///
/// - No `sslmode` is `prefer`, or `verify-full` with `sslrootcert=system` (libpq 16).
/// - `require` with a root certificate file present (given, or the default one) is
///   `verify-ca`, for compatibility, as libpq documents.
/// - `verify-ca`/`verify-full` need the file; a missing one is an error, as in libpq.
/// - `allow`/`prefer` verify nothing even with a root certificate: libpq would then fall back
///   to plaintext on a failed verification, which tokio-postgres cannot do, and a server (or
///   an attacker) can always answer "no TLS" to those modes anyway.
fn resolve_tls(
    sslmode: Option<&str>,
    sslrootcert: Option<&str>,
    default_root: Option<&Path>,
    exists: impl Fn(&Path) -> bool,
) -> Result<(TlsMode, Option<RootCerts>), String> {
    let system = sslrootcert == Some("system");
    let mode = match sslmode {
        None if system => TlsMode::VerifyFull,
        None => TlsMode::Prefer,
        Some(v) => TlsMode::from_libpq(v).ok_or_else(|| {
            format!(
                "unknown sslmode {v:?} (use disable, allow, prefer, require, verify-ca or verify-full)"
            )
        })?,
    };
    if system {
        if mode != TlsMode::VerifyFull {
            return Err(format!(
                "sslrootcert=system needs sslmode=verify-full, not {} (libpq refuses weaker modes with the system's roots)",
                mode.as_libpq()
            ));
        }
        return Ok((mode, Some(RootCerts::System)));
    }
    let file = match sslrootcert.filter(|s| !s.is_empty()) {
        Some(s) => Some(PathBuf::from(s)),
        None => default_root.map(Path::to_path_buf),
    };
    let present = file.clone().filter(|f| exists(f)).map(RootCerts::File);
    match (mode, present) {
        (TlsMode::Disable | TlsMode::Allow | TlsMode::Prefer, _) | (TlsMode::Require, None) => {
            Ok((mode, None))
        }
        (TlsMode::Require, Some(roots)) => Ok((TlsMode::VerifyCa, Some(roots))),
        (TlsMode::VerifyCa | TlsMode::VerifyFull, Some(roots)) => Ok((mode, Some(roots))),
        (TlsMode::VerifyCa | TlsMode::VerifyFull, None) => Err(match file {
            Some(f) => format!(
                "sslmode={} needs a root certificate, and {} does not exist (give the CA's certificate with sslrootcert=FILE)",
                mode.as_libpq(),
                f.display()
            ),
            None => format!(
                "sslmode={} needs a root certificate: give the CA's certificate with sslrootcert=FILE (there is no home directory for ~/{DEFAULT_ROOT_CERT})",
                mode.as_libpq()
            ),
        }),
    }
}

/// Every certificate in a PEM file; an unreadable file, or one with none, is an error.
fn load_root_certs(path: &Path) -> Result<Vec<native_tls::Certificate>, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("root certificate {}: {e}", path.display()))?;
    let certs = native_tls::Certificate::stack_from_pem(&pem)
        .map_err(|e| format!("root certificate {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "root certificate {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// A parsed connection string for one server, without any password in it.
#[derive(Clone)]
pub struct Dsn {
    pub which: Server,
    pub config: tokio_postgres::Config,
    /// The mode the connection really has (`require` with a root certificate is `verify-ca`).
    pub tls: TlsMode,
    /// What [`TlsMode::VerifyCa`]/[`TlsMode::VerifyFull`] trust; `None` for the other modes.
    pub root_cert: Option<RootCerts>,
    /// `host=… port=… dbname=… user=… sslmode=…`: what logs and errors show.
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
pub fn split_pairs(s: &str) -> Result<Vec<(String, String)>, String> {
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
            // Not echoed: a URI (postgresql://user:secret@host) would print its password.
            return Err(
                "expected key=value pairs; URIs (postgresql://...) are not supported (the text is not shown: it may hold a password)".into(),
            );
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

/// The `key=value` pairs of a libpq conninfo string (`None`: not key=value pairs).
#[must_use]
pub fn conninfo_pairs(conninfo: &str) -> Option<Vec<(String, String)>> {
    split_pairs(conninfo).ok()
}

/// The value of `key` in a libpq conninfo string, if it is there.
#[must_use]
pub fn conninfo_value(conninfo: &str, key: &str) -> Option<String> {
    split_pairs(conninfo)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// `value` as a libpq conninfo value: single-quoted, `\` and `'` escaped.
#[must_use]
pub fn quote_conninfo(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Where a password may come from: never the command line.
#[derive(Clone, Debug, Default)]
pub struct PasswordSources {
    /// A file holding only the password (its first line).
    pub file: Option<PathBuf>,
    /// The name of an environment variable holding it.
    pub env: Option<String>,
}

/// Whether a libpq conninfo string names a password (or cannot be read as key=value pairs,
/// which may be a URI with one).
#[must_use]
pub fn names_a_password(conninfo: &str) -> bool {
    split_pairs(conninfo).map_or(true, |pairs| pairs.iter().any(|(k, _)| k == "password"))
}

impl Dsn {
    /// Parses `dsn`, refusing an inline password, and finds the password in `sources`, then
    /// in the pgpass file (`PGPASSFILE`, else `~/.pgpass`).
    pub fn parse(
        which: impl Into<Server>,
        dsn: &str,
        sources: &PasswordSources,
    ) -> Result<Self, PgError> {
        let which: Server = which.into();
        let bad = |reason: String| PgError::BadDsn { which, reason };
        let pairs = split_pairs(dsn).map_err(bad)?;
        let mut sslmode = None;
        let mut sslrootcert = None;
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
                    sslmode = Some(v.clone());
                    kept.insert(k, v);
                }
                "sslrootcert" => {
                    sslrootcert = Some(v.clone());
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
        let default_root =
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(DEFAULT_ROOT_CERT));
        let (tls, root_cert) = resolve_tls(
            sslmode.as_deref(),
            sslrootcert.as_deref(),
            default_root.as_deref(),
            Path::is_file,
        )
        .map_err(bad)?;
        let mut config = tokio_postgres::Config::from_str(&passthrough.join(" "))
            .map_err(|e| bad(e.to_string()))?;
        config.ssl_mode(match tls {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Allow | TlsMode::Prefer => SslMode::Prefer,
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
        let display = format!(
            "host={host} port={port} dbname={dbname} user={user} sslmode={}",
            tls.as_libpq()
        );
        Ok(Self {
            which,
            config,
            tls,
            root_cert,
            display,
            pairs: kept,
        })
    }

    /// The database this DSN names (libpq's default: the user's name).
    #[must_use]
    pub fn database(&self) -> &str {
        self.config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or("postgres")
    }

    /// The same server, user and password, in another database of its cluster.
    #[must_use]
    pub fn for_database(&self, database: &str) -> Self {
        let mut other = self.clone();
        other.config.dbname(database);
        other.display = self.display.replace(
            &format!(" dbname={} ", self.database()),
            &format!(" dbname={database} "),
        );
        other.pairs.insert("dbname".to_owned(), database.to_owned());
        other
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
            return conforming(client, self).await;
        }
        let connector = self.tls_connector().map_err(|reason| PgError::Tls {
            which: self.which,
            reason,
        })?;
        let (client, conn) = self
            .config
            .connect(postgres_native_tls::MakeTlsConnector::new(connector))
            .await
            .map_err(err)?;
        tokio::spawn(conn);
        conforming(client, self).await
    }

    /// The TLS connector for this DSN's mode, as libpq would verify (see [`resolve_tls`]).
    fn tls_connector(&self) -> Result<native_tls::TlsConnector, String> {
        let mut builder = native_tls::TlsConnector::builder();
        if self.tls.verifies() {
            match &self.root_cert {
                // Trust only the given file, as libpq does: not the system's roots.
                Some(RootCerts::File(path)) => {
                    builder.disable_built_in_roots(true);
                    for cert in load_root_certs(path)? {
                        builder.add_root_certificate(cert);
                    }
                }
                Some(RootCerts::System) => {}
                None => {
                    return Err(format!(
                        "sslmode={} without a root certificate",
                        self.tls.as_libpq()
                    ));
                }
            }
            // verify-ca checks the chain only; verify-full also the host name.
            builder.danger_accept_invalid_hostnames(self.tls == TlsMode::VerifyCa);
        } else {
            // allow, prefer, require: encrypt, verify nothing (libpq without a root file).
            builder
                .danger_accept_invalid_certs(true)
                .danger_accept_invalid_hostnames(true);
        }
        builder.build().map_err(|e| e.to_string())
    }

    /// A libpq connection string for this server without secrets (for `CREATE SUBSCRIPTION`,
    /// where the server itself reads its password from its own pgpass).
    #[must_use]
    pub fn conninfo(&self) -> String {
        self.pairs
            .iter()
            .filter(|(k, _)| k.as_str() != "connect_timeout")
            .map(|(k, v)| format!("{k}={}", quote_conninfo(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `standard_conforming_strings = on` on every session: the controller's SQL literals (a
/// subscription's conninfo, with its password) double quotes and leave backslashes alone,
/// which is right only with it on. A database or role may set it off.
async fn conforming(client: Client, dsn: &Dsn) -> Result<Client, PgError> {
    client
        .batch_execute("SET standard_conforming_strings = on")
        .await
        .map_err(|source| PgError::Connect {
            which: dsn.which,
            target: dsn.display.clone(),
            source,
        })?;
    Ok(client)
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
    which: impl Into<Server>,
    what: &'static str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, PgError> {
    let which = which.into();
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

/// Parses the `pg_lsn` text a query (`which`, `what`) returned; a value that is not one is a
/// [`PgError::BadLsn`] naming the query and the value.
pub fn parse_lsn_of(which: impl Into<Server>, what: &'static str, s: &str) -> Result<Lsn, PgError> {
    s.parse().map_err(|LsnError(value)| PgError::BadLsn {
        which: which.into(),
        what,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::Role;

    #[test]
    fn a_quoted_conninfo_value_reads_back_as_itself() {
        for pw in ["plain", "a b", "it's", "back\\slash", "'\\'", ""] {
            let conninfo = format!("host=h user=u password={}", quote_conninfo(pw));
            assert_eq!(
                conninfo_value(&conninfo, "password").as_deref(),
                Some(pw),
                "{conninfo}"
            );
        }
        assert_eq!(conninfo_value("host=h", "user"), None);
    }

    #[test]
    fn another_database_keeps_the_server_user_and_password() {
        let dsn = Dsn::parse(
            Role::Target,
            "host=198.18.3.2 user=migrator dbname=postgres",
            &PasswordSources::default(),
        )
        .unwrap();
        let mut with_pw = dsn.clone();
        with_pw.config.password("s3cret");
        let other = with_pw.for_database("app2");
        assert_eq!(other.database(), "app2");
        assert_eq!(other.config.get_user(), Some("migrator"));
        assert_eq!(other.config.get_password(), Some(&b"s3cret"[..]));
        assert!(other.display.contains("dbname=app2"), "{}", other.display);
        assert_eq!(
            conninfo_value(&other.conninfo(), "dbname").as_deref(),
            Some("app2")
        );
        assert!(!other.conninfo().contains("s3cret"));
    }

    #[test]
    fn dsn_pairs_and_quotes() {
        let p = split_pairs("host=db.example port = 5433 application_name='a b\\'c'").unwrap();
        assert_eq!(p[0], ("host".into(), "db.example".into()));
        assert_eq!(p[1], ("port".into(), "5433".into()));
        assert_eq!(p[2], ("application_name".into(), "a b'c".into()));
        assert!(split_pairs("postgres://u@h/db").is_err());
        assert!(split_pairs("host='x").is_err());
    }

    /// A test CA (valid 2000-2099), the CA of no server, and a server certificate for
    /// `db.test` issued by the first, with its key. Only for these tests.
    const TEST_ROOT: &str = include_str!("testdata/ca.pem");
    const OTHER_ROOT: &str = include_str!("testdata/other-ca.pem");
    const SERVER_CERT: &str = include_str!("testdata/server.pem");
    const SERVER_KEY: &str = include_str!("testdata/server.key");

    /// A file under the temp dir, unique to this test process.
    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("redirect-pg-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn dsn_refuses_inline_passwords() {
        let none = PasswordSources::default();
        let err = Dsn::parse(Role::Source, "host=h user=u password=secret", &none)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("contains a password") && !err.contains("secret"),
            "{err}"
        );
    }

    #[test]
    fn sslmodes_resolve_like_libpq() {
        use TlsMode::{Allow, Disable, Prefer, Require, VerifyCa, VerifyFull};
        let home = Path::new("/home/u/.postgresql/root.crt");
        let file = |p: &str| Some(RootCerts::File(p.into()));
        let nothing = |_: &Path| false;
        let everything = |_: &Path| true;
        let only_ca = |p: &Path| p == Path::new("/ca.pem");

        // No sslmode is libpq's prefer: unverified, even with a root certificate around.
        assert_eq!(
            resolve_tls(None, None, Some(home), nothing),
            Ok((Prefer, None))
        );
        assert_eq!(
            resolve_tls(None, Some("/ca.pem"), Some(home), everything),
            Ok((Prefer, None))
        );
        for (mode, want) in [
            ("disable", Disable),
            ("allow", Allow),
            ("prefer", Prefer),
            ("require", Require),
        ] {
            assert_eq!(
                resolve_tls(Some(mode), None, Some(home), nothing),
                Ok((want, None)),
                "{mode}"
            );
            assert_eq!(
                resolve_tls(Some(mode), None, None, nothing),
                Ok((want, None)),
                "{mode}"
            );
        }
        for mode in ["allow", "prefer"] {
            assert_eq!(
                resolve_tls(Some(mode), Some("/ca.pem"), Some(home), everything),
                Ok((TlsMode::from_libpq(mode).unwrap(), None)),
                "{mode} never verifies"
            );
        }

        // require with a root certificate file present is verify-ca.
        assert_eq!(
            resolve_tls(Some("require"), Some("/ca.pem"), Some(home), only_ca),
            Ok((VerifyCa, file("/ca.pem")))
        );
        assert_eq!(
            resolve_tls(Some("require"), None, Some(home), everything),
            Ok((VerifyCa, file("/home/u/.postgresql/root.crt"))),
            "libpq's default root.crt counts too"
        );
        assert_eq!(
            resolve_tls(Some("require"), Some("/missing.pem"), Some(home), only_ca),
            Ok((Require, None)),
            "a named file that does not exist leaves require unverified, as in libpq"
        );

        // The verifying modes trust sslrootcert, else the default root.crt, and need one.
        for (mode, want) in [("verify-ca", VerifyCa), ("verify-full", VerifyFull)] {
            assert_eq!(
                resolve_tls(Some(mode), Some("/ca.pem"), Some(home), only_ca),
                Ok((want, file("/ca.pem")))
            );
            assert_eq!(
                resolve_tls(Some(mode), None, Some(home), everything),
                Ok((want, file("/home/u/.postgresql/root.crt")))
            );
            let e = resolve_tls(Some(mode), None, Some(home), nothing).unwrap_err();
            assert!(
                e.contains("/home/u/.postgresql/root.crt does not exist") && e.contains(mode),
                "{e}"
            );
            let e = resolve_tls(Some(mode), Some("/missing.pem"), Some(home), only_ca).unwrap_err();
            assert!(e.contains("/missing.pem does not exist"), "{e}");
            let e = resolve_tls(Some(mode), None, None, nothing).unwrap_err();
            assert!(e.contains("sslrootcert=FILE"), "{e}");
        }

        // sslrootcert=system: the system's roots, verify-full only (libpq 16).
        assert_eq!(
            resolve_tls(None, Some("system"), Some(home), nothing),
            Ok((VerifyFull, Some(RootCerts::System)))
        );
        assert_eq!(
            resolve_tls(Some("verify-full"), Some("system"), None, nothing),
            Ok((VerifyFull, Some(RootCerts::System)))
        );
        assert!(resolve_tls(Some("verify-ca"), Some("system"), None, nothing).is_err());
        assert!(resolve_tls(Some("require"), Some("system"), None, nothing).is_err());

        for bad in ["bogus", "", "Require", "verify_full"] {
            let e = resolve_tls(Some(bad), None, None, nothing).unwrap_err();
            assert!(e.starts_with("unknown sslmode"), "{e}");
        }
    }

    #[test]
    fn dsn_parse_maps_sslmodes() {
        let none = PasswordSources::default();
        let ca = temp_file("ca.pem", TEST_ROOT);
        let ca_s = ca.display().to_string();

        let d = Dsn::parse(Role::Target, "host=h user=u sslmode=disable", &none).unwrap();
        assert_eq!(
            (d.tls, d.config.get_ssl_mode()),
            (TlsMode::Disable, SslMode::Disable)
        );
        let d = Dsn::parse(Role::Target, "host=h user=u sslmode=allow", &none).unwrap();
        assert_eq!(
            (d.tls, d.config.get_ssl_mode()),
            (TlsMode::Allow, SslMode::Prefer)
        );

        let d = Dsn::parse(
            Role::Target,
            &format!("host=h user=u sslmode=verify-full sslrootcert={ca_s}"),
            &none,
        )
        .unwrap();
        assert_eq!(
            (d.tls, d.config.get_ssl_mode()),
            (TlsMode::VerifyFull, SslMode::Require)
        );
        assert_eq!(d.root_cert, Some(RootCerts::File(ca.clone())));
        assert_eq!(
            format!("{d:?}"),
            "host=h port=5432 dbname=u user=u sslmode=verify-full"
        );

        let d = Dsn::parse(
            Role::Target,
            &format!("host=h user=u sslmode=require sslrootcert={ca_s}"),
            &none,
        )
        .unwrap();
        assert_eq!(
            (d.tls, d.config.get_ssl_mode()),
            (TlsMode::VerifyCa, SslMode::Require)
        );
        assert!(format!("{d:?}").ends_with("sslmode=verify-ca"), "{d:?}");
        assert_eq!(
            conninfo_value(&d.conninfo(), "sslmode").as_deref(),
            Some("require"),
            "conninfo keeps what was written"
        );

        let e = Dsn::parse(
            Role::Target,
            "host=h sslmode=verify-ca sslrootcert=/nonexistent/ca.pem",
            &none,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("target DSN: sslmode=verify-ca needs a root certificate"),
            "{e}"
        );
        let e = Dsn::parse(Role::Target, "host=h sslmode=bogus", &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown sslmode \"bogus\""), "{e}");
        std::fs::remove_file(ca).unwrap();
    }

    #[test]
    fn verifying_connectors_load_every_root_certificate() {
        let none = PasswordSources::default();
        let two = temp_file("two.pem", &format!("{TEST_ROOT}{TEST_ROOT}"));
        assert_eq!(load_root_certs(&two).unwrap().len(), 2);
        for mode in ["verify-ca", "verify-full", "require"] {
            let d = Dsn::parse(
                Role::Target,
                &format!("host=h sslmode={mode} sslrootcert={}", two.display()),
                &none,
            )
            .unwrap();
            assert!(d.tls_connector().is_ok(), "{mode}");
        }
        let d = Dsn::parse(Role::Target, "host=h sslmode=require", &none).unwrap();
        if d.tls == TlsMode::Require {
            assert!(d.tls_connector().is_ok());
        }

        let junk = temp_file("junk.pem", "not a certificate\n");
        let Err(e) = load_root_certs(&junk) else {
            panic!("a file without certificates loads")
        };
        assert!(e.contains("no PEM certificate"), "{e}");
        let d = Dsn::parse(
            Role::Target,
            &format!("host=h sslmode=verify-full sslrootcert={}", junk.display()),
            &none,
        )
        .unwrap();
        assert!(
            d.tls_connector()
                .unwrap_err()
                .contains("no PEM certificate")
        );
        for f in [two, junk] {
            std::fs::remove_file(f).unwrap();
        }
    }

    /// A TLS handshake of `dsn`'s connector, as host `name`, with a local server presenting
    /// the `db.test` certificate.
    fn handshake(dsn: &Dsn, name: &str) -> Result<(), String> {
        let identity =
            native_tls::Identity::from_pkcs8(SERVER_CERT.as_bytes(), SERVER_KEY.as_bytes())
                .unwrap();
        let acceptor = native_tls::TlsAcceptor::new(identity).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            drop(acceptor.accept(stream));
        });
        let connector = dsn.tls_connector()?;
        let stream = std::net::TcpStream::connect(addr).unwrap();
        let result = connector
            .connect(name, stream)
            .map(drop)
            .map_err(|e| e.to_string());
        server.join().unwrap();
        result
    }

    #[test]
    fn verification_trusts_only_sslrootcert_and_checks_names_in_verify_full() {
        let none = PasswordSources::default();
        let ca = temp_file("hs-ca.pem", TEST_ROOT);
        let other = temp_file("hs-other.pem", OTHER_ROOT);
        let dsn = |mode: &str, root: &Path| {
            Dsn::parse(
                Role::Target,
                &format!("host=db.test sslmode={mode} sslrootcert={}", root.display()),
                &none,
            )
            .unwrap()
        };
        let missing = Path::new("/nonexistent/root.crt");
        for (mode, root, name, ok) in [
            ("verify-full", ca.as_path(), "db.test", true),
            ("verify-full", &ca, "wrong.test", false),
            ("verify-full", &other, "db.test", false),
            ("verify-ca", &ca, "wrong.test", true),
            ("verify-ca", &other, "db.test", false),
            // require with a root certificate is verify-ca; without one it verifies nothing.
            ("require", &other, "db.test", false),
            ("require", &ca, "wrong.test", true),
            ("require", missing, "wrong.test", true),
            ("prefer", &other, "wrong.test", true),
            ("allow", &other, "wrong.test", true),
        ] {
            let d = dsn(mode, root);
            let result = handshake(&d, name);
            assert_eq!(
                result.is_ok(),
                ok,
                "sslmode={mode} sslrootcert={} as {name}: {result:?}",
                root.display()
            );
        }
        for f in [ca, other] {
            std::fs::remove_file(f).unwrap();
        }
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
        assert_eq!("16/B374D848".parse(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!("0/0".parse(), Ok(Lsn(0)));
        let e = parse_lsn_of(Role::Source, "pg_current_wal_lsn()", "nope")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("source: pg_current_wal_lsn(): \"nope\" is not a pg_lsn"),
            "{e}"
        );
    }
}
