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

/// A patch that calls libc, `strcasecmp` (an indirect function, IFUNC, in glibc) among them.
const LIBC_PATCH: &str = r#"
#include <stdio.h>
#include <string.h>
#include <strings.h>
long price(long qty) {
    char text[32];
    snprintf(text, sizeof text, "%ld", qty);
    printf("%s=%ld\n", text, qty);
    return (long)strlen(text) + (strcasecmp(text, "X") != 0);
}
"#;

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            text(out),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn need<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["needs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no need {name}: {json}"))
}

/// The file name of the module in a `"0x... in MODULE"` or a library path.
fn module_file(value: &Value) -> String {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"));
    let module = text.rsplit(" in ").next().unwrap();
    Path::new(module)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// `name`'s value in the dynamic symbol table of the ELF file at `path`.
fn dynamic_symbol(path: &Path, name: &str) -> u64 {
    use object::{Object, ObjectSymbol};
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    file.dynamic_symbols()
        .find(|s| s.name() == Ok(name) && !s.is_undefined())
        .unwrap_or_else(|| panic!("{name} not in {}", path.display()))
        .address()
}

fn hex(value: &Value) -> u64 {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"));
    let digits = text.split_whitespace().next().unwrap();
    u64::from_str_radix(digits.trim_start_matches("0x"), 16).unwrap()
}

#[test]
fn against_a_binary_libc_symbols_resolve_in_its_libc_and_an_ifunc_is_left_to_the_target() {
    let dir = support::scratch("inspect-libc");
    let (exe, _) = build(&dir);
    let patch = support::cc_object(&dir, "libc_fix", LIBC_PATCH, &[]);
    let out = inspect(&[patch.to_str().unwrap(), "--against", exe.to_str().unwrap()]);
    let report = text(&out);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("libc.so.6 -> /"), "{report}");
    assert!(
        report.contains("strcasecmp -> IFUNC in /"),
        "the IFUNC is named as one: {report}"
    );

    let out = inspect(&[
        patch.to_str().unwrap(),
        "--against",
        exe.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let json = json_of(&out);
    assert_eq!(json["unresolved"], serde_json::json!([]), "{json}");
    for name in ["printf", "snprintf"] {
        assert_eq!(
            module_file(&need(&json, name)["resolves_to"]),
            "libc.so.6",
            "{json}"
        );
    }
    let libc = json["libraries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "libc.so.6")
        .unwrap_or_else(|| panic!("libc is not among the libraries: {json}"));
    // printf is at libc's synthetic base plus its link-time address: an address of the report,
    // not of any process.
    let libc_path = Path::new(libc["path"].as_str().unwrap());
    let base = hex(&libc["base"]);
    assert_eq!(
        hex(&need(&json, "printf")["resolves_to"]),
        base + dynamic_symbol(libc_path, "printf")
    );
    // The IFUNC: no address that would be the implementation (dsu's process would pick one
    // for its own CPU), only the resolver, labelled.
    let strcasecmp = need(&json, "strcasecmp");
    assert!(strcasecmp.get("resolves_to").is_none(), "{strcasecmp}");
    let indirect = &strcasecmp["indirect"];
    assert_eq!(
        module_file(&indirect["module"]),
        "libc.so.6",
        "{strcasecmp}"
    );
    assert_eq!(
        hex(&indirect["resolver"]),
        base + dynamic_symbol(libc_path, "strcasecmp")
    );
    assert!(
        indirect["resolved"]
            .as_str()
            .unwrap()
            .contains("when the patch is applied"),
        "{strcasecmp}"
    );
}

/// A library `libshop.so` with one function, `shop_rate`, built in `dir/lib`.
fn shop_library(dir: &Path, lib: &str) -> std::path::PathBuf {
    let libdir = dir.join(lib);
    std::fs::create_dir_all(&libdir).unwrap();
    let src = dir.join("shop_lib.c");
    std::fs::write(&src, "long shop_rate(long q) { return q * 7; }\n").unwrap();
    support::run(
        Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-Wl,-soname,libshop.so", "-o"])
            .arg(libdir.join("libshop.so"))
            .arg(&src),
    );
    libdir
}

/// A program in `dir` that calls `shop_rate` of `libshop.so` in `libdir`, linked with `flags`.
fn shop_program(dir: &Path, name: &str, libdir: &Path, flags: &[&str]) -> std::path::PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(
        &src,
        "#include <stdio.h>\nlong shop_rate(long);\n\
         __attribute__((noinline)) long price(long q) { return shop_rate(q) + 1; }\n\
         int main(int argc, char **argv) { (void)argv; printf(\"%ld\\n\", price(argc)); return 0; }\n",
    )
    .unwrap();
    let exe = dir.join(name);
    support::run(
        Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&exe)
            .arg(&src)
            .arg("-L")
            .arg(libdir)
            .args(flags)
            .arg("-lshop"),
    );
    exe
}

const SHOP_PATCH: &str = r#"
#include <stdio.h>
long shop_rate(long);
long price(long q) { printf("pricing %ld\n", q); return shop_rate(q) + 2; }
"#;

#[test]
fn a_library_is_found_through_origin_in_runpath_and_rpath() {
    let dir = support::scratch("inspect-origin");
    let libdir = shop_library(&dir, "lib");
    let patch = support::cc_object(&dir, "shop_fix", SHOP_PATCH, &[]);
    for (name, tags) in [
        ("runpath", "-Wl,--enable-new-dtags"),
        ("rpath", "-Wl,--disable-new-dtags"),
    ] {
        let exe = shop_program(&dir, name, &libdir, &[tags, "-Wl,-rpath,$ORIGIN/lib"]);
        // Run from elsewhere: `$ORIGIN` is the binary's directory, not the current one.
        let out = Command::new(support::cargo_bin("dsu"))
            .args(["inspect", patch.to_str().unwrap(), "--json", "--against"])
            .arg(&exe)
            .current_dir(std::env::temp_dir())
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", text(&out));
        let json = json_of(&out);
        let rate = need(&json, "shop_rate")["resolves_to"].as_str().unwrap();
        assert!(
            rate.ends_with(&format!(" in {}/lib/libshop.so", dir.display())),
            "{name}: {json}"
        );
        assert_eq!(
            module_file(&need(&json, "printf")["resolves_to"]),
            "libc.so.6",
            "{name}: {json}"
        );
        assert_eq!(json["warnings"], serde_json::json!([]), "{name}: {json}");
    }
}

#[test]
fn a_missing_library_is_named_with_the_directories_searched() {
    let dir = support::scratch("inspect-missing");
    let libdir = shop_library(&dir, "gone");
    let exe = shop_program(&dir, "orphan", &libdir, &["-Wl,-rpath,$ORIGIN/nowhere"]);
    std::fs::remove_dir_all(&libdir).unwrap();
    let patch = support::cc_object(&dir, "shop_fix", SHOP_PATCH, &[]);
    let out = Command::new(support::cargo_bin("dsu"))
        .args(["inspect", patch.to_str().unwrap(), "--against"])
        .arg(&exe)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let report = text(&out);
    // The report comes out, libc still resolves, only the missing library's name does not.
    assert_eq!(out.status.code(), Some(1), "{report}");
    let warning = report
        .lines()
        .find(|l| l.starts_with("warning: library libshop.so "))
        .unwrap_or_else(|| panic!("no warning naming libshop.so: {report}"));
    assert!(
        warning.contains(&format!("(needed by {})", exe.display())),
        "{warning}"
    );
    assert!(
        warning.contains(&format!("{}/nowhere", dir.display())),
        "the expanded $ORIGIN directory is among those searched: {warning}"
    );
    assert!(warning.contains("/usr/lib"), "{warning}");
    assert!(report.contains("unresolved: shop_rate"), "{report}");
    assert!(report.contains("printf -> 0x"), "{report}");

    // Through LD_LIBRARY_PATH of the dsu process, as the loader would find it.
    let elsewhere = shop_library(&dir, "elsewhere");
    let out = Command::new(support::cargo_bin("dsu"))
        .args(["inspect", patch.to_str().unwrap(), "--against"])
        .arg(&exe)
        .env("LD_LIBRARY_PATH", &elsewhere)
        .output()
        .unwrap();
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains(&format!("in {}/libshop.so", elsewhere.display())),
        "{report}"
    );
    assert!(!report.contains("warning:"), "{report}");
}

#[test]
fn against_a_running_process_an_ifunc_is_what_the_process_itself_bound() {
    let dir = support::scratch("inspect-ifunc-pid");
    // Prints the address it uses for strcasecmp (its GOT holds what its loader picked), then
    // waits. It may be read by a sibling process (Yama's ptrace scope).
    let program = support::cc_program(
        &dir,
        "caseless",
        &[(
            "caseless.c",
            r#"
#include <stdio.h>
#include <strings.h>
#include <sys/prctl.h>
#include <unistd.h>
int main(void) {
    prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
    printf("ready %d\naddresses strcasecmp=%p\n", (int)getpid(), (void *)strcasecmp);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        printf("%d\n", strcasecmp(line, "X\n"));
        fflush(stdout);
    }
    return 0;
}
"#,
        )],
        &[],
    );
    let fx = support::Fixture::start(&dir, &program, &[], &[]);
    let patch = support::cc_object(
        &dir,
        "caseless_fix",
        "#include <strings.h>\nint main(void) { return strcasecmp(\"a\", \"A\"); }\n",
        &[],
    );
    let pid = fx.pid.to_string();
    let out = inspect(&[patch.to_str().unwrap(), "--against", &pid, "--json"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let json = json_of(&out);
    let strcasecmp = need(&json, "strcasecmp");
    assert_eq!(
        hex(&strcasecmp["resolves_to"]),
        fx.address("strcasecmp") as u64,
        "the process's own implementation, not one dsu's process would pick: {strcasecmp}"
    );
    assert_eq!(module_file(&strcasecmp["resolves_to"]), "libc.so.6");
    assert!(
        strcasecmp["indirect"]["resolver"].is_string(),
        "{strcasecmp}"
    );
}

#[test]
fn a_reader_that_goes_away_ends_the_report_quietly() {
    // `dsu inspect PATCH | head -1`: the reader closes the pipe before the report is written.
    let dir = support::scratch("inspect-pipe");
    let (_, patch) = build(&dir);
    let mut child = Command::new(support::cargo_bin("dsu"))
        .args(["inspect", patch.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(stderr.is_empty(), "{stderr}");
}
