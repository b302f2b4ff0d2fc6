//! A function shorter than an entry jump takes a replacement of any size (issue 11): the jump
//! covers the alignment padding after it, which no code runs and no symbol owns. `dsu apply`
//! and `dsu inspect --against` agree, and a revert puts the padding back too.
//!
//! The program is built with `cc -O2` at test time (its `dsu_price` is `imul; ret`, 4 bytes,
//! then padding up to the next function) and made patchable with `LD_PRELOAD=libdsu_agent.so`. Needs the workspace built first
//! (`scripts/test.sh` does).

mod support;

use support::{Fixture, cargo_bin, cc_object, cc_program, dsu, scratch};

const PROGRAM_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
__attribute__((noinline, noipa)) int dsu_price(int q) { return q * 100; }
/* Keeps dsu_price from being the last function of .text: its alignment padding follows. */
__attribute__((noinline, noipa)) int dsu_after(int q) { return q + 1; }
int main(void) {
    if (dsu_after(0) != 1) return 1;
    printf("ready %d\naddresses price=%p\n", (int)getpid(), (void *)dsu_price);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        printf("price %d\n", dsu_price(7));
        fflush(stdout);
    }
    return 0;
}
"#;

/// Longer than the 4-byte original: it needs the entry jump.
const DISCOUNT: &str = "
int dsu_price(int q) { return q > 5 ? q * 90 + (q >> 1) : q * 100; }
";

#[test]
fn a_four_byte_function_takes_a_longer_replacement_over_its_padding() {
    let dir = scratch("tiny");
    let program = cc_program(&dir, "tiny", &[("tiny.c", PROGRAM_C)], &[]);
    let patch = cc_object(&dir, "discount", DISCOUNT, &[]);
    let library = cargo_bin("libdsu_agent.so");
    let mut fx = Fixture::start(&dir, &program, &[], &[("LD_PRELOAD", library.as_path())]);
    let price = fx.address("price");
    assert_eq!(
        fx.code("price").len(),
        4,
        "the fixture's function is not 4 bytes"
    );
    assert_eq!(fx.send("price"), "price 700");
    let before = fx.read_memory(price, 16);

    let out = dsu(&[
        "inspect",
        "--against",
        program.to_str().unwrap(),
        patch.to_str().unwrap(),
    ]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        report.contains("dsu_price") && !report.contains("too small"),
        "inspect should see the padding too: {report}"
    );

    let pid = fx.pid.to_string();
    let out = dsu(&["apply", "-p", &pid, patch.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains(", redirect,"), "{stdout}");
    assert_eq!(fx.send("price"), "price 633");
    let patched = fx.read_memory(price, 16);
    assert_eq!(
        patched[0], 0xe9,
        "an entry jump at the function: {patched:02x?}"
    );
    assert_eq!(patched[5..], before[5..], "only the jump's 5 bytes change");

    let out = dsu(&["revert", "-p", &pid]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fx.send("price"), "price 700");
    assert_eq!(
        fx.read_memory(price, 16),
        before,
        "the function and its padding are back"
    );
    assert!(fx.alive(), "{}", fx.log());
}
