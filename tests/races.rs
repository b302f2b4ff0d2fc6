//! `dsu` commands that race each other, and a process that ends while one waits.
//!
//! The agent serves one request at a time (`docs/control-protocol.md`): concurrent commands
//! against one process run one after the other, each with its own answer, and none is lost or
//! applied twice. A process that exits or is killed while `dsu` waits for its agent makes
//! `dsu` stop at once with exit code 3 (`docs/cli.md`), not wait out its timeout.
//!
//! The target is `examples/busy_target` (worker threads calling `dsu_fixture_compute(7)` in
//! tight loops); patches are built with `cc` at test time. Needs the workspace built first
//! (`cargo build --workspace --all-targets`, as `scripts/test.sh` does).

mod support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Fixture, ORIGINAL, WAIT, cargo_bin, cc_object, finish, scratch};

/// Longest any one `dsu` run may take before the test fails instead of hanging: more than a
/// few updates in a row on a loaded machine, less than the `--timeout` of the runs that must
/// not wait theirs out.
const RUN_LIMIT: Duration = Duration::from_secs(25);

/// Patches of `dsu_fixture_compute` and what `dsu_fixture_compute(7)` gives with each (values
/// the fixture's workers accept).
const VERSIONS: [(&str, u64); 3] = [("x * 10", 70), ("x * 10 + 1", 71), ("x * 100", 700)];

/// `dsu_fixture_block` returning 100 more, and `dsu_fixture_compute` giving 70, in one patch.
const C_BLOCK_AND_COMPUTE: &str = "
#include <unistd.h>
unsigned long dsu_fixture_compute(unsigned long x) { return x * 10; }
unsigned long dsu_fixture_block(int fd) {
    char byte = 0;
    long n = read(fd, &byte, 1);
    return (unsigned long)n + 100;
}
";

// ---- helpers ----

fn busy_target(dir: &Path) -> Fixture {
    Fixture::start(dir, &cargo_bin("busy_target"), &["2"], &[])
}

/// The patches of [`VERSIONS`], built in `dir`, with their values.
fn versions(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    VERSIONS
        .iter()
        .enumerate()
        .map(|(i, (body, value))| {
            let source =
                format!("unsigned long dsu_fixture_compute(unsigned long x) {{ return {body}; }}");
            (cc_object(dir, &format!("v{i}"), &source, &[]), *value)
        })
        .collect()
}

/// Starts `dsu COMMAND -p PID ARGS..` without waiting for it.
fn spawn_dsu(fx: &Fixture, command: &str, args: &[&str]) -> Child {
    Command::new(cargo_bin("dsu"))
        .args([command, "-p", &fx.pid.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dsu")
}

fn spawn_apply(fx: &Fixture, patch: &Path, timeout: &str) -> Child {
    spawn_dsu(
        fx,
        "apply",
        &[patch.to_str().unwrap(), "--timeout", timeout],
    )
}

/// A `dsu` run that must have succeeded; its stdout.
fn succeeded(fx: &Fixture, what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}): {}stdout: {stdout}\nprocess log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        fx.log()
    );
    stdout
}

/// A `dsu` run that must have failed with `code` and one `dsu: ` line on stderr; that line.
fn failed(what: &str, out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: stderr: {stderr}; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{what}: not one line: {stderr:?}"
    );
    assert!(stderr.starts_with("dsu: "), "{what}: {stderr}");
    eprintln!("{what} answered: {stderr}");
    stderr.trim_end().to_string()
}

/// The id in the last line of `dsu apply` / `dsu revert`: `<verb> patch N in process ..`.
fn patch_id(stdout: &str, verb: &str) -> u64 {
    let summary = stdout.lines().last().unwrap_or("");
    summary
        .strip_prefix(&format!("{verb} patch "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("expected `{verb} patch N ..`, got {stdout:?}"))
}

/// `dsu status --json`: the patches in effect, oldest first, as (id, sha256).
fn status(fx: &Fixture) -> Vec<(u64, String)> {
    let out = finish(spawn_dsu(fx, "status", &["--json"]), RUN_LIMIT);
    let stdout = succeeded(fx, "dsu status --json", &out);
    let status: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("dsu status --json printed no JSON ({e}): {stdout}"));
    status["patches"]
        .as_array()
        .unwrap_or_else(|| panic!("no patches array: {status}"))
        .iter()
        .map(|p| {
            (
                p["id"].as_u64().expect("a numeric id"),
                p["sha256"].as_str().expect("a sha256").to_string(),
            )
        })
        .collect()
}

fn status_ids(fx: &Fixture) -> Vec<u64> {
    status(fx).into_iter().map(|(id, _)| id).collect()
}

/// SHA-256 of a file, hex, as `sha256sum` computes it.
fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().next().unwrap().to_string()
}

/// Waits until the agent has taken request `seq` (`consumed/<seq>.request.json`).
fn wait_taken(fx: &Fixture, seq: u64) {
    let taken = fx.control.join(format!("consumed/{seq}.request.json"));
    let deadline = Instant::now() + WAIT;
    while !taken.exists() {
        assert!(
            Instant::now() < deadline,
            "the agent never took request {seq}; log:\n{}",
            fx.log()
        );
        thread::sleep(Duration::from_millis(2));
    }
}

// ---- the tests ----

/// Three `dsu apply` and a `dsu status` at once: every apply succeeds, with ids 1, 2 and 3 in
/// the order the agent took them, and the newest is in effect. Then four `dsu revert` at once
/// with three patches applied: three revert them newest first, the fourth is told no patch
/// is applied, and the original code is back byte for byte.
#[test]
fn concurrent_applies_and_reverts_take_effect_one_after_the_other() {
    let dir = scratch("races-applies");
    let patches = versions(&dir);
    let mut fx = busy_target(&dir);
    let original = fx.code("compute");

    let applies: Vec<Child> = patches
        .iter()
        .map(|(patch, _)| spawn_apply(&fx, patch, "10"))
        .collect();
    let status_run = spawn_dsu(&fx, "status", &[]);
    let mut applied = Vec::new(); // (id, patch, value)
    for (child, (patch, value)) in applies.into_iter().zip(&patches) {
        let out = finish(child, RUN_LIMIT);
        let stdout = succeeded(&fx, &format!("dsu apply {}", patch.display()), &out);
        applied.push((patch_id(&stdout, "applied"), patch, *value));
    }
    succeeded(&fx, "dsu status", &finish(status_run, RUN_LIMIT));
    applied.sort_by_key(|(id, _, _)| *id);
    let ids: Vec<u64> = applied.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(ids, [1, 2, 3], "each apply its own id, none lost");

    // Listed oldest first, each id with the file of the apply that printed it.
    let listed = status(&fx);
    let expected: Vec<(u64, String)> = applied
        .iter()
        .map(|(id, patch, _)| (*id, sha256sum(patch)))
        .collect();
    assert_eq!(listed, expected);
    let newest = applied[2].2;
    assert_eq!(
        fx.compute(),
        newest,
        "the last one applied is not in effect"
    );
    fx.workers_see(newest);

    let reverts: Vec<Child> = (0..4).map(|_| spawn_dsu(&fx, "revert", &[])).collect();
    let mut reverted = Vec::new();
    let mut refusals = Vec::new();
    for child in reverts {
        let out = finish(child, RUN_LIMIT);
        if out.status.success() {
            reverted.push(patch_id(&String::from_utf8_lossy(&out.stdout), "reverted"));
        } else {
            refusals.push(failed("the extra dsu revert", &out, 1));
        }
    }
    reverted.sort_unstable();
    assert_eq!(reverted, [1, 2, 3], "refusals: {refusals:?}");
    assert_eq!(refusals.len(), 1);
    assert!(refusals[0].contains("no patch"), "{}", refusals[0]);

    assert_eq!(fx.compute(), ORIGINAL);
    fx.workers_see(ORIGINAL);
    assert!(status_ids(&fx).is_empty());
    assert_eq!(fx.code("compute"), original, "not the original code");
    fx.no_worker_errors();
}

/// An apply, a revert and a status at once, several rounds, with one patch applied before
/// each: whichever the agent takes first, both succeed, and what is in effect afterwards
/// (listed by `dsu status`, computed by the program) is what that order gives.
#[test]
fn apply_revert_and_status_racing_leave_the_process_consistent() {
    let dir = scratch("races-mixed");
    let patches = versions(&dir);
    let (base, base_value) = &patches[0];
    let (other, other_value) = &patches[1];
    let mut fx = busy_target(&dir);
    let apply_base = |fx: &Fixture| {
        let out = finish(spawn_apply(fx, base, "10"), RUN_LIMIT);
        patch_id(&succeeded(fx, "dsu apply", &out), "applied")
    };
    let mut before = apply_base(&fx);
    let mut orders = [0; 2];

    for round in 0..4 {
        let apply = spawn_apply(&fx, other, "10");
        let revert = spawn_dsu(&fx, "revert", &[]);
        let status_run = spawn_dsu(&fx, "status", &[]);
        let out = finish(apply, RUN_LIMIT);
        let new = patch_id(&succeeded(&fx, "dsu apply", &out), "applied");
        let out = finish(revert, RUN_LIMIT);
        let gone = patch_id(&succeeded(&fx, "dsu revert", &out), "reverted");
        succeeded(&fx, "dsu status", &finish(status_run, RUN_LIMIT));
        assert!(new > before, "round {round}: ids {before} then {new}");

        let (left, value) = if gone == before {
            orders[0] += 1; // the revert went first, then the apply
            (new, *other_value)
        } else {
            assert_eq!(gone, new, "round {round}: reverted neither patch");
            orders[1] += 1;
            (before, *base_value)
        };
        assert_eq!(status_ids(&fx), [left], "round {round}");
        assert_eq!(fx.compute(), value, "round {round}");
        fx.workers_see(value);

        // Back to the base patch alone for the next round.
        if left != before {
            let out = finish(spawn_dsu(&fx, "revert", &[]), RUN_LIMIT);
            succeeded(&fx, "dsu revert", &out);
            before = apply_base(&fx);
        }
    }
    eprintln!(
        "revert first: {} rounds, apply first: {}",
        orders[0], orders[1]
    );
    fx.no_worker_errors();
}

/// While an update retries (a thread sits in a function it replaces), a second `dsu apply`
/// waits its turn instead of running beside it, and `dsu status` answers from the last change,
/// saying the agent is busy. Once the thread leaves, both applies go through, in order.
#[test]
fn a_request_waits_its_turn_while_an_update_retries() {
    let dir = scratch("races-queued");
    let both = cc_object(&dir, "block_and_compute", C_BLOCK_AND_COMPUTE, &[]);
    let patches = versions(&dir);
    let (x100, x100_value) = &patches[2];
    let mut fx = busy_target(&dir);
    fx.expect("block", "blocking");

    let first = spawn_apply(&fx, &both, "30");
    wait_taken(&fx, 1);
    fx.wait_agent_retrying();
    let mut second = spawn_apply(&fx, x100, "30");

    // `dsu status` waits 3 s for the busy agent, then shows status.json. The second apply has
    // had that long to be served beside the first; it must still be waiting.
    let out = finish(spawn_dsu(&fx, "status", &[]), RUN_LIMIT);
    let text = succeeded(&fx, "dsu status", &out);
    assert!(text.contains("the agent is busy with an update"), "{text}");
    assert!(text.contains("no patch applied"), "{text}");
    assert!(
        second.try_wait().unwrap().is_none(),
        "the second apply was answered while the first was under way"
    );
    assert_eq!(fx.compute(), ORIGINAL);

    fx.expect("unblock", "unblocked 1");
    let out = finish(first, RUN_LIMIT);
    assert_eq!(
        patch_id(&succeeded(&fx, "the first apply", &out), "applied"),
        1
    );
    let out = finish(second, RUN_LIMIT);
    assert_eq!(
        patch_id(&succeeded(&fx, "the second apply", &out), "applied"),
        2
    );
    assert_eq!(fx.compute(), *x100_value);
    fx.workers_see(*x100_value);
    fx.expect("block", "blocking");
    fx.expect("unblock", "unblocked 101");
    assert_eq!(status_ids(&fx), [1, 2]);
    fx.no_worker_errors();
}

/// The process ends while `dsu apply` waits for a function to be left: `dsu` reports that it
/// exited (exit 3) as soon as it does, well before its 60 s timeout would have run out.
/// `how` ends it: `exit` (a normal exit while the agent is between attempts) or a `SIGKILL`.
fn process_ends_during_an_update(how: &str) {
    let dir = scratch(&format!("races-ends-{how}"));
    let both = cc_object(&dir, "block_and_compute", C_BLOCK_AND_COMPUTE, &[]);
    let mut fx = busy_target(&dir);
    fx.expect("block", "blocking");
    let apply = spawn_apply(&fx, &both, "60");
    wait_taken(&fx, 1);
    fx.wait_agent_retrying();

    match how {
        "exit" => fx.tell("exit"),
        _ => {
            // SAFETY: kill takes plain integers; the pid is our own child, not yet reaped.
            let sent = unsafe { libc::kill(fx.pid as libc::pid_t, libc::SIGKILL) };
            assert_eq!(sent, 0);
        }
    }
    let ended = fx.wait_exit();
    match how {
        "exit" => assert!(
            ended.success(),
            "the exit went wrong: {ended}; log:\n{}",
            fx.log()
        ),
        _ => {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(ended.signal(), Some(libc::SIGKILL), "{ended}");
        }
    }

    let out = finish(apply, RUN_LIMIT);
    let line = failed("dsu apply", &out, 3);
    assert!(
        line.contains(&format!(
            "process {} exited before its agent answered",
            fx.pid
        )),
        "{line}"
    );
    // And the process is gone for the next command too.
    let out = finish(spawn_dsu(&fx, "status", &[]), RUN_LIMIT);
    let line = failed("dsu status after the exit", &out, 3);
    assert!(line.contains("no such process"), "{line}");
}

#[test]
fn a_process_that_exits_during_an_update_is_reported_at_once() {
    process_ends_during_an_update("exit");
}

#[test]
fn a_process_killed_during_an_update_is_reported_at_once() {
    process_ends_during_an_update("kill");
}
