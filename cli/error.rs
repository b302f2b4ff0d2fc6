//! Everything that makes `dsu` exit non-zero, and the exit code of each (`docs/cli.md`).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use dsu_agent::control::ControlError;
use dsu_agent::report::{Outcome, PROTOCOL_VERSION};

/// Exit codes, as documented in `docs/cli.md`. Clap exits with 2 on its own for usage errors.
pub mod exit {
    pub const REFUSED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const TIMED_OUT: u8 = 4;
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    // Exit 2: the command line names something unusable; nothing was sent.
    #[error("cannot read patch {}: {source}", .path.display())]
    ReadPatch {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is not an ELF file (it does not start with \\x7fELF); a patch is an object file as \
         `cc -c -fPIC` or `rustc --emit=obj` writes it",
        .path.display()
    )]
    NotElf { path: PathBuf },
    #[error("patch {} is over the limit of {limit} bytes", .path.display())]
    PatchTooLarge { path: PathBuf, limit: u64 },
    #[error("cannot read object {}: {source}", .path.display())]
    ReadObject {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write patch {}: {source}", .path.display())]
    WritePatch {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "patch {} is a symbolic link; dsu apply opens patches without following links: name the file itself",
        .path.display()
    )]
    PatchSymlink { path: PathBuf },
    #[error("patch {} is not a regular file", .path.display())]
    PatchNotFile { path: PathBuf },
    #[error(
        "patch {} is owned by uid {owner}, neither you (uid {me}) nor root: someone else could have changed it; copy it to a file of your own after checking it",
        .path.display()
    )]
    PatchOwner { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "patch {} is writable by {} (mode {mode:04o}): someone else could change it; `chmod go-w` it",
        .path.display(),
        if .mode & 0o002 != 0 { "others" } else { "its group" }
    )]
    PatchWritable { path: PathBuf, mode: u32 },
    /// `keygen`, `sign` and `pack`: a file that cannot be read or written, or bad content.
    #[error("{what} {}: {reason}", .path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },

    // Exit 3: the process or its agent cannot be reached.
    #[error("no such process {pid}")]
    NoProcess { pid: u32 },
    #[error("cannot read {}: {source}{hint}", .path.display())]
    Proc {
        path: PathBuf,
        #[source]
        source: io::Error,
        /// Advice for a permission error, empty otherwise.
        hint: &'static str,
    },
    #[error("cannot understand {}: {reason}", .path.display())]
    ProcFormat { path: PathBuf, reason: String },
    #[error(
        "process {pid} has no dsu agent ({}no {}); link dsu-agent or start it with \
         LD_PRELOAD=libdsu_agent.so, or pass --control-dir if its agent uses another directory",
        if *.searched { "no listening agent.sock among its descriptors, and " } else { "" },
        .path.display()
    )]
    NoAgent {
        pid: u32,
        path: PathBuf,
        /// Whether the process's descriptors were searched for the agent's socket first.
        searched: bool,
    },
    #[error(
        "process {pid} runs as uid {uid}, and dsu as uid {me} may not look into it; run dsu as \
         uid {uid} or as root"
    )]
    OtherUser { pid: u32, uid: u32, me: u32 },
    #[error(
        "the dsu agent of process {pid} has no control socket: {reason}; fix that and restart \
         the process, or use the raw trigger ({}/patch and its trigger signal)",
        .dir.display()
    )]
    NoSocket {
        pid: u32,
        reason: String,
        dir: PathBuf,
    },
    #[error(
        "no dsu agent of process {pid} listens on {} ({source}); the agent is not running, or \
         the directory belongs to an earlier process",
        .path.display()
    )]
    NoListener {
        pid: u32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot send the request to the agent of process {pid}: {source}")]
    Send {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("the agent of process {pid} closed the connection without answering")]
    HungUp { pid: u32 },
    #[error(transparent)]
    ControlDir(#[from] ControlError),
    #[error("{} is malformed: {reason}", .path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "agent of process {pid} speaks control protocol {found}, this dsu speaks \
         {PROTOCOL_VERSION}; use the dsu that matches its dsu-agent"
    )]
    Protocol { pid: u32, found: u32 },
    #[error(
        "{} names process {found}, not {pid}: it is stale or belongs to another process; \
         remove it or pass the right --control-dir",
        .path.display()
    )]
    OtherProcess { path: PathBuf, found: u32, pid: u32 },
    #[error(
        "process {pid} is a fork() of process {parent} and shares its control socket, but the \
         dsu agent runs in process {parent} only; a forked child cannot be patched (patch \
         {parent}, or start the child with exec under LD_PRELOAD)"
    )]
    ForkedChild { pid: u32, parent: u32 },
    #[error(
        "{} was written by an earlier process that also had pid {pid}; process {pid} has no \
         dsu agent of its own",
        .path.display()
    )]
    EarlierProcess { path: PathBuf, pid: u32 },
    #[error("process {pid} exited before its agent answered")]
    Exited { pid: u32 },
    /// `--all`: no process with an agent is selected.
    #[error(
        "{}{}",
        nothing_found(.filter.as_deref(), *.uid),
        match .others {
            0 => String::new(),
            1 => "; 1 other process has one (`dsu ps` lists it)".to_owned(),
            n => format!("; {n} other processes have one (`dsu ps` lists them)"),
        }
    )]
    NoMatch {
        /// The filter as given (`--exe PATH`), if any.
        filter: Option<String>,
        /// Agent processes found that the filter left out.
        others: usize,
        /// The uid `dsu` runs as: without root only its processes are seen.
        uid: u32,
    },

    // Exit 1: the agent answered, and not with "applied".
    #[error("{}", agent_message(.outcome))]
    Agent { outcome: Box<Outcome> },

    // Exit 1: a host-wide command (`--all`) that did not succeed in every selected process.
    #[error("{failed} of {targeted} processes failed to {op}; the summary above lists them")]
    RolloutFailed {
        /// `apply the patch` or `revert`.
        op: &'static str,
        failed: usize,
        targeted: usize,
    },
    #[error(
        "the canary stage failed ({}); the other {untouched} processes were left alone",
        .pids.iter().map(|p| format!("process {p}")).collect::<Vec<_>>().join(", ")
    )]
    CanaryFailed {
        /// The canaries that failed.
        pids: Vec<u32>,
        /// The selected processes never attempted.
        untouched: usize,
    },

    // Exit 4: no answer in time.
    #[error(
        "timed out after {:.1}s waiting for process {pid} to answer; {}{}",
        .waited.as_secs_f64(),
        if *.withdrawn {
            "the request was withdrawn before the agent took it: nothing changed"
        } else {
            "the agent took the request and may still act on it: check `dsu status`"
        },
        if *.stopped {
            format!(
                ". Process {pid} is stopped (SIGSTOP, a job-control stop or a debugger), so its \
                 agent cannot answer: continue it (`kill -CONT {pid}`, or detach the debugger) \
                 and retry"
            )
        } else {
            String::new()
        }
    )]
    TimedOut {
        pid: u32,
        waited: Duration,
        withdrawn: bool,
        /// The process was stopped when the wait ended (`T` or `t` in `/proc/PID/stat`).
        stopped: bool,
    },

    #[error("{0}")]
    Inspect(#[from] dsu_agent::inspect::InspectError),
    // Exit 1 (2 for an input that is not an object file): `dsu build` refused the change.
    #[error(transparent)]
    Build(#[from] dsu_build::BuildError),
    #[error("the patch has {count} problem{} against {against} (listed above)", if *.count == 1 { "" } else { "s" })]
    InspectProblems { count: usize, against: String },
    // Exit 1: a patch that cannot be kept (`--persist`) or whose kept copy cannot be removed.
    #[error(transparent)]
    Persist(#[from] crate::persist::PersistError),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::ReadPatch { .. }
            | CliError::NotElf { .. }
            | CliError::PatchTooLarge { .. }
            | CliError::ReadObject { .. }
            | CliError::WritePatch { .. }
            | CliError::Build(dsu_build::BuildError::NotObject { .. })
            | CliError::PatchSymlink { .. }
            | CliError::PatchNotFile { .. }
            | CliError::PatchOwner { .. }
            | CliError::PatchWritable { .. } => exit::USAGE,
            CliError::File { .. } => exit::REFUSED,
            CliError::NoProcess { .. }
            | CliError::Proc { .. }
            | CliError::ProcFormat { .. }
            | CliError::NoAgent { .. }
            | CliError::ControlDir(_)
            | CliError::Malformed { .. }
            | CliError::Protocol { .. }
            | CliError::OtherProcess { .. }
            | CliError::ForkedChild { .. }
            | CliError::EarlierProcess { .. }
            | CliError::OtherUser { .. }
            | CliError::NoSocket { .. }
            | CliError::NoListener { .. }
            | CliError::Send { .. }
            | CliError::HungUp { .. }
            | CliError::Exited { .. }
            | CliError::NoMatch { .. } => exit::UNREACHABLE,
            CliError::Agent { .. }
            | CliError::Inspect(_)
            | CliError::InspectProblems { .. }
            | CliError::Build(_)
            | CliError::RolloutFailed { .. }
            | CliError::CanaryFailed { .. }
            | CliError::Persist(_) => exit::REFUSED,
            CliError::TimedOut { .. } => exit::TIMED_OUT,
        }
    }

    /// The one line `dsu` prints on stderr, after `dsu: `.
    pub fn one_line(&self) -> String {
        one_line(&self.to_string())
    }

    /// A `/proc` read error, with advice when it is a permission problem.
    pub fn proc(path: PathBuf, source: io::Error) -> CliError {
        let hint = if source.kind() == io::ErrorKind::PermissionDenied {
            "; run dsu as the process's user or as root"
        } else {
            ""
        };
        CliError::Proc { path, source, hint }
    }
}

fn agent_message(outcome: &Outcome) -> String {
    match &outcome.error {
        Some(error) => format!("{}: {error}", outcome.outcome.as_str()),
        None => format!("{} {} by the agent", outcome.op, outcome.outcome.as_str()),
    }
}

/// What `dsu ps` and `--all` say when no process with an agent is selected: `filter` as given,
/// `uid` the one `dsu` runs as (only root sees other users' processes).
pub fn nothing_found(filter: Option<&str>, uid: u32) -> String {
    let mut text = match filter {
        Some(filter) => format!("no process with a dsu agent matches {filter}"),
        None => "no process with a dsu agent found".to_owned(),
    };
    if uid != 0 {
        text.push_str(&format!(
            " among the processes of uid {uid} (other users' need root)"
        ));
    }
    text
}

/// Folds a message onto one line: the agent's errors are text we did not write.
pub fn one_line(text: &str) -> String {
    text.trim()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_messages_become_one_line() {
        assert_eq!(one_line("a\n  b\n\nc\n"), "a; b; c");
        assert_eq!(one_line("single"), "single");
    }
}
