#!/usr/bin/env bash
# Installs dsu for use outside this repository: the `dsu` command, the agent's C library
# (static and shared), its header and a pkg-config file.
#
#   scripts/install.sh [PREFIX]         # default PREFIX: $PREFIX, else /usr/local
#   scripts/install.sh --from DIR PREFIX  # install what is built in DIR (no build)
#
# Then:  cc prog.c $(pkg-config --cflags --libs dsu-agent)       (the shared library)
#        cc prog.c $(pkg-config --cflags dsu-agent) \
#           "$(pkg-config --variable=staticlib dsu-agent)" \
#           $(pkg-config --variable=static_libs dsu-agent)       (the static library)
#        LD_PRELOAD=PREFIX/lib/libdsu_agent.so ./prog            (an unmodified program)
# (Set PKG_CONFIG_PATH=PREFIX/lib/pkgconfig when PREFIX is not searched by default.)
set -euo pipefail
cd "$(dirname "$0")/.."
from=""
if [[ "${1:-}" == "--from" ]]; then
    from=$2
    shift 2
fi
prefix=${1:-${PREFIX:-/usr/local}}
prefix=$(mkdir -p "$prefix" && cd "$prefix" && pwd)

if [[ -z "$from" ]]; then
    echo "== building (release)"
    cargo build --release -q
    from=target/release
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

echo "== installing into $prefix"
install -d "$prefix/bin" "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0755 "$from/dsu" "$prefix/bin/dsu"
install -m 0644 "$from/libdsu_agent.a" "$prefix/lib/libdsu_agent.a"
install -m 0755 "$from/libdsu_agent.so" "$prefix/lib/libdsu_agent.so"
install -m 0644 dsu-agent/include/dsu.h "$prefix/include/dsu.h"
# The static library carries Rust's standard library, which needs these system libraries.
cat > "$prefix/lib/pkgconfig/dsu-agent.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include
staticlib=\${libdir}/libdsu_agent.a
static_libs=-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc

Name: dsu-agent
Description: In-process agent that applies live patches to the running program
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -ldsu_agent
Libs.private: \${static_libs}
PC
echo "installed: $prefix/bin/dsu, $prefix/lib/libdsu_agent.{a,so}, $prefix/include/dsu.h,"
echo "           $prefix/lib/pkgconfig/dsu-agent.pc"
