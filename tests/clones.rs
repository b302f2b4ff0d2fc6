//! Compiler clones (issue 12): the program, built with `-O3`, calls `dsu_scale` both directly
//! and through `dsu_scale.constprop.0`, a copy GCC specialised for `k = 3` that `dsu_fixed`
//! calls. A patch that replaces only `dsu_scale` would leave `dsu_fixed` on the old code:
//! `dsu apply` refuses it naming the clone and its caller, `dsu inspect` says the same, and
//! `--allow-stale-clones` applies it with a warning. A patch that replaces the clone too
//! reaches every caller.
//!
//! Needs the workspace built first (`scripts/test.sh` does).

mod support;

use support::{Fixture, cargo_bin, cc_object, cc_program, dsu, scratch};

const PROGRAM_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((noinline)) int dsu_scale(int x, int k) {
    int r = 0;
    for (int i = 0; i < k; i++) r += x ^ i;
    return r + 1;
}
__attribute__((noinline)) int dsu_fixed(int x) { return dsu_scale(x, 3); }
int main(int argc, char **argv) {
    (void)argv;
    printf("ready %d\naddresses fixed=%p\n", (int)getpid(), (void *)dsu_fixed);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        int v = 0, k = 0;
        if (sscanf(line, "%d %d", &v, &k) != 2) return 1;
        printf("fixed %d scale %d\n", dsu_fixed(v), dsu_scale(v, k + argc - 1));
        fflush(stdout);
    }
    return 0;
}
"#;

/// Only the general version.
const SCALE_FIX: &str = "
int dsu_scale(int x, int k) { return x * k + 1000; }
";

/// The general version and GCC's clone for k = 3 (which takes `x` only).
const SCALE_AND_CLONE_FIX: &str = r#"
int dsu_scale(int x, int k) { return x * k + 1000; }
int dsu_scale_k3(int x) __asm__("dsu_scale.constprop.0");
int dsu_scale_k3(int x) { return x * 3 + 1000; }
"#;

fn start(dir: &std::path::Path) -> (Fixture, std::path::PathBuf) {
    let program = cc_program(dir, "clones", &[("clones.c", PROGRAM_C)], &["-O3"]);
    let symbols = support::run(std::process::Command::new("nm").arg(&program));
    assert!(
        symbols.contains("dsu_scale.constprop.0"),
        "the compiler made no clone to test with:\n{symbols}"
    );
    let library = cargo_bin("libdsu_agent.so");
    let fx = Fixture::start(dir, &program, &[], &[("LD_PRELOAD", library.as_path())]);
    (fx, program)
}

#[test]
fn a_patch_that_misses_a_clone_is_refused_naming_it_and_its_callers() {
    let dir = scratch("clones-refused");
    let (mut fx, program) = start(&dir);
    // x ^ 0 + x ^ 1 + x ^ 2 + 1 = 7 + 6 + 5 + 1 for x = 7, k = 3.
    assert_eq!(fx.send("7 3"), "fixed 19 scale 19");
    let patch = cc_object(&dir, "scale", SCALE_FIX, &[]);
    let before = fx.code("fixed");

    let out = dsu(&[
        "inspect",
        "--against",
        program.to_str().unwrap(),
        patch.to_str().unwrap(),
    ]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        report.contains("dsu_scale has compiler clones")
            && report.contains("(dsu_scale.constprop.0)"),
        "{report}"
    );

    let pid = fx.pid.to_string();
    let out = dsu(&["apply", "-p", &pid, patch.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains("(dsu_scale.constprop.0), called from dsu_fixed")
            && stderr.contains("--allow-stale-clones"),
        "{stderr}"
    );
    assert_eq!(fx.send("7 3"), "fixed 19 scale 19", "nothing changed");
    assert_eq!(fx.code("fixed"), before);

    // Accepted: the direct callers get the fix, the clone's callers do not.
    let out = dsu(&[
        "apply",
        "-p",
        &pid,
        "--allow-stale-clones",
        patch.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stderr.contains("dsu: warning: dsu_scale has compiler clones"),
        "{stderr}"
    );
    assert_eq!(fx.send("7 3"), "fixed 19 scale 1021");
}

#[test]
fn a_patch_that_replaces_the_clone_too_reaches_every_caller() {
    let dir = scratch("clones-both");
    let (mut fx, program) = start(&dir);
    let patch = cc_object(&dir, "both", SCALE_AND_CLONE_FIX, &[]);
    let out = dsu(&[
        "inspect",
        "--against",
        program.to_str().unwrap(),
        patch.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let pid = fx.pid.to_string();
    let out = dsu(&["apply", "-p", &pid, patch.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    assert_eq!(fx.send("7 3"), "fixed 1021 scale 1021");
    let out = dsu(&["revert", "-p", &pid]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fx.send("7 3"), "fixed 19 scale 19");
}
