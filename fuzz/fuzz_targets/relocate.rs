//! Patch bytes -> parse -> resolve -> lay out -> relocate into a buffer at the address
//! placement would choose, in-place candidates over their old functions. Nothing is mapped.
#![no_main]

use std::sync::LazyLock;

use dsu_agent::resolve::SymbolIndex;
use libfuzzer_sys::fuzz_target;

static INDEX: LazyLock<SymbolIndex> = LazyLock::new(dsu_fuzz::synthetic_index);

fuzz_target!(|data: &[u8]| {
    let _ = dsu_fuzz::check_relocate(data, &INDEX);
});
