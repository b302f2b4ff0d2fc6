//! A patch names the `static` symbols of one source file of the program (its `.dsu.scope`
//! section, which `dsu build` writes): two files of the program each have a `static` helper
//! and a static local counter of the same names, and the patch reaches exactly the one of the
//! file it was built from, for a reference and for a replacement, so the counter's state
//! survives the update.
//!
//! The program is built with `cc -O2` at test time and made patchable with
//! `LD_PRELOAD=libdsu_agent.so`. Needs the workspace built first (`scripts/test.sh` does).

mod support;

use support::{Fixture, cargo_bin, cc_object, cc_program, dsu, scratch};

/// Each file: a `static` helper and a function with a static local counter, both named alike
/// in the two files (`helper`, `count.0`).
const SHAPES_C: &str = r#"
__attribute__((noinline, noipa)) static int helper(int x) { return x + 1; }
__attribute__((noinline, noipa)) int area(int x) { return helper(x) * 10; }
__attribute__((noinline, noipa)) int shapes_tick(void) { static int count; return ++count; }
"#;

const COLORS_C: &str = r#"
__attribute__((noinline, noipa)) static int helper(int x) { return x + 2; }
__attribute__((noinline, noipa)) int hue(int x) { return helper(x) * 100; }
__attribute__((noinline, noipa)) int colors_tick(void) { static int count = 500; return ++count; }
"#;

const MAIN_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
int area(int), hue(int), shapes_tick(void), colors_tick(void);
int main(void) {
    printf("ready %d\naddresses area=%p\n", (int)getpid(), (void *)area);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        int s = shapes_tick(), c = colors_tick();
        printf("area %d hue %d ticks %d %d\n", area(7), hue(7), s, c);
        fflush(stdout);
    }
    return 0;
}
"#;

/// `section` records for the patch's `.dsu.scope`.
fn scoped(source: &str, records: &[(&str, &str)]) -> String {
    let mut asm = String::from(".section .dsu.scope,\\\"\\\",@progbits\\n");
    for (name, file) in records {
        asm.push_str(&format!(".asciz \\\"{name}\\\"\\n.asciz \\\"{file}\\\"\\n"));
    }
    asm.push_str(".previous\\n");
    format!("{source}\n__asm__(\"{asm}\");\n")
}

/// The fixed `area`, calling the program's own `helper` of shapes.c, and `shapes_tick`
/// counting by ten on the program's own counter of shapes.c.
const AREA_FIX: &str = r#"
int helper(int x);
extern int count_0 __asm__("count.0");
int area(int x) { return helper(x) * 10 + 3; }
int shapes_tick(void) { count_0 += 10; return count_0; }
"#;

/// The fixed `helper` of colors.c, a `static` function of the program.
const HELPER_FIX: &str = "int helper(int x) { return x + 5; }\n";

fn start(dir: &std::path::Path) -> (Fixture, std::path::PathBuf) {
    let program = cc_program(
        dir,
        "shop",
        &[
            ("main.c", MAIN_C),
            ("shapes.c", SHAPES_C),
            ("colors.c", COLORS_C),
        ],
        &[],
    );
    let library = cargo_bin("libdsu_agent.so");
    let fx = Fixture::start(dir, &program, &[], &[("LD_PRELOAD", library.as_path())]);
    (fx, program)
}

#[test]
fn a_scoped_patch_reaches_the_statics_of_its_own_file_and_keeps_their_state() {
    let dir = scratch("scope");
    let (mut fx, program) = start(&dir);
    assert_eq!(fx.send("go"), "area 80 hue 900 ticks 1 501");
    assert_eq!(fx.send("go"), "area 80 hue 900 ticks 2 502");
    let pid = fx.pid.to_string();

    // Unscoped, `helper` and `count.0` each name two statics: refused, the process unchanged.
    let unscoped = cc_object(&dir, "unscoped", AREA_FIX, &[]);
    let out = dsu(&["apply", "-p", &pid, unscoped.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains("ambiguous"), "{stderr}");
    assert_eq!(fx.send("go"), "area 80 hue 900 ticks 3 503");

    // Scoped to shapes.c: shapes' helper and counter, which keeps its count.
    let fix = scoped(AREA_FIX, &[("helper", "shapes.c"), ("count.0", "shapes.c")]);
    let patch = cc_object(&dir, "area_fix", &fix, &[]);
    let out = dsu(&[
        "inspect",
        "--against",
        program.to_str().unwrap(),
        patch.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = dsu(&["apply", "-p", &pid, patch.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fx.send("go"), "area 83 hue 900 ticks 13 504");

    // A static function replaced: colors.c's helper only.
    let fix = scoped(HELPER_FIX, &[("helper", "colors.c")]);
    let patch = cc_object(&dir, "helper_fix", &fix, &[]);
    let out = dsu(&["apply", "-p", &pid, patch.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fx.send("go"), "area 83 hue 1200 ticks 23 505");

    let out = dsu(&["revert", "-p", &pid]);
    assert!(out.status.success(), "{out:?}");
    let out = dsu(&["revert", "-p", &pid]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fx.send("go"), "area 80 hue 900 ticks 24 506");
    assert!(fx.alive(), "{}", fx.log());
}

#[test]
fn a_scope_the_program_lacks_is_refused_naming_the_file() {
    let dir = scratch("scope-missing");
    let (mut fx, program) = start(&dir);
    let pid = fx.pid.to_string();
    let before = fx.code("area");

    let fix = scoped(AREA_FIX, &[("helper", "sizes.c"), ("count.0", "shapes.c")]);
    let patch = cc_object(&dir, "wrong_file", &fix, &[]);
    let out = dsu(&["apply", "-p", &pid, patch.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains("helper (static in sizes.c)"), "{stderr}");
    let out = dsu(&[
        "inspect",
        "--against",
        program.to_str().unwrap(),
        patch.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    let fix = scoped(HELPER_FIX, &[("helper", "sizes.c")]);
    let patch = cc_object(&dir, "wrong_static", &fix, &[]);
    let out = dsu(&["apply", "-p", &pid, patch.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains("static function helper of source file sizes.c"),
        "{stderr}"
    );
    assert_eq!(fx.code("area"), before, "the process is unchanged");
    assert_eq!(fx.send("go"), "area 80 hue 900 ticks 1 501");
}
