//! `cargo xtask demo`: the lab walk-through. Builds a four-namespace lab with two real
//! `PostgreSQL` servers kept in sync by logical replication, loads redirect on the proxy, then:
//! 1. shows connection pinning with an immediate flip (an open connection keeps querying the
//!    source while new connections land on the target), and flips back;
//! 2. shows a guardrail firing: a table without a replica identity blocks the cutover until
//!    `redirect fix replica-identity` gives it one;
//! 3. runs `redirect verify` (source and target hold the same rows), then a safe cutover under
//!    a continuous write load, and prints a verdict: acknowledged writes, writes found on the
//!    target, lost writes, refused connections, the longest write pause and how long new
//!    connections were held; then `redirect verify` again, after the cutover.
//!
//! Everything is torn down at the end, even on failure.

use std::{process::Stdio, sync::Arc, time::Duration};

use redirect_tests::{
    Lab, Ns, VIP,
    pg::{self, cluster_name, connect},
    require_root, workload,
};

fn say(what: &str) {
    println!("\n== {what}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() {
    require_root();
    say("building the lab: namespaces cli, proxy, src, tgt joined by veth (198.18.0.0/15)");
    let mut lab = Lab::new("demo");
    say(
        "starting PostgreSQL 'source' (198.18.2.2) and 'target' (198.18.3.2), logical replication source -> target",
    );
    let source = pg::start(&mut lab, Ns::Source, "source", &[]);
    let target = pg::start(&mut lab, Ns::Target, "target", &[]);
    pg::setup_logical(&lab, &source, &target);
    say(
        "redirect run: native XDP on p-cli, p-src, p-tgt (the lab's veths stand in for NICs: --hook xdp; on a veth `auto` picks TC); VIP 198.18.1.1:5432; the controller knows both databases",
    );
    lab.hook = Some("xdp");
    let flags = pg::controller_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    lab.start_redirect(&flags);
    print!("{}", lab.redirect_ok(&["status"]));

    let lab = Arc::new(lab);
    pinning(&lab);
    guardrail(&lab, &source, &target);
    cutover(&lab, &target);
    say("tearing the lab down");
}

/// Part 1: an immediate flip, to show what the kernel does on its own.
fn pinning(lab: &Arc<Lab>) {
    say("part 1: connection pinning (an immediate flip: the map write alone)");
    let (to_main, from_client) = std::sync::mpsc::channel::<String>();
    let (to_client, from_main) = std::sync::mpsc::channel::<()>();
    let client = std::thread::spawn({
        let lab = lab.clone();
        move || {
            lab.in_ns(Ns::Client, move || {
                runtime().block_on(async move {
                    let a = connect(VIP).await;
                    to_main
                        .send(format!(
                            "connection A (opened before the flip) is served by: {}",
                            cluster_name(&a).await
                        ))
                        .unwrap();
                    from_main.recv().unwrap();
                    let b = connect(VIP).await;
                    to_main
                        .send(format!(
                            "connection B (opened after the flip) is served by:  {}",
                            cluster_name(&b).await
                        ))
                        .unwrap();
                    to_main
                        .send(format!(
                            "connection A, queried again, is served by:          {}",
                            cluster_name(&a).await
                        ))
                        .unwrap();
                    from_main.recv().unwrap();
                });
            });
        }
    });
    let next = || {
        from_client
            .recv_timeout(Duration::from_secs(30))
            .expect("client step")
    };
    println!("{}", next());
    println!("$ redirect flip --to target --immediate");
    print!(
        "{}",
        lab.redirect_ok(&["flip", "--to", "target", "--immediate"])
    );
    to_client.send(()).unwrap();
    println!("{}", next());
    println!("{}", next());
    println!("$ redirect connections");
    print!("{}", lab.redirect_ok(&["connections"]));
    println!("$ bpftool map dump pinned <pin-dir>/ACTIVE");
    let active = lab.pin_dir.join("ACTIVE").display().to_string();
    print!(
        "{}",
        String::from_utf8_lossy(
            &lab.exec_ok(Ns::Proxy, &["bpftool", "map", "dump", "pinned", &active])
                .stdout
        )
    );
    to_client.send(()).unwrap();
    client.join().expect("client thread");
    println!("$ redirect flip --to source --immediate");
    print!(
        "{}",
        lab.redirect_ok(&["flip", "--to", "source", "--immediate"])
    );
}

/// Part 2: a guardrail. A table without a replica identity cannot have its UPDATEs
/// replicated; preflight names it, says why and how to fix it, and blocks the cutover.
fn guardrail(lab: &Arc<Lab>, source: &pg::Pg, target: &pg::Pg) {
    say("part 2: a guardrail (what logical replication will not carry)");
    let notes =
        "CREATE TABLE notes (k int NOT NULL, body text); CREATE UNIQUE INDEX notes_k ON notes (k)";
    println!("on both servers: {notes}");
    pg::psql(lab, Ns::Source, source, notes);
    pg::psql(lab, Ns::Target, target, notes);
    pg::psql(
        lab,
        Ns::Target,
        target,
        "ALTER SUBSCRIPTION redirect_sub REFRESH PUBLICATION",
    );
    redirect_tests::wait_for(Duration::from_secs(30), "notes to be copied", || {
        pg::psql(
            lab,
            Ns::Target,
            target,
            "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'",
        ) == "0"
    });
    pg::psql(
        lab,
        Ns::Source,
        source,
        "INSERT INTO notes VALUES (1, 'draft')",
    );
    let update = "UPDATE notes SET body = 'final' WHERE k = 1";
    println!("on the source: {update}");
    let data = source.data_dir.display().to_string();
    let out = lab
        .cmd(
            Ns::Source,
            &["psql", "-X", "-h", &data, "-U", "postgres", "-c", update],
        )
        .output()
        .expect("psql");
    print!("{}", String::from_utf8_lossy(&out.stderr));
    println!("$ redirect flip --to target --dry-run");
    print!(
        "{}",
        String::from_utf8_lossy(
            &lab.redirect(&["flip", "--to", "target", "--dry-run"])
                .stdout
        )
    );
    let fix = [
        "fix",
        "replica-identity",
        "--table",
        "public.notes",
        "--using-index",
        "notes_k",
    ];
    println!("$ redirect {}", fix.join(" "));
    print!("{}", lab.redirect_ok(&fix));
    println!("$ redirect {} --apply", fix.join(" "));
    print!("{}", lab.redirect_ok(&[&fix[..], &["--apply"]].concat()));
    println!("on the source: {update}");
    pg::psql(lab, Ns::Source, source, update);
    redirect_tests::wait_for(Duration::from_secs(10), "the UPDATE on the target", || {
        pg::psql(
            lab,
            Ns::Target,
            target,
            "SELECT body FROM notes WHERE k = 1",
        ) == "final"
    });
    println!("the target has it: body = 'final'");
    let report: serde_json::Value =
        serde_json::from_str(&lab.redirect_ok(&["flip", "--to", "target", "--dry-run", "--json"]))
            .expect("flip --dry-run --json");
    let blocking = report["guardrails"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["blocks"] == true && f["allowed"] == false)
        .count();
    println!(
        "$ redirect flip --to target --dry-run --json: {blocking} blocking guardrail finding(s)"
    );
    assert_eq!(blocking, 0, "the fix cleared the guardrail");
}

/// `redirect verify`, shown as an operator would see it; the demo fails if anything differs.
fn verify(lab: &Lab, when: &str) -> bool {
    println!("$ redirect verify");
    let out = lab
        .redirect_cmd()
        .arg("verify")
        .stderr(Stdio::inherit())
        .output()
        .expect("running redirect verify");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        println!("verify {when}: the servers DIFFER");
    }
    out.status.success()
}

/// Part 3: the safe cutover under load, with a verdict.
fn cutover(lab: &Arc<Lab>, target: &pg::Pg) {
    say("part 3: a safe cutover under a continuous write load");
    println!("$ redirect lag");
    print!("{}", lab.redirect_ok(&["lag"]));

    let writers = 0..8;
    println!(
        "workload: {} writers through the VIP for 12 s (prepared statements, a new connection every 20 commits, explicit transactions, idle pooled connections)",
        writers.len()
    );
    let load = std::thread::spawn({
        let lab = lab.clone();
        move || {
            lab.in_ns(Ns::Client, move || {
                runtime().block_on(workload::run(VIP, writers, Duration::from_secs(12), 20))
            })
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    say("before the cutover, under the live writes: do source and target hold the same rows?");
    let equal_before = verify(lab, "before the cutover");
    std::thread::sleep(Duration::from_secs(2));
    println!("$ redirect flip --to target --drain-timeout 3s");
    let out = lab
        .redirect_cmd()
        .args(["flip", "--to", "target", "--drain-timeout", "3s", "--json"])
        .stderr(Stdio::inherit())
        .output()
        .expect("running redirect flip");
    assert!(out.status.success(), "the cutover failed");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("flip --json");
    let v = load.join().expect("workload thread");
    let on_target = pg::acked_rows(lab, Ns::Target, target, "");
    let acked: Vec<(i32, i64)> = v.acked().collect();
    let lost = acked.iter().filter(|a| !on_target.contains(a)).count();
    let interrupted = v
        .errors()
        .iter()
        .filter(|e| e.starts_with("insert"))
        .count();
    say("verdict");
    println!("acknowledged writes:            {}", acked.len());
    println!("acknowledged writes on target:  {}", acked.len() - lost);
    println!("lost acknowledged writes:       {lost}");
    println!("refused connection attempts:    {}", v.refused());
    println!(
        "startups cut off by the fence:  {} (connected to the source just before it; the client retried)",
        v.startup_interrupted()
    );
    println!("statements interrupted (not acknowledged, retried by the client): {interrupted}");
    println!(
        "longest pause between acks:     {:.1} ms (as the clients saw it)",
        v.longest_pause().as_secs_f64() * 1000.0
    );
    println!(
        "write pause (fence -> flip):    {:.1} ms",
        report["write_pause_ms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "new connections held:           {:.1} ms ({} SYNs parked and re-injected)",
        report["hold_ms"].as_f64().unwrap_or(0.0),
        report["held_syns"]
    );
    println!(
        "slowest connect:                {:.1} ms",
        v.max_connect().as_secs_f64() * 1000.0
    );
    println!(
        "LSN barrier:                    {} in {:.1} ms",
        report["fence_lsn"].as_str().unwrap_or("?"),
        report["barrier_ms"].as_f64().unwrap_or(0.0)
    );
    println!("$ redirect history");
    print!("{}", lab.redirect_ok(&["history"]));
    say("after the cutover: writes go to the target and replicate back to the source");
    let equal_after = verify(lab, "after the cutover");
    let csum: u64 = [Ns::Client, Ns::Proxy, Ns::Source, Ns::Target]
        .iter()
        .map(|ns| lab.csum_errors(*ns))
        .sum();
    println!("TcpInCsumErrors across the lab: {csum}");
    let ok = lost == 0 && v.refused() == 0 && csum == 0 && equal_before && equal_after;
    println!(
        "\nRESULT: {}",
        if ok {
            "PASS: nothing lost, nothing refused, source and target verified equal before and after"
        } else {
            "FAIL"
        }
    );
    assert!(ok, "the demo's verdict failed");
}
