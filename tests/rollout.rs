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
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Fixture, cargo_bin, cc_object, cc_program, dsu, scratch};

const BUSY_C: &str = include_str!("fixtures/busy.c");
const PLAIN_C: &str = include_str!("fixtures/plain.c");

const C_X10: &str = "
unsigned long dsu_fixture_compute(unsigned long x) { return x * 10; }
";

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
        let preload = cargo_bin("libdsu_agent.so");
        let name = program.file_name().unwrap().to_str().unwrap();
        thread::scope(|scope| {
            let started: Vec<_> = (0..count)
                .map(|i| {
                    let dir = self.dir.join(format!("{name}-{i}"));
                    fs::create_dir_all(&dir).unwrap();
                    let preload = &preload;
                    scope.spawn(move || {
                        Fixture::start(&dir, program, &["0"], &[("LD_PRELOAD", preload)])
                    })
                })
                .collect();
            let started: Vec<Fixture> = started.into_iter().map(|t| t.join().unwrap()).collect();
            for fx in &started {
                wait_warm(fx);
            }
            started
        })
    }

    fn patch(&self, name: &str, source: &str) -> PathBuf {
        cc_object(&self.dir, name, source, &[])
    }
}

/// How long an agent may take to warm up: dozens start at once here, each indexing its
/// process's symbols and calls in a debug build, on a machine that may be busy.
const WARM_UP: Duration = Duration::from_secs(120);

/// Waits until the agent of `fx` has warmed up: its thread writes `status.json` once it has,
/// before it serves its first request. A request sent earlier waits for the warm-up, which
/// with dozens of agents starting at once can outlast a test's `--timeout`.
fn wait_warm(fx: &Fixture) {
    let deadline = Instant::now() + WARM_UP;
    while !fx.control.join("status.json").exists() {
        assert!(
            Instant::now() < deadline,
            "the agent of process {} did not write status.json within {WARM_UP:?}; its log:\n{}",
            fx.pid,
            fx.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn succeeded(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
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
