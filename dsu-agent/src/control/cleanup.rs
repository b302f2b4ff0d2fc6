//! Nothing left behind: the agent removes its control directory's files (and the directory,
//! when it created it) and its perf map when the process exits normally; `dsu` removes those
//! of dead processes it comes across in the per-user base directories.
//!
//! What counts as the agent's: the protocol's own names ([`PROTOCOL_FILES`], `consumed/` and
//! the socket). A directory the user gave (`DSU_CONTROL_DIR` or the builder, already there
//! at install) stays, emptied of those files; anything else in it stays too.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::socket::{self, SOCKET_FILE};
use super::{
    AGENT_FILE, CONSUMED_DIR, LOCK_FILE, PATCH_FILE, REQUEST_FILE, REQUEST_PATCH_FILE, RESULT_FILE,
    STATUS_FILE, parse_start_time, read_limited, verify_dir,
};
use crate::report::AgentInfo;

/// The files of the protocol, removed with the directory.
pub const PROTOCOL_FILES: [&str; 8] = [
    AGENT_FILE,
    STATUS_FILE,
    RESULT_FILE,
    REQUEST_FILE,
    REQUEST_PATCH_FILE,
    PATCH_FILE,
    LOCK_FILE,
    SOCKET_FILE,
];

/// Removes the protocol's files and `consumed/` from `dir`, then `dir` itself when
/// `remove_dir` (it is left if anything else is still in it).
pub fn remove_control_dir(dir: &Path, remove_dir: bool) {
    for name in PROTOCOL_FILES {
        let _ = fs::remove_file(dir.join(name));
    }
    let _ = fs::remove_dir_all(dir.join(CONSUMED_DIR));
    if remove_dir {
        let _ = fs::remove_dir(dir);
    }
}

/// The perf map an agent in process `pid` writes (`names.rs`).
pub fn perf_map(pid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/perf-{pid}.map"))
}

/// What the exit handler removes, recorded at install.
#[derive(Debug)]
struct AtExit {
    pid: u32,
    dir: PathBuf,
    created: bool,
}

static AT_EXIT: OnceLock<AtExit> = OnceLock::new();

/// Arranges for the control directory `dir` (removed itself only if `created`) and the perf
/// map to go away when this process exits normally. Once per process.
pub fn remove_at_exit(dir: &Path, created: bool) -> io::Result<()> {
    let record = AtExit {
        pid: std::process::id(),
        dir: dir.to_owned(),
        created,
    };
    if AT_EXIT.set(record).is_ok() {
        dsu_sys::process::at_exit(on_exit)?;
    }
    Ok(())
}

/// The `atexit` handler. A forked child inherits it but not the agent: it leaves everything
/// to the process that installed the agent.
extern "C" fn on_exit() {
    let Some(at) = AT_EXIT.get() else { return };
    if std::process::id() != at.pid {
        return;
    }
    // Never unwind into the C library's exit path.
    let _ = std::panic::catch_unwind(|| {
        remove_control_dir(&at.dir, at.created);
        if std::env::var_os("DSU_KEEP_PERF_MAP").is_none_or(|v| v == "0") {
            crate::names::remove_map();
        }
    });
}

/// Removes the control directories in `base` whose agent's process is gone, with the perf
/// maps of those processes. Only directories that pass [`verify_dir`] for `uid` and hold an
/// `agent.json` are considered, and a directory whose socket still accepts a connection is
/// alive whatever its pid says (a process in another pid namespace). Returns what it removed.
pub fn sweep_dead(base: &Path, uid: u32) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(base) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if verify_dir(&dir, uid).is_err() {
            continue;
        }
        let Ok(bytes) = read_limited(&dir.join(AGENT_FILE), 64 << 10) else {
            continue;
        };
        let Ok(info) = serde_json::from_slice::<AgentInfo>(&bytes) else {
            continue;
        };
        let Some(life) = process_life(&info) else {
            continue;
        };
        if socket::connect(&dir).is_ok() {
            continue;
        }
        remove_control_dir(&dir, true);
        removed.push(dir);
        let map = perf_map(info.pid);
        if life == Life::Gone
            && fs::symlink_metadata(&map).is_ok_and(|m| m.is_file() && m.uid() == uid)
        {
            let _ = fs::remove_file(&map);
        }
    }
    removed
}

#[derive(Debug, PartialEq, Eq)]
enum Life {
    /// No process has the pid.
    Gone,
    /// Another process has it now (its start time differs).
    Reused,
}

/// `None` while the process that wrote `info` lives.
fn process_life(info: &AgentInfo) -> Option<Life> {
    match fs::read_to_string(format!("/proc/{}/stat", info.pid)) {
        Err(_) => Some(Life::Gone),
        Ok(stat) => match (info.start_time, parse_start_time(&stat)) {
            (Some(recorded), Some(now)) if recorded != now => Some(Life::Reused),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("dsu-cleanup-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(path.join(CONSUMED_DIR)).unwrap();
        for file in [AGENT_FILE, STATUS_FILE, RESULT_FILE] {
            fs::write(path.join(file), b"{}").unwrap();
        }
        fs::write(path.join(CONSUMED_DIR).join("1.patch"), b"x").unwrap();
        path
    }

    #[test]
    fn a_directory_the_agent_created_goes_entirely() {
        let dir = scratch("created");
        remove_control_dir(&dir, true);
        assert!(!dir.exists());
    }

    #[test]
    fn a_directory_the_user_gave_stays_with_what_is_not_the_agents() {
        let dir = scratch("given");
        fs::write(dir.join("notes.txt"), b"mine").unwrap();
        remove_control_dir(&dir, false);
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["notes.txt"]);
        // Asked to remove it, a directory with foreign files stays too.
        remove_control_dir(&dir, true);
        assert!(dir.join("notes.txt").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
