//! Updates of a process with many threads (64 and 256) that call the patched function: every
//! apply and revert goes through, and every thread, each keeping its own latest result, sees
//! the new version after the apply and the old one after the revert; none ever sees a result
//! no version gives; the code is restored byte for byte.
//!
//! The program (`tests/fixtures/many.c`) is built with `cc` at test time and made patchable
//! with `LD_PRELOAD=libdsu_agent.so`; its threads mostly wait in `nanosleep` and run in short
//! bursts, so an update meets both waiting and running threads. Needs the workspace built
//! first (`scripts/test.sh` does).

mod support;

use std::time::Instant;

use support::{Fixture, ORIGINAL, WAIT, cargo_bin, cc_object, cc_program, dsu, scratch};

const PROGRAM_C: &str = include_str!("fixtures/many.c");

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
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprint!("{stdout}");
    stdout
}

/// Waits until every one of the program's `threads` threads has `value` as its latest result.
fn all_see(fx: &mut Fixture, value: u64, threads: u32) {
    let all = format!("seen {threads} of {threads}");
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = fx.send(&format!("seen {value}"));
        if reply == all {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not every thread computed {value} within {WAIT:?}: {reply}; log:\n{}",
            fx.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Applies and reverts two patches in turn (one small enough to be written in place, one
/// placed in new memory) with `threads` threads calling the function, in `mode` (`idle`: they
/// mostly sleep; `busy`: they never sleep; `churn`: each round ends the thread and starts its
/// successor).
fn apply_and_revert_with(threads: u32, mode: &str) {
    apply_and_revert_in(threads, mode, Stop::Live);
}

/// How the updates stop threads: only those that run (the usual path), or every thread at
/// once (`DSU_TEST_STOP_ALL=1`: the path taken under a debugger).
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    Live,
    All,
}

fn apply_and_revert_in(threads: u32, mode: &str, stop: Stop) {
    let suffix = if stop == Stop::All { "-stop-all" } else { "" };
    let dir = scratch(&format!("many-{threads}-{mode}{suffix}"));
    let small = cc_object(
        &dir,
        "small",
        "unsigned long dsu_fixture_compute(unsigned long x) { return x * 10; }",
        &[],
    );
    let large = cc_object(
        &dir,
        "large",
        "unsigned long dsu_fixture_compute(unsigned long x) \
         { volatile unsigned long k = 10; unsigned long r = x * k; k = r; return k + 1; }",
        &[],
    );
    let program = cc_program(&dir, "many", &[("many.c", PROGRAM_C)], &["-pthread"]);
    let agent = cargo_bin("libdsu_agent.so");
    let mut fx = Fixture::start(
        &dir,
        &program,
        &[&threads.to_string(), mode],
        &[
            ("LD_PRELOAD", agent.as_path()),
            (
                "DSU_TEST_STOP_ALL",
                std::path::Path::new(if stop == Stop::All { "1" } else { "0" }),
            ),
        ],
    );
    let tasks = std::fs::read_dir(format!("/proc/{}/task", fx.pid))
        .unwrap()
        .count();
    assert!(
        tasks > threads as usize,
        "{tasks} threads in the process, expected more than {threads}"
    );
    let original = fx.code("compute");
    all_see(&mut fx, ORIGINAL, threads);
    let successors_before = successors(&mut fx);

    // `dsu` names the fallback path, so each test knows which path it ran.
    let path = |out: String| {
        let all = out.contains(", every thread stopped");
        assert_eq!(all, stop == Stop::All, "not the path asked for: {out}");
    };
    for (patch, value) in [(&small, 70), (&large, 71)] {
        path(dsu_ok(&fx, "apply", &[patch.to_str().unwrap()]));
        assert_eq!(fx.compute(), value);
        all_see(&mut fx, value, threads);
        assert_ne!(fx.code("compute"), original);

        path(dsu_ok(&fx, "revert", &[]));
        assert_eq!(fx.compute(), ORIGINAL);
        // Each thread had the new value; now each has the old one again, so each called
        // the function after the revert.
        all_see(&mut fx, ORIGINAL, threads);
        assert_eq!(fx.code("compute"), original, "not the original code");
    }
    if mode == "churn" {
        // Threads started and ended while every update ran, not only around them.
        let started = successors(&mut fx) - successors_before;
        assert!(
            started >= 4 * u64::from(threads),
            "only {started} threads started during the updates"
        );
    }
    no_errors(&mut fx);
}

/// Threads a thread started just before it exited (the churn mode's successors).
fn successors(fx: &mut Fixture) -> u64 {
    let reply = fx.send("successors");
    reply
        .strip_prefix("successors ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad reply to successors: {reply:?}"))
}

/// Asserts the threads ran and never saw a result no version gives.
fn no_errors(fx: &mut Fixture) {
    let reply = fx.send("errors");
    let fields: Vec<&str> = reply.split_whitespace().collect();
    let ["errors", errors, "calls", calls] = fields[..] else {
        panic!("bad reply to errors: {reply:?}")
    };
    assert_eq!(errors, "0", "impossible results; log:\n{}", fx.log());
    assert!(calls.parse::<u64>().unwrap() > 0, "the threads never ran");
    assert!(fx.alive(), "{}", fx.log());
}

#[test]
fn sixty_four_threads_all_see_each_apply_and_revert() {
    apply_and_revert_with(64, "idle");
}

#[test]
fn two_hundred_fifty_six_threads_all_see_each_apply_and_revert() {
    apply_and_revert_with(256, "idle");
}

/// 256 threads that never sleep: every one is runnable, so each update parks them all at once
/// (the stop's slots are sized for every thread of the process, not for the few that run).
#[test]
fn two_hundred_fifty_six_busy_threads_all_see_each_apply_and_revert() {
    apply_and_revert_with(256, "busy");
}

/// 64 threads that each start their successor and exit after every round: threads are created
/// and reaped throughout each stop, and the update must still account for all of them.
#[test]
fn sixty_four_threads_that_come_and_go_all_see_each_apply_and_revert() {
    apply_and_revert_with(64, "churn");
}

/// The same with every thread parked by each update, the path taken under a debugger: the
/// stop's slots must hold every thread of the process at once.
#[test]
fn two_hundred_fifty_six_busy_threads_with_every_thread_parked() {
    apply_and_revert_in(256, "busy", Stop::All);
}

/// Thread churn with every thread parked by each update: the stop lists the threads again
/// until no new one appears, and a thread exiting through the C library (every signal
/// blocked) that waits for a lock a parked thread holds makes the attempt give way and retry
/// instead of timing out.
#[test]
fn sixty_four_threads_that_come_and_go_with_every_thread_parked() {
    apply_and_revert_in(64, "churn", Stop::All);
}
