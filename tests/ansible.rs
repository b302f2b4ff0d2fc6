//! The example Ansible playbook, `examples/ansible/rollout.yml`, run against this machine
//! (`ansible-playbook -i localhost, -c local`, or two inventory names that are both this
//! machine, to see the host-level canary) with processes of `tests/fixtures/busy.c` made
//! patchable with `LD_PRELOAD=libdsu_agent.so`. Each process's behaviour is read back over its
//! stdin protocol.
//!
//! Needs `ansible-playbook` (ansible-core; `.ci/run` installs it). Without it, each test
//! fails saying how to install it when the `CI` environment variable is set, and otherwise
//! writes a skip notice to stderr (past the test harness's capture, so `cargo test` shows it)
//! and returns.
//!
//! Other programs with an agent may run at the same time (other test files; as root, every
//! user's): the playbook always names this test's executable (`dsu_exe`), so only the count
//! of processes skipped depends on them.
//!
//! Needs the workspace built first (`cargo build --workspace --all-targets`).

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::{
    C_X10, C_X10_AND_SPIN, Fixture, ORIGINAL, cargo_bin, cc_object, cc_program, dsu, finish,
    scratch, start_preloaded,
};

const BUSY_C: &str = include_str!("fixtures/busy.c");

/// How to get `ansible-playbook`, in the failure or the skip notice.
const INSTALL: &str = "install ansible-core: `apt-get install --no-install-recommends \
                       ansible-core` (Debian, as .ci/run does) or `python3 -m pip install \
                       ansible-core`";

/// Whether `ansible-playbook` runs. Without it: a failure naming the fix when `CI` is set (a
/// CI run that skipped these would pass without testing the playbook), else a notice on the
/// real stderr and `false`.
fn have_ansible(test: &str) -> bool {
    let runs = Command::new("ansible-playbook")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runs {
        return true;
    }
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("ansible-playbook is not installed, and CI must run {test}: {INSTALL}");
    }
    // Written to the file descriptor itself: libtest captures only `eprintln!`, and hides
    // what a passing test printed.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: ansible-playbook is not installed; {INSTALL}"
    );
    false
}

/// The busy program and the test's scratch directory.
struct Setup {
    dir: PathBuf,
    busy: PathBuf,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = scratch(name);
        let busy = cc_program(&dir, "busy", &[("busy.c", BUSY_C)], &["-pthread"]);
        Setup {
            busy: fs::canonicalize(busy).unwrap(),
            dir,
        }
    }

    /// `count` processes of the busy program, without worker threads, each with its own
    /// control directory and its agent warmed up.
    fn start(&self, count: usize) -> Vec<Fixture> {
        start_preloaded(&self.dir, &self.busy, count)
    }

    fn patch(&self, name: &str, source: &str) -> PathBuf {
        cc_object(&self.dir, name, source, &[])
    }

    /// The directory the playbook copies the patch into on the host (`dsu_remote_tmp`).
    fn remote_tmp(&self) -> PathBuf {
        let dir = self.dir.join("remote-tmp");
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Runs the playbook against `hosts` (an inline inventory: every name is this machine,
    /// through the local connection) with `vars` as extra vars; its output.
    fn playbook(&self, hosts: &str, vars: Value) -> Output {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let ansible_tmp = self.dir.join("ansible-tmp");
        let child = Command::new("ansible-playbook")
            .args(["-i", hosts, "-c", "local"])
            .arg(root.join("examples/ansible/rollout.yml"))
            .arg("-e")
            .arg(vars.to_string())
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
            .env("ANSIBLE_LOCAL_TEMP", &ansible_tmp)
            .env("ANSIBLE_REMOTE_TMP", &ansible_tmp)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run ansible-playbook: {e}"));
        // Generous: Python starting a few times on a machine busy with other tests.
        finish(child, Duration::from_secs(300))
    }

    /// The extra vars every run passes: this build's `dsu`, this test's program, the copy of
    /// the patch in the scratch directory, and the Python that runs ansible-playbook for its
    /// modules (the host is this machine; interpretation discovery may find a `python3` of
    /// another environment that cannot run them).
    fn vars(&self, more: Value) -> Value {
        let mut vars = json!({
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            "dsu_bin": cargo_bin("dsu"),
            "dsu_exe": self.busy,
            "dsu_remote_tmp": self.remote_tmp(),
        });
        vars.as_object_mut()
            .unwrap()
            .extend(more.as_object().unwrap().clone());
        vars
    }

    /// Asserts the playbook left no copy of a patch behind.
    fn no_copy_left(&self) {
        let left: Vec<_> = fs::read_dir(self.remote_tmp())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "the playbook left {left:?}");
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The report line of the playbook's output that starts with `start` and ends with `end`
/// (the count of processes skipped between them depends on what else runs here), as the
/// default callback prints a message: quoted, with a comma after all but the last.
fn report_line<'a>(output: &'a str, start: &str, end: &str) -> &'a str {
    output
        .lines()
        .map(|l| l.trim().trim_end_matches(','))
        .find(|l| l.starts_with(&format!("\"{start}")) && l.ends_with(&format!("{end}\"")))
        .unwrap_or_else(|| panic!("no report line {start}...{end} in\n{output}"))
}

/// The `PLAY RECAP` line of `host`, its fields in one space each.
fn recap(output: &str, host: &str) -> String {
    let at = output
        .find("PLAY RECAP")
        .unwrap_or_else(|| panic!("no PLAY RECAP in\n{output}"));
    output[at..]
        .lines()
        .find(|l| l.split_whitespace().next() == Some(host))
        .unwrap_or_else(|| panic!("{host} is not in the recap of\n{output}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The ids of the patches in effect in process `pid`, from `dsu status -p PID --json`.
fn patches(pid: u32) -> Vec<u64> {
    let out = dsu(&["status", "-p", &pid.to_string(), "--json"]);
    assert!(out.status.success(), "dsu status -p {pid}: {}", text(&out));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    status["patches"]
        .as_array()
        .unwrap_or_else(|| panic!("no patches in {status}"))
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect()
}

/// The playbook patches every process of the program on the host (the lowest pid first, as
/// dsu's canary), says so per host and in its summary, counts one change, and leaves no copy
/// of the patch; in revert mode, with the same settings, it puts every process back.
#[test]
fn the_playbook_patches_and_reverts_the_processes_of_a_host() {
    if !have_ansible("the_playbook_patches_and_reverts_the_processes_of_a_host") {
        return;
    }
    let setup = Setup::new("ansible-apply");
    let patch = setup.patch("x10", C_X10);
    let mut busy = setup.start(3);

    let canary = json!({"dsu_canary": 1, "dsu_canary_wait": 0.1});
    let mut vars = setup.vars(canary.clone());
    vars["dsu_patch"] = json!(patch);
    let out = setup.playbook("localhost,", vars);
    let output = text(&out);
    assert!(out.status.success(), "ansible-playbook failed:\n{output}");
    let headline = report_line(
        &output,
        "localhost: apply x10.o: 3 applied, ",
        " skipped, 0 failed [dsu exit 0]",
    );
    // Once in the host's report, once in the summary of the rollout.
    assert_eq!(output.matches(headline).count(), 2, "{output}");
    let lowest = busy.iter().map(|fx| fx.pid).min().unwrap();
    report_line(&output, &format!("canary: process {lowest}: passed"), "");
    assert!(
        recap(&output, "localhost")
            .starts_with("localhost : ok=8 changed=1 unreachable=0 failed=0"),
        "{output}"
    );
    for fx in &mut busy {
        assert_eq!(fx.compute(), 70, "process {}", fx.pid);
    }
    setup.no_copy_left();

    // dsu revert --all has no --canary: the playbook leaves it out.
    let mut vars = setup.vars(canary);
    vars["dsu_mode"] = json!("revert");
    let out = setup.playbook("localhost,", vars);
    let output = text(&out);
    assert!(out.status.success(), "ansible-playbook failed:\n{output}");
    report_line(
        &output,
        "localhost: revert the newest patch: 3 reverted, ",
        " skipped, 0 failed [dsu exit 0]",
    );
    assert!(
        recap(&output, "localhost").contains(" changed=1 unreachable=0 failed=0"),
        "{output}"
    );
    for fx in &mut busy {
        assert_eq!(fx.compute(), ORIGINAL, "process {}", fx.pid);
    }
}

/// One process keeps a function the patch replaces active: dsu reports it failed, and the
/// first host (`canary`) fails with the agent's reason after its report. The rollout stops
/// there: the second host (`rest`, this machine again) is never reached, so the processes
/// patched on the first carry the patch once, not twice.
#[test]
fn a_process_that_refuses_fails_the_host_and_stops_the_rollout() {
    if !have_ansible("a_process_that_refuses_fails_the_host_and_stops_the_rollout") {
        return;
    }
    let setup = Setup::new("ansible-refused");
    let patch = setup.patch("x10_spin", C_X10_AND_SPIN);
    let mut busy = setup.start(3);
    busy[1].expect("spin", "spinning");
    let stuck = busy[1].pid;
    let spin_before = busy[1].code("spin");

    let vars = setup.vars(json!({"dsu_patch": patch, "dsu_timeout": 0.5}));
    let out = setup.playbook("canary,rest,", vars);
    let output = text(&out);
    // ansible-playbook's exit code when a host failed.
    assert_eq!(out.status.code(), Some(2), "{output}");
    report_line(
        &output,
        "canary: apply x10_spin.o: 2 applied, ",
        " skipped, 1 failed [dsu exit 1]",
    );
    let failed = format!(
        "failed: process {stuck} ({}): refused: dsu_fixture_spin is active in thread ",
        setup.busy.display()
    );
    report_line(&output, &failed, "; nothing was changed");
    report_line(
        &output,
        "dsu: 1 of 3 processes failed to apply the patch",
        "",
    );
    report_line(&output, "rest: not reached", "");
    let fatal = output
        .lines()
        .find(|l| l.starts_with("fatal: [canary]: FAILED!"))
        .unwrap_or_else(|| panic!("canary did not fail:\n{output}"));
    assert!(fatal.contains(&failed), "{fatal}");
    assert!(recap(&output, "canary").contains(" failed=1 "), "{output}");
    assert!(
        !output.lines().any(|l| l.starts_with("ok: [rest]")),
        "the second host ran:\n{output}"
    );

    for fx in &mut busy {
        if fx.pid == stuck {
            continue;
        }
        assert_eq!(fx.compute(), 70, "process {}", fx.pid);
        assert_eq!(patches(fx.pid), [1], "process {}", fx.pid);
    }
    let fx = &mut busy[1];
    assert_eq!(fx.compute(), ORIGINAL);
    assert_eq!(fx.code("spin"), spin_before);
    assert_eq!(patches(stuck), [] as [u64; 0]);
    // The original spin returns 0 or 1; the patched one 5.
    let reply = fx.send("unspin");
    assert!(reply == "unspun 0" || reply == "unspun 1", "{reply}");
    setup.no_copy_left();
}

/// What keeps dsu from running, or from finding a process, fails the host with the reason:
/// a play without the program named, a patch missing on the controller, a dsu command
/// missing on the host, a program no process runs (which `dsu_none_ok` accepts).
#[test]
fn settings_that_cannot_work_fail_the_host_with_the_reason() {
    if !have_ansible("settings_that_cannot_work_fail_the_host_with_the_reason") {
        return;
    }
    let setup = Setup::new("ansible-bad");
    let patch = setup.patch("x10", C_X10);
    let failed = |vars: Value| {
        let out = setup.playbook("localhost,", vars);
        let output = text(&out);
        assert_eq!(out.status.code(), Some(2), "{output}");
        let fatal = output
            .lines()
            .rfind(|l| l.starts_with("fatal: [localhost]: FAILED!"))
            .unwrap_or_else(|| panic!("localhost did not fail:\n{output}"))
            .to_owned();
        (output, fatal)
    };

    let mut vars = setup.vars(json!({"dsu_patch": patch}));
    vars.as_object_mut().unwrap().remove("dsu_exe");
    let (_, fatal) = failed(vars);
    assert!(
        fatal.contains("\"msg\": \"dsu_mode must be apply or revert; apply needs dsu_patch; and dsu_exe or dsu_build_id must name the program"),
        "{fatal}"
    );

    let missing = setup.dir.join("missing.o");
    let (output, fatal) = failed(setup.vars(json!({"dsu_patch": missing})));
    // Newer ansible-core words the error "Copy the patch: Unexpected AnsibleActionFail
    // error: Could not find ...".
    let reason = format!(
        "Could not find or access '{}' on the Ansible Controller.",
        missing.display()
    );
    assert!(
        fatal.contains("\"msg\": \"Copy the patch: ") && fatal.contains(&reason),
        "{fatal}"
    );
    // In the report and the summary.
    assert_eq!(
        output
            .matches("\"localhost: apply missing.o: dsu not run\"")
            .count(),
        2,
        "{output}"
    );
    setup.no_copy_left();

    let no_dsu = setup.dir.join("no-dsu");
    let (output, fatal) = failed(setup.vars(json!({"dsu_patch": patch, "dsu_bin": no_dsu})));
    report_line(
        &output,
        "localhost: apply x10.o: no process touched [dsu exit 2]",
        "",
    );
    // The command module's reason follows: the errno before ansible-core 2.19, a generic
    // "Error executing command." since.
    assert!(
        fatal.contains(&format!("\"msg\": \"cannot run {}: ", no_dsu.display())),
        "{fatal}"
    );
    setup.no_copy_left();

    let nothing = setup.dir.join("no-such-program");
    let (output, fatal) = failed(setup.vars(json!({"dsu_patch": patch, "dsu_exe": nothing})));
    report_line(
        &output,
        "localhost: apply x10.o: no process selected [dsu exit 3]",
        "",
    );
    let reason = format!(
        "dsu: no process with a dsu agent matches --exe {}",
        nothing.display()
    );
    assert!(fatal.contains(&format!("\"msg\": \"{reason}")), "{fatal}");

    let vars = setup.vars(json!({"dsu_patch": patch, "dsu_exe": nothing, "dsu_none_ok": true}));
    let out = setup.playbook("localhost,", vars);
    let output = text(&out);
    assert!(out.status.success(), "{output}");
    report_line(
        &output,
        "localhost: apply x10.o: no process selected [dsu exit 3]",
        "",
    );
    assert!(
        recap(&output, "localhost").contains(" changed=0 unreachable=0 failed=0"),
        "{output}"
    );
    setup.no_copy_left();
}
