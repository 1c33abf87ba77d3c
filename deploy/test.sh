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
# Each test makes its own database (hg_it_*, hg_e2e_*) and leaves it for a post-mortem; drop the ones
# an earlier run left, so repeated runs do not fill the disk.
for db in $(psql "$HOOKGATE_TEST_DATABASE_URL" -Atqc "select datname from pg_database where datname like 'hg\_it\_%' or datname like 'hg\_e2e\_%'"); do
  psql "$HOOKGATE_TEST_DATABASE_URL" -qc "drop database if exists \"$db\" with (force)" >/dev/null
done
echo "== cargo test"
cargo test --workspace --all-targets 2>&1 | tee .local/test-output.log
echo "== fuzz: parser properties, 50000 cases each"
HOOKGATE_FUZZ_CASES=50000 cargo test --quiet --lib never_panics 2>&1 | tee -a .local/test-output.log
echo "== deployment files"
bash deploy/validate.sh
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' .local/test-output.log
