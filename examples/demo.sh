#!/usr/bin/env bash
# Live-update demo: start a TCP pricing service, show its (wrong) answer, compile a fix to an
# object file, apply it with `dsu apply` while the service runs, show the new answer from the
# same process.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building dsu and the demo service (release; a few minutes the first time)"
cargo build --release -q --bin dsu --example demo_service
work=$(mktemp -d)
export DSU_CONTROL_DIR="$work/control"

target/release/examples/demo_service >"$work/service.out" 2>"$work/service.err" &
service=$!
trap 'kill $service 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q listening "$work/service.out" 2>/dev/null && break; sleep 0.05; done
port=$(sed -n 's/^listening 127.0.0.1:\([0-9]*\).*/\1/p' "$work/service.out")

ask() {
    exec 3<>"/dev/tcp/127.0.0.1/$port"
    echo "quote $1" >&3
    read -r reply <&3
    exec 3>&-
    echo "$reply"
}

echo "service pid $service on port $port"
echo "before the fix: quote 10 -> $(ask 10)   (10 x 250 cents with 10% off should be 2250)"
rustc --edition=2024 --crate-type=lib --emit=obj -O -o "$work/price_fix.o" examples/patches/price_fix.rs
echo "\$ dsu apply -p $service price_fix.o"
target/release/dsu apply -p "$service" "$work/price_fix.o"
echo "after the fix:  quote 10 -> $(ask 10)   (same process: pid $service still running)"
kill -0 "$service"
