//! Finding a target process and its agent: the control directory through the agent's
//! listening socket among the process's descriptors (`discover`), else by the agent's own
//! rule applied to the process's environment, and `agent.json` checked against the live
//! process before anything is sent to it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dsu_agent::control::{AGENT_FILE, ControlDir, parse_start_time, verify_dir};
use dsu_agent::report::{AgentInfo, PROTOCOL_VERSION};

use crate::discover;
use crate::error::CliError;
use crate::sys;

/// A live process with a reachable agent.
pub struct Target {
    pub pid: u32,
    /// The control directory, as `dsu` reaches it (through `/proc/PID/root` for a process in
    /// another mount namespace).
    pub dir: PathBuf,
    pub agent: AgentInfo,
    process: Process,
}

impl Target {
    /// Finds process `pid` and its agent. `control_dir` overrides the search (for an agent
    /// whose socket cannot be found, or to choose the directory explicitly).
    pub fn locate(pid: u32, control_dir: Option<&Path>) -> Result<Target, CliError> {
        // Open the pidfd first: the checks below then describe the process it names.
        let process = Process::open(pid)?;
        let status = read_proc(pid, "status")?;
        let status_path = proc_path(pid, "status");
        let uid = parse_status_uid(&status).ok_or_else(|| CliError::ProcFormat {
            path: status_path.clone(),
            reason: "no Uid: line".to_owned(),
        })?;
        let (dir, by_socket) = match control_dir {
            Some(dir) => (dir.to_owned(), false),
            None => match discover::socket_dir(pid) {
                Ok(Some(dir)) => (dir, true),
                // No listening socket: perhaps an agent without one (agent.json says why).
                Ok(None) => (target_control_dir(pid, uid)?, false),
                Err(e) => return Err(not_ours(pid, uid, e)),
            },
        };
        Target::check(process, uid, dir, !by_socket && control_dir.is_none())
    }

    /// Process `pid`, found by a host-wide scan with its agent's directory `dir` and its
    /// effective uid: the checks of [`Target::locate`] without reading `/proc/PID/status`
    /// again. The pidfd is opened after the scan read the uid; a process that took the pid
    /// meanwhile is another process than `agent.json` names (its start time differs), and is
    /// refused as with `locate`.
    pub fn found(pid: u32, dir: &Path, uid: u32) -> Result<Target, CliError> {
        Target::check(Process::open(pid)?, uid, dir.to_owned(), false)
    }

    /// The checks of the control directory `dir` and its `agent.json` against the process.
    /// `searched`: the directory came from the agent's rule, not from a socket or the user.
    fn check(process: Process, uid: u32, dir: PathBuf, searched: bool) -> Result<Target, CliError> {
        let pid = process.pid;
        let agent_path = dir.join(AGENT_FILE);
        let no_agent = || CliError::NoAgent {
            pid,
            path: agent_path.clone(),
            searched,
        };
        match fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(no_agent()),
            _ => verify_dir(&dir, uid)?,
        }
        let agent = read_agent_info(&agent_path).map_err(|e| match e {
            AgentInfoError::Missing => no_agent(),
            AgentInfoError::Io(source) => CliError::proc(agent_path.clone(), source),
            AgentInfoError::Malformed(reason) => CliError::Malformed {
                path: agent_path.clone(),
                reason,
            },
        })?;
        check_agent_matches(pid, &agent, &agent_path)?;
        if let Some(reason) = &agent.socket_error {
            return Err(CliError::NoSocket {
                pid,
                reason: reason.clone(),
                dir: dir.clone(),
            });
        }
        Ok(Target {
            pid,
            dir,
            agent,
            process,
        })
    }

    pub fn process(&self) -> &Process {
        &self.process
    }
}

/// A permission error on another user's process says whose it is.
fn not_ours(pid: u32, uid: u32, e: CliError) -> CliError {
    match e {
        CliError::Proc { source, .. }
            if source.kind() == io::ErrorKind::PermissionDenied && sys::effective_uid() != uid =>
        {
            CliError::OtherUser {
                pid,
                uid,
                me: sys::effective_uid(),
            }
        }
        other => other,
    }
}

/// A process named by a pidfd where the kernel has them, by its pid otherwise.
pub struct Process {
    pid: u32,
    pidfd: Option<OwnedFd>,
}

impl Process {
    pub fn open(pid: u32) -> Result<Process, CliError> {
        let raw = libc::pid_t::try_from(pid).map_err(|_| CliError::NoProcess { pid })?;
        match sys::pidfd_open(raw) {
            Ok(fd) => Ok(Process {
                pid,
                pidfd: Some(fd),
            }),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(CliError::NoProcess { pid }),
            // Older kernel or a seccomp filter: fall back to the pid and /proc.
            Err(_) if Path::new(&format!("/proc/{pid}")).exists() => {
                Ok(Process { pid, pidfd: None })
            }
            Err(_) => Err(CliError::NoProcess { pid }),
        }
    }

    /// The pidfd, which becomes readable when the process exits.
    pub fn pidfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|fd| fd.as_fd())
    }

    /// Whether the process has exited, or does within `grace`. A dying process's descriptors
    /// (the agent's end of a connection) are closed before the kernel reports the exit, so
    /// when the agent hangs up without an answer this tells an exit under way from an agent
    /// that closed the connection while its process lives on.
    pub fn exits_within(&self, grace: Duration) -> bool {
        if let Some(pidfd) = self.pidfd() {
            return sys::wait_readable(&[pidfd], grace).is_ok_and(|r| r[0]) || self.gone();
        }
        let deadline = Instant::now() + grace;
        loop {
            if self.gone() || is_zombie(self.pid) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the process has exited (`kill(pid, 0)` fails with `ESRCH`).
    pub fn gone(&self) -> bool {
        matches!(
            sys::kill(self.pid as libc::pid_t, 0),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH)
        )
    }
}

/// Whether `/proc/PID/stat` shows an exited process its parent has not reaped yet.
fn is_zombie(pid: u32) -> bool {
    sys::read_proc_text(proc_path(pid, "stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, after)| after.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X")
    })
}

/// The control directory by the agent's rule applied to the target's environment as it was
/// at exec (`/proc/<pid>/environ`); a relative directory is taken against its current one.
fn target_control_dir(pid: u32, uid: u32) -> Result<PathBuf, CliError> {
    let environ = fs::read(proc_path(pid, "environ"))
        .map_err(|e| read_error(pid, proc_path(pid, "environ"), e))?;
    let env = parse_environ(&environ);
    let dir = ControlDir::resolve_with(|name| env.get(name).cloned(), pid, uid);
    if dir.is_absolute() {
        return Ok(discover::reachable(pid, &dir));
    }
    let cwd = fs::read_link(proc_path(pid, "cwd"))
        .map_err(|e| read_error(pid, proc_path(pid, "cwd"), e))?;
    Ok(discover::reachable(pid, &cwd.join(dir)))
}

fn check_agent_matches(pid: u32, agent: &AgentInfo, path: &Path) -> Result<(), CliError> {
    if agent.protocol != PROTOCOL_VERSION {
        return Err(CliError::Protocol {
            pid,
            found: agent.protocol,
        });
    }
    // 0: the agent has no trigger signal.
    if !(0..=64).contains(&agent.signal) {
        return Err(CliError::Malformed {
            path: path.to_owned(),
            reason: format!("{} is not a signal number", agent.signal),
        });
    }
    if agent.pid != pid && parent_pid(pid) == Some(agent.pid) {
        // A fork() without exec keeps the parent's listening socket.
        return Err(CliError::ForkedChild {
            pid,
            parent: agent.pid,
        });
    }
    if agent.pid != pid {
        return Err(CliError::OtherProcess {
            path: path.to_owned(),
            found: agent.pid,
            pid,
        });
    }
    if let Some(started) = agent.start_time {
        let stat = read_proc(pid, "stat")?;
        if parse_start_time(&stat) != Some(started) {
            return Err(CliError::EarlierProcess {
                path: path.to_owned(),
                pid,
            });
        }
    }
    Ok(())
}

enum AgentInfoError {
    Missing,
    Io(io::Error),
    Malformed(String),
}

/// The pid `agent.json` in `dir` names, if it can be read: the process the agent runs in.
pub fn agent_pid(dir: &Path) -> Option<u32> {
    read_agent_info(&dir.join(AGENT_FILE))
        .ok()
        .map(|agent| agent.pid)
}

fn read_agent_info(path: &Path) -> Result<AgentInfo, AgentInfoError> {
    let bytes = fs::read(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => AgentInfoError::Missing,
        _ => AgentInfoError::Io(e),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| AgentInfoError::Malformed(e.to_string()))
}

fn proc_path(pid: u32, file: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{file}"))
}

fn read_proc(pid: u32, file: &str) -> Result<String, CliError> {
    let path = proc_path(pid, file);
    sys::read_proc_text(&path).map_err(|e| read_error(pid, path, e))
}

/// A vanished `/proc/<pid>` means the process is gone; anything else is reported as is.
fn read_error(pid: u32, path: PathBuf, e: io::Error) -> CliError {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ESRCH) => CliError::NoProcess { pid },
        _ => CliError::proc(path, e),
    }
}

/// The parent of `pid` (`PPid:` of its status), if it can be read.
fn parent_pid(pid: u32) -> Option<u32> {
    let status = sys::read_proc_text(proc_path(pid, "status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("PPid:"))?;
    line.trim().parse().ok()
}

/// The effective uid (second field of `Uid:`): the owner of what the agent creates.
pub fn parse_status_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `NAME=value\0` entries; entries without `=` are skipped, the first of duplicates wins
/// (as `getenv` finds it).
fn parse_environ(environ: &[u8]) -> HashMap<String, OsString> {
    let mut env = HashMap::new();
    for entry in environ.split(|&b| b == 0) {
        let Some(eq) = entry.iter().position(|&b| b == b'=') else {
            continue;
        };
        let Ok(name) = std::str::from_utf8(&entry[..eq]) else {
            continue;
        };
        env.entry(name.to_owned())
            .or_insert_with(|| OsString::from_vec(entry[eq + 1..].to_vec()));
    }
    env
}

/// The files process `pid` maps executable, each once, in the order of its memory map (the
/// executable first, as the loader maps it first), read with `dsu_sys::maps`.
pub fn executable_files(pid: u32) -> Result<Vec<PathBuf>, CliError> {
    let path = PathBuf::from(format!("/proc/{pid}/maps"));
    let text = fs::read(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CliError::NoProcess { pid }
        } else {
            CliError::proc(path.clone(), e)
        }
    })?;
    let maps = dsu_sys::maps::parse_bytes(&text).map_err(|e| CliError::proc(path.clone(), e))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for m in maps {
        if let Some(file) = m.path.filter(|p| m.perms.exec && p.starts_with('/')) {
            let file = PathBuf::from(file);
            if !files.contains(&file) {
                files.push(file);
            }
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_uid_is_the_second_field() {
        let status = "Name:\tsleep\nUid:\t1000\t1001\t1002\t1003\n";
        assert_eq!(parse_status_uid(status), Some(1001));
        assert_eq!(parse_status_uid("Name:\tx\n"), None);
    }

    #[test]
    fn environ_parses_like_getenv() {
        let env = parse_environ(b"A=1\0NOEQ\0B=x=y\0A=2\0\0");
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "x=y");
        assert_eq!(env.len(), 2);
    }
}
