#!/usr/bin/env bash
# Regenerates the seed corpus of the fuzz targets: real patch objects compiled from the small
# sources in fuzz/seeds/, as `cc -c -fPIC` and `rustc --emit=obj` build patches, copied into
# fuzz/corpus/<target>/ for every target. Run from anywhere; needs cc and rustc.
set -euo pipefail
cd "$(dirname "$0")"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

flags=(-c -fPIC -O2 -ffunction-sections -fdata-sections)
cc "${flags[@]}" seeds/price.c -o "$out/c-price.o"
cc "${flags[@]}" -O0 seeds/price.c -o "$out/c-price-O0.o"
cc "${flags[@]}" -fno-pic -fno-PIE seeds/price.c -o "$out/c-price-nopic.o"
cc "${flags[@]}" -fcommon seeds/data.c -o "$out/c-data.o"
cc "${flags[@]}" seeds/tls.c -o "$out/c-tls-gd.o"
cc "${flags[@]}" -ftls-model=initial-exec seeds/tls.c -o "$out/c-tls-ie.o"
cc "${flags[@]}" seeds/tls_defined.c -o "$out/c-tls-defined.o"
cc "${flags[@]}" seeds/ambiguous.c -o "$out/c-ambiguous.o"
cc "${flags[@]}" seeds/ifunc.c -o "$out/c-ifunc.o"
cc "${flags[@]}" seeds/aliases.c -o "$out/c-aliases.o"
cc "${flags[@]}" seeds/scoped.c -o "$out/c-scoped.o"
rustc --emit=obj --crate-type=lib --edition=2024 -C opt-level=2 -C panic=abort \
    seeds/patch.rs -o "$out/rust-patch.o"

for target in load resolve relocate; do
    rm -rf "corpus/$target"
    mkdir -p "corpus/$target"
    # Debug information is stripped: it is most of the bytes and none of the loader's logic.
    for o in "$out"/*.o; do
        objcopy --strip-debug "$o" "corpus/$target/$(basename "$o")" 2>/dev/null \
            || cp "$o" "corpus/$target/$(basename "$o")"
    done
done
du -sh corpus
