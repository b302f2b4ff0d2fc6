//! Stacks no thread runs on: a coroutine suspended inside a function is as active as a thread
//! inside it. An in-place update under it would crash the process when the coroutine resumes;
//! dsu refuses programs that switch stacks without declaring them, checks declared stacks like
//! thread stacks, and applies once the coroutine has left the function.
//!
//! The target is `tests/fixtures/coro.c`, an unmodified C program with `makecontext` /
//! `swapcontext` coroutines, started with `LD_PRELOAD=libdsu_agent.so` and patched with the
//! real `dsu`.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::{Fixture, ORIGINAL, cargo_bin, cc_object, cc_program, finish, scratch};

const CORO_C: &str = include_str!("fixtures/coro.c");

/// Smaller than the original, so it is written in place over it.
const C_X10: &str = "
unsigned long dsu_fixture_compute(unsigned long x) { return x * 10; }
";

fn coro(dir: &Path) -> Fixture {
    let library = cargo_bin("libdsu_agent.so");
    let program = cc_program(dir, "coro", &[("coro.c", CORO_C)], &[]);
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

/// The `0x..-0x..` range of a `parked` / `idle` reply.
fn range(reply: &str, word: &str) -> String {
    reply
        .strip_prefix(word)
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|| panic!("expected `{word} 0x..-0x..`, got {reply:?}"))
}

#[test]
fn a_program_that_switches_stacks_without_declaring_them_is_refused_untouched() {
    let dir = scratch("stacks-undeclared");
    let patch = cc_object(&dir, "x10", C_X10, &[]);
    let mut fx = coro(&dir);
    let parked = fx.send("park");
    assert!(parked.starts_with("parked "), "{parked}");
    let code = fx.code("compute");

    let out = dsu(&fx, &["apply", patch.to_str().unwrap()], 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an update under a coroutine suspended in the function must be refused; stderr: \
         {stderr}; process log:\n{}",
        fx.log()
    );
    assert!(
        stderr.contains("switches stacks")
            && stderr.contains("swapcontext")
            && stderr.contains("dsu_stack_declare"),
        "the refusal names the reason and what to do: {stderr}"
    );
    assert_eq!(fx.code("compute"), code, "code changed by a refused update");
    assert_eq!(
        fx.send("resume"),
        format!("resumed {ORIGINAL}"),
        "the coroutine resumes in the original code"
    );
    assert!(fx.alive(), "the process died");
    assert_eq!(fx.compute(), ORIGINAL);
}

#[test]
fn a_declared_stack_keeps_an_update_back_while_its_coroutine_is_suspended_in_the_function() {
    let dir = scratch("stacks-declared");
    let patch = cc_object(&dir, "x10", C_X10, &[]);
    let mut fx = coro(&dir);
    fx.expect("declare", "declaring");
    // A second coroutine, suspended in a function no patch replaces, stays declared and
    // scanned throughout: it must not keep the update back.
    let idle = fx.send("idle");
    range(&idle, "idle");
    let parked = fx.send("park");
    let stack = range(&parked, "parked");
    let code = fx.code("compute");

    let out = dsu(&fx, &["apply", patch.to_str().unwrap()], 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "refused while the coroutine is suspended in the function: {stderr}"
    );
    assert!(
        stderr.contains("dsu_fixture_compute")
            && stderr.contains(&format!("declared stack {stack}")),
        "the refusal names the function and the declared stack {stack}: {stderr}"
    );
    assert_eq!(
        fx.code_between_attempts("compute", &code),
        code,
        "code changed by a refused update"
    );
    assert!(fx.alive(), "the process died");

    // The coroutine leaves the function (and finishes): the same update goes through.
    assert_eq!(fx.send("resume"), format!("resumed {ORIGINAL}"));
    let out = dsu(&fx, &["apply", patch.to_str().unwrap()], 5);
    assert!(
        out.status.success(),
        "apply after the coroutine left the function: {}\nprocess log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        fx.log()
    );
    assert_eq!(fx.compute(), 70, "the new version runs");
    assert!(fx.alive(), "the process died");
}

#[test]
fn the_c_stack_api_refuses_bad_input_with_precise_codes() {
    let dir = scratch("stacks-badinput");
    let mut fx = coro(&dir);
    fx.expect("declare", "declaring");
    // EINVAL 22, EOVERFLOW 75, EEXIST 17, ENOENT 2.
    fx.expect(
        "badinput",
        "badinput null -22 empty -22 overflow -75 overlap -17 unknown -2 forget 0 again -2 ok 0",
    );
    assert!(fx.alive());
    assert_eq!(fx.compute(), ORIGINAL);
}
