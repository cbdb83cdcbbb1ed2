//! Connection churn with the controller's GC running, at the highest rate the lab makes:
//! every connection closes client-first (the common case, `PostgreSQL`'s Terminate), so its
//! SNAT port must come back right after the short close timeout. With the quarantine applied
//! to every port, as before, the 20,000-port default range ran out within seconds.

use std::time::Duration;

use redirect_tests::{Lab, Ns, churn, require_root};

#[test]
fn sustained_churn_never_runs_out_of_snat_ports() {
    require_root();
    let mut lab = Lab::new("churn");
    churn::tune_client(&lab);
    let _echo = churn::EchoServer::start(&lab, Ns::Source, 4, Duration::from_secs(120));
    lab.start_redirect(&[]);
    let secs = std::env::var("CHURN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let run = churn::crr(&lab, 4, Duration::from_secs(secs), 2_000_000);
    eprintln!(
        "{} connections in {:.1} s ({:.0}/s), {} failed, {} SYNs without a port, most ports claimed {}",
        run.connections,
        run.elapsed.as_secs_f64(),
        run.per_s(),
        run.failed,
        run.exhausted(),
        run.max_claimed()
    );
    eprintln!("counters: {}", lab.status()["stats"]);
    eprintln!(
        "client: {}",
        String::from_utf8_lossy(
            &lab.exec_ok(
                Ns::Client,
                &[
                    "nstat",
                    "-az",
                    "TcpExtTCPSynRetrans",
                    "TcpExtTCPTimeouts",
                    "TcpAttemptFails",
                    "TcpEstabResets",
                    "TcpOutRsts",
                    "TcpExtTCPChallengeACK"
                ]
            )
            .stdout
        )
    );
    eprintln!(
        "server: {}",
        String::from_utf8_lossy(
            &lab.exec_ok(
                Ns::Source,
                &[
                    "nstat",
                    "-az",
                    "TcpExtTCPChallengeACK",
                    "TcpOutRsts",
                    "TcpExtTW",
                    "TcpExtTWRecycled",
                    "TcpExtTCPTimeWaitOverflow",
                    "TcpExtListenDrops",
                    "TcpExtTCPAbortOnData",
                    "TcpExtTCPSYNChallenge"
                ]
            )
            .stdout
        )
    );
    for s in &run.samples {
        eprintln!(
            "  t={:>5.1}s {:>6.0}/s claimed {:>5}/{}",
            s.at_s, s.conns_per_s, s.ports_claimed, s.ports_capacity
        );
    }
    let capacity = run.samples[0].ports_capacity;
    assert_eq!(capacity, 20_000, "the default range");
    assert!(
        run.connections > capacity,
        "the run must open more connections than the range has ports ({} <= {capacity}), or it proves nothing",
        run.connections
    );
    assert_eq!(run.failed, 0, "failed connects");
    assert_eq!(run.exhausted(), 0, "SYNs dropped for lack of a SNAT port");
    assert_eq!(run.samples.last().unwrap().ct_full, 0);
    // Closed client-first, so the ports come back: the claimed count stays far below what
    // a quarantine of every port (2 minutes of connections) would need.
    assert!(
        run.max_claimed() < capacity / 2,
        "ports claimed peaked at {}",
        run.max_claimed()
    );
    lab.signal(lab.redirect_pid().unwrap(), libc::SIGTERM);
}
