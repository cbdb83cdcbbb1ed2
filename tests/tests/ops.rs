//! Operating redirect (issue 11): the configuration file, the systemd unit and its readiness
//! notification, the shell completions. The lab tests here need no database: they check what
//! the service manager and the operator see.

#![allow(
    clippy::too_many_lines,
    reason = "a lab scenario reads top to bottom as one story"
)]

use std::{
    collections::BTreeSet,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use redirect_tests::{
    Lab, Ns, PG_PORT, SOURCE_ADDR, TARGET_ADDR, VIP, redirect_bin, require_root, wait_for,
};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("redirect-ops-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// `systemd-analyze verify` on the packaged unit, with ExecStart pointing at the binary under
/// test (the installed path is checked by the package test). It must verify without a word,
/// and a broken copy must not: so the check itself is shown to work.
#[test]
fn the_unit_verifies() {
    assert!(
        Path::new("/usr/bin/systemd-analyze").exists(),
        "systemd-analyze is missing: run `cargo xtask setup` (it installs the systemd package)"
    );
    let unit = std::fs::read_to_string(repo_file("packaging/redirect.service")).expect("unit");
    assert!(unit.contains("Type=notify") && unit.contains("Restart=on-failure"));
    let bin = redirect_bin();
    let dir = scratch("unit");
    let verify = |text: &str| {
        let path = dir.join("redirect.service");
        std::fs::write(
            &path,
            text.replace("/usr/bin/redirect", bin.to_str().expect("utf-8 path")),
        )
        .expect("writing the unit");
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .expect("running systemd-analyze");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), said)
    };
    let (ok, said) = verify(&unit);
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
    let (ok, said) = verify(&unit.replace(
        "Restart=on-failure",
        "Restart=sometimes\nProtectSystm=strict",
    ));
    assert!(
        !ok || !said.trim().is_empty(),
        "a broken unit verified silently"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn completions_load_in_bash() {
    let bin = redirect_bin();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source <('{}' completions bash) && complete -p redirect",
            bin.display()
        ))
        .output()
        .expect("bash");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("-F _redirect redirect"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And the completion offers the subcommands, as a user pressing TAB sees them.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source <('{}' completions bash) && COMP_WORDS=(redirect con) COMP_CWORD=1 COMP_LINE='redirect con' COMP_POINT=12 && _redirect redirect con redirect && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            bin.display()
        ))
        .output()
        .expect("bash");
    let offered = String::from_utf8_lossy(&out.stdout);
    assert!(
        offered.lines().any(|l| l == "config") && offered.lines().any(|l| l == "connections"),
        "{offered}"
    );
}

#[test]
fn config_check_names_each_bad_line() {
    let dir = scratch("check");
    let file = dir.join("redirect.toml");
    std::fs::write(
        &file,
        "iface = [\"eth0\"]\nvip = \"192.0.2.10:5432\"\nsource = \"198.51.100.11:5432\"\n\
         target = \"198.51.100.12:5432\"\nsnat_ports = \"40000-59999\"\nestablished-timeout = \"6 fortnights\"\n\
         source-dsn = \"host=db password=hunter2\"\n",
    )
    .expect("write");
    let out = Command::new(redirect_bin())
        .args(["config", "check"])
        .arg(&file)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad file passed: {err}");
    let f = file.display();
    assert!(
        err.contains(&format!(
            "{f}:5: unknown key `snat_ports`: did you mean `snat-ports`?"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{f}:6: `established-timeout`")),
        "{err}"
    );

    // The values parse: now the checks across keys run, and refuse a password in a DSN.
    std::fs::write(
        &file,
        "iface = [\"eth0\"]\nvip = \"192.0.2.10:5432\"\nsource = \"198.51.100.11:5432\"\n\
         target = \"198.51.100.12:5432\"\nsource-dsn = \"host=db password=hunter2\"\ntarget-dsn = \"host=db2\"\n",
    )
    .expect("write");
    let out = Command::new(redirect_bin())
        .args(["config", "check", "--json"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let verdict: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(verdict["ok"], false);
    let message = verdict["problems"][0]["message"]
        .as_str()
        .expect("a problem");
    assert!(
        message.contains("password") && !message.contains("hunter2"),
        "{message}"
    );

    let out = Command::new(redirect_bin())
        .args(["config", "check", "--json"])
        .arg(repo_file("packaging/redirect.toml"))
        .output()
        .expect("run");
    let verdict: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert!(out.status.success() && verdict["ok"] == true, "{verdict}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// A configuration file for this lab. Its `iface` is wrong on purpose: the tests give the
/// right ones on the command line, which must win.
fn lab_config(lab: &Lab) -> PathBuf {
    let file = lab.work_dir.join("redirect.toml");
    std::fs::write(
        &file,
        format!(
            "iface = [\"no-such-if0\"]\nvip = \"{VIP}:{PG_PORT}\"\nsource = \"{SOURCE_ADDR}:{PG_PORT}\"\n\
             target = \"{TARGET_ADDR}:{PG_PORT}\"\ngc-interval = \"500ms\"\nmetrics-addr = \"127.0.0.1:9187\"\n\
             pin-dir = \"/nonexistent/overridden/by/the/lab\"\n"
        ),
    )
    .expect("writing the lab's config");
    file
}

/// `redirect run --config FILE` argv for this lab (the lab's own flags override the file's).
fn run_with_config(lab: &Lab, file: &Path) -> Vec<String> {
    let mut argv: Vec<String> = [redirect_bin().display().to_string()]
        .into_iter()
        .chain([
            "--pin-dir".into(),
            lab.pin_dir.display().to_string(),
            "--socket".into(),
            lab.work_dir.join("control.sock").display().to_string(),
            "--journal".into(),
            lab.journal.display().to_string(),
            "run".into(),
            "--config".into(),
            file.display().to_string(),
        ])
        .collect();
    for iface in ["p-cli", "p-src", "p-tgt"] {
        argv.extend(["--iface".into(), iface.into()]);
    }
    argv
}

/// Under systemd, `Type=notify`: READY=1 comes once the datapath is attached and the control
/// socket answers (so `redirect status` works the moment systemd says the unit is up), and
/// STOPPING=1 on SIGTERM. The controller runs from a configuration file, with the command
/// line overriding the file's interfaces and pin directory.
#[test]
fn run_from_a_config_file_tells_systemd_when_it_serves() {
    require_root();
    let mut lab = Lab::new("ops-notify");
    let file = lab_config(&lab);
    let notify_path = lab.work_dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("binding the notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut argv = vec![
        "env".to_owned(),
        format!("NOTIFY_SOCKET={}", notify_path.display()),
    ];
    argv.extend(run_with_config(&lab, &file));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let pid = lab.spawn(Ns::Proxy, &argv, "redirect-0.log");

    let log_path = lab.work_dir.join("redirect-0.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut buf = [0u8; 4096];
    let ready = loop {
        assert!(
            Instant::now() < deadline,
            "no READY=1 within 45 s:\n{}",
            log()
        );
        if let Ok(n) = notify.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.lines().any(|l| l == "READY=1") {
                break msg;
            }
        }
    };
    // The moment READY arrives, the datapath is attached and the controller answers.
    let status = lab.status();
    assert!(
        log().contains("datapath ready"),
        "READY=1 before the datapath was attached:\n{}",
        log()
    );
    assert_eq!(status["active"], "source", "{status}");
    assert_eq!(status["vip"], format!("{VIP}:{PG_PORT}"), "{status}");
    assert!(ready.contains(&format!("MAINPID={pid}")), "{ready}");
    assert!(ready.contains("STATUS=serving"), "{ready}");
    // Asking whether it answers left no trace in its log.
    assert!(!log().contains("control connection"), "{}", log());
    // The command line won over the file: the lab's interfaces carry the program.
    assert!(!log().contains("no-such-if0"), "{}", log());

    // What a real controller exposes is what the dashboard reads: these are always there (the
    // SNAT and GC ones after the first GC pass).
    wait_for(
        Duration::from_secs(10),
        "a GC pass's samples on /metrics",
        || {
            let text = lab.in_ns(Ns::Proxy, scrape_metrics);
            ["redirect_gc_pass_seconds", "redirect_snat_ports_claimed"]
                .iter()
                .all(|name| text.lines().any(|l| l.starts_with(name)))
        },
    );
    let exposition = lab.in_ns(Ns::Proxy, scrape_metrics);
    let exposed = redirect_names(&exposition);
    for name in [
        "redirect_active_backend",
        "redirect_connections",
        "redirect_datapath_packets_total",
        "redirect_cutover_phase",
        "redirect_snat_ports_claimed",
        "redirect_snat_ports_capacity",
        "redirect_gc_pass_seconds",
    ] {
        assert!(
            exposed.contains(name),
            "/metrics lacks {name}:\n{exposition}"
        );
    }
    let exported = exported_metric_names();
    assert!(
        exposed.is_subset(&exported),
        "metrics.rs's names miss some of /metrics: {exposed:?}"
    );

    lab.signal(pid, libc::SIGTERM);
    let mut stopping = false;
    notify
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    while let Ok(n) = notify.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1 on SIGTERM:\n{}", log());
}

/// `GET /metrics` from the controller's default port, in the current namespace.
fn scrape_metrics() -> String {
    use std::io::{Read as _, Write as _};
    let mut stream =
        std::net::TcpStream::connect("127.0.0.1:9187").expect("connecting to /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("response");
    body
}

/// Every system call a real controller makes (load, attach, serve, GC, stop) is allowed by the
/// unit's `SystemCallFilter=`, as systemd itself expands it: a call outside it would fail
/// with EPERM in production while every other test passes.
#[test]
fn the_unit_allows_every_system_call_the_controller_makes() {
    require_root();
    assert!(
        Path::new("/usr/bin/strace").exists(),
        "strace is missing: run `cargo xtask setup`"
    );
    let unit = std::fs::read_to_string(repo_file("packaging/redirect.service")).expect("unit");
    let filter: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(!filter.is_empty(), "the unit has no SystemCallFilter=");
    let allowed = expand_syscall_sets(&filter);

    let mut lab = Lab::new("ops-syscalls");
    let file = lab_config(&lab);
    let trace = lab.work_dir.join("syscalls.txt");
    let mut argv = vec![
        "strace".to_owned(),
        "-f".into(),
        "-qq".into(),
        "-c".into(),
        "-o".into(),
        trace.display().to_string(),
    ];
    argv.extend(run_with_config(&lab, &file));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let strace = lab.spawn(Ns::Proxy, &argv, "redirect-0.log");
    let log_path = lab.work_dir.join("redirect-0.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_for(
        Duration::from_secs(60),
        "the traced controller to serve",
        || log().contains("control socket ready") && log().contains("serving /metrics"),
    );
    // Let a few GC passes and a status request happen, then stop it the way systemd does.
    std::thread::sleep(Duration::from_secs(3));
    let _ = lab.status();
    let children = std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children"))
        .expect("strace's children");
    let controller: i32 = children
        .split_whitespace()
        .next()
        .expect("the traced controller")
        .parse()
        .expect("pid");
    // SAFETY: a process this test started (through strace), still running.
    unsafe { libc::kill(controller, libc::SIGTERM) };
    lab.signal(strace, 0); // waits for strace to write its summary and exit
    let summary = std::fs::read_to_string(&trace).expect("strace's summary");
    let made: BTreeSet<&str> = summary
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|name| {
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .filter(|name| !["total", "syscall"].contains(name))
        .collect();
    assert!(
        made.contains("bpf"),
        "the trace has no bpf calls:\n{summary}"
    );
    let refused: Vec<&&str> = made.iter().filter(|s| !allowed.contains(**s)).collect();
    assert!(
        refused.is_empty(),
        "the unit's SystemCallFilter= would refuse {refused:?}\n{summary}\n{}",
        log()
    );
}

/// The system calls named by `SystemCallFilter=` entries (`@set`s expanded by
/// `systemd-analyze syscall-filter`, recursively).
fn expand_syscall_sets(entries: &[&str]) -> BTreeSet<String> {
    let mut allowed = BTreeSet::new();
    let mut todo: Vec<String> = entries.iter().map(|s| (*s).to_owned()).collect();
    let mut seen = BTreeSet::new();
    while let Some(entry) = todo.pop() {
        if !seen.insert(entry.clone()) {
            continue;
        }
        if !entry.starts_with('@') {
            allowed.insert(entry);
            continue;
        }
        let out = Command::new("systemd-analyze")
            .args(["syscall-filter", &entry])
            .output()
            .expect("systemd-analyze syscall-filter");
        assert!(
            out.status.success(),
            "systemd-analyze syscall-filter {entry}"
        );
        for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
            let item = line.trim();
            if item.is_empty() || item.starts_with('#') {
                continue;
            }
            todo.push(item.to_owned());
        }
    }
    allowed
}

/// Removes the test's installed package however the test ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "redirect"]).output();
    }
}

/// `cargo xtask package` builds a .deb that installs on this machine (`dpkg -i`) with a
/// working binary, a config that passes `config check`, a unit that verifies where it is
/// installed, man pages and completions; the test purges it again, even if it fails.
#[test]
fn the_debian_package_installs_and_validates_its_config() {
    require_root();
    // A package left by an interrupted run of this test is removed; any other is not ours.
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f", "${Maintainer}", "redirect"])
        .output()
        .expect("dpkg-query");
    if installed.status.success() {
        assert_eq!(
            String::from_utf8_lossy(&installed.stdout),
            "redirect maintainers",
            "another redirect package is installed on this machine; this test would remove it"
        );
        drop(Installed);
    }
    let out = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "-p", "xtask", "--", "package"])
        .current_dir(repo_file(""))
        .output()
        .expect("cargo xtask package");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo xtask package failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = PathBuf::from(stdout.lines().last().expect("the .deb's path").trim());
    assert!(
        deb.extension().is_some_and(|e| e == "deb") && deb.exists(),
        "{stdout}"
    );

    let listing = String::from_utf8_lossy(
        &Command::new("dpkg-deb")
            .arg("-c")
            .arg(&deb)
            .output()
            .expect("dpkg-deb")
            .stdout,
    )
    .into_owned();
    for path in [
        "./usr/bin/redirect",
        "./etc/redirect/redirect.toml",
        "redirect.service",
        "./usr/share/man/man1/redirect.1.gz",
        "./usr/share/man/man1/redirect-run.1.gz",
        "./usr/share/bash-completion/completions/redirect",
        "./usr/share/zsh/vendor-completions/_redirect",
        "./usr/share/fish/vendor_completions.d/redirect.fish",
        "./usr/share/doc/redirect/monitoring/redirect-dashboard.json",
        "./usr/share/doc/redirect/monitoring/redirect-alerts.yml",
    ] {
        assert!(
            listing.contains(path),
            "the package lacks {path}:\n{listing}"
        );
    }
    let conffiles = Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles")
        .output()
        .expect("dpkg-deb -I");
    assert!(
        String::from_utf8_lossy(&conffiles.stdout).contains("/etc/redirect/redirect.toml"),
        "the config is not a conffile"
    );

    let _installed = Installed;
    let install = Command::new("dpkg")
        .arg("-i")
        .arg(&deb)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .expect("dpkg -i");
    assert!(
        install.status.success(),
        "dpkg -i:\n{}{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );
    let version = Command::new("/usr/bin/redirect")
        .arg("--version")
        .output()
        .expect("redirect --version");
    assert!(
        version.status.success()
            && String::from_utf8_lossy(&version.stdout).starts_with("redirect "),
        "{version:?}"
    );
    let check = Command::new("/usr/bin/redirect")
        .args(["config", "check", "/etc/redirect/redirect.toml"])
        .output()
        .expect("config check");
    assert!(
        check.status.success(),
        "config check on the installed config:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let unit = [
        "/lib/systemd/system/redirect.service",
        "/usr/lib/systemd/system/redirect.service",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("the unit is installed");
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no", unit])
        .output()
        .expect("systemd-analyze");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "the installed unit: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let completion = Command::new("bash")
        .args([
            "-c",
            "source /usr/share/bash-completion/completions/redirect && complete -p redirect",
        ])
        .output()
        .expect("bash");
    assert!(completion.status.success(), "{completion:?}");
}

/// The `redirect_*` names in a text (metric names in PromQL, or string literals in Rust).
fn redirect_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("redirect_") {
        let preceded = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// Every metric name redirect can export: the names in metrics.rs, where `/metrics` is
/// rendered (some appear only with databases, a fleet, or after a cutover).
fn exported_metric_names() -> BTreeSet<String> {
    let source = std::fs::read_to_string(repo_file("redirect/src/metrics.rs")).expect("metrics.rs");
    redirect_names(&source)
}

/// The PromQL of the shipped dashboard and alert rules.
fn monitoring_queries() -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("packaging/monitoring/redirect-dashboard.json"))
            .expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut queries: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("a target's expr").to_owned())
        .collect();
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if var["type"] == "query" {
            queries.push(var["query"].as_str().expect("a query").to_owned());
        }
    }
    let rules = std::fs::read_to_string(repo_file("packaging/monitoring/redirect-alerts.yml"))
        .expect("alert rules");
    queries.extend(
        rules
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:"))
            .map(|e| e.trim().to_owned()),
    );
    queries
}

#[test]
fn the_dashboard_and_alerts_name_only_exported_metrics() {
    let exported = exported_metric_names();
    assert!(
        exported.contains("redirect_lag_seconds") && exported.len() > 10,
        "{exported:?}"
    );
    let queries = monitoring_queries();
    assert!(queries.len() > 15, "{queries:#?}");
    let unknown: Vec<(String, String)> = queries
        .iter()
        .flat_map(|q| redirect_names(q).into_iter().map(move |n| (n, q.clone())))
        .filter(|(n, _)| !exported.contains(n))
        .collect();
    assert!(
        unknown.is_empty(),
        "metrics redirect does not export: {unknown:#?}"
    );
    // Each query is about redirect (or its scrape target's `up`); and the check catches a typo.
    for q in &queries {
        assert!(
            !redirect_names(q).is_empty() || q.contains("up{job=\"redirect\""),
            "{q}"
        );
    }
    assert!(!exported.contains("redirect_lag_second"));
    // Every query is PromQL that parses (Grafana's `label_values(...)` is not PromQL), and the
    // parser refuses a broken one.
    for q in queries.iter().filter(|q| !q.starts_with("label_values(")) {
        if let Err(e) = promql_parser::parser::parse(q) {
            panic!("not valid PromQL: {q}\n{e}");
        }
    }
    assert!(promql_parser::parser::parse("sum by (backend (redirect_connections)").is_err());
    // The alerts the issue asks for are there.
    let rules = std::fs::read_to_string(repo_file("packaging/monitoring/redirect-alerts.yml"))
        .expect("alert rules");
    for alert in [
        "RedirectReplicationLagHigh",
        "RedirectSnatPortPressure",
        "RedirectCutoverStuck",
        "RedirectControllerDown",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "no {alert}");
    }
}
