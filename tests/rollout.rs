//! Host-wide discovery and rollout, end to end: `dsu ps`, `dsu apply --all` and
//! `dsu revert --all` against dozens of real processes of `tests/fixtures/busy.c` (made
//! patchable with `LD_PRELOAD=libdsu_agent.so`) beside processes of another program,
//! `tests/fixtures/plain.c`. Each process's behaviour is read back over its stdin protocol.
//!
//! Other programs with an agent may run on the machine at the same time (other test files;
//! as root, every user's): every `--all` here names this test's executable with `--exe`, and
//! every check looks at this test's processes only.
//!
//! Needs the workspace built first (`cargo build --workspace --all-targets`).

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::Duration;

use serde_json::Value;
use support::{
    C_X10, C_X10_AND_SPIN, Fixture, ORIGINAL, WAIT, cargo_bin, cc_object, cc_program, dsu, finish,
    scratch, start_preloaded,
};

const BUSY_C: &str = include_str!("fixtures/busy.c");
const PLAIN_C: &str = include_str!("fixtures/plain.c");

/// The two programs of a test, built in its scratch directory, and a patch.
struct Programs {
    dir: PathBuf,
    busy: PathBuf,
    plain: PathBuf,
}

impl Programs {
    fn build(name: &str) -> Programs {
        let dir = scratch(name);
        let busy = cc_program(&dir, "busy", &[("busy.c", BUSY_C)], &["-pthread"]);
        let plain = cc_program(&dir, "plain", &[("plain.c", PLAIN_C)], &[]);
        Programs {
            busy: fs::canonicalize(busy).unwrap(),
            plain: fs::canonicalize(plain).unwrap(),
            dir,
        }
    }

    /// `count` processes of `program` started at once (each waits for its agent), without
    /// worker threads for `busy`. Each has its own control directory.
    fn start(&self, program: &Path, count: usize) -> Vec<Fixture> {
        start_preloaded(&self.dir, program, count)
    }

    fn patch(&self, name: &str, source: &str) -> PathBuf {
        cc_object(&self.dir, name, source, &[])
    }
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn succeeded(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

fn json(what: &str, text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}):\n{text}"))
}

/// The entry of process `pid` in a JSON array (`dsu ps --json`, or a rollout's `processes`).
fn entry(list: &Value, pid: u32) -> &Value {
    list.as_array()
        .expect("an array")
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("process {pid} is not listed in {list}"))
}

/// The executable's GNU build id, read here with `object`, in lower-case hex.
fn build_id(path: &Path) -> String {
    use object::Object;
    let data = fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let id = file.build_id().unwrap().expect("cc links with a build id");
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn patch_ids(process: &Value) -> Vec<u64> {
    process["patches"]
        .as_array()
        .unwrap_or_else(|| panic!("no patches in {process}"))
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect()
}

/// `dsu ps` lists every process with an agent, with its user, executable, build id and
/// patches, as JSON and as a table; `--exe` narrows the list.
#[test]
fn ps_lists_the_agent_processes_with_build_id_and_patches() {
    let programs = Programs::build("rollout-ps");
    let patch = programs.patch("x10", C_X10);
    let (busy, plain) = thread::scope(|scope| {
        let plain = scope.spawn(|| programs.start(&programs.plain, 2));
        (programs.start(&programs.busy, 3), plain.join().unwrap())
    });
    let patched = busy[1].pid.to_string();
    succeeded("dsu apply -p", &dsu(&["apply", "-p", &patched, s(&patch)]));
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };

    let ps = json("ps", &succeeded("dsu ps --json", &dsu(&["ps", "--json"])));
    for (fx, program) in busy
        .iter()
        .map(|fx| (fx, &programs.busy))
        .chain(plain.iter().map(|fx| (fx, &programs.plain)))
    {
        let p = entry(&ps, fx.pid);
        assert_eq!(p["exe"], s(program), "{p}");
        assert_eq!(p["build_id"], build_id(program).as_str(), "{p}");
        assert_eq!(p["uid"], me, "{p}");
        assert_eq!(p["control_dir"], s(&fx.control), "{p}");
        let expected: &[u64] = if fx.pid == busy[1].pid { &[1] } else { &[] };
        assert_eq!(patch_ids(p), expected, "{p}");
    }

    let table = succeeded("dsu ps --exe", &dsu(&["ps", "--exe", s(&programs.busy)]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[0].starts_with("PID ")
            && lines[0].ends_with("  BUILD ID          PATCHES  EXECUTABLE"),
        "{table}"
    );
    let id = build_id(&programs.busy);
    for fx in &busy {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("{} ", fx.pid)))
            .unwrap_or_else(|| panic!("process {} not in\n{table}", fx.pid));
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[2], &id[..16], "{line}");
        assert_eq!(
            fields[3],
            if fx.pid == busy[1].pid { "1" } else { "-" },
            "{line}"
        );
        assert_eq!(fields[4], s(&programs.busy), "{line}");
    }
    let none = programs.dir.join("none");
    let out = succeeded("dsu ps --exe none", &dsu(&["ps", "--exe", s(&none)]));
    assert!(
        out.starts_with(&format!(
            "no process with a dsu agent matches --exe {}",
            none.display()
        )),
        "{out}"
    );
}

/// Fifty processes of one program patched by one `dsu apply --all` and restored by one
/// `dsu revert --all`; the processes of another program with an agent are
/// skipped with the reason, in the summary and in the JSON document, and keep their code.
#[test]
fn fifty_processes_are_patched_and_reverted_by_one_command_each() {
    let programs = Programs::build("rollout-fifty");
    let patch = programs.patch("x10", C_X10);
    let (mut busy, mut plain) = thread::scope(|scope| {
        let plain = scope.spawn(|| programs.start(&programs.plain, 3));
        (programs.start(&programs.busy, 50), plain.join().unwrap())
    });

    let out = dsu(&["apply", "--all", "--exe", s(&programs.busy), s(&patch)]);
    let summary = succeeded("dsu apply --all", &out);
    let first = summary.lines().next().unwrap();
    assert!(
        first.starts_with(&format!("apply {}: 50 applied, ", patch.display()))
            && first.contains(" skipped, 0 failed ("),
        "{summary}"
    );
    for fx in &plain {
        let line = format!(
            "skipped: process {} ({plain}): executable {plain}, not {busy}",
            fx.pid,
            plain = programs.plain.display(),
            busy = programs.busy.display()
        );
        assert!(
            summary.lines().any(|l| l == line),
            "no {line:?} in\n{summary}"
        );
    }
    for fx in &mut busy {
        assert_eq!(fx.compute(), 70, "process {}", fx.pid);
    }
    for fx in &mut plain {
        assert_eq!(fx.compute(), ORIGINAL, "process {}", fx.pid);
    }

    let ps = json("ps", &succeeded("dsu ps --json", &dsu(&["ps", "--json"])));
    for fx in &busy {
        assert_eq!(patch_ids(entry(&ps, fx.pid)), [1], "process {}", fx.pid);
    }

    // Reverting patch 2 finds none: every process is skipped, saying which it has.
    let out = dsu(&["revert", "--all", "--exe", s(&programs.busy), "2"]);
    let summary = succeeded("dsu revert --all 2", &out);
    assert!(
        summary.starts_with("revert patch 2: 0 reverted, "),
        "{summary}"
    );
    let line = format!(
        "skipped: process {} ({}): no patch 2 applied (patches 1)",
        busy[7].pid,
        programs.busy.display()
    );
    assert!(
        summary.lines().any(|l| l == line),
        "no {line:?} in\n{summary}"
    );

    let out = dsu(&["revert", "--all", "--exe", s(&programs.busy), "--json"]);
    let doc = json("revert --json", &succeeded("dsu revert --all --json", &out));
    assert_eq!(doc["op"], "revert");
    assert_eq!(doc["counts"]["reverted"], 50, "{doc}");
    assert_eq!(doc["counts"]["failed"], 0, "{doc}");
    for fx in &busy {
        let p = entry(&doc["processes"], fx.pid);
        assert_eq!(p["status"], "reverted", "{p}");
        assert_eq!(p["patch_id"], 1, "{p}");
        assert_eq!(p["exe"], s(&programs.busy), "{p}");
    }
    for fx in &plain {
        let p = entry(&doc["processes"], fx.pid);
        assert_eq!(p["status"], "skipped", "{p}");
        assert_eq!(
            p["reason"],
            format!(
                "executable {}, not {}",
                programs.plain.display(),
                programs.busy.display()
            )
        );
    }
    for fx in &mut busy {
        assert_eq!(fx.compute(), ORIGINAL, "process {}", fx.pid);
    }
}

/// One process has a thread inside a function the patch replaces, until the agent's timeout:
/// it is reported failed with the agent's reason, exit 1, and keeps its code; the others are
/// patched. Selected by build id as well as by executable.
#[test]
fn a_process_whose_function_stays_active_fails_and_the_rest_are_patched() {
    let programs = Programs::build("rollout-active");
    let patch = programs.patch("x10_spin", C_X10_AND_SPIN);
    let mut busy = programs.start(&programs.busy, 6);
    let stuck = busy[2].pid;
    busy[2].expect("spin", "spinning");
    let spin_before = busy[2].code("spin");
    let id = build_id(&programs.busy);

    let out = dsu(&[
        "apply",
        "--all",
        "--exe",
        s(&programs.busy),
        "--build-id",
        &id[..12],
        "--timeout",
        "0.5",
        "--json",
        s(&patch),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        stderr(&out),
        "dsu: 1 of 6 processes failed to apply the patch; the summary above lists them\n"
    );
    let doc = json("apply --json", &stdout(&out));
    assert_eq!(doc["counts"]["applied"], 5, "{doc}");
    assert_eq!(doc["counts"]["failed"], 1, "{doc}");
    assert_eq!(
        doc["filter"],
        format!("--exe {} --build-id {}", programs.busy.display(), &id[..12])
    );
    let failed = entry(&doc["processes"], stuck);
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["patch_id"], Value::Null);
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("refused: dsu_fixture_spin is active in thread ")
            && reason.ends_with("nothing was changed"),
        "{reason}"
    );
    for fx in &mut busy {
        if fx.pid == stuck {
            continue;
        }
        let p = entry(&doc["processes"], fx.pid);
        assert_eq!(p["status"], "applied", "{p}");
        assert_eq!(p["patch_id"], 1, "{p}");
        assert_eq!(fx.compute(), 70, "process {}", fx.pid);
    }
    let fx = &mut busy[2];
    assert_eq!(fx.compute(), ORIGINAL);
    assert_eq!(fx.code("spin"), spin_before);
    // The original spin returns 0 or 1; the patched one 5.
    let reply = fx.send("unspin");
    assert!(reply == "unspun 0" || reply == "unspun 1", "{reply}");
}

/// Starts `dsu` with `args` in the background, output captured.
fn spawn_dsu(args: &[&str]) -> std::process::Child {
    Command::new(cargo_bin("dsu"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The lines `stream` delivers, as they come, from a thread.
fn lines(stream: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in std::io::BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The canary (the lowest pid) dies during its wait: `dsu` notices at once, patches no other
/// process, reports the rest skipped and exits 1.
#[test]
fn a_canary_that_dies_stops_the_rollout() {
    let programs = Programs::build("rollout-canary-dies");
    let patch = programs.patch("x10", C_X10);
    let mut busy = programs.start(&programs.busy, 4);
    busy.sort_by_key(|fx| fx.pid);
    let canary = busy[0].pid;

    let mut child = spawn_dsu(&[
        "apply",
        "--all",
        "--exe",
        s(&programs.busy),
        "--canary",
        "1",
        "--canary-wait",
        "600",
        "--json",
        s(&patch),
    ]);
    let errors = lines(child.stderr.take().unwrap());
    // Killed once dsu has its answer and watches it.
    let watching = format!("dsu: canary: process {canary} patched; watching for 600.0 s");
    assert_eq!(errors.recv_timeout(WAIT).as_deref(), Ok(watching.as_str()));
    assert_eq!(busy[0].compute(), 70);
    // SAFETY: kill takes two integers; the pid is the canary's, a child of this test.
    assert_eq!(unsafe { libc::kill(canary as i32, libc::SIGKILL) }, 0);
    // Far less than the canary wait: the exit ends it.
    let out = finish(child, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert_eq!(
        errors.recv_timeout(WAIT),
        Ok(format!(
            "dsu: the canary stage failed (process {canary}); the other 3 processes were left \
             alone"
        ))
    );
    let doc = json("apply --json", &stdout(&out));
    assert_eq!(doc["canary"]["passed"], false, "{doc}");
    assert_eq!(doc["canary"]["pids"], serde_json::json!([canary]));
    let p = entry(&doc["processes"], canary);
    assert_eq!(p["canary"], true, "{p}");
    assert_eq!(p["status"], "failed", "{p}");
    assert_eq!(
        p["reason"],
        "canary: exited within 600.0 s after the patch was applied"
    );
    for fx in &mut busy[1..] {
        let p = entry(&doc["processes"], fx.pid);
        assert_eq!(p["status"], "skipped", "{p}");
        assert_eq!(
            p["reason"],
            format!("not attempted: the canary stage failed (process {canary})")
        );
        assert_eq!(p["canary"], false, "{p}");
        assert_eq!(fx.compute(), ORIGINAL, "process {}", fx.pid);
    }
}

/// Canaries that stay alive, answer and keep the patch let the rest be patched.
#[test]
fn canaries_that_stay_well_let_the_rest_be_patched() {
    let programs = Programs::build("rollout-canary-well");
    let patch = programs.patch("x10", C_X10);
    let mut busy = programs.start(&programs.busy, 4);
    busy.sort_by_key(|fx| fx.pid);
    let out = dsu(&[
        "apply",
        "--all",
        "--exe",
        s(&programs.busy),
        "--canary",
        "2",
        "--canary-wait",
        "0.2",
        s(&patch),
    ]);
    let summary = succeeded("dsu apply --canary", &out);
    let line = format!(
        "canary: processes {}, {}: alive, answering and still patched after 0.2 s",
        busy[0].pid, busy[1].pid
    );
    assert!(
        summary.lines().any(|l| l == line),
        "no {line:?} in\n{summary}"
    );
    assert_eq!(
        stderr(&out),
        format!(
            "dsu: canary: processes {}, {} patched; watching for 0.2 s\n",
            busy[0].pid, busy[1].pid
        )
    );
    for fx in &mut busy {
        assert_eq!(fx.compute(), 70, "process {}", fx.pid);
    }
}

/// Usage errors and a selection that matches nothing are refused before any process is
/// touched, each with its message.
#[test]
fn bad_input_is_refused_with_its_reason() {
    let programs = Programs::build("rollout-bad-input");
    let patch = programs.patch("x10", C_X10);
    let mut busy = programs.start(&programs.busy, 1);
    let refused = |args: &[&str], code: i32| {
        let out = dsu(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{args:?}: {}", stdout(&out));
        stderr(&out)
    };
    let pid = busy[0].pid.to_string();

    let err = refused(&["apply", "--all", "-p", &pid, s(&patch)], 2);
    assert!(
        err.contains("the argument '--all' cannot be used with '--pid <PID>'")
            || err.contains("the argument '--pid <PID>' cannot be used with '--all'"),
        "{err}"
    );
    let err = refused(&["apply", s(&patch)], 2);
    assert!(
        err.contains("the following required arguments were not provided:\n  <--pid <PID>|--all>"),
        "{err}"
    );
    let err = refused(&["revert"], 2);
    assert!(err.contains("<--pid <PID>|--all>"), "{err}");
    let err = refused(
        &["apply", "-p", &pid, "--exe", s(&programs.busy), s(&patch)],
        2,
    );
    assert!(err.contains("cannot be used with"), "{err}");
    let err = refused(&["apply", "--all", "--build-id", "xyz", s(&patch)], 2);
    assert!(
        err.contains("\"xyz\" is not a build id: 8 to 128 hex digits"),
        "{err}"
    );

    let missing = programs.dir.join("missing.o");
    let err = refused(
        &["apply", "--all", "--exe", s(&programs.busy), s(&missing)],
        2,
    );
    assert_eq!(
        err,
        format!(
            "dsu: cannot read patch {}: No such file or directory (os error 2)\n",
            missing.display()
        )
    );

    // A patch others may write: refused before anything is sent, on record as `target=all`.
    let writable = programs.dir.join("writable.o");
    fs::copy(&patch, &writable).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&writable, fs::Permissions::from_mode(0o666)).unwrap();
    }
    let log_path = programs.dir.join("log.sock");
    let log = std::os::unix::net::UnixDatagram::bind(&log_path).unwrap();
    log.set_read_timeout(Some(WAIT)).unwrap();
    let child = Command::new(cargo_bin("dsu"))
        .args(["apply", "--all", "--exe", s(&programs.busy), s(&writable)])
        .env("DSU_SYSLOG_SOCKET", &log_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(child, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with(&format!(
            "dsu: patch {} is writable by others (mode 0666)",
            writable.display()
        )),
        "{}",
        stderr(&out)
    );
    let mut record = [0u8; 4096];
    let n = log.recv(&mut record).expect("a record of the refusal");
    let record = String::from_utf8_lossy(&record[..n]);
    assert!(
        record.contains(" op=apply outcome=refused target=all uid="),
        "{record}"
    );

    let nothing = programs.dir.join("no-such-program");
    for args in [
        vec!["apply", "--all", "--exe", s(&nothing), s(&patch)],
        vec!["revert", "--all", "--exe", s(&nothing)],
    ] {
        let err = refused(&args, 3);
        let expected = format!(
            "dsu: no process with a dsu agent matches --exe {}",
            nothing.display()
        );
        assert!(err.starts_with(&expected), "{err}");
        assert!(err.contains("other process"), "{err}");
    }
    // The executable matches, the build id does not.
    let err = refused(
        &[
            "apply",
            "--all",
            "--exe",
            s(&programs.busy),
            "--build-id",
            "00000000deadbeef",
            s(&patch),
        ],
        3,
    );
    assert!(
        err.starts_with(&format!(
            "dsu: no process with a dsu agent matches --exe {} --build-id 00000000deadbeef",
            programs.busy.display()
        )),
        "{err}"
    );
    assert_eq!(busy[0].compute(), ORIGINAL);
}
