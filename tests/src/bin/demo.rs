//! `cargo xtask demo`: the lab walk-through. Builds a four-namespace lab with two real
//! PostgreSQL servers, loads redirect on the proxy, and shows an open connection staying on
//! the source while new connections move to the target. Everything is torn down at the end.

use std::time::Duration;

use redirect_tests::{
    Lab, Ns, VIP,
    pg::{self, cluster_name, connect},
    require_root,
};

fn say(what: &str) {
    println!("\n== {what}");
}

fn main() {
    require_root();
    say("building the lab: namespaces cli, proxy, src, tgt joined by veth (198.18.0.0/15)");
    let mut lab = Lab::new("demo");
    say("starting PostgreSQL 'source' (198.18.2.2) and 'target' (198.18.3.2)");
    pg::start(&mut lab, Ns::Source, "source", &[]);
    pg::start(&mut lab, Ns::Target, "target", &[]);
    say("redirect run: XDP on p-cli, p-src, p-tgt; VIP 198.18.1.1:5432");
    lab.start_redirect(&[]);
    print!("{}", lab.redirect_ok(&["status"]));

    let lab = std::sync::Arc::new(lab);
    let (to_main, from_client) = std::sync::mpsc::channel::<String>();
    let (to_client, from_main) = std::sync::mpsc::channel::<()>();
    let client = std::thread::spawn({
        let lab = lab.clone();
        move || {
            lab.in_ns(Ns::Client, move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                rt.block_on(async move {
                    let a = connect(VIP).await;
                    to_main.send(format!("connection A (opened before the flip) is served by: {}", cluster_name(&a).await)).unwrap();
                    from_main.recv().unwrap();
                    let b = connect(VIP).await;
                    to_main.send(format!("connection B (opened after the flip) is served by:  {}", cluster_name(&b).await)).unwrap();
                    to_main.send(format!("connection A, queried again, is served by:          {}", cluster_name(&a).await)).unwrap();
                    from_main.recv().unwrap();
                });
            });
        }
    });
    let next = || from_client.recv_timeout(Duration::from_secs(30)).expect("client step");
    say("a real client (tokio-postgres, in ns cli) connects to the VIP");
    println!("{}", next());
    say("redirect flip --to target");
    print!("{}", lab.redirect_ok(&["flip", "--to", "target"]));
    to_client.send(()).unwrap();
    say("the client opens a new connection, and queries the old one");
    println!("{}", next());
    println!("{}", next());
    say("redirect status / redirect connections");
    print!("{}", lab.redirect_ok(&["status"]));
    print!("{}", lab.redirect_ok(&["connections"]));
    say("bpftool map dump pinned <pin-dir>/ACTIVE");
    let active = lab.pin_dir.join("ACTIVE").display().to_string();
    print!("{}", String::from_utf8_lossy(&lab.exec_ok(Ns::Proxy, &["bpftool", "map", "dump", "pinned", &active]).stdout));
    to_client.send(()).unwrap();
    client.join().expect("client thread");
    let csum: u64 = [Ns::Client, Ns::Proxy, Ns::Source, Ns::Target].iter().map(|ns| lab.csum_errors(*ns)).sum();
    say(&format!("TcpInCsumErrors across the lab: {csum}"));
    say("tearing the lab down");
}
