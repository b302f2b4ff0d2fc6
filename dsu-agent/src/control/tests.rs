//! Unit tests of the control directory: path rule, creation, refusals, claiming requests.

use super::*;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("dsu-control-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::DirBuilder::new().mode(0o700).create(&path).unwrap();
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
    let map: HashMap<String, OsString> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), OsString::from(v)))
        .collect();
    move |name| map.get(name).cloned()
}

fn open(scratch: &Scratch) -> ControlDir {
    ControlDir::open_or_create(scratch.0.join("ctl")).unwrap()
}

#[test]
fn resolve_with_prefers_dsu_control_dir_then_xdg_then_tmp() {
    let all = env(&[
        ("DSU_CONTROL_DIR", "/srv/ctl"),
        ("XDG_RUNTIME_DIR", "/run/user/7"),
    ]);
    assert_eq!(ControlDir::resolve_with(all, 42, 7), Path::new("/srv/ctl"));
    let xdg = env(&[("XDG_RUNTIME_DIR", "/run/user/7")]);
    assert_eq!(
        ControlDir::resolve_with(xdg, 42, 7),
        Path::new("/run/user/7/dsu/42")
    );
    assert_eq!(
        ControlDir::resolve_with(env(&[]), 42, 7),
        Path::new("/tmp/dsu-7/42")
    );
}

#[test]
fn resolve_with_ignores_empty_values_and_relative_xdg() {
    let empty = env(&[("DSU_CONTROL_DIR", ""), ("XDG_RUNTIME_DIR", "")]);
    assert_eq!(
        ControlDir::resolve_with(empty, 1, 0),
        Path::new("/tmp/dsu-0/1")
    );
    let relative = env(&[("XDG_RUNTIME_DIR", "run")]);
    assert_eq!(
        ControlDir::resolve_with(relative, 1, 0),
        Path::new("/tmp/dsu-0/1")
    );
}

#[test]
fn open_or_create_makes_the_directory_and_parents_0700() {
    let scratch = Scratch::new();
    let path = scratch.0.join("dsu-1000").join("42");
    let dir = ControlDir::open_or_create(&path).unwrap();
    assert_eq!(dir.path(), path);
    assert_eq!(mode(&path), 0o700);
    assert_eq!(mode(&scratch.0.join("dsu-1000")), 0o700);
    assert_eq!(mode(&path.join(CONSUMED_DIR)), 0o700);
    // Opening again is fine.
    ControlDir::open_or_create(&path).unwrap();
}

#[test]
fn a_directory_writable_by_group_or_others_is_refused() {
    let scratch = Scratch::new();
    let path = scratch.0.join("ctl");
    for bad in [0o777, 0o720, 0o702] {
        fs::DirBuilder::new().mode(0o700).create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
        let err = ControlDir::open_or_create(&path).unwrap_err();
        assert!(
            matches!(err, ControlError::InsecureMode { mode, .. } if mode == bad),
            "{err}"
        );
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("chmod 700"), "{message}");
        assert!(err.outcome(1).is_none());
        fs::remove_dir(&path).unwrap();
    }
}

#[test]
fn a_directory_that_turns_insecure_is_refused_at_the_next_request() {
    let scratch = Scratch::new();
    let dir = open(&scratch);
    fs::write(dir.path().join(PATCH_FILE), b"\x7fELF").unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    assert!(matches!(
        dir.take_request(1),
        Err(ControlError::InsecureMode { .. })
    ));
    // Nothing was claimed.
    assert!(dir.path().join(PATCH_FILE).exists());
}

#[test]
fn a_world_writable_parent_without_sticky_bit_is_refused() {
    let scratch = Scratch::new();
    let parent = scratch.0.join("shared");
    fs::DirBuilder::new().mode(0o700).create(&parent).unwrap();
    fs::set_permissions(&parent, fs::Permissions::from_mode(0o777)).unwrap();
    let err = ControlDir::open_or_create(parent.join("ctl")).unwrap_err();
    assert!(matches!(err, ControlError::InsecureParent { .. }), "{err}");
    // With the sticky bit, as /tmp has it, others cannot rename our entry: accepted.
    fs::set_permissions(&parent, fs::Permissions::from_mode(0o1777)).unwrap();
    ControlDir::open_or_create(parent.join("ctl")).unwrap();
}

#[test]
fn wrong_owner_and_non_directories_are_refused() {
    let scratch = Scratch::new();
    let dir = open(&scratch);
    let uid = dsu_sys::ids::effective_uid();
    let err = verify_dir(dir.path(), uid + 1).unwrap_err();
    assert!(
        matches!(err, ControlError::WrongOwner { found, expected, .. }
            if found == uid && expected == uid + 1),
        "{err}"
    );
    let file = scratch.0.join("file");
    fs::write(&file, b"").unwrap();
    assert!(matches!(
        ControlDir::open_or_create(&file),
        Err(ControlError::NotADirectory { found: "file", .. })
    ));
    let link = scratch.0.join("link");
    std::os::unix::fs::symlink(dir.path(), &link).unwrap();
    assert!(matches!(
        ControlDir::open_or_create(&link),
        Err(ControlError::NotADirectory {
            found: "symbolic link",
            ..
        })
    ));
}

#[test]
fn agent_info_is_written_0600_and_clears_stale_answers() {
    let scratch = Scratch::new();
    let dir = open(&scratch);
    fs::write(dir.path().join(RESULT_FILE), b"{}").unwrap();
    fs::write(dir.path().join(REQUEST_FILE), b"{}").unwrap();
    dir.write_agent_info(12, SocketInfo::default()).unwrap();
    let path = dir.path().join(AGENT_FILE);
    assert_eq!(mode(&path), 0o600);
    let info: AgentInfo = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(info.protocol, 1);
    assert_eq!(info.pid, std::process::id());
    assert_eq!(info.signal, 12);
    assert!(info.start_time.is_some());
    assert!(!dir.path().join(RESULT_FILE).exists());
    assert!(!dir.path().join(REQUEST_FILE).exists());
}

#[test]
fn a_raw_patch_is_consumed_once() {
    let scratch = Scratch::new();
    let dir = open(&scratch);
    assert_eq!(dir.take_request(1).unwrap(), None);
    fs::write(dir.path().join(PATCH_FILE), b"\x7fELF raw").unwrap();
    let request = dir.take_request(1).unwrap().unwrap();
    let consumed = dir.path().join("consumed/1.patch");
    assert_eq!(
        request,
        Request {
            id: None,
            op: Op::Apply {
                bytes: b"\x7fELF raw".to_vec(),
                file: consumed.clone(),
                timeout: None,
                allow_stale_clones: false,
            },
        }
    );
    assert!(consumed.exists());
    assert!(!dir.path().join(PATCH_FILE).exists());
    // A repeated signal finds nothing to do.
    assert_eq!(dir.take_request(2).unwrap(), None);
}

fn write_request(dir: &ControlDir, request: &RequestFile) {
    write_json(dir.path(), REQUEST_FILE, request, None).unwrap();
}

#[test]
fn an_apply_request_returns_its_id_bytes_and_timeout() {
    let scratch = Scratch::new();
    let dir = open(&scratch);
    write_atomic(dir.path(), PATCH_FILE, b"\x7fELF req", None).unwrap();
    let file = RequestFile {
        id: "abc".into(),
        op: RequestOp::Apply {
            file: PATCH_FILE.into(),
        },
        timeout_ms: Some(1500),
        patch_len: None,
        allow_stale_clones: true,
    };
    write_request(&dir, &file);
    let json = fs::read_to_string(dir.path().join(REQUEST_FILE)).unwrap();
    assert!(json.contains(r#""op": "apply""#), "{json}");
    let request = dir.take_request(5).unwrap().unwrap();
    assert_eq!(request.id.as_deref(), Some("abc"));
    assert_eq!(request.op.name(), "apply");
    let Op::Apply {
        bytes,
        file,
        timeout,
        allow_stale_clones,
    } = request.op
    else {
        unreachable!()
    };
    assert_eq!(bytes, b"\x7fELF req");
    assert_eq!(file, dir.path().join("consumed/5.patch"));
    assert_eq!(timeout, Some(Duration::from_millis(1500)));
    assert!(allow_stale_clones, "the option reaches the engine");
    assert!(dir.path().join("consumed/5.request.json").exists());
    assert_eq!(dir.take_request(6).unwrap(), None);
}

#[test]
fn revert_and_status_requests_parse() {
    let scratch = Scratch::new();
    let dir = open(&scratch);
    fs::write(
        dir.path().join(REQUEST_FILE),
        r#"{"id":"r","op":"revert","patch_id":null}"#,
    )
    .unwrap();
    let request = dir.take_request(1).unwrap().unwrap();
    assert_eq!(
        request.op,
        Op::Revert {
            patch_id: None,
            timeout: None
        }
    );
    fs::write(
        dir.path().join(REQUEST_FILE),
        r#"{"id":"s","op":"status","timeout_ms":5}"#,
    )
    .unwrap();
    assert_eq!(dir.take_request(2).unwrap().unwrap().op, Op::Status);
}

#[test]
fn a_malformed_request_is_an_error_that_keeps_the_id_when_it_can() {
    let scratch = Scratch::new();
    let dir = open(&scratch);
    let cases: [(&str, Option<&str>, &str); 4] = [
        ("not json", None, "unknown"),
        (r#"{"id":"x1","op":"frobnicate"}"#, Some("x1"), "frobnicate"),
        (r#"{"id":"x2","op":"apply"}"#, Some("x2"), "apply"),
        (
            r#"{"id":"x3","op":"apply","file":"../etc/passwd"}"#,
            Some("x3"),
            "apply",
        ),
    ];
    for (seq, (text, id, op)) in (1..).zip(cases) {
        fs::write(dir.path().join(REQUEST_FILE), text).unwrap();
        let err = dir.take_request(seq).unwrap_err();
        assert!(
            matches!(err, ControlError::MalformedRequest { .. }),
            "{text}: {err}"
        );
        assert_eq!(err.request_id(), id, "{text}");
        let outcome = err.outcome(seq).unwrap();
        assert_eq!(outcome.outcome, Status::Refused);
        assert_eq!(outcome.op, op);
        assert_eq!(outcome.request.as_deref(), id);
        // The bad request is gone: the next signal does not report it again.
        assert!(!dir.path().join(REQUEST_FILE).exists());
    }
}

#[test]
fn reserved_and_nested_file_names_are_refused() {
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "a/",
        "/etc/passwd",
        AGENT_FILE,
        LOCK_FILE,
        CONSUMED_DIR,
    ] {
        assert!(!is_plain_name(bad), "{bad:?}");
    }
    assert!(is_plain_name(PATCH_FILE));
    assert!(is_plain_name("fix-1.o"));
}

#[test]
fn an_apply_request_without_its_patch_names_the_missing_file() {
    let scratch = Scratch::new();
    let dir = open(&scratch);
    fs::write(
        dir.path().join(REQUEST_FILE),
        r#"{"id":"m","op":"apply","file":"patch"}"#,
    )
    .unwrap();
    let err = dir.take_request(1).unwrap_err();
    assert!(matches!(err, ControlError::MissingPatch { .. }), "{err}");
    assert_eq!(err.request_id(), Some("m"));
    assert_eq!(err.outcome(1).unwrap().op, "apply");
}

#[test]
fn an_oversized_patch_is_refused() {
    let scratch = Scratch::new();
    let dir = open(&scratch);
    let patch = File::create(dir.path().join(PATCH_FILE)).unwrap();
    patch.set_len(MAX_PATCH_SIZE + 1).unwrap();
    let err = dir.take_request(1).unwrap_err();
    assert!(
        matches!(err, ControlError::TooLarge { size, .. } if size == MAX_PATCH_SIZE + 1),
        "{err}"
    );
    assert_eq!(err.outcome(1).unwrap().outcome, Status::Refused);
}

#[test]
fn results_are_written_atomically_with_mode_0600() {
    let scratch = Scratch::new();
    let dir = open(&scratch);
    let outcome = Outcome {
        seq: 1,
        request: Some("id".into()),
        op: "apply".into(),
        outcome: Status::Applied,
        error: None,
        attempts: 1,
        elapsed_us: 10,
        functions: Vec::new(),
        patch_id: Some(1),
        stages_us: None,
        threads_stopped: None,
        status: None,
        warnings: Vec::new(),
        record: None,
    };
    dir.write_result(&outcome).unwrap();
    let path = dir.path().join(RESULT_FILE);
    assert_eq!(mode(&path), 0o600);
    let back: Outcome = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(back, outcome);
    // No temporary file is left behind.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")));
}

#[test]
fn start_time_is_field_22_even_with_odd_command_names() {
    let stat = "1234 (a) b (c)) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20 21";
    assert_eq!(parse_start_time(stat), Some(987654));
    assert_eq!(parse_start_time("1234 (x) S 1"), None);
    assert_eq!(parse_start_time("garbage"), None);
}
