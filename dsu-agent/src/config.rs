//! Configuration of the agent: the builder behind [`crate::install`].

use std::path::PathBuf;
use std::time::Duration;

use crate::agent::Agent;
use crate::error::Error;
use crate::update::Policy;

/// Configures and installs the agent.
///
/// ```no_run
/// use std::time::Duration;
/// let agent = dsu_agent::Builder::new()
///     .timeout(Duration::from_secs(2))
///     .log(false)
///     .install()?;
/// # Ok::<(), dsu_agent::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    pub(crate) signal: libc::c_int,
    pub(crate) stop_signal: Option<libc::c_int>,
    pub(crate) control_dir: Option<PathBuf>,
    pub(crate) policy: Policy,
    pub(crate) log: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            signal: libc::SIGUSR2,
            stop_signal: None,
            control_dir: None,
            policy: Policy::default(),
            log: std::env::var_os("DSU_LOG").is_none_or(|v| v != "0"),
        }
    }
}

impl Builder {
    pub fn new() -> Builder {
        Builder::default()
    }

    /// The signal that triggers an update (`SIGUSR2` by default).
    pub fn signal(mut self, signal: libc::c_int) -> Builder {
        self.signal = signal;
        self
    }

    /// The real-time signal used to park threads during an update (default `SIGRTMIN + 5`).
    pub fn stop_signal(mut self, signal: libc::c_int) -> Builder {
        self.stop_signal = Some(signal);
        self
    }

    /// The control directory, instead of the rule of `$DSU_CONTROL_DIR`,
    /// `$XDG_RUNTIME_DIR/dsu/<pid>`, `/tmp/dsu-<uid>/<pid>`.
    pub fn control_dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.control_dir = Some(dir.into());
        self
    }

    /// How long an update may wait for its functions to become inactive (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Builder {
        self.policy.timeout = timeout;
        self
    }

    /// The full retry policy.
    pub fn policy(mut self, policy: Policy) -> Builder {
        self.policy = policy;
        self
    }

    /// Whether to print one line per update on stderr (default on; `DSU_LOG=0` turns it off).
    pub fn log(mut self, on: bool) -> Builder {
        self.log = on;
        self
    }

    /// Installs the agent, or returns the one already installed (the first configuration
    /// wins).
    pub fn install(self) -> Result<Agent, Error> {
        crate::agent::install(self)
    }
}
