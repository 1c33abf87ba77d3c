#!/usr/bin/env bash
# How often durable mode holds 20,000/s for 60 s on this host (PERFORMANCE.md, "Benchmark runs", the EPYC
# host of 2026-12-07): ROUNDS rounds, each on a fresh database with a fresh gateway (the benchmark's gateway
# config), a 2 s warm-up, then RATE for DUR, audited with `hookgate-load verify` against Postgres and the
# stream. The benchmark's host settings (bench.sh's TUNE_HOST). Prints one line a round. Run from the
# repository: bash <this file>.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
OUT=${OUT:-$(mktemp -d)}; RATE=${RATE:-20000}; DUR=${DUR:-60s}; ROUNDS=${ROUNDS:-5}
source loadtest/scenario.sh
scenario_setup probe20k
OLD_DIRTY=$(cat /proc/sys/vm/dirty_background_ratio); OLD_AUTOGROUP=$(cat /proc/sys/kernel/sched_autogroup_enabled)
GW=
cleanup() {
  [ -z "$GW" ] || kill "$GW" 2>/dev/null || true
  echo "$OLD_DIRTY" > /proc/sys/vm/dirty_background_ratio
  echo "$OLD_AUTOGROUP" > /proc/sys/kernel/sched_autogroup_enabled
  $PG -c "DROP DATABASE IF EXISTS $DATABASE" || true
}
trap cleanup EXIT
echo $((4 * 1024 * 1024)) > /proc/sys/vm/dirty_background_bytes
echo 0 > /proc/sys/kernel/sched_autogroup_enabled
cat > "$OUT/gw.toml" <<T
[server]
listen = "127.0.0.1:18080"
[admin]
listen = "127.0.0.1:19464"
[queue]
ack_mode = "durable"
[store]
url = "$DATABASE_URL"
[notify]
redis_url = "$REDIS_URL"
stream_key = "probe20k:{source}"
stream_maxlen = 10000000
[log]
level = "warn"
[sources.stripe]
scheme = "stripe"
secret_file = "$OUT/secret"
T
ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
for r in $(seq "$ROUNDS"); do
  $PG -c "DROP DATABASE IF EXISTS $DATABASE" -c "CREATE DATABASE $DATABASE"
  redis-cli -p "${HOOKGATE_REDIS_PORT:-63799}" DEL probe20k:stripe > /dev/null
  $GATEWAY --config "$OUT/gw.toml" serve > "$OUT/gw-$r.log" 2>&1 &
  GW=$!
  for _ in $(seq 50); do curl -sf http://127.0.0.1:19464/readyz > /dev/null && break; sleep 0.2; done
  c0=$(ticks); t0=$(date +%s.%N)
  $LOAD attack --target http://127.0.0.1:18080/webhooks/stripe --secret "$SECRET" --rate "$RATE" --duration "$DUR" \
    --warmup 2s --connections 256 --no-progress --output "$OUT/r$r.csv" --report-json "$OUT/r$r.json" > "$OUT/r$r.txt"
  c1=$(ticks); t1=$(date +%s.%N)
  for _ in $(seq 600); do
    [ "$($PG -At -d "$DATABASE" -c "SELECT count(*) FROM events_outbox")" = 0 ] && break; sleep 0.5
  done
  if $LOAD verify "$OUT/r$r.csv" --database-url "$DATABASE_URL" --redis-url "$REDIS_URL" --stream-key "probe20k:{source}" \
      --report-json "$OUT/v$r.json" > /dev/null; then verdict=ok; else verdict=FAILED; fi
  kill "$GW"; wait "$GW" || true; GW=
  python3 - "$r" "$OUT/r$r.json" "$OUT/v$r.json" "$((c1 - c0))" "$verdict" "$t0" "$t1" <<'P'
import json, sys
r, run, audit, ticks, verdict = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3])), int(sys.argv[4]), sys.argv[5]
busy = ticks / (float(sys.argv[7]) - float(sys.argv[6]))  # USER_HZ is 100: ticks a second are percent of one core
c = run["latency_corrected"]
held = "held" if c["p99_us"] <= 10_000 and run["success_ratio"] == 1.0 else "missed"
print(f"round {r}: {held}: P50 {c['p50_us']/1000:.2f} P99 {c['p99_us']/1000:.2f} P99.9 {c['p999_us']/1000:.1f} ms, "
      f"achieved {run['achieved_rate']:.0f}/s, codes {run['status_codes']}, machine {busy:.0f}% busy; "
      f"verify {verdict}: {audit['acknowledged']} acknowledged, {audit['stored']} stored, {audit['lost']} lost, "
      f"{audit['on_stream']} on the stream", flush=True)
P
done
