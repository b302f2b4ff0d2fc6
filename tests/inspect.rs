//! `dsu inspect`: what a patch replaces, adds and needs, checked against a binary on disk and
//! against a running process, with warnings for functions that cannot take the patch well.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn inspect(args: &[&str]) -> Output {
    Command::new(support::cargo_bin("dsu"))
        .arg("inspect")
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const PROGRAM: &str = r#"
#include <stdio.h>
long counter;
long base_price(long qty) { return qty * 3 + counter; }
__attribute__((noinline)) long price(long qty) {
    long p = base_price(qty);
    for (int i = 0; i < 3; i++) p += qty >> i;
    return p;
}
/* A lone `ret` with another function right after it: no padding for an entry jump. */
void nothing(void);
__asm__(".text\n.globl nothing\n.type nothing, @function\n.p2align 4\nnothing:\n  ret\n"
        ".size nothing, 1\n.globl nothing_next\n.type nothing_next, @function\n"
        "nothing_next:\n  ret\n.size nothing_next, 1\n");
long price_alias(long qty) __attribute__((alias("price")));
int main(int argc, char **argv) {
    (void)argv;
    nothing();
    printf("%ld\n", price(argc) + price_alias(argc));
    return 0;
}
"#;

const PATCH: &str = r#"
extern long counter;
long base_price(long qty);
static long helper(long x) { return x / 2; }
long price_extra(long qty) { return qty + 1; }
long price(long qty) { return base_price(qty) + helper(qty) + counter; }
void nothing(void) { counter++; }
"#;

fn build(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let exe = support::cc_program(dir, "shop", &[("shop.c", PROGRAM)], &["-fno-inline"]);
    let patch = support::cc_object(dir, "fix", PATCH, &[]);
    (exe, patch)
}

#[test]
fn against_a_binary_lists_replacements_additions_needs_and_warnings() {
    let dir = support::scratch("inspect-binary");
    let (exe, patch) = build(&dir);
    let out = inspect(&[patch.to_str().unwrap(), "--against", exe.to_str().unwrap()]);
    let report = text(&out);
    // `nothing`, a lone `ret`, cannot take a longer version: apply would refuse the patch, so
    // inspect fails it, with apply's message.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("error: nothing in ")
            && report.contains("too small for even a short jump")
            && report.contains("patch the functions that call nothing instead"),
        "{report}"
    );
    assert!(report.contains("replaces 2:"), "{report}");
    assert!(report.contains("  price at 0x"), "{report}");
    assert!(report.contains("adds 1:\n  price_extra"), "{report}");
    assert!(report.contains("base_price -> 0x"), "{report}");
    assert!(report.contains("counter -> 0x"), "{report}");

    let out = inspect(&[
        patch.to_str().unwrap(),
        "--against",
        exe.to_str().unwrap(),
        "--json",
    ]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let replaces = json["replaces"].as_array().unwrap();
    let price = replaces.iter().find(|r| r["name"] == "price").unwrap();
    let nothing = replaces.iter().find(|r| r["name"] == "nothing").unwrap();
    // An alias shares price's address: replacing one replaces both.
    let warnings = price["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("price_alias")),
        "{price}"
    );
    // `nothing` is a lone `ret`: too small for any jump, an error rather than a warning.
    assert_eq!(nothing["old_size"], 1, "{nothing}");
    assert_eq!(nothing["warnings"], serde_json::json!([]), "{nothing}");
    let errors = json["errors"].as_array().unwrap();
    assert!(
        errors.len() == 1 && errors[0].as_str().unwrap().contains("too small"),
        "{json}"
    );
    assert_eq!(json["adds"], serde_json::json!(["price_extra"]));
}

#[test]
fn against_a_running_process_uses_its_addresses_and_libraries() {
    let dir = support::scratch("inspect-pid");
    let mut fx = support::Fixture::start(&dir, &support::cargo_bin("busy_target"), &["1"], &[]);
    let patch = support::cc_object(
        &dir,
        "compute",
        r#"
#include <unistd.h>
unsigned long dsu_fixture_compute(unsigned long x) { return x * 10 + (getpid() < 0); }
"#,
        &[],
    );
    let pid = fx.pid.to_string();
    let out = inspect(&[patch.to_str().unwrap(), "--against", &pid, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &json["replaces"][0];
    assert_eq!(r["name"], "dsu_fixture_compute");
    assert_eq!(
        r["address"].as_str().unwrap(),
        format!("{:#x}", fx.address("compute")),
        "the run-time address, load bias applied"
    );
    let getpid = &json["needs"][0];
    assert_eq!(getpid["name"], "getpid");
    assert!(
        getpid["resolves_to"].as_str().unwrap().contains("libc.so"),
        "{getpid}"
    );
    // Nothing was sent to the process: it still computes the old value.
    assert_eq!(fx.compute(), 8);
}

#[test]
fn unresolved_symbols_make_it_fail_after_the_report() {
    let dir = support::scratch("inspect-unresolved");
    let (exe, _) = build(&dir);
    let patch = support::cc_object(
        &dir,
        "bad",
        "long no_such_thing(long);\nlong price(long q) { return no_such_thing(q); }\n",
        &[],
    );
    let out = inspect(&[patch.to_str().unwrap(), "--against", exe.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("unresolved: no_such_thing"),
        "{}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("1 problem"), "{err}");
}

#[test]
fn without_a_target_it_lists_what_the_patch_holds() {
    let dir = support::scratch("inspect-alone");
    let (_, patch) = build(&dir);
    let out = inspect(&[patch.to_str().unwrap()]);
    assert!(out.status.success());
    let report = text(&out);
    assert!(
        report.contains("replaces 3:"),
        "global functions are candidates: {report}"
    );
    assert!(report.contains("\n  base_price\n"), "{report}");
    assert!(report.contains("\n  counter\n"), "{report}");
}

#[test]
fn an_invalid_patch_is_refused_with_the_reason() {
    let dir = support::scratch("inspect-invalid");
    let (exe, _) = build(&dir);
    let out = inspect(&[exe.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a relocatable object"), "{err}");
    let src = dir.join("shop.c");
    let out = inspect(&[src.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "not ELF: refused before reading further"
    );
}
