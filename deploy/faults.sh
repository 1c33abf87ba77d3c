#!/usr/bin/env bash
# The fault and attack suite, and bounded fuzzing of the parsers; prints the reliability table.
#   kill -9 under load, Postgres down 10 s, Redis killed, Redis full, SIGTERM under load (and a second one
#   during a drain, and a spill on a disk that syncs slowly), a burst far above capacity, slowloris, hostile
#   heads and bodies, HTTP/2 stream limits and rapid reset, log forging and secret leaks.
# Every fault test asserts that nothing acknowledged was lost; the table shows the figures of this run.
# FUZZ_CASES (default 100000) sets the cases per parser property (signature header, event body).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
eval "$(deploy/services.sh start)"
mkdir -p .local
FUZZ_CASES=${FUZZ_CASES:-100000}

echo "== fuzz: parser properties, $FUZZ_CASES cases each"
HOOKGATE_FUZZ_CASES=$FUZZ_CASES cargo test --quiet --lib never_panics

echo "== fault and attack tests"
cargo test --quiet --test it -- --nocapture hardening:: notify::a_redis_outage notify::a_full_redis process::sigterm process::a_second_signal process::a_spill_slower 2>&1 | tee .local/faults.log \
  | grep -E "^test result|FAILED|panicked" || true
grep -q "^test result: ok" .local/faults.log || { echo "faults: FAILED (see .local/faults.log)" >&2; exit 1; }

echo
echo "| fault or attack | requests sent | acknowledged | lost | recovery / effect |"
echo "|---|---|---|---|---|"
grep -o "RELIABILITY |.*" .local/faults.log | awk -F' [|] ' '{printf "| %s | %s | %s | %s | %s |\n", $2, $3, $4, $5, $6}'
