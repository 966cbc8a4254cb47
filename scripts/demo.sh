#!/usr/bin/env bash
# Builds idem and a deliberately non-idempotent sample service, puts the gateway in front of it
# on its embedded default store (sqlite://idem.db, in a scratch directory), and shows a retried
# POST replayed instead of run twice.
#
#   ./scripts/demo.sh            # ports 3000 (sample service), 8080 (gateway), 9080 (admin)
#   DEMO_KEEP_RUNNING=1 ./scripts/demo.sh   # leave both running until Ctrl-C
set -euo pipefail
cd "$(dirname "$0")/.."

UPSTREAM_ADDR=${DEMO_UPSTREAM_ADDR:-127.0.0.1:3000}
LISTEN_ADDR=${DEMO_LISTEN_ADDR:-127.0.0.1:8080}
ADMIN_ADDR=${DEMO_ADMIN_ADDR:-127.0.0.1:9080}

command -v curl >/dev/null || { echo "demo: curl is needed (apt-get install curl)" >&2; exit 1; }
echo "==> building idem and the sample orders service (first build takes a few minutes)"
cargo build --quiet --locked -p idem -p orders-upstream
root=$(pwd)
scratch=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$scratch"; }
trap cleanup EXIT

wait_for() { # url, what
  for _ in $(seq 1 300); do curl -fs -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "demo: $2 did not come up at $1 within 30s (is the port taken?)" >&2
  for log in "$scratch"/*.log "$scratch"/*.out; do [ -s "$log" ] && { echo "--- $log" >&2; tail -20 "$log" >&2; }; done
  exit 1
}

"$root/target/debug/orders-upstream" "$UPSTREAM_ADDR" >"$scratch/upstream.log" 2>&1 &
pids+=($!)
wait_for "http://$UPSTREAM_ADDR/orders/count" "the orders service"
# No --store: the gateway uses its embedded default, sqlite://idem.db in its working directory.
(cd "$scratch" && exec "$root/target/debug/idem" serve --upstream "http://$UPSTREAM_ADDR" \
  --listen "$LISTEN_ADDR" --admin-listen "$ADMIN_ADDR") >"$scratch/idem.out" 2>"$scratch/idem.log" &
pids+=($!)
wait_for "http://$ADMIN_ADDR/healthz" "the idem gateway"
cat "$scratch/idem.out"

post() {
  echo
  echo "\$ curl -i -X POST http://$LISTEN_ADDR/orders -H 'Idempotency-Key: order-7f3a' -H 'Authorization: Bearer demo-user' -d '$1'"
  curl -s -i -X POST "http://$LISTEN_ADDR/orders" -H 'Idempotency-Key: order-7f3a' \
    -H 'Authorization: Bearer demo-user' -d "$1" | tr -d '\r' | grep -iv '^date:'
  echo
}
echo; echo "==> first request: runs the service"
post '{"sku":"A1","qty":1}'
echo "==> the same request again (a client retry after a lost response): replayed, not run"
post '{"sku":"A1","qty":1}'
echo "==> the same key with a different body: refused"
post '{"sku":"A1","qty":5}'
count=$(curl -s "http://$UPSTREAM_ADDR/orders/count")
echo "==> the orders service saw: $count"
if [ "$count" != '{"orders_created":1}' ]; then
  echo "demo: expected exactly one order to be created" >&2; exit 1
fi
echo "==> store file: $scratch/idem.db ($(stat -c %s "$scratch/idem.db") bytes)"

if [ "${DEMO_KEEP_RUNNING:-0}" = 1 ]; then
  echo; echo "gateway on http://$LISTEN_ADDR, metrics on http://$ADMIN_ADDR/metrics; Ctrl-C to stop"
  wait
fi
