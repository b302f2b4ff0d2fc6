//! Patch bytes -> parse -> resolve against a synthetic process of three modules.
#![no_main]

use std::sync::LazyLock;

use dsu_agent::resolve::SymbolIndex;
use libfuzzer_sys::fuzz_target;

static INDEX: LazyLock<SymbolIndex> = LazyLock::new(dsu_fuzz::synthetic_index);

fuzz_target!(|data: &[u8]| {
    let _ = dsu_fuzz::check_resolve(data, &INDEX);
});
