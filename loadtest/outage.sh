#!/usr/bin/env bash
# A shutdown in enqueue mode while Postgres is down, in one command: what `shutdown.spill_dir` keeps. A gateway
# in enqueue mode receives signed Stripe events at RATE for DURATION. Postgres is stopped DOWN_AT seconds in,
# so acknowledged events pile up in the queue (and past its capacity, requests get 503), and the gateway gets
# SIGTERM TERM_AT seconds in: its drain runs out with Postgres still down. Postgres is started again, then a
# new gateway on the same configuration, which stores what the first one spilled. `hookgate-load verify` then
# audits every 202 the sender got: in Postgres once, with its exact body, and on its stream.
# With SPILL=0 the gateways have no spill_dir: the same run shows what a shutdown then loses.
#
# Settings (environment): RATE (3000), DURATION (20s), DOWN_AT (6), TERM_AT (10), DRAIN_GRACE_MS (2000),
# SPILL (1), OUT (a new temporary directory). Loopback only; Postgres and Redis from deploy/services.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RATE=${RATE:-3000}
DURATION=${DURATION:-20s}
DOWN_AT=${DOWN_AT:-6}
TERM_AT=${TERM_AT:-10}
DRAIN_GRACE_MS=${DRAIN_GRACE_MS:-2000}
SPILL=${SPILL:-1}
OUT=${OUT:-$(mktemp -d -t hookgate-outage.XXXXXX)}
mkdir -p "$OUT"

# shellcheck source=loadtest/scenario.sh
source loadtest/scenario.sh
scenario_setup outage
WEBHOOKS=127.0.0.1:18280
ADMIN=127.0.0.1:19664
SPILL_DIR=$OUT/spill

gateway_pid=
cleanup() {
  if [ -n "$gateway_pid" ]; then kill -TERM "$gateway_pid" 2> /dev/null || true; fi
  deploy/services.sh start-postgres 2> /dev/null || true
}
trap cleanup EXIT

$PG -d postgres -c "DROP DATABASE IF EXISTS $DATABASE" -c "CREATE DATABASE $DATABASE" 2> /dev/null
redis-cli -u "$REDIS_URL" DEL outage:stripe > /dev/null
cat > "$OUT/gateway.toml" <<TOML
[server]
listen = "$WEBHOOKS"
[admin]
listen = "$ADMIN"
[queue]
ack_mode = "enqueue"
[store]
url = "$DATABASE_URL"
[notify]
redis_url = "$REDIS_URL"
stream_key = "outage:{source}"
[log]
level = "warn"
format = "json"
[shutdown]
requests_grace_ms = 1000
drain_grace_ms = $DRAIN_GRACE_MS
$([ "$SPILL" = 1 ] && echo "spill_dir = \"$SPILL_DIR\"")
[sources.stripe]
scheme = "stripe"
secret_file = "$OUT/secret"
TOML

start_gateway() { # log file
  $GATEWAY --config "$OUT/gateway.toml" serve 2> "$1" &
  gateway_pid=$!
  for _ in $(seq 1 100); do curl -sf "http://$ADMIN/readyz" > /dev/null && return; sleep 0.1; done
  echo "the gateway did not become ready (see $1)" >&2
  exit 1
}
metric() { curl -s "http://$ADMIN/metrics" | awk -v name="$1" '$1 == name {print $2}'; }
now_ms() { date +%s%3N; }

start_gateway "$OUT/gateway-1.log"
$LOAD attack --target "http://$WEBHOOKS/webhooks/stripe" --secret "$SECRET" --rate "$RATE" --duration "$DURATION" \
  --connections 64 --timeout 5s --no-progress --output "$OUT/attack.csv" > "$OUT/attack.txt" 2>&1 &
attack=$!
sleep "$DOWN_AT"
deploy/services.sh stop-postgres 2> /dev/null
sleep $((TERM_AT - DOWN_AT))
queued=$(metric hookgate_queue_depth)
term=$(now_ms)
kill -TERM "$gateway_pid"
wait "$gateway_pid" || true
stopped_ms=$(($(now_ms) - term))
gateway_pid=
wait "$attack" || true
mkdir -p "$SPILL_DIR"
spilled=$(find "$SPILL_DIR" -name 'spill-*.jsonl' -exec cat {} + | wc -l)
partial=$(find "$SPILL_DIR" -name '*.partial' | wc -l)
lost_logged=$(grep -c 'acknowledged events LOST' "$OUT/gateway-1.log" || true)

deploy/services.sh start-postgres 2> /dev/null
restart=$(now_ms)
start_gateway "$OUT/gateway-2.log"
ready_ms=$(($(now_ms) - restart))
imported_ms=-
if [ "$SPILL" = 1 ]; then
  for _ in $(seq 1 600); do
    if [ -z "$(find "$SPILL_DIR" -name 'spill-*.jsonl')" ]; then imported_ms=$(($(now_ms) - restart)); break; fi
    sleep 0.1
  done
fi
# Every stored event on its stream before the audit: the outbox empty.
for _ in $(seq 1 300); do
  [ "$($PG -d "$DATABASE" -Atc 'SELECT count(*) FROM events_outbox')" = 0 ] && break
  sleep 0.1
done
imported=$(metric hookgate_spill_imported_events_total)
kill -TERM "$gateway_pid"
wait "$gateway_pid" || true
gateway_pid=

verified=0
$LOAD verify --database-url "$DATABASE_URL" --redis-url "$REDIS_URL" --stream-key "outage:{source}" "$OUT/attack.csv" \
  > "$OUT/verify.txt" 2>&1 || verified=$?
echo "Enqueue mode, Stripe at $RATE/s for $DURATION; Postgres stopped at ${DOWN_AT}s, SIGTERM at ${TERM_AT}s" \
  "(drain_grace_ms $DRAIN_GRACE_MS), spill_dir $([ "$SPILL" = 1 ] && echo set || echo unset). Files in $OUT."
echo "answers: $(grep -E '^Status' "$OUT/attack.txt" | sed 's/  */ /g')"
echo "at SIGTERM: $queued events queued; the gateway stopped in $stopped_ms ms; $spilled events in finished spill files," \
  "$partial unfinished; $lost_logged log lines naming lost events"
echo "restart: ready in $ready_ms ms; spill files stored and removed in ${imported_ms} ms; $imported events imported"
echo "audit: $(tail -1 "$OUT/verify.txt")"
$PG -d postgres -c "DROP DATABASE IF EXISTS $DATABASE" 2> /dev/null
exit "$verified"
