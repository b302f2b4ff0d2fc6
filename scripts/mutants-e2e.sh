#!/usr/bin/env bash
# Mutation testing against the end-to-end tests.
#
# `cargo mutants` runs `cargo test` on each mutant, which does not rebuild what the end-to-end
# tests run (the agent's `.so` and `.a`, `dsu`, the example programs: `tests/support` refuses
# stale ones). So this script takes the mutants from `cargo mutants --list`, and for each one:
# applies it in a copy of the source tree (as it is, without target/ and .git), builds what
# the tests need, runs the chosen test files, records whether they caught it, and puts the
# file back as it was in the copy (the working tree may be edited while a run goes on).
#
#   scripts/mutants-e2e.sh [cargo mutants selection: --file F --re R ...]
#
# Environment:
#   TESTS    test files to run (default: the ones that exercise the update's checks)
#   OUT      where results go (default target/mutants-e2e); OUT/outcomes.txt gets one line
#            per mutant: caught | missed | unviable | timeout, then its name
#   LIMIT    seconds for one mutant's tests before it counts as a timeout (default 150)
#   STRICT   1: exit 1 when any mutant is missed (CI runs a bounded subset this way)
#   UNIT     1 (default): a mutant the chosen tests miss is tried against the library's own
#            tests (`cargo test -p PACKAGE --lib --tests`: for the agent, its unit tests and
#            the stop and check tests that run real threads in the test process) before it
#            counts as missed; 0: not
#   PACKAGE  the crate whose mutants are taken: dsu-agent (default) or dsu-build (`dsu build`,
#            which the `dsu` binary the tests run is built with)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
TESTS=${TESTS:-"apply waiting unproven in_place debugger_attached stacks foreign_stack own_ground many_threads bounded_wait placement entry_branches races unwind_tables modules"}
OUT=${OUT:-$root/target/mutants-e2e}
# Absolute: the mutants are applied and built from inside the copy of the tree.
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LIMIT=${LIMIT:-150}
UNIT=${UNIT:-1}
PACKAGE=${PACKAGE:-dsu-agent}
tree=$OUT/tree

mutants=$OUT/mutants.json
cargo mutants -p "$PACKAGE" --list --json --diff "$@" >"$mutants"
count=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$mutants")
echo "== $count mutants; tests: $TESTS"

# A plain copy, not a git worktree: CI may run on a checkout without git metadata.
rm -rf "$tree"
mkdir -p "$tree"
tar --exclude=./target --exclude=./fuzz/target --exclude=./.git -cf - . | tar -xf - -C "$tree"

test_args=()
for t in $TESTS; do test_args+=(--test "$t"); done

build() {
    # What the tests run: the agent's libraries, `dsu`, the examples, the test binaries.
    (cd "$tree" && cargo build -q -p dsu-agent 2>&1 &&
        cargo build -q -p dsu --bins --examples 2>&1 &&
        cargo test -q -p dsu --no-run "${test_args[@]}" 2>&1)
}
run_tests() {
    (cd "$tree" && timeout "$LIMIT" cargo test -q -p dsu "${test_args[@]}" -- --test-threads=2 2>&1)
}

echo "== baseline: building the unmutated tree and running the tests"
build >"$OUT/baseline.log" || { echo "baseline build failed: $OUT/baseline.log"; exit 1; }
run_tests >>"$OUT/baseline.log" || { echo "baseline tests failed: $OUT/baseline.log"; exit 1; }

outcomes=$OUT/outcomes.txt
: >"$outcomes"
mkdir -p "$OUT/log"
for i in $(seq 0 $((count - 1))); do
    name=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[int(sys.argv[2])]["name"])' "$mutants" "$i")
    python3 -c 'import json,sys; sys.stdout.write(json.load(open(sys.argv[1]))[int(sys.argv[2])]["diff"])' "$mutants" "$i" >"$OUT/current.diff"
    file=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[int(sys.argv[2])]["file"])' "$mutants" "$i")
    log=$OUT/log/$i.log
    started=$(date +%s)
    # Put back from the copy as it was, not from the working tree, which may change meanwhile.
    cp "$tree/$file" "$OUT/unmutated"
    if ! (cd "$tree" && patch -s -p0 <"$OUT/current.diff") >"$log" 2>&1; then
        outcome=unviable
    elif ! build >>"$log"; then
        outcome=unviable
    else
        status=0
        run_tests >>"$log" || status=$?
        case $status in
            0) outcome=missed ;;
            124) outcome=timeout ;;
            *) outcome=caught ;;
        esac
        # A mutant the end-to-end tests miss may still be caught by the library's own tests
        # (seconds: only the survivors pay for them).
        if [ "$outcome" = missed ] && [ "$UNIT" = 1 ]; then
            if ! (cd "$tree" && timeout "$LIMIT" cargo test -q -p "$PACKAGE" --lib --tests 2>&1) >>"$log"; then
                outcome=caught
                echo "(caught by the library's own tests)" >>"$log"
            fi
        fi
    fi
    cp "$OUT/unmutated" "$tree/$file"
    echo "$outcome $name" | tee -a "$outcomes"
    echo "($(($(date +%s) - started)) s)" >>"$log"
done
missed=$(grep -c '^missed' "$outcomes" || true)
echo "== $(grep -c '^caught' "$outcomes" || true) caught, $missed missed," \
    "$(grep -c '^timeout' "$outcomes" || true) timeouts, $(grep -c '^unviable' "$outcomes" || true) unviable: $outcomes"
if [ "${STRICT:-0}" = 1 ] && [ "$missed" != 0 ]; then
    echo "a check could be deleted with every test still passing: see the mutants marked missed"
    exit 1
fi
