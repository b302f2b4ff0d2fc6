//! The life of patches in a real process: stacking, listing, reverting, and the in-process API.
//!
//! Each test starts its own `examples/busy_target` (worker threads calling
//! `dsu_fixture_compute(7)` in tight loops) with its own control directory, applies and reverts
//! patches built at test time with `rustc` and `cc` through the `dsu` command, and observes the
//! program's answers over its stdin protocol, `dsu status`, and its code bytes read through
//! `/proc/PID/mem`. The last test runs `examples/in_process`, which drives the same updates
//! through `dsu_agent::Agent`.
//!
//! Needs the workspace built first (`cargo build --workspace --all-targets`, as
//! `scripts/test.sh` does) for the example programs.

mod support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    Fixture, ORIGINAL, RUST_X10, RUST_X10_PLUS_1, cargo_bin, cc_object, finish, rustc_object,
    scratch,
};

/// `dsu_fixture_compute(7)` with each patch (`support::ORIGINAL` before any).
const X10: u64 = 70;
const X10_PLUS_1: u64 = 71;

/// A `dsu_fixture_block` that still reads its byte but returns 100 more (`unblocked 101`
/// instead of `unblocked 1`). It calls libc's `read`, so a thread blocked in it has a return
/// address into the new version.
const C_BLOCK_PLUS_100: &str = "
#include <unistd.h>
unsigned long dsu_fixture_block(int fd) {
    char byte = 0;
    long n = read(fd, &byte, 1);
    return (unsigned long)n + 100;
}
";

/// The new `dsu_example_price` of `examples/in_process` (the original is `qty * 10`).
const RUST_PRICE_X9: &str = r#"
#[unsafe(no_mangle)]
pub extern "C" fn dsu_example_price(qty: u64) -> u64 {
    qty * 9
}
"#;

/// Longest any one `dsu` run or example run may take before the test fails instead of hanging.
const RUN_LIMIT: Duration = Duration::from_secs(20);

/// The agent's handle is shared with threads (an admin endpoint's handler runs on one).
const _: () = {
    const fn shareable<T: Send + Sync + Clone>() {}
    shareable::<dsu_agent::Agent>()
};

// ---- helpers ----

fn busy_target(dir: &Path) -> Fixture {
    let program = cargo_bin("busy_target");
    Fixture::start(dir, &program, &["2"], &[])
}

/// Starts `dsu COMMAND -p PID ARGS..` without waiting for it.
fn spawn_dsu(fx: &Fixture, command: &str, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dsu"))
        .args([command, "-p", &fx.pid.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dsu")
}

fn dsu(fx: &Fixture, command: &str, args: &[&str]) -> Output {
    finish(spawn_dsu(fx, command, args), RUN_LIMIT)
}

/// A `dsu` run that must succeed; returns its stdout.
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

/// A `dsu` run that must be refused: exit 1, one `dsu: ` line on stderr, which it returns.
fn refused(fx: &Fixture, what: &str, out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: expected exit 1; stderr: {stderr}; stdout: {}\nprocess log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        fx.log()
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

/// What `dsu apply` printed: the id and the line of the one function it replaced.
struct ApplyOutput {
    id: u64,
    function_line: String,
}

/// `dsu apply` that must succeed.
fn apply(fx: &Fixture, patch: &Path) -> ApplyOutput {
    let what = format!("dsu apply {}", patch.display());
    let stdout = succeeded(fx, &what, &dsu(fx, "apply", &[patch.to_str().unwrap()]));
    let lines: Vec<&str> = stdout.lines().collect();
    let [function_line, summary] = lines[..] else {
        panic!("{what}: expected a function line and a summary, got {stdout:?}")
    };
    ApplyOutput {
        id: patch_id(summary, "applied"),
        function_line: function_line.to_string(),
    }
}

/// `dsu revert` (of `id`, or the newest) that must succeed; returns the id it reverted.
fn revert(fx: &Fixture, id: Option<u64>) -> u64 {
    let id = id.map(|id| id.to_string());
    let args: Vec<&str> = id.as_deref().into_iter().collect();
    let stdout = succeeded(fx, "dsu revert", &dsu(fx, "revert", &args));
    patch_id(stdout.lines().last().unwrap_or(""), "reverted")
}

/// The id in `applied patch N in process ..` / `reverted patch N in process ..`.
fn patch_id(summary: &str, verb: &str) -> u64 {
    summary
        .strip_prefix(&format!("{verb} patch "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("expected `{verb} patch N ..`, got {summary:?}"))
}

/// `dsu status -p PID --json`: the `patches` array of `status.json`.
fn status_patches(fx: &Fixture) -> Vec<Value> {
    let stdout = succeeded(fx, "dsu status --json", &dsu(fx, "status", &["--json"]));
    let status: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("dsu status --json printed no JSON ({e}): {stdout}"));
    assert_eq!(status["pid"], u64::from(fx.pid), "{status}");
    status["patches"]
        .as_array()
        .unwrap_or_else(|| panic!("no patches array: {status}"))
        .clone()
}

/// The ids of the patches in effect, oldest first, as `dsu status --json` lists them.
fn status_ids(fx: &Fixture) -> Vec<u64> {
    status_patches(fx)
        .iter()
        .map(|p| p["id"].as_u64().expect("a patch has a numeric id"))
        .collect()
}

/// How many `dsu` requests the agent has taken (moved to `consumed/<seq>.request.json`).
fn requests_taken(fx: &Fixture) -> usize {
    std::fs::read_dir(fx.control.join("consumed"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".request.json"))
                .count()
        })
        .unwrap_or(0)
}

/// Waits until the agent has taken `count` requests, so the last one is under way.
fn wait_taken(fx: &Fixture, count: usize) {
    let deadline = Instant::now() + support::WAIT;
    while requests_taken(fx) < count {
        assert!(
            Instant::now() < deadline,
            "the agent never took request {count}; log:\n{}",
            fx.log()
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// SHA-256 of a file, hex, as `sha256sum` computes it.
fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().next().unwrap().to_string()
}

/// The whole code of the fixture function the program printed as `name`.
fn code(fx: &Fixture, name: &str) -> Vec<u8> {
    fx.code(name)
}

// ---- the tests ----

/// Two patches of one function stack; `dsu status` lists both with what identifies them; two
/// reverts give back the original code byte for byte; a third is refused; applying again
/// after reverting works.
#[test]
fn stacked_patches_are_listed_and_revert_to_the_original_bytes() {
    let dir = scratch("lifecycle-stack");
    let patches = [
        rustc_object(&dir, "x10", RUST_X10),
        rustc_object(&dir, "x10_plus_1", RUST_X10_PLUS_1),
    ];
    let mut fx = busy_target(&dir);
    let original = code(&fx, "compute");
    assert_eq!(fx.compute(), ORIGINAL);
    assert!(status_ids(&fx).is_empty(), "nothing applied yet");

    let first = apply(&fx, &patches[0]);
    assert_eq!(fx.compute(), X10);
    let second = apply(&fx, &patches[1]);
    assert_eq!(fx.compute(), X10_PLUS_1);
    assert!(first.id < second.id, "ids {} then {}", first.id, second.id);
    let patched = code(&fx, "compute");
    assert_ne!(patched, original, "the applies did not change the entry");

    // `status --json`: both, oldest first, each with what identifies it.
    let listed = status_patches(&fx);
    assert_eq!(listed.len(), 2, "{listed:?}");
    for ((entry, applied), file) in listed.iter().zip([&first, &second]).zip(&patches) {
        assert_eq!(entry["id"], applied.id, "{entry}");
        let recorded = entry["file"].as_str().expect("file is a string");
        assert!(
            recorded.ends_with(&format!("consumed/{}.patch", applied.id)),
            "file {recorded:?} is not where dsu delivered patch {}",
            applied.id
        );
        let sha256 = entry["sha256"].as_str().expect("sha256 is a string");
        assert!(
            sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()),
            "sha256 {sha256:?} is not 64 hex digits"
        );
        assert_eq!(sha256, sha256sum(file), "sha256 of {}", file.display());
        let functions = entry["functions"].as_array().expect("functions array");
        assert_eq!(functions.len(), 1, "{entry}");
        let f = &functions[0];
        assert_eq!(f["name"], "dsu_fixture_compute", "{entry}");
        assert_eq!(
            f["old_address"],
            format!("{:#x}", fx.address("compute")),
            "{entry}"
        );
        let strategy = f["strategy"].as_str().expect("strategy is a string");
        let new_address = f["new_address"].as_str().expect("new_address is a string");
        // The same function, placed and switched as `dsu apply` said.
        assert!(
            applied
                .function_line
                .contains(&format!("-> {new_address}, {strategy},")),
            "status {f} does not match what apply printed: {}",
            applied.function_line
        );
    }
    assert_ne!(listed[0]["sha256"], listed[1]["sha256"]);

    // Human status names both patches.
    let human = succeeded(&fx, "dsu status", &dsu(&fx, "status", &[]));
    for id in [first.id, second.id] {
        assert!(
            human
                .lines()
                .any(|l| l.starts_with(&format!("patch {id}:"))),
            "dsu status does not list patch {id}:\n{human}"
        );
    }

    // Newest first, each revert back one version.
    assert_eq!(revert(&fx, None), second.id);
    assert_eq!(fx.compute(), X10);
    assert_eq!(status_ids(&fx), [first.id]);
    assert_eq!(revert(&fx, None), first.id);
    assert_eq!(fx.compute(), ORIGINAL);
    assert_eq!(status_ids(&fx), Vec::<u64>::new());
    assert_eq!(code(&fx, "compute"), original, "not the original code");

    let line = refused(&fx, "third dsu revert", &dsu(&fx, "revert", &[]));
    assert!(line.contains("no patch"), "{line}");
    assert_eq!(code(&fx, "compute"), original);

    // The function can be patched again, and reverted again.
    let again = apply(&fx, &patches[1]);
    assert!(again.id > second.id, "ids are never reused: {}", again.id);
    assert_eq!(fx.compute(), X10_PLUS_1);
    assert_eq!(status_ids(&fx), [again.id]);
    assert_ne!(code(&fx, "compute"), original);
    assert_eq!(revert(&fx, Some(again.id)), again.id);
    assert_eq!(fx.compute(), ORIGINAL);
    assert_eq!(code(&fx, "compute"), original);
    fx.no_worker_errors();
}

/// A patch that a newer patch replaces again cannot be reverted before the newer one; by id,
/// in the right order, both can.
#[test]
fn revert_under_a_newer_patch_of_the_same_function_is_refused() {
    let dir = scratch("lifecycle-superseded");
    let x10 = rustc_object(&dir, "x10", RUST_X10);
    let x10_plus_1 = rustc_object(&dir, "x10_plus_1", RUST_X10_PLUS_1);
    let mut fx = busy_target(&dir);
    let original = code(&fx, "compute");
    let first = apply(&fx, &x10).id;
    let second = apply(&fx, &x10_plus_1).id;
    let patched = code(&fx, "compute");

    let out = dsu(&fx, "revert", &[&first.to_string()]);
    let line = refused(&fx, "dsu revert of the older patch", &out);
    assert!(
        line.contains(&format!("patch {first} cannot be reverted"))
            && line.contains(&format!("revert patch {second} first")),
        "{line}"
    );
    assert!(line.contains("dsu_fixture_compute"), "{line}");
    assert_eq!(
        fx.compute(),
        X10_PLUS_1,
        "the refused revert changed something"
    );
    assert_eq!(code(&fx, "compute"), patched);
    assert_eq!(status_ids(&fx), [first, second]);

    assert_eq!(revert(&fx, Some(second)), second);
    assert_eq!(fx.compute(), X10);
    assert_eq!(revert(&fx, Some(first)), first);
    assert_eq!(fx.compute(), ORIGINAL);
    assert_eq!(code(&fx, "compute"), original);
    fx.no_worker_errors();
}

/// A revert waits, as an apply does, while a thread is inside the code it would remove: with
/// a short timeout it is refused naming the function and nothing changes; a revert under way
/// completes once the thread has left. With a new version small enough to be placed over the
/// old one (if the engine does that) and with one that cannot be.
/// A patch whose edit lies under a newer patch's edit of another function cannot be reverted
/// before the newer one: the first patch rewrote `dsu_h`'s call of `dsu_f`, the second
/// replaced `dsu_h` over those bytes; writing the call back would tear the second's code. One
/// whose edits lie elsewhere can.
#[test]
fn revert_under_a_newer_patch_that_overwrote_its_call_site_is_refused() {
    let dir = scratch("lifecycle-overlap");
    // Larger than dsu_f: redirected, its callers' direct calls rewritten.
    let f = cc_object(
        &dir,
        "f",
        "long dsu_f(long x) { volatile long k = 10; return x * k + 2; }",
        &[],
    );
    let h = cc_object(&dir, "h", "long dsu_h(long x) { return x * 5 + 3; }", &[]);
    let mut fx = support::start_two_calls(&dir);
    assert_eq!(fx.send("h"), "h 16");
    let original = code(&fx, "h");

    let first = apply(&fx, &f);
    assert!(
        first.function_line.contains("2 call sites rewritten"),
        "main's and dsu_h's: {}",
        first.function_line
    );
    assert_eq!(fx.send("h"), "h 144");
    let second = apply(&fx, &h);
    assert_eq!(fx.send("h"), "h 38");
    let patched = code(&fx, "h");

    let out = dsu(&fx, "revert", &[&first.id.to_string()]);
    let line = refused(&fx, "dsu revert of the older patch", &out);
    assert!(
        line.contains(&format!("patch {} cannot be reverted", first.id))
            && line.contains(&format!("revert patch {} first", second.id))
            && line.contains("changes dsu_h again"),
        "{line}"
    );
    assert_eq!(code(&fx, "h"), patched, "the refused revert changed dsu_h");
    assert_eq!((fx.send("h"), fx.send("f")), ("h 38".into(), "f 72".into()));
    assert_eq!(status_ids(&fx), [first.id, second.id]);

    // In the right order both go, and dsu_h is what it was.
    assert_eq!(revert(&fx, Some(second.id)), second.id);
    assert_eq!(fx.send("h"), "h 144");
    assert_eq!(revert(&fx, Some(first.id)), first.id);
    assert_eq!((fx.send("h"), fx.send("f")), ("h 16".into(), "f 8".into()));
    assert_eq!(code(&fx, "h"), original, "not the original code");

    // A newer patch of a function whose edits lie elsewhere does not hold an older one back.
    let g = cc_object(
        &dir,
        "g",
        "long dsu_g(long x) { volatile long k = 100; return x * k + 2; }",
        &[],
    );
    let third = apply(&fx, &f);
    let fourth = apply(&fx, &g);
    assert_eq!(revert(&fx, Some(third.id)), third.id);
    let answers = [fx.send("f"), fx.send("g"), fx.send("h")];
    assert_eq!(answers, ["f 8", "g 702", "h 16"]);
    assert_eq!(revert(&fx, None), fourth.id);
    assert_eq!(fx.send("g"), "g 9");
    assert!(fx.alive(), "{}", fx.log());
}

#[test]
fn revert_waits_while_a_thread_is_inside_the_patch() {
    revert_waits_while_blocked("lifecycle-active", C_BLOCK_PLUS_100);
}

/// As above, with a new version far larger than the old one: it lives in the patch's own
/// mapping, which the revert must neither unmap nor leave while the thread is in it.
#[test]
fn revert_waits_while_a_thread_is_inside_a_moved_patch() {
    let padding = "    sink += 1;\n".repeat(64);
    let source = C_BLOCK_PLUS_100.replace(
        "    char byte = 0;\n",
        &format!("    volatile unsigned long sink = 0;\n{padding}    char byte = 0;\n"),
    );
    let function_line = revert_waits_while_blocked("lifecycle-active-moved", &source);
    let (old, new) = function_line
        .split_once(": ")
        .and_then(|(_, rest)| rest.split_once(','))
        .and_then(|(addresses, _)| addresses.split_once(" -> "))
        .unwrap_or_else(|| panic!("no `old -> new` in {function_line:?}"));
    assert_ne!(old, new, "a large new version must be placed elsewhere");
}

/// The scenario of the two tests above; returns what `dsu apply` printed for the function.
fn revert_waits_while_blocked(name: &str, source: &str) -> String {
    let dir = scratch(name);
    let patch = cc_object(&dir, "block_plus_100", source, &[]);
    let mut fx = busy_target(&dir);
    let original = code(&fx, "block");
    let applied = apply(&fx, &patch);
    let id = applied.id;
    let patched = code(&fx, "block");
    assert_ne!(patched, original);

    // A thread now blocks in `read`, called from the new version.
    fx.expect("block", "blocking");
    let started = Instant::now();
    let out = dsu(&fx, "revert", &["--timeout", "1"]);
    let waited = started.elapsed();
    let line = refused(&fx, "dsu revert while blocked", &out);
    assert!(line.contains("active"), "{line}");
    assert!(
        waited >= Duration::from_millis(800),
        "refused after {waited:?}, without waiting out its 1 s"
    );
    assert_eq!(
        code(&fx, "block"),
        patched,
        "the refused revert changed code"
    );
    assert_eq!(status_ids(&fx), [id]);

    // A revert with time to wait completes once the thread returns.
    let taken = requests_taken(&fx);
    let pending = spawn_dsu(&fx, "revert", &["--timeout", "10"]);
    wait_taken(&fx, taken + 1);
    // Once the agent has tried and backed off, that attempt changed nothing. (Read between
    // attempts: each puts a breakpoint on the entry for a few microseconds.)
    fx.wait_agent_retrying();
    assert_eq!(
        fx.code_between_attempts("block", &patched),
        patched,
        "reverted under a blocked thread"
    );
    // The thread returns through the new code, still mapped and still in place.
    fx.expect("unblock", "unblocked 101");
    let out = finish(pending, RUN_LIMIT);
    let stdout = succeeded(&fx, "dsu revert after unblock", &out);
    assert_eq!(
        patch_id(stdout.lines().last().unwrap_or(""), "reverted"),
        id
    );
    assert_eq!(code(&fx, "block"), original);
    assert!(status_ids(&fx).is_empty());
    fx.expect("block", "blocking");
    fx.expect("unblock", "unblocked 1");
    fx.no_worker_errors();
    // Checked last, so that everything above is checked even while this fails.
    assert!(
        line.contains("dsu_fixture_block is active"),
        "the refusal does not name the function the thread is in: {line}"
    );
    applied.function_line
}

/// Reverting an id that is not applied (never was, or is already reverted) is refused with the
/// id in the message, and changes nothing.
#[test]
fn revert_of_an_unknown_id_is_refused_naming_it() {
    let dir = scratch("lifecycle-unknown");
    let patch = rustc_object(&dir, "x10", RUST_X10);
    let mut fx = busy_target(&dir);
    let id = apply(&fx, &patch).id;
    let patched = code(&fx, "compute");

    let line = refused(&fx, "dsu revert 4242", &dsu(&fx, "revert", &["4242"]));
    assert!(line.contains("4242"), "{line}");
    assert_eq!(fx.compute(), X10);
    assert_eq!(code(&fx, "compute"), patched);
    assert_eq!(status_ids(&fx), [id]);

    assert_eq!(revert(&fx, Some(id)), id);
    let out = dsu(&fx, "revert", &[&id.to_string()]);
    let line = refused(&fx, "dsu revert of a reverted id", &out);
    assert!(line.contains(&format!("id {id}")), "{line}");
    assert_eq!(fx.compute(), ORIGINAL);
    fx.no_worker_errors();
}

/// `examples/in_process` applies, lists and reverts a patch through `dsu_agent::Agent`, and
/// reports errors with their message and a non-zero exit.
#[test]
fn in_process_api_applies_lists_and_reverts() {
    let dir = scratch("lifecycle-in-process");
    let patch = rustc_object(&dir, "price_x9", RUST_PRICE_X9);
    let example = cargo_bin("in_process");
    let run = |arg: &Path| {
        let child = Command::new(&example)
            .arg(arg)
            .env("DSU_CONTROL_DIR", dir.join("ctl"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run examples/in_process");
        let out = finish(child, RUN_LIMIT);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status, stdout, stderr)
    };

    let (status, stdout, stderr) = run(&patch);
    assert!(status.success(), "{status}: {stderr}\nstdout:\n{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    let file = patch.display().to_string();
    let [before, applied, after, listed, reverted, restored, empty] = lines[..] else {
        panic!("unexpected output:\n{stdout}")
    };
    assert_eq!(before, "price(3) = 30");
    assert!(
        applied.starts_with(&format!("applied patch 1 from {file} in "))
            && applied.contains(": dsu_example_price (")
            && applied.ends_with(')'),
        "{applied}"
    );
    assert_eq!(after, "price(3) = 27", "the patch did not take effect");
    assert_eq!(
        listed,
        format!(
            "patch 1: {file}, sha256 {}, replaces dsu_example_price",
            sha256sum(&patch)
        )
    );
    assert_eq!(reverted, "reverted patch 1");
    assert_eq!(restored, "price(3) = 30", "the revert did not take effect");
    assert_eq!(empty, "no patch applied");

    // Errors: their message, exit 1, the program otherwise as it was.
    let missing = dir.join("missing.o");
    let (status, stdout, stderr) = run(&missing);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stdout, "price(3) = 30\n");
    assert!(
        stderr.starts_with(&format!(
            "in_process: cannot read patch {}",
            missing.display()
        )),
        "{stderr}"
    );
    let source = dir.join("price_x9.rs");
    let (status, stdout, stderr) = run(&source);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stdout, "price(3) = 30\n");
    assert!(
        stderr.starts_with("in_process: invalid patch: not an ELF file"),
        "{stderr}"
    );
}
