# Sourced by loadtest/flood.sh, pooler.sh and outage.sh: builds the release binaries, starts Postgres and
# Redis (deploy/services.sh) and names what a scenario uses. `scenario_setup NAME` (with OUT set) defines
# LOAD, GATEWAY, PG_PORT, PG (psql as the superuser), REDIS_URL, DATABASE (hookgate_NAME), DATABASE_URL and
# SECRET, a fresh Stripe secret also written to $OUT/secret for the gateway's secret_file.
# shellcheck shell=bash

scenario_setup() { # name
  cargo build --release --workspace --quiet
  eval "$(deploy/services.sh start)"
  LOAD=target/release/hookgate-load
  GATEWAY=target/release/hookgate
  PG_PORT=${HOOKGATE_PG_PORT:-54329}
  PG="psql -h 127.0.0.1 -p $PG_PORT -U postgres -q"
  REDIS_URL=redis://127.0.0.1:${HOOKGATE_REDIS_PORT:-63799}
  DATABASE=hookgate_$1
  DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/$DATABASE
  SECRET=whsec_$1_$(date +%s)
  printf '%s\n' "$SECRET" > "$OUT/secret"
}
