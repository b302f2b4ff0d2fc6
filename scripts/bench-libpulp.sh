#!/usr/bin/env bash
# `dsu apply` against libpulp's `ulp trigger`, side by side (BRIEF §6: `dsu apply` from spawn
# to exit at most a third of what `ulp trigger` takes for the same change). See
# docs/benchmarks.md, section "dsu apply against libpulp's ulp trigger".
#
# What it does:
#   1. libpulp (scripts/libpulp-build.sh): reuses the install prefix in LIBPULP_PREFIX
#      (bin/ulp, lib/libpulp.so), or builds the checkout in LIBPULP_SRC with its own autotools
#      recipe (./bootstrap when there is no ./configure, then configure + make + make install)
#      out of tree into target/libpulp-bench/libpulp-{build,prefix}. Neither set, or not
#      found: prints why and exits 0 (nothing is measured).
#   2. dsu: target/release/dsu and libdsu_agent.so, built with
#      `cargo build --release --workspace` when missing.
#   3. One C program for both tools: an executable that calls `bench_compute` of a shared
#      library, with THREADS idle threads (nanosleep loops) and a main thread that answers
#      `bench_compute(x)` for each line on its standard input. The library is built as libpulp
#      requires (-fpatchable-function-entry=16,14, build id, SysV hash table, `ulp post`).
#      Two copies run: one with LD_PRELOAD=libpulp.so, one with LD_PRELOAD=libdsu_agent.so.
#   4. The same one-function change for both (the shift of `bench_compute` goes from 29 to
#      31): for libpulp a live patch library with `bench_compute_v2` and its description
#      (.dsc), packed with `ulp packer`; for dsu a plain `cc -c -fPIC -O2` object defining
#      `bench_compute`.
#   5. A small timer (C, posix_spawn + waitpid, CLOCK_MONOTONIC, output to a log file) runs,
#      REPS times, `ulp trigger -p PID LP.so` and `dsu apply -p PID fix.o`, each timed from
#      spawn to exit and followed by its revert (`ulp trigger --revert`, `dsu revert`, timed
#      too), the tools interleaved and their order alternated every repetition so both see the
#      same machine. `dsu status` (start, find the agent, one round trip: the tool's own
#      floor) and `/bin/true` (the floor of spawning anything) are timed the same way.
#      Repetition 0 is the first patch of each process and is reported apart.
#   6. Checks the change took effect (same new result from both tools, original result after
#      each revert), prints the machine, the versions and a table (p50/p90/min/max, ms), and
#      writes the samples to target/bench/libpulp-samples.tsv.
#
# Usage: LIBPULP_SRC=path/to/libpulp scripts/bench-libpulp.sh
#        LIBPULP_PREFIX=path/to/installed/libpulp scripts/bench-libpulp.sh
# Environment: REPS (default 50), THREADS (idle threads per target, default 8),
#              JOBS (make -j for building libpulp, default 1), CC (default cc).
# Builds run under `nice -n 19`; the measurements do not.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

reps=${REPS:-50}
threads=${THREADS:-8}
jobs=${JOBS:-1}
cc=${CC:-cc}
scratch=$root/target/libpulp-bench
out=$root/target/bench
mkdir -p "$scratch" "$out"

say() { printf '== %s\n' "$*"; }
skip() {
    printf 'bench-libpulp: skipped: %s\n' "$*"
    printf 'bench-libpulp: set LIBPULP_SRC to a libpulp checkout (or LIBPULP_PREFIX to an install).\n'
    exit 0
}

# ---------------------------------------------------------------------------- libpulp
# shellcheck source=scripts/libpulp-build.sh
source "$root/scripts/libpulp-build.sh"
libpulp_setup "$root" "$jobs" || skip "$libpulp_why"

# ---------------------------------------------------------------------------- dsu
dsu=$root/target/release/dsu
agent=$root/target/release/libdsu_agent.so
if [[ ! -x "$dsu" || ! -e "$agent" ]]; then
    say "dsu: cargo build --release --workspace"
    nice -n 19 cargo build --release --workspace -q
fi

# ---------------------------------------------------------------------------- programs
work=$scratch/work
rm -rf "$work"
mkdir -p "$work"
say "building the target program, the two patches and the timer in $work"

# The function both tools replace, and its changed version (same constant, other shift).
cat >"$work/target.c" <<'EOF'
unsigned long bench_compute(unsigned long x) { return x * 0x9E3779B97F4A7C15UL ^ (x >> 29); }
EOF
cat >"$work/lp.c" <<'EOF'
unsigned long bench_compute_v2(unsigned long x) { return x * 0x9E3779B97F4A7C15UL ^ (x >> 31); }
EOF
cat >"$work/fix.c" <<'EOF'
unsigned long bench_compute(unsigned long x) { return x * 0x9E3779B97F4A7C15UL ^ (x >> 31); }
EOF
cat >"$work/prog.c" <<'EOF'
/* THREADS idle threads; the main thread prints "ready PID", then bench_compute(x) for each
   line x of its standard input. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

unsigned long bench_compute(unsigned long x);

static void *idle(void *arg) {
    (void)arg;
    struct timespec ts = {0, 50 * 1000 * 1000};
    for (;;)
        nanosleep(&ts, NULL);
    return NULL;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 8;
    for (int i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, idle, NULL) != 0)
            return 1;
    }
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        printf("%lu\n", bench_compute(strtoul(line, NULL, 10)));
        fflush(stdout);
    }
    return 0;
}
EOF
cat >"$work/lat.c" <<'EOF'
/* lat REPS LOG -- NAME APPLY... -- REVERT... [-- NAME APPLY... -- REVERT...]...
   Each repetition runs, for every NAME (starting with a different one each repetition),
   APPLY then REVERT, each timed from spawn to exit; prints "NAME REP APPLY_US REVERT_US".
   Standard input is /dev/null, output goes to LOG. Exits 1 when a command fails. */
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;
static int log_fd;

static double run(char **argv) {
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, log_fd, 1);
    posix_spawn_file_actions_adddup2(&fa, log_fd, 2);
    struct timespec a, b;
    pid_t pid;
    int status;
    clock_gettime(CLOCK_MONOTONIC, &a);
    if (posix_spawn(&pid, argv[0], &fa, NULL, argv, environ) != 0) {
        perror(argv[0]);
        exit(1);
    }
    waitpid(pid, &status, 0);
    clock_gettime(CLOCK_MONOTONIC, &b);
    posix_spawn_file_actions_destroy(&fa);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "lat: %s ... failed (status %d)\n", argv[0], status);
        exit(1);
    }
    return (b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3;
}

int main(int argc, char **argv) {
    if (argc < 4 || strcmp(argv[3], "--") != 0)
        return 2;
    int reps = atoi(argv[1]);
    log_fd = open(argv[2], O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (log_fd < 0) {
        perror(argv[2]);
        return 1;
    }
    char *name[16], **apply[16], **revert[16];
    int n = 0;
    for (int i = 4; i < argc && n < 16;) {
        name[n] = argv[i];
        apply[n] = &argv[i + 1];
        while (i < argc && strcmp(argv[i], "--") != 0)
            i++;
        argv[i++] = NULL;
        revert[n] = &argv[i];
        while (i < argc && strcmp(argv[i], "--") != 0)
            i++;
        if (i < argc)
            argv[i++] = NULL;
        n++;
    }
    for (int r = 0; r < reps; r++)
        for (int k = 0; k < n; k++) {
            int t = (r + k) % n;
            double x = run(apply[t]);
            double y = run(revert[t]);
            printf("%s %d %.1f %.1f\n", name[t], r, x, y);
            fflush(stdout);
        }
    return 0;
}
EOF

# The live-patchable library, as libpulp builds its own test libraries, then `ulp post`.
nice -n 19 "$cc" -O2 -fPIC -fpatchable-function-entry=16,14 -fno-inline -shared \
    -Wl,--build-id -Wl,--hash-style=sysv -Wl,-soname,libbenchtarget.so.0 \
    -o "$work/libbenchtarget.so.0" "$work/target.c"
ln -s libbenchtarget.so.0 "$work/libbenchtarget.so"
"$ulp" post "$work/libbenchtarget.so.0" >/dev/null 2>&1
nice -n 19 "$cc" -O2 -o "$work/prog" "$work/prog.c" -L"$work" -lbenchtarget \
    -Wl,-rpath,'$ORIGIN' -pthread
# libpulp's patch: a shared library with the new function and the packed description.
nice -n 19 "$cc" -O2 -fPIC -shared -o "$work/libbenchtarget_livepatch1.so" "$work/lp.c"
printf '%s\n@%s\n%s\n' "$work/libbenchtarget_livepatch1.so" "$work/libbenchtarget.so.0" \
    "bench_compute:bench_compute_v2" >"$work/libbenchtarget_livepatch1.dsc"
"$ulp" packer "$work/libbenchtarget_livepatch1.dsc" >/dev/null 2>&1
lp=$work/libbenchtarget_livepatch1.so
# dsu's patch: a plain object with the new version under the same name.
nice -n 19 "$cc" -c -fPIC -O2 -o "$work/fix.o" "$work/fix.c"
nice -n 19 "$cc" -O2 -o "$work/lat" "$work/lat.c"

# ---------------------------------------------------------------------------- targets
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# start NAME ENV... : runs prog with ENV, talks to it over two FIFOs (fds into NAME_in/out).
start() {
    local name=$1
    shift
    mkfifo "$work/$name.in" "$work/$name.out"
    env "$@" "$work/prog" "$threads" <"$work/$name.in" >"$work/$name.out" 2>"$work/$name.err" &
    pids+=($!)
}
ask() { # ask FD_IN FD_OUT X -> bench_compute(X) in that process
    echo "$3" >&"$1"
    local v
    read -r -t 5 v <&"$2" || { echo "bench-libpulp: no answer from a target" >&2; exit 1; }
    echo "$v"
}

say "starting two targets ($threads idle threads each)"
start ulp LD_PRELOAD="$libpulp"
exec 3>"$work/ulp.in" 4<"$work/ulp.out"
read -r -t 10 _ ulp_pid <&4 || { echo "bench-libpulp: the libpulp target did not start" >&2; cat "$work/ulp.err" >&2; exit 1; }
ctl=$work/dsu-control
start dsu LD_PRELOAD="$agent" DSU_CONTROL_DIR="$ctl" DSU_LOG=0
exec 5>"$work/dsu.in" 6<"$work/dsu.out"
read -r -t 10 _ dsu_pid <&6 || { echo "bench-libpulp: the dsu target did not start" >&2; cat "$work/dsu.err" >&2; exit 1; }
export DSU_CONTROL_DIR=$ctl
# Until the agent answers (it indexes symbols right after it installs).
for _ in $(seq 100); do
    "$dsu" status -p "$dsu_pid" >/dev/null 2>&1 && break
    sleep 0.05
done
sleep 0.3

x=1234567890123
orig_ulp=$(ask 3 4 $x)
orig_dsu=$(ask 5 6 $x)
[[ "$orig_ulp" == "$orig_dsu" ]] || { echo "bench-libpulp: the two targets disagree" >&2; exit 1; }

# One apply of each, checked, then its revert, checked (not timed).
check_cycle() {
    "$ulp" trigger -p "$ulp_pid" "$lp" >>"$work/check.log" 2>&1
    "$dsu" apply -p "$dsu_pid" "$work/fix.o" >>"$work/check.log" 2>&1
    new_ulp=$(ask 3 4 $x)
    new_dsu=$(ask 5 6 $x)
    [[ "$new_ulp" != "$orig_ulp" && "$new_ulp" == "$new_dsu" ]] || {
        echo "bench-libpulp: the patches did not take effect ($orig_ulp -> ulp $new_ulp, dsu $new_dsu)" >&2
        exit 1
    }
    "$ulp" trigger --revert -p "$ulp_pid" "$lp" >>"$work/check.log" 2>&1
    "$dsu" revert -p "$dsu_pid" >>"$work/check.log" 2>&1
    [[ "$(ask 3 4 $x)" == "$orig_ulp" && "$(ask 5 6 $x)" == "$orig_dsu" ]] || {
        echo "bench-libpulp: a revert did not restore the original" >&2
        exit 1
    }
}

say "machine"
machine() {
    echo "date (UTC):  $(date -u '+%Y-%m-%d %H:%M:%S')"
    echo "nproc:       $(nproc)"
    echo "CPU:         $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
    echo "kernel:      $(uname -r)"
    echo "libpulp:     $ulp_version${ulp_rev:+ ($ulp_rev)}"
    echo "dsu:         $("$dsu" --version 2>&1 | head -1) ($(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
    echo "cc:          $("$cc" --version | head -1)"
    echo "load:        $(cut -d' ' -f1-3 /proc/loadavg)"
}
machine | tee "$out/libpulp-machine.txt"

say "timing: $reps repetitions after the first patch of each process, interleaved"
samples=$out/libpulp-samples.tsv
# Repetition 0 is the first patch each process ever gets (dsu's agent builds its call-site
# index then); it is reported apart. The check of the results runs after the timing, so as
# not to take that first patch away from it.
"$work/lat" $((reps + 1)) "$work/lat.log" \
    -- ulp_trigger "$ulp" trigger -p "$ulp_pid" "$lp" -- "$ulp" trigger --revert -p "$ulp_pid" "$lp" \
    -- dsu_apply "$dsu" apply -p "$dsu_pid" "$work/fix.o" -- "$dsu" revert -p "$dsu_pid" \
    -- dsu_status "$dsu" status -p "$dsu_pid" -- /bin/true \
    -- true /bin/true -- /bin/true >"$samples"
check_cycle

# ---------------------------------------------------------------------------- report
pct() { # pct P < numbers : nearest-rank percentile
    sort -n | awk -v p="$1" '{ v[NR] = $1 } END { i = int(p / 100 * NR + 0.999999); if (i < 1) i = 1; printf "%.2f", v[i] / 1000 }'
}
col() { awk -v n="$1" -v c="$2" '$1 == n && $2 > 0 { print $c }' "$samples"; }
first() { awk -v n="$1" -v c="$2" '$1 == n && $2 == 0 { printf "%.2f", $c / 1000 }' "$samples"; }

say "results: spawn to exit, ms ($reps repetitions each, after the first)"
printf '| %-28s | %6s | %6s | %6s | %6s | %13s |\n' command p50 p90 min max "first patch"
printf '| %-28s | %6s | %6s | %6s | %6s | %13s |\n' --- ---: ---: ---: ---: ---:
row() {
    local label=$1 name=$2 c=$3
    printf '| %-28s | %6s | %6s | %6s | %6s | %13s |\n' "$label" \
        "$(col "$name" "$c" | pct 50)" "$(col "$name" "$c" | pct 90)" \
        "$(col "$name" "$c" | pct 0)" "$(col "$name" "$c" | pct 100)" "$(first "$name" "$c")"
}
row '`ulp trigger`' ulp_trigger 3
row '`dsu apply`' dsu_apply 3
row '`ulp trigger --revert`' ulp_trigger 4
row '`dsu revert`' dsu_apply 4
row '`dsu status` (dsu'"'"'s floor)' dsu_status 3
row '`/bin/true` (spawn floor)' true 3
ulp50=$(col ulp_trigger 3 | pct 50)
dsu50=$(col dsu_apply 3 | pct 50)
awk -v d="$dsu50" -v u="$ulp50" 'BEGIN {
    r = d / u
    printf "\n`dsu apply` p50 / `ulp trigger` p50 = %.2f (goal: at most 0.33): %s\n", r, (r <= 1 / 3 ? "met" : "NOT met")
}'
echo "samples: ${samples#"$root"/} (name, repetition, apply us, revert us)"
