#!/usr/bin/env bash
# The agent's CPU cost per process: at start-up, for one apply and for one revert, in many
# small processes at once (docs/benchmarks.md, "What an agent costs a host").
#
# Starts PROCESSES (default 100) copies of a small C program under
# LD_PRELOAD=target/release/libdsu_agent.so, each with its own control directory under
# CONTROL_BASE (default: a fresh directory in /dev/shm, as $XDG_RUNTIME_DIR would be), waits
# WARM seconds (default 5) for every agent to start and warm up, then runs one
# `dsu apply --all` and one `dsu revert --all` over them. The CPU is the run time of every
# thread of every process (/proc/PID/task/*/schedstat, nanoseconds), summed before and after
# each command: what the agents spent, whatever the load of the machine. Each process is
# checked to have answered (the summary's counts).
#
# Usage: scripts/bench-agent-cpu.sh            (after `cargo build --release --workspace`)
# Environment: PROCESSES, WARM, CONTROL_BASE, CC.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
n=${PROCESSES:-100}
warm=${WARM:-5}
cc=${CC:-cc}
lib=$root/target/release/libdsu_agent.so
dsu=$root/target/release/dsu
for f in "$lib" "$dsu"; do
    [ -e "$f" ] || { echo "bench-agent-cpu: $f is missing: cargo build --release --workspace" >&2; exit 1; }
done
work=$(mktemp -d "$root/target/bench-agent-cpu.XXXXXX")
base=${CONTROL_BASE:-$(mktemp -d /dev/shm/dsu-bench-cpu.XXXXXX)}
pids=()
cleanup() {
    [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf "$work" "$base"
}
trap cleanup EXIT

cat > "$work/small.c" <<'EOF'
#include <stdint.h>
#include <unistd.h>
__attribute__((noinline)) uint64_t work(uint64_t x) { return x + 1; }
int main(void) { for (;;) pause(); }
EOF
cat > "$work/fix.c" <<'EOF'
#include <stdint.h>
uint64_t work(uint64_t x) { return x * 10; }
EOF
"$cc" -O2 -o "$work/small" "$work/small.c"
"$cc" -O2 -fPIC -c "$work/fix.c" -o "$work/fix.o"
chmod 0644 "$work/fix.o"

cpu_us() {
    local sum=0 t a rest
    for p in "${pids[@]}"; do
        for t in /proc/"$p"/task/*/schedstat; do
            read -r a rest < "$t" || continue
            sum=$((sum + a))
        done
    done
    echo $((sum / 1000))
}

for i in $(seq "$n"); do
    DSU_LOG=0 DSU_CONTROL_DIR="$base/$i" LD_PRELOAD="$lib" "$work/small" &
    pids+=($!)
done
sleep "$warm"
t0=$(cpu_us)
applied=$("$dsu" apply --all --exe "$work/small" --json "$work/fix.o" | grep -o '"applied":[0-9]*')
t1=$(cpu_us)
reverted=$("$dsu" revert --all --exe "$work/small" --json | grep -o '"reverted":[0-9]*')
t2=$(cpu_us)
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) CPUs, kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "processes: $n ($applied, $reverted); control directories in $(df --output=fstype "$base" | tail -1)"
echo "agent CPU per process: start-up $((t0 / n)) us, one apply $(((t1 - t0) / n)) us, one revert $(((t2 - t1) / n)) us"
