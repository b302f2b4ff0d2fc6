//! A Rust patch: `#[unsafe(no_mangle)]` functions, a bounds check that may panic (its
//! location in `.data.rel.ro`, `R_X86_64_64`), core's panic entry reached through the GOT.

#[unsafe(no_mangle)]
pub fn price_rs(table: &[u32], i: usize) -> u32 {
    table[i] * 3 + 1
}

#[unsafe(no_mangle)]
pub extern "C" fn checksum_rs(data: *const u8, len: usize) -> u32 {
    // SAFETY: the caller passes a valid buffer of `len` bytes.
    let bytes = unsafe { std::slice::from_raw_parts(data, len) };
    bytes.iter().fold(0u32, |a, &b| a.rotate_left(5) ^ u32::from(b))
}

#[unsafe(no_mangle)]
pub fn label_rs(n: u32) -> &'static str {
    match n {
        0 => "zero",
        1 => "one",
        _ => "many",
    }
}
