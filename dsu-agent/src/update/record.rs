//! What the engine records of applied patches, and the retry policy.

use std::time::{Duration, SystemTime};

use crate::write::CodeEdit;

/// How long and how often to retry while a function is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Give up (refuse) after this long.
    pub timeout: Duration,
    /// First pause between attempts; doubles up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// How long every thread has to park once signalled.
    pub park_timeout: Duration,
    /// How long a thread parked or held by an attempt waits for the agent before it gives the
    /// attempt up and goes on (nothing is written then; see [`crate::gate`]). Longer than
    /// `park_timeout`, which a parked thread may spend waiting for the others.
    pub hold_bound: Duration,
    /// Update a program that switches stacks (imports `makecontext`/`swapcontext`, or has
    /// boost.context) although it has declared none ([`crate::stacks`]). Off by default: a
    /// coroutine suspended in a replaced function would crash when it resumes. Turn it on only
    /// when no coroutine runs the functions patched.
    pub allow_undeclared_stacks: bool,
    /// Apply a patch that replaces a function whose compiler clones (`NAME.constprop.N`, ...)
    /// it leaves alone, so their callers keep the old code. Off by default: the update would
    /// be partial without saying so.
    pub allow_stale_clones: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            timeout: Duration::from_secs(5),
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(100),
            park_timeout: Duration::from_secs(1),
            hold_bound: Duration::from_secs(3),
            allow_undeclared_stacks: false,
            allow_stale_clones: false,
        }
    }
}

/// How a function was switched to its new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Entry jump to new code.
    Redirect,
    /// New code written over the old function.
    InPlace,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Redirect => "redirect",
            Strategy::InPlace => "in-place",
        }
    }
}

/// One function of an applied patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedFunction {
    pub name: String,
    pub module: String,
    pub old_address: usize,
    pub old_size: u64,
    pub new_address: usize,
    pub new_size: u64,
    pub strategy: Strategy,
    pub call_sites: u32,
    /// Where the `jmp rel32` that its short entry jump leads to is (a function shorter than an
    /// entry jump): the second of `edits`.
    pub trampoline: Option<usize>,
    /// The code edits that switched it: the entry edit first, its trampoline, then rewritten
    /// call sites. Each
    /// `original` is what was there before this patch, which a revert writes back.
    pub edits: Vec<CodeEdit>,
}

impl AppliedFunction {
    /// The edit at the old function's entry.
    pub fn entry_edit(&self) -> &CodeEdit {
        &self.edits[0]
    }
}

/// A patch in effect.
#[derive(Debug, Clone)]
pub struct AppliedPatch {
    pub id: u64,
    pub file: String,
    /// SHA-256 of the patch file, hex.
    pub sha256: String,
    /// The key id (16 hex digits) of the patch's signature trailer, if it is signed. Verified
    /// when the agent has trusted keys.
    pub signer: Option<String>,
    pub applied_at: SystemTime,
    pub functions: Vec<AppliedFunction>,
    /// The image's range; it stays mapped while the patch is applied.
    pub image: (usize, usize),
    /// The code part of the image.
    pub code: (usize, usize),
    /// Whether the image holds data the program may point into (`.rodata`, `.data`, `.bss`),
    /// which then stays mapped after a revert.
    pub keeps_data: bool,
    pub eh_frames: Vec<(usize, usize)>,
    pub added: Vec<String>,
    /// Other functions of the patch (helpers), for profilers.
    pub helpers: Vec<crate::names::CodeName>,
}

/// Where the time of one update went. `stop`, `check`, `write` and `resume` are those of the
/// attempt that succeeded; their sum is the pause: how long the application's threads were
/// held at most.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stages {
    /// Load, resolve, place and relocate.
    pub link: Duration,
    /// Plan the edits (decode targets, call sites) and build the unwind tables, up to the
    /// first stop. Time spent retrying while a function was active is not in any stage.
    pub prepare: Duration,
    /// Place the breakpoints, find which threads run and which wait, and check the waiting
    /// ones from copies of their stacks. No thread is stopped meanwhile (a thread that reaches
    /// an edit site is held there). Zero when every thread is stopped instead.
    pub survey: Duration,
    /// Signal the running threads (or every thread) and wait until they are parked.
    pub stop: Duration,
    /// The activeness check of every thread.
    pub check: Duration,
    /// Write the edits and resynchronise cores.
    pub write: Duration,
    /// Release the parked threads.
    pub resume: Duration,
    /// The fallback path ran: every thread was parked and each edit written at once (under a
    /// debugger, or where live writes are unavailable), instead of stopping only the threads
    /// that run.
    pub every_thread_stopped: bool,
}

impl Stages {
    /// How long the stopped threads were held in the successful attempt (threads that wait in
    /// system calls are not held at all).
    pub fn pause(&self) -> Duration {
        self.stop + self.check + self.write + self.resume
    }
}
