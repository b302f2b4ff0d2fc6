//! The fix for `demo_price_cents` of `examples/demo_service.rs`: 10 or more units get 10% off.
//!
//! Build: `rustc --edition=2024 --crate-type=lib --emit=obj -O examples/patches/price_fix.rs`
//! then `dsu apply -p PID price_fix.o`.

const UNIT_CENTS: u32 = 250;

#[unsafe(no_mangle)]
pub fn demo_price_cents(qty: u32) -> u32 {
    let gross = qty * UNIT_CENTS;
    if qty >= 10 { gross - gross / 10 } else { gross }
}
