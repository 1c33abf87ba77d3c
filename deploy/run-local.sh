#!/usr/bin/env bash
# Quickstart: start local Postgres and Redis, make development secrets once, and run the gateway
# (release build) on 127.0.0.1:8080, admin on 127.0.0.1:9464. Ctrl-C drains and stops it.
# HOOKGATE_BIN: a hookgate binary to run instead of building one (tests/it/quickstart.rs passes the tests').
# HOOKGATE__* variables override the config as for any hookgate command (the test moves the ports).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

eval "$(deploy/services.sh start)"

mkdir -p .local/secrets
chmod 700 .local/secrets
make_secret() {
  local file=.local/secrets/$1
  [ -s "$file" ] || { echo "$2" > "$file"; chmod 600 "$file"; }
}
make_secret stripe "whsec_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
make_secret standard "whsec_$(head -c 24 /dev/urandom | base64)"
make_secret github "$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')"

if [ -n "${HOOKGATE_BIN:-}" ]; then
  BIN=$HOOKGATE_BIN
else
  cargo build --release --bin hookgate
  BIN=target/release/hookgate
fi
cat >&2 <<'TXT'

hookgate is starting. Try it from another shell (in this folder):
  echo '{"id":"evt_1","object":"event","type":"payment_intent.succeeded","created":1700000000}' > /tmp/evt.json
  target/release/hookgate --config config/local.toml sign --source stripe --body /tmp/evt.json > /tmp/sig.txt
  curl -i -H @/tmp/sig.txt --data-binary @/tmp/evt.json http://127.0.0.1:8080/webhooks/stripe
  curl -s http://127.0.0.1:9464/metrics | grep hookgate_

TXT
HOOKGATE__STORE__URL=$HOOKGATE_DATABASE_URL exec "$BIN" --config config/local.toml serve
