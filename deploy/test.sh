#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit, property and integration tests against real local
# Postgres and Redis, which this script installs (when missing) and starts itself.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

eval "$(deploy/services.sh start)"

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
mkdir -p .local
# Each test makes its own database (hg_it_*, hg_e2e_*). Drop what an earlier run left (a failed run keeps
# them for a post-mortem), and this run's own once it has passed.
deploy/services.sh drop-test-databases
# Likewise the config, secret and log files the tests write under cargo's scratch folder (target/tmp).
rm -rf target/tmp/hookgate-it*
echo "== cargo test"
cargo test --workspace --all-targets 2>&1 | tee .local/test-output.log
echo "== fuzz: parser properties, 50000 cases each"
HOOKGATE_FUZZ_CASES=50000 cargo test --quiet --lib never_panics 2>&1 | tee -a .local/test-output.log
echo "== deployment files"
bash deploy/validate.sh
deploy/services.sh drop-test-databases
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' .local/test-output.log
