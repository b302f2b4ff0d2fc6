#!/usr/bin/env bash
# The test command: builds what the end-to-end tests need (the agent's static and shared
# libraries, the dsu binary, the example programs), then runs every test of the workspace and
# closes with one line counting them all.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== building the workspace, its examples and the agent's C libraries (debug; a few minutes the first time)"
cargo build --workspace --all-targets -q
echo "== running every test (real processes, patches compiled with cc and rustc)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;/) p += $(i-1); if ($i ~ /^failed;/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
