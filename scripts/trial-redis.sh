#!/usr/bin/env bash
# A field trial on a program we did not write: Redis, from a local checkout named by
# REDIS_SRC (not part of this repository; skipped with a message without it).
#
#   REDIS_SRC=path/to/redis scripts/trial-redis.sh
#
# Builds Redis as a live-patchable program (-O2 -g -ffunction-sections -fdata-sections, the
# C library's malloc), starts it with the agent preloaded and two I/O threads, and while
# redis-benchmark keeps it busy:
#   1. pingCommand fixed to answer "PONG (live-patched)": built with `dsu build --against`,
#      applied, checked with redis-cli, reverted;
#   2. a one-line fix of lookupKey (db.c): the patch must hold lookupKey alone (the functions
#      below it differ only in __LINE__), applied and reverted under SET/GET load;
#   3. a fix of aeProcessEvents (ae.c): gcc splits it (aeProcessEvents.part.0, which the fix
#      leaves as it is: vouched for), and aeMain, which inlines its quick test and never
#      returns, must be refused by name.
# Exits non-zero when an outcome is not the expected one. docs/reliability.md has the results.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
if [ -z "${REDIS_SRC:-}" ] || [ ! -f "${REDIS_SRC}/src/server.c" ]; then
    echo "trial-redis: set REDIS_SRC to a Redis source checkout; skipped"
    exit 0
fi
cargo build --release -q -p dsu-agent -p dsu
dsu=$root/target/release/dsu
agent=$root/target/release/libdsu_agent.so

work=$(mktemp -d)
server_pid=
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
    [ -n "${bench_pid:-}" ] && kill "$bench_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
echo "== building Redis in $work (a copy of REDIS_SRC)"
cp -a "$REDIS_SRC/." "$work/redis"
src=$work/redis/src
make -C "$work/redis" -j"$(nproc)" MALLOC=libc OPTIMIZATION=-O2 BUILD_TLS=no \
    CFLAGS="-ffunction-sections -fdata-sections" >"$work/build.log" 2>&1 ||
    { tail -n 30 "$work/build.log"; exit 1; }
# The flags the build used for one file, to compile the original and the fixed object alike.
cflags() {
    make -C "$src" -n -B V=1 "$1.o" MALLOC=libc OPTIMIZATION=-O2 BUILD_TLS=no \
        CFLAGS="-ffunction-sections -fdata-sections" 2>/dev/null |
        grep -E -- "-c $1\.c\$" | head -n 1 |
        sed -E "s/^[^ ]+ //; s/ -MMD / /; s/ -o $1\.o -c $1\.c\$//"
}

port=${REDIS_PORT:-6399}
cli() { "$src/redis-cli" -p "$port" "$@"; }
LD_PRELOAD=$agent "$src/redis-server" --port "$port" --save '' --appendonly no \
    --io-threads 2 >"$work/redis.log" 2>&1 &
server_pid=$!
for _ in $(seq 50); do cli ping >/dev/null 2>&1 && break; sleep 0.1; done

# fix FILE PYTHON-REPLACEMENT: original and fixed objects of FILE in $work/{orig,fixed}.
fix() {
    local file=$1 old=$2 new=$3 flags
    flags=$(cflags "$file")
    mkdir -p "$work/orig" "$work/fixed"
    (cd "$src" && eval cc "$flags" -c "$file.c" -o "$work/orig/$file.o")
    cp "$src/$file.c" "$work/$file.c.orig"
    python3 - "$src/$file.c" "$old" "$new" <<'EOF'
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
assert text.count(old) == 1, f"the text to fix is not in {path} once"
open(path, "w").write(text.replace(old, new))
EOF
    (cd "$src" && eval cc "$flags" -c "$file.c" -o "$work/fixed/$file.o")
    cp "$work/$file.c.orig" "$src/$file.c"
}
expect() {
    if [ "$2" != "$3" ]; then echo "trial-redis: $1: expected '$3', got '$2'"; exit 1; fi
    echo "ok: $1"
}
bench_pid=
load() {
    "$src/redis-benchmark" -p "$port" -t "$1" -n 300000 -c 20 -r 10000 -q >"$work/bench.log" 2>&1 &
    bench_pid=$!
    sleep 1
}

echo "== 1. pingCommand, under PING load"
fix server '            addReply(c,shared.pong);' '            addReplyStatus(c,"PONG (live-patched)");'
"$dsu" build "$work/orig/server.o" "$work/fixed/server.o" -o "$work/ping.o" --against "$server_pid"
load ping
"$dsu" apply -p "$server_pid" "$work/ping.o"
expect "patched ping" "$(cli ping)" "PONG (live-patched)"
"$dsu" revert -p "$server_pid"
expect "reverted ping" "$(cli ping)" "PONG"
wait "$bench_pid"

echo "== 2. lookupKey, a one-line fix, under SET/GET load"
fix db '    dictEntry *de = dbFind(db, key->ptr);
    robj *val = NULL;' '    if (key == NULL || key->ptr == NULL) return NULL;
    dictEntry *de = dbFind(db, key->ptr);
    robj *val = NULL;'
summary=$("$dsu" build "$work/orig/db.o" "$work/fixed/db.o" -o "$work/db.o" --against "$server_pid")
echo "$summary" | sed -n '/^changed/,/^clones/p;/^line numbers/p'
expect "the patch holds lookupKey alone" "$(echo "$summary" | sed -n '/^changed/,/^clones/p' | tr -d ' \n')" "changed1:lookupKeyclones0:"
load set,get
"$dsu" apply -p "$server_pid" "$work/db.o"
cli set dsu-trial value >/dev/null
expect "GET after the update" "$(cli get dsu-trial)" "value"
"$dsu" revert -p "$server_pid"
wait "$bench_pid"

echo "== 3. aeProcessEvents: its split-off body vouched for, aeMain refused by name"
fix ae '    /* Nothing to do? return ASAP */' '    __asm__ volatile("nop");
    /* Nothing to do? return ASAP */'
"$dsu" build "$work/orig/ae.o" "$work/fixed/ae.o" -o "$work/ae.o" --against "$server_pid"
status=0
out=$("$dsu" apply -p "$server_pid" --timeout 1 "$work/ae.o" 2>&1) || status=$?
echo "$out"
expect "refused (exit 1)" "$status" "1"
case $out in
*"aeMain is active in thread"*) echo "ok: the refusal names aeMain" ;;
*) echo "trial-redis: the refusal does not name aeMain"; exit 1 ;;
esac
expect "still serving" "$(cli ping)" "PONG"
echo "== every outcome as expected"
