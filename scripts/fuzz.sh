#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ and runs each for a bounded time (see docs/FUZZING.md).
#
#   scripts/fuzz.sh                                  every target, 20 s each
#   FUZZ_SECONDS=160 FUZZ_KEEP_GOING=1 scripts/fuzz.sh   a longer run that records every crash
#   FUZZ_TARGETS="key stored_response" scripts/fuzz.sh
#
# Each target starts from its committed seeds (fuzz/seeds/<target>) and known crashes
# (fuzz/regressions/<target>), both read only, plus whatever earlier runs added to
# fuzz/corpus/<target> (ignored by git). The targets run one after the other, one process
# each. Exits non-zero if any target crashed (a panic, a failed assertion, a timeout or running
# out of memory), after running the others, and prints where each reproducer was written.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${FUZZ_SECONDS:-20}
# The project forbids unsafe code, so the default build has no sanitizer (faster to build and
# run) but keeps debug assertions and overflow checks; FUZZ_SANITIZER=address brings ASan back.
sanitizer=${FUZZ_SANITIZER:-none}
rss_limit_mb=${FUZZ_RSS_LIMIT_MB:-2048}
build_flags=(--release --debug-assertions --sanitizer "$sanitizer")
# FUZZ_KEEP_GOING=1: libFuzzer's fork mode with one worker, which records a crash and goes on
# fuzzing instead of stopping at the first.
keep_going=()
if [ "${FUZZ_KEEP_GOING:-0}" = 1 ]; then
  keep_going=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: a nightly toolchain is needed: rustup toolchain install nightly --profile minimal" >&2
  exit 1
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

echo "==> building the fuzz targets"
start=$SECONDS
cargo +nightly fuzz build "${build_flags[@]}"
echo "built in $((SECONDS - start)) s"

targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}
if [ "$seconds" -le 0 ]; then
  echo "FUZZ_SECONDS=$seconds: built only"
  exit 0
fi

# Files a target writes for itself (the config file of config_toml) go here, removed at exit.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# Longest input per target: room for every valid input with some to spare, no more (long
# inputs only slow the search).
max_len() {
  case $1 in
    duration_size) echo 64 ;;
    key) echo 600 ;;
    record_sqlite | stream_nats | stream_rabbitmq) echo 1024 ;;
    *) echo 4096 ;;
  esac
}

failed=()
summary=()
for target in $targets; do
  echo
  echo "==> $target: ${seconds} s"
  mkdir -p "corpus/$target" "artifacts/$target" target/fuzz-logs
  inputs=("corpus/$target" "seeds/$target")
  [ -d "regressions/$target" ] && inputs+=("regressions/$target")
  log="target/fuzz-logs/$target.log"
  marker="$scratch/$target.start"
  touch "$marker"
  began=$SECONDS
  # The whole log is kept in fuzz/$log; the terminal gets the start, the end and failures.
  set +e
  TMPDIR=$scratch cargo +nightly fuzz run "${build_flags[@]}" "$target" "${inputs[@]}" -- \
    -max_total_time="$seconds" -rss_limit_mb="$rss_limit_mb" -max_len="$(max_len "$target")" \
    -timeout=10 -print_final_stats=1 "${keep_going[@]}" 2>&1 | tee "$log" |
    grep --line-buffered -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^INFO: exiting|panicked at|^SUMMARY|Test unit written'
  statuses=("${PIPESTATUS[@]}")
  set -e
  status=${statuses[0]}
  took=$((SECONDS - began))
  # Executions: libFuzzer's final stats, or in fork mode its last progress line.
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  [ -n "$execs" ] || execs=$(sed -n 's/^#\([0-9]*\): cov.*/\1/p' "$log" | tail -n 1)
  # Corpus: libFuzzer's own count at the end (fuzz/corpus/<target> also keeps superseded files).
  corpus=$(sed -n 's/.*corp: \([0-9]*\).*/\1/p' "$log" | tail -n 1)
  found=$(find "artifacts/$target" -type f -newer "$marker" | sort)
  if [ "$status" -ne 0 ] || [ -n "$found" ]; then
    failed+=("$target")
    crashes=$(grep -c . <<<"$found" || true)
    summary+=("$target: FAILED (exit $status), ${execs:-?} executions in $took s, corpus ${corpus:-?} inputs, $crashes reproducer(s)")
    echo "fuzz: $target failed (exit $status); reproducer(s):" >&2
    if [ -n "$found" ]; then
      while read -r file; do echo "  fuzz/$file"; done <<<"$found" >&2
      echo "  replay: cd fuzz && cargo +nightly fuzz run ${build_flags[*]} $target FILE" >&2
    else
      tail -n 30 "$log" >&2
    fi
  else
    summary+=("$target: ok, ${execs:-?} executions in $took s, corpus ${corpus:-?} inputs")
  fi
done

echo
echo "==> summary"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: ${#failed[@]} target(s) crashed: ${failed[*]}" >&2
  exit 1
fi
