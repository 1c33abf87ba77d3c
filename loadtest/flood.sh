#!/usr/bin/env bash
# A flooding sender beside Stripe through a store stall, in one command: what `sources.<name>.max_queued`
# buys. For each share in SHARES (0: unset), a gateway in enqueue mode receives Stripe at STEADY_RATE and a
# second Stripe-signed source ("partner") at FLOOD_RATE for DURATION, while the events table is locked from
# STALL_AT for STALL (a Postgres stall: a lock, a failover, a slow disk), so the queue fills. Each run starts
# on a fresh database, and both sources are audited with `hookgate-load verify` afterwards. It prints, per
# share and source, the answers, the corrected latencies and the audit, and the gateway's refusal counters.
#
# Settings (environment): SHARES ("0 4096 1024", the partner's max_queued), STEADY_RATE (200), FLOOD_RATE
# (3000), DURATION (30s), STALL_AT (10, seconds), STALL (10, seconds), OUT (a new temporary directory).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SHARES=${SHARES:-0 4096 1024}
STEADY_RATE=${STEADY_RATE:-200}
FLOOD_RATE=${FLOOD_RATE:-3000}
DURATION=${DURATION:-30s}
STALL_AT=${STALL_AT:-10}
STALL=${STALL:-10}
OUT=${OUT:-$(mktemp -d -t hookgate-flood.XXXXXX)}
mkdir -p "$OUT"

# shellcheck source=loadtest/scenario.sh
source loadtest/scenario.sh
scenario_setup flood
WEBHOOKS=127.0.0.1:18180
ADMIN=127.0.0.1:19564

gateway_pid=
cleanup() { if [ -n "$gateway_pid" ]; then kill -TERM "$gateway_pid" 2> /dev/null || true; fi; }
trap cleanup EXIT

run() { # share
  local share=$1 label="share-$1"
  $PG -d postgres -c "DROP DATABASE IF EXISTS $DATABASE" -c "CREATE DATABASE $DATABASE" 2> /dev/null
  redis-cli -u "$REDIS_URL" DEL flood:stripe flood:partner > /dev/null
  cat > "$OUT/gateway-$label.toml" <<TOML
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
stream_key = "flood:{source}"
[log]
level = "warn"
[sources.stripe]
scheme = "stripe"
secret_file = "$OUT/secret"
[sources.partner]
scheme = "stripe"
secret_file = "$OUT/secret"
max_queued = $share
TOML
  $GATEWAY --config "$OUT/gateway-$label.toml" serve 2> "$OUT/gateway-$label.log" &
  gateway_pid=$!
  for _ in $(seq 1 100); do curl -sf "http://$ADMIN/readyz" > /dev/null && break; sleep 0.1; done
  local steady flood
  $LOAD attack --target "http://$WEBHOOKS/webhooks/stripe" --secret "$SECRET" --rate "$STEADY_RATE" \
    --duration "$DURATION" --connections 32 --no-progress --output "$OUT/stripe-$label.csv" > "$OUT/stripe-$label.txt" &
  steady=$!
  $LOAD attack --target "http://$WEBHOOKS/webhooks/partner" --secret "$SECRET" --rate "$FLOOD_RATE" \
    --duration "$DURATION" --connections 256 --no-progress --output "$OUT/partner-$label.csv" > "$OUT/partner-$label.txt" &
  flood=$!
  sleep "$STALL_AT"
  $PG -d "$DATABASE" -c "BEGIN" -c "LOCK TABLE events IN ACCESS EXCLUSIVE MODE" -c "SELECT pg_sleep($STALL)" -c "COMMIT" > /dev/null
  wait "$steady" "$flood"
  curl -s "http://$ADMIN/metrics" | grep -E '^hookgate_(queue_rejections_total|source_share_rejections_total)' \
    | grep -v -E 'shutting_down|body_memory_full' > "$OUT/metrics-$label.txt" || true
  kill -TERM "$gateway_pid"
  wait "$gateway_pid" || true
  gateway_pid=
  for source in stripe partner; do
    $LOAD verify --database-url "$DATABASE_URL" --redis-url "$REDIS_URL" --stream-key "flood:{source}" \
      "$OUT/$source-$label.csv" > "$OUT/verify-$source-$label.txt" 2>&1 || echo "VERIFY FAILED: $source, $label"
    echo "max_queued = $share, $source: $(grep -E '^Status' "$OUT/$source-$label.txt" | sed 's/  */ /g')"
    echo "  latency $(grep -E '^Latencies' "$OUT/$source-$label.txt" | sed 's/  */ /g;s/^Latencies //')"
    echo "          $(grep -E '^  corrected' "$OUT/$source-$label.txt" | sed 's/  */ /g;s/^ //')"
    echo "  $(tail -1 "$OUT/verify-$source-$label.txt")"
  done
  sed 's/^/  /' "$OUT/metrics-$label.txt"
}

echo "Stripe at $STEADY_RATE/s and partner at $FLOOD_RATE/s for $DURATION, enqueue mode; the events table locked" \
  "from ${STALL_AT}s for ${STALL}s. Files in $OUT."
for share in $SHARES; do run "$share"; done
$PG -d postgres -c "DROP DATABASE IF EXISTS $DATABASE" 2> /dev/null
