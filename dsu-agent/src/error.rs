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
        };
        -code
    }
}
