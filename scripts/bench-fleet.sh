#!/usr/bin/env bash
# The host-wide rollout: one patch to every process of a host running the same binary
# (BRIEF §6: 4000 processes in under 2 s), and libpulp's batch mode beside it when libpulp is
# at hand. See docs/benchmarks.md, section "Host-wide rollout: 4000 processes".
#
# What it does:
#   1. Checks the machine's limits for PROCESSES targets (pid_max, threads-max, open files,
#      memory) and builds, in target/bench-fleet/work: a small C program (`fleetprog`) that
#      calls `bench_compute` of a shared library and otherwise sleeps in pause(); on SIGUSR1
#      (and once at start, once its handler is installed) it writes bench_compute(X) to
#      ANSWERS/PID, so the script asks any number of processes without holding a pipe to
#      each. The same one-function change as scripts/bench-libpulp.sh: a `cc -c -fPIC -O2`
#      object for dsu; a live patch library packed with `ulp packer` for libpulp.
#   2. dsu: starts PROCESSES copies under LD_PRELOAD=target/release/libdsu_agent.so, each
#      with its own control directory in CONTROL_BASE/bench-fleet-ctl, BATCH at a time, each
#      batch waited for until every agent wrote status.json (after its start-up indexing) and
#      every program answered (with a deadline; it fails loudly). Memory is checked after
#      the first batch: the run stops if PROCESSES of them would not fit. Then `dsu ps --exe
#      PROGRAM --json` is timed three times: the discovery every --all command starts with.
#   3. Times `dsu apply --all --exe PROGRAM fix.o --json` and `dsu revert --all --exe
#      PROGRAM --json` for each --jobs value in JOBS_LIST, ROUNDS times each (the first apply
#      of every process, at the first value, is reported apart): wall time by an outside
#      clock and by the JSON's elapsed_ms, dsu's CPU and peak RSS (GNU time), the targets'
#      CPU (the sum of their threads' schedstat before and after) and what the rest of the
#      machine used meanwhile (/proc/stat: the machine is shared). After each apply and each
#      revert, SAMPLE processes (default: all) are asked for their answer, which must be the
#      new, then the original, result.
#   4. LOOP processes (default 200) patched one at a time (`dsu apply -p PID`, then `dsu
#      revert -p PID`): the loop the batch is compared with.
#   5. With PROFILE=1: one more apply/revert under `perf record -a -g` (the whole host: dsu
#      and the agents) and under `strace -c -f` (dsu's system calls); the top entries are
#      printed and the data kept in target/bench.
#   6. libpulp, when LIBPULP_SRC or LIBPULP_PREFIX is set (scripts/libpulp-build.sh; skipped
#      with a message otherwise): the dsu targets are stopped, PROCESSES copies of the same
#      program start under LD_PRELOAD=libpulp.so, and `ulp trigger -q LP.so` (no -p: every
#      process with libpulp loaded, libpulp's batch mode) and `ulp trigger -q --revert
#      LP.so` are timed ROUNDS times, checked the same way, then the same loop of LOOP
#      single `ulp trigger -p PID`.
#   Every target is killed on exit (trap), whatever happened.
#
# Usage: scripts/bench-fleet.sh
#        LIBPULP_SRC=path/to/libpulp scripts/bench-fleet.sh
# Environment: PROCESSES (4000), BATCH (start-up batch, 100), JOBS_LIST ("8 16 32 64"),
#   ROUNDS (apply+revert per --jobs value, 2), SAMPLE (processes checked after each step,
#   "all" or a number; all), LOOP (single applies timed one by one, 200; 0 skips),
#   CONTROL_BASE (where the directory of the control directories is made, target/bench-fleet;
#   e.g. /dev/shm to measure them on tmpfs),
#   PROFILE (1: perf and strace, see above), START_TIMEOUT (seconds per batch, 120),
#   HOLD (1: once the dsu targets run, keep them until the script is interrupted, for
#   profiling by hand),
#   MAKE_JOBS (make -j for building libpulp, 1), CC (cc).
# Output: the tables on stdout; target/bench/fleet-results.tsv (one line per timed command),
# target/bench/fleet-machine.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

processes=${PROCESSES:-4000}
batch=${BATCH:-100}
jobs_list=${JOBS_LIST:-8 16 32 64}
rounds=${ROUNDS:-2}
sample=${SAMPLE:-all}
loop=${LOOP:-200}
profile=${PROFILE:-0}
hold=${HOLD:-0}
start_timeout=${START_TIMEOUT:-120}
cc=${CC:-cc}
scratch=$root/target/bench-fleet
work=$scratch/work
# Only this directory of CONTROL_BASE is created and removed.
ctl=${CONTROL_BASE:-$scratch}/bench-fleet-ctl
answers=$scratch/answers
out=$root/target/bench
results=$out/fleet-results.tsv
x=1234567890123

say() { printf '== %s\n' "$*"; }
die() {
    printf 'bench-fleet: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------- limits
[[ "$processes" =~ ^[1-9][0-9]*$ ]] || die "PROCESSES=$processes is not a positive number"
[[ "$batch" =~ ^[1-9][0-9]*$ ]] || die "BATCH=$batch is not a positive number"
[[ "$sample" == all || "$sample" =~ ^[1-9][0-9]*$ ]] || die "SAMPLE=$sample is neither all nor a number"
# Each target is two tasks (the program and its agent's thread), the script adds a few.
tasks=$((processes * 2 + 1000))
pid_max=$(cat /proc/sys/kernel/pid_max)
threads_max=$(cat /proc/sys/kernel/threads-max)
running=$(ps -eL --no-headers | wc -l)
((tasks + running < pid_max)) || die "$processes targets need about $tasks tasks; $running run already and pid_max is $pid_max"
((tasks + running < threads_max)) || die "$processes targets need about $tasks tasks; threads-max is $threads_max"
if [[ $(id -u) != 0 ]]; then
    nproc_limit=$(ulimit -u)
    [[ "$nproc_limit" == unlimited ]] || ((tasks < nproc_limit)) ||
        die "$processes targets need about $tasks tasks; ulimit -u is $nproc_limit"
fi
# dsu holds a socket and a pidfd per request in flight, and reads /proc with a few more.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
(($(ulimit -n) >= 1024)) || die "ulimit -n is $(ulimit -n); dsu needs more than 64 jobs' worth of descriptors"

# ---------------------------------------------------------------------------- tools
dsu=$root/target/release/dsu
agent=$root/target/release/libdsu_agent.so
if [[ ! -x "$dsu" || ! -e "$agent" ]]; then
    say "dsu: cargo build --release --workspace"
    nice -n 19 cargo build --release --workspace -q
fi
# shellcheck source=scripts/libpulp-build.sh
source "$root/scripts/libpulp-build.sh"
have_libpulp=0
if libpulp_setup "$root" "${MAKE_JOBS:-1}"; then
    have_libpulp=1
else
    printf 'bench-fleet: libpulp skipped: %s (set LIBPULP_SRC to a checkout or LIBPULP_PREFIX to an install)\n' "$libpulp_why"
fi

# ---------------------------------------------------------------------------- programs
rm -rf "$scratch"
mkdir -p "$work" "$answers" "$out"
say "building the target program and the patches in ${work#"$root"/}"
cat >"$work/target.c" <<'EOF'
unsigned long bench_compute(unsigned long x) { return x * 0x9E3779B97F4A7C15UL ^ (x >> 29); }
EOF
cat >"$work/fix.c" <<'EOF'
unsigned long bench_compute(unsigned long x) { return x * 0x9E3779B97F4A7C15UL ^ (x >> 31); }
EOF
cat >"$work/lp.c" <<'EOF'
unsigned long bench_compute_v2(unsigned long x) { return x * 0x9E3779B97F4A7C15UL ^ (x >> 31); }
EOF
cat >"$work/fleetprog.c" <<'EOF'
/* fleetprog ANSWERS: sleeps in pause(). At start (once the handler is installed) and on every
   SIGUSR1 it writes bench_compute(X) in decimal to ANSWERS/PID, through ANSWERS/.PID and a
   rename so that a reader never sees half a number. The handler uses only async-signal-safe
   calls; the paths are formatted before it is installed. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

unsigned long bench_compute(unsigned long x);
static char path[4096], tmp[4096];

static void answer(int sig) {
    (void)sig;
    int saved = errno;
    char buf[24];
    int n = sizeof buf;
    unsigned long v = bench_compute(1234567890123UL);
    buf[--n] = '\n';
    do {
        buf[--n] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
        if (write(fd, buf + n, sizeof buf - n) == (ssize_t)(sizeof buf - n))
            rename(tmp, path);
        close(fd);
    }
    errno = saved;
}

int main(int argc, char **argv) {
    if (argc != 2)
        return 2;
    snprintf(path, sizeof path, "%s/%d", argv[1], (int)getpid());
    snprintf(tmp, sizeof tmp, "%s/.%d", argv[1], (int)getpid());
    struct sigaction sa = {0};
    sa.sa_handler = answer;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGUSR1, &sa, NULL) != 0)
        return 1;
    answer(0);
    for (;;)
        pause();
}
EOF
cat >"$work/expect.c" <<'EOF'
#include <stdio.h>
#include <stdlib.h>
unsigned long bench_compute(unsigned long x);
int main(int argc, char **argv) { printf("%lu\n", bench_compute(strtoul(argv[1], 0, 10))); return 0; }
EOF
# The library as libpulp builds its test libraries (patchable entries, build id, SysV hash);
# dsu needs none of it, and patches the same file.
nice -n 19 "$cc" -O2 -fPIC -fpatchable-function-entry=16,14 -fno-inline -shared \
    -Wl,--build-id -Wl,--hash-style=sysv -Wl,-soname,libbenchtarget.so.0 \
    -o "$work/libbenchtarget.so.0" "$work/target.c"
ln -s libbenchtarget.so.0 "$work/libbenchtarget.so"
[[ $have_libpulp == 1 ]] && "$ulp" post "$work/libbenchtarget.so.0" >/dev/null 2>&1
nice -n 19 "$cc" -O2 -o "$work/fleetprog" "$work/fleetprog.c" -L"$work" -lbenchtarget -Wl,-rpath,'$ORIGIN'
nice -n 19 "$cc" -c -fPIC -O2 -o "$work/fix.o" "$work/fix.c"
nice -n 19 "$cc" -O2 -o "$work/expect-old" "$work/expect.c" "$work/target.c"
nice -n 19 "$cc" -O2 -o "$work/expect-new" "$work/expect.c" "$work/fix.c"
old=$("$work/expect-old" $x)
new=$("$work/expect-new" $x)
[[ "$old" != "$new" ]] || die "the patch does not change the result"
prog=$work/fleetprog
lp=""
if [[ $have_libpulp == 1 ]]; then
    nice -n 19 "$cc" -O2 -fPIC -shared -o "$work/libbenchtarget_livepatch1.so" "$work/lp.c"
    printf '%s\n@%s\n%s\n' "$work/libbenchtarget_livepatch1.so" "$work/libbenchtarget.so.0" \
        "bench_compute:bench_compute_v2" >"$work/libbenchtarget_livepatch1.dsc"
    "$ulp" packer "$work/libbenchtarget_livepatch1.dsc" >/dev/null 2>&1
    lp=$work/libbenchtarget_livepatch1.so
fi

# ---------------------------------------------------------------------------- targets
pids=()
pidfile=$scratch/pids
stop_all() {
    ((${#pids[@]})) || return 0
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    # Killed by a signal, an agent leaves its perf map behind (docs/control-protocol.md).
    local p
    for p in "${pids[@]}"; do rm -f "/tmp/perf-$p.map"; done
    pids=()
    : >"$pidfile"
}
cleanup() {
    stop_all
    rm -rf "$ctl"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mem_available() { awk '/^MemAvailable:/ { print $2 }' /proc/meminfo; } # KiB
load() { cut -d' ' -f1-3 /proc/loadavg; }
count() { find "$1" -mindepth 1 -maxdepth 1 -name "$2" 2>/dev/null | wc -l; }
# The processes of `pids` that have exited.
dead() {
    local p n=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || n=$((n + 1)); done
    echo "$n"
}

# start KIND: PROCESSES copies of the program, BATCH at a time, each batch waited for.
# KIND dsu: the dsu agent preloaded, ready once status.json is written and the program
# answered; KIND libpulp: libpulp.so preloaded, ready once the program answered.
start_all() {
    local kind=$1 i=0 started=0 avail0 avail1 t0 t1 per
    rm -rf "$answers" "$ctl"
    mkdir -p "$answers" "$ctl"
    avail0=$(mem_available)
    t0=$(date +%s%N)
    while ((started < processes)); do
        local n=$((processes - started < batch ? processes - started : batch))
        for ((i = started; i < started + n; i++)); do
            if [[ $kind == dsu ]]; then
                DSU_CONTROL_DIR=$ctl/$i LD_PRELOAD=$agent "$prog" "$answers" </dev/null >/dev/null 2>>"$scratch/targets.err" &
            else
                LD_PRELOAD=$libpulp "$prog" "$answers" </dev/null >/dev/null 2>>"$scratch/targets.err" &
            fi
            pids+=($!)
            echo $! >>"$pidfile"
        done
        started=$((started + n))
        local deadline=$((SECONDS + start_timeout))
        while :; do
            local ready answered
            answered=$(count "$answers" '[0-9]*')
            if [[ $kind == dsu ]]; then
                ready=$(find "$ctl" -mindepth 2 -maxdepth 2 -name status.json | wc -l)
            else
                ready=$answered
            fi
            ((ready >= started && answered >= started)) && break
            if ((SECONDS >= deadline)); then
                die "$kind: after ${start_timeout} s only $ready of $started agents are ready and $answered programs answered ($(dead) exited; stderr: ${scratch#"$root"/}/targets.err)"
            fi
            sleep 0.2
        done
        if ((started == n)); then
            # After the first batch: would all of them fit? Keep a quarter of what was free.
            avail1=$(mem_available)
            per=$(((avail0 - avail1) / n))
            ((per > 0)) || per=1
            if ((per * processes > avail0 * 3 / 4)); then
                die "$kind: each target takes about $((per / 1024)) MiB; $processes would take $((per * processes / 1024)) MiB of the $((avail0 / 1024)) MiB available"
            fi
        fi
        printf '\r   %s: %d/%d started and ready (load %s)' "$kind" "$started" "$processes" "$(load)"
    done
    t1=$(date +%s%N)
    printf '\n'
    start_ms=$(((t1 - t0) / 1000000))
    mem_per_kib=$(((avail0 - $(mem_available)) / processes))
    local bad
    bad=$(cat "$answers"/[0-9]* | grep -cvx "$old" || true)
    ((bad == 0)) || die "$kind: $bad programs answered something else than $old before any patch"
    pss_kib=$(targets_pss)
    say "$kind: $processes targets in $((start_ms / 1000)).$(((start_ms % 1000) / 100)) s; memory: $mem_per_kib KiB each by MemAvailable, Pss $((pss_kib / processes)) KiB each"
}

# The sum of the targets' proportional set sizes, in KiB (shared pages split among the
# processes that map them).
targets_pss() {
    printf '/proc/%s/smaps_rollup\n' "${pids[@]}" | xargs awk '/^Pss:/ { t += $2 } END { printf "%.0f\n", t }' 2>/dev/null |
        awk '{ t += $1 } END { printf "%.0f\n", t }'
}

# The pids to ask after a step: all, or SAMPLE chosen at random.
sample_pids() {
    if [[ $sample == all ]] || ((sample >= ${#pids[@]})); then
        printf '%s\n' "${pids[@]}"
    else
        printf '%s\n' "${pids[@]}" | shuf -n "$sample"
    fi
}

# check WANT WHAT: the sampled processes answer WANT; fails loudly otherwise.
check() {
    local want=$1 what=$2 asked=() p
    mapfile -t asked < <(sample_pids)
    rm -f "$answers"/[0-9]*
    for p in "${asked[@]}"; do kill -USR1 "$p" 2>/dev/null || die "$what: process $p is gone"; done
    local deadline=$((SECONDS + 30)) got
    while got=$(count "$answers" '[0-9]*') && ((got < ${#asked[@]})); do
        ((SECONDS < deadline)) || die "$what: only $got of ${#asked[@]} processes answered within 30 s"
        sleep 0.05
    done
    local wrong
    wrong=$(cat "$answers"/[0-9]* | grep -cvx "$want" || true)
    ((wrong == 0)) || die "$what: $wrong of ${#asked[@]} processes answered something else than $want"
    checked=${#asked[@]}
}

# The CPU time of the targets' threads, in ns: the scheduler's own sum (the first field of
# each thread's schedstat), exact where utime + stime counts in clock ticks.
targets_cpu() {
    local files=() p
    for p in "${pids[@]}"; do files+=(/proc/"$p"/task/*/schedstat); done
    cat "${files[@]}" 2>/dev/null | awk '{ t += $1 } END { printf "%.0f\n", t }'
}

# The CPU time the whole machine spent busy, in ms (/proc/stat, all cores): what the tool and
# the targets did not use of it is the other users' (the machine is shared).
busy_ms() {
    awk -v hz="$hz" '/^cpu / { printf "%.0f\n", ($2 + $3 + $4 + $7 + $8 + $9) * 1000 / hz }' /proc/stat
}
hz=$(getconf CLK_TCK)

printf 'tool\tstep\tjobs\tround\tprocesses\tok\tfailed\twall_ms\telapsed_ms\ttool_cpu_ms\ttargets_cpu_ms\tothers_cpu_ms\tmaxrss_kib\tload1\n' >"$results"

# timed TOOL STEP JOBS ROUND OUTFILE CMD...: runs CMD under GNU time, output to OUTFILE; sets
# wall_ms, tool_ms (its user + sys), maxrss, targets_ms and others_ms.
timed() {
    local outfile=$5
    shift 5
    local c0 c1 b0 b1 t0 t1 rc=0 user_s=0 sys_s=0
    c0=$(targets_cpu)
    b0=$(busy_ms)
    t0=$(date +%s%N)
    /usr/bin/time -f '%U %S %M' -o "$scratch/time.out" "$@" >"$outfile" 2>"$outfile.err" || rc=$?
    t1=$(date +%s%N)
    b1=$(busy_ms)
    c1=$(targets_cpu)
    wall_ms=$(((t1 - t0) / 1000000))
    maxrss=0
    read -r user_s sys_s maxrss <"$scratch/time.out" || true
    tool_ms=$(awk -v u="$user_s" -v s="$sys_s" 'BEGIN { printf "%.0f", (u + s) * 1000 }')
    targets_ms=$(((c1 - c0) / 1000000))
    others_ms=$((b1 - b0 - tool_ms - targets_ms))
    ((others_ms > 0)) || others_ms=0
    step_rc=$rc
}

# One line of the table and of the TSV, from what `timed` measured.
record() { # record TOOL STEP JOBS ROUND OK FAILED ELAPSED_MS
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$processes" "$5" "$6" \
        "$wall_ms" "$7" "$tool_ms" "$targets_ms" "$others_ms" "$maxrss" "$(cut -d' ' -f1 /proc/loadavg)" >>"$results"
    row "$1" "$2" "$3" "$4" "$5" "$6" "$wall_ms" "$7" \
        "$(awk -v w="$wall_ms" -v n="$processes" 'BEGIN { printf "%.3f", w / n }')" \
        "$(awk -v w="$wall_ms" -v n="$processes" 'BEGIN { printf "%.0f", (w > 0 ? n * 1000 / w : 0) }')" \
        "$(awk -v t="$tool_ms" 'BEGIN { printf "%.2f", t / 1000 }')" \
        "$(awk -v t="$targets_ms" 'BEGIN { printf "%.2f", t / 1000 }')" \
        "$(awk -v t="$others_ms" 'BEGIN { printf "%.2f", t / 1000 }')" \
        "$((maxrss / 1024))"
}
row() {
    printf '| %-4s | %-6s | %4s | %5s | %5s | %6s | %7s | %10s | %7s | %7s | %8s | %8s | %8s | %7s |\n' "$@"
}
header() {
    row tool step jobs round ok failed wall_ms elapsed_ms ms/proc procs/s tool_cpu targets other rss_MiB
    row --- --- ---: ---: ---: ---: ---: ---: ---: ---: ---: ---: ---: ---:
}

# counts FILE: "done failed elapsed_ms" of a dsu --json document ("applied" or "reverted").
counts() {
    sed -n 's/.*"counts":{"[a-z]*":\([0-9]*\),"skipped":[0-9]*,"failed":\([0-9]*\)},"elapsed_ms":\([0-9]*\).*/\1 \2 \3/p' "$1"
}

dsu_step() { # dsu_step apply|revert JOBS ROUND
    local step=$1 jobs=$2 round=$3 f=$scratch/dsu-$1-$2-$3.json applied failed elapsed
    if [[ $step == apply ]]; then
        timed dsu apply "$jobs" "$round" "$f" "$dsu" apply --all --exe "$prog" --jobs "$jobs" --json "$work/fix.o"
    else
        timed dsu revert "$jobs" "$round" "$f" "$dsu" revert --all --exe "$prog" --jobs "$jobs" --json
    fi
    read -r applied failed elapsed < <(counts "$f") || true
    [[ -n "${applied:-}" ]] || die "dsu $step --all (exit $step_rc) printed no summary: $(head -c 400 "$f.err")"
    record dsu "$step" "$jobs" "$round" "$applied" "$failed" "$elapsed"
    ((failed == 0 && applied == processes)) || die "dsu $step --all: $applied done, $failed failed of $processes (${f#"$root"/})"
    if [[ $step == apply ]]; then check "$new" "after dsu apply"; else check "$old" "after dsu revert"; fi
}

machine() {
    echo "date (UTC):  $(date -u '+%Y-%m-%d %H:%M:%S')"
    echo "nproc:       $(nproc)"
    echo "CPU:         $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
    echo "kernel:      $(uname -r)"
    echo "memory:      $(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "dsu:         $("$dsu" --version 2>&1 | head -1) ($(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
    [[ $have_libpulp == 1 ]] && echo "libpulp:     $ulp_version${ulp_rev:+ ($ulp_rev)}"
    echo "targets:     $processes, started $batch at a time; control directories in $(df --output=fstype "$ctl" | tail -1)"
    echo "load:        $(load)"
}
say "machine"
mkdir -p "$ctl"
machine | tee "$out/fleet-machine.txt"

# ---------------------------------------------------------------------------- dsu
say "dsu: starting $processes targets, $batch at a time"
start_all dsu
dsu_mem=$mem_per_kib
dsu_pss=$pss_kib
dsu_start_ms=$start_ms
say "dsu: finding them (dsu ps --exe PROGRAM --json: the discovery an --all command starts with)"
header
for r in 1 2 3; do
    timed dsu ps - "$r" "$scratch/ps.json" "$dsu" ps --exe "$prog" --json
    found=$(grep -o '"pid":' "$scratch/ps.json" | wc -l)
    record dsu ps - "$r" "$found" 0 -
    ((found == processes)) || die "dsu ps finds $found of the $processes targets"
done
if [[ $hold == 1 ]]; then
    say "HOLD=1: $processes targets running ($prog; pids in ${scratch#"$root"/}/pids, patch $work/fix.o); stop with Ctrl-C or kill $$"
    sleep infinity &
    holder=$!
    trap 'kill $holder 2>/dev/null; exit 130' INT TERM
    wait $holder || true
fi
# The sampled check would not see an answer file left from before: each check removes them.
say "dsu: rollouts (SAMPLE=$sample processes checked after each)"
header
first_jobs=${jobs_list%% *}
dsu_step apply "$first_jobs" first
dsu_step revert "$first_jobs" first
for jobs in $jobs_list; do
    for ((r = 1; r <= rounds; r++)); do
        dsu_step apply "$jobs" "$r"
        dsu_step revert "$jobs" "$r"
    done
done
echo "targets' Pss: $((dsu_pss / 1024)) MiB after start-up, $(($(targets_pss) / 1024)) MiB after the rollouts"
echo "(checked after each step: $checked processes. CPU in seconds: tool_cpu is the tool's user + sys (GNU time);"
echo " targets, the sum of the targets' threads' schedstat; other, what the rest of the machine used meanwhile)"

if ((loop > 0)); then
    say "dsu: $loop processes patched one at a time (dsu apply -p, then dsu revert -p)"
    mapfile -t some < <(printf '%s\n' "${pids[@]}" | shuf -n "$loop")
    t0=$(date +%s%N)
    for p in "${some[@]}"; do "$dsu" apply -p "$p" "$work/fix.o" >/dev/null || die "dsu apply -p $p failed"; done
    t1=$(date +%s%N)
    for p in "${some[@]}"; do "$dsu" revert -p "$p" >/dev/null || die "dsu revert -p $p failed"; done
    t2=$(date +%s%N)
    dsu_loop_apply=$(((t1 - t0) / 1000 / ${#some[@]}))
    dsu_loop_revert=$(((t2 - t1) / 1000 / ${#some[@]}))
    printf 'dsu loop: apply %d us per process, revert %d us per process (%d processes, load %s)\n' \
        "$dsu_loop_apply" "$dsu_loop_revert" "${#some[@]}" "$(load)"
fi

if [[ $profile == 1 ]]; then
    # perf and strace change the timing: these runs are not in the tables.
    say "dsu: profile of one apply (perf record -a -g) and one revert (strace -c -f)"
    perf record -q -a -g -o "$out/fleet-perf.data" -- \
        "$dsu" apply --all --exe "$prog" --json "$work/fix.o" >/dev/null 2>"$scratch/perf.err"
    # The threads: dsu (the CLI, its worker threads are named dsu too), dsu-agent (each
    # target's agent thread), fleetprog (the targets' main threads); then their top symbols.
    { perf report -i "$out/fleet-perf.data" --no-children --no-inline --sort comm,dso --stdio -g none 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -15; } || true
    { perf report -i "$out/fleet-perf.data" --no-children --no-inline --comms dsu,dsu-agent,fleetprog \
        --sort comm,dso,sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -40; } || true
    strace -c -f -o "$out/fleet-strace.txt" "$dsu" revert --all --exe "$prog" --json >/dev/null
    head -25 "$out/fleet-strace.txt"
    echo "perf data: ${out#"$root"/}/fleet-perf.data; strace: ${out#"$root"/}/fleet-strace.txt"
    check "$old" "after the profiled runs"
fi
stop_all

# ---------------------------------------------------------------------------- libpulp
if [[ $have_libpulp == 1 ]]; then
    say "libpulp: starting $processes targets, $batch at a time"
    start_all libpulp
    lp_mem=$mem_per_kib
    lp_start_ms=$start_ms
    lp_step() { # lp_step apply|revert ROUND
        local step=$1 round=$2 f=$scratch/ulp-$1-$2.out patched failed
        if [[ $step == apply ]]; then
            timed ulp apply - "$round" "$f" "$ulp" trigger -q "$lp"
        else
            timed ulp revert - "$round" "$f" "$ulp" trigger -q --revert "$lp"
        fi
        # "ulp: Processes patched: N, Skipped: N, Failed: N."
        read -r patched failed < <(sed -n 's/.*Processes patched: \([0-9]*\), Skipped: [0-9]*, Failed: \([0-9]*\)\..*/\1 \2/p' "$f") || true
        [[ -n "${patched:-}" ]] || die "ulp trigger (exit $step_rc) printed no summary: $(head -c 400 "$f" "$f.err")"
        record ulp "$step" - "$round" "$patched" "$failed" -
        ((failed == 0 && patched == processes)) || die "ulp trigger $step: $patched done, $failed failed of $processes (${f#"$root"/})"
        if [[ $step == apply ]]; then check "$new" "after ulp trigger"; else check "$old" "after ulp trigger --revert"; fi
    }
    say "libpulp: batch mode (ulp trigger without -p)"
    header
    lp_step apply first
    lp_step revert first
    for ((r = 1; r <= rounds; r++)); do
        lp_step apply "$r"
        lp_step revert "$r"
    done
    if ((loop > 0)); then
        say "libpulp: $loop processes patched one at a time (ulp trigger -p PID, then --revert)"
        mapfile -t some < <(printf '%s\n' "${pids[@]}" | shuf -n "$loop")
        t0=$(date +%s%N)
        for p in "${some[@]}"; do "$ulp" trigger -q -p "$p" "$lp" >/dev/null || die "ulp trigger -p $p failed"; done
        t1=$(date +%s%N)
        for p in "${some[@]}"; do "$ulp" trigger -q --revert -p "$p" "$lp" >/dev/null || die "ulp trigger --revert -p $p failed"; done
        t2=$(date +%s%N)
        printf 'ulp loop: apply %d us per process, revert %d us per process (%d processes, load %s)\n' \
            "$(((t1 - t0) / 1000 / ${#some[@]}))" "$(((t2 - t1) / 1000 / ${#some[@]}))" "${#some[@]}" "$(load)"
    fi
    stop_all
fi

say "start-up: dsu $((dsu_start_ms / 1000)) s, $dsu_mem KiB per target${lp_start_ms:+; libpulp $((lp_start_ms / 1000)) s, $lp_mem KiB per target}"
echo "results: ${results#"$root"/}; load now $(load)"
