//! The index of direct call sites stays true across a change of the loaded modules: after a
//! `dlopen`, the executable's call sites are not decoded again from code that patches have
//! rewritten (found by the soak: a caller of one function was sent to another function's
//! patch, placed later at an address an earlier patch had used).
//!
//! The program (`tests/fixtures/two_calls.c`) is built with `cc` at test time and made
//! patchable with `LD_PRELOAD=libdsu_agent.so`. Needs the workspace built first
//! (`scripts/test.sh` does).

mod support;

use support::{Fixture, cc_object, dsu, scratch, start_two_calls};

/// `dsu ARGS[0] -p PID ARGS[1..]`, which must succeed; its standard output.
fn dsu_on(fx: &Fixture, args: &[&str]) -> String {
    let pid = fx.pid.to_string();
    let mut all = vec![args[0], "-p", &pid];
    all.extend_from_slice(&args[1..]);
    let out = dsu(&all);
    assert!(out.status.success(), "dsu {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_dlopen_between_updates_does_not_send_a_caller_to_another_functions_patch() {
    let dir = scratch("call-index");
    // Larger than the originals: redirected, with the direct calls rewritten (main's of each;
    // dsu_h's of dsu_f).
    let f1 = cc_object(
        &dir,
        "f1",
        "long dsu_f(long x) { volatile long k = 10; return x * k + 2; }",
        &[],
    );
    let g1 = cc_object(
        &dir,
        "g1",
        "long dsu_g(long x) { volatile long k = 100; return x * k + 2; }",
        &[],
    );
    let g2 = cc_object(
        &dir,
        "g2",
        "long dsu_g(long x) { volatile long k = 100; return x * k + 3; }",
        &[],
    );
    let mut fx = start_two_calls(&dir);
    assert_eq!(fx.send("f"), "f 8");

    let out = dsu_on(&fx, &["apply", f1.to_str().unwrap()]);
    assert!(out.contains("redirect, 2 call sites rewritten"), "{out}");
    assert_eq!(fx.send("f"), "f 72");
    assert_eq!(fx.send("dlopen"), "opened");
    dsu_on(&fx, &["apply", g1.to_str().unwrap()]);
    assert_eq!(fx.send("g"), "g 702");
    dsu_on(&fx, &["revert"]);
    dsu_on(&fx, &["revert"]);
    assert_eq!((fx.send("f"), fx.send("g")), ("f 8".into(), "g 9".into()));

    let out = dsu_on(&fx, &["apply", g1.to_str().unwrap()]);
    assert!(out.contains("1 call site rewritten"), "{out}");
    let out = dsu_on(&fx, &["apply", g2.to_str().unwrap()]);
    assert!(
        out.contains("1 call site rewritten"),
        "only main's call of dsu_g is dsu_g's: {out}"
    );
    assert_eq!(fx.send("g"), "g 703");
    assert_eq!(
        fx.send("f"),
        "f 8",
        "main's call of dsu_f went to dsu_g's patch"
    );
    assert!(fx.alive(), "{}", fx.log());
}

const F_LARGER: &str = "long dsu_f(long x) { volatile long k = 10; return x * k + 2; }\n";
const H_SMALLER: &str = "long dsu_h(long x) { return x * 5 + 3; }\n";

/// The line `dsu apply` printed for `function`.
fn line_of<'a>(out: &'a str, function: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(&format!("{function} (")))
        .unwrap_or_else(|| panic!("no line for {function}: {out}"))
}

/// A direct call inside a function written over in place is no call site any more: neither
/// when the caller and the callee are replaced by one patch, nor when the caller was replaced
/// by an earlier one (the index, decoded before, still lists it). Rewriting it would write a
/// call's address into the caller's new code.
#[test]
fn calls_inside_a_caller_replaced_in_place_are_left_alone() {
    let dir = scratch("call-index-in-place-caller");
    let both = cc_object(&dir, "f_and_h", &format!("{F_LARGER}{H_SMALLER}"), &[]);
    let f = cc_object(&dir, "f", F_LARGER, &[]);
    let h = cc_object(&dir, "h", H_SMALLER, &[]);
    let mut fx = start_two_calls(&dir);
    assert_eq!(fx.send("h"), "h 16");
    let original = (fx.code("f"), fx.code("h"));

    // One patch: dsu_h in place, dsu_f redirected with main's call (not dsu_h's) rewritten.
    let out = dsu_on(&fx, &["apply", both.to_str().unwrap()]);
    assert!(line_of(&out, "dsu_h").contains("in-place"), "{out}");
    assert!(
        line_of(&out, "dsu_f").contains("redirect, 1 call site rewritten"),
        "{out}"
    );
    assert_eq!((fx.send("f"), fx.send("h")), ("f 72".into(), "h 38".into()));
    dsu_on(&fx, &["revert"]);
    assert_eq!((fx.send("f"), fx.send("h")), ("f 8".into(), "h 16".into()));
    assert_eq!((fx.code("f"), fx.code("h")), original);

    // Two patches: dsu_h in place first, then dsu_f.
    let out = dsu_on(&fx, &["apply", h.to_str().unwrap()]);
    assert!(line_of(&out, "dsu_h").contains("in-place"), "{out}");
    let out = dsu_on(&fx, &["apply", f.to_str().unwrap()]);
    assert!(
        line_of(&out, "dsu_f").contains("redirect, 1 call site rewritten"),
        "{out}"
    );
    assert_eq!((fx.send("f"), fx.send("h")), ("f 72".into(), "h 38".into()));
    dsu_on(&fx, &["revert"]);
    dsu_on(&fx, &["revert"]);
    assert_eq!((fx.code("f"), fx.code("h")), original);
    assert!(fx.alive(), "{}", fx.log());
}

/// `dsu_oversized` is hand-written assembly whose `.size` (1 GiB) runs past every mapping of
/// the program, as a wrong `.size` in real assembly does. It lies in `.bss`, whose zeros decode
/// as valid instructions up to the end of the mapping: decoded, it would fault the process
/// (in `.text` the decoder stops at the first invalid bytes after it). `dsu_f` has a direct
/// caller.
const OVERSIZED_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
__asm__(".bss\n.globl dsu_oversized\n.type dsu_oversized, @function\n"
        "dsu_oversized:\n.zero 64\n.size dsu_oversized, 0x40000000\n.text\n");
__attribute__((noinline, noipa)) long dsu_f(long x) { return x + 1; }
int main(void) {
    printf("ready %d\naddresses f=%p\n", (int)getpid(), (void *)dsu_f);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        printf("f %ld\n", dsu_f(7));
        fflush(stdout);
    }
    return 0;
}
"#;

#[test]
fn a_function_symbol_larger_than_its_mapping_is_not_decoded() {
    let dir = scratch("call-index-oversized");
    let f = cc_object(
        &dir,
        "f",
        "long dsu_f(long x) { volatile long k = 10; return x * k + 2; }",
        &[],
    );
    let program = support::cc_program(&dir, "oversized", &[("oversized.c", OVERSIZED_C)], &[]);
    let library = support::cargo_bin("libdsu_agent.so");
    let mut fx = Fixture::start(&dir, &program, &[], &[("LD_PRELOAD", library.as_path())]);
    assert_eq!(fx.send("f"), "f 8");
    // Redirected: the executable's call sites are indexed, every function but the oversized
    // one decoded.
    let out = dsu_on(&fx, &["apply", f.to_str().unwrap()]);
    assert!(
        line_of(&out, "dsu_f").contains("redirect, 1 call site rewritten"),
        "{out}"
    );
    assert_eq!(fx.send("f"), "f 72", "{}", fx.log());
    dsu_on(&fx, &["revert"]);
    assert_eq!(fx.send("f"), "f 8");
    assert!(fx.alive(), "{}", fx.log());
}
