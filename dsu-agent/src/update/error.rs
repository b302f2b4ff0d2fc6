//! Why an update or a revert did not happen.

use thiserror::Error;

use crate::check::CheckError;
use crate::link::LinkError;
use crate::prepare::PrepareError;
use crate::stop::StopError;

/// A replaced function's compiler clones that a patch leaves alone.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error(
    "{function} has compiler clones in {module} that the patch does not replace ({}){}: the \
     code that calls them would keep running the old version; nothing was changed. Build the \
     patch with `dsu build --against PID` from the original and fixed objects (it carries the \
     changed clones and vouches for those the fix leaves as they are), or accept that with \
     `dsu apply --allow-stale-clones` (Policy::allow_stale_clones)",
    .clones.join(", "),
    if .callers.is_empty() { String::new() } else { format!(", called from {}", .callers.join(", ")) }
)]
pub struct StaleClones {
    pub function: String,
    pub module: String,
    pub clones: Vec<String>,
    pub callers: Vec<String>,
}

/// Why an update did not happen. The process's code is as it was in every case but one: a
/// failed code write whose rollback failed too (`Write` with `rolled_back: false`), which says
/// so.
#[derive(Debug, Error)]
pub enum UpdateError {
    #[error(transparent)]
    Trust(Box<crate::trust::TrustError>),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    StaleClones(Box<StaleClones>),
    #[error("cannot stop the process's threads: {0}")]
    Stop(#[from] StopError),
    #[error(
        "{function} is active in thread {tid} ({how}) after {attempts} attempts over {waited_ms} ms; nothing was changed"
    )]
    Active {
        function: String,
        tid: i32,
        how: String,
        attempts: u32,
        waited_ms: u64,
    },
    #[error(
        "{function} is active on a stack no thread runs on ({how}) after {attempts} attempts \
         over {waited_ms} ms; nothing was changed. Retry once the coroutine has left it"
    )]
    ActiveOnStack {
        function: String,
        how: String,
        attempts: u32,
        waited_ms: u64,
    },
    #[error(
        "the program switches stacks ({sign}) and has declared none of them, so a coroutine \
         suspended in a function being replaced would be missed and crash when it resumes; \
         nothing was changed. Declare each coroutine stack with dsu_stack_declare (Rust: \
         dsu_agent::stacks::declare), or, if no coroutine ever runs the patched functions, \
         set Policy::allow_undeclared_stacks"
    )]
    SwitchesStacks { sign: crate::stacks::Switching },
    #[error(
        "thread {tid} ({name}) runs on a stack that is not its own (stack pointer {sp:#x}): the \
         program switches stacks, and a coroutine suspended on another stack could be inside a \
         function being replaced; declare the program's stacks (dsu_stack_declare, \
         dsu_agent::stacks::declare) or allow undeclared stacks (Policy::allow_undeclared_stacks); \
         nothing was changed"
    )]
    ForeignStack { tid: i32, name: String, sp: usize },
    #[error(
        "cannot prove the functions inactive after {attempts} attempts over {waited_ms} ms: {reason}; nothing was changed"
    )]
    Unproven {
        reason: CheckError,
        attempts: u32,
        waited_ms: u64,
    },
    #[error(
        "thread {tid} ({name}) runs with the stop signal {signal} blocked, so it cannot be \
         stopped and checked; after {attempts} attempts over {waited_ms} ms nothing was changed. \
         Retry when that thread waits in a system call (waiting threads are checked without a \
         signal), or give the agent a stop signal the thread does not block (DSU_STOP_SIGNAL)"
    )]
    StopSignalBlocked {
        tid: i32,
        name: String,
        signal: i32,
        attempts: u32,
        waited_ms: u64,
    },
    #[error(
        "thread {tid} ({name}) sleeps with the stop signal {signal} blocked, and updates of this \
         process park every thread (a debugger is attached, the program handles SIGTRAP, or \
         code cannot be written while threads run), so it cannot be stopped; after {attempts} \
         attempts over {waited_ms} ms nothing was changed. Retry when that thread has unblocked \
         the signal, or give the agent a stop signal it does not block (DSU_STOP_SIGNAL)"
    )]
    StopSignalBlockedAllParked {
        tid: i32,
        name: String,
        signal: i32,
        attempts: u32,
        waited_ms: u64,
    },
    #[error(
        "thread {tid} ({name}) waited {bound_ms} ms for the agent, the bound on how long a \
         thread stays parked or held, and went on before anything was written (last of \
         {attempts} attempts in {waited_ms} ms); the agent thread was too slow to finish (an \
         overloaded machine, or a debugger holding it): retry, or allow more (Policy::hold_bound, \
         DSU_HOLD_BOUND_MS)"
    )]
    WaitBound {
        tid: i32,
        name: String,
        bound_ms: u64,
        attempts: u32,
        waited_ms: u64,
    },
    #[error(
        "{function} (in {module}) is part of the dsu agent, which runs the update with it: the \
         agent's own code cannot be patched; update the agent by restarting the program"
    )]
    AgentCode { function: String, module: String },
    #[error(
        "{function} is on the dsu agent thread's own stack ({how}): the agent runs the update \
         from inside it, so it cannot be replaced in this process while the agent runs"
    )]
    OnAgentStack { function: String, how: String },
    #[error(
        "the dsu agent itself runs {function} (it reached the edit at {site:#x} while checking \
         the threads): it cannot patch code it uses during an update; nothing was changed"
    )]
    AgentUses { function: String, site: usize },
    #[error(
        "the threads did not settle after {attempts} attempts over {waited_ms} ms (threads \
         were being created or exiting the whole time); nothing was changed"
    )]
    Unsettled { attempts: u32, waited_ms: u64 },
    #[error("cannot survey the process's threads: {0}")]
    Survey(#[from] crate::survey::SurveyError),
    #[error(
        "writing the code of {function} at {site:#x} failed: {source}; {}",
        if *.rolled_back {
            "the edits written before it were rolled back: nothing was changed"
        } else {
            "rolling back the edits written before it failed too: the process's code is partly patched"
        }
    )]
    Write {
        function: String,
        site: usize,
        source: std::io::Error,
        rolled_back: bool,
    },
    #[error("cannot prepare to stop threads: {0}")]
    StopPrepare(std::io::Error),
    #[error("unwind information: {0}")]
    Unwind(CheckError),
    #[error("the patch's unwind information (.eh_frame) is refused: {0}")]
    UnwindInfo(String),
    #[error("cannot read the process's memory map: {0}")]
    Maps(std::io::Error),
    #[error("no applied patch has id {0}")]
    UnknownPatch(u64),
    #[error("no patch is applied")]
    NothingApplied,
    #[error(
        "patch {id} cannot be reverted: patch {by}, applied after it, changes {function} again; revert patch {by} first"
    )]
    Superseded { id: u64, by: u64, function: String },
    #[error(
        "the dsu agent runs in process {agent_pid}, not in this forked child {pid}; no agent \
         thread runs here, so the child cannot update itself"
    )]
    Forked { agent_pid: u32, pid: u32 },
    #[error("the agent thread has stopped")]
    AgentGone,
    #[error("internal error in the agent: {0}; nothing was changed")]
    Internal(String),
}

impl From<crate::trust::TrustError> for UpdateError {
    fn from(e: crate::trust::TrustError) -> UpdateError {
        UpdateError::Trust(Box::new(e))
    }
}

impl UpdateError {
    /// Refused (the input or the moment was wrong) rather than failed (the system was).
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            UpdateError::Write { .. }
                | UpdateError::Maps(_)
                | UpdateError::StopPrepare(_)
                | UpdateError::AgentGone
                | UpdateError::Internal(_)
        )
    }

    /// Number of activeness checks made before giving up, when known.
    pub fn attempts(&self) -> u32 {
        match self {
            UpdateError::Active { attempts, .. }
            | UpdateError::ActiveOnStack { attempts, .. }
            | UpdateError::Unproven { attempts, .. }
            | UpdateError::StopSignalBlocked { attempts, .. }
            | UpdateError::StopSignalBlockedAllParked { attempts, .. }
            | UpdateError::WaitBound { attempts, .. }
            | UpdateError::Unsettled { attempts, .. } => *attempts,
            _ => 0,
        }
    }
}
