//! A function shorter than an entry jump takes a replacement of any size (issue 11): the jump
//! covers the alignment padding after it, which no code runs and no symbol owns. `dsu apply`
//! and `dsu inspect --against` agree, and a revert puts the padding back too.
//!
//! The program is built with `cc -O2` at test time (its `dsu_price` is `imul; ret`, 4 bytes,
//! then padding up to the next function) and made patchable with `LD_PRELOAD=libdsu_agent.so`. Needs the workspace built first
//! (`scripts/test.sh` does).

mod support;

use std::path::Path;

use support::{Fixture, cargo_bin, cc_object, cc_program, dsu, dsu_ok, scratch};

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

/// Functions packed with no padding between them (`-falign-functions=1`): `dsu_tight` and
/// `dsu_tight2` are 4 bytes each with another function right after, `dsu_ping` is a lone
/// `ret`. The two 64-byte aligned functions around them leave a gap of alignment padding
/// within reach of a short jump. Calls go through function pointers too, which no call-site
/// rewrite reaches: they take the entry jump.
const PACKED_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
volatile int dsu_hits;
__attribute__((noinline, noipa, aligned(64))) int dsu_first(int q) { return q - 1; }
__attribute__((noinline, noipa)) int dsu_tight(int q) { return q * 100; }
__attribute__((noinline, noipa)) int dsu_next(int q) { return q + 1; }
__attribute__((noinline, noipa)) int dsu_tight2(int q) { return q * 2; }
__attribute__((noinline, noipa)) void dsu_ping(void) { }
__attribute__((noinline, noipa)) int dsu_next2(int q) { return q + 2; }
__attribute__((noinline, noipa, aligned(64))) int dsu_last(int q) { return q - 2; }
int (*volatile tight_ptr)(int) = dsu_tight;
int (*volatile tight2_ptr)(int) = dsu_tight2;
void (*volatile ping_ptr)(void) = dsu_ping;
int main(void) {
    if (dsu_first(1) + dsu_next(0) + dsu_next2(0) + dsu_last(2) != 3) return 1;
    printf("ready %d\naddresses tight=%p next=%p tight2=%p ping=%p next2=%p\n", (int)getpid(),
           (void *)dsu_tight, (void *)dsu_next, (void *)dsu_tight2, (void *)dsu_ping,
           (void *)dsu_next2);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        ping_ptr();
        printf("price %d %d %d %d hits %d\n", dsu_tight(7), tight_ptr(7), dsu_tight2(7),
               tight2_ptr(7), dsu_hits);
        fflush(stdout);
    }
    return 0;
}
"#;

const PACKED_FLAGS: &[&str] = &["-falign-functions=1", "-fno-toplevel-reorder"];

/// Both tiny functions, each longer than the original.
const TWO_TIGHT: &str = "
int dsu_tight(int q) { return q > 5 ? q * 90 + (q >> 1) : q * 100; }
int dsu_tight2(int q) { return q > 5 ? q * 3 + 1 : q * 2; }
";

/// Longer than the 1-byte `ret` it replaces.
const PING: &str = "
extern volatile int dsu_hits;
void dsu_ping(void) { dsu_hits++; }
";

#[test]
fn functions_with_no_padding_after_them_jump_short_to_trampolines_in_nearby_padding() {
    let dir = scratch("tiny-packed");
    let program = cc_program(&dir, "packed", &[("packed.c", PACKED_C)], PACKED_FLAGS);
    let patch = cc_object(&dir, "two", TWO_TIGHT, &[]);
    let library = cargo_bin("libdsu_agent.so");
    let mut fx = Fixture::start(&dir, &program, &[], &[("LD_PRELOAD", library.as_path())]);
    let (tight, tight2) = (fx.address("tight"), fx.address("tight2"));
    let sizes = (fx.code("tight").len(), fx.code("tight2").len());
    assert!(
        sizes.0 < 5 && sizes.1 < 5,
        "the fixture's functions: {sizes:?}"
    );
    assert_eq!(
        fx.address("next"),
        tight + sizes.0,
        "padding after dsu_tight"
    );
    assert_eq!(
        fx.address("ping"),
        tight2 + sizes.1,
        "padding after dsu_tight2"
    );
    assert_eq!(fx.send("go"), "price 700 700 14 14 hits 0");
    // The region from 128 bytes before the first to 135 after the second: every byte the short
    // jumps and their trampolines can touch.
    let region = tight - 128;
    let before = fx.read_memory(region, tight2 - region + 136);

    let out = dsu(&[
        "inspect",
        "--against",
        program.to_str().unwrap(),
        patch.to_str().unwrap(),
    ]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(!report.contains("warning"), "{report}");

    let pid = fx.pid.to_string();
    let out = dsu(&["apply", "-p", &pid, patch.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fx.send("go"), "price 633 633 22 22 hits 0");
    let after = fx.read_memory(region, before.len());
    let mut trampolines = Vec::new();
    for entry in [tight, tight2] {
        let at = entry - region;
        assert_eq!(
            after[at],
            0xeb,
            "a short jump at {entry:#x}: {:02x?}",
            &after[at..at + 2]
        );
        assert_eq!(
            after[at + 2..at + 4],
            before[at + 2..at + 4],
            "only 2 bytes change"
        );
        let to = (entry + 2).wrapping_add_signed(after[at + 1] as i8 as isize);
        let t = to - region;
        assert_eq!(after[t], 0xe9, "a jmp rel32 at the trampoline {to:#x}");
        for f in ["tight", "next", "tight2", "ping", "next2"] {
            let (start, len) = (fx.address(f), fx.code(f).len());
            assert!(
                to + 5 <= start || to >= start + len,
                "the trampoline at {to:#x} overwrote dsu_{f}"
            );
        }
        trampolines.push(to);
    }
    assert!(
        trampolines[0].abs_diff(trampolines[1]) >= 5,
        "two trampolines in one place: {trampolines:x?}"
    );
    let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert!(changed <= 2 * 2 + 2 * 5, "{changed} bytes changed");

    // The same fix again on top: new trampolines, clear of the first patch's.
    let out = dsu(&["apply", "-p", &pid, patch.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fx.send("go"), "price 633 633 22 22 hits 0");
    let again = fx.read_memory(region, before.len());
    for (entry, first) in [tight, tight2].into_iter().zip(&trampolines) {
        let at = entry - region;
        let to = (entry + 2).wrapping_add_signed(again[at + 1] as i8 as isize);
        assert!(
            to.abs_diff(*first) >= 5,
            "a trampoline over the first patch's"
        );
        assert_eq!(
            again[*first - region],
            0xe9,
            "the first patch's trampoline stays"
        );
    }
    let out = dsu(&["revert", "-p", &pid]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        fx.read_memory(region, before.len()),
        after,
        "back to the first patch"
    );

    let out = dsu(&["revert", "-p", &pid]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fx.send("go"), "price 700 700 14 14 hits 0");
    assert_eq!(
        fx.read_memory(region, before.len()),
        before,
        "the entries and the padding are back"
    );
    assert!(fx.alive(), "{}", fx.log());
}

#[test]
fn a_one_byte_function_is_refused_with_what_to_do_by_inspect_and_apply_alike() {
    let dir = scratch("tiny-ret");
    let program = cc_program(&dir, "packed", &[("packed.c", PACKED_C)], PACKED_FLAGS);
    let patch = cc_object(&dir, "ping", PING, &[]);
    let library = cargo_bin("libdsu_agent.so");
    let mut fx = Fixture::start(&dir, &program, &[], &[("LD_PRELOAD", library.as_path())]);
    let ping = fx.code("ping");
    assert_eq!(ping, [0xc3], "the fixture's dsu_ping is not a lone ret");
    let hint = "patch the functions that call dsu_ping instead";

    let out = dsu(&[
        "inspect",
        "--against",
        program.to_str().unwrap(),
        patch.to_str().unwrap(),
    ]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        report.contains("error: dsu_ping in")
            && report.contains("too small for even a short jump")
            && report.contains(hint),
        "{report}"
    );

    let pid = fx.pid.to_string();
    let out = dsu(&["apply", "-p", &pid, patch.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains("too small for even a short jump") && stderr.contains(hint),
        "{stderr}"
    );
    assert_eq!(fx.code("ping"), ping, "the process is unchanged");
    assert_eq!(fx.send("go"), "price 700 700 14 14 hits 0");
}

/// `dsu_short` (4 bytes, `dsu_four` right after it) needs a trampoline; the first free place
/// its short jump reaches is `dsu_four`'s padding (12 bytes of `int3`), which `dsu_four`'s own
/// entry jump, 5 bytes over its 4, reaches into by one byte. `dsu_lead` keeps the padding
/// before it out of the short jump's reach.
const PAIR_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
__attribute__((noinline, noipa, aligned(64))) int dsu_lead(int q) {
    __asm__ volatile(".skip 160, 0x90");
    return q - 1;
}
__attribute__((noinline, noipa)) int dsu_short(int q) { return q * 2; }
__attribute__((noinline, noipa)) int dsu_four(int q) { return q * 100; }
__asm__(".pushsection .text\n.skip 12, 0xcc\n.popsection");
__attribute__((noinline, noipa)) int dsu_after(int q) { return q + 1; }
__attribute__((noinline, noipa, aligned(64))) int dsu_end(int q) { return q - 2; }
/* Through the entries too: direct calls are rewritten to the new code. */
int (*volatile short_ptr)(int) = dsu_short;
int (*volatile four_ptr)(int) = dsu_four;
int main(void) {
    if (dsu_lead(1) + dsu_after(0) + dsu_end(2) != 1) return 1;
    printf("ready %d\naddresses short=%p four=%p after=%p\n", (int)getpid(),
           (void *)dsu_short, (void *)dsu_four, (void *)dsu_after);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        printf("values %d %d %d %d\n", dsu_short(7), short_ptr(7), dsu_four(7), four_ptr(7));
        fflush(stdout);
    }
    return 0;
}
"#;

const SHORT_FIX: &str = "int dsu_short(int q) { return q > 5 ? q * 3 + 1 : q * 2; }\n";
const FOUR_FIX: &str = "int dsu_four(int q) { return q > 5 ? q * 90 + (q >> 1) : q * 100; }\n";

/// Starts the pair fixture and checks the layout the tests rely on; returns it with the
/// addresses of `dsu_short` and `dsu_four`.
fn start_pair(dir: &Path) -> (Fixture, usize, usize) {
    let program = cc_program(dir, "pair", &[("pair.c", PAIR_C)], PACKED_FLAGS);
    let library = cargo_bin("libdsu_agent.so");
    let mut fx = Fixture::start(dir, &program, &[], &[("LD_PRELOAD", library.as_path())]);
    let (short, four) = (fx.address("short"), fx.address("four"));
    assert_eq!(fx.code("short").len(), 4, "the fixture's dsu_short");
    assert_eq!(four, short + 4, "no padding after dsu_short");
    assert_eq!(fx.code("four").len(), 4, "the fixture's dsu_four");
    assert_eq!(fx.address("after"), four + 16, "12 bytes after dsu_four");
    assert_eq!(
        fx.read_memory(four + 4, 12),
        [0xcc; 12],
        "dsu_four's padding"
    );
    assert_eq!(fx.send("go"), "values 14 14 700 700");
    (fx, short, four)
}

/// Where the short jump at `entry` leads, read from the process.
fn short_jump_target(fx: &Fixture, entry: usize) -> usize {
    let jump = fx.read_memory(entry, 2);
    assert_eq!(jump[0], 0xeb, "a short jump at {entry:#x}: {jump:02x?}");
    (entry + 2).wrapping_add_signed(jump[1] as i8 as isize)
}

#[test]
fn a_trampoline_keeps_clear_of_an_entry_jump_over_padding_in_the_same_patch() {
    let dir = scratch("tiny-pair-one");
    // dsu_short first: planned in the patch's order, its trampoline would take the first
    // place in dsu_four's padding, under dsu_four's entry jump.
    let patch = cc_object(&dir, "both", &format!("{SHORT_FIX}{FOUR_FIX}"), &[]);
    let (mut fx, short, four) = start_pair(&dir);
    let before = fx.read_memory(short, 24);

    dsu_ok(&fx, "apply", &[patch.to_str().unwrap()]);
    assert_eq!(fx.send("go"), "values 22 22 633 633", "{}", fx.log());
    let to = short_jump_target(&fx, short);
    assert_eq!(fx.read_memory(four, 1), [0xe9], "an entry jump at dsu_four");
    assert!(
        to >= four + 5 && to + 5 <= four + 16,
        "the trampoline at {to:#x} is not in dsu_four's padding clear of its jump at {four:#x}"
    );
    assert_eq!(
        fx.read_memory(to, 1),
        [0xe9],
        "a jmp rel32 at the trampoline"
    );

    dsu_ok(&fx, "revert", &[]);
    assert_eq!(fx.send("go"), "values 14 14 700 700");
    assert_eq!(
        fx.read_memory(short, 24),
        before,
        "the code and padding are back"
    );
    assert!(fx.alive(), "{}", fx.log());
}

#[test]
fn a_function_whose_padding_holds_another_trampoline_is_patched_around_it() {
    let dir = scratch("tiny-pair-two");
    let short_patch = cc_object(&dir, "short", SHORT_FIX, &[]);
    let four_patch = cc_object(&dir, "four", FOUR_FIX, &[]);
    let (mut fx, short, four) = start_pair(&dir);
    let before = fx.read_memory(short, 24);

    dsu_ok(&fx, "apply", &[short_patch.to_str().unwrap()]);
    assert_eq!(fx.send("go"), "values 22 22 700 700");
    let to = short_jump_target(&fx, short);
    assert_eq!(
        to,
        four + 4,
        "the fixture's point: dsu_short's trampoline right after dsu_four"
    );
    let first = fx.read_memory(short, 24);

    // dsu_four's padding is no padding now: its entry jump must not cover the trampoline.
    dsu_ok(&fx, "apply", &[four_patch.to_str().unwrap()]);
    assert_eq!(fx.send("go"), "values 22 22 633 633", "{}", fx.log());
    assert_eq!(
        fx.read_memory(to, 5),
        first[to - short..to - short + 5],
        "dsu_short's trampoline was overwritten"
    );

    dsu_ok(&fx, "revert", &[]);
    assert_eq!(fx.send("go"), "values 22 22 700 700");
    assert_eq!(fx.read_memory(short, 24), first, "back to the first patch");
    dsu_ok(&fx, "revert", &[]);
    assert_eq!(fx.send("go"), "values 14 14 700 700");
    assert_eq!(
        fx.read_memory(short, 24),
        before,
        "the code and padding are back"
    );
    assert!(fx.alive(), "{}", fx.log());
}
