#!/usr/bin/env bash
# The tests of every crate, against the real servers this machine has.
#
# Tests that need PostgreSQL, Redis, NATS (with JetStream) or RabbitMQ use the server named by
# IDEM_TEST_POSTGRES_URL, IDEM_TEST_REDIS_URL, IDEM_TEST_NATS_URL or IDEM_TEST_AMQP_URL, else the
# standard loopback address when something answers there; otherwise they skip, and the summary
# at the end says which and why (IDEM_REQUIRE_SERVICES=1 turns a skip into a failure, as in CI).
# Arguments go to `cargo test`, e.g. scripts/test.sh -p idem-core, or -- --show-output.
# The gateway tests drive the release build of `idem` (what users run; the memory bounds they
# check depend on it), built first; IDEM_TEST_BIN points them at it.
set -uo pipefail
cd "$(dirname "$0")/.."

skips=$(mktemp)
trap 'rm -f "$skips"' EXIT
export IDEM_SKIP_LOG="$skips"

locked=()
for arg in "$@"; do [ "$arg" = --locked ] && locked=(--locked); done
cargo build --release --quiet -p idem "${locked[@]}" || exit 1
export IDEM_TEST_BIN="$PWD/target/release/idem"

cargo test --workspace "$@"
status=$?

echo
if [ -s "$skips" ]; then
  echo "==> $(sort -u "$skips" | wc -l) test(s) SKIPPED, so this run did not check everything:"
  sort -u "$skips" | sed 's/^/    /'
else
  echo "==> no test was skipped: every real-server test ran"
fi
exit "$status"
