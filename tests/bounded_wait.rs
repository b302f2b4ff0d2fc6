//! Bounded waits (issue 10, item 5): a thread parked or held by an update waits for the agent
//! at most `hold_bound`; then it gives the attempt up and goes on, and the agent writes
//! nothing. The agent is made too slow to finish with the testing-only
//! `DSU_TEST_STALL_BEFORE_WRITE_MS` (it sleeps with threads parked and held, just before it
//! would write), and the bound is set with `DSU_HOLD_BOUND_MS`.
//!
//! The program is `tests/fixtures/busy.c` (workers call the target in tight loops: they get
//! held at its breakpoint or parked by the stop signal), made patchable with
//! `LD_PRELOAD=libdsu_agent.so`. Needs the workspace built first (`scripts/test.sh` does).

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Fixture, ORIGINAL, WAIT, cargo_bin, cc_object, cc_program, finish, scratch};

const BUSY_C: &str = include_str!("fixtures/busy.c");

const C_X10: &str = "
#include <stdint.h>
uint64_t dsu_fixture_compute(uint64_t x) { return x * 10; }
";

/// Calls the workers have made so far.
fn calls(fx: &mut Fixture) -> u64 {
    fx.errors().1
}

#[test]
fn threads_held_past_the_bound_go_on_and_the_attempt_writes_nothing() {
    let dir = scratch("bounded-wait");
    let patch = cc_object(&dir, "x10", C_X10, &[]);
    let program = cc_program(&dir, "busy", &[("busy.c", BUSY_C)], &["-pthread"]);
    let library = cargo_bin("libdsu_agent.so");
    let mut fx = Fixture::start(
        &dir,
        &program,
        &["2"],
        &[
            ("LD_PRELOAD", library.as_path()),
            ("DSU_HOLD_BOUND_MS", Path::new("200")),
            ("DSU_TEST_STALL_BEFORE_WRITE_MS", Path::new("1200")),
        ],
    );
    assert_eq!(fx.compute(), ORIGINAL);
    let before = fx.code("compute");

    let apply = Command::new(cargo_bin("dsu"))
        .args(["apply", "-p", &fx.pid.to_string(), "--timeout", "1"])
        .arg(&patch)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The workers stop making calls (held or parked by the attempt) for a while: no call in
    // 100 ms, which a scheduling hiccup does not explain...
    let deadline = Instant::now() + WAIT;
    let mut last = (calls(&mut fx), Instant::now());
    let frozen = loop {
        std::thread::sleep(Duration::from_millis(5));
        let now = calls(&mut fx);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= Duration::from_millis(100) {
            break now;
        }
        assert!(Instant::now() < deadline, "the workers never stopped");
    };
    // ...then, once the bound has passed, go on while the agent still stalls (1.2 s): without the
    // bound they would wait for it.
    let mut apply = Some(apply);
    let deadline = Instant::now() + WAIT;
    loop {
        let now = calls(&mut fx);
        let running = apply
            .as_mut()
            .is_some_and(|child| child.try_wait().unwrap().is_none());
        if now > frozen + 1000 {
            assert!(
                running,
                "the workers went on only when the agent finished, not at the bound"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the workers stayed stopped ({now} calls) past the bound"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let out = finish(apply.take().unwrap(), Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("waited 200 ms for the agent")
            && stderr.contains("went on before anything was written"),
        "the refusal does not name the bound: {stderr}"
    );
    assert_eq!(
        fx.code_between_attempts("compute", &before),
        before,
        "an abandoned attempt changed the code"
    );
    assert_eq!(fx.compute(), ORIGINAL);
    fx.no_worker_errors();
    assert!(fx.alive(), "{}", fx.log());
}

#[test]
fn a_bad_hold_bound_is_an_install_error_that_names_the_variable() {
    let dir = scratch("bounded-wait-var");
    let program = cc_program(&dir, "busy", &[("busy.c", BUSY_C)], &["-pthread"]);
    let library = cargo_bin("libdsu_agent.so");
    for value in ["0", "soon", "-5"] {
        let out = Command::new(&program)
            .arg("1")
            .env("LD_PRELOAD", &library)
            .env("DSU_CONTROL_DIR", dir.join("ctl"))
            .env("DSU_HOLD_BOUND_MS", value)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = finish(out, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "DSU_HOLD_BOUND_MS={value:?}: not a whole number of milliseconds above 0"
            )),
            "{value}: {stderr}"
        );
    }
}
