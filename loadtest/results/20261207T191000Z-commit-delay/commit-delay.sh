#!/usr/bin/env bash
# commit_delay A/B (PERFORMANCE.md, "Tried, not adopted"): the durable gateway at a fixed rate, Postgres's
# commit_delay 0 against $CD µs (commit_siblings 1), interleaved; prints P50/P99/P99.9, events per commit and per
# WAL sync, and the machine's CPU ticks per 1,000 events. Run from the repository: bash <this file>.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
OUT=${OUT:-$(mktemp -d)}; RATE=${RATE:-7000}; DUR=${DUR:-30s}; CD=${CD:-300}; ROUNDS=${ROUNDS:-3}
source loadtest/scenario.sh
scenario_setup commitdelay
$PG -c "DROP DATABASE IF EXISTS $DATABASE" -c "CREATE DATABASE $DATABASE"
cat > $OUT/gw.toml <<T
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
stream_key = "cd:{source}"
[log]
level = "warn"
[sources.stripe]
scheme = "stripe"
secret_file = "$OUT/secret"
T
$GATEWAY --config $OUT/gw.toml serve > $OUT/gw.log 2>&1 &
GW=$!
trap 'kill $GW; $PG -c "ALTER SYSTEM RESET commit_delay" -c "ALTER SYSTEM RESET commit_siblings" -c "SELECT pg_reload_conf()" >/dev/null' EXIT
sleep 3
stat() { $PG -At -d $DATABASE -c "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname=current_database()), (SELECT wal_sync FROM pg_stat_wal), (SELECT count(*) FROM events)"; }
$LOAD attack --target http://127.0.0.1:18080/webhooks/stripe --secret "$SECRET" --rate 3000 --duration 10s --connections 256 --no-progress > /dev/null
for r in $(seq "$ROUNDS"); do
  for cd in 0 "$CD"; do
    $PG -c "ALTER SYSTEM SET commit_delay = $cd" -c "ALTER SYSTEM SET commit_siblings = 1" -c "SELECT pg_reload_conf()" >/dev/null
    sleep 1
    b=$(stat); c0=$(awk '/^cpu /{print $2+$3+$4}' /proc/stat)
    $LOAD attack --target http://127.0.0.1:18080/webhooks/stripe --secret "$SECRET" --rate "$RATE" --duration "$DUR" --warmup 2s \
      --connections 256 --no-progress --report-json $OUT/r$r-cd$cd.json > $OUT/r$r-cd$cd.txt
    sleep 1
    a=$(stat); c1=$(awk '/^cpu /{print $2+$3+$4}' /proc/stat)
    python3 - "$b" "$a" "$r" "$cd" "$OUT/r$r-cd$cd.json" "$((c1-c0))" <<'P'
import json,sys
b=[int(x) for x in sys.argv[1].split('|')]; a=[int(x) for x in sys.argv[2].split('|')]
j=json.load(open(sys.argv[5])); lat=j.get('latency',j)
ev=a[2]-b[2]; commits=a[0]-b[0]; syncs=a[1]-b[1]
def g(k):
    for d in (j, j.get('latency',{}), j.get('corrected',{})):
        if isinstance(d,dict) and k in d: return d[k]
    return None
c=j['latency_corrected']; codes=j['status_codes']
print(f"round {sys.argv[3]} commit_delay {sys.argv[4]:>4}: P50 {c['p50_us']/1000:.2f} P99 {c['p99_us']/1000:.1f} P99.9 {c['p999_us']/1000:.1f} ms codes {codes} ev/commit {ev/max(commits,1):.1f} ev/walsync {ev/max(syncs,1):.1f} cpu_ticks/1k_ev {int(sys.argv[6])/max(ev,1)*1000:.2f}", flush=True)
P
  done
done
