//! One attempt of a switch: prove that no thread is inside the code being replaced, and if so
//! write the edits. Two ways to get there:
//!
//! - [`live`], the default: only threads that run are stopped. Breakpoints go on every edit
//!   site first ([`crate::hold`]), then the threads are surveyed ([`crate::survey`]): each
//!   waiting thread is checked from a copy of its stack and left alone, each running thread is
//!   parked with the stop signal and checked from its registers. The edits are finished behind
//!   the breakpoints, then the parked and held threads go on.
//! - [`all_stopped`], the fallback: every other thread is parked and the edits are written at
//!   once. Used when breakpoints cannot be used safely: the program replaced the `SIGTRAP`
//!   handler, a debugger is attached (it would take the breakpoints for its own), cores cannot
//!   be resynchronised (`membarrier` SYNC_CORE), or code is written through `mprotect`.
//!
//! Both run with threads held from their first step to their last: no allocation, no lock,
//! no output in between.

// Raw clock reads: the C library's `clock_gettime` may be the code being patched.
use dsu_sys::raw::Moment as Instant;

use dsu_sys::code::CodeWriter;
use dsu_sys::tasks;
use dsu_sys::threads;

use super::error::UpdateError;
use super::record::{Policy, Stages};
use crate::check::{Activity, CheckError, Checker, How, Ranges};
use crate::gate::{Gate, GaveUp};
use crate::hold::Window;
use crate::stop::{StopError, StopWorld, Stopped};
use crate::survey::{Survey, SurveyError, Waiting};
use crate::write::{self, CodeEdit, WriteFailure};
use dsu_sys::signal::AltStack;
use dsu_sys::stack::StackMaps;

/// Per target: in how many attempts it was active, and the latest sighting. Allocated before
/// the first attempt, only updated in place while threads are held.
#[derive(Debug)]
pub(super) struct Tally {
    pub rounds_active: Vec<u32>,
    pub last_seen: Vec<Option<Activity>>,
    pub active_now: Vec<bool>,
}

impl Tally {
    pub fn new(targets: usize) -> Tally {
        Tally {
            rounds_active: vec![0; targets],
            last_seen: vec![None; targets],
            active_now: vec![false; targets],
        }
    }

    fn begin(&mut self) {
        self.active_now.fill(false);
    }

    fn saw(&mut self, a: Activity) {
        if let Some(flag) = self.active_now.get_mut(a.target) {
            *flag = true;
            self.last_seen[a.target] = Some(a);
        }
    }

    fn any_now(&self) -> bool {
        self.active_now.iter().any(|&a| a)
    }

    /// Counts this attempt's sightings.
    pub fn end_attempt(&mut self) {
        for (rounds, &now) in self.rounds_active.iter_mut().zip(&self.active_now) {
            *rounds += u32::from(now);
        }
    }
}

/// What kept an attempt from writing, besides an active function.
#[derive(Debug)]
pub(super) enum Blocker {
    /// A thread's stack could not be proven free of the code being replaced.
    Unproven(CheckError),
    /// A thread blocks the stop signal, so it cannot be parked and checked: a running one
    /// (seen by the survey or while parking), or, when every thread is parked, one that sleeps
    /// with it blocked.
    StopSignalBlocked { tid: i32 },
    /// A parked or held thread waited the attempt's bound and went on before the agent wrote.
    GaveUp(GaveUp),
}

/// How an attempt ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// The edits are written.
    Done,
    /// Something is active (see the tally) or unproven: nothing was changed; retry later.
    Busy(Option<Blocker>),
    /// Buffers were too small for the threads there are now: prepare and retry at once.
    PrepareAgain,
    /// Writing failed (after rollback, which the failure says succeeded or not).
    WriteFailed(WriteFailure),
    /// The agent's own thread reached the breakpoint at `site` while checking: it runs that
    /// code itself. Nothing was changed; retrying cannot help.
    AgentTrapped { site: usize },
    /// Thread `tid` runs on a stack that is not its own (at `sp`), and the program has declared
    /// no stack: it switches stacks, and a suspended stack could hide an active function.
    ForeignStack { tid: i32, sp: usize },
}

/// What an attempt works with.
pub(super) struct Job<'a> {
    pub writer: &'a CodeWriter,
    pub edits: &'a [CodeEdit],
    pub ranges: &'a Ranges,
    pub policy: &'a Policy,
    /// Where threads' own stacks are, to refuse a program caught running a thread on another
    /// stack; `None` when that is not refused (stacks declared, or allowed by the policy).
    pub own_stacks: Option<OwnStacks>,
}

/// How to tell a thread's own stack: the main thread's is the `[stack]` mapping (its end does
/// not move), any other thread's holds its thread pointer (the C library puts the thread's
/// control block at the top of its stack).
#[derive(Debug, Clone, Copy)]
pub(super) struct OwnStacks {
    pub pid: i32,
    pub main_stack_end: Option<usize>,
}

impl OwnStacks {
    /// Whether a thread with stack pointer `sp` (and, when known, thread pointer `tp`) runs on
    /// a stack that is not its own: outside its alternate signal stack, the declared stacks, and
    /// its own. Allocates nothing.
    fn foreign(
        &self,
        maps: &StackMaps,
        tid: i32,
        sp: usize,
        tp: Option<usize>,
        alt: Option<AltStack>,
    ) -> bool {
        if alt.is_some_and(|a| a.contains(sp)) || crate::stacks::containing(sp).is_some() {
            return false;
        }
        // An unreadable stack pointer leaves the walk unproven: refused as such.
        let Some(region) = maps.find(sp).or_else(|| maps.find(sp.wrapping_sub(1))) else {
            return false;
        };
        if tid == self.pid {
            self.main_stack_end.is_some_and(|end| region.end != end)
        } else {
            tp.is_some_and(|tp| !(region.start <= tp && tp < region.end))
        }
    }

    /// The first parked thread on a stack not its own: `(tid, sp)`.
    fn parked_foreign(&self, stopped: &Stopped<'_>) -> Option<(i32, usize)> {
        stopped.threads().iter().find_map(|t| {
            let sp = t.regs.rsp as usize;
            self.foreign(
                stopped.maps(),
                t.tid,
                sp,
                Some(t.thread_pointer),
                t.alt_stack,
            )
            .then_some((t.tid, sp))
        })
    }
}

/// The fallback attempt: park every other thread, check, write every edit at once, resume.
pub(super) fn all_stopped(
    stopper: &mut StopWorld,
    checker: &mut Checker,
    job: &Job<'_>,
    tally: &mut Tally,
    stages: &mut Stages,
) -> Result<Outcome, UpdateError> {
    let t_stop = Instant::now();
    let mut gate = Gate::open(job.policy.hold_bound);
    // ---- threads stopped: no allocation, no lock, no output ----
    let stopped = match stopper.stop(job.policy.park_timeout) {
        Ok(stopped) => stopped,
        // A thread was created meanwhile and the slots are full: grow, retry.
        Err(StopError::PrepareAgain { .. }) => return Ok(Outcome::PrepareAgain),
        // It may wait for what a parked thread holds: let them all go, retry later.
        Err(StopError::SignalBlocked { tid, .. }) => {
            return Ok(Outcome::Busy(Some(Blocker::StopSignalBlocked { tid })));
        }
        Err(e) => return Err(e.into()),
    };
    let t_check = Instant::now();
    tally.begin();
    let unproven = check_parked(&stopped, checker, job.ranges, tally);
    check_declared(&stopped, &[], checker, job.ranges, tally);
    let foreign = job.own_stacks.and_then(|own| own.parked_foreign(&stopped));
    let t_write = Instant::now();
    let outcome = if let Some((tid, sp)) = foreign {
        Outcome::ForeignStack { tid, sp }
    } else if tally.any_now() || unproven.is_some() {
        Outcome::Busy(unproven.map(Blocker::Unproven))
    } else if let Err(gave_up) = gate.commit() {
        Outcome::Busy(Some(Blocker::GaveUp(gave_up)))
    } else {
        // SAFETY: every other thread is parked (none gave up: committed just above) and none is
        // in any of `ranges` (checked just above); sites are in mapped code.
        match unsafe { write::apply_all(job.writer, job.edits) } {
            Ok(()) => Outcome::Done,
            Err(failure) => Outcome::WriteFailed(failure),
        }
    };
    let t_resume = Instant::now();
    stopped.resume();
    // ---- threads running ----
    stages.survey = Default::default();
    stages.stop = t_check - t_stop;
    stages.check = t_write - t_check;
    stages.write = t_resume - t_write;
    stages.resume = t_resume.elapsed();
    Ok(outcome)
}

/// Checks every parked thread; returns the first reason a thread could not be proven
/// inactive. Activities go to the tally.
fn check_parked(
    stopped: &Stopped<'_>,
    checker: &mut Checker,
    ranges: &Ranges,
    tally: &mut Tally,
) -> Option<CheckError> {
    let mut unproven = None;
    for t in stopped.threads() {
        match checker.find_active(stopped, t, ranges) {
            Ok(None) => {}
            Ok(Some(a)) => tally.saw(a),
            Err(e) => {
                unproven.get_or_insert(e);
            }
        }
    }
    unproven
}

/// Scans the declared stacks no thread runs on (suspended coroutines'), once every thread
/// has been checked: a stack holding a parked thread's or a waiting thread's stack pointer is
/// that thread's and was walked with it. Activities go to the tally. Allocates nothing.
fn check_declared(
    stopped: &Stopped<'_>,
    waiting: &[Waiting],
    checker: &mut Checker,
    ranges: &Ranges,
    tally: &mut Tally,
) {
    let occupied = |s: &crate::stacks::DeclaredStack| {
        stopped
            .threads()
            .iter()
            .any(|t| s.contains(t.regs.rsp as usize))
            || waiting.iter().any(|w| s.contains(w.sp as usize))
    };
    if let Some(a) = checker.find_active_declared(ranges, occupied) {
        tally.saw(a);
    }
}

/// How often a waiting thread that ran during its check is checked again before it is
/// stopped instead.
const RECHECKS: usize = 3;

/// How many times the running threads are read again before they are stopped, and the nap
/// before each.
const SETTLE_ROUNDS: usize = 2;
const SETTLE_NAP: std::time::Duration = std::time::Duration::from_micros(30);

/// What the check of a waiting thread concluded.
enum Verdict {
    Active(Activity),
    Inactive,
    /// It kept running during its checks: stop it (unless it blocks again before the stop)
    /// and check it from its registers.
    Stop,
    /// Its copy does not prove it inactive (the walk needed a register the kernel does not
    /// report): stop it and check it from its registers; checking the copy again would not
    /// help.
    Unproven,
}

/// Takes the attempt's breakpoints away; `outcome` when every original byte is back, else a
/// write failure that says the code is not as it was (no panic and no allocation here:
/// threads may be held).
fn remove_breakpoints(job: &Job<'_>, outcome: Outcome) -> Outcome {
    // SAFETY: only the first bytes were changed, by `place_breakpoints` of this attempt.
    if unsafe { write::remove_breakpoints(job.writer, job.edits) } {
        outcome
    } else {
        Outcome::WriteFailed(WriteFailure {
            index: 0,
            error: std::io::Error::from_raw_os_error(libc::EIO),
            rolled_back: false,
        })
    }
}

/// Buffers the live attempt needs besides the stopper's.
#[derive(Debug)]
pub(super) struct LiveBuffers {
    pub survey: Survey,
    /// Where a waiting thread's stack is copied to be checked.
    pub stack: Vec<u8>,
}

/// Bytes of a waiting thread's stack that are copied to check it; a deeper stack whose walk
/// fails is checked by stopping the thread.
pub(super) const STACK_COPY: usize = 512 << 10;

impl LiveBuffers {
    pub fn new() -> LiveBuffers {
        LiveBuffers {
            survey: Survey::new(),
            stack: Vec::new(),
        }
    }

    /// Sizes everything for the threads there are now. Allocates.
    pub fn prepare(&mut self) -> std::io::Result<()> {
        self.survey.prepare()?;
        if self.stack.len() < STACK_COPY {
            // Zeroed by the allocator, which takes a block this large from the kernel as
            // fresh zero pages, rather than written here: a page is then touched only when a
            // copied stack reaches it, so an update pays for the depth of the stacks it
            // copies, not for 512 KiB of page faults (0.4-0.5 ms, which every first update
            // of a process paid), and the idle footprint holds only what copies used.
            self.stack = vec![0; STACK_COPY];
        }
        Ok(())
    }
}

/// The default attempt: breakpoints, survey, check the waiting threads from copies, park and
/// check the running ones, finish the edits, let everyone go.
pub(super) fn live(
    stopper: &mut StopWorld,
    bufs: &mut LiveBuffers,
    checker: &mut Checker,
    job: &Job<'_>,
    tally: &mut Tally,
    stages: &mut Stages,
) -> Result<Outcome, UpdateError> {
    let t_survey = Instant::now();
    tally.begin();
    let mut gate = Gate::open(job.policy.hold_bound);
    // ---- threads may be held at breakpoints from here: no allocation, no lock, no output ----
    let window = Window::open(job.writer, job.edits);
    // SAFETY: every site is the start of an edit in mapped code, registered with the hold
    // handler before this attempt, and the window is open.
    if let Err(failure) = unsafe { write::place_breakpoints(job.writer, job.edits) } {
        window.close();
        return Ok(Outcome::WriteFailed(failure));
    }
    let abandon = |window: Window, outcome: Outcome| {
        let outcome = remove_breakpoints(job, outcome);
        window.close();
        outcome
    };
    let me = threads::gettid();
    match bufs.survey.take(me, job.policy.park_timeout) {
        Ok(()) => {}
        Err(SurveyError::PrepareAgain) => return Ok(abandon(window, Outcome::PrepareAgain)),
        Err(SurveyError::Unsettled { .. }) => return Ok(abandon(window, Outcome::Busy(None))),
        Err(e) => {
            let _ = abandon(window, Outcome::Busy(None));
            return Err(e.into());
        }
    }
    // A running thread that blocks the stop signal would hold every parked thread until the
    // park timeout: noticed before anything is stopped.
    let sig = stopper.signal();
    if let Some(&tid) = bufs
        .survey
        .running()
        .iter()
        .find(|&&tid| matches!(tasks::blocks_signal(tid, sig), Ok(Some(true))))
    {
        return Ok(abandon(
            window,
            Outcome::Busy(Some(Blocker::StopSignalBlocked { tid })),
        ));
    }
    // Waiting threads: checked where they wait, from a copy of their stack. One that ran
    // meanwhile, or that the copy does not prove inactive, is stopped and checked instead.
    // A waiter runs for moments (it wakes, loops, waits again); signalling it then would
    // interrupt its next wait. So the threads seen running are read again, after short naps,
    // and those that have blocked meanwhile are checked where they wait instead.
    let mut unproven = None;
    let mut checked = 0;
    for round in 0..=SETTLE_ROUNDS {
        if round > 0 {
            if !bufs.survey.any_unsettled() {
                break;
            }
            dsu_sys::raw::nap(SETTLE_NAP);
        }
        bufs.survey.settle_running();
        let end = bufs.survey.waiting().len();
        for i in checked..end {
            let mut w = bufs.survey.waiting()[i];
            let mut verdict = Verdict::Stop;
            // A thread that ran during its check (a periodic waiter woke up) is read and
            // checked again where it waits now, a few times, before it is stopped instead.
            for _ in 0..RECHECKS {
                let found = checker.find_active_waiting(
                    stopper.maps(),
                    w.tid,
                    (w.sp, w.pc),
                    &mut bufs.stack,
                    job.ranges,
                );
                if !Survey::still_waiting(&w) {
                    match Survey::reread(w.tid) {
                        Some(now) => {
                            w = now;
                            continue;
                        }
                        None => break,
                    }
                }
                verdict = match found {
                    // Where the walk needed a register the kernel does not report (a frame
                    // pointer), the scan may find a stale word: stop the thread and check it
                    // from its registers rather than refuse on a guess.
                    Ok(Some(a)) if !matches!(a.how, How::StackScan { .. }) => Verdict::Active(a),
                    Ok(None) => Verdict::Inactive,
                    _ => Verdict::Unproven,
                };
                break;
            }
            match verdict {
                Verdict::Active(a) => tally.saw(a),
                Verdict::Inactive => {}
                Verdict::Stop => {
                    if !bufs.survey.mark_running(w.tid) {
                        return Ok(abandon(window, Outcome::PrepareAgain));
                    }
                }
                Verdict::Unproven => {
                    if !bufs.survey.mark_unproven(w.tid) {
                        return Ok(abandon(window, Outcome::PrepareAgain));
                    }
                }
            }
        }
        checked = end;
        if tally.any_now() {
            break;
        }
    }
    if let Some(site) = window.owner_trapped() {
        return Ok(abandon(window, Outcome::AgentTrapped { site }));
    }
    if tally.any_now() {
        return Ok(abandon(window, Outcome::Busy(None)));
    }
    let t_stop = Instant::now();
    let stopped = match stopper.stop_threads(bufs.survey.running(), job.policy.park_timeout) {
        Ok(stopped) => stopped,
        Err(StopError::PrepareAgain { .. }) => return Ok(abandon(window, Outcome::PrepareAgain)),
        // Seen running, it has blocked the signal since and sleeps.
        Err(StopError::SignalBlocked { tid, .. }) => {
            return Ok(abandon(
                window,
                Outcome::Busy(Some(Blocker::StopSignalBlocked { tid })),
            ));
        }
        Err(e) => {
            let _ = abandon(window, Outcome::Busy(None));
            return Err(e.into());
        }
    };
    let t_check = Instant::now();
    if let Some(e) = check_parked(&stopped, checker, job.ranges, tally) {
        unproven = Some(e);
    }
    check_declared(&stopped, bufs.survey.waiting(), checker, job.ranges, tally);
    let foreign = job.own_stacks.and_then(|own| {
        own.parked_foreign(&stopped).or_else(|| {
            // Waiting threads: the main thread's stack is known, and a held thread's thread
            // pointer; any other's is not (it is not stopped to be asked).
            bufs.survey
                .waiting()
                .iter()
                .find(|w| {
                    let tp = crate::hold::Holds.thread_pointer(w.tid);
                    (w.tid == own.pid || tp.is_some())
                        && own.foreign(stopped.maps(), w.tid, w.sp as usize, tp, None)
                })
                .map(|w| (w.tid, w.sp as usize))
        })
    });
    let t_write = Instant::now();
    let outcome = if let Some(site) = window.owner_trapped() {
        remove_breakpoints(job, Outcome::AgentTrapped { site })
    } else if let Some((tid, sp)) = foreign {
        remove_breakpoints(job, Outcome::ForeignStack { tid, sp })
    } else if tally.any_now() || unproven.is_some() {
        remove_breakpoints(job, Outcome::Busy(unproven.map(Blocker::Unproven)))
    } else if let Err(gave_up) = gate.commit() {
        // A thread went on: the checks may no longer hold, and held threads may have put
        // original bytes back. Nothing new was written; take the breakpoints away.
        remove_breakpoints(job, Outcome::Busy(Some(Blocker::GaveUp(gave_up))))
    } else {
        // SAFETY: the breakpoints are in place, and no thread is inside any range: the waiting
        // ones did not run since their check, the running ones are parked and were checked,
        // the held ones have not executed their site, and none gave up (committed above).
        match unsafe { write::finish_behind_breakpoints(job.writer, job.edits) } {
            Ok(()) => Outcome::Done,
            Err(failure) => Outcome::WriteFailed(failure),
        }
    };
    let t_resume = Instant::now();
    stopped.resume();
    window.close();
    // ---- threads running ----
    stages.survey = t_stop - t_survey;
    stages.stop = t_check - t_stop;
    stages.check = t_write - t_check;
    stages.write = t_resume - t_write;
    stages.resume = t_resume.elapsed();
    Ok(outcome)
}
