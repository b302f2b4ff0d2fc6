//! Shared helpers of the end-to-end tests: build real patches and programs with `cc` and
//! `rustc` at test time, in a scratch directory under cargo's target dir.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Runs `cmd`, failing the test with its output unless it succeeds; returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Compiles C source to a relocatable object as a patch author would.
pub fn cc_object(dir: &Path, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    let obj = dir.join(format!("{name}.o"));
    std::fs::write(&src, source).unwrap();
    run(Command::new("cc")
        .args([
            "-c",
            "-fPIC",
            "-O2",
            "-ffunction-sections",
            "-fdata-sections",
        ])
        .args(flags)
        .arg("-o")
        .arg(&obj)
        .arg(&src));
    obj
}

/// What `rustc` reports as the static library's native dependencies
/// (`cargo rustc -p dsu-agent --lib --crate-type staticlib -- --print native-static-libs`).
pub const NATIVE_LIBS: [&str; 7] = [
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

/// `tests/fixtures/busy.c` linked with `libdsu_agent.a`, built as `name` in `dir`: its `main`
/// calls `dsu_install()`.
pub fn busy_c_linked_program(dir: &Path, name: &str) -> PathBuf {
    let archive = cargo_bin("libdsu_agent.a");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("dsu-agent/include");
    let mut flags = vec![
        "-pthread".to_string(),
        "-DDSU_LINKED".to_string(),
        format!("-I{}", include.display()),
        archive.display().to_string(),
    ];
    flags.extend(NATIVE_LIBS.iter().map(|l| l.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let busy_c = include_str!("../fixtures/busy.c");
    cc_program(dir, name, &[("busy.c", busy_c)], &flags)
}

/// `tests/fixtures/two_calls.c` (`dsu_f` and `dsu_h` calling it, a library it can `dlopen`),
/// built in `dir` and started with `LD_PRELOAD=libdsu_agent.so`.
pub fn start_two_calls(dir: &Path) -> Fixture {
    let source = include_str!("../fixtures/two_calls.c");
    let program = cc_program(dir, "two_calls", &[("two_calls.c", source)], &["-ldl"]);
    let library = cargo_bin("libdsu_agent.so");
    Fixture::start(dir, &program, &[], &[("LD_PRELOAD", library.as_path())])
}

/// Compiles and links C source into an executable.
pub fn cc_program(dir: &Path, name: &str, sources: &[(&str, &str)], flags: &[&str]) -> PathBuf {
    let exe = dir.join(name);
    let mut cmd = Command::new("cc");
    cmd.args(["-O2", "-g", "-o"]).arg(&exe);
    for (file, text) in sources {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        cmd.arg(path);
    }
    cmd.args(flags);
    run(&mut cmd);
    exe
}

/// Compiles Rust source (edition 2024) to a relocatable object with the toolchain that built
/// the tests, so core/std symbols match the running program's.
pub fn rustc_object(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.rs"));
    let obj = dir.join(format!("{name}.o"));
    std::fs::write(&src, source).unwrap();
    run(Command::new(rustc())
        .args(["--edition=2024", "--crate-type=lib", "--emit=obj", "-O"])
        .args(["--crate-name", name])
        .arg("-o")
        .arg(&obj)
        .arg(&src));
    obj
}

pub fn rustc() -> String {
    std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string())
}

/// Path of an artifact cargo built for this workspace (`dsu`, examples, `libdsu_agent.*`),
/// which must exist.
pub fn cargo_bin(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let profile_dir = deps.parent().unwrap().parent().unwrap();
    let direct = profile_dir.join(name);
    let path = if direct.exists() {
        direct
    } else {
        profile_dir.join("examples").join(name)
    };
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --all-targets` first",
        path.display()
    );
    // A test file run alone (`cargo test --test NAME`) does not rebuild the agent's libraries,
    // `dsu` or the examples: refuse to run an artifact older than the code it is built from
    // (and only that code: a change to `cli/` or `dsu-build/` rebuilds `dsu`, not the
    // examples).
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap();
    let example = format!("examples/{name}.rs");
    let sources: &[&str] = match name {
        "dsu" => &["dsu-agent/src", "dsu-sys/src", "dsu-build/src", "cli"],
        _ if name.starts_with("libdsu_agent.") => &["dsu-agent/src", "dsu-sys/src"],
        _ => &["dsu-agent/src", "dsu-sys/src", &example],
    };
    if let Some((newest, source)) = newest_source(sources)
        && newest > built
    {
        panic!(
            "{} is older than {}: run `cargo build --workspace --all-targets` first",
            path.display(),
            source.display()
        );
    }
    path
}

/// The most recently modified Rust source file under `paths` (directories or files, relative
/// to the workspace root).
fn newest_source(paths: &[&str]) -> Option<(std::time::SystemTime, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut pending: Vec<PathBuf> = paths.iter().map(|p| root.join(p)).collect();
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                pending.extend(entries.flatten().map(|e| e.path()));
            }
        } else if path.extension().is_some_and(|e| e == "rs")
            && let Ok(modified) = meta.modified()
            && newest.as_ref().is_none_or(|(t, _)| modified > *t)
        {
            newest = Some((modified, path));
        }
    }
    newest
}

/// Runs the `dsu` command with `args` (stdin closed, output captured), failing the test if it
/// runs longer than a minute.
pub fn dsu(args: &[&str]) -> std::process::Output {
    use std::process::Stdio;
    let child = Command::new(cargo_bin("dsu"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run dsu {args:?}: {e}"));
    finish(child, std::time::Duration::from_secs(60))
}

/// Runs `dsu SUBCOMMAND -p PID ARGS..` on `fx`'s process and fails the test, with the
/// process's log, unless it succeeds; returns what it printed.
pub fn dsu_ok(fx: &Fixture, subcommand: &str, args: &[&str]) -> String {
    let pid = fx.pid.to_string();
    let mut all = vec![subcommand, "-p", &pid];
    all.extend_from_slice(args);
    let out = dsu(&all);
    assert!(
        out.status.success(),
        "dsu {all:?} failed: {}\nprocess log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        fx.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for `child`, killing it and failing the test if it runs longer than `limit`.
pub fn finish(mut child: std::process::Child, limit: std::time::Duration) -> std::process::Output {
    use std::io::Read;
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{child:?} did not return within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_end(&mut stdout).unwrap();
    }
    if let Some(mut err) = child.stderr.take() {
        err.read_to_end(&mut stderr).unwrap();
    }
    std::process::Output {
        status,
        stdout,
        stderr,
    }
}

/// What `dsu_fixture_compute(7)` returns before any patch (7 + 1), in the fixture programs.
pub const ORIGINAL: u64 = 8;

/// Rust patches of the fixtures' `dsu_fixture_compute`: 7 -> 70 and 7 -> 71.
pub const RUST_X10: &str = r#"
#[unsafe(no_mangle)]
pub extern "C" fn dsu_fixture_compute(x: u64) -> u64 {
    x * 10
}
"#;

pub const RUST_X10_PLUS_1: &str = r#"
#[unsafe(no_mangle)]
pub extern "C" fn dsu_fixture_compute(x: u64) -> u64 {
    x * 10 + 1
}
"#;

/// How long any single wait of a test may take before it fails instead of hanging.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// A running fixture program (`busy_target`, `tests/fixtures/busy.c`) driven over its stdin
/// protocol: one command per line, one reply line each. Its control directory is `ctl` in the
/// test's scratch directory (`DSU_CONTROL_DIR`), its stderr goes to `stderr.log` there. The
/// child is killed and reaped on drop.
pub struct Fixture {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    pub pid: u32,
    /// The `addresses` line: `compute`, `block`, `spin` (and any other `name=0x..`).
    pub addresses: std::collections::HashMap<String, usize>,
    pub control: PathBuf,
    pub stderr_log: PathBuf,
}

impl Fixture {
    /// Starts `program` with `args` and the fixture environment; waits for its `ready` and
    /// `addresses` lines.
    pub fn start(dir: &Path, program: &Path, args: &[&str], env: &[(&str, &Path)]) -> Fixture {
        use std::io::BufRead;
        use std::process::Stdio;

        let control = dir.join("ctl");
        let stderr_log = dir.join("stderr.log");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("DSU_CONTROL_DIR", &control)
            .env_remove("DSU_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).unwrap());
        for (key, value) in env {
            cmd.env(key, value);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let stdin = child.stdin.take().unwrap();
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
        let mut fixture = Fixture {
            child,
            stdin,
            lines,
            pid: 0,
            addresses: Default::default(),
            control,
            stderr_log,
        };
        let ready = fixture.line();
        fixture.pid = ready
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("expected `ready <pid>`, got {ready:?}"));
        let addresses = fixture.line();
        for field in addresses
            .strip_prefix("addresses ")
            .unwrap_or_else(|| panic!("expected `addresses ..`, got {addresses:?}"))
            .split_whitespace()
        {
            let (name, value) = field.split_once('=').unwrap();
            if let Some(hex) = value.strip_prefix("0x") {
                let address = usize::from_str_radix(hex, 16).unwrap();
                fixture.addresses.insert(name.to_string(), address);
            }
        }
        fixture
    }

    /// The next line the program prints, within [`WAIT`].
    fn line(&mut self) -> String {
        match self.lines.recv_timeout(WAIT) {
            Ok(line) => line,
            Err(e) => {
                let alive = self.state();
                panic!(
                    "no line from process {} within {WAIT:?} ({e}); alive: {alive}; its log:\n{}",
                    self.pid,
                    self.log()
                )
            }
        }
    }

    /// Sends one command and returns its reply.
    pub fn send(&mut self, command: &str) -> String {
        use std::io::Write;
        if let Err(e) = writeln!(self.stdin, "{command}").and_then(|()| self.stdin.flush()) {
            let alive = self.state();
            panic!(
                "cannot send {command:?} to process {}: {e}; alive: {alive}; its log:\n{}",
                self.pid,
                self.log()
            );
        }
        self.line()
    }

    /// Sends `command` and asserts the reply.
    pub fn expect(&mut self, command: &str, reply: &str) {
        let got = self.send(command);
        assert_eq!(got, reply, "reply to {command:?}; log:\n{}", self.log());
    }

    /// `dsu_fixture_compute(7)` as the program's main thread computes it now.
    pub fn compute(&mut self) -> u64 {
        let reply = self.send("compute");
        reply
            .strip_prefix("compute ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad reply to compute: {reply:?}"))
    }

    /// Impossible results the workers saw, and their number of calls.
    pub fn errors(&mut self) -> (u64, u64) {
        let reply = self.send("errors");
        let fields: Vec<&str> = reply.split_whitespace().collect();
        match fields[..] {
            ["errors", errors, "calls", calls] => (errors.parse().unwrap(), calls.parse().unwrap()),
            _ => panic!("bad reply to errors: {reply:?}"),
        }
    }

    /// Asserts the workers ran and saw no result that no version of the function gives.
    pub fn no_worker_errors(&mut self) {
        let (errors, calls) = self.errors();
        assert_eq!(
            errors,
            0,
            "workers saw impossible results; log:\n{}",
            self.log()
        );
        assert!(calls > 0, "the workers never ran");
    }

    /// Waits until the workers' most recent result is `value` (they call through the same
    /// entry as everyone else, so they see a new version right after it is applied).
    pub fn workers_see(&mut self, value: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let reply = self.send("last");
            if reply == format!("last {value}") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "workers never computed {value}; last reply {reply:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// The address the program printed for `name`.
    pub fn address(&self, name: &str) -> usize {
        self.addresses[name]
    }

    /// `len` bytes of the process's memory at `address`, read through `/proc/PID/mem`.
    pub fn read_memory(&self, address: usize, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mem = std::fs::File::open(format!("/proc/{}/mem", self.pid)).unwrap();
        let mut bytes = vec![0; len];
        mem.read_exact_at(&mut bytes, address as u64)
            .unwrap_or_else(|e| panic!("cannot read {len} bytes at {address:#x}: {e}"));
        bytes
    }

    /// The code of the whole function the program printed as `name` (its size from the symbol
    /// table of the module it lies in: the executable or a shared library), so a comparison
    /// sees any byte an update changed.
    pub fn code(&self, name: &str) -> Vec<u8> {
        self.code_at(self.address(name))
    }

    /// The code of the whole function at run-time `address`, in any module of the process.
    pub fn code_at(&self, address: usize) -> Vec<u8> {
        let size = self
            .function_size(address)
            .unwrap_or_else(|| panic!("no function symbol at {address:#x}"));
        self.read_memory(address, size)
    }

    /// The code of `name` while an update is retrying: each attempt puts a breakpoint on the
    /// first byte of every edit for its few microseconds (then takes it away, nothing
    /// changed), so this reads again, up to a second, until the code equals `expected`, and
    /// returns the last read.
    pub fn code_between_attempts(&self, name: &str, expected: &[u8]) -> Vec<u8> {
        let mut code = self.code(name);
        for _ in 0..1000 {
            if code == expected {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            code = self.code(name);
        }
        code
    }

    /// The size of the function at run-time `address`, from the symbol table of the module
    /// whose mapping holds it (PIE executable or shared library: vaddr 0 at its first mapping).
    fn function_size(&self, address: usize) -> Option<usize> {
        use object::{Object, ObjectSymbol};
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid)).ok()?;
        let rows: Vec<(usize, usize, u64, &str)> = maps
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (start, end) = f.first()?.split_once('-')?;
                Some((
                    usize::from_str_radix(start, 16).ok()?,
                    usize::from_str_radix(end, 16).ok()?,
                    u64::from_str_radix(f.get(2)?, 16).ok()?,
                    *f.get(5)?,
                ))
            })
            .collect();
        let path = rows
            .iter()
            .find(|(start, end, _, _)| (*start..*end).contains(&address))
            .map(|r| r.3)?;
        // The module's first mapping (file offset 0) is at its load bias.
        let bias = rows.iter().find(|r| r.3 == path && r.2 == 0).map(|r| r.0)?;
        let data = std::fs::read(path).ok()?;
        let file = object::File::parse(&*data).ok()?;
        let link = address.checked_sub(bias)? as u64;
        file.symbols()
            .chain(file.dynamic_symbols())
            .find(|s| s.address() == link && s.size() > 0)
            .map(|s| s.size() as usize)
    }

    /// Sends one command that gets no reply (`exit`).
    pub fn tell(&mut self, command: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("cannot send {command:?} to process {}: {e}", self.pid));
    }

    /// Waits, up to [`WAIT`], for the program to end; its exit status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process {} did not end within {WAIT:?}; its log:\n{}",
                self.pid,
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Waits until the agent has made at least one attempt of the update under way, found a
    /// function active and backed off before the next: see [`agent_backs_off`]. A negative
    /// check ("nothing changed while a thread was inside") made after this has seen the agent
    /// try, instead of hoping that it tried within a fixed time.
    pub fn wait_agent_retrying(&self) {
        let deadline = std::time::Instant::now() + WAIT;
        while !agent_backs_off(self.pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent of process {} never backed off to retry within {WAIT:?}; its log:\n{}",
                self.pid,
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Waits until no `sig` sent to the process as a whole is pending (`ShdPnd` in
    /// `/proc/PID/status`): every one sent so far has been taken by a thread's handler.
    pub fn wait_signal_taken(&self, sig: i32) {
        let bit = 1u64 << (sig - 1);
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
            let pending = status
                .lines()
                .find_map(|l| l.strip_prefix("ShdPnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap_or_else(|| panic!("no ShdPnd in /proc/{}/status", self.pid));
            if pending & bit == 0 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "signal {sig} still pending in process {} after {WAIT:?}",
                self.pid
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// "yes", or how the process ended (exit code or signal), for failure messages.
    pub fn state(&mut self) -> String {
        match self.child.try_wait() {
            Ok(None) => "yes".to_string(),
            Ok(Some(status)) => format!("no, {status}"),
            Err(e) => format!("unknown ({e})"),
        }
    }

    /// The program's stderr without the workers' progress lines: the agent's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with("worker "))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Whether the agent thread of process `pid` (named `dsu-agent`) sleeps in `clock_nanosleep`
/// (system call 230, read from `/proc/PID/task/TID/syscall` without disturbing it). The agent
/// sleeps there only in the backoff between two attempts of an update, after one found a
/// function active (`std::thread::sleep`; its other waits are `poll` and futexes); idle, it
/// waits in `poll`.
pub fn agent_backs_off(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        let path = task.path();
        std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim_end() == "dsu-agent")
            && std::fs::read_to_string(path.join("syscall"))
                .is_ok_and(|s| s.split_whitespace().next() == Some("230"))
    })
}

impl Drop for Fixture {
    /// Kills the program and removes the perf map its agent wrote: a killed process runs no
    /// exit handler, and every test run would leave one more file in /tmp.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", self.pid));
    }
}

/// A patch of the busy fixture's `compute`: `dsu_fixture_compute(7)` becomes 70.
pub const C_X10: &str = "
unsigned long dsu_fixture_compute(unsigned long x) { return x * 10; }
";

/// `compute` (70) and a `spin` that returns 5, keeping the fixture's contract: mark the
/// state inside (1), spin until it is stop (2).
pub const C_X10_AND_SPIN: &str = "
#include <stdatomic.h>
unsigned long dsu_fixture_compute(unsigned long x) { return x * 10; }
unsigned long dsu_fixture_spin(atomic_uint *state) {
    unsigned starting = 0;
    atomic_compare_exchange_strong(state, &starting, 1);
    while (atomic_load_explicit(state, memory_order_relaxed) != 2) {
    }
    return 5;
}
";

/// `count` processes of `program` (a fixture, run with argument `0`: no worker threads)
/// preloaded with the agent, started at once, each with its own control directory under
/// `dir` and its agent warmed up.
pub fn start_preloaded(dir: &Path, program: &Path, count: usize) -> Vec<Fixture> {
    let preload = cargo_bin("libdsu_agent.so");
    let name = program.file_name().unwrap().to_str().unwrap();
    std::thread::scope(|scope| {
        let started: Vec<_> = (0..count)
            .map(|i| {
                let dir = dir.join(format!("{name}-{i}"));
                std::fs::create_dir_all(&dir).unwrap();
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

/// How long an agent may take to warm up: dozens start at once in some tests, each indexing
/// its process's symbols and calls in a debug build, on a machine that may be busy.
pub const WARM_UP: std::time::Duration = std::time::Duration::from_secs(120);

/// Waits until the agent of `fx` has warmed up: its thread writes `status.json` once it has,
/// before it serves its first request. A request sent earlier waits for the warm-up, which
/// with dozens of agents starting at once can outlast a test's `--timeout`.
pub fn wait_warm(fx: &Fixture) {
    let deadline = std::time::Instant::now() + WARM_UP;
    while !fx.control.join("status.json").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent of process {} did not write status.json within {WARM_UP:?}; its log:\n{}",
            fx.pid,
            fx.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
