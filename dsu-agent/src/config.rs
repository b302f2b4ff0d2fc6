//! Configuration of the agent: the builder behind [`crate::install`], and the environment
//! variables an unmodified program (`LD_PRELOAD`) is configured with.

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
///
/// The trigger and stop signals come from the builder if set there, else from the
/// environment at install (`DSU_SIGNAL`, `DSU_STOP_SIGNAL`: a number, a name such as `SIGUSR1`,
/// `USR1` or `SIGRTMIN+3`, and for `DSU_SIGNAL` also `none`), else the defaults (`SIGUSR2`,
/// `SIGRTMIN+5`).
#[derive(Debug, Clone)]
pub struct Builder {
    pub(crate) signal: Choice,
    pub(crate) stop_signal: Option<libc::c_int>,
    pub(crate) control_dir: Option<PathBuf>,
    pub(crate) policy: Policy,
    hold_bound: Option<Duration>,
    pub(crate) log: bool,
    trusted_keys: Vec<crate::trust::PublicKey>,
    trusted_keys_file: Option<PathBuf>,
    require_binding: Option<bool>,
    /// `None`: `DSU_SYSLOG_SOCKET`, else `/dev/log`; `Some(None)`: no system log.
    syslog: Option<Option<PathBuf>>,
    /// `None`: `DSU_PATCH_DIR`, else the system-wide and per-user bases; `Some(None)`: no
    /// kept patches.
    patch_dir: Option<Option<PathBuf>>,
}

/// The builder's trigger signal setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Not set: `DSU_SIGNAL`, else `SIGUSR2`.
    Unset,
    Signal(libc::c_int),
    /// No trigger signal: the socket (and in-process calls) only.
    NoSignal,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            signal: Choice::Unset,
            stop_signal: None,
            control_dir: None,
            policy: Policy::default(),
            hold_bound: None,
            log: std::env::var_os("DSU_LOG").is_none_or(|v| v != "0"),
            trusted_keys: Vec::new(),
            trusted_keys_file: None,
            require_binding: None,
            syslog: None,
            patch_dir: None,
        }
    }
}

impl Builder {
    pub fn new() -> Builder {
        Builder::default()
    }

    /// The signal that triggers an update (`SIGUSR2` by default, or `DSU_SIGNAL`).
    pub fn signal(mut self, signal: libc::c_int) -> Builder {
        self.signal = Choice::Signal(signal);
        self
    }

    /// No trigger signal at all: `dsu` reaches the agent through its control socket, and the
    /// raw trigger (a `patch` file plus a signal) is not available.
    pub fn no_signal(mut self) -> Builder {
        self.signal = Choice::NoSignal;
        self
    }

    /// The real-time signal used to park threads during an update (default `SIGRTMIN + 5`,
    /// or `DSU_STOP_SIGNAL`).
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

    /// How long a thread parked or held by an update waits for the agent before it goes on
    /// and the attempt is given up (default 3 s, or `DSU_HOLD_BOUND_MS`; see [`crate::gate`]).
    pub fn hold_bound(mut self, bound: Duration) -> Builder {
        self.hold_bound = Some(bound);
        self
    }

    /// Apply only patches signed by one of `keys` (see `docs/security.md`). Takes precedence
    /// over `DSU_TRUSTED_KEYS` and the system file `/etc/dsu/trusted-keys`.
    pub fn trusted_keys(
        mut self,
        keys: impl IntoIterator<Item = crate::trust::PublicKey>,
    ) -> Builder {
        self.trusted_keys = keys.into_iter().collect();
        self
    }

    /// Apply only patches signed by one of the keys in the file at `path` (one public key a
    /// line, as `dsu keygen` writes them in `KEY.pub`). A file that cannot be read or holds a
    /// bad line is an install error naming the path and the line.
    pub fn trusted_keys_file(mut self, path: impl Into<PathBuf>) -> Builder {
        self.trusted_keys_file = Some(path.into());
        self
    }

    /// Refuse patches that do not carry the build id and code hash of every function they
    /// replace (`dsu pack`); default off, or `DSU_REQUIRE_BINDING=1`.
    pub fn require_binding(mut self, on: bool) -> Builder {
        self.require_binding = Some(on);
        self
    }

    /// The datagram socket of the system log that records every apply, revert and refusal
    /// (default `/dev/log`, or `DSU_SYSLOG_SOCKET`); `None` records nothing there.
    pub fn syslog_socket(mut self, path: Option<PathBuf>) -> Builder {
        self.syslog = Some(path);
        self
    }

    /// Where the patches kept for this program are read from at install (see
    /// [`crate::persist`]): `Some(dir)` reads only `dir/<build id>/`, `None` reads none. By
    /// default `DSU_PATCH_DIR` (`off` for none), else `/var/lib/dsu/patches/<build id>/` and
    /// the user's `$XDG_DATA_HOME/dsu/patches/<build id>/` (or under
    /// `$HOME/.local/share`, or the home directory `/etc/passwd` gives).
    pub fn patch_dir(mut self, dir: Option<PathBuf>) -> Builder {
        self.patch_dir = Some(dir);
        self
    }

    /// Installs the agent, or returns the one already installed (the first configuration
    /// wins). Patches kept for this program are applied before it returns.
    pub fn install(self) -> Result<Agent, Error> {
        crate::agent::install(self)
    }

    /// The policy to use: the builder's, with the hold bound from the builder, else
    /// `DSU_HOLD_BOUND_MS` (milliseconds, at least 1), else the default. Also takes the
    /// testing-only `DSU_TEST_STALL_BEFORE_WRITE_MS` and `DSU_TEST_STOP_ALL`.
    pub(crate) fn effective_policy(&self) -> Result<Policy, Error> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let millis = |name: &'static str| -> Result<Option<Duration>, Error> {
            var(name)
                .map(|value| match value.trim().parse::<u64>() {
                    Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
                    _ => Err(Error::MillisVar { var: name, value }),
                })
                .transpose()
        };
        let mut policy = self.policy;
        match self.hold_bound {
            Some(bound) => policy.hold_bound = bound,
            None => {
                if let Some(bound) = millis("DSU_HOLD_BOUND_MS")? {
                    policy.hold_bound = bound;
                }
            }
        }
        if let Some(stall) = millis("DSU_TEST_STALL_BEFORE_WRITE_MS")? {
            crate::gate::set_test_stall(stall);
        }
        if var("DSU_TEST_STOP_ALL").is_some_and(|v| v.trim() == "1") {
            crate::update::set_test_stop_all();
        }
        Ok(policy)
    }

    /// Which patches to accept: the trusted keys (builder, `DSU_TRUSTED_KEYS`, the system
    /// file) and whether binding is required (builder, `DSU_REQUIRE_BINDING`).
    pub(crate) fn trust_policy(&self) -> Result<crate::trust::TrustPolicy, Error> {
        let (keys, source) =
            crate::trust::load_keys(&self.trusted_keys, self.trusted_keys_file.as_ref())?;
        let require_binding = match self.require_binding {
            Some(on) => on,
            None => match std::env::var("DSU_REQUIRE_BINDING") {
                Ok(v) if matches!(v.trim(), "" | "0" | "no" | "false") => false,
                Ok(v) if matches!(v.trim(), "1" | "yes" | "true") => true,
                Ok(value) => {
                    return Err(Error::FlagVar {
                        var: "DSU_REQUIRE_BINDING",
                        value,
                    });
                }
                Err(_) => false,
            },
        };
        Ok(crate::trust::TrustPolicy {
            keys,
            source,
            require_binding,
        })
    }

    /// The system log's socket: the builder's, else `DSU_SYSLOG_SOCKET` (`off` for none),
    /// else `/dev/log`.
    pub(crate) fn syslog_socket_path(&self) -> Option<PathBuf> {
        if let Some(choice) = &self.syslog {
            return choice.clone();
        }
        crate::audit::socket_from_env()
    }

    /// The bases of kept patches: the builder's choice, else the environment's.
    pub(crate) fn patch_bases(&self) -> crate::persist::Bases {
        use crate::persist::Bases;
        match &self.patch_dir {
            Some(Some(dir)) => Bases::Only(std::path::absolute(dir).unwrap_or(dir.clone())),
            Some(None) => Bases::Off,
            None => Bases::of_process(),
        }
    }

    /// The signals to use, from the builder, the environment or the defaults.
    pub(crate) fn signals(&self) -> Result<Signals, Error> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let trigger = match self.signal {
            Choice::Signal(signal) => Some(signal),
            Choice::NoSignal => None,
            Choice::Unset => match var("DSU_SIGNAL") {
                Some(value) if value.trim().eq_ignore_ascii_case("none") => None,
                Some(value) => Some(parse_signal(&value).map_err(|reason| Error::SignalVar {
                    var: "DSU_SIGNAL",
                    value,
                    reason,
                })?),
                None => Some(libc::SIGUSR2),
            },
        };
        let (stop, stop_var) = match (self.stop_signal, var("DSU_STOP_SIGNAL")) {
            (Some(signal), _) => (signal, None),
            (None, Some(value)) => {
                let bad = |reason: String| Error::SignalVar {
                    var: "DSU_STOP_SIGNAL",
                    value: value.clone(),
                    reason,
                };
                let signal = parse_signal(&value).map_err(bad)?;
                let (min, max) = (dsu_sys::signal::rt_min(), dsu_sys::signal::rt_max());
                if !(min..=max).contains(&signal) {
                    return Err(bad(format!(
                        "the stop signal must be a real-time signal, SIGRTMIN..SIGRTMAX \
                         ({min}..{max})"
                    )));
                }
                (signal, Some(value))
            }
            (None, None) => (dsu_sys::signal::rt_min() + 5, None),
        };
        if trigger == Some(stop) {
            return Err(Error::SignalVar {
                var: if stop_var.is_some() {
                    "DSU_STOP_SIGNAL"
                } else {
                    "DSU_SIGNAL"
                },
                value: stop.to_string(),
                reason: "the trigger and the stop signal must differ".to_owned(),
            });
        }
        Ok(Signals {
            trigger,
            stop,
            stop_var,
        })
    }
}

/// The signals an agent uses.
#[derive(Debug, Clone)]
pub(crate) struct Signals {
    pub(crate) trigger: Option<libc::c_int>,
    pub(crate) stop: libc::c_int,
    /// `DSU_STOP_SIGNAL`'s value when the stop signal came from it, to name it in errors.
    pub(crate) stop_var: Option<String>,
}

const NAMES: [(&str, libc::c_int); 31] = [
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

/// A signal by number (`12`) or name (`SIGUSR2`, `usr2`, `SIGRTMIN+3`, `RTMAX-1`).
pub(crate) fn parse_signal(text: &str) -> Result<libc::c_int, String> {
    parse_signal_with(text, dsu_sys::signal::rt_min(), dsu_sys::signal::rt_max())
}

fn parse_signal_with(text: &str, rt_min: i32, rt_max: i32) -> Result<libc::c_int, String> {
    let text = text.trim();
    let signal = if let Ok(number) = text.parse::<i32>() {
        number
    } else {
        let upper = text.to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        let offset = |rest: &str| -> Result<i32, String> {
            match rest {
                "" => Ok(0),
                _ => rest
                    .parse::<i32>()
                    .map_err(|_| format!("{text:?} is not a signal")),
            }
        };
        if let Some(rest) = name.strip_prefix("RTMIN") {
            rt_min + offset(rest.strip_prefix('+').unwrap_or(rest))?
        } else if let Some(rest) = name.strip_prefix("RTMAX") {
            rt_max - offset(rest.strip_prefix('-').unwrap_or(rest))?
        } else {
            NAMES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|&(_, number)| number)
                .ok_or_else(|| format!("{text:?} is not a signal"))?
        }
    };
    if !(1..=rt_max).contains(&signal) {
        return Err(format!("{signal} is not a signal number (1..{rt_max})"));
    }
    Ok(signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_number_and_name() {
        let p = |t| parse_signal_with(t, 34, 64);
        assert_eq!(p("12"), Ok(12));
        assert_eq!(p("SIGUSR1"), Ok(10));
        assert_eq!(p("usr2"), Ok(12));
        assert_eq!(p("SIGRTMIN"), Ok(34));
        assert_eq!(p("SIGRTMIN+3"), Ok(37));
        assert_eq!(p("RTMAX-1"), Ok(63));
        for bad in ["0", "65", "SIGFOO", "RTMIN+x", "", "-3"] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }
}
