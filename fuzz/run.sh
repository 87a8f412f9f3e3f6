#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each), starting from the checked-in
# seeds (fuzz/corpus/<target>) and working in a scratch corpus, so the repository's corpus
# stays small. A crash leaves its input in fuzz/artifacts/<target>/ and fails the run.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#   FUZZ_RUNS=10000000 fuzz/run.sh 0 blockkit   # a fixed number of executions instead
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(decode_port decode_coder decode_slack yaml condition template blockkit)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cargo +nightly fuzz build >/dev/null
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  limit=(-max_total_time="$secs")
  if [ -n "${FUZZ_RUNS:-}" ]; then limit=(-runs="$FUZZ_RUNS"); fi
  log="$scratch/$t.log"
  if ! cargo +nightly fuzz run "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
      "${limit[@]}" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz: $t FAILED (input in fuzz/artifacts/$t/)"
    exit 1
  fi
  runs=$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}')
  echo "fuzz: $t ok, ${runs:-?} executions, 0 crashes"
done
