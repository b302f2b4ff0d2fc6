//! Threads that wait in system calls are left alone by an update: no signal, no `EINTR`, no
//! early wake-up, however many updates run, and whatever signals they block. Only running
//! threads are stopped; a running thread that blocks the stop signal is named in the refusal,
//! and so is, when every thread must be parked, a waiting thread that blocks it.
//!
//! The target is `tests/fixtures/waiters.c`, an unmodified C program started with
//! `LD_PRELOAD=libdsu_agent.so`, patched and reverted with the real `dsu`.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::{Fixture, ORIGINAL, cargo_bin, cc_object, cc_program, finish, scratch};

const WAITERS_C: &str = include_str!("fixtures/waiters.c");

const C_X10: &str = "
unsigned long dsu_fixture_compute(unsigned long x) { return x * 10; }
";

fn waiters(dir: &Path) -> Fixture {
    let library = cargo_bin("libdsu_agent.so");
    let program = cc_program(dir, "waiters", &[("waiters.c", WAITERS_C)], &["-pthread"]);
    Fixture::start(dir, &program, &[], &[("LD_PRELOAD", &library)])
}

fn dsu(fx: &Fixture, args: &[&str], timeout_secs: u64) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_dsu"))
        .arg(args[0])
        .args(["-p", &fx.pid.to_string()])
        .args(&args[1..])
        .args(["--timeout", &timeout_secs.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dsu");
    finish(child, Duration::from_secs(timeout_secs + 10))
}

fn succeeds(fx: &Fixture, args: &[&str]) {
    let out = dsu(fx, args, 5);
    assert!(
        out.status.success(),
        "dsu {args:?} failed: {}\nprocess log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        fx.log()
    );
}

/// `(eintr, short, rounds, bad)` as the program counts them.
fn counts(fx: &mut Fixture) -> (u64, u64, u64, u64) {
    let reply = fx.send("counts");
    let f: Vec<&str> = reply.split_whitespace().collect();
    match f[..] {
        ["counts", "eintr", e, "short", s, "rounds", r, "bad", b] => (
            e.parse().unwrap(),
            s.parse().unwrap(),
            r.parse().unwrap(),
            b.parse().unwrap(),
        ),
        _ => panic!("bad reply to counts: {reply:?}"),
    }
}

/// Waits until the waiters have completed `rounds` more waits than `from`.
fn let_them_wait(fx: &mut Fixture, from: u64, rounds: u64) {
    let deadline = std::time::Instant::now() + support::WAIT;
    while counts(fx).2 < from + rounds {
        assert!(
            std::time::Instant::now() < deadline,
            "the waiters stopped waiting"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn waiting_threads_see_no_signal_across_many_updates() {
    let dir = scratch("waiting-updates");
    let patch = cc_object(&dir, "x10", C_X10, &[]);
    let mut fx = waiters(&dir);
    assert_eq!(fx.compute(), ORIGINAL);
    // Every waiter is inside its loop before the first update.
    let_them_wait(&mut fx, 0, 12);
    let before = counts(&mut fx);
    for _ in 0..10 {
        succeeds(&fx, &["apply", patch.to_str().unwrap()]);
        assert_eq!(fx.compute(), 70);
        succeeds(&fx, &["revert"]);
        assert_eq!(fx.compute(), ORIGINAL);
    }
    let_them_wait(&mut fx, before.2, 6);
    let (eintr, short, rounds, bad) = counts(&mut fx);
    assert_eq!(
        (eintr, short),
        (0, 0),
        "waits interrupted or cut short by the updates ({rounds} waits); log:\n{}",
        fx.log()
    );
    assert_eq!(bad, 0, "a thread got a result no version gives");
    assert!(fx.alive());
}

/// A thread that runs with every signal blocked cannot be stopped: the update is refused
/// naming it, without stalling the others for the park timeout, and nothing changes. Once
/// it stops running, the same update goes through.
#[test]
fn a_running_thread_that_blocks_the_stop_signal_is_named() {
    let dir = scratch("waiting-blockspin");
    let patch = cc_object(&dir, "x10", C_X10, &[]);
    let mut fx = waiters(&dir);
    let reply = fx.send("spinblocked");
    let tid: i32 = reply
        .strip_prefix("spinning ")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("bad reply {reply:?}"));
    let code = fx.read_memory(fx.address("compute"), 16);

    let out = dsu(&fx, &["apply", patch.to_str().unwrap()], 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("thread {tid} (blockspin)"))
            && stderr.contains("stop signal")
            && stderr.contains("blocked"),
        "{stderr}"
    );
    assert_eq!(fx.read_memory(fx.address("compute"), 16), code);
    assert_eq!(fx.compute(), ORIGINAL);

    fx.expect("unspin", "unspun");
    succeeds(&fx, &["apply", patch.to_str().unwrap()]);
    assert_eq!(fx.compute(), 70);
    let (eintr, short, _, bad) = counts(&mut fx);
    assert_eq!((eintr, short, bad), (0, 0, 0));
}

/// A program that installs its own `SIGTRAP` handler after the agent takes the breakpoint
/// holds away from it: updates then stop every thread (the fallback), still apply and revert,
/// and never send the program a `SIGTRAP`.
#[test]
fn a_program_that_takes_sigtrap_is_updated_by_stopping_every_thread() {
    let dir = scratch("waiting-owntrap");
    let patch = cc_object(&dir, "x10", C_X10, &[]);
    let mut fx = waiters(&dir);
    fx.expect("owntrap", "trapping");
    // The fallback parks every thread; the all-signals-blocked waiter cannot park, so every
    // attempt gives way (the parked threads might hold what it waits for) and the update is
    // refused naming that thread, with nothing changed (the limit of the fallback).
    let out = dsu(&fx, &["apply", patch.to_str().unwrap()], 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("(condwait) sleeps with the stop signal")
            && stderr.contains("park every thread"),
        "{stderr}"
    );
    assert_eq!(fx.compute(), ORIGINAL);
    assert_eq!(fx.send("traps"), "traps 0");
    assert!(fx.alive());
}

/// A process whose user may have no signal pending (`prlimit --sigpending=0`, as when other
/// processes of the user have used up the limit): the stop signal, a real-time one, cannot be
/// queued for a running thread. The update is refused at once, naming the limit, and nothing
/// changes. The thread spins without system calls, so the update must stop it (a waiting
/// thread would be checked where it waits, with no signal); the program has no other worker.
/// The agent is linked into the program, so `prlimit` itself carries none.
#[test]
fn a_stop_signal_that_cannot_be_queued_is_named() {
    let dir = scratch("sigpending");
    let patch = cc_object(&dir, "c_x10", C_X10, &[]);
    let program = support::busy_c_linked_program(&dir, "busy_linked");
    let program_arg = program.to_str().unwrap();
    let mut fx = Fixture::start(
        &dir,
        Path::new("prlimit"),
        &["--sigpending=0", program_arg, "0"],
        &[],
    );
    fx.expect("spin", "spinning");
    let before = fx.code("compute");
    let out = dsu(&fx, &["apply", patch.to_str().unwrap()], 5);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{out:?}\nprocess log:\n{}",
        fx.log()
    );
    assert!(
        stderr.contains("could not be queued for thread") && stderr.contains("RLIMIT_SIGPENDING"),
        "{stderr}"
    );
    assert_eq!(fx.code("compute"), before, "changed by a refused update");
    assert_eq!(fx.compute(), ORIGINAL);
    let reply = fx.send("unspin");
    assert!(reply.starts_with("unspun "), "{reply}");
    assert!(fx.alive(), "{}", fx.log());
}
