//! Kept patches end to end (issue 14): `dsu apply --persist` keeps a patch for the program's
//! build, a process of that build started afterwards comes up patched from its first output,
//! `dsu revert` removes the kept copy, and kept files the agent cannot trust are refused with
//! the reason on record while the program starts regardless.
//!
//! Every process and `dsu` here runs with `DSU_PATCH_DIR` in the test's scratch directory, so
//! nothing is read from or written to the system's directories. Needs the workspace built
//! first (`cargo build --workspace --all-targets`).

mod support;

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::{ORIGINAL, WAIT, cargo_bin, cc_object, cc_program, rustc_object, scratch};

/// A program whose first line of output is the result of its patchable function: a process
/// started patched shows it before it reads any command. Then `compute` answers
/// `compute <dsu_fixture_compute(7)>`. With `LINKED_AGENT` it installs the agent itself
/// (`dsu_install()`, linked from `libdsu_agent.a`) first.
const FIRST_C: &str = r#"
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#ifdef LINKED_AGENT
#include "dsu.h"
#endif

static volatile uint64_t increment = 1;

__attribute__((noinline, noipa)) uint64_t dsu_fixture_compute(uint64_t x) {
    return x + increment;
}

int main(void) {
#ifdef LINKED_AGENT
    int rc = dsu_install();
    if (rc != 0) {
        printf("install %d\n", rc);
        return 1;
    }
#endif
    printf("first %lu\n", (unsigned long)dsu_fixture_compute(7));
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "compute", 7)) {
            printf("compute %lu\n", (unsigned long)dsu_fixture_compute(7));
        } else {
            printf("unknown\n");
        }
        fflush(stdout);
    }
    return 0;
}
"#;

const C_X10: &str = "
#include <stdint.h>
uint64_t dsu_fixture_compute(uint64_t x) { return x * 10; }
";

const C_X10_PLUS_1: &str = "
#include <stdint.h>
uint64_t dsu_fixture_compute(uint64_t x) { return x * 10 + 1; }
";

/// The build id the test programs are linked with, and another program's.
const BUILD_ID: &str = "d5a0000000000000000000000000000000000001";
const OTHER_BUILD_ID: &str = "d5a0000000000000000000000000000000000002";

/// `FIRST_C` built as `name` with build id `build_id` and extra `flags`.
fn program(dir: &Path, name: &str, build_id: &str, flags: &[&str]) -> PathBuf {
    let mut all = vec![format!("-Wl,--build-id=0x{build_id}")];
    all.extend(flags.iter().map(|f| f.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    cc_program(dir, name, &[(&format!("{name}.c"), FIRST_C)], &all)
}

/// The system log as the agent sees it: a datagram socket bound in the scratch directory.
struct Syslog {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Syslog {
    fn bind(dir: &Path) -> Syslog {
        let path = dir.join("log.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Syslog { socket, path }
    }

    /// Every line received since the last call.
    fn lines(&self) -> Vec<String> {
        let mut buf = vec![0u8; 8192];
        let mut lines = Vec::new();
        while let Ok(n) = self.socket.recv(&mut buf) {
            lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        lines
    }
}

/// The environment of one test: its scratch directory, kept-patch base and system log.
struct Setup {
    dir: PathBuf,
    patches: PathBuf,
    log: Syslog,
    started: usize,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = scratch(name);
        let patches = dir.join("patches");
        let log = Syslog::bind(&dir);
        Setup {
            dir,
            patches,
            log,
            started: 0,
        }
    }

    /// The directory of `build_id`, created as `dsu` would for this user.
    fn build_dir(&self, build_id: &str) -> PathBuf {
        let dir = self.patches.join(build_id);
        std::fs::create_dir_all(&dir).unwrap();
        for d in [&self.patches, &dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        dir
    }

    /// Starts `program` preloaded with the agent.
    fn start(&mut self, program: &Path, env: &[(&str, &Path)]) -> Process {
        let library = cargo_bin("libdsu_agent.so");
        let mut all = vec![("LD_PRELOAD", library.as_path())];
        all.extend_from_slice(env);
        self.start_with(program, &all)
    }

    /// Starts `program` with the test environment and `env`; waits for its first line.
    fn start_with(&mut self, program: &Path, env: &[(&str, &Path)]) -> Process {
        self.started += 1;
        let control = self.dir.join(format!("ctl-{}", self.started));
        let stderr_log = self.dir.join(format!("stderr-{}.log", self.started));
        let mut cmd = Command::new(program);
        cmd.env("DSU_CONTROL_DIR", &control)
            .env("DSU_PATCH_DIR", &self.patches)
            .env("DSU_SYSLOG_SOCKET", &self.log.path)
            .env_remove("DSU_LOG")
            .env_remove("DSU_TRUSTED_KEYS")
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
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut process = Process {
            pid: child.id(),
            child,
            stdin,
            lines,
            stderr_log,
            first: 0,
        };
        let first = process.line();
        process.first = first
            .strip_prefix("first ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                panic!("expected `first N`, got {first:?}; log:\n{}", process.log())
            });
        process
    }

    /// Runs `dsu` with this test's `DSU_PATCH_DIR` and system log.
    fn dsu(&self, args: &[&str]) -> Run {
        self.dsu_env(args, &self.patches)
    }

    fn dsu_env(&self, args: &[&str], patch_dir: &Path) -> Run {
        let child = Command::new(cargo_bin("dsu"))
            .args(args)
            .env("DSU_PATCH_DIR", patch_dir)
            .env("DSU_SYSLOG_SOCKET", &self.log.path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = support::finish(child, Duration::from_secs(60));
        Run {
            success: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        let run = self.dsu(args);
        assert!(run.success, "dsu {args:?} failed: {}", run.stderr);
        run.stdout
    }

    /// `dsu status -p PID --json`.
    fn status(&self, pid: u32) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "-p", &pid.to_string(), "--json"])).unwrap()
    }
}

struct Run {
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// A running `FIRST_C` program; killed on drop.
struct Process {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: mpsc::Receiver<String>,
    stderr_log: PathBuf,
    pid: u32,
    /// What its first line said `dsu_fixture_compute(7)` was.
    first: u64,
}

impl Process {
    fn line(&mut self) -> String {
        self.lines.recv_timeout(WAIT).unwrap_or_else(|e| {
            panic!(
                "no line from process {} within {WAIT:?} ({e}); its log:\n{}",
                self.pid,
                self.log()
            )
        })
    }

    fn compute(&mut self) -> u64 {
        use std::io::Write;
        writeln!(self.stdin, "compute").unwrap();
        self.stdin.flush().unwrap();
        let reply = self.line();
        reply
            .strip_prefix("compute ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad reply to compute: {reply:?}"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", self.pid));
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// The entries of `dir`, sorted (none when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Asserts the one `kept` entry of `status` was refused with `reason`, the process runs no
/// patch, and the system log has the refusal naming `file`.
fn refused_at_start(setup: &Setup, process: &Process, file: &Path, reason: &str) {
    let status = setup.status(process.pid);
    assert_eq!(status["patches"], serde_json::json!([]), "{status}");
    let kept = &status["kept"][0];
    assert_eq!(kept["file"], path(file), "{status}");
    assert_eq!(kept["outcome"], "refused", "{status}");
    let error = kept["error"].as_str().unwrap();
    assert!(error.contains(reason), "{reason:?} not in {error:?}");
    let log = setup.log.lines();
    assert!(
        log.iter().any(|l| l.contains("op=apply outcome=refused")
            && l.contains(reason)
            && l.contains(&format!("kept={:?}", path(file)))),
        "no refusal of {} in the system log: {log:?}",
        file.display()
    );
    assert!(
        process.log().contains(reason),
        "agent log:\n{}",
        process.log()
    );
}

#[test]
fn a_patch_kept_with_persist_applies_in_processes_started_later_until_reverted() {
    let mut setup = Setup::new("persist-cycle");
    let shop = program(&setup.dir, "shop", BUILD_ID, &[]);
    let other = program(&setup.dir, "other", OTHER_BUILD_ID, &[]);
    let patch = cc_object(&setup.dir, "x10", C_X10, &[]);
    let mut first = setup.start(&shop, &[]);
    assert_eq!(first.first, ORIGINAL);

    let out = setup.ok(&[
        "apply",
        "-p",
        &first.pid.to_string(),
        "--persist",
        &path(&patch),
    ]);
    assert_eq!(first.compute(), 70);
    let build_dir = setup.patches.join(BUILD_ID);
    let sha = dsu_agent::trust::expect::code_hash(&std::fs::read(&patch).unwrap());
    let kept = build_dir.join(format!("0001-{}.o", &sha[..16]));
    assert!(
        out.contains(&format!("kept as {} for build {BUILD_ID}", kept.display())),
        "{out}"
    );
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        std::fs::read(&patch).unwrap()
    );
    let (dir_mode, file_mode) = if is_root() {
        (0o755, 0o644)
    } else {
        (0o700, 0o600)
    };
    assert_eq!((mode(&build_dir), mode(&kept)), (dir_mode, file_mode));

    // A process of the same build runs the fix from its first output, and shows the patch.
    let second = setup.start(&shop, &[]);
    assert_eq!(second.first, 70, "log:\n{}", second.log());
    let status = setup.status(second.pid);
    assert_eq!(status["patches"][0]["file"], path(&kept), "{status}");
    assert_eq!(status["patches"][0]["sha256"], sha.as_str());
    assert_eq!(
        status["kept"],
        serde_json::json!([{"file": path(&kept), "outcome": "applied", "patch_id": 1}])
    );
    let text = setup.ok(&["status", "-p", &second.pid.to_string()]);
    assert!(
        text.contains(&format!("  {}: applied as patch 1", kept.display())),
        "{text}"
    );
    assert!(
        setup
            .log
            .lines()
            .iter()
            .any(|l| l.contains("op=apply outcome=applied")
                && l.contains(&format!("kept={:?}", path(&kept)))),
        "the start-up apply is not in the system log"
    );

    // Keeping the same patch again adds no second copy.
    let again = setup.ok(&[
        "apply",
        "-p",
        &second.pid.to_string(),
        "--persist",
        &path(&patch),
    ]);
    assert!(
        again.contains(&format!("already kept as {}", kept.display())),
        "{again}"
    );
    assert_eq!(entries(&build_dir).len(), 1);

    // Another program (another build id) is left alone.
    let unrelated = setup.start(&other, &[]);
    assert_eq!(unrelated.first, ORIGINAL);
    assert_eq!(setup.status(unrelated.pid)["kept"], serde_json::Value::Null);

    // Reverting it in the first process removes the kept copy: later processes start without.
    let out = setup.ok(&["revert", "-p", &first.pid.to_string()]);
    assert!(
        out.contains(&format!("removed kept patch {}", kept.display())),
        "{out}"
    );
    assert!(!kept.exists());
    assert_eq!(first.compute(), ORIGINAL);
    let third = setup.start(&shop, &[]);
    assert_eq!(third.first, ORIGINAL, "log:\n{}", third.log());
    assert_eq!(setup.status(third.pid)["patches"], serde_json::json!([]));
}

#[test]
fn kept_patches_the_agent_cannot_trust_are_refused_and_the_program_starts_unpatched() {
    let mut setup = Setup::new("persist-unsafe");
    let shop = program(&setup.dir, "shop", BUILD_ID, &[]);
    let patch = cc_object(&setup.dir, "x10", C_X10, &[]);
    let dir = setup.build_dir(BUILD_ID);
    let kept = dir.join("0001-fix.o");
    std::fs::copy(&patch, &kept).unwrap();
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The directory is writable by its group: nothing in it is read.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    let process = setup.start(&shop, &[]);
    assert_eq!(process.first, ORIGINAL);
    refused_at_start(
        &setup,
        &process,
        &dir,
        "is writable by its group (mode 0770)",
    );
    drop(process);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();

    // The file is a symbolic link (to a good patch).
    std::fs::rename(&kept, dir.join("real")).unwrap();
    std::os::unix::fs::symlink(dir.join("real"), &kept).unwrap();
    let process = setup.start(&shop, &[]);
    assert_eq!(process.first, ORIGINAL);
    refused_at_start(&setup, &process, &kept, "0001-fix.o is a symbolic link");
    drop(process);
    std::fs::remove_file(&kept).unwrap();
    std::fs::rename(dir.join("real"), &kept).unwrap();

    // The file belongs to another user: only root can make one.
    if is_root() {
        std::os::unix::fs::chown(&kept, Some(65534), None).unwrap();
        let process = setup.start(&shop, &[]);
        assert_eq!(process.first, ORIGINAL);
        refused_at_start(
            &setup,
            &process,
            &kept,
            "is owned by uid 65534, neither this process's uid 0 nor root",
        );
        drop(process);
        std::os::unix::fs::chown(&kept, Some(0), None).unwrap();
    } else {
        eprintln!("skipped the other user's kept patch: it needs root to create");
    }

    // Put right, the same file applies.
    let process = setup.start(&shop, &[]);
    assert_eq!(process.first, 70, "log:\n{}", process.log());
}

#[test]
fn a_corrupt_kept_patch_is_skipped_and_the_next_one_still_applies() {
    let mut setup = Setup::new("persist-corrupt");
    let shop = program(&setup.dir, "shop", BUILD_ID, &[]);
    let dir = setup.build_dir(BUILD_ID);
    let corrupt = dir.join("0001-corrupt.o");
    let mut bytes = std::fs::read(cc_object(&setup.dir, "x10", C_X10, &[])).unwrap();
    bytes.truncate(100); // a header whose sections lie past the end
    std::fs::write(&corrupt, &bytes).unwrap();
    let good = dir.join("0002-good.o");
    std::fs::copy(cc_object(&setup.dir, "x10p1", C_X10_PLUS_1, &[]), &good).unwrap();
    // The same patch kept twice (as root system-wide and by the user, say) applies once.
    let again = dir.join("0003-again.o");
    std::fs::copy(&good, &again).unwrap();
    for f in [&corrupt, &good, &again] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut process = setup.start(&shop, &[]);
    assert_eq!(process.first, 71, "log:\n{}", process.log());
    assert_eq!(process.compute(), 71);
    let status = setup.status(process.pid);
    let kept = status["kept"].as_array().unwrap();
    assert_eq!(kept.len(), 3, "{status}");
    assert_eq!(kept[0]["file"], path(&corrupt));
    assert_eq!(kept[0]["outcome"], "refused", "{status}");
    assert!(kept[0]["patch_id"].is_null());
    let error = kept[0]["error"].as_str().unwrap();
    assert!(
        error.starts_with("invalid patch: malformed ELF object"),
        "{error}"
    );
    assert_eq!(kept[1]["outcome"], "applied", "{status}");
    assert_eq!(kept[1]["patch_id"], 2);
    assert_eq!(kept[2]["outcome"], "refused", "{status}");
    assert_eq!(
        kept[2]["error"],
        format!(
            "kept patch {} is the same patch as patch 2, applied already; skipped",
            again.display()
        )
    );
    assert_eq!(status["patches"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["patches"][0]["id"], 2);
    let text = setup.ok(&["status", "-p", &process.pid.to_string()]);
    assert!(
        text.contains(&format!(
            "3 kept patch(es) tried at start-up:\n  {}: refused: invalid patch: malformed ELF \
             object",
            corrupt.display()
        )),
        "{text}"
    );
    assert!(
        process
            .log()
            .contains(&format!("patch {} not applied", corrupt.display())),
        "agent log:\n{}",
        process.log()
    );
    // It can be reverted like any other patch.
    setup.ok(&["revert", "-p", &process.pid.to_string()]);
    assert_eq!(process.compute(), ORIGINAL);
}

#[test]
fn with_trusted_keys_an_unsigned_kept_patch_is_refused_at_start_up() {
    let mut setup = Setup::new("persist-keys");
    let shop = program(&setup.dir, "shop", BUILD_ID, &[]);
    let key = setup.dir.join("ops.key");
    setup.ok(&["keygen", "--out", &path(&key)]);
    let dir = setup.build_dir(BUILD_ID);
    let unsigned = dir.join("0001-unsigned.o");
    std::fs::copy(cc_object(&setup.dir, "x10", C_X10, &[]), &unsigned).unwrap();
    let signed = dir.join("0002-signed.o");
    let fix = cc_object(&setup.dir, "x10p1", C_X10_PLUS_1, &[]);
    setup.ok(&[
        "sign",
        &path(&fix),
        "--key",
        &path(&key),
        "-o",
        &path(&signed),
    ]);
    for f in [&unsigned, &signed] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let pub_key = setup.dir.join("ops.key.pub");
    let process = setup.start(&shop, &[("DSU_TRUSTED_KEYS", &pub_key)]);
    assert_eq!(process.first, 71, "log:\n{}", process.log());
    let status = setup.status(process.pid);
    assert_eq!(status["kept"][0]["outcome"], "refused", "{status}");
    let error = status["kept"][0]["error"].as_str().unwrap();
    assert!(error.contains("the patch is unsigned"), "{error}");
    assert_eq!(status["kept"][1]["outcome"], "applied", "{status}");
    assert!(status["patches"][0]["signer"].is_string(), "{status}");
    let log = setup.log.lines();
    assert!(
        log.iter().any(|l| l.contains("outcome=refused")
            && l.contains("the patch is unsigned")
            && l.contains(&format!("kept={:?}", path(&unsigned)))),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("outcome=applied") && l.contains("verified=true")),
        "{log:?}"
    );
}

#[test]
fn a_c_program_linking_the_agent_applies_kept_patches_inside_dsu_install() {
    let mut setup = Setup::new("persist-linked");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("dsu-agent/include");
    let archive = cargo_bin("libdsu_agent.a");
    let mut flags = vec![
        "-DLINKED_AGENT".to_owned(),
        format!("-I{}", include.display()),
        archive.display().to_string(),
    ];
    flags.extend(support::NATIVE_LIBS.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let shop = program(&setup.dir, "shop", BUILD_ID, &flags);
    let dir = setup.build_dir(BUILD_ID);
    let kept = dir.join("0001-fix.o");
    std::fs::copy(cc_object(&setup.dir, "x10", C_X10, &[]), &kept).unwrap();
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut process = setup.start_with(&shop, &[]);
    assert_eq!(process.first, 70, "log:\n{}", process.log());
    assert_eq!(process.compute(), 70);
    // `DSU_PATCH_DIR=off` turns kept patches off.
    let off = setup.start_with(&shop, &[("DSU_PATCH_DIR", Path::new("off"))]);
    assert_eq!(off.first, ORIGINAL);
}

#[test]
fn a_rust_program_installing_the_agent_comes_up_patched() {
    let setup = Setup::new("persist-rust");
    let program = cargo_bin("busy_target");
    let build_id = dsu_agent::persist::build_id::of_file(&std::fs::File::open(&program).unwrap())
        .unwrap()
        .expect("cargo links examples with a build id");
    let dir = setup.build_dir(&build_id);
    let kept = dir.join("0001-fix.o");
    std::fs::copy(rustc_object(&setup.dir, "x10", support::RUST_X10), &kept).unwrap();
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o600)).unwrap();
    // busy_target answers commands only after install() returned.
    let mut fx = support::Fixture::start(
        &setup.dir,
        &program,
        &["0"],
        &[("DSU_PATCH_DIR", &setup.patches)],
    );
    assert_eq!(fx.compute(), 70, "log:\n{}", fx.log());
}

#[test]
fn dsu_apply_persist_refuses_what_it_cannot_keep_before_applying() {
    let mut setup = Setup::new("persist-refuse");
    let patch = cc_object(&setup.dir, "x10", C_X10, &[]);
    let anonymous = cc_program(
        &setup.dir,
        "anonymous",
        &[("anonymous.c", FIRST_C)],
        &["-Wl,--build-id=none"],
    );
    let mut process = setup.start(&anonymous, &[]);
    let pid = process.pid.to_string();
    let run = setup.dsu(&["apply", "-p", &pid, "--persist", &path(&patch)]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "process {pid} runs {}, which has no GNU build id",
            anonymous.display()
        )) && run.stderr.contains("nothing was applied"),
        "{}",
        run.stderr
    );
    assert_eq!(process.compute(), ORIGINAL);

    let shop = program(&setup.dir, "shop", BUILD_ID, &[]);
    let mut process = setup.start(&shop, &[]);
    let pid = process.pid.to_string();
    let run = setup.dsu_env(
        &["apply", "-p", &pid, "--persist", &path(&patch)],
        Path::new("off"),
    );
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("kept patches are turned off (DSU_PATCH_DIR=off); nothing was applied"),
        "{}",
        run.stderr
    );

    let dir = setup.build_dir(BUILD_ID);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let run = setup.dsu(&["apply", "-p", &pid, "--persist", &path(&patch)]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "kept patch directory {} is writable by others (mode 0777)",
            dir.display()
        )) && run
            .stderr
            .contains("the agent would refuse to read it (nothing was applied)"),
        "{}",
        run.stderr
    );
    assert_eq!(process.compute(), ORIGINAL);
    assert!(entries(&dir).is_empty());

    let run = setup.dsu(&[
        "apply",
        "-p",
        &pid,
        "--persist",
        "--allow-stale-clones",
        &path(&patch),
    ]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("cannot be used with"), "{}", run.stderr);
    assert!(!run.success);
}

#[test]
fn apply_all_with_persist_keeps_the_patch_once_and_revert_all_removes_it() {
    let mut setup = Setup::new("persist-all");
    let shop = program(&setup.dir, "shop", BUILD_ID, &[]);
    let patch = cc_object(&setup.dir, "x10", C_X10, &[]);
    let mut running: Vec<Process> = (0..3).map(|_| setup.start(&shop, &[])).collect();
    let exe = std::fs::canonicalize(&shop).unwrap();

    let run = setup.dsu(&[
        "apply",
        "--all",
        "--exe",
        &path(&exe),
        "--persist",
        "--json",
        &path(&patch),
    ]);
    assert!(run.success, "{}", run.stderr);
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["counts"]["applied"], 3, "{doc}");
    let sha = dsu_agent::trust::expect::code_hash(&std::fs::read(&patch).unwrap());
    let build_dir = setup.patches.join(BUILD_ID);
    let kept = build_dir.join(format!("0001-{}.o", &sha[..16]));
    // One copy for the build, however many of its processes were patched.
    assert_eq!(
        doc["kept"],
        serde_json::json!([{"build_id": BUILD_ID, "path": path(&kept), "action": "kept"}])
    );
    assert_eq!(entries(&build_dir), [format!("0001-{}.o", &sha[..16])]);
    for process in &mut running {
        assert_eq!(process.compute(), 70);
    }
    let later = setup.start(&shop, &[]);
    assert_eq!(later.first, 70, "log:\n{}", later.log());

    // The text summary says where it went; a second rollout keeps no second copy.
    let again = setup.ok(&[
        "apply",
        "--all",
        "--exe",
        &path(&exe),
        "--persist",
        &path(&patch),
    ]);
    assert!(
        again.contains(&format!(
            "already kept as {} for build {BUILD_ID}",
            kept.display()
        )),
        "{again}"
    );
    assert_eq!(entries(&build_dir).len(), 1);

    // One revert --all takes the newest patch out of every process (the later one included)
    // and removes the kept copy: a process started afterwards runs the original.
    let out = setup.ok(&["revert", "--all", "--exe", &path(&exe)]);
    assert!(
        out.contains(&format!("removed kept patch {}", kept.display())),
        "{out}"
    );
    assert!(entries(&build_dir).is_empty(), "{:?}", entries(&build_dir));
    let fresh = setup.start(&shop, &[]);
    assert_eq!(fresh.first, ORIGINAL, "log:\n{}", fresh.log());
}

#[test]
fn apply_all_with_persist_refuses_a_program_without_build_id_before_applying() {
    let mut setup = Setup::new("persist-all-no-id");
    let bare = cc_program(
        &setup.dir,
        "bare",
        &[("bare.c", FIRST_C)],
        &["-Wl,--build-id=none"],
    );
    let patch = cc_object(&setup.dir, "x10", C_X10, &[]);
    let mut process = setup.start(&bare, &[]);
    let exe = std::fs::canonicalize(&bare).unwrap();
    let run = setup.dsu(&[
        "apply",
        "--all",
        "--exe",
        &path(&exe),
        "--persist",
        &path(&patch),
    ]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "process {} runs {}, which has no GNU build id",
            process.pid,
            exe.display()
        )) && run.stderr.contains("nothing was applied"),
        "{}",
        run.stderr
    );
    assert_eq!(process.compute(), ORIGINAL);
    assert!(!setup.patches.exists());
}
