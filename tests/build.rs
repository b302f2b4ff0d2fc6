//! `dsu build`: from two versions of a C source file to a patch applied in a running program,
//! with no hand-written patch file. The program is linked from the original object itself
//! (`-O2 -ffunction-sections -fdata-sections`) and made patchable with
//! `LD_PRELOAD=libdsu_agent.so`. Needs the workspace built first
//! (`cargo build --workspace --all-targets`).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{Fixture, cargo_bin, dsu, run, scratch};

/// The program's flags; the objects given to `dsu build` are compiled with exactly these.
const FLAGS: [&str; 4] = ["-O2", "-g", "-ffunction-sections", "-fdata-sections"];

/// The rest of the program: answers one line per command on stdin.
const MAIN_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
long price(long qty);
long tick(void);
long scaled(long x);
long checkout(long total);
const char *grade(long x);
long audited(long x);
int main(void) {
    printf("ready %d\naddresses price=%p\n", (int)getpid(), (void *)price);
    fflush(stdout);
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        char cmd[32] = "";
        long n = 0;
        sscanf(line, "%31s %ld", cmd, &n);
        if (!strcmp(cmd, "price")) printf("price %ld\n", price(n));
        else if (!strcmp(cmd, "tick")) printf("tick %ld\n", tick());
        else if (!strcmp(cmd, "scaled")) printf("scaled %ld\n", scaled(n));
        else if (!strcmp(cmd, "checkout")) printf("checkout %ld\n", checkout(n));
        else if (!strcmp(cmd, "grade")) printf("grade %s\n", grade(n));
#ifdef WITH_AUDIT
        else if (!strcmp(cmd, "audit")) printf("audit %ld\n", audited(n));
#endif
        else printf("unknown %s\n", cmd);
        fflush(stdout);
    }
    return 0;
}
"#;

/// The file that gets fixed. Each `@NAME@` line is replaced by its original or fixed version.
const SHOP_C: &str = r#"
/* A helper that no fix changes: the patch calls the program's. */
static __attribute__((noinline)) long margin(long qty) { return qty / 4 + 1; }
@price@
/* A counter whose value must survive the update. */
@tick@
/* Called with a constant: gcc makes scale.constprop.0, which `scaled` calls. */
@scale@
long scaled(long x) { return scale(x, 3); }
/* noipa: keeps the signature as written, so the fix changes it. */
@discount@
@grade@
@table@
"#;

/// audit.c, a file of its own: a quick test before a long body, which gcc splits off as
/// `audit.part.0` (partial inlining) for `audit` and `audited` to call. The fix changes the
/// quick test's bound (`@bound@`); the body split off stays the same.
const AUDIT_C: &str = r#"
#include <stdio.h>
long audit_total;
long audit(long x) {
    if (__builtin_expect(x < @bound@, 1)) return x + 1;
    char buf[64];
    long r = 0;
    for (int i = 0; i < 8; i++) {
        snprintf(buf, sizeof buf, "%ld-%d", x, i);
        r += buf[0] + buf[1] * i;
        if (r > 1000000) puts("large");
    }
    audit_total += r;
    return 1000 + x;
}
long audited(long x) { return audit(x); }
"#;

/// (name, original, fixed)
const PARTS: [(&str, &str, &str); 6] = [
    (
        "price",
        "long price(long qty) { return qty * 10 + margin(qty); }",
        "long price(long qty) { return qty * 9 + margin(qty); }",
    ),
    (
        "tick",
        "long tick(void) { static long count; count++; return count; }",
        "long tick(void) { static long count; count++; return count + 1000; }",
    ),
    (
        "scale",
        "static __attribute__((noinline)) long scale(long x, long k) { return x * k + 1; }",
        "static __attribute__((noinline)) long scale(long x, long k) { return x * k + 2; }",
    ),
    (
        "discount",
        "static __attribute__((noinline, noipa)) long discount(long total) { return total / 10; }\n\
         long checkout(long total) { return total - discount(total); }",
        "static __attribute__((noinline, noipa)) long discount(long total, long pct) { return total * pct / 100; }\n\
         long checkout(long total) { return total - discount(total, total > 100 ? 20 : 10); }",
    ),
    (
        "grade",
        "const char *grade(long x) { return x > 10 ? \"big\" : \"small\"; }",
        "const char *grade(long x) { return x > 10 ? \"large\" : \"small\"; }",
    ),
    (
        "table",
        "long table[4] = {1, 2, 3, 4};",
        "long table[5] = {1, 2, 3, 4, 5};",
    ),
];

/// shop.c with the parts named in `fixed` fixed.
fn shop(fixed: &[&str]) -> String {
    let mut text = SHOP_C.to_string();
    for (name, original, new) in PARTS {
        let part = if fixed.contains(&name) { new } else { original };
        text = text.replace(&format!("@{name}@"), part);
    }
    text
}

/// Compiles `source` as `DIR/SUB/shop.c` to `DIR/SUB/shop.o` with the program's flags plus
/// `extra`; the same file name in both versions, as in a real source tree.
fn object(dir: &Path, sub: &str, source: &str, extra: &[&str]) -> PathBuf {
    object_named(dir, sub, "shop.c", source, extra)
}

/// Compiles `source` as `DIR/SUB/FILE` to the object of that name (`.o`) with the program's
/// flags plus `extra`.
fn object_named(dir: &Path, sub: &str, file: &str, source: &str, extra: &[&str]) -> PathBuf {
    let sub = dir.join(sub);
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(sub.join(file), source).unwrap();
    let out = Path::new(file).with_extension("o");
    run(Command::new("cc")
        .current_dir(&sub)
        .arg("-c")
        .args(FLAGS)
        .args(extra)
        .arg(file)
        .arg("-o")
        .arg(&out));
    sub.join(out)
}

/// `main` (as `DIR/main.c`) linked with `objects` into `DIR/NAME` with the program's flags
/// plus `extra`.
fn link(dir: &Path, name: &str, main: &str, objects: &[&Path], extra: &[&str]) -> PathBuf {
    let main_c = dir.join("main.c");
    std::fs::write(&main_c, main).unwrap();
    let exe = dir.join(name);
    run(Command::new("cc")
        .args(FLAGS)
        .args(extra)
        .arg("-o")
        .arg(&exe)
        .arg(&main_c)
        .args(objects));
    exe
}

/// `exe` started with the agent preloaded.
fn preloaded(dir: &Path, exe: &Path) -> Fixture {
    let library = cargo_bin("libdsu_agent.so");
    Fixture::start(dir, exe, &[], &[("LD_PRELOAD", &library)])
}

/// The program linked from `main.c` and the original object, started with the agent
/// preloaded. Returns it with ORIGINAL.o.
fn start(dir: &Path) -> (Fixture, PathBuf) {
    let original = object(dir, "orig", &shop(&[]), &[]);
    let exe = link(dir, "shop", MAIN_C, &[&original], &[]);
    (preloaded(dir, &exe), original)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `dsu build ORIGINAL FIXED -o PATCH`, which must succeed; returns its summary.
fn build(original: &Path, fixed: &Path, patch: &Path) -> String {
    build_with(original, fixed, patch, &[])
}

fn build_with(original: &Path, fixed: &Path, patch: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "build",
        original.to_str().unwrap(),
        fixed.to_str().unwrap(),
        "-o",
        patch.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = dsu(&args);
    assert!(
        out.status.success(),
        "dsu build failed ({}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `dsu build` that must be refused with exit 1 and one `dsu: ` line; returns that line.
fn build_refused(original: &Path, fixed: &Path, dir: &Path) -> String {
    build_refused_with(original, fixed, dir, &[])
}

fn build_refused_with(original: &Path, fixed: &Path, dir: &Path, extra: &[&str]) -> String {
    let patch = dir.join("refused.o");
    let mut args = vec![
        "build",
        original.to_str().unwrap(),
        fixed.to_str().unwrap(),
        "-o",
        patch.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = dsu(&args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}{}", text(&out.stdout));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("dsu: "), "{stderr}");
    assert!(!patch.exists(), "a refused build wrote {}", patch.display());
    stderr.trim_end().to_string()
}

fn apply(fx: &Fixture, patch: &Path) -> Output {
    dsu(&["apply", "-p", &fx.pid.to_string(), patch.to_str().unwrap()])
}

fn applied(fx: &Fixture, patch: &Path) {
    let out = apply(fx, patch);
    assert!(
        out.status.success(),
        "dsu apply {} failed: {}\nprocess log:\n{}",
        patch.display(),
        text(&out.stderr),
        fx.log()
    );
}

/// FDEs in the patch's `.eh_frame`: the unwind tables of its functions.
fn unwind_entries(patch: &Path) -> usize {
    use object::{Object, ObjectSection};
    let bytes = std::fs::read(patch).unwrap();
    let file = object::File::parse(&*bytes).unwrap();
    let Some(section) = file.section_by_name(".eh_frame") else {
        return 0;
    };
    let data = section.data().unwrap();
    let word = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
    let (mut at, mut fdes) = (0, 0);
    while at + 8 <= data.len() && word(at) != 0 {
        fdes += usize::from(word(at + 4) != 0);
        at += 4 + word(at);
    }
    fdes
}

/// Lines of the summary between `title N:` and the next title.
fn listed(summary: &str, title: &str) -> Vec<String> {
    summary
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{title} ")))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.trim().to_string())
        .collect()
}

/// Another file of the program with `static`s named like shop.c's: a `margin` helper and a
/// static local `count` (`count.0` in both objects).
const OTHER_C: &str = r#"
static __attribute__((noinline)) long margin(long qty) { return qty * 1000; }
long other(long x) { static long count; count += x; return margin(count); }
"#;

#[test]
fn statics_named_alike_in_two_files_are_told_apart_by_their_file() {
    let dir = scratch("build-two-files");
    let original = object(&dir, "orig", &shop(&[]), &[]);
    let other = object_named(&dir, "other", "other.c", OTHER_C, &[]);
    let exe = link(&dir, "shop", MAIN_C, &[&original, &other], &[]);
    let symbols = run(Command::new("nm").arg(&exe));
    assert_eq!(symbols.matches(" margin\n").count(), 2, "{symbols}");
    assert_eq!(symbols.matches(" count.0\n").count(), 2, "{symbols}");
    let mut fx = preloaded(&dir, &exe);

    let fixed = object(&dir, "fixed", &shop(&["price", "tick"]), &[]);
    let patch = dir.join("fix.o");
    let summary = build(&original, &fixed, &patch);
    let kept = listed(&summary, "references kept");
    assert!(
        kept.contains(&"margin (static in shop.c)".to_string())
            && kept.contains(&"count.0 (static in shop.c)".to_string()),
        "{summary}"
    );
    fx.expect("tick", "tick 1");
    fx.expect("price 8", "price 83");
    applied(&fx, &patch);
    // shop.c's margin (8 / 4 + 1), not other.c's (8 * 1000); shop.c's counter goes on.
    fx.expect("price 8", "price 75");
    fx.expect("tick", "tick 1002");
}

#[test]
fn a_fix_calling_an_unchanged_static_helper_uses_the_programs_helper() {
    let dir = scratch("build-helper");
    let (mut fx, original) = start(&dir);
    let fixed = object(&dir, "fixed", &shop(&["price"]), &[]);
    let patch = dir.join("fix.o");
    // Checked against the running program: its `price` is ORIGINAL.o's.
    let summary = build_with(
        &original,
        &fixed,
        &patch,
        &["--against", &fx.pid.to_string()],
    );
    assert!(summary.contains("matches "), "{summary}");
    assert!(summary.contains("bound: 1 function "), "{summary}");
    // Bound as `dsu pack` binds: the program's build id and price's code hash.
    use object::{Object, ObjectSection};
    let bytes = std::fs::read(&patch).unwrap();
    let object = object::File::parse(&*bytes).unwrap();
    let expect = object
        .section_by_name(".dsu.expect")
        .expect("no .dsu.expect section");
    let text = String::from_utf8(expect.data().unwrap().to_vec()).unwrap();
    assert!(text.contains("price"), "{text}");
    assert_eq!(listed(&summary, "changed"), ["price"], "{summary}");
    assert_eq!(
        listed(&summary, "references kept"),
        ["margin (static in shop.c)"],
        "{summary}"
    );

    fx.expect("price 8", "price 83");
    applied(&fx, &patch);
    fx.expect("price 8", "price 75");
    fx.expect("scaled 5", "scaled 16");
}

#[test]
fn a_static_local_counter_keeps_counting_across_the_update() {
    let dir = scratch("build-counter");
    let (mut fx, original) = start(&dir);
    let fixed = object(&dir, "fixed", &shop(&["tick"]), &[]);
    let patch = dir.join("fix.o");
    let summary = build(&original, &fixed, &patch);
    assert_eq!(listed(&summary, "changed"), ["tick"], "{summary}");
    assert!(
        listed(&summary, "references kept").contains(&"count.0 (static in shop.c)".to_string()),
        "{summary}"
    );

    for n in 1..=3 {
        fx.expect("tick", &format!("tick {n}"));
    }
    // The naive patch, FIXED.o itself, brings a counter of its own that starts again at 0:
    // what the check below tells apart.
    applied(&fx, &fixed);
    fx.expect("tick", "tick 1001");
    let out = dsu(&["revert", "-p", &fx.pid.to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    fx.expect("tick", "tick 4");

    applied(&fx, &patch);
    fx.expect("tick", "tick 1005");
    fx.expect("tick", "tick 1006");
}

/// A fix of `audit`'s quick test leaves the body gcc split off (`audit.part.0`) as it was.
/// Built against the process, the patch vouches for that clone (its build id and code hash):
/// the apply takes it for what the fixed build runs, not for a stale copy, and the program
/// runs the fix. `dsu pack` binds it again. Without `--against` nothing vouches for it: the
/// apply is refused naming the clone, as `dsu inspect` says; a voucher whose hash does not
/// match the program's clone is refused naming the clone.
#[test]
fn an_unchanged_clone_of_a_fixed_function_is_vouched_for_by_a_build_against_the_process() {
    let dir = scratch("build-unchanged-clone");
    let audit = |bound: &str| AUDIT_C.replace("@bound@", bound);
    let original = object_named(&dir, "orig", "audit.c", &audit("100"), &[]);
    let fixed = object_named(&dir, "fixed", "audit.c", &audit("50"), &[]);
    let shop_o = object(&dir, "shop-src", &shop(&[]), &[]);
    let exe = link(
        &dir,
        "shop",
        MAIN_C,
        &[&shop_o, &original],
        &["-DWITH_AUDIT"],
    );
    let mut fx = preloaded(&dir, &exe);
    let pid = fx.pid.to_string();

    // Unbound: refused, naming the clone and what to do, nothing changed.
    let unbound = dir.join("unbound.o");
    let summary = build(&original, &fixed, &unbound);
    assert_eq!(
        listed(&summary, "unchanged clones"),
        ["audit.part.0 (static in audit.c)"],
        "{summary}"
    );
    let inspected = dsu(&["inspect", unbound.to_str().unwrap(), "--against", &pid]);
    assert!(
        text(&inspected.stdout).contains("compiler clones in")
            && text(&inspected.stdout).contains("(audit.part.0)"),
        "{inspected:?}"
    );
    let out = apply(&fx, &unbound);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("that the patch does not replace (audit.part.0)")
            && stderr.contains("dsu build --against"),
        "{stderr}"
    );
    fx.expect("audit 60", "audit 61");

    // A voucher that does not match the program's clone: refused, naming it.
    let bound = dir.join("fix.o");
    let summary = build_with(&original, &fixed, &bound, &["--against", &pid]);
    assert!(
        summary.contains("bound: 2 functions and 1 unchanged clone"),
        "{summary}"
    );
    let inspected = dsu(&["inspect", bound.to_str().unwrap(), "--against", &pid]);
    assert!(
        inspected.status.success() && !text(&inspected.stdout).contains("compiler clones"),
        "{inspected:?}"
    );
    let mut bytes = std::fs::read(&bound).unwrap();
    let line = text(&bytes)
        .lines()
        .find(|l| l.starts_with("unchanged audit.part.0 "))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no voucher for audit.part.0 in {}", bound.display()));
    let hash = line.split(' ').nth(3).unwrap().to_owned();
    let at = bytes
        .windows(hash.len())
        .position(|w| w == hash.as_bytes())
        .unwrap();
    bytes[at..at + hash.len()].fill(b'0');
    let forged = dir.join("forged.o");
    std::fs::write(&forged, &bytes).unwrap();
    let out = apply(&fx, &forged);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the original code of audit.part.0") && stderr.contains("differs"),
        "{stderr}"
    );
    fx.expect("audit 60", "audit 61");

    // Vouched for: applied, and every caller runs the fix.
    applied(&fx, &bound);
    fx.expect("audit 60", "audit 1060");
    fx.expect("audit 150", "audit 1150");
    fx.expect("audit 7", "audit 8");
    let packed = dir.join("packed.o");
    let out = dsu(&[
        "pack",
        bound.to_str().unwrap(),
        "--against",
        &pid,
        "-o",
        packed.to_str().unwrap(),
    ]);
    assert!(
        text(&out.stdout).contains("audit.part.0 (unchanged clone): ")
            && text(&out.stdout).contains("1 unchanged clone vouched for"),
        "{out:?}"
    );
}

#[test]
fn a_fix_of_a_function_reaches_its_constprop_clone() {
    let dir = scratch("build-clone");
    let (mut fx, original) = start(&dir);
    let fixed = object(&dir, "fixed", &shop(&["scale"]), &[]);
    let patch = dir.join("fix.o");
    let summary = build(&original, &fixed, &patch);
    // `scaled` calls the clone and did not change: the fix reaches it only through the clone.
    assert_eq!(
        listed(&summary, "clones"),
        ["scale.constprop.0 (static in shop.c)"],
        "{summary}"
    );
    assert_eq!(
        listed(&summary, "changed"),
        Vec::<String>::new(),
        "{summary}"
    );

    fx.expect("scaled 5", "scaled 16");
    applied(&fx, &patch);
    fx.expect("scaled 5", "scaled 17");
    fx.expect("price 8", "price 83");
}

#[test]
fn a_static_function_changes_its_signature_with_its_only_caller() {
    let dir = scratch("build-signature");
    let (mut fx, original) = start(&dir);
    let fixed = object(&dir, "fixed", &shop(&["discount", "grade"]), &[]);
    let patch = dir.join("fix.o");
    let summary = build(&original, &fixed, &patch);
    assert_eq!(
        listed(&summary, "changed"),
        ["checkout", "discount (static in shop.c)", "grade"],
        "{summary}"
    );
    assert_eq!(unwind_entries(&patch), 3, "one FDE per function");

    fx.expect("checkout 200", "checkout 180");
    fx.expect("grade 20", "grade big");
    applied(&fx, &patch);
    fx.expect("checkout 200", "checkout 160");
    fx.expect("checkout 50", "checkout 45");
    // A new string literal, carried in the patch.
    fx.expect("grade 20", "grade large");
    fx.expect("grade 1", "grade small");
}

#[test]
fn a_changed_data_size_is_refused_naming_the_variable() {
    let dir = scratch("build-data");
    let original = object(&dir, "orig", &shop(&[]), &[]);
    let fixed = object(&dir, "fixed", &shop(&["price", "table"]), &[]);
    let line = build_refused(&original, &fixed, &dir);
    assert!(
        line.contains("size of table changed from 32 to 40 bytes"),
        "{line}"
    );
}

#[test]
fn a_program_built_from_other_sources_is_refused_against_its_binary() {
    let dir = scratch("build-against");
    let original = object(&dir, "orig", &shop(&[]), &[]);
    let fixed = object(&dir, "fixed", &shop(&["price"]), &[]);
    // The program's price differs from ORIGINAL.o's (another multiplier).
    let other = shop(&[]).replace("qty * 10", "qty * 11");
    let other = object(&dir, "other", &other, &[]);
    let exe = link(&dir, "shop", MAIN_C, &[&other], &[]);
    let line = build_refused_with(
        &original,
        &fixed,
        &dir,
        &["--against", exe.to_str().unwrap()],
    );
    assert!(
        line.contains("price in ") && line.contains("is not the code ORIGINAL.o has"),
        "{line}"
    );
}

#[test]
fn lto_objects_are_refused() {
    let dir = scratch("build-lto");
    let original = object(&dir, "orig", &shop(&[]), &["-flto"]);
    let fixed = object(&dir, "fixed", &shop(&["price"]), &["-flto"]);
    let line = build_refused(&original, &fixed, &dir);
    assert!(line.contains("compile this file without -flto"), "{line}");
}

#[test]
fn objects_without_function_sections_are_refused() {
    let dir = scratch("build-sections");
    let original = object(&dir, "orig", &shop(&[]), &["-fno-function-sections"]);
    let fixed = object(
        &dir,
        "fixed",
        &shop(&["price"]),
        &["-fno-function-sections"],
    );
    let line = build_refused(&original, &fixed, &dir);
    assert!(line.contains("-ffunction-sections"), "{line}");
}

#[test]
fn unreadable_inputs_are_usage_errors() {
    let dir = scratch("build-usage");
    let not_elf = dir.join("shop.c");
    std::fs::write(&not_elf, shop(&[])).unwrap();
    let original = object(&dir, "orig", &shop(&[]), &[]);
    let out = dsu(&[
        "build",
        original.to_str().unwrap(),
        not_elf.to_str().unwrap(),
        "-o",
        dir.join("fix.o").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("FIXED.o"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn objects_compiled_with_different_flags_are_refused() {
    let dir = scratch("build-flags");
    let original = object(&dir, "orig", &shop(&[]), &[]);
    let fixed = object(&dir, "fixed", &shop(&["price"]), &["-O1"]);
    let line = build_refused(&original, &fixed, &dir);
    assert!(
        line.contains("compiled with different flags") && line.contains("-O1"),
        "{line}"
    );
}

/// The program of the split-function tests: `check` (from check.c) on each line's number.
const CHECK_MAIN: &str = r#"
#include <stdio.h>
#include <unistd.h>
long check(long x);
const char *last = "none";
void report(const char *what) { last = what; }
long work(long x) { return x + 1; }
int main(void) {
    printf("ready %d\naddresses check=%p\n", (int)getpid(), (void *)check);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        long n = 0;
        sscanf(line, "%*s %ld", &n);
        long r = check(n);
        printf("check %ld %s\n", r, last);
        fflush(stdout);
    }
    return 0;
}
"#;

/// check.c: gcc splits `check` into its hot part and `check.cold` (the rare path, from the
/// cold call), which jumps back into the hot part for the multiplication.
const CHECK_C: &str = r#"
extern void report(const char *what) __attribute__((cold));
extern long work(long);
long check(long x) {
    long r = work(x);
    if (r > 1000) {
        report("@WHAT@");
        r = work(r) + 7;
    }
    return r * @FACTOR@;
}
"#;

/// check.c as the program was built (`big`, factor 2) and as fixed, and the program started
/// with the agent preloaded.
fn start_check(dir: &Path, what: &str, factor: &str) -> (Fixture, PathBuf, PathBuf) {
    let source =
        |what: &str, factor: &str| CHECK_C.replace("@WHAT@", what).replace("@FACTOR@", factor);
    let original = object_named(dir, "orig", "check.c", &source("big", "2"), &[]);
    let fixed = object_named(dir, "fixed", "check.c", &source(what, factor), &[]);
    let exe = link(dir, "check", CHECK_MAIN, &[&original], &[]);
    (preloaded(dir, &exe), original, fixed)
}

/// Builds the fix of check.c (`what`, factor 3), checks that `check.cold` goes into the patch
/// with `check`, applies it and checks that the rare path takes it: `check 2000` gives `rare`.
fn split_fix_reaches_the_rare_path(name: &str, what: &str, rare: &str) {
    let dir = scratch(name);
    let (mut fx, original, fixed) = start_check(&dir, what, "3");
    let patch = dir.join("fix.o");
    let summary = build(&original, &fixed, &patch);
    assert_eq!(listed(&summary, "changed"), ["check"], "{summary}");
    assert_eq!(
        listed(&summary, "clones"),
        ["check.cold (static in check.c)"],
        "{summary}"
    );
    assert!(
        !listed(&summary, "references kept").contains(&"check.cold (static in check.c)".into()),
        "{summary}"
    );
    fx.expect("check 5", "check 12 none");
    fx.expect("check 2000", "check 4018 big");
    applied(&fx, &patch);
    fx.expect("check 5", "check 18 big");
    fx.expect("check 2000", rare);
}

/// A function split by gcc into `check` and `check.cold` (a cold call on a rare path): both
/// parts change, both are replaced, and the rare path takes the new cold code.
#[test]
fn a_fix_of_a_split_function_replaces_its_cold_part() {
    split_fix_reaches_the_rare_path("build-cold", "too big", "check 6027 too big");
}

/// A fix of the hot part only: `check.cold` is the same bytes in both objects, but it jumps
/// back into the hot part's body, which changed. Kept as the program's, it would bring the
/// rare path back into the old hot part (the old factor: `check 4018`); it goes into the
/// patch instead, tied to the new body, and the rare path takes the fix too.
#[test]
fn a_cold_part_that_jumps_back_into_a_fixed_body_goes_with_it() {
    split_fix_reaches_the_rare_path("build-cold-tied", "big", "check 6027 big");
}

/// lines.c: `fee` takes the fix; `below` asserts further down the file, so a fix that adds a
/// line above moves the `__LINE__` it reports; `rate` passes a constant (an immediate, like a
/// line number) that a fix may change: as built, 10, its own line.
const LINES_C: &str = r#"
void report_line(int line);
void report_rate(int rate);
#define CHECK(c) do { if (!(c)) report_line(__LINE__); } while (0)
long fee(long x) {
    long f = x / 10;@extra@
    return f;
}
long rate(long x) { CHECK(x < 100000);
    if (x == 7) report_rate(@rate@); return x * 2; }
long below(long x) {
    CHECK(x < 1000);
    return x + 1;
}
"#;

/// The program of `LINES_C`: `below N` prints below's result and the line it reported.
const LINES_MAIN: &str = r#"
#include <stdio.h>
#include <unistd.h>
long fee(long x);
long below(long x);
static int reported;
void report_line(int line) { reported = line; }
void report_rate(int rate) { reported = -rate; }
int main(void) {
    printf("ready %d\naddresses fee=%p\n", (int)getpid(), (void *)fee);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        long n = 0;
        char cmd[16] = "";
        sscanf(line, "%15s %ld", cmd, &n);
        if (cmd[0] == 'f') printf("fee %ld\n", fee(n));
        else { long r = below(n); printf("below %ld line %d\n", r, reported); }
        fflush(stdout);
    }
    return 0;
}
"#;

/// A fix that adds a line moves the `__LINE__` of the assertions below it: `below` then
/// differs only in the line it reports, which `.debug_line` confirms, so it stays the
/// program's (it reports the program's own line) and the patch holds `fee` alone. A constant
/// the fix changes below is a change (`rate`), and without line tables (`-g0`) the line
/// numbers count as changes too.
#[test]
fn functions_that_differ_only_in_line_numbers_are_not_replaced() {
    let dir = scratch("build-lines");
    let source =
        |extra: &str, rate: &str| LINES_C.replace("@extra@", extra).replace("@rate@", rate);
    let original = object_named(&dir, "orig", "lines.c", &source("", "10"), &[]);
    let fixed = object_named(
        &dir,
        "fixed",
        "lines.c",
        &source("\n    f += 1;", "10"),
        &[],
    );
    let summary = build(&original, &fixed, &dir.join("fix.o"));
    assert_eq!(listed(&summary, "changed"), ["fee"], "{summary}");
    assert_eq!(
        listed(&summary, "line numbers only"),
        ["below", "rate"],
        "{summary}"
    );

    // The same fix, with a constant changed below it: one that was its own line as built.
    let rated = object_named(&dir, "rated", "lines.c", &source("\n    f += 1;", "5"), &[]);
    let summary = build(&original, &rated, &dir.join("rated.o"));
    assert_eq!(listed(&summary, "changed"), ["fee", "rate"], "{summary}");
    assert_eq!(
        listed(&summary, "line numbers only"),
        ["below"],
        "{summary}"
    );

    // No line tables: compared byte for byte.
    let bare = |sub: &str, source: &str| object_named(&dir, sub, "lines.c", source, &["-g0"]);
    let summary = build(
        &bare("orig-bare", &source("", "10")),
        &bare("fixed-bare", &source("\n    f += 1;", "10")),
        &dir.join("bare.o"),
    );
    assert_eq!(
        listed(&summary, "changed"),
        ["below", "fee", "rate"],
        "{summary}"
    );

    // Applied: `fee` takes the fix, `below` is the program's and reports its own line.
    let exe = link(&dir, "lines", LINES_MAIN, &[&original], &[]);
    let mut fx = preloaded(&dir, &exe);
    let patch = dir.join("bound.o");
    let summary = build_with(
        &original,
        &fixed,
        &patch,
        &["--against", &fx.pid.to_string()],
    );
    assert!(summary.contains("bound: 1 function "), "{summary}");
    fx.expect("below 5000", "below 5001 line 12");
    fx.expect("fee 50", "fee 5");
    applied(&fx, &patch);
    fx.expect("fee 50", "fee 6");
    fx.expect("below 7000", "below 7001 line 12");
}
