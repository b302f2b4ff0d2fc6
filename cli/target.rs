//! Finding a target process and its agent: the process's uid and environment from `/proc`,
//! its control directory by the agent's own rule, and `agent.json` checked against the live
//! process before anything is sent to it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dsu_agent::control::{AGENT_FILE, ControlDir, parse_start_time, verify_dir};
use dsu_agent::report::{AgentInfo, PROTOCOL_VERSION};

use crate::error::CliError;
use crate::sys;

/// A live process with a reachable agent.
pub struct Target {
    pub pid: u32,
    pub dir: PathBuf,
    pub agent: AgentInfo,
    /// Owner of the control directory; files `dsu` creates there are given to it when `dsu`
    /// runs as another user (root), so the agent can read them.
    dir_owner: (u32, u32),
    process: Process,
}

impl Target {
    /// Finds process `pid` and its agent. `control_dir` overrides the directory the target's
    /// environment names (for an agent configured with another directory).
    pub fn locate(pid: u32, control_dir: Option<&Path>) -> Result<Target, CliError> {
        // Open the pidfd first: the checks below then describe the process it names.
        let process = Process::open(pid)?;
        let status = read_proc(pid, "status")?;
        let status_path = proc_path(pid, "status");
        let uid = parse_status_uid(&status).ok_or_else(|| CliError::ProcFormat {
            path: status_path.clone(),
            reason: "no Uid: line".to_owned(),
        })?;
        let dir = match control_dir {
            Some(dir) => dir.to_owned(),
            None => target_control_dir(pid, uid)?,
        };
        let agent_path = dir.join(AGENT_FILE);
        let no_agent = || CliError::NoAgent {
            pid,
            path: agent_path.clone(),
        };
        match fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(no_agent()),
            _ => verify_dir(&dir, uid)?,
        }
        let meta = fs::metadata(&dir).map_err(|e| CliError::proc(dir.clone(), e))?;
        let agent = read_agent_info(&agent_path).map_err(|e| match e {
            AgentInfoError::Missing => no_agent(),
            AgentInfoError::Io(source) => CliError::proc(agent_path.clone(), source),
            AgentInfoError::Malformed(reason) => CliError::Malformed {
                path: agent_path.clone(),
                reason,
            },
        })?;
        check_agent_matches(pid, &agent, &agent_path)?;
        check_signal_handled(pid, agent.signal, &status)?;
        Ok(Target {
            pid,
            dir,
            agent,
            dir_owner: (meta.uid(), meta.gid()),
            process,
        })
    }

    /// The owner to give new files to, if it is not `dsu`'s own user.
    pub fn chown(&self) -> Option<(u32, u32)> {
        (sys::effective_uid() != self.dir_owner.0).then_some(self.dir_owner)
    }

    pub fn process(&self) -> &Process {
        &self.process
    }
}

/// A process named by a pidfd where the kernel has them, by its pid otherwise.
pub struct Process {
    pid: u32,
    pidfd: Option<OwnedFd>,
}

impl Process {
    fn open(pid: u32) -> Result<Process, CliError> {
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

    pub fn signal(&self, signal: i32) -> Result<(), CliError> {
        let result = match &self.pidfd {
            Some(fd) => sys::pidfd_send_signal(fd.as_fd(), signal),
            None => sys::kill(self.pid as libc::pid_t, signal),
        };
        result.map_err(|source| match source.raw_os_error() {
            Some(libc::ESRCH) => CliError::Exited { pid: self.pid },
            _ => CliError::Signal {
                pid: self.pid,
                source,
            },
        })
    }

    /// Waits up to `timeout` or until the process exits; returns true if it has exited.
    pub fn wait(&self, timeout: Duration) -> bool {
        let fds: Vec<_> = self.pidfd.iter().map(|fd| fd.as_fd()).collect();
        match sys::wait_readable(&fds, timeout) {
            Ok(ready) if self.pidfd.is_some() => ready[0],
            // Without a pidfd (or if ppoll failed) sleeping is the wait, and kill(pid, 0) the
            // liveness check. A zombie still counts as alive here; the deadline ends it.
            Ok(_) => self.gone(),
            Err(_) => {
                std::thread::sleep(timeout);
                self.gone()
            }
        }
    }

    fn gone(&self) -> bool {
        matches!(
            sys::kill(self.pid as libc::pid_t, 0),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH)
        )
    }
}

/// The control directory by the agent's rule applied to the target's environment as it was
/// at exec (`/proc/<pid>/environ`); a relative directory is taken against its current one.
fn target_control_dir(pid: u32, uid: u32) -> Result<PathBuf, CliError> {
    let environ = fs::read(proc_path(pid, "environ"))
        .map_err(|e| read_error(pid, proc_path(pid, "environ"), e))?;
    let env = parse_environ(&environ);
    let dir = ControlDir::resolve_with(|name| env.get(name).cloned(), pid, uid);
    if dir.is_absolute() {
        return Ok(dir);
    }
    let cwd = fs::read_link(proc_path(pid, "cwd"))
        .map_err(|e| read_error(pid, proc_path(pid, "cwd"), e))?;
    Ok(cwd.join(dir))
}

fn check_agent_matches(pid: u32, agent: &AgentInfo, path: &Path) -> Result<(), CliError> {
    if agent.protocol != PROTOCOL_VERSION {
        return Err(CliError::Protocol {
            pid,
            found: agent.protocol,
        });
    }
    if !(1..=64).contains(&agent.signal) {
        return Err(CliError::Malformed {
            path: path.to_owned(),
            reason: format!("{} is not a signal number", agent.signal),
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

/// Refuses to send a signal whose default action would terminate the process: without an
/// agent that catches it, "triggering" would kill the service.
fn check_signal_handled(pid: u32, signal: i32, status: &str) -> Result<(), CliError> {
    let bad_format = |reason: &str| CliError::ProcFormat {
        path: proc_path(pid, "status"),
        reason: reason.to_owned(),
    };
    let caught = parse_sig_mask(status, "SigCgt:").ok_or_else(|| bad_format("no SigCgt: line"))?;
    let ignored = parse_sig_mask(status, "SigIgn:").ok_or_else(|| bad_format("no SigIgn: line"))?;
    // Signal n is bit n-1; a number outside 1..=64 has no bit and counts as unhandled.
    let bit = u32::try_from(signal - 1)
        .ok()
        .and_then(|shift| 1u64.checked_shl(shift))
        .unwrap_or(0);
    if (caught | ignored) & bit == 0 {
        return Err(CliError::SignalUnhandled { pid, signal });
    }
    Ok(())
}

enum AgentInfoError {
    Missing,
    Io(io::Error),
    Malformed(String),
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
    fs::read_to_string(&path).map_err(|e| read_error(pid, path, e))
}

/// A vanished `/proc/<pid>` means the process is gone; anything else is reported as is.
fn read_error(pid: u32, path: PathBuf, e: io::Error) -> CliError {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ESRCH) => CliError::NoProcess { pid },
        _ => CliError::proc(path, e),
    }
}

/// The effective uid (second field of `Uid:`): the owner of what the agent creates.
fn parse_status_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A signal mask line such as `SigCgt:\t0000000000000800`.
fn parse_sig_mask(status: &str, key: &str) -> Option<u64> {
    let value = status.lines().find_map(|l| l.strip_prefix(key))?;
    u64::from_str_radix(value.trim(), 16).ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tsleep\nUid:\t1000\t1001\t1002\t1003\nGid:\t1\t1\t1\t1\n\
                          SigIgn:\t0000000000000800\nSigCgt:\t0000000000000002\n";

    #[test]
    fn status_fields_parse() {
        assert_eq!(parse_status_uid(STATUS), Some(1001));
        assert_eq!(parse_sig_mask(STATUS, "SigIgn:"), Some(0x800));
        assert_eq!(parse_sig_mask(STATUS, "SigCgt:"), Some(0x2));
        assert_eq!(parse_status_uid("Name:\tx\n"), None);
    }

    #[test]
    fn a_signal_is_sendable_only_when_caught_or_ignored() {
        // SIGUSR2 (12) is ignored, SIGINT (2) caught, SIGTERM (15) neither.
        assert!(check_signal_handled(1, 12, STATUS).is_ok());
        assert!(check_signal_handled(1, 2, STATUS).is_ok());
        assert!(matches!(
            check_signal_handled(1, 15, STATUS),
            Err(CliError::SignalUnhandled { signal: 15, .. })
        ));
        assert!(check_signal_handled(1, 0, STATUS).is_err());
        assert!(check_signal_handled(1, 65, STATUS).is_err());
    }

    #[test]
    fn environ_parses_like_getenv() {
        let env = parse_environ(b"A=1\0NOEQ\0B=x=y\0A=2\0\0");
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "x=y");
        assert_eq!(env.len(), 2);
    }
}
