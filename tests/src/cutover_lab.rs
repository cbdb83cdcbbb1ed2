//! A lab ready for cutovers: two PostgreSQL servers with logical replication, a controller
//! started as the README's `run` line does, and helpers to load it and flip it.

use std::{sync::Arc, time::Duration};

use crate::{
    Lab, Ns,
    pg::{self, Pg},
    require_root, workload,
};

/// The lab and its two servers.
pub struct Cutover {
    pub lab: Arc<Lab>,
    pub source: Pg,
    pub target: Pg,
}

/// A lab with logical replication and a controller that knows both databases.
pub fn setup(name: &str, extra: &[&str]) -> Cutover {
    setup_versions(name, pg::Major::DEBIAN, pg::Major::DEBIAN, extra)
}

/// [`setup`] with a `PostgreSQL` major per server.
pub fn setup_versions(
    name: &str,
    source_major: pg::Major,
    target_major: pg::Major,
    extra: &[&str],
) -> Cutover {
    require_root();
    with_servers(Lab::new(name), source_major, target_major, extra)
}

/// [`setup`] on an application host: `redirect run --mode socket` in the client namespace,
/// its clients in the hooked cgroup (see [`Lab::new_app_host`]).
pub fn setup_app_host(name: &str, extra: &[&str]) -> Cutover {
    require_root();
    with_servers(
        Lab::new_app_host(name),
        pg::Major::DEBIAN,
        pg::Major::DEBIAN,
        extra,
    )
}

fn with_servers(
    mut lab: Lab,
    source_major: pg::Major,
    target_major: pg::Major,
    extra: &[&str],
) -> Cutover {
    let source = pg::start_version(&mut lab, Ns::Source, "source", source_major, &[]);
    let target = pg::start_version(&mut lab, Ns::Target, "target", target_major, &[]);
    pg::setup_logical(&lab, &source, &target);
    start(&mut lab, extra);
    Cutover {
        lab: Arc::new(lab),
        source,
        target,
    }
}

/// Starts (or restarts) the controller with both databases and `extra` flags.
pub fn start(lab: &mut Lab, extra: &[&str]) -> u32 {
    let mut flags = pg::controller_flags();
    flags.extend(extra.iter().map(|s| (*s).to_owned()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    lab.start_redirect(&flags)
}

/// Runs the workload from the client namespace on a thread; join to get the verdict. The
/// thread holds no reference to the lab, so a test that fails while it runs still tears the
/// lab down.
pub fn workload(
    lab: &Lab,
    writers: std::ops::Range<i32>,
    secs: u64,
) -> std::thread::JoinHandle<workload::Verdict> {
    workload_with(lab, pg::dsn(lab.vip()), writers, secs)
}

/// [`workload`] through a conninfo of its own: another database, another role.
pub fn workload_with(
    lab: &Lab,
    conninfo: String,
    writers: std::ops::Range<i32>,
    secs: u64,
) -> std::thread::JoinHandle<workload::Verdict> {
    lab.spawn_in_ns(Ns::Client, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(workload::run_with(
            conninfo,
            writers,
            Duration::from_secs(secs),
            20,
        ))
    })
}

/// `redirect flip <args>` on a thread (holding no reference to the lab); join for its output.
pub fn flip_in_background(
    lab: &Lab,
    args: &[&str],
) -> std::thread::JoinHandle<std::process::Output> {
    let mut cmd = lab.redirect_cmd();
    cmd.arg("flip").args(args);
    std::thread::spawn(move || cmd.output().expect("spawning redirect flip"))
}

/// `redirect flip <args>`.
pub fn flip(lab: &Lab, args: &[&str]) -> std::process::Output {
    let mut a = vec!["flip"];
    a.extend_from_slice(args);
    lab.redirect(&a)
}

/// Every acknowledged write of `v` is in `on` (a server's rows), no connection attempt was
/// refused, and no id was handed out twice (sequences carried over).
pub fn assert_no_loss<S: std::hash::BuildHasher>(
    v: &workload::Verdict,
    on: &std::collections::HashSet<(i32, i64), S>,
    server: &str,
) {
    let acked: Vec<_> = v.acked().collect();
    let lost: Vec<_> = acked.iter().filter(|a| !on.contains(a)).collect();
    assert!(!acked.is_empty(), "the workload wrote nothing");
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes are missing on the {server}: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(
        v.refused(),
        0,
        "connection attempts were refused: {:?}",
        v.errors()
    );
    let dup: Vec<String> = v
        .errors()
        .into_iter()
        .filter(|e| e.contains("duplicate key"))
        .collect();
    assert!(dup.is_empty(), "sequences were not carried over: {dup:?}");
}

/// [`assert_no_loss`] for a cutover's workload: also, at most two connection startups cut off.
/// A connection that reached the old server just before the fence, before its startup
/// finished, is an existing connection cut off like any other, not a refused one.
pub fn assert_no_loss_through_a_cutover<S: std::hash::BuildHasher>(
    v: &workload::Verdict,
    on: &std::collections::HashSet<(i32, i64), S>,
    server: &str,
) {
    assert_no_loss(v, on, server);
    assert!(
        v.startup_interrupted() <= 2,
        "too many startups interrupted: {:?}",
        v.errors()
    );
}
