//! The control socket against real programs as servers run: a program that blanks its
//! environment and takes the trigger signal over, one started with an `XDG_RUNTIME_DIR` the
//! operator lacks, one in another mount namespace, a peer of another user, a `signalfd`
//! daemon, the API in a `fork()`ed child, and what a process leaves behind when it exits.
//!
//! The C programs (`tests/fixtures/plain.c`, `hupd.c`, `peer_client.c`) are built at test
//! time and made patchable with `LD_PRELOAD=libdsu_agent.so`; `dsu` runs with an empty
//! environment, so it can only find the agents through their sockets. Needs the workspace
//! built first (`scripts/test.sh` does) for `libdsu_agent.so` and `examples/fork_child`.

mod support;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::{Fixture, ORIGINAL, WAIT, cargo_bin, cc_object, cc_program, finish, scratch};

const PLAIN_C: &str = include_str!("fixtures/plain.c");
const HUPD_C: &str = include_str!("fixtures/hupd.c");
const PEER_CLIENT_C: &str = include_str!("fixtures/peer_client.c");

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// `dsu_fixture_compute(7)` after [`C_X10`].
const X10: u64 = 70;

const C_X10: &str = "
#include <stdint.h>
uint64_t dsu_fixture_compute(uint64_t x) { return x * 10; }
";

/// Starts `tests/fixtures/plain.c` under `LD_PRELOAD` with `flags` and the environment
/// `env` (on top of the fixture's own `DSU_CONTROL_DIR`).
fn plain(dir: &Path, flags: &str, env: &[(&str, &Path)]) -> Fixture {
    let program = cc_program(dir, "plain", &[("plain.c", PLAIN_C)], &[]);
    let library = cargo_bin("libdsu_agent.so");
    let mut all = vec![("LD_PRELOAD", library.as_path())];
    all.extend_from_slice(env);
    Fixture::start(dir, &program, &[flags], &all)
}

/// `dsu` with an empty environment: nothing of the target's environment to go by.
fn dsu(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_dsu"))
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finish(child, Duration::from_secs(30))
}

fn succeeded(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn apply(pid: u32, patch: &Path) -> String {
    let patch = patch.display().to_string();
    succeeded(
        "dsu apply",
        &dsu(&["apply", "-p", &pid.to_string(), &patch]),
    )
}

fn status_json(pid: u32) -> serde_json::Value {
    let out = dsu(&["status", "-p", &pid.to_string(), "--json"]);
    serde_json::from_str(&succeeded("dsu status --json", &out)).unwrap()
}

/// The patch every test applies, compiled once per test directory.
fn x10_patch(dir: &Path) -> PathBuf {
    cc_object(dir, "x10", C_X10, &[])
}

#[test]
fn a_program_that_blanks_its_environ_and_takes_the_trigger_signal_is_found_and_patched() {
    let dir = scratch("socket-takeover");
    // Longer than sun_path allows: the agent binds through the directory's descriptor.
    let control = dir.join("c".repeat(60)).join("d".repeat(60));
    let patch = x10_patch(&dir);
    let mut fx = plain(&dir, "eu", &[("DSU_CONTROL_DIR", &control)]);
    let environ = fs::read(format!("/proc/{}/environ", fx.pid)).unwrap();
    assert!(
        environ.iter().all(|&b| b == 0),
        "the program did not blank its environment"
    );

    let pid = fx.pid.to_string();
    let text = succeeded("dsu status", &dsu(&["status", "-p", &pid]));
    assert!(
        text.contains(
            "trigger signal SIGUSR2: taken over by the program; dsu still reaches the agent \
             through its socket"
        ),
        "{text}"
    );
    assert!(text.contains("control socket "), "{text}");
    let json = status_json(fx.pid);
    assert_eq!(json["agent"]["trigger_taken_over"], true, "{json}");
    assert_eq!(json["agent"]["trigger_signal"], 12, "{json}");

    let out = apply(fx.pid, &patch);
    // Status requests take no number: the first patch is patch 1.
    assert!(out.contains("applied patch 1 "), "{out}");
    assert_eq!(fx.compute(), X10);
    assert_eq!(status_json(fx.pid)["patches"].as_array().unwrap().len(), 1);
    // dsu never signalled: the program's own handler saw nothing.
    assert_eq!(fx.send("signals"), "signals 0");
}

#[test]
fn a_process_started_with_another_xdg_runtime_dir_is_found_and_leaves_nothing_at_exit() {
    let dir = scratch("socket-xdg");
    let runtime = dir.join("xdg");
    fs::DirBuilder::new().mode(0o700).create(&runtime).unwrap();
    let patch = x10_patch(&dir);
    // An empty DSU_CONTROL_DIR counts as unset: the directory is $XDG_RUNTIME_DIR/dsu/<pid>.
    let mut fx = plain(
        &dir,
        "e",
        &[
            ("DSU_CONTROL_DIR", Path::new("")),
            ("XDG_RUNTIME_DIR", &runtime),
        ],
    );
    let control = runtime.join("dsu").join(fx.pid.to_string());
    assert!(control.join("agent.sock").exists());

    let out = apply(fx.pid, &patch);
    assert!(out.contains("applied patch"), "{out}");
    assert_eq!(fx.compute(), X10);
    // The agent appends to the perf map once it has answered.
    let perf_map = PathBuf::from(format!("/tmp/perf-{}.map", fx.pid));
    let deadline = Instant::now() + WAIT;
    while !perf_map.exists() {
        assert!(Instant::now() < deadline, "the agent published no perf map");
        thread::sleep(Duration::from_millis(5));
    }

    // A normal exit removes the control directory and the perf map.
    assert_eq!(fx.send("exit"), "bye");
    let deadline = Instant::now() + WAIT;
    while fx.alive() {
        assert!(Instant::now() < deadline, "the program did not exit");
        thread::sleep(Duration::from_millis(5));
    }
    assert!(!control.exists(), "{} is left behind", control.display());
    assert!(!perf_map.exists(), "{} is left behind", perf_map.display());
}

#[test]
fn as_root_a_process_in_another_mount_namespace_is_found_and_patched() {
    if euid() != 0 {
        eprintln!("skipped: needs root to create a mount namespace");
        return;
    }
    let probe = Command::new("unshare").args(["-m", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipped: `unshare -m` is not permitted here");
        return;
    }
    let dir = scratch("socket-mntns");
    let private = dir.join("private");
    fs::create_dir(&private).unwrap();
    let patch = x10_patch(&dir);
    let program = cc_program(&dir, "plain", &[("plain.c", PLAIN_C)], &[]);
    let library = cargo_bin("libdsu_agent.so");
    // A private tmpfs, visible only in the new namespace, holds the control directory; only
    // the program itself gets the agent.
    let script = "mount -t tmpfs -o mode=0700 dsu-test \"$0\" && \
                  exec env LD_PRELOAD=\"$1\" DSU_CONTROL_DIR=\"$0/ctl\" \"$2\" e";
    let args = [
        "-m".to_owned(),
        "sh".to_owned(),
        "-c".to_owned(),
        script.to_owned(),
        private.display().to_string(),
        library.display().to_string(),
        program.display().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut fx = Fixture::start(&dir, Path::new("unshare"), &args, &[]);
    assert!(
        !private.join("ctl").exists(),
        "the control directory is visible outside the namespace"
    );
    let out = apply(fx.pid, &patch);
    assert!(out.contains("applied patch"), "{out}");
    assert_eq!(fx.compute(), X10);
}

#[test]
fn as_root_a_connection_from_another_uid_is_refused_by_peer_credentials() {
    if euid() != 0 {
        eprintln!("skipped: needs root to connect as another user");
        return;
    }
    let dir = scratch("socket-peer");
    let client = cc_program(
        &dir,
        "peer_client",
        &[("peer_client.c", PEER_CLIENT_C)],
        &[],
    );
    // Under /tmp, which every user can traverse; the test loosens the modes below so that
    // only the peer check stands between the other user and the agent.
    let open = std::env::temp_dir().join(format!("dsu-peer-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&open);
    fs::DirBuilder::new().mode(0o711).create(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o711)).unwrap();
    let control = open.join("ctl");
    let mut fx = plain(&dir, "", &[("DSU_CONTROL_DIR", &control)]);
    fs::set_permissions(&control, fs::Permissions::from_mode(0o711)).unwrap();
    let socket = control.join("agent.sock");
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o666)).unwrap();

    let out = Command::new(&client)
        .arg("65534")
        .arg(&socket)
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcome: dsu_agent::report::Outcome = serde_json::from_str(answer.trim())
        .unwrap_or_else(|e| panic!("not one outcome line ({e}): {answer:?}"));
    assert_eq!(outcome.outcome, dsu_agent::report::Status::Refused);
    let error = outcome.error.unwrap_or_default();
    assert!(error.contains("uid 65534 may not talk"), "{error}");
    assert_eq!(fx.compute(), ORIGINAL);
    assert_eq!(status_json(fx.pid)["patches"], serde_json::json!([]));
    let _ = fs::remove_dir_all(&open);
}

#[test]
fn status_of_a_process_without_an_agent_fails_at_once_saying_why() {
    let mut sleeper = Command::new("sleep")
        .arg("30")
        .env_clear()
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let out = dsu(&["status", "-p", &sleeper.id().to_string()]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("has no dsu agent"), "{stderr}");
    assert!(stderr.contains("no listening agent.sock"), "{stderr}");
    assert!(stderr.contains("LD_PRELOAD=libdsu_agent.so"), "{stderr}");
}

#[test]
fn a_signalfd_daemon_gets_every_sighup_sent_while_updates_run() {
    let dir = scratch("socket-signalfd");
    let patch = x10_patch(&dir);
    let program = cc_program(&dir, "hupd", &[("hupd.c", HUPD_C)], &["-pthread"]);
    let library = cargo_bin("libdsu_agent.so");
    let mut fx = Fixture::start(&dir, &program, &[], &[("LD_PRELOAD", &library)]);
    let pid = fx.pid;
    let updates = thread::spawn(move || {
        let pid_text = pid.to_string();
        for _ in 0..4 {
            succeeded(
                "dsu apply",
                &dsu(&["apply", "-p", &pid_text, &patch.display().to_string()]),
            );
            succeeded("dsu revert", &dsu(&["revert", "-p", &pid_text]));
        }
    });
    const HUPS: u32 = 40;
    for sent in 1..=HUPS {
        // SAFETY: kill takes plain integers; the pid is our own child, alive until dropped.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) }, 0);
        // One at a time, so that no two are pending at once and merge into one.
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(fx.alive(), "SIGHUP {sent} killed the daemon");
            if fx.send("hups") == format!("hups {sent}") {
                break;
            }
            assert!(Instant::now() < deadline, "SIGHUP {sent} never arrived");
            thread::sleep(Duration::from_millis(1));
        }
    }
    updates.join().unwrap();
    assert!(fx.alive());
    assert_eq!(fx.send("hups"), format!("hups {HUPS}"));
    assert_eq!(fx.compute(), ORIGINAL);
}

#[test]
fn the_api_in_a_forked_child_returns_an_error_at_once() {
    let dir = scratch("socket-fork");
    let control = dir.join("ctl");
    let child = Command::new(cargo_bin("fork_child"))
        .env("DSU_CONTROL_DIR", &control)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(child, WAIT);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {text}"))
            .to_owned()
    };
    let apply = line("child apply: ");
    assert!(apply.contains("not in this forked child"), "{apply}");
    let install = line("child install: ");
    assert!(install.contains("not in this forked child"), "{install}");
    // The child's exit left the parent's directory alone, and the parent's agent works.
    assert_eq!(line("parent dir exists: "), "parent dir exists: true");
    assert!(!line("parent apply: ").contains("forked"), "{text}");
}

#[test]
fn dsu_removes_the_control_directory_and_perf_map_of_a_dead_process() {
    let uid = euid();
    let base = PathBuf::from(format!("/tmp/dsu-{uid}"));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&base)
        .unwrap();
    // A pid that is gone: a child that has exited and been reaped.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let left = base.join(dead.to_string());
    fs::DirBuilder::new().mode(0o700).create(&left).unwrap();
    fs::create_dir(left.join("consumed")).unwrap();
    fs::write(left.join("consumed/1.patch"), b"old").unwrap();
    let info = format!(r#"{{"protocol":1,"pid":{dead},"signal":12,"version":"0.1.0"}}"#);
    fs::write(left.join("agent.json"), info).unwrap();
    let perf_map = PathBuf::from(format!("/tmp/perf-{dead}.map"));
    fs::write(&perf_map, "1000 10 old\n").unwrap();

    // Any command that looks for an agent sweeps; this one finds none.
    let out = dsu(&["status", "-p", &std::process::id().to_string()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(!left.exists(), "{} is left behind", left.display());
    assert!(!perf_map.exists(), "{} is left behind", perf_map.display());
}

#[test]
fn dsu_signal_chooses_or_removes_the_trigger_signal() {
    let dir = scratch("socket-signal-env");
    let patch = x10_patch(&dir);
    let fx = plain(&dir, "", &[("DSU_SIGNAL", Path::new("SIGUSR1"))]);
    let json = status_json(fx.pid);
    assert_eq!(json["agent"]["trigger_signal"], 10, "{json}");
    assert_eq!(json["agent"]["trigger_taken_over"], false, "{json}");
    drop(fx);

    let dir = scratch("socket-signal-none");
    let mut fx = plain(&dir, "", &[("DSU_SIGNAL", Path::new("none"))]);
    let status = fs::read(format!("/proc/{}/status", fx.pid)).unwrap();
    let caught = String::from_utf8_lossy(&status)
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:").map(|v| v.trim().to_owned()))
        .unwrap();
    let mask = u64::from_str_radix(&caught, 16).unwrap();
    assert_eq!(mask & (1 << (libc::SIGUSR2 - 1)), 0, "SIGUSR2 is caught");
    let text = succeeded("dsu status", &dsu(&["status", "-p", &fx.pid.to_string()]));
    assert!(text.contains("trigger signal: none"), "{text}");
    apply(fx.pid, &patch);
    assert_eq!(fx.compute(), X10);
}

#[test]
fn a_bad_dsu_stop_signal_is_a_clear_install_error() {
    let dir = scratch("socket-stop-env");
    let mut fx = plain(&dir, "", &[("DSU_STOP_SIGNAL", Path::new("SIGUSR1"))]);
    // The program runs on without an agent.
    assert_eq!(fx.compute(), ORIGINAL);
    let log = fx.log();
    assert!(
        log.contains("DSU_STOP_SIGNAL=\"SIGUSR1\": the stop signal must be a real-time signal"),
        "{log}"
    );
    let out = dsu(&["status", "-p", &fx.pid.to_string()]);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn a_forked_child_sharing_the_socket_is_named_as_such() {
    let dir = scratch("socket-forked-child");
    let mut fx = plain(&dir, "", &[]);
    let reply = fx.send("fork");
    let child: i32 = reply
        .strip_prefix("child ")
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad reply to fork: {reply:?}"));
    let out = dsu(&["status", "-p", &child.to_string()]);
    // SAFETY: kill takes plain integers; the child is the fixture's, which reaps nothing but
    // dies with it.
    unsafe { libc::kill(child, libc::SIGKILL) };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("is a fork() of process {}", fx.pid)),
        "{stderr}"
    );
    // The parent itself is reached as usual.
    succeeded("dsu status", &dsu(&["status", "-p", &fx.pid.to_string()]));
}

#[test]
fn status_during_a_retrying_update_shows_the_last_change() {
    const C_BLOCK_PLUS_100: &str = "
#include <unistd.h>
unsigned long dsu_fixture_block(int fd) {
    char byte = 0;
    long n = read(fd, &byte, 1);
    return (unsigned long)n + 100;
}
";
    let dir = scratch("socket-busy-status");
    let patch = cc_object(&dir, "block_plus_100", C_BLOCK_PLUS_100, &[]);
    let mut fx = Fixture::start(&dir, &cargo_bin("busy_target"), &["2"], &[]);
    let pid = fx.pid.to_string();
    apply(fx.pid, &patch);
    // A thread blocks inside the patch: a revert retries until it leaves.
    fx.expect("block", "blocking");
    let revert = Command::new(env!("CARGO_BIN_EXE_dsu"))
        .args(["revert", "-p", &pid, "--timeout", "20"])
        .env_clear()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let taken = fx.control.join("consumed/2.request.json");
    let deadline = Instant::now() + WAIT;
    while !taken.exists() {
        assert!(Instant::now() < deadline, "the agent never took the revert");
        thread::sleep(Duration::from_millis(2));
    }
    let text = succeeded("dsu status", &dsu(&["status", "-p", &pid]));
    assert!(text.contains("the agent is busy with an update"), "{text}");
    assert!(text.contains("patch 1: "), "{text}");
    fx.expect("unblock", "unblocked 101");
    succeeded("dsu revert", &finish(revert, Duration::from_secs(30)));
    let text = succeeded("dsu status", &dsu(&["status", "-p", &pid]));
    assert!(text.contains("no patch applied"), "{text}");
}

#[test]
fn a_stopped_process_times_out_saying_it_is_stopped_and_how_to_continue_it() {
    let dir = scratch("socket-stopped");
    let patch = x10_patch(&dir);
    let mut fx = plain(&dir, "", &[]);
    let pid = fx.pid.to_string();
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    assert_eq!(unsafe { libc::kill(fx.pid as i32, libc::SIGSTOP) }, 0);
    let out = dsu(&[
        "apply",
        "-p",
        &pid,
        "--timeout",
        "1",
        patch.to_str().unwrap(),
    ]);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(fx.pid as i32, libc::SIGCONT) }, 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains(&format!("Process {pid} is stopped (SIGSTOP"))
            && stderr.contains(&format!("kill -CONT {pid}")),
        "{stderr}"
    );
    // Continued, it answers again.
    assert_eq!(fx.send("signals"), "signals 0");
    let json = status_json(fx.pid);
    assert!(json["agent"].is_object(), "{json}");
}
