//! Errors of installing the agent. Update errors are in [`crate::update::UpdateError`].

use thiserror::Error;

use crate::control::ControlError;
use crate::stop::StopError;

/// Why `install()` failed. Nothing is left half-installed that would change the program's
/// behaviour: at worst a signal disposition that only wakes a thread that is not there.
#[derive(Debug, Error)]
pub enum Error {
    #[error("control directory: {0}")]
    Control(#[from] ControlError),
    #[error("cannot handle the trigger signal {signal}: {source}")]
    TriggerSignal { signal: i32, source: std::io::Error },
    #[error("cannot set up stopping threads: {0}")]
    Stop(#[from] StopError),
    #[error("cannot write code in this process: {0}")]
    CodeWriter(std::io::Error),
    #[error("cannot start the agent thread: {0}")]
    Thread(std::io::Error),
    #[error("the agent thread has stopped")]
    AgentGone,
    #[error(
        "{var}={value:?}: {reason}; use a signal number, a name such as SIGUSR1 or \
         SIGRTMIN+3{none}",
        none = if *.var == "DSU_SIGNAL" { ", or none" } else { "" }
    )]
    SignalVar {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0}")]
    TrustedKeys(#[from] crate::trust::KeyFileError),
    #[error("{var}={value:?}: use 1 (yes, true) or 0 (no, false)")]
    FlagVar { var: &'static str, value: String },
    #[error("{var}={value:?}: not a whole number of milliseconds above 0")]
    MillisVar { var: &'static str, value: String },
    #[error(
        "the dsu agent runs in process {agent_pid}, not in this forked child {pid}; a child has \
         no agent thread and cannot install its own"
    )]
    Forked { agent_pid: u32, pid: u32 },
}

impl Error {
    /// A negative errno-style code for the C API.
    pub fn errno(&self) -> i32 {
        let code = match self {
            Error::Control(ControlError::WrongOwner { .. } | ControlError::InsecureMode { .. }) => {
                libc::EPERM
            }
            Error::Control(_) => libc::EACCES,
            Error::TriggerSignal { source, .. }
            | Error::CodeWriter(source)
            | Error::Thread(source) => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Stop(_) => libc::EBUSY,
            Error::AgentGone => libc::ESRCH,
            Error::SignalVar { .. } | Error::MillisVar { .. } | Error::FlagVar { .. } => {
                libc::EINVAL
            }
            Error::TrustedKeys(_) => libc::EINVAL,
            Error::Forked { .. } => libc::ECHILD,
        };
        -code
    }
}
