//! Unwind tables switch with the code: a C++ program throws through the function a patch
//! replaces, over and over, while the update waits for another thread to leave it. At no moment
//! may the unwinder describe the old code with the patch's table (issue 10, item 2).
//!
//! The program (`tests/fixtures/throws.cpp`) and the patch are built with `c++` at test time and
//! made patchable with `LD_PRELOAD=libdsu_agent.so`. Needs the workspace built first
//! (`scripts/test.sh` does).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Fixture, WAIT, cargo_bin, dsu, run, scratch};

const THROWS_CPP: &str = include_str!("fixtures/throws.cpp");

/// The fix: a smaller frame than the old code's, so it fits over it, and long enough that the
/// old code's call to the thrower returns within it; it still calls the thrower, so exceptions
/// keep passing through the new code.
const SMALL_FRAME_CPP: &str = r#"
extern "C" void dsu_thrower(long x);
extern "C" long dsu_throw_target(long x) {
    dsu_thrower(x);
    dsu_thrower(x - 2000); /* never throws where the first did not: longer code, same result */
    return x * 1000;
}
"#;

fn cxx(dir: &Path, name: &str, source: &str, args: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.cpp"));
    std::fs::write(&src, source).unwrap();
    let out = dir.join(name);
    run(Command::new("c++")
        .args(["-O2", "-g", "-fPIC"])
        .args(args)
        .arg("-o")
        .arg(&out)
        .arg(&src));
    out
}

/// `(exceptions caught, normal returns)` so far.
fn counts(fx: &mut Fixture) -> (u64, u64) {
    let reply = fx.send("counts");
    let mut fields = reply
        .strip_prefix("counts ")
        .unwrap_or_else(|| panic!("unexpected reply {reply:?}"))
        .split(' ')
        .map(|n| n.parse().unwrap());
    (fields.next().unwrap(), fields.next().unwrap())
}

/// Waits until the catching thread has caught more exceptions than `than`.
fn catches_more(fx: &mut Fixture, than: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (caught, _) = counts(fx);
        if caught > than {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no exception caught after {than} within {WAIT:?}; process {}",
            fx.state()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn exceptions_thrown_through_old_code_while_an_update_waits_still_unwind() {
    let dir = scratch("unwind-wait");
    let program = cxx(&dir, "throws", THROWS_CPP, &["-pthread"]);
    let patch = cxx(&dir, "fix.o", SMALL_FRAME_CPP, &["-c"]);
    let library = cargo_bin("libdsu_agent.so");
    let mut fx = Fixture::start(&dir, &program, &[], &[("LD_PRELOAD", library.as_path())]);
    let pid = fx.pid.to_string();
    let patch = patch.display().to_string();
    let before = fx.code("target");
    catches_more(&mut fx, 0);

    // A thread sits inside the target: the update keeps retrying for its whole timeout while
    // the other thread throws through the old code thousands of times.
    assert_eq!(fx.send("hold"), "held");
    let (caught, _) = counts(&mut fx);
    let out = dsu(&["apply", "-p", &pid, "--timeout", "2", &patch]);
    assert!(
        fx.alive(),
        "the program died while the update waited (an unwinder used a table that does not \
         describe the old code): {}; dsu said {out:?}\n{}",
        fx.state(),
        fx.log()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("dsu_throw_target"),
        "the apply should time out on the held thread: {out:?}"
    );
    catches_more(&mut fx, caught);
    assert_eq!(
        fx.code_between_attempts("target", &before),
        before,
        "a refused update changed the code"
    );

    // Once the thread has left, the update goes through and exceptions pass the new code.
    assert_eq!(fx.send("release"), "released");
    let out = dsu(&["apply", "-p", &pid, &patch]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the apply failed: {out:?}");
    // The frames differ, so the new code cannot share the old code's address range.
    assert!(stdout.contains(", redirect,"), "{stdout}");
    assert_eq!(fx.send("value"), "value -5000");
    let (caught, _) = counts(&mut fx);
    catches_more(&mut fx, caught);

    let out = dsu(&["revert", "-p", &pid]);
    assert!(out.status.success(), "the revert failed: {out:?}");
    let (caught, _) = counts(&mut fx);
    catches_more(&mut fx, caught);
    assert!(fx.alive(), "{}", fx.log());
}
