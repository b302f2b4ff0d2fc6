//! Debuggers see new code (issue 11): gdb attached to a patched process names the patched
//! function in a backtrace, unwinds out of it into its caller, and no longer knows it once the
//! patch is reverted. The agent announces each patch through GDB's JIT interface.
//!
//! Runs `tests/fixtures/busy.c` linked with `libdsu_agent.a` and started with
//! `LD_PRELOAD=libdsu_agent.so` (the two places the interface's symbols can live). Skipped,
//! with a message, without `gdb` or when Yama forbids attaching (`ptrace_scope` 2 or 3); the
//! fixture lets any process of its user attach, which `ptrace_scope` 1 requires.
//!
//! Needs `cargo build --workspace --all-targets` first, for `dsu` and the agent's libraries.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use support::{Fixture, cargo_bin, cc_object, cc_program, finish, scratch};

const BUSY_C: &str = include_str!("fixtures/busy.c");

/// The fixture's `dsu_fixture_block`, returning 100 more; it blocks in `read` like the
/// original. Built without frame pointers, so that only its unwind tables lead a debugger
/// back to its caller.
const PATCH: &str = r#"
#include <stdint.h>
#include <unistd.h>

uint64_t dsu_fixture_block(int fd) {
    char byte = 0;
    ssize_t n = read(fd, &byte, 1);
    return (uint64_t)n + 100;
}
"#;

/// Why these tests cannot run here, if they cannot.
fn unusable() -> Option<String> {
    let found = Command::new("sh")
        .args(["-c", "command -v gdb"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        return Some("gdb is not installed".into());
    }
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0);
    (scope >= 2).then(|| format!("Yama's ptrace_scope is {scope}: gdb may not attach"))
}

macro_rules! require_gdb {
    () => {
        if let Some(why) = unusable() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

fn linked(dir: &Path) -> Fixture {
    let archive = cargo_bin("libdsu_agent.a");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("dsu-agent/include");
    let mut flags = vec![
        "-pthread".to_string(),
        "-DDSU_LINKED".to_string(),
        "-DDSU_FIXTURE_ANY_TRACER".to_string(),
        format!("-I{}", include.display()),
        archive.display().to_string(),
    ];
    flags.extend(support::NATIVE_LIBS.iter().map(|l| l.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let program = cc_program(dir, "busy_linked", &[("busy.c", BUSY_C)], &flags);
    Fixture::start(dir, &program, &["0"], &[])
}

fn preloaded(dir: &Path) -> Fixture {
    let library = cargo_bin("libdsu_agent.so");
    let program = cc_program(
        dir,
        "busy_plain",
        &[("busy.c", BUSY_C)],
        &["-pthread", "-DDSU_FIXTURE_ANY_TRACER"],
    );
    Fixture::start(dir, &program, &["0"], &[("LD_PRELOAD", &library)])
}

/// Runs gdb attached to `pid` with `commands`; returns what it printed (stdout and stderr).
fn gdb(pid: u32, commands: &[&str]) -> String {
    let mut cmd = Command::new("gdb");
    cmd.args(["-nx", "-batch", "-p", &pid.to_string()])
        .env_remove("DEBUGINFOD_URLS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for c in commands {
        cmd.args(["-ex", c]);
    }
    let out = finish(
        cmd.spawn().expect("run gdb"),
        std::time::Duration::from_secs(90),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("ptrace: Operation not permitted"),
        "gdb may not attach:\n{text}"
    );
    text
}

/// `dsu CMD -p PID ARGS..`, which must succeed; returns its stdout.
fn dsu(fx: &Fixture, command: &str, args: &[&str]) -> String {
    let pid = fx.pid.to_string();
    let mut all = vec![command, "-p", &pid];
    all.extend(args);
    let out = support::dsu(&all);
    assert!(
        out.status.success(),
        "dsu {all:?} failed: {}\nprocess log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        fx.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The address of the new code of the newest patch's first function, from `dsu status`.
fn new_address(fx: &Fixture) -> usize {
    let status: serde_json::Value =
        serde_json::from_str(&dsu(fx, "status", &["--json"])).expect("status is JSON");
    let patches = status["patches"].as_array().expect("patches");
    let f = &patches.last().expect("a patch")["functions"][0];
    assert_eq!(f["name"], "dsu_fixture_block");
    assert_eq!(
        f["strategy"], "redirect",
        "the test needs new code elsewhere"
    );
    let hex = f["new_address"].as_str().expect("new_address");
    usize::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap()
}

/// The frames of the backtrace of the thread blocked in `dsu_fixture_block` (whose stack
/// names it), as gdb prints them: `#N  0x... in NAME (...) ...`.
fn blocked_thread_frames(bt: &str) -> Vec<String> {
    let mut threads: Vec<Vec<String>> = Vec::new();
    for line in bt.lines() {
        if line.starts_with("Thread ") {
            threads.push(Vec::new());
        } else if line.starts_with('#')
            && let Some(frames) = threads.last_mut()
        {
            frames.push(line.to_string());
        }
    }
    threads
        .into_iter()
        .find(|frames| frames.iter().any(|f| f.contains("dsu_fixture_block")))
        .unwrap_or_else(|| panic!("no thread's backtrace names dsu_fixture_block:\n{bt}"))
}

/// The pc of a frame line (`#1  0x00007f.. in ...`); `None` for frame 0 printed without one.
fn frame_pc(frame: &str) -> Option<usize> {
    let word = frame.split_whitespace().nth(1)?;
    usize::from_str_radix(word.strip_prefix("0x")?, 16).ok()
}

fn patched_function_is_named_and_unwound(mut fx: Fixture, dir: &Path) {
    let patch = cc_object(dir, "block_plus_100", PATCH, &["-fomit-frame-pointer"]);
    dsu(&fx, "apply", &[patch.to_str().unwrap()]);
    let new = new_address(&fx);
    fx.expect("block", "blocking");

    let info_symbol = format!("info symbol {new:#x}");
    let out = gdb(fx.pid, &["thread apply all bt", &info_symbol]);
    let frames = blocked_thread_frames(&out);
    let at = frames
        .iter()
        .position(|f| f.contains(" in dsu_fixture_block "))
        .unwrap_or_else(|| panic!("no frame in dsu_fixture_block:\n{}", frames.join("\n")));
    let pc = frame_pc(&frames[at]).expect("a return address");
    assert!(
        (new..new + 0x1000).contains(&pc),
        "the frame named dsu_fixture_block is not in the new code at {new:#x}:\n{}",
        frames.join("\n")
    );
    // Unwinding out of the new code (no frame pointer: its `.eh_frame`) reaches its caller.
    assert!(
        frames
            .get(at + 1)
            .is_some_and(|f| f.contains(" in blocker ")),
        "the frame after the patched function is not its caller `blocker`:\n{}",
        frames.join("\n")
    );
    assert!(
        out.contains("dsu_fixture_block in section .text"),
        "gdb does not name the new code:\n{out}"
    );
    assert_eq!(fx.send("unblock"), "unblocked 101", "the patch did not run");

    dsu(&fx, "revert", &[]);
    let out = gdb(fx.pid, &[&info_symbol]);
    assert!(
        out.contains(&format!("No symbol matches {new:#x}")),
        "gdb still names the reverted patch's code:\n{out}"
    );
    fx.expect("compute", &format!("compute {}", support::ORIGINAL));
}

/// gdb attached and running the program while a patch is applied and reverted: it learns of
/// each change at its breakpoint on `__jit_debug_register_code`, without attaching again.
#[test]
fn an_attached_gdb_learns_of_an_apply_and_a_revert_as_they_happen() {
    require_gdb!();
    let dir = scratch("gdb-attached");
    let mut fx = linked(&dir);
    let patch = cc_object(&dir, "block_plus_100", PATCH, &["-fomit-frame-pointer"]);
    let functions = "info functions ^dsu_fixture_block$";
    // Signals (the agent's stop signal among them) go to the program unseen; an interrupt
    // from the test stops it for the commands that follow.
    let mut gdb = AttachedGdb::start(
        fx.pid,
        &[
            "handle all nostop noprint pass",
            RUNNING,
            "continue",
            "thread apply all bt",
            functions,
            RUNNING,
            "continue",
            functions,
        ],
    );
    gdb.wait_running();
    dsu(&fx, "apply", &[patch.to_str().unwrap()]);
    let new = new_address(&fx);
    fx.expect("block", "blocking");
    gdb.interrupt(&fx);
    gdb.wait_running();
    assert_eq!(fx.send("unblock"), "unblocked 101", "the patch did not run");
    dsu(&fx, "revert", &[]);
    fx.expect("compute", &format!("compute {}", support::ORIGINAL));
    gdb.interrupt(&fx);
    let out = gdb.finish();

    let (applied, reverted) = out
        .split_once(INTERRUPTED)
        .and_then(|(_, rest)| rest.split_once(INTERRUPTED))
        .unwrap_or_else(|| panic!("gdb did not stop twice:\n{out}"));
    let frames = blocked_thread_frames(applied);
    let frame = frames
        .iter()
        .find(|f| f.contains(" in dsu_fixture_block "))
        .unwrap_or_else(|| panic!("no frame in dsu_fixture_block:\n{applied}"));
    let pc = frame_pc(frame).expect("a return address");
    assert!(
        (new..new + 0x1000).contains(&pc),
        "not the new code:\n{applied}"
    );
    // `info functions` lists the new code among the symbols without debugging information,
    // next to the original's entry of busy.c, until the revert.
    let listed = |text: &str| {
        text.lines().any(|l| {
            l.trim_start().starts_with(&format!("{new:#018x}")) && l.ends_with(" dsu_fixture_block")
        })
    };
    assert!(
        listed(applied),
        "gdb does not list the new code:\n{applied}"
    );
    assert!(
        !listed(reverted),
        "gdb still lists the reverted code:\n{reverted}"
    );
}

/// What gdb is told to print just before it lets the program run on (in batch mode it
/// prints no `Continuing.`).
const RUNNING: &str = "echo dsu-test: running\\n";

/// What gdb prints when the program stops on the test's interrupt.
const INTERRUPTED: &str = "received signal SIGINT";

/// gdb attached to a process, run with commands in the background, its output read as it
/// comes.
struct AttachedGdb {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl AttachedGdb {
    fn start(pid: u32, commands: &[&str]) -> AttachedGdb {
        use std::io::BufRead;
        let mut cmd = Command::new("gdb");
        cmd.args(["-nx", "-batch", "-p", &pid.to_string()])
            .env_remove("DEBUGINFOD_URLS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for c in commands {
            cmd.args(["-ex", c]);
        }
        let mut child = cmd.spawn().expect("run gdb");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        AttachedGdb {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits until gdb is about to let the program run on ([`RUNNING`]); whatever the test
    /// asks of the program then waits until it does.
    fn wait_running(&mut self) {
        let marks = |seen: &[String]| seen.iter().filter(|l| *l == "dsu-test: running").count();
        let wanted = marks(&self.seen) + 1;
        while marks(&self.seen) < wanted {
            match self.lines.recv_timeout(std::time::Duration::from_secs(60)) {
                Ok(line) => self.seen.push(line),
                Err(e) => panic!("gdb did not continue ({e}):\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Stops the program with an interrupt, as ^C in gdb would; gdb then runs its next
    /// commands.
    fn interrupt(&self, fx: &Fixture) {
        // SAFETY: sends a signal to the fixture's process, which gdb intercepts.
        assert_eq!(unsafe { libc::kill(fx.pid as i32, libc::SIGINT) }, 0);
    }

    /// Waits for gdb to end (it detaches after its last command); returns all it printed.
    fn finish(mut self) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("gdb did not end:\n{}", self.seen.join("\n"));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.seen.extend(self.lines.iter());
        self.seen.join("\n")
    }
}

#[test]
fn gdb_names_and_unwinds_patched_code_of_a_program_linked_with_the_agent() {
    require_gdb!();
    let dir = scratch("gdb-linked");
    let fx = linked(&dir);
    patched_function_is_named_and_unwound(fx, &dir);
}

#[test]
fn gdb_names_and_unwinds_patched_code_under_ld_preload() {
    require_gdb!();
    let dir = scratch("gdb-preloaded");
    let fx = preloaded(&dir);
    patched_function_is_named_and_unwound(fx, &dir);
}
