#!/usr/bin/env bash
# Durable ingest directly, through PgBouncer in session mode, and through PgBouncer in transaction mode
# with `store.transaction_pooler` (migrations on `store.migrate_url`), in one command: what a pooler costs.
# Each run sends RATE/s of 1 KiB Stripe events for DURATION after a WARMUP, on a fresh database, then audits
# them with `hookgate-load verify`; it prints the answers, the corrected latencies, the gateway's CPU per
# event and the audit. ROUNDS rounds of the three, interleaved.
#
# Settings (environment): RATE (1000), DURATION (20s), WARMUP (3s; both in whole seconds), ROUNDS (2),
# POOL_SIZE (8, PgBouncer's default_pool_size), OUT (a new temporary directory).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RATE=${RATE:-1000}
DURATION=${DURATION:-20s}
WARMUP=${WARMUP:-3s}
ROUNDS=${ROUNDS:-2}
POOL_SIZE=${POOL_SIZE:-8}
OUT=${OUT:-$(mktemp -d -t hookgate-pooler.XXXXXX)}
mkdir -p "$OUT"
chmod 755 "$OUT" # PgBouncer, run as postgres, reads and writes below it

# shellcheck source=loadtest/scenario.sh
source loadtest/scenario.sh
scenario_setup pooler
WEBHOOKS=127.0.0.1:18280
ADMIN=127.0.0.1:19664
BOUNCER_PORT=64339
HZ=$(getconf CLK_TCK)

# PgBouncer refuses to run as root: as root it runs as postgres, the user deploy/services.sh runs Postgres as.
BOUNCER_DIR=$OUT/pgbouncer
mkdir -p "$BOUNCER_DIR"
as_bouncer_user() { if [ "$(id -u)" = 0 ]; then chown -R postgres "$BOUNCER_DIR"; runuser -u postgres -- "$@"; else "$@"; fi; }
stop_bouncer() {
  if [ -f "$BOUNCER_DIR/pgbouncer.pid" ]; then
    kill "$(cat "$BOUNCER_DIR/pgbouncer.pid")" 2> /dev/null || true
    for _ in $(seq 1 50); do [ -f "$BOUNCER_DIR/pgbouncer.pid" ] || break; sleep 0.1; done
  fi
}
start_bouncer() { # pool_mode
  stop_bouncer
  printf '"postgres" ""\n' > "$BOUNCER_DIR/users.txt"
  cat > "$BOUNCER_DIR/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$PG_PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $BOUNCER_DIR/users.txt
pool_mode = $1
default_pool_size = $POOL_SIZE
max_client_conn = 200
ignore_startup_parameters = extra_float_digits
pidfile = $BOUNCER_DIR/pgbouncer.pid
logfile = $BOUNCER_DIR/pgbouncer-$1.log
INI
  as_bouncer_user pgbouncer -d "$BOUNCER_DIR/pgbouncer.ini"
  for _ in $(seq 1 50); do (exec 3<> "/dev/tcp/127.0.0.1/$BOUNCER_PORT") 2> /dev/null && return; sleep 0.1; done
  echo "pgbouncer did not start: see $BOUNCER_DIR/pgbouncer-$1.log" >&2
  exit 1
}

gateway_pid=
cleanup() {
  if [ -n "$gateway_pid" ]; then kill -TERM "$gateway_pid" 2> /dev/null || true; fi
  stop_bouncer
}
trap cleanup EXIT

run() { # label port extra-[store]-lines
  local label=$1 port=$2 extra=$3
  $PG -d postgres -c "DROP DATABASE IF EXISTS $DATABASE" -c "CREATE DATABASE $DATABASE" 2> /dev/null
  redis-cli -u "$REDIS_URL" DEL pooler:stripe > /dev/null
  cat > "$OUT/gateway-$label.toml" <<TOML
[server]
listen = "$WEBHOOKS"
[admin]
listen = "$ADMIN"
[store]
url = "postgres://postgres@127.0.0.1:$port/$DATABASE"
$extra
[notify]
redis_url = "$REDIS_URL"
stream_key = "pooler:{source}"
[log]
level = "warn"
[sources.stripe]
scheme = "stripe"
secret_file = "$OUT/secret"
TOML
  $GATEWAY --config "$OUT/gateway-$label.toml" serve 2> "$OUT/gateway-$label.log" &
  gateway_pid=$!
  for _ in $(seq 1 100); do curl -sf "http://$ADMIN/readyz" > /dev/null && break; sleep 0.1; done
  local before after
  before=$(awk '{print $14 + $15}' "/proc/$gateway_pid/stat")
  $LOAD attack --target "http://$WEBHOOKS/webhooks/stripe" --secret "$SECRET" --rate "$RATE" --duration "$DURATION" \
    --warmup "$WARMUP" --connections 256 --no-progress --output "$OUT/run-$label.csv" > "$OUT/run-$label.txt"
  after=$(awk '{print $14 + $15}' "/proc/$gateway_pid/stat")
  kill -TERM "$gateway_pid"
  wait "$gateway_pid" || true
  gateway_pid=
  $LOAD verify --database-url "$DATABASE_URL" --redis-url "$REDIS_URL" \
    --stream-key "pooler:{source}" "$OUT/run-$label.csv" > "$OUT/verify-$label.txt" 2>&1 || echo "VERIFY FAILED: $label"
  local sent=$((RATE * (${DURATION%s} + ${WARMUP%s})))
  echo "$label: $(grep -E '^Status' "$OUT/run-$label.txt" | sed 's/  */ /g')"
  echo "  latency $(grep -E '^Latencies' "$OUT/run-$label.txt" | sed 's/  */ /g;s/^Latencies //')"
  echo "          $(grep -E '^  corrected' "$OUT/run-$label.txt" | sed 's/  */ /g;s/^ //')"
  echo "  gateway CPU (warm-up included): $(awk -v t=$((after - before)) -v hz="$HZ" -v n="$sent" \
    'BEGIN {printf "%.1f", t / hz / n * 1e6}') µs per event"
  echo "  $(tail -1 "$OUT/verify-$label.txt")"
}

echo "Durable mode, $RATE/s for $DURATION after $WARMUP; PgBouncer $(pgbouncer --version | head -1 | awk '{print $2}')," \
  "default_pool_size $POOL_SIZE. Files in $OUT."
for round in $(seq 1 "$ROUNDS"); do
  run "direct-$round" "$PG_PORT" ""
  start_bouncer session
  run "session-$round" "$BOUNCER_PORT" ""
  start_bouncer transaction
  run "transaction-$round" "$BOUNCER_PORT" "transaction_pooler = true
migrate_url = \"$DATABASE_URL\""
  stop_bouncer
done
$PG -d postgres -c "DROP DATABASE IF EXISTS $DATABASE" 2> /dev/null
