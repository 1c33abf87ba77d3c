#!/bin/sh
# Waits (up to 5 minutes) until every stored event is on its stream: the gateway's outbox is empty.
for _ in $(seq 1 600); do
  [ "$(psql -h 127.0.0.1 -p 54329 -U postgres -q -At -d hookgate_bench -c "SELECT count(*) FROM events_outbox" 2>/dev/null)" = 0 ] && exit 0
  sleep 0.5
done
echo "outbox-empty.sh: the outbox did not drain within 5 minutes" >&2
exit 1
