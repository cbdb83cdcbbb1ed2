//! Operating redirect (issue 11): the configuration file, the systemd unit and its readiness
//! notification, the shell completions. The lab tests here need no database: they check what
//! the service manager and the operator see.

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
             target = \"{TARGET_ADDR}:{PG_PORT}\"\ngc-interval = \"2s\"\nmetrics-addr = \"127.0.0.1:0\"\n\
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
    // The command line won over the file: the lab's interfaces carry the program.
    assert!(!log().contains("no-such-if0"), "{}", log());

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
