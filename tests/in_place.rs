//! What may be written over the old function (in place) rather than reached by an entry jump:
//! a replacement that would drop the old entry's `endbr64` (the landing mark indirect calls
//! need under Intel CET's indirect branch tracking) does not go in place, however small, and
//! the function's entry keeps its `endbr64`.
//!
//! The program is `tests/fixtures/plain.c` built with `-fcf-protection=full`, made patchable
//! by `LD_PRELOAD=libdsu_agent.so`; the patch is built with `-fcf-protection=none`.

mod support;

use support::{C_X10, Fixture, ORIGINAL, cargo_bin, cc_object, cc_program, dsu_ok, scratch};

const PLAIN_C: &str = include_str!("fixtures/plain.c");
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

#[test]
fn a_replacement_without_endbr64_keeps_the_entrys_endbr64() {
    let dir = scratch("in-place-endbr64");
    let library = cargo_bin("libdsu_agent.so");
    let program = cc_program(
        &dir,
        "plain_cet",
        &[("plain.c", PLAIN_C)],
        &["-fcf-protection=full"],
    );
    let patch = cc_object(&dir, "c_x10", C_X10, &["-fcf-protection=none"]);
    let mut fx = Fixture::start(&dir, &program, &[], &[("LD_PRELOAD", &library)]);
    let entry = fx.address("compute");
    assert_eq!(
        fx.read_memory(entry, 4),
        ENDBR64,
        "the fixture is built with CET marks"
    );
    assert_eq!(fx.send("compute"), format!("compute {ORIGINAL}"));

    let stdout = dsu_ok(&fx, "apply", &[patch.to_str().unwrap()]);
    assert!(stdout.contains(", redirect,"), "not redirected: {stdout}");
    assert_eq!(fx.send("compute"), "compute 70");
    assert_eq!(
        fx.read_memory(entry, 4),
        ENDBR64,
        "the entry lost its endbr64: {stdout}"
    );
    assert!(fx.alive());
}
