//! Socket mode (zero-hop, `redirect run --mode socket`): the hooks inside `connect()` on an
//! application host. Real clients (psql, Python's socket module and psycopg2, tokio-postgres)
//! in the client namespace, in the cgroup the lab hooks; PostgreSQL servers in their own
//! namespaces. See `Lab::new_app_host`.

use std::time::Duration;

use redirect_tests::{
    APP_VIP, CLIENT_ADDR, Lab, Ns, PG_PORT, SOURCE_ADDR, TARGET_ADDR,
    pg::{self, Pg},
    require_root,
};

fn servers(lab: &mut Lab) -> (Pg, Pg) {
    let source = pg::start(lab, Ns::Source, "source", &[]);
    let target = pg::start(lab, Ns::Target, "target", &[]);
    (source, target)
}

/// `psql` through the VIP from the client namespace (inside the hooked cgroup): who the
/// server is, and whom it sees.
fn who(lab: &Lab, sql: &str) -> String {
    let dsn = pg::dsn(APP_VIP);
    let out = lab.exec_ok(
        Ns::Client,
        &["psql", "-X", "-At", "-F", " ", &dsn, "-c", sql],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

const WHO: &str =
    "SELECT current_setting('cluster_name'), host(inet_client_addr()), host(inet_server_addr())";

/// A Python program in the client namespace; returns its stdout. Debian's interpreter, whose
/// psycopg2 `cargo xtask setup` installs (a PATH may put another Python first).
fn python(lab: &Lab, program: &str) -> String {
    let out = lab.exec_ok(Ns::Client, &["/usr/bin/python3", "-c", program]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn connect_goes_straight_to_the_active_backend_and_the_client_sees_the_vip() {
    require_root();
    let mut lab = Lab::new_app_host("sock");
    let (_source, _target) = servers(&mut lab);
    lab.start_redirect(&[]);

    // The server is the source, and it sees the client's own address: no SNAT, no proxy.
    assert_eq!(
        who(&lab, WHO),
        format!("source {CLIENT_ADDR} {SOURCE_ADDR}"),
        "psql through the VIP"
    );
    assert!(lab.stat("connect_redirected") >= 1);

    // getpeername() shows the VIP, on an IPv4 socket and on a dual-stack one connected to
    // the IPv4-mapped VIP (how Java and many Python clients connect).
    let peers = python(
        &lab,
        &format!(
            "import socket\n\
             s = socket.create_connection(('{APP_VIP}', {PG_PORT}))\n\
             print(s.getpeername()[0], s.getpeername()[1])\n\
             s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
             s6.connect(('::ffff:{APP_VIP}', {PG_PORT}))\n\
             print(s6.getpeername()[0], s6.getpeername()[1])\n"
        ),
    );
    assert_eq!(
        peers,
        format!("{APP_VIP} {PG_PORT}\n::ffff:{APP_VIP} {PG_PORT}"),
        "getpeername() of redirected sockets"
    );
    assert!(lab.stat("peer_shown_vip") >= 2);

    // psycopg2 (libpq underneath): connects, and reconnects after its session is ended, the
    // way a pool's health check does.
    let reconnected = python(
        &lab,
        &format!(
            "import psycopg2\n\
             dsn = 'host={APP_VIP} port={PG_PORT} user=postgres dbname=postgres'\n\
             c = psycopg2.connect(dsn)\n\
             cur = c.cursor()\n\
             cur.execute(\"SELECT current_setting('cluster_name'), pg_backend_pid()\")\n\
             name, pid = cur.fetchone()\n\
             other = psycopg2.connect(dsn)\n\
             other.autocommit = True\n\
             other.cursor().execute('SELECT pg_terminate_backend(%s)', (pid,))\n\
             try:\n\
             \x20   cur.execute('SELECT 1')\n\
             except psycopg2.OperationalError:\n\
             \x20   pass\n\
             c = psycopg2.connect(dsn)\n\
             cur = c.cursor()\n\
             cur.execute(\"SELECT current_setting('cluster_name'), host(inet_client_addr())\")\n\
             print(name, *cur.fetchone())\n"
        ),
    );
    assert_eq!(reconnected, format!("source source {CLIENT_ADDR}"));

    // bpftool reads the socket table by name, with typed fields: one entry per open
    // redirected socket, gone with the socket.
    let dsn = pg::dsn(APP_VIP);
    let sleeper = lab.spawn(
        Ns::Client,
        &["psql", "-X", &dsn, "-c", "SELECT pg_sleep(30)"],
        "sleeper.log",
    );
    let sockets = |lab: &Lab| {
        let dump = lab.exec_ok(
            Ns::Client,
            &[
                "bpftool",
                "-j",
                "map",
                "dump",
                "pinned",
                &lab.pin_dir.join("SOCKETS").display().to_string(),
            ],
        );
        let dump: serde_json::Value =
            serde_json::from_slice(&dump.stdout).expect("bpftool -j prints JSON");
        dump.as_array().cloned().unwrap_or_default()
    };
    redirect_tests::wait_for(Duration::from_secs(10), "the sleeper's socket", || {
        sockets(&lab).len() == 1
    });
    let entry = &sockets(&lab)[0];
    assert_eq!(
        entry["formatted"]["value"]["backend_id"], 0,
        "the socket went to the source: {entry}"
    );
    lab.signal(sleeper, libc::SIGTERM);
    redirect_tests::wait_for(
        Duration::from_secs(10),
        "the entry to go with the socket",
        || sockets(&lab).is_empty(),
    );
}

#[test]
fn a_process_outside_the_cgroup_is_not_redirected_and_an_immediate_flip_moves_new_connections() {
    require_root();
    let mut lab = Lab::new_app_host("sout");
    let (_source, _target) = servers(&mut lab);
    lab.start_redirect(&[]);

    // Outside the hooked cgroup, the VIP is just an address with no route behind it.
    let dsn = format!("{} connect_timeout=3", pg::dsn(APP_VIP));
    let out = lab
        .outside_cgroup_cmd(&["psql", "-X", "-At", &dsn, "-c", "SELECT 1"])
        .output()
        .expect("spawning psql");
    assert!(
        !out.status.success(),
        "a process outside the cgroup reached a server through the VIP: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // ... and the same process, inside, is redirected.
    assert!(who(&lab, WHO).starts_with("source "));

    // A connection opened before the flip stays where it started; new ones go to the target.
    let pinned = lab.spawn_in_ns(Ns::Client, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let before = pg::connect(APP_VIP).await;
            let first = pg::cluster_name(&before).await;
            // Long enough for the flip below.
            tokio::time::sleep(Duration::from_secs(3)).await;
            (first, pg::cluster_name(&before).await)
        })
    });
    std::thread::sleep(Duration::from_millis(800));
    lab.redirect_ok(&["flip", "--immediate", "--to", "target"]);
    assert_eq!(
        who(&lab, WHO),
        format!("target {CLIENT_ADDR} {TARGET_ADDR}"),
        "a new connection after the flip"
    );
    let (first, later) = pinned.join().expect("the pinned client");
    assert_eq!(
        (first.as_str(), later.as_str()),
        ("source", "source"),
        "a connection opened before the flip stays on its server"
    );
}
