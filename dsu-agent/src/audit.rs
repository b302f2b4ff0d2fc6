//! On record: one system log line for every apply, revert and refusal.
//!
//! The agent thread writes an RFC 3164 line (`<PRI>dsu-agent[PID]: ...`, no timestamp: the
//! log daemon stamps it on receipt) to the system log's datagram socket, `/dev/log`, which
//! both syslog daemons and journald listen on. Facility `authpriv` (the log of security
//! events, readable by root only on most systems), severity `notice` for what took effect and
//! `warning` for a refusal or failure. The fields are `key=value`, values with spaces quoted:
//!
//! ```text
//! <84>dsu-agent[4242]: op=apply outcome=refused seq=3 patch_sha256=9f2c.. signer=1a2b..
//!   verified=false uid=1000 pid=4242 exe="/usr/bin/shop" error="the patch is unsigned, .."
//! ```
//!
//! The socket is non-blocking and every error is ignored: a missing or full log never fails
//! or delays an update. Runs after an update, never while threads are stopped.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use crate::report::{Outcome, Status};

/// The system log's socket.
pub const SYSLOG_SOCKET: &str = "/dev/log";

/// `LOG_AUTHPRIV`, as a facility number.
const AUTHPRIV: u8 = 10;
const NOTICE: u8 = 5;
const WARNING: u8 = 4;

/// Where the agent's records go.
#[derive(Debug)]
pub struct Audit {
    socket: Option<(UnixDatagram, PathBuf)>,
}

impl Audit {
    /// Records to the datagram socket at `path`; `None` records nothing.
    pub fn new(path: Option<PathBuf>) -> Audit {
        let socket = path.and_then(|path| {
            let socket = UnixDatagram::unbound().ok()?;
            socket.set_nonblocking(true).ok()?;
            Some((socket, path))
        });
        Audit { socket }
    }

    /// Sends the line of `outcome`; failures are ignored.
    pub fn record(&self, outcome: &Outcome) {
        self.send(&line(outcome));
    }

    /// Sends one line; failures are ignored.
    pub fn send(&self, line: &str) {
        if let Some((socket, path)) = &self.socket {
            let _ = socket.send_to(line.as_bytes(), path);
        }
    }
}

/// The system log's socket for a process with no configuration of its own (the `dsu` tool,
/// an agent without a builder choice): `DSU_SYSLOG_SOCKET` (`off` for none), else
/// [`SYSLOG_SOCKET`].
pub fn socket_from_env() -> Option<PathBuf> {
    match std::env::var_os("DSU_SYSLOG_SOCKET").filter(|v| !v.is_empty()) {
        Some(v) if v == "off" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => Some(PathBuf::from(SYSLOG_SOCKET)),
    }
}

/// The line of a request the `dsu` tool refused itself, before any agent saw it (a patch
/// file that is a link, another user's, or writable by others): `op`, the `target` (a pid, or
/// `all` for `dsu apply --all`), the requesting `uid`, the patch's path and the reason.
pub fn tool_refusal_line(
    op: &str,
    target: impl std::fmt::Display,
    uid: u32,
    patch: &std::path::Path,
    error: &str,
) -> String {
    format!(
        "<{}>dsu[{}]: op={op} outcome=refused target={target} uid={uid} patch={:?} error={error:?}",
        AUTHPRIV * 8 + WARNING,
        std::process::id(),
        patch.display().to_string(),
    )
}

/// The log line of an apply of the kept patch at `path` at install (`kept="PATH"` after the
/// fields of [`line()`]): the record names the file, since no request did.
pub fn kept_line(outcome: &Outcome, path: &std::path::Path) -> String {
    format!("{} kept={:?}", line(outcome), path.display().to_string())
}

/// The log line of `outcome`.
pub fn line(outcome: &Outcome) -> String {
    let severity = if outcome.outcome == Status::Applied {
        NOTICE
    } else {
        WARNING
    };
    let record = outcome.record.clone().unwrap_or_default();
    let pid = if record.pid == 0 {
        std::process::id()
    } else {
        record.pid
    };
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    let mut line = format!(
        "<{}>dsu-agent[{pid}]: op={} outcome={} seq={} patch_sha256={} signer={} verified={} \
         uid={} pid={pid} exe={:?}",
        AUTHPRIV * 8 + severity,
        outcome.op,
        outcome.outcome.as_str(),
        outcome.seq,
        or_dash(record.patch_sha256),
        or_dash(record.signer),
        record.signature_verified,
        or_dash(record.requester_uid.map(|u| u.to_string())),
        record.exe,
    );
    if let Some(id) = outcome.patch_id {
        line.push_str(&format!(" patch_id={id}"));
    }
    if let Some(error) = &outcome.error {
        line.push_str(&format!(" error={error:?}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::RecordReport;

    #[test]
    fn a_refusal_is_one_warning_line_with_every_field() {
        let mut outcome = Outcome::new(
            3,
            None,
            "apply".into(),
            Status::Refused,
            Some("the patch is \"unsigned\"".into()),
        );
        outcome.record = Some(RecordReport {
            patch_sha256: Some("ab".repeat(32)),
            signer: None,
            signature_verified: false,
            requester_uid: Some(1000),
            pid: 42,
            exe: "/usr/bin/my shop".into(),
        });
        let line = line(&outcome);
        assert!(
            line.starts_with("<84>dsu-agent[42]: op=apply outcome=refused seq=3 "),
            "{line}"
        );
        assert!(
            line.contains(&format!("patch_sha256={} signer=- ", "ab".repeat(32))),
            "{line}"
        );
        assert!(
            line.contains("uid=1000 pid=42 exe=\"/usr/bin/my shop\""),
            "{line}"
        );
        assert!(
            line.ends_with("error=\"the patch is \\\"unsigned\\\"\""),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn records_reach_a_datagram_socket_and_a_missing_one_is_ignored() {
        let dir = std::env::temp_dir().join(format!("dsu-audit-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("log");
        let _ = std::fs::remove_file(&path);
        let log = UnixDatagram::bind(&path).unwrap();
        let outcome = Outcome::new(1, None, "revert".into(), Status::Applied, None);
        Audit::new(Some(path.clone())).record(&outcome);
        let mut buf = [0u8; 1024];
        let n = log.recv(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("op=revert outcome=applied"));
        Audit::new(Some(dir.join("missing"))).record(&outcome);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
