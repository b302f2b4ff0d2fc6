//! A thread that waits inside a target where the survey cannot settle it from the kernel's
//! stack and instruction pointers alone: the update must not go ahead on a guess.
//!
//! - Under a frame whose caller cannot be found without the frame pointer (built without
//!   optimisation), the walk of the waiting thread's stack copy stops early; the conservative
//!   scan of the rest of the copy finds the target's return address, so the thread is stopped
//!   and checked from its registers, where the target is found active.
//! - The same with the target's frame beyond the part of the stack the agent copies.
//! - Interrupted inside the target by a signal whose handler waits: the signal frame's
//!   interrupted instruction lies in the target, and the thread is not held at one of the
//!   update's breakpoints, so it is active.
//! - Interrupted in a function the target called, by a handler on an alternate signal stack
//!   that waits under code without unwind information: the walk stops in the handler, and the
//!   scan must follow the signal frame it finds back to the thread's own stack, where the
//!   target's return address is.
//!
//!
//! Each case: the update is refused while the worker waits there, and applies once it left.
//! And the converse: a copy of an address inside the target kept as data in a waiting frame
//! of the program is not taken for a return address; the update applies while it waits.
//! The target is `tests/fixtures/unproven.c`, started with `LD_PRELOAD=libdsu_agent.so`,
//! patched with the real `dsu`.

mod support;

use std::path::Path;

use support::{C_X10, Fixture, ORIGINAL, cargo_bin, cc_object, cc_program, dsu, dsu_ok, scratch};

const UNPROVEN_C: &str = include_str!("fixtures/unproven.c");

fn start(dir: &Path) -> Fixture {
    start_with(dir, &[])
}

fn start_with(dir: &Path, env: &[(&str, &Path)]) -> Fixture {
    let library = cargo_bin("libdsu_agent.so");
    let program = cc_program(
        dir,
        "unproven",
        &[("unproven.c", UNPROVEN_C)],
        &["-pthread"],
    );
    let mut all = vec![("LD_PRELOAD", library.as_path())];
    all.extend_from_slice(env);
    Fixture::start(dir, &program, &[], &all)
}

/// Puts the worker inside the target with `enter` (answered `entered`), checks that `dsu
/// apply` is refused, naming the target, with nothing changed; lets it out with `leave`
/// (answered `left`) and checks that the same patch then applies.
fn refused_inside_then_applied(
    name: &str,
    (enter, entered): (&str, &str),
    (leave, left): (&str, &str),
) {
    let dir = scratch(name);
    let patch = cc_object(&dir, "c_x10", C_X10, &[]);
    let patch = patch.to_str().unwrap();
    let mut fx = start(&dir);
    fx.expect(enter, entered);

    let pid = fx.pid.to_string();
    let out = dsu(&["apply", "-p", &pid, patch, "--timeout", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "applied while the worker waits inside the target; process log:\n{}",
        fx.log()
    );
    assert!(stderr.contains("dsu_fixture_compute"), "{stderr}");
    assert_eq!(fx.compute(), ORIGINAL, "changed by a refused update");

    fx.expect(leave, left);
    dsu_ok(&fx, "apply", &[patch, "--timeout", "5"]);
    assert_eq!(fx.compute(), 70);
    assert!(fx.alive());
}

#[test]
fn a_waiting_thread_the_copy_cannot_walk_is_checked_from_its_registers() {
    refused_inside_then_applied(
        "unproven-frame-pointer",
        ("hold", "held"),
        ("release", "released"),
    );
}

/// As above, with the target's frame 700 KiB up the stack, beyond the 512 KiB the agent copies
/// of a waiting thread's stack: a walk that stops early on a copy cut short proves nothing.
#[test]
fn a_waiting_thread_whose_stack_outgrows_the_copy_is_checked_from_its_registers() {
    refused_inside_then_applied("unproven-deep", ("deep", "held"), ("release", "released"));
}

#[test]
fn a_handler_on_an_alternate_stack_without_unwind_tables_is_followed_back_to_the_target() {
    refused_inside_then_applied(
        "unproven-alternate-stack",
        ("nocfi", "interrupted"),
        ("resume", "resumed"),
    );
}

/// The converse: interrupted outside the target, the thread's own stack holds no frame of it,
/// and the scan that follows the signal frame there from the alternate stack finds none. The
/// same handler under the target ran first, so the stack below the live frames still holds a
/// dead return address into the target: the scan must start at the interrupted stack pointer.
#[test]
fn a_handler_on_an_alternate_stack_interrupting_other_code_does_not_hold_the_update() {
    let dir = scratch("unproven-alternate-outside");
    let patch = cc_object(&dir, "c_x10", C_X10, &[]);
    let patch = patch.to_str().unwrap();
    let mut fx = start(&dir);
    fx.expect("nocfi", "interrupted");
    fx.expect("resume", "resumed");
    fx.expect("outside", "interrupted");
    dsu_ok(&fx, "apply", &[patch, "--timeout", "2"]);
    assert_eq!(fx.compute(), 70);
    fx.expect("resume", "resumed");
    assert!(fx.alive());
}

#[test]
fn a_thread_interrupted_inside_the_target_by_a_waiting_handler_is_active() {
    refused_inside_then_applied(
        "unproven-signal-frame",
        ("spin", "interrupted"),
        ("resume", "resumed"),
    );
}

/// The walk of a waiting thread's copy proves it outside the target even when a frame of the
/// program holds a copy of an address just inside it: data, not a return address. Only the
/// conservative scan, meant for stacks the walk cannot follow, would take it for one (as it
/// does when the program's own unwind tables are left out of the check).
#[test]
fn a_target_address_kept_as_data_in_a_waiting_frame_does_not_hold_the_update() {
    let dir = scratch("unproven-stale-word");
    let patch = cc_object(&dir, "c_x10", C_X10, &[]);
    let patch = patch.to_str().unwrap();
    let mut fx = start(&dir);
    fx.expect("stale", "held");
    dsu_ok(&fx, "apply", &[patch, "--timeout", "2"]);
    assert_eq!(fx.compute(), 70);
    fx.expect("release", "released");
    assert!(fx.alive());
}

/// The main thread itself waits inside the target, under the -O0 frame, on both paths an update
/// can take: stopping only the threads that run, and parking every thread (the path under a
/// debugger, `DSU_TEST_STOP_ALL=1`), where the main thread must be parked and checked like
/// the others.
#[test]
fn the_main_thread_waiting_inside_the_target_holds_the_update_on_either_path() {
    for stop_all in ["0", "1"] {
        let dir = scratch(&format!("unproven-main-{stop_all}"));
        let patch = cc_object(&dir, "c_x10", C_X10, &[]);
        let patch = patch.to_str().unwrap();
        let mut fx = start_with(&dir, &[("DSU_TEST_STOP_ALL", Path::new(stop_all))]);
        fx.expect("mainhold", "holding");
        let pid = fx.pid.to_string();
        let out = dsu(&["apply", "-p", &pid, patch, "--timeout", "1"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "applied while the main thread waits inside the target (DSU_TEST_STOP_ALL={stop_all}); \
             process log:\n{}",
            fx.log()
        );
        assert!(stderr.contains("dsu_fixture_compute"), "{stderr}");
        // Answered once the main thread is back from its 4 s wait.
        assert_eq!(fx.compute(), ORIGINAL, "changed by a refused update");
        let out = dsu_ok(&fx, "apply", &[patch, "--timeout", "5"]);
        assert_eq!(
            out.contains(", every thread stopped"),
            stop_all == "1",
            "not the path asked for: {out}"
        );
        assert_eq!(fx.compute(), 70);
        assert!(fx.alive());
    }
}
