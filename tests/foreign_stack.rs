//! A thread caught running on a stack that is not its own shows that the program switches
//! stacks, even when nothing it imports gives that away (issue 10, item 3): without declared
//! stacks the update is refused, naming the thread; with the stack declared it goes through.
//!
//! The program (`tests/fixtures/own_switch.c`) moves a thread onto a stack it mapped itself,
//! by hand, and is made patchable with `LD_PRELOAD=libdsu_agent.so`. Needs the workspace built
//! first (`scripts/test.sh` does).

mod support;

use std::process::Output;

use support::{Fixture, ORIGINAL, cargo_bin, cc_object, cc_program, dsu, scratch};

const PROGRAM_C: &str = include_str!("fixtures/own_switch.c");
const C_X10: &str = "
#include <stdint.h>
uint64_t dsu_fixture_compute(uint64_t x) { return x * 10; }
";

fn apply(fx: &Fixture, patch: &std::path::Path) -> Output {
    let pid = fx.pid.to_string();
    dsu(&[
        "apply",
        "-p",
        &pid,
        "--timeout",
        "5",
        patch.to_str().unwrap(),
    ])
}

/// Asserts `out` is the refusal of an update over a thread on an undeclared stack, with the hint.
fn refused_as_foreign(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("runs on a stack that is not its own")
            && stderr.contains("dsu_stack_declare"),
        "{stderr}"
    );
}

fn start(dir: &std::path::Path, args: &[&str]) -> Fixture {
    start_with(dir, args, "0")
}

/// `stop_all`: `DSU_TEST_STOP_ALL`, "1" to park every thread (the path under a debugger).
fn start_with(dir: &std::path::Path, args: &[&str], stop_all: &str) -> Fixture {
    let program = cc_program(
        dir,
        "own_switch",
        &[("own_switch.c", PROGRAM_C)],
        &["-pthread", "-ldl"],
    );
    let library = cargo_bin("libdsu_agent.so");
    let env = [
        ("LD_PRELOAD", library.as_path()),
        ("DSU_TEST_STOP_ALL", std::path::Path::new(stop_all)),
    ];
    Fixture::start(dir, &program, args, &env)
}

/// Refused while the thread's stack is undeclared, nothing changed; applied once the program
/// declares it. `stop_all` as for [`start_with`]; `dsu`'s line says which path the update took.
fn refused_then_applied_once_declared(name: &str, stop_all: &str) {
    let dir = scratch(name);
    let patch = cc_object(&dir, "x10", C_X10, &[]);

    let mut fx = start_with(&dir, &[], stop_all);
    let before = fx.code("compute");
    refused_as_foreign(&apply(&fx, &patch));
    assert_eq!(fx.code_between_attempts("compute", &before), before);
    assert_eq!(fx.compute(), ORIGINAL);
    assert!(fx.alive(), "{}", fx.log());
    drop(fx);

    let mut fx = start_with(&dir, &["declare"], stop_all);
    let out = apply(&fx, &patch);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.contains(", every thread stopped"),
        stop_all == "1",
        "{stdout}"
    );
    assert_eq!(fx.compute(), 70);
    fx.workers_see(70);
    assert!(fx.alive(), "{}", fx.log());
}

#[test]
fn a_thread_on_a_stack_of_its_own_making_is_refused_unless_the_stack_is_declared() {
    refused_then_applied_once_declared("foreign-stack", "0");
}

/// The same thread with every thread parked (the path under a debugger): no breakpoint holds
/// it, so only its parked registers show the stack is not its own.
#[test]
fn a_parked_thread_on_a_stack_of_its_own_making_is_refused_unless_the_stack_is_declared() {
    refused_then_applied_once_declared("foreign-stack-parked", "1");
}

/// The main thread itself waits for its next command on a stack the program mapped: it is not
/// stopped (it waits in a system call), yet its stack is known, so the update sees it is not
/// on it and is refused the same way.
#[test]
fn a_main_thread_waiting_on_a_stack_of_its_own_making_is_refused() {
    let dir = scratch("foreign-stack-main");
    let patch = cc_object(&dir, "x10", C_X10, &[]);
    let mut fx = start(&dir, &["main"]);
    assert_eq!(fx.compute(), ORIGINAL);
    let before = fx.code("compute");
    refused_as_foreign(&apply(&fx, &patch));
    assert_eq!(fx.code("compute"), before);
    assert_eq!(fx.compute(), ORIGINAL);
    assert!(fx.alive(), "{}", fx.log());
}
