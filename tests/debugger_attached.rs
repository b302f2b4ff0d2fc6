//! A debugger attached to the process: the update places no breakpoint, since the debugger
//! would take a thread's trap for its own and let the thread go on from the middle of the
//! instruction the breakpoint replaced. With a tracer attached (`TracerPid` not 0) the agent
//! stops every thread with its signal instead, which a tracer passes on.
//!
//! The tracer is `tests/fixtures/swallow_traps.c`: it relays every signal but `SIGTRAP`, which
//! it keeps from the thread, as gdb does with a trap it did not set. The target is
//! `tests/fixtures/busy.c` with three workers calling the patched function in tight loops,
//! started with `LD_PRELOAD=libdsu_agent.so`; patched and reverted with the real `dsu`,
//! several times, while the workers check every result they get. Skipped, with a message, when
//! Yama forbids attaching (`ptrace_scope` 2 or 3); the fixture lets any process of its user
//! attach, which `ptrace_scope` 1 requires.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use support::{C_X10, Fixture, ORIGINAL, cargo_bin, cc_object, cc_program, dsu_ok, scratch};

const BUSY_C: &str = include_str!("fixtures/busy.c");
const TRACER_C: &str = include_str!("fixtures/swallow_traps.c");

/// Kills the tracer when the test ends, however it ends (the kernel detaches it).
struct Tracer(Child);

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn with_a_tracer_attached_updates_place_no_breakpoints() {
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0);
    if scope >= 2 {
        eprintln!("skipped: Yama's ptrace_scope is {scope}: the tracer may not attach");
        return;
    }
    let dir = scratch("debugger-attached");
    let library = cargo_bin("libdsu_agent.so");
    let program = cc_program(
        &dir,
        "busy_plain",
        &[("busy.c", BUSY_C)],
        &["-pthread", "-DDSU_FIXTURE_ANY_TRACER"],
    );
    let tracer = cc_program(&dir, "swallow_traps", &[("swallow_traps.c", TRACER_C)], &[]);
    let patch = cc_object(&dir, "c_x10", C_X10, &[]);
    let mut fx = Fixture::start(&dir, &program, &["3"], &[("LD_PRELOAD", &library)]);
    assert_eq!(fx.compute(), ORIGINAL);

    let mut child = Command::new(&tracer)
        .arg(fx.pid.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the tracer");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let _tracer = Tracer(child);
    let attached = lines.next().and_then(Result::ok).unwrap_or_default();
    assert!(attached.starts_with("attached "), "{attached:?}");

    let patch = patch.to_str().unwrap();
    for round in 0..5 {
        // The path without breakpoints: every thread stopped, which `dsu` says.
        let out = dsu_ok(&fx, "apply", &[patch, "--timeout", "10"]);
        assert!(
            out.contains(", every thread stopped"),
            "round {round}: {out}"
        );
        assert_eq!(fx.compute(), 70, "round {round}");
        fx.workers_see(70);
        let out = dsu_ok(&fx, "revert", &["--timeout", "10"]);
        assert!(
            out.contains(", every thread stopped"),
            "round {round}: {out}"
        );
        assert_eq!(fx.compute(), ORIGINAL, "round {round}");
        fx.workers_see(ORIGINAL);
    }
    fx.no_worker_errors();
    assert!(fx.alive(), "the process died; its log:\n{}", fx.log());
}
