//! Patching functions that live outside the executable, and calls that cross modules: a
//! function of a shared library the program links, a hidden one the library calls directly,
//! an executable function the library calls, and functions of a library loaded by `dlopen`
//! after the agent's first update. Each is applied and reverted through `dsu`; what the
//! program computes, and every code byte of the functions and of the callers, is checked.
//!
//! The program (`tests/fixtures/modules.c`), its library (`modules_lib.c`) and the library it
//! loads later (`modules_late.c`) are built with `cc` at test time; the program is unmodified
//! and made patchable with `LD_PRELOAD=libdsu_agent.so`. Needs the workspace built first
//! (`scripts/test.sh` does).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{Fixture, cargo_bin, cc_object, cc_program, dsu, run, scratch};

const PROGRAM_C: &str = include_str!("fixtures/modules.c");
const LIBRARY_C: &str = include_str!("fixtures/modules_lib.c");
const LATE_C: &str = include_str!("fixtures/modules_late.c");

/// What the program answers before any patch.
const EXE_ORIGINAL: &str = "exe 8 8";
const LIB_ORIGINAL: &str = "lib 10 11";
const LATE_ORIGINAL: &str = "late 12 13";

/// Builds `source` into the shared library `dir/NAME`.
fn shared_library(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    let library = dir.join(name);
    std::fs::write(&src, source).unwrap();
    run(Command::new("cc")
        .args(["-shared", "-fPIC", "-O2"])
        .arg(format!("-Wl,-soname,{name}"))
        .arg("-o")
        .arg(&library)
        .arg(&src));
    library
}

/// Builds the program and both libraries in `dir` and starts the program under
/// `LD_PRELOAD=libdsu_agent.so`.
fn start(dir: &Path) -> Fixture {
    shared_library(dir, "libdsumod.so", LIBRARY_C);
    let late = shared_library(dir, "libdsulate.so", LATE_C);
    let search = format!("-L{}", dir.display());
    let rpath = format!("-Wl,-rpath,{}", dir.display());
    let program = cc_program(
        dir,
        "modules",
        &[("modules.c", PROGRAM_C)],
        &["-rdynamic", &search, "-ldsumod", &rpath, "-ldl"],
    );
    let agent = cargo_bin("libdsu_agent.so");
    let mut fx = Fixture::start(
        dir,
        &program,
        &[late.to_str().unwrap()],
        &[("LD_PRELOAD", agent.as_path())],
    );
    fx.expect("exe", EXE_ORIGINAL);
    fx.expect("lib", LIB_ORIGINAL);
    fx
}

/// `dsu COMMAND -p PID ARGS..`, which must succeed; its standard output.
fn dsu_ok(fx: &Fixture, command: &str, args: &[&str]) -> String {
    let pid = fx.pid.to_string();
    let mut all = vec![command, "-p", &pid];
    all.extend_from_slice(args);
    let out = dsu(&all);
    assert!(
        out.status.success(),
        "dsu {all:?} failed ({}): {}\nprocess log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        fx.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Applies `patch`; returns what `dsu apply` printed about the one function it replaced.
fn apply(fx: &Fixture, patch: &Path) -> String {
    let stdout = dsu_ok(fx, "apply", &[patch.to_str().unwrap()]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "one function and a summary: {stdout}");
    eprintln!("{}", lines[0]);
    lines[0].to_string()
}

/// A patch of `name`, in C, with a body larger than any of the fixtures' (a volatile local),
/// so that it is placed in new memory and callers are redirected to it.
fn larger_patch(dir: &Path, name: &str, factor: u64) -> PathBuf {
    let source = format!(
        "long {name}(long x) {{ volatile long k = {factor}; long r = x * k; k = r; return k; }}"
    );
    cc_object(dir, &format!("{name}_x{factor}"), &source, &[])
}

/// The code of each of `names` (as the program printed them), in one vector.
/// Sends `command`, which loads the late library, expects a reply starting with `prefix`, and
/// records the addresses it gives.
fn open_late(fx: &mut Fixture, command: &str, prefix: &str) {
    let reply = fx.send(command);
    let fields = reply
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{command}: {reply}"));
    for field in fields.split_whitespace() {
        let (name, value) = field.split_once('=').unwrap();
        let address = usize::from_str_radix(value.trim_start_matches("0x"), 16).unwrap();
        fx.addresses.insert(name.to_string(), address);
    }
}

fn codes(fx: &Fixture, names: &[&str]) -> Vec<Vec<u8>> {
    names.iter().map(|n| fx.code(n)).collect()
}

#[test]
fn a_function_of_a_linked_library_is_patched_and_reverted() {
    let dir = scratch("modules-library");
    let patch = cc_object(
        &dir,
        "lib_x20",
        "long dsu_lib_compute(long x) { return x * 20; }",
        &[],
    );
    let mut fx = start(&dir);
    let original = codes(&fx, &["lib", "lib_inner", "lib_calls_inner"]);

    let line = apply(&fx, &patch);
    assert!(
        line.starts_with("dsu_lib_compute (") && line.contains("libdsumod.so"),
        "not the library's function: {line}"
    );
    // Called from the executable through its PLT.
    fx.expect("lib", "lib 140 11");
    fx.expect("exe", EXE_ORIGINAL);
    assert_ne!(fx.code("lib"), original[0]);

    dsu_ok(&fx, "revert", &[]);
    fx.expect("lib", LIB_ORIGINAL);
    assert_eq!(
        codes(&fx, &["lib", "lib_inner", "lib_calls_inner"]),
        original
    );
    assert!(fx.alive(), "{}", fx.log());
}

#[test]
fn calls_from_another_module_reach_the_new_code_and_the_old_after_revert() {
    let dir = scratch("modules-calls");
    let inner = larger_patch(&dir, "dsu_lib_inner", 30);
    let exe = larger_patch(&dir, "dsu_exe_compute", 10);
    let mut fx = start(&dir);
    let names = ["exe", "lib", "lib_inner", "lib_calls_inner"];
    let original = codes(&fx, &names);

    // A hidden function of the library, called by a direct `call` inside the library.
    let line = apply(&fx, &inner);
    assert!(
        line.starts_with("dsu_lib_inner (") && line.contains("libdsumod.so"),
        "{line}"
    );
    // Placed in new memory, and the library's call now goes straight there: the revert has a
    // call site in the library to put back.
    assert!(line.contains("redirect, 1 call site rewritten"), "{line}");
    assert_ne!(fx.code("lib_calls_inner"), original[3]);
    fx.expect("lib", "lib 10 210");
    dsu_ok(&fx, "revert", &[]);
    fx.expect("lib", LIB_ORIGINAL);
    assert_eq!(
        codes(&fx, &names),
        original,
        "not restored after the revert"
    );

    // The executable's function, called by main directly and by the library through its PLT.
    let line = apply(&fx, &exe);
    assert!(line.starts_with("dsu_exe_compute ("), "{line}");
    fx.expect("exe", "exe 70 70");
    fx.expect("lib", LIB_ORIGINAL);
    dsu_ok(&fx, "revert", &[]);
    fx.expect("exe", EXE_ORIGINAL);
    assert_eq!(
        codes(&fx, &names),
        original,
        "not restored after the revert"
    );

    // Both at once, reverted newest first.
    apply(&fx, &exe);
    apply(&fx, &inner);
    fx.expect("exe", "exe 70 70");
    fx.expect("lib", "lib 10 210");
    dsu_ok(&fx, "revert", &[]);
    fx.expect("lib", LIB_ORIGINAL);
    fx.expect("exe", "exe 70 70");
    dsu_ok(&fx, "revert", &[]);
    fx.expect("exe", EXE_ORIGINAL);
    assert_eq!(
        codes(&fx, &names),
        original,
        "not restored after the reverts"
    );
    assert!(fx.alive(), "{}", fx.log());
}

#[test]
fn functions_of_a_library_loaded_by_dlopen_after_an_update_are_patched_and_reverted() {
    let dir = scratch("modules-dlopen");
    let exe = larger_patch(&dir, "dsu_exe_compute", 10);
    let late = cc_object(
        &dir,
        "late_x40",
        "long dsu_late_compute(long x) { return x * 40; }",
        &[],
    );
    let late_inner = larger_patch(&dir, "dsu_late_inner", 50);
    let mut fx = start(&dir);

    // An update before the library is loaded: the agent has indexed the modules of the time.
    apply(&fx, &exe);
    fx.expect("exe", "exe 70 70");

    open_late(&mut fx, "dlopen", "opened ");
    fx.expect("late", LATE_ORIGINAL);
    let names = ["late", "late_inner", "late_calls_inner"];
    let original = codes(&fx, &names);

    let line = apply(&fx, &late);
    assert!(
        line.starts_with("dsu_late_compute (") && line.contains("libdsulate.so"),
        "{line}"
    );
    fx.expect("late", "late 280 13");
    let line = apply(&fx, &late_inner);
    assert!(
        line.starts_with("dsu_late_inner (") && line.contains("libdsulate.so"),
        "{line}"
    );
    assert!(line.contains("redirect, 1 call site rewritten"), "{line}");
    fx.expect("late", "late 280 350");

    dsu_ok(&fx, "revert", &[]);
    fx.expect("late", "late 280 13");
    dsu_ok(&fx, "revert", &[]);
    fx.expect("late", LATE_ORIGINAL);
    assert_eq!(
        codes(&fx, &names),
        original,
        "not restored after the reverts"
    );
    fx.expect("exe", "exe 70 70");
    dsu_ok(&fx, "revert", &[]);
    fx.expect("exe", EXE_ORIGINAL);
    assert!(fx.alive(), "{}", fx.log());
}

/// The references an update takes on loaded libraries, to read their unwind tables safely, are
/// given back once it is over: a library the program then closes is unloaded, as it would be
/// without the agent.
#[test]
fn a_library_the_program_closes_after_an_update_is_unloaded() {
    let dir = scratch("modules-dlclose");
    let exe = larger_patch(&dir, "dsu_exe_compute", 10);
    let mut fx = start(&dir);
    let reply = fx.send("dlopen");
    assert!(reply.starts_with("opened "), "dlopen: {reply}");

    // The update checks every thread against every loaded module, the late library included.
    apply(&fx, &exe);
    fx.expect("exe", "exe 70 70");
    fx.expect("dlclose", "closed unloaded");
    dsu_ok(&fx, "revert", &[]);
    fx.expect("exe", EXE_ORIGINAL);
    assert!(fx.alive(), "{}", fx.log());
}

/// A library closed and loaded again at another address has its call sites found in its new
/// code: what the agent indexed of it before (now unmapped) is dropped with the module.
#[test]
fn a_library_loaded_again_elsewhere_has_its_call_sites_indexed_again() {
    let dir = scratch("modules-reopen");
    let late_inner = larger_patch(&dir, "dsu_late_inner", 50);
    let mut fx = start(&dir);
    open_late(&mut fx, "dlopen", "opened ");
    let before = fx.addresses["late_calls_inner"];

    // Patched and reverted once: the agent has indexed the library's call sites.
    let line = apply(&fx, &late_inner);
    assert!(line.contains("redirect, 1 call site rewritten"), "{line}");
    fx.expect("late", "late 12 350");
    dsu_ok(&fx, "revert", &[]);
    fx.expect("late", LATE_ORIGINAL);

    open_late(&mut fx, "reopen", "reopened moved ");
    assert_ne!(
        fx.addresses["late_calls_inner"], before,
        "loaded at the same place"
    );
    fx.expect("late", LATE_ORIGINAL);
    let names = ["late_inner", "late_calls_inner"];
    let original = codes(&fx, &names);
    let line = apply(&fx, &late_inner);
    assert!(line.contains("redirect, 1 call site rewritten"), "{line}");
    fx.expect("late", "late 12 350");
    dsu_ok(&fx, "revert", &[]);
    fx.expect("late", LATE_ORIGINAL);
    assert_eq!(
        codes(&fx, &names),
        original,
        "not restored after the revert"
    );
    assert!(fx.alive(), "{}", fx.log());
}
