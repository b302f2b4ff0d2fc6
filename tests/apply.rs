//! Applying patches to real, busy processes, end to end: `examples/busy_target` (Rust, agent
//! installed by `dsu_agent::Builder`), `tests/fixtures/busy.c` linked with `libdsu_agent.a`
//! (agent installed by `dsu_install()`), and the same C program built without any dsu code and
//! started with `LD_PRELOAD=libdsu_agent.so`.
//!
//! Each program has worker threads calling `dsu_fixture_compute(7)` in tight loops and counting
//! results no version produces (`errors`). Patches are built at test time with `cc` and `rustc`
//! and applied through `dsu apply` and through the raw trigger (`<control dir>/patch` plus
//! `SIGUSR2`). Observations are the program's own answers over its stdin protocol and its code
//! bytes read through `/proc/PID/mem`.
//!
//! Needs the workspace built first (`cargo build --workspace --all-targets`, as
//! `scripts/test.sh` does) for `libdsu_agent.a` and `libdsu_agent.so`.

mod support;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use dsu_agent::report::{Outcome, Status};
use support::{
    Fixture, ORIGINAL, RUST_X10, RUST_X10_PLUS_1, WAIT, cargo_bin, cc_object, cc_program, finish,
    rustc_object, scratch,
};

const C_X10: &str = "
unsigned long dsu_fixture_compute(unsigned long x) { return x * 10; }
";

const C_X10_PLUS_1: &str = "
unsigned long dsu_fixture_compute(unsigned long x) { return x * 10 + 1; }
";

/// Two functions as one patch: `compute` (70) and a `block` that still reads its byte but
/// returns 100 more (`unblocked 101` instead of `unblocked 1`). Calls libc's `read`.
const C_BLOCK_AND_COMPUTE: &str = "
#include <unistd.h>
unsigned long dsu_fixture_compute(unsigned long x) { return x * 10; }
unsigned long dsu_fixture_block(int fd) {
    char byte = 0;
    long n = read(fd, &byte, 1);
    return (unsigned long)n + 100;
}
";

/// Two functions as one patch: `compute` (70) and a `spin` that returns 5 when released. It
/// keeps the fixtures' contract: mark the state inside (1), spin until it is stop (2).
const RUST_SPIN_AND_COMPUTE: &str = r#"
use std::sync::atomic::{AtomicU32, Ordering};

#[unsafe(no_mangle)]
pub extern "C" fn dsu_fixture_compute(x: u64) -> u64 {
    x * 10
}

#[unsafe(no_mangle)]
pub extern "C" fn dsu_fixture_spin(state: &AtomicU32) -> u64 {
    let _ = state.compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
    while state.load(Ordering::Relaxed) != 2 {
        std::hint::spin_loop();
    }
    5
}
"#;

/// Two functions as one patch, neither called by the workers: a `block` that returns 100 more
/// and a `spin` (fixtures' contract: mark the state inside, spin until stop) that returns 5.
const C_BLOCK_AND_SPIN: &str = "
#include <stdatomic.h>
#include <unistd.h>
unsigned long dsu_fixture_block(int fd) {
    char byte = 0;
    long n = read(fd, &byte, 1);
    return (unsigned long)n + 100;
}
unsigned long dsu_fixture_spin(atomic_uint *state) {
    unsigned starting = 0;
    atomic_compare_exchange_strong(state, &starting, 1);
    while (atomic_load_explicit(state, memory_order_relaxed) != 2) {
    }
    return 5;
}
";

/// Two functions as one patch, the second of which cannot be linked.
const C_UNRESOLVABLE: &str = "
unsigned long dsu_missing_helper_for_tests(int fd);
unsigned long dsu_fixture_compute(unsigned long x) { return x * 10; }
unsigned long dsu_fixture_block(int fd) { return dsu_missing_helper_for_tests(fd) + 1; }
";

const BUSY_C: &str = include_str!("fixtures/busy.c");

// ---- starting programs ----

fn busy_target(dir: &Path, workers: u32) -> Fixture {
    let program = cargo_bin("busy_target");
    Fixture::start(dir, &program, &[&workers.to_string()], &[])
}

/// `tests/fixtures/busy.c` linked with `libdsu_agent.a`, calling `dsu_install()` in `main`.
fn busy_c_linked(dir: &Path, workers: u32) -> Fixture {
    let program = support::busy_c_linked_program(dir, "busy_linked");
    Fixture::start(dir, &program, &[&workers.to_string()], &[])
}

/// `tests/fixtures/busy.c` built without any dsu code, started with
/// `LD_PRELOAD=libdsu_agent.so`.
fn busy_c_preloaded(dir: &Path, workers: u32) -> Fixture {
    let library = cargo_bin("libdsu_agent.so");
    let program = cc_program(dir, "busy_plain", &[("busy.c", BUSY_C)], &["-pthread"]);
    let symbols = Command::new("nm").arg(&program).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&symbols.stdout).contains("dsu_install"),
        "the unmodified program must not reference the agent"
    );
    Fixture::start(
        dir,
        &program,
        &[&workers.to_string()],
        &[("LD_PRELOAD", &library)],
    )
}

// ---- applying ----

/// Starts `dsu apply -p PID PATCH --timeout SECS` without waiting for it.
fn spawn_dsu_apply(fx: &Fixture, patch: &Path, timeout_secs: u32) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dsu"))
        .args(["apply", "-p", &fx.pid.to_string()])
        .arg(patch)
        .args(["--timeout", &timeout_secs.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dsu")
}

/// `dsu` is allowed its `--timeout`, plus the 2 s it waits beyond, plus slack for a loaded
/// machine.
fn dsu_limit(timeout_secs: u32) -> Duration {
    Duration::from_secs(u64::from(timeout_secs) + 2 + 5)
}

/// `dsu apply` that must succeed; returns its stdout.
fn dsu_apply(fx: &Fixture, patch: &Path) -> String {
    let out = finish(spawn_dsu_apply(fx, patch, 5), dsu_limit(5));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dsu apply {} failed ({}): {}\nstdout: {stdout}\nprocess log:\n{}",
        patch.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        fx.log()
    );
    stdout
}

/// `dsu apply` that must exit 1 with one `dsu: ` line on stderr; returns that line.
fn dsu_apply_refused(fx: &Fixture, patch: &Path, timeout_secs: u32) -> String {
    let out = finish(
        spawn_dsu_apply(fx, patch, timeout_secs),
        dsu_limit(timeout_secs),
    );
    refused_line(&out)
}

fn refused_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1; stderr: {stderr}; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(stderr.starts_with("dsu: "), "{stderr}");
    eprintln!("dsu apply answered: {stderr}");
    stderr.trim_end().to_string()
}

/// The `seq` of the agent's last answer, 0 before any.
fn last_seq(fx: &Fixture) -> u64 {
    read_result(fx).map_or(0, |o| o.seq)
}

fn read_result(fx: &Fixture) -> Option<Outcome> {
    let text = fs::read_to_string(fx.control.join("result.json")).ok()?;
    Some(serde_json::from_str(&text).expect("result.json is an Outcome"))
}

/// The raw trigger, as an operator does it: write the patch beside, rename it to `patch`,
/// send `SIGUSR2`.
fn place_and_signal(fx: &Fixture, bytes: &[u8]) {
    let staging = fx.control.join(".patch.staging");
    fs::write(&staging, bytes).unwrap();
    fs::rename(&staging, fx.control.join("patch")).unwrap();
    signal(fx, libc::SIGUSR2);
}

fn signal(fx: &Fixture, sig: i32) {
    // SAFETY: kill takes plain integers; the pid is our own child, alive until dropped.
    assert_eq!(unsafe { libc::kill(fx.pid as libc::pid_t, sig) }, 0);
}

/// Waits for the answer numbered `seq` in `result.json`.
fn wait_result(fx: &Fixture, seq: u64, limit: Duration) -> Outcome {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(outcome) = read_result(fx).filter(|o| o.seq >= seq) {
            assert_eq!(outcome.seq, seq, "an answer was skipped or doubled");
            return outcome;
        }
        assert!(
            Instant::now() < deadline,
            "no result {seq} within {limit:?}; process log:\n{}",
            fx.log()
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// The raw trigger with `patch`; returns the agent's answer. The agent's default policy
/// allows 5 s of retries, so the answer comes within that plus slack.
fn raw_trigger(fx: &Fixture, patch: &Path) -> Outcome {
    let seq = last_seq(fx) + 1;
    place_and_signal(fx, &fs::read(patch).unwrap());
    let outcome = wait_result(fx, seq, WAIT);
    eprintln!(
        "raw trigger {seq}: {:?} {:?}",
        outcome.outcome, outcome.error
    );
    assert_eq!(outcome.request, None, "a raw trigger has no request id");
    assert_eq!(outcome.op, "apply");
    outcome
}

fn raw_trigger_applied(fx: &Fixture, patch: &Path) -> Outcome {
    let outcome = raw_trigger(fx, patch);
    assert_eq!(
        outcome.outcome,
        Status::Applied,
        "raw trigger with {}: {:?}\nprocess log:\n{}",
        patch.display(),
        outcome.error,
        fx.log()
    );
    outcome
}

/// Waits until the agent has claimed the patch of request `seq` (moved it into `consumed/`),
/// so the update is under way.
fn wait_claimed(fx: &Fixture, seq: u64) {
    let claimed = fx.control.join(format!("consumed/{seq}.patch"));
    let deadline = Instant::now() + WAIT;
    while !claimed.exists() {
        assert!(
            Instant::now() < deadline,
            "the agent never took patch {seq}; log:\n{}",
            fx.log()
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until the agent has tried the update under way at least once and backed off because
/// a target is active, then checks that `compute` still gives `value`: nothing changed on
/// that attempt.
fn unchanged_while_retrying(fx: &mut Fixture, value: u64) {
    fx.wait_agent_retrying();
    assert_eq!(fx.compute(), value, "changed while a target was active");
}

/// `unspin` with the original `spin` running, which returns its count & 1 (a new one gives 5).
fn unspin_old(fx: &mut Fixture) {
    let reply = fx.send("unspin");
    assert!(
        reply == "unspun 0" || reply == "unspun 1",
        "the original spin should have returned: {reply}"
    );
}

// ---- the tests ----

/// Rust program, several busy threads: a C patch through `dsu apply`, then a Rust patch
/// through the raw trigger, each changing what the program computes.
#[test]
fn rust_program_takes_c_and_rust_patches_by_dsu_and_raw_trigger() {
    let dir = scratch("apply-rust");
    let c_patch = cc_object(&dir, "c_x10", C_X10, &[]);
    let rust_patch = rustc_object(&dir, "rust_x10_plus_1", RUST_X10_PLUS_1);
    let mut fx = busy_target(&dir, 4);
    assert_eq!(fx.compute(), ORIGINAL);

    let stdout = dsu_apply(&fx, &c_patch);
    assert!(stdout.contains("dsu_fixture_compute"), "{stdout}");
    assert!(stdout.contains("applied patch 1"), "{stdout}");
    assert_eq!(fx.compute(), 70);
    fx.workers_see(70);

    let outcome = raw_trigger_applied(&fx, &rust_patch);
    assert_eq!(outcome.seq, 2);
    assert_eq!(outcome.functions.len(), 1);
    assert_eq!(outcome.functions[0].name, "dsu_fixture_compute");
    assert_eq!(
        outcome.functions[0].old_address,
        format!("{:#x}", fx.address("compute"))
    );
    assert_eq!(fx.compute(), 71);
    fx.workers_see(71);

    fx.no_worker_errors();
    assert!(fx.alive());
}

/// C program linked with `libdsu_agent.a`: a Rust patch through `dsu apply`, a C patch through
/// the raw trigger, and a blocked function replaced only once it returns.
#[test]
fn c_program_with_static_agent_takes_patches() {
    let dir = scratch("apply-c-static");
    let rust_patch = rustc_object(&dir, "rust_x10", RUST_X10);
    let c_patch = cc_object(&dir, "c_x10_plus_1", C_X10_PLUS_1, &[]);
    let both = cc_object(&dir, "block_and_compute", C_BLOCK_AND_COMPUTE, &[]);
    let mut fx = busy_c_linked(&dir, 4);
    assert_eq!(fx.compute(), ORIGINAL);
    fx.expect("block", "blocking");
    fx.expect("unblock", "unblocked 1");

    dsu_apply(&fx, &rust_patch);
    assert_eq!(fx.compute(), 70);
    fx.workers_see(70);
    raw_trigger_applied(&fx, &c_patch);
    assert_eq!(fx.compute(), 71);
    fx.workers_see(71);

    // `block` and `compute` together while a thread sits in `block`: nothing changes until it
    // leaves, then both change at once.
    fx.expect("block", "blocking");
    let apply = spawn_dsu_apply(&fx, &both, 20);
    wait_claimed(&fx, 3);
    unchanged_while_retrying(&mut fx, 71);
    fx.expect("unblock", "unblocked 1");
    let out = finish(apply, dsu_limit(20));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fx.compute(), 70);
    fx.workers_see(70);
    fx.expect("block", "blocking");
    fx.expect("unblock", "unblocked 101");
    fx.no_worker_errors();
}

/// An unmodified C program made patchable by `LD_PRELOAD=libdsu_agent.so`.
#[test]
fn unmodified_c_program_under_ld_preload_takes_patches() {
    let dir = scratch("apply-preload");
    let c_patch = cc_object(&dir, "c_x10", C_X10, &[]);
    let rust_patch = rustc_object(&dir, "rust_x10_plus_1", RUST_X10_PLUS_1);
    let mut fx = busy_c_preloaded(&dir, 4);
    assert_eq!(fx.compute(), ORIGINAL);
    assert!(
        fx.control.join("agent.json").exists(),
        "the preloaded agent did not install"
    );

    dsu_apply(&fx, &c_patch);
    assert_eq!(fx.compute(), 70);
    fx.workers_see(70);
    raw_trigger_applied(&fx, &rust_patch);
    assert_eq!(fx.compute(), 71);
    fx.workers_see(71);
    fx.no_worker_errors();
    assert!(fx.alive());
}

/// A thread blocked in a system call inside `dsu_fixture_block` holds the update (of `block`
/// and `compute` together) back until it returns; then the update completes.
#[test]
fn blocked_function_is_replaced_only_after_it_returns() {
    let dir = scratch("apply-blocked");
    let patch = cc_object(&dir, "block_and_compute", C_BLOCK_AND_COMPUTE, &[]);
    let mut fx = busy_target(&dir, 3);
    let block_code = fx.code("block");
    let compute_code = fx.code("compute");
    fx.expect("block", "blocking");

    let apply = spawn_dsu_apply(&fx, &patch, 20);
    wait_claimed(&fx, 1);
    unchanged_while_retrying(&mut fx, ORIGINAL);
    assert_eq!(fx.code_between_attempts("block", &block_code), block_code);
    assert_eq!(
        fx.code_between_attempts("compute", &compute_code),
        compute_code
    );

    // The old version returns normally (its read was not broken by the stop signals), then
    // the update goes through.
    fx.expect("unblock", "unblocked 1");
    let out = finish(apply, dsu_limit(20));
    assert!(
        out.status.success(),
        "dsu apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fx.compute(), 70);
    fx.workers_see(70);
    assert_ne!(fx.code("block"), block_code);
    fx.expect("block", "blocking");
    fx.expect("unblock", "unblocked 101");
    fx.no_worker_errors();
}

/// A thread spinning in a loop without calls inside `dsu_fixture_spin` (C program, -O2) holds
/// a raw-trigger update of `spin` and `compute` back until it leaves the loop.
#[test]
fn spinning_function_is_replaced_only_after_it_returns() {
    let dir = scratch("apply-spin");
    let patch = rustc_object(&dir, "spin_and_compute", RUST_SPIN_AND_COMPUTE);
    let mut fx = busy_c_linked(&dir, 3);
    // A first update, so that the one under test is not the process's first (the agent's
    // caches are built).
    let warm_up = cc_object(
        &dir,
        "warm_up",
        "#include <unistd.h>\nunsigned long dsu_fixture_block(int fd) { char b = 0; return (unsigned long)read(fd, &b, 1) + 100; }\n",
        &[],
    );
    dsu_apply(&fx, &warm_up);
    fx.expect("spin", "spinning");

    place_and_signal(&fx, &fs::read(&patch).unwrap());
    wait_claimed(&fx, 2);
    unchanged_while_retrying(&mut fx, ORIGINAL);
    assert_eq!(
        last_seq(&fx),
        1,
        "answered while the spinning thread was inside"
    );

    unspin_old(&mut fx);
    let outcome = wait_result(&fx, 2, WAIT);
    assert_eq!(outcome.outcome, Status::Applied, "{:?}", outcome.error);
    assert!(
        outcome.attempts > 1,
        "applied on the first attempt while active"
    );
    assert_eq!(fx.compute(), 70);
    fx.workers_see(70);
    fx.expect("spin", "spinning");
    fx.expect("unspin", "unspun 5");
    fx.no_worker_errors();
}

/// With a short timeout, an update whose target stays active is refused naming the function,
/// and nothing changes: not the behaviour, not one code byte of either function of the patch.
/// The same patch applies once the function is left.
///
/// The patch holds `block` and `spin`, which no worker calls, so the function named can only
/// be the one the test keeps active (a patch that also replaced the hot `compute` could be
/// refused naming `compute`: see the report on issue 3).
#[test]
fn active_function_at_the_timeout_is_refused_and_nothing_changes() {
    let dir = scratch("apply-timeout");
    let patch = cc_object(&dir, "block_and_spin", C_BLOCK_AND_SPIN, &[]);
    let warm_up = cc_object(&dir, "c_x10", C_X10, &[]);
    let mut fx = busy_target(&dir, 3);
    // The process's first update indexes the executable's call sites before its retry clock
    // starts: in a debug build on a loaded machine that can take longer than the 2 s `dsu`
    // waits beyond `--timeout 1` (it then times out, exit 4). Done here, with time to spare.
    dsu_apply(&fx, &warm_up);
    dsu_revert(&fx);
    let code: Vec<Vec<u8>> = ["compute", "block", "spin"]
        .iter()
        .map(|f| fx.code(f))
        .collect();
    let unchanged = |fx: &Fixture| {
        for (f, bytes) in ["compute", "block", "spin"].iter().zip(&code) {
            assert_eq!(&fx.code(f), bytes, "code bytes of {f} changed");
        }
    };

    // Blocked in a system call.
    fx.expect("block", "blocking");
    let started = Instant::now();
    let line = dsu_apply_refused(&fx, &patch, 1);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "gave up early: {line}"
    );
    assert!(line.contains("refused"), "{line}");
    assert!(line.contains("dsu_fixture_block"), "{line}");
    unchanged(&fx);
    fx.expect("unblock", "unblocked 1");
    fx.expect("spin", "spinning");
    unspin_old(&mut fx);

    // Spinning without calls.
    fx.expect("spin", "spinning");
    let line = dsu_apply_refused(&fx, &patch, 1);
    assert!(line.contains("dsu_fixture_spin"), "{line}");
    unchanged(&fx);
    unspin_old(&mut fx);
    fx.expect("block", "blocking");
    fx.expect("unblock", "unblocked 1");
    assert_eq!(fx.compute(), ORIGINAL);

    // Nothing was wrong with the patch: with the functions left, it applies.
    dsu_apply(&fx, &patch);
    fx.expect("block", "blocking");
    fx.expect("unblock", "unblocked 101");
    fx.expect("spin", "spinning");
    fx.expect("unspin", "unspun 5");
    fx.no_worker_errors();
}

/// A patch of two functions, one of which calls a symbol the process lacks: neither function
/// changes, and the error names the symbol, through `dsu apply` and through the raw trigger.
#[test]
fn unresolvable_patch_changes_neither_function() {
    let dir = scratch("apply-unresolvable");
    let patch = cc_object(&dir, "unresolvable", C_UNRESOLVABLE, &[]);
    let mut fx = busy_target(&dir, 3);
    let compute_code = fx.code("compute");
    let block_code = fx.code("block");

    let line = dsu_apply_refused(&fx, &patch, 5);
    assert!(line.contains("dsu_missing_helper_for_tests"), "{line}");

    let outcome = raw_trigger(&fx, &patch);
    assert_eq!(outcome.outcome, Status::Refused);
    let error = outcome.error.unwrap_or_default();
    assert!(error.contains("dsu_missing_helper_for_tests"), "{error}");
    assert!(outcome.functions.is_empty(), "{:?}", outcome.functions);

    assert_eq!(fx.compute(), ORIGINAL);
    fx.expect("block", "blocking");
    fx.expect("unblock", "unblocked 1");
    assert_eq!(fx.code("compute"), compute_code);
    assert_eq!(fx.code("block"), block_code);
    fx.no_worker_errors();
}

/// A function already replaced is replaced again; the newest version wins, whichever way and
/// in whichever language it came.
#[test]
fn replaced_function_is_replaced_again_and_the_newest_wins() {
    let dir = scratch("apply-again");
    let rust_x10 = rustc_object(&dir, "rust_x10", RUST_X10);
    let c_x10_plus_1 = cc_object(&dir, "c_x10_plus_1", C_X10_PLUS_1, &[]);
    let c_x100 = cc_object(
        &dir,
        "c_x100",
        "unsigned long dsu_fixture_compute(unsigned long x) { return x * 100; }",
        &[],
    );
    let mut fx = busy_target(&dir, 3);

    dsu_apply(&fx, &rust_x10);
    assert_eq!(fx.compute(), 70);
    fx.workers_see(70);
    raw_trigger_applied(&fx, &c_x10_plus_1);
    assert_eq!(fx.compute(), 71);
    fx.workers_see(71);
    dsu_apply(&fx, &c_x100);
    assert_eq!(fx.compute(), 700);
    fx.workers_see(700);
    dsu_apply(&fx, &rust_x10);
    assert_eq!(fx.compute(), 70);
    fx.workers_see(70);
    fx.no_worker_errors();
}

/// Busy threads calling the target, allocating and printing, while two versions are applied
/// alternately, 30 times, through both paths: every apply returns in time, each leaves the
/// newest version in effect, no worker ever sees an impossible result, the process answers.
#[test]
fn alternating_applies_under_load() {
    const APPLIES: usize = 30;
    let dir = scratch("apply-stress");
    let versions = [
        (rustc_object(&dir, "rust_x10", RUST_X10), 70),
        (cc_object(&dir, "c_x10_plus_1", C_X10_PLUS_1, &[]), 71),
    ];
    let mut fx = busy_target(&dir, 4);
    let started = Instant::now();
    for i in 0..APPLIES {
        let (patch, value) = &versions[i % 2];
        if (i / 2) % 2 == 0 {
            dsu_apply(&fx, patch);
        } else {
            raw_trigger_applied(&fx, patch);
        }
        assert_eq!(fx.compute(), *value, "after apply {}", i + 1);
        fx.workers_see(*value);
    }
    let elapsed = started.elapsed();
    let outcome = read_result(&fx).unwrap();
    assert_eq!(outcome.seq, APPLIES as u64);
    let (errors, calls) = fx.errors();
    assert_eq!(errors, 0, "log:\n{}", fx.log());
    assert!(calls > 0);
    assert!(fx.alive());
    assert_eq!(fx.compute(), 71);
    fx.workers_see(71);
    let log = fs::read_to_string(&fx.stderr_log).unwrap();
    assert!(
        log.lines().any(|l| l.starts_with("worker ")),
        "the workers never printed"
    );
    eprintln!("{APPLIES} applies in {elapsed:?}");
}

/// Malformed input through the real path: a file that is not ELF and a truncated object are
/// refused with a precise reason, the code stays byte for byte, the process keeps answering,
/// and a good patch still applies afterwards.
#[test]
fn malformed_patches_are_refused_and_the_process_is_untouched() {
    let dir = scratch("apply-malformed");
    let good = cc_object(&dir, "c_x10", C_X10, &[]);
    let bytes = fs::read(&good).unwrap();
    let truncated = dir.join("truncated.o");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let mut fx = busy_target(&dir, 3);
    let compute_code = fx.code("compute");

    place_and_signal(&fx, b"#!/bin/sh\necho this is not an object\n");
    let outcome = wait_result(&fx, 1, WAIT);
    assert_eq!(outcome.outcome, Status::Refused);
    let error = outcome.error.unwrap_or_default();
    assert!(error.contains("not an ELF file"), "{error}");
    assert_eq!(fx.compute(), ORIGINAL);

    let outcome = raw_trigger(&fx, &truncated);
    assert_eq!(outcome.outcome, Status::Refused);
    let error = outcome.error.unwrap_or_default();
    assert!(error.starts_with("invalid patch: "), "{error}");
    assert_eq!(error.lines().count(), 1, "{error:?}");
    assert_eq!(fx.compute(), ORIGINAL);

    // `dsu` passes a truncated object on (it starts like ELF) and reports the agent's reason.
    let line = dsu_apply_refused(&fx, &truncated, 5);
    assert!(line.contains(&error), "{line} vs {error}");

    assert_eq!(fx.code("compute"), compute_code);
    assert!(fx.alive());
    assert_eq!(fx.compute(), ORIGINAL);
    fx.no_worker_errors();

    dsu_apply(&fx, &good);
    assert_eq!(fx.compute(), 70);
    fx.workers_see(70);
}

/// Waits until every trigger signal sent so far has reached the agent and the agent has gone
/// through its loop since: no SIGUSR2 is pending in the process (each was taken by the
/// handler, which wakes the agent thread), then a `dsu status` is answered. The agent looks
/// for patch files on every wake-up before it serves the socket, so anything those signals
/// would make it do it has done (short of the handler's own write of its wake-up byte, a few
/// instructions after the signal is taken, while `dsu` starts).
fn agent_has_seen_every_signal(fx: &mut Fixture) {
    fx.wait_signal_taken(libc::SIGUSR2);
    let out = support::dsu(&["status", "-p", &fx.pid.to_string()]);
    assert!(
        out.status.success(),
        "dsu status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 200 trigger signals in a row with nothing to apply do nothing; a burst right after a real
/// trigger applies the patch exactly once.
#[test]
fn a_signal_flood_does_no_harm() {
    let dir = scratch("apply-flood");
    let patch = rustc_object(&dir, "rust_x10", RUST_X10);
    let mut fx = busy_target(&dir, 3);
    let compute_code = fx.code("compute");

    for _ in 0..200 {
        signal(&fx, libc::SIGUSR2);
    }
    agent_has_seen_every_signal(&mut fx);
    assert_eq!(fx.compute(), ORIGINAL);
    assert!(fx.alive());
    assert_eq!(
        read_result(&fx),
        None,
        "the agent answered a request nobody made"
    );
    assert_eq!(fx.code("compute"), compute_code);

    place_and_signal(&fx, &fs::read(&patch).unwrap());
    for _ in 0..200 {
        signal(&fx, libc::SIGUSR2);
    }
    let outcome = wait_result(&fx, 1, WAIT);
    assert_eq!(outcome.outcome, Status::Applied, "{:?}", outcome.error);
    assert_eq!(fx.compute(), 70);
    fx.workers_see(70);
    agent_has_seen_every_signal(&mut fx);
    assert_eq!(last_seq(&fx), 1, "one patch, one answer");
    let consumed: Vec<String> = fs::read_dir(fx.control.join("consumed"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(consumed, ["1.patch"]);
    fx.no_worker_errors();
    assert!(fx.alive());
}

/// A patch reading the program's thread-local variable: each thread sees its own copy, with
/// the general-dynamic model (`cc -fPIC`'s default for an extern `__thread`) and with the
/// initial-exec one.
#[test]
fn patches_read_the_programs_thread_local_variables() {
    let dir = scratch("tls");
    let mut fx = busy_c_preloaded(&dir, 1);
    assert_eq!(fx.send("tls"), "tls 7 9");
    let source = "
extern __thread unsigned long dsu_fixture_tls;
unsigned long dsu_fixture_tls_read(void) { return dsu_fixture_tls * 100 + 1; }
";
    let dynamic = cc_object(&dir, "tls_gd", source, &[]);
    dsu_apply(&fx, &dynamic);
    assert_eq!(fx.send("tls"), "tls 701 901");

    let initial_exec = cc_object(
        &dir,
        "tls_ie",
        &source.replace("* 100 + 1", "* 1000 + 2"),
        &["-ftls-model=initial-exec"],
    );
    dsu_apply(&fx, &initial_exec);
    assert_eq!(fx.send("tls"), "tls 7002 9002");
}

/// `dsu revert` that must succeed; returns the id it reverted.
fn dsu_revert(fx: &Fixture) -> u64 {
    let out = support::dsu(&["revert", "-p", &fx.pid.to_string()]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dsu revert failed ({}): {}\nstdout: {stdout}\nprocess log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        fx.log()
    );
    stdout
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("reverted patch "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("expected `reverted patch N ..`, got {stdout:?}"))
}

/// `dsu revert -p PID --timeout SECS` that must exit 1 with one `dsu: ` line; returns it.
fn dsu_revert_refused(fx: &Fixture, timeout_secs: u32) -> String {
    let (pid, timeout) = (fx.pid.to_string(), timeout_secs.to_string());
    let args = ["revert", "-p", &pid, "--timeout", &timeout];
    refused_line(&support::dsu(&args))
}

/// Two patches stacked on a C program's `compute` (one small enough to be written in place,
/// one placed in new memory with the program's call sites rewritten), and one of `block`,
/// reverted newest first: each revert gives back the previous behaviour, and at the end every
/// code byte of both functions is the original.
fn c_program_reverts(mut fx: Fixture, dir: &Path) {
    let small = cc_object(dir, "c_x10", C_X10, &[]);
    let large = cc_object(
        dir,
        "c_x10_plus_1_large",
        "unsigned long dsu_fixture_compute(unsigned long x) \
         { volatile unsigned long k = 10; unsigned long r = x * k; k = r; return k + 1; }",
        &[],
    );
    let block = cc_object(dir, "block_and_compute", C_BLOCK_AND_COMPUTE, &[]);
    let compute_code = fx.code("compute");
    let block_code = fx.code("block");

    dsu_apply(&fx, &small);
    let stdout = dsu_apply(&fx, &large);
    assert!(stdout.contains("redirect"), "{stdout}");
    assert_eq!(fx.compute(), 71);
    fx.workers_see(71);
    assert_eq!(dsu_revert(&fx), 2);
    assert_eq!(fx.compute(), 70);
    fx.workers_see(70);
    assert_eq!(dsu_revert(&fx), 1);
    assert_eq!(fx.compute(), ORIGINAL);
    fx.workers_see(ORIGINAL);
    assert_eq!(
        fx.code("compute"),
        compute_code,
        "compute is not the original"
    );

    dsu_apply(&fx, &block);
    fx.expect("block", "blocking");
    fx.expect("unblock", "unblocked 101");
    assert_eq!(fx.compute(), 70);
    dsu_revert(&fx);
    fx.expect("block", "blocking");
    fx.expect("unblock", "unblocked 1");
    assert_eq!(fx.compute(), ORIGINAL);
    fx.workers_see(ORIGINAL);
    assert_eq!(
        fx.code("compute"),
        compute_code,
        "compute is not the original"
    );
    assert_eq!(fx.code("block"), block_code, "block is not the original");
    fx.no_worker_errors();
}

#[test]
fn c_program_with_static_agent_reverts_to_the_original() {
    let dir = scratch("apply-c-static-revert");
    c_program_reverts(busy_c_linked(&dir, 3), &dir);
}

#[test]
fn unmodified_c_program_under_ld_preload_reverts_to_the_original() {
    let dir = scratch("apply-preload-revert");
    c_program_reverts(busy_c_preloaded(&dir, 3), &dir);
}

/// A `spin` that returns 5 (fixtures' contract: mark the state inside, spin until stop),
/// smaller than the original and without a frame: it is written over the original (in place).
const C_SPIN_5: &str = "
#include <stdatomic.h>
unsigned long dsu_fixture_spin(atomic_uint *state) {
    unsigned starting = 0;
    atomic_compare_exchange_strong(state, &starting, 1);
    while (atomic_load_explicit(state, memory_order_relaxed) != 2) {
    }
    return 5;
}
";

/// A thread looping inside a version written in place holds the revert back: the revert would
/// write the old code over the loop it runs. Refused at the timeout, nothing changed; once the
/// thread leaves, the revert gives back the original bytes.
#[test]
fn revert_waits_while_a_thread_runs_the_in_place_version() {
    let dir = scratch("apply-revert-in-place");
    let patch = cc_object(&dir, "spin_5", C_SPIN_5, &[]);
    let mut fx = busy_c_preloaded(&dir, 2);
    let original = fx.code("spin");
    let line = dsu_apply(&fx, &patch);
    assert!(line.contains("in-place"), "{line}");
    let patched = fx.code("spin");
    assert_ne!(patched, original);

    fx.expect("spin", "spinning");
    let line = dsu_revert_refused(&fx, 1);
    assert!(
        line.contains("dsu_fixture_spin") && line.contains("active"),
        "{line}"
    );
    assert_eq!(fx.code("spin"), patched, "the refused revert changed code");
    fx.expect("unspin", "unspun 5");

    dsu_revert(&fx);
    assert_eq!(fx.code("spin"), original);
    fx.expect("spin", "spinning");
    unspin_old(&mut fx);
    fx.no_worker_errors();
}

/// A `block` that reads through a helper of the patch's own, reached by a tail call: a thread
/// blocked in it has no frame in any replaced function, only in the patch's other code.
const C_BLOCK_THROUGH_HELPER: &str = "
#include <unistd.h>
__attribute__((noinline, noipa)) static unsigned long read_one(int fd) {
    char byte = 0;
    long n = read(fd, &byte, 1);
    return (unsigned long)n + 100;
}
unsigned long dsu_fixture_block(int fd) { return read_one(fd); }
";

/// A thread inside a helper of the patch (not a replaced function) holds the revert back: the
/// revert unmaps the patch's code, which the thread returns into. Refused at the timeout,
/// naming the patch's code; once the thread has returned, the revert goes through.
#[test]
fn revert_waits_while_a_thread_is_in_the_patchs_own_helper() {
    let dir = scratch("apply-revert-helper");
    let patch = cc_object(&dir, "block_helper", C_BLOCK_THROUGH_HELPER, &[]);
    let mut fx = busy_c_preloaded(&dir, 2);
    let original = fx.code("block");
    dsu_apply(&fx, &patch);
    let patched = fx.code("block");

    fx.expect("block", "blocking");
    let line = dsu_revert_refused(&fx, 1);
    assert!(line.contains("code of patch"), "{line}");
    assert_eq!(fx.code("block"), patched, "the refused revert changed code");
    fx.expect("unblock", "unblocked 101");

    dsu_revert(&fx);
    assert_eq!(fx.code("block"), original);
    fx.expect("block", "blocking");
    fx.expect("unblock", "unblocked 1");
    fx.no_worker_errors();
}

/// `dsu_fixture_block` returning `n + add`, padded so that it is larger than the original and
/// placed in new memory (redirected).
fn c_block_plus(add: u32) -> String {
    format!(
        "#include <unistd.h>
unsigned long dsu_fixture_block(int fd) {{
    volatile unsigned long sink = 0;
{}    char byte = 0;
    long n = read(fd, &byte, 1);
    return (unsigned long)n + {add};
}}
",
        "    sink += 1;\n".repeat(16)
    )
}

/// A thread inside an earlier patch's version of a function (in new memory, not in the
/// original body) holds the next patch of that function back, as a thread in the original
/// would: it would otherwise run the older version after the newer one took over.
#[test]
fn a_thread_in_an_earlier_version_holds_the_next_patch_back() {
    let dir = scratch("apply-earlier-version");
    let v1 = cc_object(&dir, "block_plus_100", &c_block_plus(100), &[]);
    let v2 = cc_object(&dir, "block_plus_200", &c_block_plus(200), &[]);
    let mut fx = busy_c_preloaded(&dir, 2);
    let line = dsu_apply(&fx, &v1);
    assert!(line.contains("redirect"), "{line}");
    let patched = fx.code("block");

    fx.expect("block", "blocking");
    let line = dsu_apply_refused(&fx, &v2, 1);
    assert!(
        line.contains("dsu_fixture_block") && line.contains("active"),
        "{line}"
    );
    assert_eq!(fx.code("block"), patched, "the refused apply changed code");
    fx.expect("unblock", "unblocked 101");

    dsu_apply(&fx, &v2);
    fx.expect("block", "blocking");
    fx.expect("unblock", "unblocked 201");
    fx.no_worker_errors();
}
