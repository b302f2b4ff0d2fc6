//! Patch bytes -> `load::parse`: refusals display, parsed patches are consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = dsu_fuzz::check_load(data);
});
