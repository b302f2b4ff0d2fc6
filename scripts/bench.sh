#!/usr/bin/env bash
# Runs every benchmark of dsu and writes target/bench/*.json (see docs/benchmarks.md):
#   1. builds everything in release (dsu, examples, the agent libraries, dsu-bench);
#   2. dsu-bench: whole-process figures (pause, apply latency, `dsu apply`, steady state,
#      retour, memory, against a restart), printed as tables, one JSON file per section;
#   3. cargo bench (criterion, in-process micro figures), summarised into criterion.json.
# Usage: scripts/bench.sh [--quick]   (--quick: short mode, few repetitions, no criterion)
set -euo pipefail
cd "$(dirname "$0")/.."

quick=""
[[ "${1:-}" == "--quick" ]] && quick="--quick"
out=target/bench
mkdir -p "$out"

echo "== machine"
{ date -u; nproc; uname -r; lscpu | grep -E 'Model name|^CPU\(s\)|Hypervisor'; } | tee "$out/machine.txt"

echo "== build (release)"
cargo build --release --workspace --all-targets -q

echo "== dsu-bench $quick"
target/release/dsu-bench $quick --out "$out"

if [[ -z "$quick" ]]; then
    echo "== cargo bench (criterion)"
    rm -rf target/criterion   # only this run's estimates go into criterion.json
    cargo bench -q --bench calls --bench apply --bench stop
    target/release/dsu-bench criterion-summary --out "$out" --criterion target/criterion
fi
echo "== results in $out/"
ls "$out"/*.json
