# Sourced by the benchmarks that run libpulp beside dsu (scripts/bench-libpulp.sh,
# scripts/bench-fleet.sh): finds or builds libpulp, from the user's checkout or install; no
# libpulp code or recipe lives in this repository.
#
# libpulp_setup ROOT [MAKE_JOBS]: with LIBPULP_PREFIX, uses that install (bin/ulp, lib/libpulp.so); with
# LIBPULP_SRC, builds that checkout with its own autotools recipe (./bootstrap when there is
# no ./configure, then configure + make + make install) out of tree into
# ROOT/target/libpulp-bench/libpulp-{build,prefix}, reused while the checkout's commit is
# unchanged. Sets `ulp`, `libpulp`, `ulp_version` and `ulp_rev` and returns 0; returns 1 with
# the reason in `libpulp_why` when neither variable names something usable; exits 1 when the
# build fails. MAKE_JOBS is make's -j (default 1); builds run under `nice -n 19`.
#
# libpulp's configure wants: autoconf, automake, libtool, autoconf-archive, a C and a C++
# compiler, libelf and json-c development files, libseccomp headers, and a Python 3 with the
# pexpect and psutil modules (for its test suite).

libpulp_setup() {
    local root=$1 make_jobs=${2:-1}
    local scratch=$root/target/libpulp-bench
    local src=${LIBPULP_SRC:-} prefix=${LIBPULP_PREFIX:-}
    libpulp_why=""
    if [[ -n "$src" && ! -d "$src" ]]; then
        if [[ -z "$prefix" ]]; then
            libpulp_why="LIBPULP_SRC=$src is not a directory"
            return 1
        fi
        src=""
    fi
    [[ -n "$src" ]] && src=$(cd "$src" && pwd)
    if [[ -n "$prefix" ]]; then
        if [[ ! -x "$prefix/bin/ulp" || ! -e "$prefix/lib/libpulp.so" ]]; then
            libpulp_why="LIBPULP_PREFIX=$prefix has no bin/ulp and lib/libpulp.so"
            return 1
        fi
        prefix=$(cd "$prefix" && pwd)
    elif [[ -n "$src" ]]; then
        prefix=$scratch/libpulp-prefix
        local build=$scratch/libpulp-build log=$scratch/libpulp-build.log
        local rev
        rev=$(git -C "$src" rev-parse HEAD 2>/dev/null || echo unknown)
        mkdir -p "$scratch"
        if [[ -x "$prefix/bin/ulp" && "$(cat "$prefix/.source-rev" 2>/dev/null)" == "$rev" && "$rev" != unknown ]]; then
            printf '== libpulp: reusing %s (built from %s)\n' "$prefix" "$rev"
        else
            printf '== libpulp: building %s into %s (log: %s)\n' "$src" "$prefix" "$log"
            : >"$log"
            local python=${PYTHON:-} p
            if [[ -z "$python" ]]; then
                # Every python3 on PATH, in order: the first may lack them (a pyenv shim).
                for p in $(type -ap python3); do
                    if "$p" -c 'import pexpect, psutil' 2>/dev/null; then python=$p; break; fi
                done
            fi
            if [[ -z "$python" ]]; then
                echo "libpulp: its configure needs a python3 with pexpect and psutil" >&2
                exit 1
            fi
            libpulp_fail() {
                echo "libpulp: $1 failed; last lines of $log:" >&2
                tail -20 "$log" >&2
                exit 1
            }
            if [[ ! -x "$src/configure" ]]; then
                (cd "$src" && nice -n 19 ./bootstrap) >>"$log" 2>&1 || libpulp_fail "./bootstrap"
            fi
            rm -rf "$build" "$prefix"
            mkdir -p "$build"
            (cd "$build" && nice -n 19 "$src/configure" --prefix="$prefix" PYTHON="$python") >>"$log" 2>&1 ||
                libpulp_fail "configure"
            (cd "$build" && nice -n 19 make -j"$make_jobs") >>"$log" 2>&1 || libpulp_fail "make"
            (cd "$build" && nice -n 19 make install) >>"$log" 2>&1 || libpulp_fail "make install"
            echo "$rev" >"$prefix/.source-rev"
        fi
    else
        libpulp_why="LIBPULP_SRC is not set"
        return 1
    fi
    ulp=$prefix/bin/ulp
    libpulp=$prefix/lib/libpulp.so
    ulp_version=$("$ulp" -V 2>&1 | head -1)
    ulp_rev=""
    if [[ -n "$src" ]]; then
        ulp_rev=$(git -C "$src" describe --tags --always --dirty 2>/dev/null || true)
        ulp_rev="$ulp_rev $(git -C "$src" rev-parse HEAD 2>/dev/null || true)"
    fi
    return 0
}
