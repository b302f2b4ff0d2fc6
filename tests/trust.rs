//! Trust end to end (issue 13, `docs/security.md`): signed patches against an agent with
//! trusted keys, patches bound to a build (`dsu pack`), the checks `dsu apply` makes on the
//! patch file, and the system-log record of every refusal.
//!
//! The program is `tests/fixtures/plain.c` made patchable with `LD_PRELOAD=libdsu_agent.so`;
//! its agent logs to a datagram socket the test binds (`DSU_SYSLOG_SOCKET`). Needs the
//! workspace built first (`cargo build --workspace --all-targets`).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::{Fixture, ORIGINAL, cargo_bin, cc_object, cc_program, dsu, scratch};

const PLAIN_C: &str = include_str!("fixtures/plain.c");

const C_X10: &str = "
#include <stdint.h>
uint64_t dsu_fixture_compute(uint64_t x) { return x * 10; }
";

/// The system log as the agent sees it: a datagram socket bound in the scratch directory.
struct Syslog {
    socket: UnixDatagram,
    path: PathBuf,
    lines: Vec<String>,
}

impl Syslog {
    fn bind(dir: &Path) -> Syslog {
        let path = dir.join("log.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Syslog {
            socket,
            path,
            lines: Vec::new(),
        }
    }

    /// Every line received so far.
    fn read(&mut self) -> &[String] {
        let mut buf = vec![0u8; 8192];
        while let Ok(n) = self.socket.recv(&mut buf) {
            self.lines
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        &self.lines
    }

    /// The last line received, which must contain each of `words`.
    fn last_has(&mut self, words: &[&str]) {
        let lines = self.read();
        let last = lines.last().expect("no line in the system log");
        for w in words {
            assert!(last.contains(w), "{w:?} not in the log line {last:?}");
        }
    }
}

fn start(dir: &Path, program: &Path, log: &Syslog, env: &[(&str, &Path)]) -> Fixture {
    let library = cargo_bin("libdsu_agent.so");
    let mut all = vec![
        ("LD_PRELOAD", library.as_path()),
        ("DSU_SYSLOG_SOCKET", log.path.as_path()),
    ];
    all.extend_from_slice(env);
    Fixture::start(dir, program, &[""], &all)
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out: Output = dsu(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (success, stdout, stderr) = run(args);
    assert!(success, "dsu {args:?} failed: {stderr}");
    stdout
}

fn apply(pid: u32, patch: &Path) -> (bool, String) {
    let (success, _, stderr) = run(&["apply", "-p", &pid.to_string(), &path(patch)]);
    (success, stderr)
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Asserts `dsu apply` is refused with `reason`, the code is unchanged and the refusal is
/// in the system log.
fn refused(fx: &mut Fixture, log: &mut Syslog, patch: &Path, reason: &str) {
    let before = fx.code("compute");
    let (success, stderr) = apply(fx.pid, patch);
    assert!(!success, "{} applied", patch.display());
    assert!(stderr.contains(reason), "{reason:?} not in {stderr:?}");
    assert_eq!(fx.code("compute"), before, "the code changed");
    assert_eq!(fx.compute(), ORIGINAL);
    log.last_has(&["op=apply", "outcome=refused", reason]);
}

#[test]
fn with_trusted_keys_only_a_correctly_signed_patch_applies() {
    let dir = scratch("trust-sign");
    let program = cc_program(&dir, "plain", &[("plain.c", PLAIN_C)], &[]);
    let key = dir.join("ops.key");
    let other = dir.join("other.key");
    ok(&["keygen", "--out", &path(&key)]);
    ok(&["keygen", "--out", &path(&other)]);
    let secret_mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(secret_mode, 0o600);
    let pub_key = dir.join("ops.key.pub");
    let mut log = Syslog::bind(&dir);
    let mut fx = start(&dir, &program, &log, &[("DSU_TRUSTED_KEYS", &pub_key)]);

    let patch = cc_object(&dir, "x10", C_X10, &[]);
    refused(&mut fx, &mut log, &patch, "the patch is unsigned");

    let wrong = dir.join("wrong.o");
    ok(&[
        "sign",
        &path(&patch),
        "--key",
        &path(&other),
        "-o",
        &path(&wrong),
    ]);
    refused(
        &mut fx,
        &mut log,
        &wrong,
        "not one of this agent's trusted keys",
    );

    let signed = dir.join("signed.o");
    ok(&[
        "sign",
        &path(&patch),
        "--key",
        &path(&key),
        "-o",
        &path(&signed),
    ]);
    let tampered = dir.join("tampered.o");
    let mut bytes = std::fs::read(&signed).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&tampered, &bytes).unwrap();
    refused(&mut fx, &mut log, &tampered, "does not verify");

    let (success, stderr) = apply(fx.pid, &signed);
    assert!(success, "{stderr}");
    assert_eq!(fx.compute(), 70);
    let key_id = ok(&[
        "sign",
        &path(&patch),
        "--key",
        &path(&key),
        "-o",
        &path(&signed),
    ]);
    let key_id = key_id.trim().rsplit(' ').next().unwrap().to_owned();
    log.last_has(&[
        "op=apply",
        "outcome=applied",
        &format!("signer={key_id}"),
        "verified=true",
    ]);
    let status: serde_json::Value =
        serde_json::from_str(&ok(&["status", "-p", &fx.pid.to_string(), "--json"])).unwrap();
    assert_eq!(status["patches"][0]["signer"], key_id.as_str());

    ok(&["revert", "-p", &fx.pid.to_string()]);
    log.last_has(&["op=revert", "outcome=applied", &format!("signer={key_id}")]);
}

#[test]
fn without_keys_a_signed_patch_applies_with_its_trailer_stripped() {
    let dir = scratch("trust-open");
    let program = cc_program(&dir, "plain", &[("plain.c", PLAIN_C)], &[]);
    let key = dir.join("k");
    ok(&["keygen", "--out", &path(&key)]);
    let mut log = Syslog::bind(&dir);
    let mut fx = start(&dir, &program, &log, &[]);
    let patch = cc_object(&dir, "x10", C_X10, &[]);
    ok(&["sign", &path(&patch), "--key", &path(&key)]);
    let (success, stderr) = apply(fx.pid, &patch);
    assert!(success, "{stderr}");
    assert_eq!(fx.compute(), 70);
    log.last_has(&["outcome=applied", "verified=false"]);
}

/// `plain.c` built with an explicit build id, and with `compute` changed when `changed`.
fn build(dir: &Path, name: &str, build_id: &str, changed: bool) -> PathBuf {
    let source = if changed {
        PLAIN_C.replace("return x + increment;", "return x + increment + 1;")
    } else {
        PLAIN_C.to_owned()
    };
    assert_ne!(
        changed,
        source == PLAIN_C,
        "plain.c no longer has that line"
    );
    let file = format!("{name}.c");
    cc_program(
        dir,
        name,
        &[(&file, &source)],
        &[&format!("-Wl,--build-id=0x{build_id}")],
    )
}

#[test]
fn a_patch_packed_for_another_build_or_other_code_is_refused() {
    let dir = scratch("trust-bind");
    let running = build(&dir, "running", "11112222", false);
    let rebuilt = build(&dir, "rebuilt", "33334444", false);
    let edited = build(&dir, "edited", "11112222", true);
    let mut log = Syslog::bind(&dir);
    let one = Path::new("1");
    let mut fx = start(&dir, &running, &log, &[("DSU_REQUIRE_BINDING", one)]);
    let patch = cc_object(&dir, "x10", C_X10, &[]);

    refused(
        &mut fx,
        &mut log,
        &patch,
        "carries no expectation for dsu_fixture_compute",
    );

    let other_build = dir.join("other-build.o");
    ok(&[
        "pack",
        &path(&patch),
        "--against",
        &path(&rebuilt),
        "-o",
        &path(&other_build),
    ]);
    refused(&mut fx, &mut log, &other_build, "expects build id 33334444");
    log.last_has(&["the process runs build id 11112222"]);

    let other_code = dir.join("other-code.o");
    ok(&[
        "pack",
        &path(&patch),
        "--against",
        &path(&edited),
        "-o",
        &path(&other_code),
    ]);
    refused(
        &mut fx,
        &mut log,
        &other_code,
        "the original code of dsu_fixture_compute",
    );

    let bound = dir.join("bound.o");
    ok(&[
        "pack",
        &path(&patch),
        "--against",
        &fx.pid.to_string(),
        "-o",
        &path(&bound),
    ]);
    let (success, stderr) = apply(fx.pid, &bound);
    assert!(success, "{stderr}");
    assert_eq!(fx.compute(), 70);

    // Without DSU_REQUIRE_BINDING an unbound patch is allowed, but one that carries
    // expectations is held to them all the same.
    let unbound_dir = dir.join("unbound");
    std::fs::create_dir_all(&unbound_dir).unwrap();
    let mut free = start(&unbound_dir, &running, &log, &[]);
    refused(
        &mut free,
        &mut log,
        &other_build,
        "expects build id 33334444",
    );
    refused(
        &mut free,
        &mut log,
        &other_code,
        "the original code of dsu_fixture_compute",
    );
    let (success, stderr) = apply(free.pid, &patch);
    assert!(success, "{stderr}");
    assert_eq!(free.compute(), 70);
}

#[test]
fn dsu_apply_refuses_a_symlinked_or_writable_patch_file() {
    let dir = scratch("trust-path");
    let program = cc_program(&dir, "plain", &[("plain.c", PLAIN_C)], &[]);
    let mut log = Syslog::bind(&dir);
    let mut fx = start(&dir, &program, &log, &[]);
    let patch = cc_object(&dir, "x10", C_X10, &[]);
    let before = fx.code("compute");

    // `dsu` refuses these itself, and records it in the system log as the agent would.
    let log_path = log.path.clone();
    let apply_logged = |patch: &Path| {
        let out = Command::new(cargo_bin("dsu"))
            .args(["apply", "-p", &fx.pid.to_string(), &path(patch)])
            .env("DSU_SYSLOG_SOCKET", &log_path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let link = dir.join("link.o");
    std::os::unix::fs::symlink(&patch, &link).unwrap();
    let (success, stderr) = apply_logged(&link);
    assert!(!success);
    assert!(stderr.contains("is a symbolic link"), "{stderr}");
    log.last_has(&[
        "dsu[",
        "op=apply outcome=refused",
        &format!("target={}", fx.pid),
        "is a symbolic link",
    ]);

    for (mode, who) in [(0o664, "its group"), (0o646, "others")] {
        std::fs::set_permissions(&patch, std::fs::Permissions::from_mode(mode)).unwrap();
        let (success, stderr) = apply_logged(&patch);
        assert!(!success);
        assert!(stderr.contains(&format!("writable by {who}")), "{stderr}");
        log.last_has(&["op=apply outcome=refused", &format!("writable by {who}")]);
    }

    // Another user's patch: only root can make one here.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::fs::set_permissions(&patch, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&patch, Some(65534), None).unwrap();
        let (success, stderr) = apply_logged(&patch);
        assert!(!success);
        assert!(stderr.contains("is owned by uid 65534"), "{stderr}");
        log.last_has(&["op=apply outcome=refused", "owned by uid 65534"]);
    } else {
        eprintln!("skipped the other user's patch: it needs root to create");
    }
    assert_eq!(fx.code("compute"), before);
    assert_eq!(fx.compute(), ORIGINAL);
}

#[test]
fn a_group_writable_control_directory_is_refused() {
    let dir = scratch("trust-ctl");
    let program = cc_program(&dir, "plain", &[("plain.c", PLAIN_C)], &[]);
    let mut log = Syslog::bind(&dir);
    let mut fx = start(&dir, &program, &log, &[]);
    let patch = cc_object(&dir, "x10", C_X10, &[]);
    let before = fx.code("compute");
    std::fs::set_permissions(&fx.control, std::fs::Permissions::from_mode(0o770)).unwrap();
    let (success, stderr) = apply(fx.pid, &patch);
    assert!(!success);
    assert!(
        stderr.contains("writable by group or others") || stderr.contains("0770"),
        "{stderr}"
    );
    assert_eq!(fx.code("compute"), before);
    assert_eq!(fx.compute(), ORIGINAL);
    // Once the directory is private again, the same patch applies.
    std::fs::set_permissions(&fx.control, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (success, stderr) = apply(fx.pid, &patch);
    assert!(success, "{stderr}");
    log.last_has(&["outcome=applied"]);
}

#[test]
fn a_bad_trusted_keys_file_is_an_install_error_naming_its_line() {
    let dir = scratch("trust-badkeys");
    let program = cc_program(&dir, "plain", &[("plain.c", PLAIN_C)], &[]);
    let keys = dir.join("trusted-keys");
    std::fs::write(&keys, "# ops\ndsu-ed25519 not-a-key\n").unwrap();
    let log = Syslog::bind(&dir);
    let mut fx = start(&dir, &program, &log, &[("DSU_TRUSTED_KEYS", &keys)]);
    assert_eq!(fx.compute(), ORIGINAL);
    let agent_log = fx.log();
    assert!(
        agent_log.contains(&format!("trusted keys {}, line 2", keys.display())),
        "{agent_log}"
    );
    // No agent runs with weaker trust than configured: none runs at all.
    let (success, _, stderr) = run(&["status", "-p", &fx.pid.to_string()]);
    assert!(!success, "an agent answered: {stderr}");
}

/// `plain.c` started through a `main` that installs the agent with the C call
/// `dsu_install_trusting(getenv("TEST_KEYS"), atoi(getenv("TEST_BINDING")))`, linked with
/// `libdsu_agent.a`.
const TRUSTING_MAIN_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include "dsu.h"
int plain_main(int argc, char **argv);
int main(int argc, char **argv) {
    const char *binding = getenv("TEST_BINDING");
    int rc = dsu_install_trusting(getenv("TEST_KEYS"), binding ? atoi(binding) : 0);
    if (rc != 0) {
        printf("install %d\n", rc);
        return 1;
    }
    return plain_main(argc, argv);
}
"#;

#[test]
fn a_c_program_trusts_the_keys_it_names_through_the_c_api() {
    let dir = scratch("trust-capi");
    let archive = cargo_bin("libdsu_agent.a");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("dsu-agent/include");
    let mut flags = vec![format!("-I{}", include.display())];
    let plain = dir.join("plain.o");
    std::fs::write(dir.join("plain.c"), PLAIN_C).unwrap();
    support::run(
        Command::new("cc")
            .args(["-c", "-O2", "-Dmain=plain_main", "-o"])
            .arg(&plain)
            .arg(dir.join("plain.c")),
    );
    flags.push(plain.display().to_string());
    flags.push(archive.display().to_string());
    flags.extend(support::NATIVE_LIBS.iter().map(|l| l.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let program = cc_program(&dir, "trusting", &[("trusting.c", TRUSTING_MAIN_C)], &flags);

    let key = dir.join("ops.key");
    ok(&["keygen", "--out", &path(&key)]);
    let pub_key = dir.join("ops.key.pub");
    let patch = cc_object(&dir, "x10", C_X10, &[]);
    let signed = dir.join("signed.o");
    ok(&[
        "sign",
        &path(&patch),
        "--key",
        &path(&key),
        "-o",
        &path(&signed),
    ]);

    let mut log = Syslog::bind(&dir);
    let mut fx = start_linked(&dir, &program, &log, &pub_key, "0".as_ref());
    refused(&mut fx, &mut log, &patch, "the patch is unsigned");
    let (success, stderr) = apply(fx.pid, &signed);
    assert!(success, "{stderr}");
    assert_eq!(fx.compute(), 70);
    drop(fx);

    // Binding required too: the signed patch carries no expectations.
    let dir2 = dir.join("bound");
    std::fs::create_dir_all(&dir2).unwrap();
    let mut log = Syslog::bind(&dir2);
    let mut fx = start_linked(&dir2, &program, &log, &pub_key, "1".as_ref());
    refused(
        &mut fx,
        &mut log,
        &signed,
        "requires every patch to be bound",
    );
}

/// The C-API program (its agent linked, not preloaded) with `TEST_KEYS` and `TEST_BINDING`.
fn start_linked(dir: &Path, program: &Path, log: &Syslog, keys: &Path, binding: &Path) -> Fixture {
    let env = [
        ("DSU_SYSLOG_SOCKET", log.path.as_path()),
        ("TEST_KEYS", keys),
        ("TEST_BINDING", binding),
    ];
    Fixture::start(dir, program, &[""], &env)
}
