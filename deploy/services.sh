#!/usr/bin/env bash
# Throwaway local Postgres and Redis on loopback, for development, tests and benchmarks. Idempotent.
#
#   deploy/services.sh start            start both (installing them, Prometheus, PgBouncer and strace for the
#                                       tests, and curl for the README's examples, from apt when missing); print
#                                       the env
#   deploy/services.sh stop             stop both
#   deploy/services.sh status           say what runs
#   deploy/services.sh env              print the environment variables (eval-able)
#   deploy/services.sh start-postgres | stop-postgres | start-redis | stop-redis
#
# Settings (environment): HOOKGATE_STATE_DIR (default <repo>/.local), HOOKGATE_PG_PORT (54329),
# HOOKGATE_REDIS_PORT (63799). Tests use these to run private instances they can stop and start.
# HOOKGATE_PG_TLS_DIR: a directory holding server.crt and server.key; Postgres then serves TLS too, with
# that certificate (the TLS tests start a private instance so).
# HOOKGATE_PG_WAL_DIR: where a new cluster keeps its WAL (initdb --waldir; read only when the cluster is
# created). The benchmark's attribution run puts it on a tmpfs to measure what the disk's flush costs
# (loadtest/PERFORMANCE.md); a WAL in memory is lost with the host, so never for data that matters.
# Postgres refuses to run as root: as root, it runs as the unprivileged user `postgres` (created if absent).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE_DIR=${HOOKGATE_STATE_DIR:-$ROOT/.local}
PG_PORT=${HOOKGATE_PG_PORT:-54329}
REDIS_PORT=${HOOKGATE_REDIS_PORT:-63799}
PG_DB=hookgate

log() { echo "services: $*" >&2; }

APT_UPDATED=
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    log "need $* but not root: install it (apt-get install $*) and retry"; exit 1
  fi
  if [ -z "$APT_UPDATED" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    APT_UPDATED=1
  fi
  log "installing $* from apt"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# Postgres binaries: PATH first, then Debian's versioned directory; install from apt when absent.
pg_bin() {
  local tool=$1 found
  found=$(command -v "$tool" 2>/dev/null || true)
  if [ -z "$found" ]; then
    found=$(ls -d /usr/lib/postgresql/*/bin/"$tool" 2>/dev/null | sort -V | tail -n 1 || true)
  fi
  echo "$found"
}

ensure_postgres_installed() {
  if [ -z "$(pg_bin initdb)" ] || [ -z "$(pg_bin pg_ctl)" ] || ! command -v psql >/dev/null; then
    apt_install postgresql postgresql-client
  fi
}

ensure_prometheus_installed() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null || apt_install prometheus
}

# The pooler tests run pgbouncer themselves (tests/it/pooler.rs); only the binary is needed. Debian's package
# also enables a system pgbouncer on port 6432, which nothing here uses.
ensure_pgbouncer_installed() {
  command -v pgbouncer >/dev/null || apt_install pgbouncer
}

# A test that slows the gateway's disk syncs (tests/it/process.rs, `slow_fdatasync`).
ensure_strace_installed() {
  command -v strace >/dev/null || apt_install strace
}

# The README's "Try it with curl" (and the test that runs it, tests/it/quickstart.rs).
ensure_curl_installed() {
  command -v curl >/dev/null || apt_install curl ca-certificates
}

ensure_redis_installed() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null || apt_install redis-server redis-tools
}

# The OS user Postgres runs as: ourselves unless root; as root, `postgres` (created when missing).
pg_os_user() {
  if [ "$(id -u)" != 0 ]; then id -un; return; fi
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
  echo postgres
}

as_pg() {
  local user; user=$(pg_os_user)
  if [ "$user" = "$(id -un)" ]; then "$@"; else runuser -u "$user" -- "$@"; fi
}

# Where the data folder lives: in the project unless the Postgres user cannot reach it (e.g. a clone under
# /root), then in a per-project folder under /var/tmp.
pg_data_dir() {
  local dir=$STATE_DIR/pg
  mkdir -p "$STATE_DIR"
  if [ "$(id -u)" = 0 ] && ! runuser -u "$(pg_os_user)" -- test -x "$STATE_DIR" 2>/dev/null; then
    dir=/var/tmp/hookgate-$(echo -n "$STATE_DIR" | sha1sum | cut -c1-12)/pg
  fi
  echo "$dir"
}

pg_running() {
  local data; data=$(pg_data_dir)
  [ -f "$data/PG_VERSION" ] && as_pg "$(pg_bin pg_ctl)" status -D "$data" >/dev/null 2>&1
}

start_postgres() {
  ensure_postgres_installed
  local data user; data=$(pg_data_dir); user=$(pg_os_user)
  mkdir -p "$data"
  chown "$user" "$data" "$(dirname "$data")"
  chmod 700 "$data"
  if [ ! -f "$data/PG_VERSION" ]; then
    local waldir=()
    if [ -n "${HOOKGATE_PG_WAL_DIR:-}" ]; then
      mkdir -p "$HOOKGATE_PG_WAL_DIR"
      chown "$user" "$HOOKGATE_PG_WAL_DIR"
      waldir=(--waldir "$HOOKGATE_PG_WAL_DIR")
    fi
    log "initdb $data ${waldir[*]}"
    as_pg "$(pg_bin initdb)" -D "$data" -U postgres --auth=trust --encoding=UTF8 --no-locale "${waldir[@]}" >/dev/null
  fi
  if ! pg_running; then
    if (exec 3<>"/dev/tcp/127.0.0.1/$PG_PORT") 2>/dev/null; then
      log "port $PG_PORT is taken by another process (another checkout's Postgres?): stop it, or set HOOKGATE_PG_PORT"
      exit 1
    fi
    log "starting postgres on 127.0.0.1:$PG_PORT"
    # synchronous_commit and fsync stay on: a 202 means the event is on disk. Checkpoints are spaced out
    # and full-page images compressed, as for any write-heavy Postgres: a checkpoint's burst of full-page
    # writes otherwise stalls commits for ~100 ms (seen in the benchmark's latency plot). Compressed with
    # lz4 where the server has it: with random event ids (a full-page image per first touch of an index
    # page after each checkpoint) pglz cost Postgres a third more CPU (loadtest/PERFORMANCE.md, "Event ids
    # and the primary key"). Autovacuum looks every 5 s, so the small rounds migration 0004 asks for find
    # their pages still in shared_buffers.
    local wal_compression=on
    if as_pg "$(pg_bin postgres)" -C wal_compression -c wal_compression=lz4 -D "$data" >/dev/null 2>&1; then
      wal_compression=lz4
    fi
    local tls=""
    if [ -n "${HOOKGATE_PG_TLS_DIR:-}" ]; then
      # Postgres reads its key only if the server's user owns it and nobody else can read it.
      install -o "$user" -m 600 "$HOOKGATE_PG_TLS_DIR/server.key" "$data/server.key"
      install -o "$user" -m 644 "$HOOKGATE_PG_TLS_DIR/server.crt" "$data/server.crt"
      tls="-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key"
    fi
    as_pg "$(pg_bin pg_ctl)" start -D "$data" -l "$data/../postgres.log" -w -t 60 -o \
      "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=300 \
       -c shared_buffers=256MB -c max_wal_size=8GB -c checkpoint_timeout=15min -c wal_compression=$wal_compression \
       -c checkpoint_completion_target=0.9 -c log_checkpoints=on -c autovacuum_naptime=5s \
       -c log_autovacuum_min_duration=1s $tls" >/dev/null
  fi
  local i
  for i in $(seq 1 50); do
    admin_psql -Atqc 'select 1' >/dev/null 2>&1 && break
    sleep 0.2
  done
  if [ "$(admin_psql -Atqc "select 1 from pg_database where datname = '$PG_DB'")" != 1 ]; then
    admin_psql -qc "create database $PG_DB" >/dev/null
  fi
}

# psql as the superuser, on the maintenance database of the local cluster.
admin_psql() {
  psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres "$@"
}

stop_postgres() {
  local data; data=$(pg_data_dir)
  if pg_running; then
    log "stopping postgres"
    as_pg "$(pg_bin pg_ctl)" stop -D "$data" -m fast -w >/dev/null
  fi
}

redis_running() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; }
# Answering is not serving: while it loads its append-only file, Redis answers every command (PING too) with
# a LOADING error, and redis-cli still exits 0 for an error reply.
redis_ready() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

start_redis() {
  ensure_redis_installed
  mkdir -p "$STATE_DIR/redis"
  if ! redis_running; then
    log "starting redis on 127.0.0.1:$REDIS_PORT"
    # Append-only, as in production; the rewrite threshold is raised because each AOF rewrite forks a child
    # that takes a whole core for about a second, which on a 2-core machine shared with the gateway and
    # Postgres showed up as 100 ms stalls in the benchmark's latency plot.
    # appendfsync always: the gateway deletes an event's outbox row once Redis acknowledges the XADD, so an
    # acknowledged entry must already be on disk (everysec can lose the last second on a power cut). Its
    # cost, measured at 12,000 events/s: Redis 17% of a core instead of 8%; gateway latency unchanged.
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --save '' --appendonly yes \
      --appendfsync always --auto-aof-rewrite-min-size 4gb \
      --dir "$STATE_DIR/redis" --pidfile "$STATE_DIR/redis/redis.pid" --logfile "$STATE_DIR/redis/redis.log"
  fi
  local i
  for i in $(seq 1 50); do redis_running && break; sleep 0.1; done
  # A large append-only file (load tests write whole streams to it until its next rewrite) takes a while to
  # load: about a minute for 2.6 GB here. Return once Redis serves, so nothing started after sees LOADING.
  if redis_running && ! redis_ready; then
    log "waiting for redis to load its append-only file"
    for i in $(seq 1 3000); do redis_ready && break; sleep 0.1; done
  fi
  if ! redis_ready; then
    log "redis on 127.0.0.1:$REDIS_PORT is not serving; see $STATE_DIR/redis/redis.log"
    exit 1
  fi
}

stop_redis() {
  if redis_running; then
    log "stopping redis"
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  fi
}

print_env() {
  cat <<ENV
export HOOKGATE_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/$PG_DB
export HOOKGATE_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres
export HOOKGATE_REDIS_URL=redis://127.0.0.1:$REDIS_PORT
ENV
}

# Drops the databases the integration tests create (hg_it_*, hg_e2e_*; one per test, ~100 a run).
# Left to pile up they slow autovacuum: its launcher visits every database of the cluster in turn, and
# with ~420 of them the first vacuum of a fresh events table came 46 s into a 20,000/s run instead of ~5 s;
# from then on each round re-read and rewrote every page it visited (loadtest/PERFORMANCE.md, "Stalls
# found and removed").
drop_test_databases() {
  local n=0 db
  for db in $(admin_psql -Atqc "select datname from pg_database where datname like 'hg\_it\_%' or datname like 'hg\_e2e\_%'"); do
    admin_psql -qc "drop database if exists \"$db\" with (force)" >/dev/null
    n=$((n + 1))
  done
  # The role a refusal test writes as (tests/it/hardening.rs): its grants went with the databases.
  admin_psql -qc "drop role if exists hookgate_it_writer" >/dev/null 2>&1 || true
  echo "services.sh: dropped $n test databases" >&2
}

case "${1:-start}" in
  start) start_postgres; start_redis; ensure_prometheus_installed; ensure_pgbouncer_installed; ensure_strace_installed; ensure_curl_installed; print_env ;;
  stop) stop_postgres; stop_redis ;;
  status)
    if pg_running; then echo "postgres: running on 127.0.0.1:$PG_PORT ($(pg_data_dir))"; else echo "postgres: stopped"; fi
    if redis_running; then echo "redis: running on 127.0.0.1:$REDIS_PORT"; else echo "redis: stopped"; fi ;;
  env) print_env ;;
  start-postgres) start_postgres ;;
  stop-postgres) stop_postgres ;;
  start-redis) start_redis ;;
  stop-redis) stop_redis ;;
  drop-test-databases) drop_test_databases ;;
  *) echo "usage: $0 start|stop|status|env|start-postgres|stop-postgres|start-redis|stop-redis|drop-test-databases" >&2; exit 2 ;;
esac
