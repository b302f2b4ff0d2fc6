//! The `dsu` command against real processes: every way a request can fail to reach an agent
//! or be answered, and the request/answer round trip against a stand-in agent built from
//! `dsu_agent::control` (the engine that applies patches is tested elsewhere).
//!
//! Targets are `sleep` processes, and the "agent" is a thread of this test process listening
//! on the control socket in the target's control directory (named with `--control-dir`),
//! built from the agent's own `dsu_agent::control::socket`.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use dsu_agent::control::socket::{Client, Listener};
use dsu_agent::control::{Op, REQUEST_FILE, RESULT_FILE};
use dsu_agent::report::{AgentInfo, FunctionReport, Outcome, Status};

/// A fresh directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("dsu-cli-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::DirBuilder::new().mode(0o700).create(&path).unwrap();
        Scratch(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A file that passes `dsu`'s local check (it starts like an ELF file).
    fn patch(&self) -> PathBuf {
        let path = self.join("fix.o");
        fs::write(&path, b"\x7fELF\x02\x01\x01\0patch bytes").unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process killed and reaped on drop.
struct Target(Child);

impl Target {
    fn sleep() -> Target {
        Target::spawn(Command::new("sleep").arg("30"))
    }

    fn spawn(command: &mut Command) -> Target {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Target(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dsu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsu"))
        .args(args)
        .output()
        .unwrap()
}

fn dsu_with(args: &[&str], paths: &[&Path]) -> Output {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(paths.iter().map(|p| p.display().to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    dsu(&refs)
}

/// Asserts the exit code and a single `dsu: ` line on stderr; returns that line.
fn fails(output: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(stderr.starts_with("dsu: "), "{stderr}");
    stderr.trim_end().to_owned()
}

fn stdout(output: &Output) -> String {
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

/// A control directory naming `pid` as its agent's process, like the agent's install writes.
fn control_dir(scratch: &Scratch, pid: u32) -> PathBuf {
    let dir = scratch.join("ctl");
    fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
    let info = AgentInfo {
        protocol: 1,
        pid,
        signal: 12,
        version: "0.1.0".into(),
        start_time: None,
        socket: Some("agent.sock".into()),
        socket_error: None,
    };
    fs::write(dir.join("agent.json"), serde_json::to_vec(&info).unwrap()).unwrap();
    dir
}

/// Waits for the next connection on `listener`.
fn accept(listener: &Listener) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(client) = listener.accept().unwrap() {
            return client;
        }
        assert!(Instant::now() < deadline, "no connection arrived");
        thread::sleep(Duration::from_millis(1));
    }
}

/// Stands in for the agent: answers the first request on `dir`'s socket with `answer`.
/// Returns the request it took.
fn fake_agent(
    dir: &Path,
    answer: impl FnOnce(&dsu_agent::control::Request) -> Outcome + Send + 'static,
) -> thread::JoinHandle<dsu_agent::control::Request> {
    let listener = Listener::bind(dir).unwrap();
    let patch_file = dir.join("consumed/1.patch");
    thread::spawn(move || {
        let mut client = accept(&listener);
        let request = client
            .read_request()
            .unwrap()
            .expect("a request")
            .into_request(patch_file);
        client.take(1).unwrap();
        client.answer(&answer(&request)).unwrap();
        request
    })
}

fn outcome(request: &dsu_agent::control::Request, status: Status) -> Outcome {
    Outcome {
        seq: 1,
        request: request.id.clone(),
        op: request.op.name().to_owned(),
        outcome: status,
        error: None,
        attempts: 1,
        elapsed_us: 250,
        functions: Vec::new(),
        patch_id: None,
        stages_us: None,
        threads_stopped: None,
        status: None,
        warnings: Vec::new(),
        record: None,
    }
}

#[test]
fn a_pid_with_no_process_exits_3() {
    let scratch = Scratch::new();
    // Above the largest pid_max Linux allows (2^22), so never a live process.
    let line = fails(
        &dsu_with(&["apply", "-p", "999999999"], &[&scratch.patch()]),
        3,
    );
    assert!(line.contains("no such process 999999999"), "{line}");
}

#[test]
fn a_process_without_agent_exits_3_naming_agent_json() {
    let scratch = Scratch::new();
    let missing = scratch.join("no-such-dir");
    let target = Target::spawn(
        Command::new("sleep")
            .arg("30")
            .env("DSU_CONTROL_DIR", &missing),
    );
    let pid = target.pid().to_string();
    let line = fails(&dsu_with(&["apply", "-p", &pid], &[&scratch.patch()]), 3);
    assert!(
        line.contains(&missing.join("agent.json").display().to_string()),
        "{line}"
    );
    assert!(line.contains("has no dsu agent"), "{line}");
}

#[test]
fn without_dsu_control_dir_the_default_directory_is_looked_up() {
    let scratch = Scratch::new();
    let target = Target::spawn(
        Command::new("sleep")
            .arg("30")
            .env_remove("DSU_CONTROL_DIR")
            .env_remove("XDG_RUNTIME_DIR"),
    );
    let pid = target.pid().to_string();
    let line = fails(&dsu_with(&["apply", "-p", &pid], &[&scratch.patch()]), 3);
    assert!(line.contains(&format!("/{pid}/agent.json")), "{line}");
    assert!(line.contains("/tmp/dsu-"), "{line}");
}

#[test]
fn a_patch_that_is_not_elf_is_refused_locally_with_exit_2() {
    let scratch = Scratch::new();
    let source = scratch.join("fix.c");
    fs::write(&source, "int price(void) { return 42; }\n").unwrap();
    let target = Target::sleep();
    let pid = target.pid().to_string();
    let line = fails(&dsu_with(&["apply", "-p", &pid], &[&source]), 2);
    assert!(line.contains("is not an ELF file"), "{line}");
    assert!(line.contains(&source.display().to_string()), "{line}");
}

#[test]
fn a_missing_patch_file_exits_2_naming_it() {
    let scratch = Scratch::new();
    let missing = scratch.join("nope.o");
    let target = Target::sleep();
    let pid = target.pid().to_string();
    let line = fails(&dsu_with(&["apply", "-p", &pid], &[&missing]), 2);
    assert!(line.contains("cannot read patch"), "{line}");
    assert!(line.contains(&missing.display().to_string()), "{line}");
}

#[test]
fn a_world_writable_control_directory_is_refused() {
    let scratch = Scratch::new();
    let target = Target::sleep();
    let dir = control_dir(&scratch, target.pid());
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    let pid = target.pid().to_string();
    let output = dsu_with(
        &["apply", "-p", &pid, "--control-dir"],
        &[&dir, &scratch.patch()],
    );
    let line = fails(&output, 3);
    assert!(line.contains("mode 0777"), "{line}");
    assert!(line.contains(&dir.display().to_string()), "{line}");
    assert!(!dir.join(REQUEST_FILE).exists());
}

#[test]
fn an_agent_json_of_another_process_is_refused() {
    let scratch = Scratch::new();
    let target = Target::sleep();
    let dir = control_dir(&scratch, target.pid() + 1);
    let pid = target.pid().to_string();
    let output = dsu_with(
        &["apply", "-p", &pid, "--control-dir"],
        &[&dir, &scratch.patch()],
    );
    let line = fails(&output, 3);
    assert!(
        line.contains(&format!("names process {}", target.pid() + 1)),
        "{line}"
    );
}

#[test]
fn a_directory_whose_agent_does_not_listen_fails_at_once() {
    let scratch = Scratch::new();
    let mut target = Target::sleep();
    let dir = control_dir(&scratch, target.pid());
    let pid = target.pid().to_string();
    for args in [
        &["status", "-p", &pid][..],
        &["apply", "-p", &pid, "--timeout", "60"],
    ] {
        let mut paths = vec![dir.as_path()];
        let patch = scratch.patch();
        if args[0] == "apply" {
            paths.push(&patch);
        }
        let mut all = args.to_vec();
        all.push("--control-dir");
        let line = fails(&dsu_with(&all, &paths), 3);
        assert!(line.contains("listens on"), "{line}");
        assert!(line.contains("agent.sock"), "{line}");
    }
    assert!(target.alive());
}

#[test]
fn an_agent_that_never_answers_times_out_with_exit_4_and_the_request_is_withdrawn() {
    let scratch = Scratch::new();
    let mut target = Target::sleep();
    let dir = control_dir(&scratch, target.pid());
    // Listens but never accepts: the request waits in the socket's backlog.
    let _listener = Listener::bind(&dir).unwrap();
    let pid = target.pid().to_string();
    let started = Instant::now();
    let output = dsu_with(
        &["apply", "-p", &pid, "--timeout", "1", "--control-dir"],
        &[&dir, &scratch.patch()],
    );
    let line = fails(&output, 4);
    assert!(line.contains("timed out"), "{line}");
    assert!(line.contains("withdrawn"), "{line}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // dsu writes nothing into the directory.
    assert!(!dir.join(REQUEST_FILE).exists());
    assert!(target.alive());
}

#[test]
fn an_agent_that_takes_the_request_but_never_answers_times_out_saying_so() {
    let scratch = Scratch::new();
    let target = Target::sleep();
    let dir = control_dir(&scratch, target.pid());
    let listener = Listener::bind(&dir).unwrap();
    let agent = thread::spawn(move || {
        let mut client = accept(&listener);
        client.read_request().unwrap().expect("a request");
        client.take(1).unwrap();
        // Returned to be held open until dsu gives up.
        client
    });
    let pid = target.pid().to_string();
    let output = dsu_with(
        &["apply", "-p", &pid, "--timeout", "0.5", "--control-dir"],
        &[&dir, &scratch.patch()],
    );
    let line = fails(&output, 4);
    assert!(line.contains("may still act on it"), "{line}");
    drop(agent.join().unwrap());
}

#[test]
fn a_process_that_exits_while_dsu_waits_exits_3() {
    let scratch = Scratch::new();
    let mut child = Command::new("sleep")
        .arg("1")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let dir = control_dir(&scratch, child.id());
    let _listener = Listener::bind(&dir).unwrap();
    let pid = child.id().to_string();
    // Reap the child when it exits, as its parent would.
    let reaper = thread::spawn(move || child.wait().unwrap());
    let output = dsu_with(
        &["apply", "-p", &pid, "--timeout", "20", "--control-dir"],
        &[&dir, &scratch.patch()],
    );
    let line = fails(&output, 3);
    assert!(line.contains("exited before its agent answered"), "{line}");
    reaper.join().unwrap();
}

#[test]
fn an_applied_answer_exits_0_with_a_line_per_function() {
    let scratch = Scratch::new();
    let target = Target::sleep();
    let dir = control_dir(&scratch, target.pid());
    let agent = fake_agent(&dir, |request| Outcome {
        functions: vec![FunctionReport {
            name: "price".into(),
            module: "/usr/bin/shop".into(),
            old_address: "0x5555000011a0".into(),
            new_address: "0x7f0000001000".into(),
            strategy: "redirect".into(),
            call_sites: 2,
        }],
        ..outcome(request, Status::Applied)
    });
    let pid = target.pid().to_string();
    let patch = scratch.patch();
    let output = dsu_with(
        &["apply", "-p", &pid, "--timeout", "3", "--control-dir"],
        &[&dir, &patch],
    );
    let text = stdout(&output);
    assert_eq!(
        text,
        "price (/usr/bin/shop): 0x5555000011a0 -> 0x7f0000001000, redirect, 2 call sites \
         rewritten\napplied patch 1 in process "
            .to_owned()
            + &pid
            + " in 250 us after 1 attempt\n"
    );
    let request = agent.join().unwrap();
    assert!(request.id.is_some());
    let Op::Apply { bytes, timeout, .. } = request.op else {
        panic!("not an apply: {request:?}");
    };
    assert_eq!(bytes, fs::read(&patch).unwrap());
    assert_eq!(timeout, Some(Duration::from_secs(3)));
}

#[test]
fn a_refused_answer_exits_1_with_the_reason_on_one_line() {
    let scratch = Scratch::new();
    let target = Target::sleep();
    let dir = control_dir(&scratch, target.pid());
    let agent = fake_agent(&dir, |request| Outcome {
        error: Some("price is active in thread 4242\nretried 40 times".into()),
        ..outcome(request, Status::Refused)
    });
    let pid = target.pid().to_string();
    let output = dsu_with(
        &["apply", "-p", &pid, "--control-dir"],
        &[&dir, &scratch.patch()],
    );
    let line = fails(&output, 1);
    assert_eq!(
        line,
        "dsu: refused: price is active in thread 4242; retried 40 times"
    );
    agent.join().unwrap();
}

#[test]
fn revert_sends_the_patch_id_and_reports_the_answer() {
    let scratch = Scratch::new();
    let target = Target::sleep();
    let dir = control_dir(&scratch, target.pid());
    let agent = fake_agent(&dir, |request| outcome(request, Status::Applied));
    let pid = target.pid().to_string();
    let output = dsu_with(&["revert", "-p", &pid, "3", "--control-dir"], &[&dir]);
    assert!(stdout(&output).starts_with("reverted patch 1 in process"));
    let request = agent.join().unwrap();
    assert_eq!(
        request.op,
        Op::Revert {
            patch_id: Some(3),
            timeout: Some(Duration::from_secs(10))
        }
    );
}

/// Stands in for the agent for `count` status requests, answering each with `status`.
fn fake_status_agent(
    dir: &Path,
    status: dsu_agent::report::StatusReport,
    count: usize,
) -> thread::JoinHandle<()> {
    let listener = Listener::bind(dir).unwrap();
    let patch_file = dir.join("unused");
    thread::spawn(move || {
        for _ in 0..count {
            let mut client = accept(&listener);
            let request = client
                .read_request()
                .unwrap()
                .expect("a request")
                .into_request(patch_file.clone());
            assert_eq!(request.op, Op::Status);
            client.take(1).unwrap();
            let answer = Outcome {
                status: Some(status.clone()),
                ..outcome(&request, Status::Applied)
            };
            client.answer(&answer).unwrap();
        }
    })
}

#[test]
fn status_shows_the_agent_the_patches_and_the_last_answer() {
    let scratch = Scratch::new();
    let target = Target::sleep();
    let dir = control_dir(&scratch, target.pid());
    let pid = target.pid().to_string();
    let status = dsu_agent::report::StatusReport {
        pid: target.pid(),
        patches: vec![dsu_agent::report::PatchReport {
            id: 3,
            file: "consumed/3.patch".into(),
            sha256: "ab".repeat(32),
            signer: None,
            applied_at: 1_700_000_000,
            functions: vec![],
            added: vec![],
        }],
        agent: Some(dsu_agent::report::AgentState {
            trigger_signal: Some(12),
            trigger_taken_over: true,
            socket: Some(dir.join("agent.sock").display().to_string()),
        }),
        kept: vec![],
    };
    let agent = fake_status_agent(&dir, status.clone(), 3);
    let text = stdout(&dsu_with(&["status", "-p", &pid, "--control-dir"], &[&dir]));
    assert!(text.contains("no request answered yet"), "{text}");
    assert!(text.contains("patch 3: consumed/3.patch"), "{text}");
    assert!(
        text.contains("trigger signal SIGUSR2: taken over by the program"),
        "{text}"
    );
    assert!(text.contains("control socket "), "{text}");

    let last = Outcome {
        seq: 4,
        request: None,
        op: "apply".into(),
        outcome: Status::Refused,
        error: Some("symbol foo does not resolve".into()),
        attempts: 0,
        elapsed_us: 90,
        functions: Vec::new(),
        patch_id: None,
        stages_us: None,
        threads_stopped: None,
        status: None,
        warnings: Vec::new(),
        record: None,
    };
    fs::write(dir.join(RESULT_FILE), serde_json::to_vec(&last).unwrap()).unwrap();
    let text = stdout(&dsu_with(&["status", "-p", &pid, "--control-dir"], &[&dir]));
    assert!(
        text.contains("last: apply #4 (raw trigger): refused in 90 us after 0 attempts: symbol foo does not resolve"),
        "{text}"
    );
    let json = stdout(&dsu_with(
        &["status", "-p", &pid, "--json", "--control-dir"],
        &[&dir],
    ));
    let back: dsu_agent::report::StatusReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, status);
    agent.join().unwrap();
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(dsu(&["apply"]).status.code(), Some(2));
    assert_eq!(dsu(&["apply", "-p", "0", "x.o"]).status.code(), Some(2));
    assert_eq!(
        dsu(&["apply", "-p", "1", "x.o", "--timeout", "0"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(dsu(&["frobnicate"]).status.code(), Some(2));
}
