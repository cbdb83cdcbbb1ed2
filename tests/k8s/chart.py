#!/usr/bin/env python3
"""`helm lint` and `helm template` for tests/tests/kubernetes.rs, on Helm's own Go SDK.

The helm command is not packaged by any registry this project installs from (Debian 12 has
none, and Go modules cannot be fetched here); PyPI's helm-python-sdk ships Helm v4's Go SDK
(lint, values.schema.json validation, rendering) compiled into a C library. This wraps the
calls the helm command makes for the same subcommands. With a real helm at hand the same
checks are `helm lint --strict` and `helm template`.

  chart.py lint CHART [-f VALUES]...
  chart.py template CHART [-f VALUES]... [--name NAME] [--namespace NS]
  chart.py manifest CHART      the plain manifest (packaging/kubernetes/daemonset.yaml)
  chart.py objects FILE        the objects of a multi-document YAML file, as a JSON array
  chart.py validate FILE...    every object of each multi-document YAML file against the
                               Kubernetes 1.30 schema, offline (kubernetes-validate)
Exits 1 with the findings on stderr when a check fails, 2 when a tool is missing.
"""

import argparse
import sys

KUBE_VERSION = "1.30.0"
NAME = "redirect"
NAMESPACE = "redirect"

# Helm's install order for the kinds this chart makes (helm template prints in this order).
KIND_ORDER = ["Namespace", "ServiceAccount", "Secret", "ConfigMap", "DaemonSet", "PodMonitor"]

MANIFEST_HEADER = """\
# redirect on Kubernetes: a plain manifest (namespace "redirect") for clusters without Helm.
#
# GENERATED from the chart packaging/helm/redirect with its default values; do not edit:
# change the chart, then regenerate with
#   python3 tests/k8s/chart.py manifest packaging/helm/redirect > packaging/kubernetes/daemonset.yaml
# (tests/tests/kubernetes.rs fails while this file and the chart disagree).
#
# NOT RUN ON A REAL CLUSTER: rendered, linted and checked against the Kubernetes 1.30 schema
# and `redirect config check` only. ADAPT before applying: the image (none is published), the
# node label, the interface names, the VIP and the two servers in redirect.toml. Each proxy
# node needs a kernel with BTF (5.18+), bpffs mounted at /sys/fs/bpf, and the VIP as one of
# its addresses. Every labelled node gets this same redirect.toml (the same VIP): without a
# fleet (etcd), label one node only. The pod is privileged on the host's network, which Pod
# Security Admission allows only in a namespace labelled for it:
#   kubectl create namespace redirect
#   kubectl label namespace redirect pod-security.kubernetes.io/enforce=privileged
#   kubectl apply -f daemonset.yaml
"""


def missing(what, package):
    print(
        f"{what} is not installed: `pip install {package}` "
        "(cargo xtask setup installs it)",
        file=sys.stderr,
    )
    sys.exit(2)


def helm():
    try:
        import helm_python
    except ImportError:
        missing("Helm's SDK (helm_python)", "helm-python-sdk==0.2.2")
    return helm_python


def load_values(files):
    import yaml

    values = {}
    for path in files or []:
        with open(path) as f:
            values = merge(values, yaml.safe_load(f) or {})
    return values


def merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lint(args):
    h = helm()
    report = h.lint(
        args.chart, load_values(args.values), strict=True, kube_version="v" + KUBE_VERSION
    )
    findings = report.get("messages") or []
    for m in findings:
        print(f"[{['unknown', 'INFO', 'WARNING', 'ERROR'][m['severity']]}] {m['path']}: {m['error']}")
    errors = [m for m in findings if m["severity"] >= 2] + list(report.get("errors") or [])
    print(f"1 chart(s) linted, {1 if errors else 0} chart(s) failed")
    return 1 if errors else 0


def render(chart_dir, values, name=NAME, namespace=NAMESPACE):
    """The documents `helm template` prints, in its order, each with its `# Source:` line."""
    import yaml

    h = helm()
    with h.Chart.load(chart_dir) as chart:
        # helm template validates the values against values.schema.json before rendering.
        chart.validate_schema(values)
        manifests = chart.render(values, name=name, namespace=namespace, is_install=True)
    docs = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        for part in text.split("\n---\n"):
            obj = yaml.safe_load(part)
            if obj:
                docs.append((path, part.strip("\n"), obj))
    docs.sort(key=lambda d: (KIND_ORDER.index(d[2]["kind"]), d[2]["metadata"]["name"], d[0]))
    return "".join(f"---\n# Source: {path}\n{text}\n" for path, text, _ in docs)


def template(args):
    h = helm()
    try:
        sys.stdout.write(render(args.chart, load_values(args.values), args.name, args.namespace))
    except h.HelmError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


def manifest(args):
    sys.stdout.write(MANIFEST_HEADER + render(args.chart, {}))
    return 0


def objects(args):
    import json

    import yaml

    with open(args.file) as f:
        json.dump([o for o in yaml.safe_load_all(f) if o], sys.stdout)
    return 0


def validate(args):
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate", "kubernetes-validate==1.37.0")
    import yaml

    failed = 0
    for path in args.files:
        with open(path) as f:
            objs = [o for o in yaml.safe_load_all(f) if o]
        for obj in objs:
            what = f"{path}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            try:
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
                print(f"{what}: valid (Kubernetes {KUBE_VERSION}, strict)")
            except kubernetes_validate.SchemaNotFoundError:
                # A custom resource (PodMonitor): its CRD's schema is not shipped offline.
                print(f"{what}: NOT CHECKED (no schema for this kind in Kubernetes {KUBE_VERSION})")
            except kubernetes_validate.ValidationError as e:
                path_in = ".".join(str(p) for p in e.absolute_path)
                print(f"{what}: INVALID at {path_in or '(top)'}: {e.message}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in ("lint", "template", "manifest"):
        s = sub.add_parser(cmd)
        s.add_argument("chart")
        if cmd != "manifest":
            s.add_argument("-f", "--values", action="append")
        if cmd == "template":
            s.add_argument("--name", default=NAME)
            s.add_argument("--namespace", default=NAMESPACE)
    o = sub.add_parser("objects")
    o.add_argument("file")
    v = sub.add_parser("validate")
    v.add_argument("files", nargs="+")
    args = p.parse_args()
    return {"lint": lint, "template": template, "manifest": manifest, "objects": objects, "validate": validate}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
