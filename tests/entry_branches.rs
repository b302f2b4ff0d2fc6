//! Branches into the bytes an entry jump overwrites, from outside the function's own body
//! (issue 10, item 4): from its split-off part `NAME.cold`, and through a jump table. Either
//! would send a thread into the middle of the jump after an update. `dsu apply` refuses both,
//! naming where the branch comes from, and leaves the code as it was; `dsu inspect --against`
//! warns the same.
//!
//! The program (`tests/fixtures/entry_branches.c`) is built with `cc` at test time and made
//! patchable with `LD_PRELOAD=libdsu_agent.so`. Needs the workspace built first
//! (`scripts/test.sh` does).

mod support;

use std::path::Path;

use support::{Fixture, cargo_bin, cc_object, cc_program, dsu, scratch};

const PROGRAM_C: &str = include_str!("fixtures/entry_branches.c");

/// Any size: a function with a split-off part never goes in place.
const COLD_FIX: &str = "long dsu_cold_target(long x) { return (x < 0 ? -x : x) + 100; }";

/// Longer than the old function, so it cannot go in place and needs an entry jump.
const TABLE_FIX: &str = "
long dsu_table_target(long x) {
    volatile long v[8];
    for (int i = 0; i < 8; i++) v[i] = x * i + (x >> i);
    return v[1] + v[3] + v[5] + v[7] + 100;
}
";

fn start(dir: &Path) -> Fixture {
    let program = cc_program(
        dir,
        "entry_branches",
        &[("entry_branches.c", PROGRAM_C)],
        &[],
    );
    let library = cargo_bin("libdsu_agent.so");
    Fixture::start(dir, &program, &[], &[("LD_PRELOAD", library.as_path())])
}

/// Applies `patch`, which must be refused with `expected` in the message, and checks that the
/// function's code and behaviour are unchanged.
fn refused(fx: &mut Fixture, function: &str, patch: &Path, expected: &[&str]) {
    let before = fx.code(function);
    let reply = fx.send(function);
    let out = dsu(&["apply", "-p", &fx.pid.to_string(), patch.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "apply was not refused: {out:?}");
    for text in expected {
        assert!(stderr.contains(text), "missing {text:?} in: {stderr}");
    }
    assert_eq!(
        fx.code(function),
        before,
        "a refused update changed the code"
    );
    assert_eq!(fx.send(function), reply);
    assert!(fx.alive(), "{}", fx.log());
}

#[test]
fn a_branch_back_from_a_cold_part_into_the_entry_bytes_is_refused() {
    let dir = scratch("entry-cold");
    let patch = cc_object(&dir, "cold_fix", COLD_FIX, &[]);
    let mut fx = start(&dir);
    assert_eq!(fx.send("cold"), "cold 6");
    let entry = fx.address("cold");
    let into = format!("branches to {:#x}", entry + 3);
    refused(
        &mut fx,
        "cold",
        &patch,
        &[
            "dsu_cold_target cannot take an entry jump",
            "in its split-off part dsu_cold_target.cold",
            &into,
            "inside the bytes the jump overwrites",
        ],
    );
}

#[test]
fn a_jump_table_entry_into_the_entry_bytes_is_refused() {
    let dir = scratch("entry-table");
    let patch = cc_object(&dir, "table_fix", TABLE_FIX, &[]);
    let mut fx = start(&dir);
    assert_eq!(fx.send("table"), "table 6");
    let entry = fx.address("table");
    let into = format!("leads to {:#x}", entry + 2);
    refused(
        &mut fx,
        "table",
        &patch,
        &[
            "dsu_table_target in ",
            "the jump table at ",
            "(used by the instruction at ",
            &into,
            "inside the bytes the jump overwrites",
        ],
    );
}

#[test]
fn inspect_against_the_binary_warns_about_both() {
    let dir = scratch("entry-inspect");
    let program = cc_program(
        &dir,
        "entry_branches",
        &[("entry_branches.c", PROGRAM_C)],
        &[],
    );
    let cold = cc_object(&dir, "cold_fix", COLD_FIX, &[]);
    let table = cc_object(&dir, "table_fix", TABLE_FIX, &[]);
    for (patch, expected) in [
        (&cold, "in its split-off part dsu_cold_target.cold"),
        (&table, "the jump table at "),
    ] {
        let out = dsu(&[
            "inspect",
            "--against",
            program.to_str().unwrap(),
            patch.to_str().unwrap(),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(expected),
            "{expected:?} not in: {stdout}{out:?}"
        );
    }
}
