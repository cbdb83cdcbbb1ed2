//! Running redirect on Kubernetes (issue 11): the Helm chart `packaging/helm/redirect` and the
//! plain manifest generated from it. No cluster is reachable here, so this checks everything
//! short of deploying: the chart lints, its values schema refuses bad values, every object it
//! renders fits the Kubernetes 1.30 API schema, the `redirect.toml` it renders passes
//! `redirect config check`, no password reaches an argument or the environment, and the plain
//! manifest is the chart rendered with its defaults. Needs no root and no lab, except the last
//! test, which runs the pod as a container runtime would set it up, in the lab (root).
//!
//! The tools (`tests/k8s/chart.py`): Helm v4's Go SDK from PyPI's `helm-python-sdk` (no
//! registry reachable here packages the helm command) and PyPI's `kubernetes-validate`, which
//! ships the API schemas offline. `cargo xtask setup` installs both.

#![allow(
    clippy::too_many_lines,
    reason = "a lab scenario reads top to bottom as one story"
)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use redirect_tests::redirect_bin;
use serde_json::Value;

const CHART: &str = "packaging/helm/redirect";
const MANIFEST: &str = "packaging/kubernetes/daemonset.yaml";
/// Where the chart mounts the Secrets in the container (the `*-password-file` keys point here).
const SECRETS_DIR: &str = "/run/secrets/redirect";

/// The value sets rendered: the defaults, a fleet over TLS with database TLS and passwords,
/// and the capabilities-only pod.
const VALUE_SETS: &[Option<&str>] = &[
    None,
    Some("tests/k8s/fleet-tls-values.yaml"),
    Some("tests/k8s/capabilities-values.yaml"),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("redirect-k8s-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `tests/k8s/chart.py ARGS`, from the repository. A missing tool fails the test with the
/// command that installs it, never passes it.
fn chart(args: &[&str]) -> Output {
    let out = Command::new("python3")
        .arg("tests/k8s/chart.py")
        .args(args)
        .current_dir(repo())
        .output()
        .expect("python3 is needed to run tests/k8s/chart.py");
    assert_ne!(
        out.status.code(),
        Some(2),
        "a tool the Kubernetes checks need is missing: run `cargo xtask setup`\n{}",
        text(&out)
    );
    out
}

fn with_values(cmd: &str, values: Option<&str>) -> Vec<String> {
    let mut args = vec![cmd.to_owned(), CHART.to_owned()];
    if let Some(v) = values {
        args.extend(["-f".to_owned(), v.to_owned()]);
    }
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// `helm template` with `values` (or the defaults), as YAML; panics if it does not render.
fn render(values: Option<&str>) -> String {
    let out = chart(&strs(&with_values("template", values)));
    assert!(
        out.status.success(),
        "the chart does not render with {values:?}:\n{}",
        text(&out)
    );
    String::from_utf8(out.stdout).expect("utf-8 YAML")
}

/// `helm template` with a values file holding `yaml`: Ok(YAML) or Err(what helm said).
fn render_with(yaml: &str) -> Result<String, String> {
    let dir = scratch("values");
    let file = dir.join("values.yaml");
    std::fs::write(&file, yaml).expect("writing values");
    let out = chart(&["template", CHART, "-f", file.to_str().expect("utf-8 path")]);
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("utf-8 YAML"))
    } else {
        Err(text(&out))
    }
}

/// The objects of a rendered YAML stream.
fn objects(yaml: &str) -> Vec<Value> {
    let dir = scratch("objects");
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, yaml).expect("writing the render");
    let out = chart(&["objects", file.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("objects as JSON")
}

fn object<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

/// Every object in `yaml` against the Kubernetes 1.30 schema (strict: unknown fields fail).
fn validate(yaml: &str, name: &str) -> (bool, String) {
    let dir = scratch("validate");
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).expect("writing the render");
    let out = chart(&["validate", file.to_str().expect("utf-8 path")]);
    (out.status.success(), text(&out))
}

#[test]
fn the_chart_lints() {
    for values in VALUE_SETS {
        let out = chart(&strs(&with_values("lint", *values)));
        let said = text(&out);
        assert!(
            out.status.success() && said.contains("1 chart(s) linted, 0 chart(s) failed"),
            "helm lint --strict with {values:?}:\n{said}"
        );
    }
    // The lint reads values.schema.json too: a bad value fails it.
    let dir = scratch("lint");
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "metrics:\n  port: \"9187\"\n").expect("writing values");
    let out = chart(&["lint", CHART, "-f", bad.to_str().expect("utf-8 path")]);
    assert!(
        !out.status.success() && text(&out).contains("/metrics/port"),
        "lint passed a string port:\n{}",
        text(&out)
    );
}

/// packaging/kubernetes/daemonset.yaml is generated from the chart: if one is edited without
/// the other, this fails with the command that regenerates it.
#[test]
fn the_plain_manifest_is_the_chart_rendered() {
    let out = chart(&["manifest", CHART]);
    assert!(out.status.success(), "{}", text(&out));
    let committed = std::fs::read_to_string(repo().join(MANIFEST)).expect("the plain manifest");
    assert!(
        committed == String::from_utf8_lossy(&out.stdout),
        "{MANIFEST} differs from the chart rendered with its defaults: regenerate it with\n  \
         python3 tests/k8s/chart.py manifest {CHART} > {MANIFEST}"
    );
    let objs = objects(&committed);
    let kinds: Vec<&str> = objs.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(kinds, ["ServiceAccount", "ConfigMap", "DaemonSet"]);
    let spec = &object(&objs, "DaemonSet")["spec"];
    let pod = &spec["template"]["spec"];
    assert_eq!(
        pod["hostNetwork"], true,
        "XDP attaches to the host's interfaces"
    );
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    assert!(pod["terminationGracePeriodSeconds"].as_u64() >= Some(130));
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/metrics");
    // The pins, the journal and the control socket are on the node, so a new pod re-adopts
    // the datapath and finds an interrupted cutover.
    let host_path = |name: &str| {
        pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["hostPath"]["path"].as_str())
            .map(str::to_owned)
    };
    assert_eq!(host_path("bpffs").as_deref(), Some("/sys/fs/bpf"));
    assert_eq!(host_path("state").as_deref(), Some("/var/lib/redirect"));
    assert_eq!(host_path("run").as_deref(), Some("/run/redirect"));
}

#[test]
fn every_rendered_object_fits_kubernetes_1_30() {
    for (i, values) in VALUE_SETS.iter().enumerate() {
        let yaml = render(*values);
        let (ok, said) = validate(&yaml, &format!("set{i}"));
        assert!(ok, "with {values:?}:\n{said}");
        for kind in ["ServiceAccount", "ConfigMap", "DaemonSet"] {
            assert!(
                said.contains(&format!(
                    "{kind}/redirect: valid (Kubernetes 1.30.0, strict)"
                )),
                "{kind} not validated with {values:?}:\n{said}"
            );
        }
        // Only the custom resource goes unchecked (its CRD's schema is not shipped offline).
        for line in said.lines().filter(|l| l.contains("NOT CHECKED")) {
            assert!(line.contains("PodMonitor/"), "{line}");
        }
    }
    // The check can fail: a misspelt field and a wrong type are refused.
    let yaml = render(None);
    for (broken, field) in [
        (
            yaml.replace("mountPropagation:", "mountPropogation:"),
            "mountPropogation",
        ),
        (
            yaml.replace("hostNetwork: true", "hostNetwork: \"yes\""),
            "hostNetwork",
        ),
    ] {
        let (ok, said) = validate(&broken, "broken");
        assert!(
            !ok && said.contains("DaemonSet/redirect: INVALID") && said.contains(field),
            "a broken DaemonSet ({field}) passed:\n{said}"
        );
    }
}

/// values.schema.json and the chart's own checks refuse what would deploy something wrong,
/// before anything reaches the cluster, naming the value.
#[test]
fn bad_values_are_refused_by_helm() {
    let refused = [
        // A string where the port is a number.
        ("metrics:\n  port: \"9187\"\n", "/metrics/port"),
        // A password in the values (they would land in the release's history).
        ("databases:\n  password: hunter2\n", "password"),
        // A password inside a DSN (it would land in the ConfigMap and the release).
        (
            "config:\n  source-dsn: host=db user=u password=hunter2\n",
            "/config/source-dsn",
        ),
        (
            "config:\n  reverse-conninfo: postgresql://u:hunter2@db/app\n",
            "/config/reverse-conninfo",
        ),
        // A key the chart sets itself from the mounts.
        ("config:\n  pin-dir: /sys/fs/bpf/other\n", "pin-dir"),
        // `once` exits after attaching: not a DaemonSet's controller.
        ("config:\n  once: true\n", "once"),
        // A misspelt hook.
        ("config:\n  hook: xpd\n", "/config/hook"),
        // Too short for a cutover in progress to end.
        (
            "terminationGracePeriodSeconds: 30\n",
            "terminationGracePeriodSeconds",
        ),
        // /proc/sys is read-only in an unprivileged container.
        ("privileged: false\n", "config.no-sysctl: true"),
        // A fleet needs its endpoints.
        ("fleet:\n  enabled: true\n", "fleet.etcd"),
        // Prometheus cannot scrape the node's loopback.
        (
            "metrics:\n  podMonitor:\n    enabled: true\n",
            "bindAddress",
        ),
    ];
    for (values, named) in refused {
        match render_with(values) {
            Ok(_) => panic!("helm accepted {values:?}"),
            Err(said) => assert!(
                said.contains(named),
                "{values:?} refused without naming {named}:\n{said}"
            ),
        }
    }
    // And a good value is accepted (so the refusals above are about the values).
    render_with("metrics:\n  port: 9188\n").expect("a good port");
}

/// Writes the rendered ConfigMap's redirect.toml with the Secrets' mount point moved to
/// `secrets`, where stand-in files exist (`config check` reads the password files).
fn rendered_config(objs: &[Value], dir: &Path) -> PathBuf {
    let toml = object(objs, "ConfigMap")["data"]["redirect.toml"]
        .as_str()
        .expect("redirect.toml in the ConfigMap");
    let secrets = dir.join("secrets");
    for file in [
        "db/source-password",
        "db/target-password",
        "db-tls/ca.crt",
        "etcd/etcd-password",
        "etcd-tls/ca.crt",
        "etcd-tls/tls.crt",
        "etcd-tls/tls.key",
    ] {
        let path = secrets.join(file);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("secret dir");
        std::fs::write(&path, "stand-in\n").expect("stand-in secret");
    }
    let file = dir.join("redirect.toml");
    std::fs::write(
        &file,
        toml.replace(SECRETS_DIR, secrets.to_str().expect("utf-8 path")),
    )
    .expect("writing redirect.toml");
    file
}

fn config_check(file: &Path) -> (bool, Value, String) {
    let out = Command::new(redirect_bin())
        .args(["config", "check", "--json"])
        .arg(file)
        .output()
        .expect("running redirect config check");
    let verdict: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), verdict, text(&out))
}

#[test]
fn the_rendered_config_passes_config_check() {
    for (i, values) in VALUE_SETS.iter().enumerate() {
        let objs = objects(&render(*values));
        let dir = scratch(&format!("config{i}"));
        let (ok, verdict, said) = config_check(&rendered_config(&objs, &dir));
        assert!(ok && verdict["ok"] == true, "with {values:?}:\n{said}");
        let args: Vec<&str> = verdict["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        // The paths the DaemonSet mounts are the ones the controller uses.
        for arg in [
            "--pin-dir=/sys/fs/bpf/redirect",
            "--socket=/run/redirect/control.sock",
            "--journal=/var/lib/redirect/journal.jsonl",
        ] {
            assert!(
                args.contains(&arg),
                "{arg} missing with {values:?}: {args:?}"
            );
        }
        if values.is_some_and(|v| v.contains("fleet")) {
            for flag in [
                "--etcd=",
                "--fleet=app-db",
                "--etcd-password-file=",
                "--source-password-file=",
            ] {
                assert!(
                    args.iter().any(|a| a.starts_with(flag)),
                    "{flag} missing from the fleet's config: {args:?}"
                );
            }
        }
    }
    // The check can fail on what the chart renders: a port the schema's pattern lets through.
    let objs = objects(&render_with("config:\n  vip: \"192.0.2.10:70000\"\n  iface: [eth0]\n  source: \"198.51.100.11:5432\"\n  target: \"198.51.100.12:5432\"\n").expect("renders"));
    let (ok, verdict, said) = config_check(&rendered_config(&objs, &scratch("badvip")));
    assert!(
        !ok && verdict["ok"] == false && said.contains("vip"),
        "a VIP on port 70000 passed config check:\n{said}"
    );
}

/// What in a rendered DaemonSet could carry a password where `ps` or `kubectl describe` shows
/// it: any environment variable, an `envFrom`, an argument mentioning a password, or a Secret
/// mounted writable or readable by others.
fn password_exposures(objs: &[Value]) -> Vec<String> {
    let pod = &object(objs, "DaemonSet")["spec"]["template"]["spec"];
    let mut found = Vec::new();
    for c in pod["containers"].as_array().into_iter().flatten() {
        if !c["env"].is_null() {
            found.push(format!("env: {}", c["env"]));
        }
        if !c["envFrom"].is_null() {
            found.push(format!("envFrom: {}", c["envFrom"]));
        }
        for a in c["command"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(c["args"].as_array().into_iter().flatten())
        {
            if a.as_str()
                .is_some_and(|a| a.to_lowercase().contains("pass"))
            {
                found.push(format!("argument: {a}"));
            }
        }
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            if m["mountPath"]
                .as_str()
                .is_some_and(|p| p.starts_with(SECRETS_DIR))
                && m["readOnly"] != true
            {
                found.push(format!("writable secret mount: {m}"));
            }
        }
    }
    for v in pod["volumes"].as_array().into_iter().flatten() {
        if !v["secret"].is_null() && v["secret"]["defaultMode"] != 0o400 {
            found.push(format!("secret readable by others: {v}"));
        }
    }
    found
}

#[test]
fn no_password_reaches_arguments_or_environment() {
    let yaml = render(Some("tests/k8s/fleet-tls-values.yaml"));
    let objs = objects(&yaml);
    assert_eq!(password_exposures(&objs), Vec::<String>::new());
    assert!(
        !yaml.contains("secretKeyRef"),
        "a Secret reaches the environment"
    );
    // The passwords are files from the Secrets, named in the config.
    let toml = object(&objs, "ConfigMap")["data"]["redirect.toml"]
        .as_str()
        .expect("redirect.toml");
    for key in [
        "source-password-file = \"/run/secrets/redirect/db/source-password\"",
        "target-password-file = \"/run/secrets/redirect/db/target-password\"",
        "etcd-password-file = \"/run/secrets/redirect/etcd/etcd-password\"",
    ] {
        assert!(toml.contains(key), "{key} missing:\n{toml}");
    }
    let pod = &object(&objs, "DaemonSet")["spec"]["template"]["spec"];
    let secret_names: Vec<&str> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    assert_eq!(
        secret_names,
        [
            "redirect-db",
            "redirect-db-ca",
            "redirect-etcd",
            "redirect-etcd-tls"
        ]
    );
    // The check sees a password put in the environment or the arguments.
    let mut leaky = objs.clone();
    for o in &mut leaky {
        if o["kind"] == "DaemonSet" {
            let c = &mut o["spec"]["template"]["spec"]["containers"][0];
            c["env"] =
                serde_json::json!([{"name": "REDIRECT_SOURCE_PASSWORD", "value": "hunter2"}]);
            c["args"]
                .as_array_mut()
                .expect("args")
                .push("--etcd-password=hunter2".into());
        }
    }
    assert_eq!(
        password_exposures(&leaky).len(),
        2,
        "{:?}",
        password_exposures(&leaky)
    );
}

/// The node's mount points the simulated pod binds over, created for the test if the machine
/// lacks them and removed again (when still empty) however the test ends.
struct MountPoints(Vec<PathBuf>);

impl MountPoints {
    fn ensure(paths: &[&str]) -> Self {
        let mut created = Vec::new();
        for p in paths {
            let p = PathBuf::from(p);
            if !p.exists() {
                std::fs::create_dir_all(&p).expect("creating a mount point");
                created.push(p);
            }
        }
        Self(created)
    }
}

impl Drop for MountPoints {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// A directory in the lab's bpffs standing for the node's /sys/fs/bpf; removed once the lab
/// (declared after it, so dropped first) has detached and removed its pins.
struct NodeBpffs(PathBuf);

impl Drop for NodeBpffs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the container runtime does for the DaemonSet's pod, in the lab's proxy namespace (the
/// host network): a private mount namespace where the pod's volumes are bound at the paths
/// the DaemonSet mounts them (the node's bpffs at /sys/fs/bpf, the hostPaths at
/// /var/lib/redirect and /run/redirect, the ConfigMap at /etc/redirect, an emptyDir at /tmp),
/// every other mount read-only (readOnlyRootFilesystem), then the container's command.
const POD: &str = r#"set -e
# The binary under test, held open: the pod's /tmp (an emptyDir) would hide it when the
# checkout lives under /tmp (as CI's clean clone does). An image has it at /usr/bin/redirect.
exec 3<"$REDIRECT"
mount --bind "$NODE_BPFFS" /sys/fs/bpf
mount --bind "$NODE_STATE" /var/lib/redirect
mount --bind "$NODE_RUN" /run/redirect
mount --bind "$CONFIGMAP" /etc/redirect
mount -t tmpfs tmpfs /tmp
# An unprivileged container's /proc/sys is read-only.
if [ -n "$READ_ONLY_PROC_SYS" ]; then mount --bind /proc/sys /proc/sys; mount -o remount,bind,ro /proc/sys; fi
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r m; do
  case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|/var/lib/redirect|/run/redirect|/tmp) continue;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
for p in / /etc /etc/redirect /usr /var/lib /root /work; do
  if [ -d "$p" ] && touch "$p/.redirect-k8s-probe" 2>/dev/null; then
    rm -f "$p/.redirect-k8s-probe"; echo "pod: $p is writable, the root file system is not read-only"; exit 97
  fi
done
# Privileged: every capability. Not: root with only the DaemonSet's capabilities.add.
if [ -n "$CAPABILITIES" ]; then
  exec setpriv --bounding-set "-all,$CAPABILITIES" --inh-caps -all /proc/self/fd/3 run --config /etc/redirect/redirect.toml
fi
exec /proc/self/fd/3 run --config /etc/redirect/redirect.toml
"#;

/// Whether a process this test started has exited (a zombie not yet reaped, or gone).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// What the kubelet's readiness probe asks (`httpGet` 127.0.0.1:9187 /metrics, from the host
/// network): whether it answers 2xx/3xx.
fn probe_ready() -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect("127.0.0.1:9187") else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    if stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9187\r\nUser-Agent: kube-probe/1.30\r\nAccept: */*\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 2") || answer.starts_with("HTTP/1.1 3")
}

/// The DaemonSet's pod as far as it can be run without a cluster: the controller started with
/// the chart's rendered redirect.toml (with `values`, plus the lab's addresses), in the
/// volumes' layout, on a read-only root, becomes ready by the readiness probe's own request;
/// replaced by a second pod on the same node (a rolling update), it re-adopts the pinned
/// datapath and the flip made before, from the hostPaths alone. Unprivileged, it runs with
/// only the capabilities the DaemonSet adds and a read-only /proc/sys.
fn run_the_pod_twice(name: &str, values: &str) {
    use redirect_tests::{
        LAB_BPFFS, Lab, Ns, PG_PORT, SOURCE_ADDR, TARGET_ADDR, VIP, require_root, wait_for,
    };
    use std::time::{Duration, Instant};

    require_root();
    let _mount_points =
        MountPoints::ensure(&["/var/lib/redirect", "/run/redirect", "/etc/redirect"]);
    let node_bpffs =
        NodeBpffs(Path::new(LAB_BPFFS).join(format!("k8s-node-{name}-{}", std::process::id())));
    let mut lab = Lab::new(name);
    std::fs::create_dir_all(&node_bpffs.0).expect("the node's bpffs");
    // The lab's own `redirect` commands (status, flip) look where the pod keeps things.
    lab.pin_dir = node_bpffs.0.join("redirect");
    lab.journal = lab.work_dir.join("journal.jsonl");

    let values_file = lab.work_dir.join("values.yaml");
    std::fs::write(
        &values_file,
        format!(
            "{values}config:\n  iface: [p-cli, p-src, p-tgt]\n  vip: \"{VIP}:{PG_PORT}\"\n  \
             source: \"{SOURCE_ADDR}:{PG_PORT}\"\n  target: \"{TARGET_ADDR}:{PG_PORT}\"\n{}",
            if values.contains("privileged: false") {
                "  no-sysctl: true\n"
            } else {
                ""
            }
        ),
    )
    .expect("writing the lab's values");
    let objs = objects(&render(Some(values_file.to_str().expect("utf-8 path"))));
    let configmap = lab.work_dir.join("configmap");
    std::fs::create_dir_all(&configmap).expect("the ConfigMap's volume");
    std::fs::write(
        configmap.join("redirect.toml"),
        object(&objs, "ConfigMap")["data"]["redirect.toml"]
            .as_str()
            .expect("redirect.toml"),
    )
    .expect("writing redirect.toml");
    // The container's command is the DaemonSet's, with its capabilities.
    let container = &object(&objs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["command"],
        serde_json::json!(["/usr/bin/redirect"])
    );
    assert_eq!(
        container["args"],
        serde_json::json!(["run", "--config", "/etc/redirect/redirect.toml"])
    );
    let security = &container["securityContext"];
    let capabilities = if security["privileged"] == true {
        String::new()
    } else {
        assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
        security["capabilities"]["add"]
            .as_array()
            .expect("capabilities.add")
            .iter()
            .map(|c| format!("+{}", c.as_str().expect("a name").to_lowercase()))
            .collect::<Vec<_>>()
            .join(",")
    };

    let work = lab.work_dir.display().to_string();
    let env = [
        format!("NODE_BPFFS={}", node_bpffs.0.display()),
        format!("NODE_STATE={work}"),
        format!("NODE_RUN={work}"),
        format!("CONFIGMAP={}", configmap.display()),
        format!("REDIRECT={}", redirect_bin().display()),
        format!("CAPABILITIES={capabilities}"),
        format!(
            "READ_ONLY_PROC_SYS={}",
            if capabilities.is_empty() { "" } else { "1" }
        ),
    ];
    let start_pod = |lab: &mut Lab, n: u32| -> u32 {
        let mut argv: Vec<&str> = vec!["env"];
        argv.extend(env.iter().map(String::as_str));
        argv.extend([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            POD,
        ]);
        let log = format!("pod-{n}.log");
        let pid = lab.spawn(Ns::Proxy, &argv, &log);
        let log = lab.work_dir.join(log);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !lab.in_ns(Ns::Proxy, probe_ready) {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                Instant::now() < deadline && !exited(pid),
                "pod {n} never became ready:\n{said}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        pid
    };

    let first = start_pod(&mut lab, 0);
    let status = lab.status();
    assert_eq!(status["active"], "source", "{status}");
    assert_eq!(status["vip"], format!("{VIP}:{PG_PORT}"), "{status}");
    assert!(
        node_bpffs.0.join("redirect/ACTIVE").exists(),
        "the datapath is not pinned in the node's bpffs"
    );
    lab.redirect_ok(&["flip", "--to", "target", "--immediate"]);

    // The pod is deleted (SIGTERM): the controller stops well within the grace period, and
    // the datapath stays pinned on the node.
    let stopping = Instant::now();
    lab.signal(first, libc::SIGTERM);
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "SIGTERM took {:?}",
        stopping.elapsed()
    );
    assert!(
        node_bpffs.0.join("redirect/ACTIVE").exists(),
        "the pins went with the pod"
    );
    wait_for(
        Duration::from_secs(5),
        "the first pod's /metrics to close",
        || !lab.in_ns(Ns::Proxy, probe_ready),
    );

    // The replacement pod re-adopts what the node kept.
    let _second = start_pod(&mut lab, 1);
    let log = std::fs::read_to_string(lab.work_dir.join("pod-1.log")).unwrap_or_default();
    assert!(
        log.contains("adopted=true"),
        "the new pod did not re-adopt the pins:\n{log}"
    );
    assert_eq!(
        lab.status()["active"],
        "target",
        "the flip did not survive the pod's replacement"
    );
}

#[test]
fn the_privileged_pod_runs_from_the_rendered_config_and_a_new_pod_re_adopts_the_datapath() {
    run_the_pod_twice("k8s-pod", "");
}

/// `privileged: false`: the four capabilities (what redirect.service grants too) are enough
/// to load, attach, pin and re-adopt, with /proc/sys read-only (`no-sysctl`).
#[test]
fn the_unprivileged_pod_runs_with_only_its_four_capabilities() {
    run_the_pod_twice("k8s-caps", "privileged: false\n");
}
