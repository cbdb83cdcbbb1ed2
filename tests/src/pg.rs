//! Real `PostgreSQL` servers for the lab, started from the image's binaries inside a namespace.

use std::{fmt::Write as _, path::PathBuf, process::Command, time::Duration};

use crate::{Lab, Ns, PG_PORT, sh, wait_for};

/// Runs the rest of a command line as the postgres user (the server refuses to run as root).
pub const AS_POSTGRES: [&str; 6] = [
    "setpriv",
    "--reuid",
    "postgres",
    "--regid",
    "postgres",
    "--init-groups",
];

/// Where Debian keeps the server binaries (15) and the client tools every lab uses with any
/// server: psql, pgbench, `pg_isready`.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Where `cargo xtask setup` unpacks the other majors' server binaries: `<major>/{bin,lib}`.
pub const OTHER_MAJORS_DIR: &str = "/opt/redirect-pg";

/// A `PostgreSQL` major version a lab server runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Major(pub u32);

impl Major {
    /// Debian's, the one [`start`] runs.
    pub const DEBIAN: Major = Major(15);

    /// The directory of `initdb` and `postgres`.
    #[must_use]
    pub fn bin_dir(self) -> PathBuf {
        if self == Self::DEBIAN {
            PathBuf::from(PG_BIN)
        } else {
            PathBuf::from(format!("{OTHER_MAJORS_DIR}/{}/bin", self.0))
        }
    }

    /// What the npm-packaged binaries need in `LD_LIBRARY_PATH` (their own libpq, ICU and
    /// OpenSSL 1.1); nothing for Debian's.
    #[must_use]
    pub fn lib_dir(self) -> Option<PathBuf> {
        (self != Self::DEBIAN).then(|| PathBuf::from(format!("{OTHER_MAJORS_DIR}/{}/lib", self.0)))
    }

    /// The argv prefix that runs `program` (`initdb`, `postgres`) of this major as the
    /// postgres user, with its libraries.
    fn as_postgres(self, program: &str) -> Vec<String> {
        let bin = self.bin_dir().join(program);
        assert!(
            bin.exists(),
            "{} is missing: run `cargo xtask setup` to install PostgreSQL {}",
            bin.display(),
            self.0
        );
        let mut argv: Vec<String> = AS_POSTGRES.iter().map(|s| (*s).to_owned()).collect();
        if let Some(lib) = self.lib_dir() {
            argv.extend([
                "env".to_owned(),
                format!("LD_LIBRARY_PATH={}", lib.display()),
            ]);
        }
        argv.push(bin.display().to_string());
        argv
    }

    /// `server_version_num`'s major: 170010 → 17, 130023 → 13.
    #[must_use]
    pub fn of_version_num(num: &str) -> Option<Major> {
        num.trim().parse::<u32>().ok().map(|n| Major(n / 10_000))
    }
}

impl std::fmt::Display for Major {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A server started by [`start`]; it stops when its lab drops.
pub struct Pg {
    pub name: String,
    pub data_dir: PathBuf,
    pub pid: u32,
    pub major: Major,
}

/// `initdb` + `postgres` in namespace `ns`, listening on every address of that namespace on
/// port 5432, with `cluster_name = name` so a client can tell which server answered.
/// `extra_conf` lines are appended to postgresql.conf. Debian's `PostgreSQL` 15.
pub fn start(lab: &mut Lab, ns: Ns, name: &str, extra_conf: &[&str]) -> Pg {
    start_version(lab, ns, name, Major::DEBIAN, extra_conf)
}

/// [`start`] with `PostgreSQL` `major` (15 from Debian, the others from `cargo xtask setup`).
pub fn start_version(lab: &mut Lab, ns: Ns, name: &str, major: Major, extra_conf: &[&str]) -> Pg {
    let data_dir = lab.work_dir.join(format!("pg-{name}"));
    std::fs::create_dir_all(&data_dir).expect("creating the data dir");
    sh(Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&data_dir));
    // The work dir must be traversable by the postgres user.
    sh(Command::new("chmod").arg("755").arg(&lab.work_dir));
    let initdb = major.as_postgres("initdb");
    sh(Command::new(&initdb[0])
        .args(&initdb[1..])
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
        .arg(&data_dir)
        .env("LC_ALL", "C"));
    let mut conf = vec![
        "listen_addresses = '*'".to_owned(),
        format!("port = {PG_PORT}"),
        format!("unix_socket_directories = '{}'", data_dir.display()),
        format!("cluster_name = '{name}'"),
        "wal_level = logical".to_owned(),
        "max_connections = 1200".to_owned(),
        "shared_buffers = 64MB".to_owned(),
        "max_wal_senders = 10".to_owned(),
        "max_replication_slots = 10".to_owned(),
        // A lab server: durability across a machine crash is not what the tests measure.
        "fsync = off".to_owned(),
        "log_min_messages = warning".to_owned(),
    ];
    conf.extend(extra_conf.iter().map(|s| (*s).to_owned()));
    let mut pg_conf =
        std::fs::read_to_string(data_dir.join("postgresql.conf")).expect("postgresql.conf");
    pg_conf.push('\n');
    pg_conf.push_str(&conf.join("\n"));
    pg_conf.push('\n');
    std::fs::write(data_dir.join("postgresql.conf"), pg_conf).expect("writing postgresql.conf");
    // The servers see the proxy's SNAT address, never the client's: allow the lab range.
    let mut hba = std::fs::read_to_string(data_dir.join("pg_hba.conf")).expect("pg_hba.conf");
    hba.push_str("\nhost all all 198.18.0.0/15 trust\nhost replication all 198.18.0.0/15 trust\n");
    std::fs::write(data_dir.join("pg_hba.conf"), hba).expect("writing pg_hba.conf");

    let pid = launch(lab, ns, name, major, &data_dir);
    Pg {
        name: name.to_owned(),
        data_dir,
        pid,
        major,
    }
}

/// A streaming-replication standby of the server at `primary_addr`: `pg_basebackup -R` in
/// namespace `ns`, then started with `cluster_name = name`.
pub fn start_standby(lab: &mut Lab, ns: Ns, name: &str, primary_addr: &str) -> Pg {
    let data_dir = lab.work_dir.join(format!("pg-{name}"));
    std::fs::create_dir_all(&data_dir).expect("creating the data dir");
    sh(Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&data_dir));
    sh(Command::new("chmod").arg("700").arg(&data_dir));
    let data = data_dir.display().to_string();
    lab.exec_ok(
        ns,
        &[
            &AS_POSTGRES[..],
            &[
                &format!("{PG_BIN}/pg_basebackup"),
                "-h",
                primary_addr,
                "-U",
                "postgres",
                "-D",
                &data,
                "-R",
                "-X",
                "stream",
            ],
        ]
        .concat(),
    );
    // The primary keeps its Unix socket in its data dir, so the copy carries its socket lock,
    // which names the primary's (live) postmaster.
    let _ = std::fs::remove_file(data_dir.join(format!(".s.PGSQL.{PG_PORT}.lock")));
    let mut conf =
        std::fs::read_to_string(data_dir.join("postgresql.conf")).expect("postgresql.conf");
    let _ = write!(
        conf,
        "\nunix_socket_directories = '{data}'\ncluster_name = '{name}'\nhot_standby = on\n"
    );
    std::fs::write(data_dir.join("postgresql.conf"), conf).expect("writing postgresql.conf");
    let pid = launch(lab, ns, name, Major::DEBIAN, &data_dir);
    Pg {
        name: name.to_owned(),
        data_dir,
        pid,
        major: Major::DEBIAN,
    }
}

/// A streaming-replication standby of `primary` (any major) at `primary_addr`, in namespace
/// `ns`, started with `cluster_name = name`. Debian's `pg_basebackup` (15) refuses other
/// servers and the other majors' packages ship none, so this is the documented low-level
/// base backup: `pg_backup_start`, a file copy of the primary's data directory (both are on
/// this machine), `pg_backup_stop`'s backup label, then `standby.signal` and
/// `primary_conninfo`. A physical slot made before the backup keeps the WAL the standby needs.
pub fn start_standby_of(lab: &mut Lab, ns: Ns, name: &str, primary: &Pg, primary_addr: &str) -> Pg {
    start_standby_of_with(lab, ns, name, primary, primary_addr, &[])
}

/// [`start_standby_of`] with `extra_conf` lines appended to the standby's postgresql.conf
/// (`listen_addresses = ''` lets it share its primary's namespace: its socket is in its own
/// data dir, so only TCP port 5432 would collide).
pub fn start_standby_of_with(
    lab: &mut Lab,
    ns: Ns,
    name: &str,
    primary: &Pg,
    primary_addr: &str,
    extra_conf: &[&str],
) -> Pg {
    let data_dir = lab.work_dir.join(format!("pg-{name}"));
    std::fs::create_dir_all(&data_dir).expect("creating the data dir");
    sh(Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&data_dir));
    sh(Command::new("chmod").arg("700").arg(&data_dir));
    let slot = format!("standby_{name}");
    psql(
        lab,
        ns,
        primary,
        &format!("SELECT pg_create_physical_replication_slot('{slot}', true)"),
    );
    // 15 renamed the non-exclusive backup functions.
    let (backup_start, backup_stop) = if primary.major >= Major(15) {
        ("pg_backup_start('lab', true)", "pg_backup_stop()")
    } else {
        (
            "pg_start_backup('lab', true, false)",
            "pg_stop_backup(false)",
        )
    };
    let (from, to) = (primary.data_dir.display(), data_dir.display());
    // The copy leaves out what belongs to the running primary (pid file, socket, WAL, slots);
    // tar's status 1 means "a file changed as we read it", which the WAL replay repairs.
    // The marker is in the new data dir: the postgres user running the copy may not write the
    // lab's work dir.
    let copied = data_dir.join("redirect-lab-copied");
    let copy = lab.work_dir.join(format!("{name}-copy.sh"));
    std::fs::write(
        &copy,
        format!(
            "tar -C {from} --exclude=./postmaster.pid --exclude=./postmaster.opts \\\n  \
             --exclude='./.s.PGSQL.*' --exclude='./pg_wal/*' --exclude='./pg_replslot/*' -cf - . \\\n  \
             | tar -C {to} -xf -\n\
             status=(\"${{PIPESTATUS[@]}}\")\n\
             [ \"${{status[0]}}\" -le 1 ] && [ \"${{status[1]}}\" -eq 0 ] && touch {copied}\n",
            copied = copied.display()
        ),
    )
    .expect("writing the copy script");
    // One psql session: a non-exclusive backup belongs to the session that started it.
    let sql = lab.work_dir.join(format!("{name}-backup.sql"));
    std::fs::write(
        &sql,
        format!(
            "SELECT {backup_start};\n\\! bash {copy}\n\\o {to}/backup_label\n\
             SELECT labelfile FROM {backup_stop};\n",
            copy = copy.display()
        ),
    )
    .expect("writing the backup script");
    let sql = sql.display().to_string();
    let data = from.to_string();
    let mut argv: Vec<&str> = AS_POSTGRES.to_vec();
    argv.extend([
        "psql",
        "-X",
        "-q",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        &data,
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-f",
        &sql,
    ]);
    lab.exec_ok(ns, &argv);
    assert!(
        copied.exists(),
        "copying {from} to {to} for the base backup failed (see the test's output)"
    );
    std::fs::remove_file(&copied).expect("removing the copy marker");
    std::fs::write(data_dir.join("standby.signal"), "").expect("standby.signal");
    let mut conf =
        std::fs::read_to_string(data_dir.join("postgresql.conf")).expect("postgresql.conf");
    let _ = write!(
        conf,
        "\nunix_socket_directories = '{to}'\ncluster_name = '{name}'\nhot_standby = on\n\
         primary_conninfo = 'host={primary_addr} port={PG_PORT} user=postgres application_name={name}'\n\
         primary_slot_name = '{slot}'\n"
    );
    for line in extra_conf {
        let _ = writeln!(conf, "{line}");
    }
    std::fs::write(data_dir.join("postgresql.conf"), conf).expect("writing postgresql.conf");
    sh(Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&data_dir));
    let pid = launch(lab, ns, name, primary.major, &data_dir);
    Pg {
        name: name.to_owned(),
        data_dir,
        pid,
        major: primary.major,
    }
}

/// The server's `server_version_num` major, as it answers (not as the lab meant it).
pub fn answering_major(lab: &Lab, ns: Ns, pg: &Pg) -> Major {
    let num = psql(lab, ns, pg, "SHOW server_version_num");
    Major::of_version_num(&num).unwrap_or_else(|| panic!("server_version_num {num:?}"))
}

/// Starts `postgres -D data_dir` as the postgres user in `ns` and waits until it accepts
/// connections; the lab stops it.
fn launch(lab: &mut Lab, ns: Ns, name: &str, major: Major, data_dir: &std::path::Path) -> u32 {
    let data = data_dir.display().to_string();
    let mut argv = major.as_postgres("postgres");
    argv.extend(["-D".to_owned(), data.clone()]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let pid = lab.spawn(ns, &argv, &format!("pg-{name}.log"));
    let isready = format!("{PG_BIN}/pg_isready");
    let port = PG_PORT.to_string();
    let ready = || {
        lab.cmd(ns, &[&isready, "-q", "-h", &data, "-p", &port])
            .status()
            .is_ok_and(|s| s.success())
    };
    wait_for(
        Duration::from_secs(60),
        &format!("PostgreSQL {name} to accept connections"),
        ready,
    );
    pid
}

/// The `(writer, seq)` pairs of the workload's table on a server (`filter` is a WHERE clause
/// or empty).
pub fn acked_rows(
    lab: &Lab,
    ns: Ns,
    pg: &Pg,
    filter: &str,
) -> std::collections::HashSet<(i32, i64)> {
    acked_rows_in(lab, ns, pg, "postgres", filter)
}

/// [`acked_rows`] in another database of the server.
pub fn acked_rows_in(
    lab: &Lab,
    ns: Ns,
    pg: &Pg,
    database: &str,
    filter: &str,
) -> std::collections::HashSet<(i32, i64)> {
    psql_in(
        lab,
        ns,
        pg,
        database,
        &format!("SELECT writer, seq FROM acks {filter}"),
    )
    .lines()
    .filter_map(|l| {
        let (w, s) = l.split_once('|')?;
        Some((w.parse().ok()?, s.parse().ok()?))
    })
    .collect()
}

/// A libpq connection string to `host` on the lab port.
#[must_use]
pub fn dsn(host: &str) -> String {
    dsn_in(host, "postgres")
}

/// [`dsn`] for another database.
#[must_use]
pub fn dsn_in(host: &str, database: &str) -> String {
    format!("host={host} port={PG_PORT} user=postgres dbname={database} connect_timeout=10")
}

/// Connects with tokio-postgres (from whatever namespace the calling thread is in) and spawns
/// the connection task on the current runtime.
pub async fn connect(host: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&dsn(host), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {host}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Which server a client is talking to.
pub async fn cluster_name(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SHOW cluster_name", &[])
        .await
        .expect("SHOW cluster_name")
        .get(0)
}

/// Runs SQL on a lab server over its Unix socket with psql; returns the unaligned output.
pub fn psql(lab: &Lab, ns: Ns, pg: &Pg, sql: &str) -> String {
    psql_in(lab, ns, pg, "postgres", sql)
}

/// [`psql`] in another database of the server.
pub fn psql_in(lab: &Lab, ns: Ns, pg: &Pg, database: &str, sql: &str) -> String {
    let data = pg.data_dir.display().to_string();
    let out = lab.exec_ok(
        ns,
        &[
            "psql",
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &data,
            "-U",
            "postgres",
            "-d",
            database,
            "-c",
            sql,
        ],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Creates `database` on both servers with the workload's schema and replicates it by a
/// publication and subscription of its own (`<database>_pub`, `<database>_sub`), as each
/// database of a real cluster is: logical replication is per database.
pub fn replicate_database(lab: &Lab, source: &Pg, target: &Pg, database: &str) {
    for (ns, pg) in [(Ns::Source, source), (Ns::Target, target)] {
        psql(lab, ns, pg, &format!("CREATE DATABASE {database}"));
        psql_in(lab, ns, pg, database, SCHEMA);
    }
    psql_in(
        lab,
        Ns::Source,
        source,
        database,
        &format!("CREATE PUBLICATION {database}_pub FOR ALL TABLES"),
    );
    psql_in(
        lab,
        Ns::Target,
        target,
        database,
        &format!(
            "CREATE SUBSCRIPTION {database}_sub CONNECTION '{}' PUBLICATION {database}_pub",
            dsn_in(crate::SOURCE_ADDR, database)
        ),
    );
    wait_for(
        Duration::from_secs(60),
        "the new subscription's initial sync",
        || {
            psql_in(
                lab,
                Ns::Target,
                target,
                database,
                "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'",
            ) == "0"
                && psql(
                    lab,
                    Ns::Source,
                    source,
                    &format!(
                        "SELECT count(*) FROM pg_replication_slots WHERE active AND slot_name = '{database}_sub'"
                    ),
                ) == "1"
        },
    );
}

/// Starts psql running `sql` in the background (a session that holds a lock, say); it is
/// stopped when the lab drops. Returns its pid.
pub fn spawn_psql(lab: &mut Lab, ns: Ns, pg: &Pg, sql: &str, log_name: &str) -> u32 {
    let data = pg.data_dir.display().to_string();
    lab.spawn(
        ns,
        &[
            "psql", "-X", "-h", &data, "-U", "postgres", "-d", "postgres", "-c", sql,
        ],
        log_name,
    )
}

/// The workload's schema, created on both servers.
pub const SCHEMA: &str = "CREATE TABLE acks (id bigserial PRIMARY KEY, writer int NOT NULL, seq bigint NOT NULL, \
     at timestamptz NOT NULL DEFAULT clock_timestamp(), UNIQUE (writer, seq))";

/// Logical replication source → target: a publication for all tables on the source and a
/// subscription on the target that connects through the proxy namespace (routed, not `NATed`).
pub fn setup_logical(lab: &Lab, source: &Pg, target: &Pg) {
    psql(lab, Ns::Source, source, SCHEMA);
    psql(lab, Ns::Target, target, SCHEMA);
    psql(
        lab,
        Ns::Source,
        source,
        "CREATE PUBLICATION redirect_pub FOR ALL TABLES",
    );
    psql(
        lab,
        Ns::Target,
        target,
        &format!(
            "CREATE SUBSCRIPTION redirect_sub CONNECTION '{}' PUBLICATION redirect_pub",
            dsn(crate::SOURCE_ADDR)
        ),
    );
    wait_for(
        Duration::from_secs(60),
        "the subscription's initial sync",
        || {
            psql(
                lab,
                Ns::Target,
                target,
                "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'",
            ) == "0"
                && psql(
                    lab,
                    Ns::Source,
                    source,
                    "SELECT count(*) FROM pg_replication_slots WHERE active",
                ) == "1"
        },
    );
}

/// The `run` flags that give the controller both databases, as the README's `run` line does:
/// no `--subscription` (the controller discovers it, and remembers it in its journal).
#[must_use]
pub fn controller_flags() -> Vec<String> {
    vec![
        "--source-dsn".into(),
        dsn(crate::SOURCE_ADDR),
        "--target-dsn".into(),
        dsn(crate::TARGET_ADDR),
    ]
}

/// md5 of a bulk `COPY ... TO STDOUT` of `rows` rows of about 1 KB, read by psql over TCP
/// from `host` in `ns`: the same bytes whichever server and path serve it.
pub fn copy_out_md5(lab: &Lab, ns: Ns, host: &str, rows: u32) -> String {
    shell_pipeline(
        lab,
        ns,
        &format!(
            "timeout 300 psql -X -h {host} -U postgres -d postgres -c \"COPY (SELECT i, repeat(md5(i::text), 30) FROM generate_series(1, {rows}) i) TO STDOUT\" | md5sum"
        ),
    )
    .trim()
    .to_owned()
}

/// Sends the numbers 1..=`n` with `COPY ... FROM STDIN` over TCP to `host` from `ns` and
/// returns the server's sum of what arrived (`n (n + 1) / 2` when every byte did).
pub fn copy_in_sum(lab: &Lab, ns: Ns, host: &str, n: u32) -> u64 {
    let out = shell_pipeline(
        lab,
        ns,
        &format!(
            "seq 1 {n} | timeout 300 psql -X -q -t -A -h {host} -U postgres -d postgres -c 'CREATE TEMP TABLE upload (i bigint)' -c 'COPY upload FROM STDIN' -c 'SELECT sum(i) FROM upload'"
        ),
    );
    out.lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sum in psql's output: {out}"))
}

/// Runs a shell pipeline in `ns` (failing if any stage fails) and returns its stdout.
fn shell_pipeline(lab: &Lab, ns: Ns, script: &str) -> String {
    let out = lab.exec_ok(ns, &["bash", "-o", "pipefail", "-c", script]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Opens a session through the VIP, flips to the target with `--immediate`, opens another,
/// and returns which server each reached: the first before and after the flip, the new one.
/// A pinned datapath answers `("source", "source", "target")`.
pub fn sessions_across_an_immediate_flip(lab: &Lab) -> (String, String, String) {
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    };
    let (flipped, wait_flip) = std::sync::mpsc::channel::<()>();
    let (opened, wait_open) = std::sync::mpsc::channel::<()>();
    let session = lab.spawn_in_ns(Ns::Client, move || {
        rt().block_on(async move {
            let c = connect(crate::VIP).await;
            let before = cluster_name(&c).await;
            opened.send(()).unwrap();
            let _ = tokio::task::spawn_blocking(move || {
                wait_flip.recv_timeout(std::time::Duration::from_secs(60))
            })
            .await;
            (before, cluster_name(&c).await)
        })
    });
    wait_open
        .recv_timeout(std::time::Duration::from_secs(30))
        .unwrap();
    lab.redirect_ok(&["flip", "--to", "target", "--immediate"]);
    let new_one = lab.in_ns(Ns::Client, move || {
        rt().block_on(async { cluster_name(&connect(crate::VIP).await).await })
    });
    flipped.send(()).unwrap();
    let (before, after) = session.join().unwrap();
    (before, after, new_one)
}
