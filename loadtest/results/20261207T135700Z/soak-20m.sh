#!/usr/bin/env bash
# 20-minute durable soak at 8,640/s, RSS every 5 s with body memory and slow commits; then 60 s idle.
set -u
# Run from the repository (2026-12-07 14:44Z, build 69d8600, the host at its default settings); outputs beside it.
OUT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$OUT/../../.."
R=loadtest/results/20261207T135700Z
eval "$(deploy/services.sh env)"
PG="psql -h 127.0.0.1 -p 54329 -U postgres -q"
$PG -d postgres -c "DROP DATABASE IF EXISTS hookgate_soak" -c "CREATE DATABASE hookgate_soak"
redis-cli -p 63799 DEL bench:stripe > /dev/null
HOOKGATE__STORE__URL=postgres://postgres@127.0.0.1:54329/hookgate_soak HOOKGATE__NOTIFY__STREAM_MAXLEN=1000000 \
  ./target/release/hookgate --config $R/gateway-durable.toml serve 2> "$OUT/gateway-soak-20m.log" &
GW=$!
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:19464/readyz > /dev/null && break; sleep 0.1; done
echo "elapsed_s,rss_mib,body_memory_mib,commits_over_50ms,commits,conns" > "$OUT/soak-20m-rss.csv"
( t=0; while kill -0 "$GW" 2>/dev/null; do
    held=$(curl -s --max-time 2 http://127.0.0.1:19464/metrics | awk '
      /^hookgate_body_memory_bytes / {b = $2}
      /^hookgate_http_connections_open / {c = $2}
      /^hookgate_store_commit_duration_seconds_bucket\{le="0.05"\}/ {fast = $2}
      /^hookgate_store_commit_duration_seconds_count/ {all = $2}
      END {printf "%.1f,%d,%d,%d", b / 1048576, all - fast, all, c}')
    echo "$t,$(awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$GW/status"),$held" >> "$OUT/soak-20m-rss.csv"
    sleep 5; t=$((t + 5)); done ) &
SAMPLER=$!
./target/release/hookgate-load attack --target http://127.0.0.1:18080/webhooks/stripe --secret "$(cat $R/secret)" \
  --rate 8640 --duration 20m --warmup 2s --connections 256 --no-progress --report-json "$OUT/soak-20m.json" > "$OUT/soak-20m.txt"
sleep 60
kill $SAMPLER; kill -TERM $GW; wait $GW
echo done
