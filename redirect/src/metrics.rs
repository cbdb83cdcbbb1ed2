//! `/metrics` in the Prometheus text format: lag, connections per backend, datapath counters,
//! the cutover phase and the last cutover's step durations.

use std::{fmt::Write as _, sync::Arc};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tokio_util::sync::CancellationToken;

use crate::{controller::Controller, datapath::Role};

/// Reads one per-port gauge from a GC report's port use.
type PortGauge = fn(&crate::conntrack::PortUse) -> u64;

/// Renders every metric now.
pub fn render(ctl: &Controller) -> String {
    let mut out = String::new();
    let maps = crate::sync::lock(&ctl.host.maps);
    active_backend(&mut out, &maps);
    // Counted by the last GC pass (every --gc-interval, 1 s by default), not here: a scrape
    // that walked the connection table under the maps lock took as long as a GC pass and held
    // up the datapath's other users for it, on every scrape.
    if let Some(gc) = crate::sync::lock(&ctl.last_gc).as_ref() {
        connections(&mut out, &maps, gc);
    }
    datapath_packets(&mut out, &maps);
    drop(maps);
    if let Some(gc) = crate::sync::lock(&ctl.last_gc).as_ref() {
        snat_ports(&mut out, gc);
        gc_pass(&mut out, gc);
    }
    if let Some(lag) = crate::sync::lock(&ctl.last_lag).as_ref() {
        replication_lag(&mut out, lag);
        if !lag.databases.is_empty() {
            database_lag(&mut out, &lag.databases);
        }
    }
    if let Some(fleet) = &ctl.fleet {
        fleet_member(&mut out, fleet);
    }
    let phase = ctl.phase();
    let _ = writeln!(
        out,
        "# HELP redirect_cutover_phase 1 for the current cutover phase.\n# TYPE redirect_cutover_phase gauge"
    );
    for p in crate::controller::Phase::ALL {
        let _ = writeln!(
            out,
            "redirect_cutover_phase{{phase=\"{p}\"}} {}",
            u8::from(p == phase)
        );
    }
    if let Some(r) = crate::sync::lock(&ctl.last_cutover).as_ref() {
        let _ = writeln!(
            out,
            "# HELP redirect_cutover_step_seconds Duration of each step of the last cutover.\n# TYPE redirect_cutover_step_seconds gauge"
        );
        for (step, ms) in &r.steps {
            let _ = writeln!(
                out,
                "redirect_cutover_step_seconds{{step=\"{step}\"}} {}",
                ms / 1000.0
            );
        }
        let _ = writeln!(
            out,
            "# TYPE redirect_cutover_write_pause_seconds gauge\nredirect_cutover_write_pause_seconds {}",
            r.write_pause_ms / 1000.0
        );
    }
    out
}

/// `redirect_active_backend`: where new connections go.
fn active_backend(out: &mut String, maps: &crate::datapath::Maps) {
    let _ = writeln!(
        out,
        "# HELP redirect_active_backend 1 for the backend new connections go to.\n# TYPE redirect_active_backend gauge"
    );
    let active = maps.active().ok().flatten();
    for role in [Role::Source, Role::Target] {
        let _ = writeln!(
            out,
            "redirect_active_backend{{backend=\"{role}\"}} {}",
            u8::from(active == Some(role))
        );
    }
}

/// `redirect_connections`: live connections per backend, as the last GC pass counted them.
fn connections(out: &mut String, maps: &crate::datapath::Maps, gc: &crate::conntrack::GcReport) {
    let _ = writeln!(
        out,
        "# HELP redirect_connections Live (not closing) tracked connections per backend, as of the last conntrack GC pass (every --gc-interval, 1 s by default; see redirect_gc_pass_seconds).\n# TYPE redirect_connections gauge"
    );
    for role in [Role::Source, Role::Target] {
        let n = maps
            .backend(role)
            .ok()
            .flatten()
            .map_or(0, |b| gc.live(b.addr));
        let _ = writeln!(out, "redirect_connections{{backend=\"{role}\"}} {n}");
    }
}

/// `redirect_datapath_packets_total`: the datapath's counters, by decision.
fn datapath_packets(out: &mut String, maps: &crate::datapath::Maps) {
    if let Ok(stats) = maps.stats() {
        let _ = writeln!(
            out,
            "# HELP redirect_datapath_packets_total Packets by datapath decision.\n# TYPE redirect_datapath_packets_total counter"
        );
        for (name, v) in stats {
            let _ = writeln!(
                out,
                "redirect_datapath_packets_total{{decision=\"{name}\"}} {v}"
            );
        }
    }
}

/// `redirect_snat_ports_claimed` and `redirect_snat_ports_capacity`, per backend and SNAT
/// address.
fn snat_ports(out: &mut String, gc: &crate::conntrack::GcReport) {
    let per_port: [(&str, &str, PortGauge); 2] = [
        (
            "redirect_snat_ports_claimed",
            "SNAT ports claimed (live, closing and quarantined connections), as of the last GC pass.",
            |p| p.claimed,
        ),
        (
            "redirect_snat_ports_capacity",
            "Ports in the SNAT range.",
            |p| p.capacity,
        ),
    ];
    for (name, help, value) in per_port {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for p in &gc.ports {
            let _ = writeln!(
                out,
                "{name}{{backend=\"{}\",snat=\"{}\"}} {}",
                p.backend,
                p.snat,
                value(p)
            );
        }
    }
}

/// `redirect_conntrack_forgotten_total` and `redirect_gc_pass_seconds`.
fn gc_pass(out: &mut String, gc: &crate::conntrack::GcReport) {
    let _ = writeln!(
        out,
        "# HELP redirect_conntrack_forgotten_total Connections the GC forgot, by how they ended (who closed first decides the port quarantine).\n# TYPE redirect_conntrack_forgotten_total counter"
    );
    for (how, n) in gc.forgotten_total.labelled() {
        let _ = writeln!(
            out,
            "redirect_conntrack_forgotten_total{{how=\"{how}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP redirect_gc_pass_seconds Duration of the last conntrack GC pass.\n# TYPE redirect_gc_pass_seconds gauge\nredirect_gc_pass_seconds {}.{:03}",
        gc.took_ms / 1000,
        gc.took_ms % 1000
    );
}

/// `redirect_lag_bytes`, `redirect_lag_seconds` and `redirect_replication_healthy`: the
/// worst database's.
fn replication_lag(out: &mut String, lag: &crate::pg::lag::ReplicaLag) {
    let _ = writeln!(
        out,
        "# HELP redirect_lag_bytes Replication lag in bytes (the worst database's; NaN: unknown).\n# TYPE redirect_lag_bytes gauge\nredirect_lag_bytes {}",
        gauge(lag.bytes)
    );
    let _ = writeln!(
        out,
        "# HELP redirect_lag_seconds Replication lag in seconds.\n# TYPE redirect_lag_seconds gauge\nredirect_lag_seconds {}",
        lag.seconds
    );
    let _ = writeln!(
        out,
        "# HELP redirect_replication_healthy 1 if replication is healthy.\n# TYPE redirect_replication_healthy gauge\nredirect_replication_healthy {}",
        u8::from(lag.healthy)
    );
}

/// The same three per database: `redirect_database_lag_bytes`,
/// `redirect_database_lag_seconds` and `redirect_database_replication_healthy`.
fn database_lag(out: &mut String, databases: &[crate::pg::lag::DatabaseLag]) {
    let each = |name: &str, help: &str, value: &dyn Fn(&crate::pg::lag::DatabaseLag) -> String| {
        let mut s = format!("# HELP {name} {help}\n# TYPE {name} gauge\n");
        for d in databases {
            let _ = writeln!(
                s,
                "{name}{{database=\"{}\"}} {}",
                label(&d.database),
                value(d)
            );
        }
        s
    };
    out.push_str(&each(
        "redirect_database_lag_bytes",
        "Each database's replication lag in bytes (NaN: unknown).",
        &|d| gauge(d.bytes),
    ));
    out.push_str(&each(
        "redirect_database_lag_seconds",
        "Each database's replication lag in seconds.",
        &|d| d.seconds.to_string(),
    ));
    out.push_str(&each(
        "redirect_database_replication_healthy",
        "1 if the database's replication is healthy.",
        &|d| u8::from(d.healthy).to_string(),
    ));
}

/// `redirect_fleet_applied_epoch` and `redirect_fleet_member_live`: this host as a fleet
/// member.
fn fleet_member(out: &mut String, fleet: &crate::fleet::Fleet) {
    let applied = fleet.applied();
    let _ = writeln!(
        out,
        "# HELP redirect_fleet_applied_epoch The fleet's committed epoch this host applies.\n# TYPE redirect_fleet_applied_epoch gauge\nredirect_fleet_applied_epoch{{fleet=\"{}\",member=\"{}\",active=\"{}\"}} {}",
        fleet.settings.fleet, fleet.settings.member, applied.active, applied.epoch
    );
    let _ = writeln!(
        out,
        "# HELP redirect_fleet_member_live 1 while this member's key exists under its current etcd lease (etcd confirmed it within the last 7.5 s); 0 while it is cut off from etcd or rejoining: no fleet cutover can pass then.\n# TYPE redirect_fleet_member_live gauge\nredirect_fleet_member_live{{fleet=\"{}\",member=\"{}\"}} {}",
        fleet.settings.fleet,
        fleet.settings.member,
        u8::from(fleet.live())
    );
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, ctl: Arc<Controller>, shutdown: CancellationToken) {
    loop {
        let (mut stream, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
        };
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                ("200 OK", tokio::task::block_in_place(|| render(&ctl)))
            } else {
                ("404 Not Found", "try /metrics\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

/// A gauge's value: the number, or `NaN` when unknown (never a made-up 2^64-1).
fn gauge(v: Option<u64>) -> String {
    v.map_or_else(|| "NaN".to_owned(), |v| v.to_string())
}

/// A label value with `\\`, `"` and newlines escaped, as the exposition format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
