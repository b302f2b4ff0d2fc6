//! The update's own ground: the code that stops threads, holds them and writes code runs on
//! nothing a patch can replace. Same-behaviour replacements of libc's `syscall` and
//! `pwrite64`, written in place over the originals (one byte longer at the start, so every
//! instruction after it moves), apply and revert while threads are parked and the agent
//! writes code: before, parked threads slept inside libc's `syscall()` and the agent wrote
//! through libc's `pwrite64`, and both returned into rewritten bytes (the process died).
//! The agent's own functions are refused as targets, with the reason.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::{Fixture, ORIGINAL, cargo_bin, cc_object, cc_program, finish, scratch};

const BUSY_C: &str = include_str!("fixtures/busy.c");
const LIBC_SAME: &str = include_str!("fixtures/libc_same.c");

const C_X10: &str = "
unsigned long dsu_fixture_compute(unsigned long x) { return x * 10; }
";

fn busy_preloaded(dir: &Path) -> Fixture {
    let library = cargo_bin("libdsu_agent.so");
    let program = cc_program(dir, "busy_plain", &[("busy.c", BUSY_C)], &["-pthread"]);
    Fixture::start(dir, &program, &["3"], &[("LD_PRELOAD", &library)])
}

fn dsu(fx: &Fixture, args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_dsu"))
        .arg(args[0])
        .args(["-p", &fx.pid.to_string()])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dsu");
    finish(child, Duration::from_secs(30))
}

fn succeeds(fx: &mut Fixture, args: &[&str]) -> String {
    let out = dsu(fx, args);
    let state = fx.state();
    assert!(
        out.status.success(),
        "dsu {args:?} failed: {}\nalive: {state}\nprocess log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        fx.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn libc_syscall_and_pwrite64_are_replaced_in_place_safely() {
    let dir = scratch("own-ground-libc");
    let libc_patch = cc_object(&dir, "libc_same", LIBC_SAME, &[]);
    let x10 = cc_object(&dir, "x10", C_X10, &[]);
    let mut fx = busy_preloaded(&dir);
    assert_eq!(fx.compute(), ORIGINAL);

    let applied = succeeds(&mut fx, &["apply", libc_patch.to_str().unwrap()]);
    assert!(
        applied.contains("syscall") && applied.contains("in-place"),
        "expected syscall replaced in place: {applied}"
    );
    // Updates now stop threads and write code with the new libc code in place.
    for _ in 0..5 {
        succeeds(&mut fx, &["apply", x10.to_str().unwrap()]);
        assert_eq!(fx.compute(), 70);
        fx.workers_see(70);
        succeeds(&mut fx, &["revert"]);
        assert_eq!(fx.compute(), ORIGINAL);
    }
    succeeds(&mut fx, &["revert"]);
    assert_eq!(fx.compute(), ORIGINAL);
    fx.no_worker_errors();
    assert!(fx.alive());
}

#[test]
fn the_agents_own_functions_are_refused() {
    let dir = scratch("own-ground-agent");
    let mut fx = busy_preloaded(&dir);
    // By name, and any function of the agent's library (`LD_PRELOAD`).
    for name in ["dsu_install", "dsu_stack_forget"] {
        refused_as_agent_code(&dir, &mut fx, name);
    }
}

/// The agent linked into the program (`libdsu_agent.a`): its Rust functions, and those of its
/// platform layer, are found by their mangled crate names in the program's own module.
#[test]
fn the_agents_own_functions_linked_into_the_program_are_refused() {
    let dir = scratch("own-ground-agent-linked");
    let program = support::busy_c_linked_program(&dir, "busy_linked");
    let mut fx = Fixture::start(&dir, &program, &["2"], &[]);
    let symbols = Command::new("nm")
        .arg("--defined-only")
        .arg(&program)
        .output()
        .unwrap();
    let symbols = String::from_utf8_lossy(&symbols.stdout);
    for crate_name in ["9dsu_agent", "7dsu_sys"] {
        // A plain C identifier (no `$` or `.`), so that a C patch can define it.
        let name = symbols
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2))
            .find(|n| {
                n.starts_with(&format!("_ZN{crate_name}"))
                    && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
            .unwrap_or_else(|| panic!("no function of {crate_name} in the program"));
        refused_as_agent_code(&dir, &mut fx, name);
    }
}

/// A patch replacing `name` (a C function taking and returning nothing of note) is refused as
/// the agent's own code, and the program runs on unchanged.
fn refused_as_agent_code(dir: &Path, fx: &mut Fixture, name: &str) {
    let patch = cc_object(
        dir,
        name,
        &format!("int {name}(void) {{ return 0; }}\n"),
        &[],
    );
    let out = dsu(fx, &["apply", patch.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
    assert!(
        stderr.contains(name) && stderr.contains("part of the dsu agent"),
        "{name}: {stderr}"
    );
    assert_eq!(fx.compute(), ORIGINAL);
    assert!(fx.alive());
}

/// The function every thread made by Rust's `std` starts in, the agent's thread included
/// (its name mangled with the toolchain's hash, found in the program's symbols).
fn std_thread_start(program: &Path) -> String {
    let out = Command::new("nm")
        .arg("--defined-only")
        .arg(program)
        .output()
        .expect("run nm");
    let symbols = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = symbols
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|n| n.contains("3std") && n.ends_with("12thread_start"))
        .collect();
    assert_eq!(
        names.len(),
        1,
        "std's thread_start in {}: {names:?}",
        program.display()
    );
    names[0].to_string()
}

/// A function the agent thread itself runs in while it updates (here: std's thread start,
/// below the agent's loop on its stack) is refused, naming it, before any thread is stopped:
/// replaced in place, the agent thread would one day return into rewritten bytes.
#[test]
fn a_function_on_the_agent_threads_own_stack_is_refused() {
    let dir = scratch("own-ground-agent-stack");
    let program = cargo_bin("placement_target");
    let name = std_thread_start(&program);
    let patch = cc_object(
        &dir,
        "thread_start",
        &format!("void *{name}(void *main) {{ return main; }}\n"),
        &[],
    );
    let mut fx = Fixture::start(&dir, &program, &[], &[]);
    let small = fx.send("small");
    let out = dsu(&fx, &["apply", patch.to_str().unwrap(), "--timeout", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&name) && stderr.contains("agent thread's own stack"),
        "{stderr}"
    );
    assert_eq!(fx.send("small"), small, "{}", fx.log());
    assert!(fx.alive());
}

/// Larger than the original, so it lands in new code behind an entry jump, and the direct
/// calls of the workers' loops are rewritten to reach it.
const C_X10_REDIRECT: &str = "
unsigned long dsu_fixture_compute(unsigned long x) {
    __asm__ volatile(\".skip 48, 0x90\");
    return x * 10;
}
";

/// Direct call sites are rewritten while the threads that execute them keep running up to
/// the stop: the breakpoint goes on the call instruction's first byte, never into its
/// displacement (which would send a caller to a wrong address).
#[test]
fn call_sites_are_rewritten_under_running_callers() {
    let dir = scratch("own-ground-callsites");
    let patch = cc_object(&dir, "x10_redirect", C_X10_REDIRECT, &[]);
    let mut fx = busy_preloaded(&dir);
    for _ in 0..10 {
        let out = succeeds(&mut fx, &["apply", patch.to_str().unwrap()]);
        assert!(out.contains("redirect"), "{out}");
        assert_eq!(fx.compute(), 70);
        fx.workers_see(70);
        succeeds(&mut fx, &["revert"]);
        assert_eq!(fx.compute(), ORIGINAL);
        fx.workers_see(ORIGINAL);
    }
    fx.no_worker_errors();
    assert!(fx.alive());
}
