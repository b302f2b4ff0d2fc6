//! The commit point of an update attempt, and the bound on how long a thread waits for it.
//!
//! During an attempt, threads wait on the agent: running threads parked by the stop signal
//! ([`crate::stop`]), threads that reached a breakpoint held at it ([`crate::hold`]). If the
//! agent could not finish (its thread stopped by a debugger, descheduled for seconds on an
//! overloaded machine, or blocked by a bug), they would wait forever and the program would hang.
//! So every wait is bounded by [`Policy::hold_bound`](crate::update::Policy) (3 s by default,
//! `DSU_HOLD_BOUND_MS` for a program started with the agent preloaded).
//!
//! One word decides who wins, the agent or a thread that has waited too long:
//!
//! - the agent [opens](Gate::open) the gate before it places a breakpoint or stops a thread,
//!   and [commits](Gate::commit) it (open -> committed) before it writes the first byte of new
//!   code; after the commit only raw `pwrite` and `membarrier` calls remain, which take no lock,
//!   and the waiting threads wait for them to end;
//! - a thread that has waited `hold_bound` gives up (open -> abandoned) and goes on:
//!   a parked thread returns from the stop handler, a held thread first puts back the original
//!   first byte of every edit, then executes its own. The agent's commit then fails, nothing new
//!   has been written, and the attempt ends like a busy one: its breakpoints are removed, the
//!   other threads resume, and the update is retried until its timeout, which names the thread
//!   that gave up ([`UpdateError::WaitBound`](crate::update::UpdateError)).
//!
//! A thread parked or held when no attempt is open (the benchmark's bare stops) waits as before.
//!
//! Everything but [`Gate::open`] runs in signal handlers or while threads are held:
//! *async-signal-safe*, atomics only.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// `(attempt << 2) | phase` of the latest attempt.
static GATE: AtomicU64 = AtomicU64::new(0);
/// The last attempt number handed out.
static ATTEMPT: AtomicU64 = AtomicU64::new(0);
/// The bound of the attempt open now, in waits of [`SLICE`].
static BOUND_SLICES: AtomicU32 = AtomicU32::new(0);

/// How long one wait of a parked or held thread lasts before it looks at the gate again. The
/// bound is counted in whole waits that timed out, not read from a clock: the handlers may run
/// on a small alternate signal stack, nested (a held thread can be parked), and a clock read
/// costs stack in a debug build.
pub(crate) const SLICE: Duration = Duration::from_millis(50);
/// The thread that gave up the attempt open now (0: none).
static GAVE_UP: AtomicU32 = AtomicU32::new(0);
/// Testing only (`DSU_TEST_STALL_BEFORE_WRITE_MS`): how long the agent sleeps just before it
/// commits, with threads parked and held, so that tests can reach the bound.
static STALL_NS: AtomicU64 = AtomicU64::new(0);

const NONE: u64 = 0;
const OPEN: u64 = 1;
const COMMITTED: u64 = 2;
const ABANDONED: u64 = 3;

fn phase(word: u64) -> u64 {
    word & 3
}

/// A thread gave up waiting for the attempt, which therefore wrote nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaveUp {
    /// The first thread that gave up.
    pub tid: i32,
    pub bound: Duration,
}

/// The agent's side of one attempt. Dropping it ends the attempt (threads still waiting then
/// wait for their release as usual).
#[derive(Debug)]
pub struct Gate {
    word: u64,
    bound: Duration,
}

impl Gate {
    /// Opens the gate of a new attempt whose waiting threads give up after `bound`.
    pub fn open(bound: Duration) -> Gate {
        let attempt = ATTEMPT.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let word = attempt << 2 | OPEN;
        GAVE_UP.store(0, Ordering::SeqCst);
        let slices = bound
            .as_nanos()
            .div_ceil(SLICE.as_nanos())
            .clamp(1, u128::from(u32::MAX));
        BOUND_SLICES.store(slices as u32, Ordering::SeqCst);
        GATE.store(word, Ordering::SeqCst);
        Gate { word, bound }
    }

    /// Commits the attempt: from now on no waiting thread gives up. Fails when one already has.
    /// *Async-signal-safe* (runs while threads are held).
    pub fn commit(&mut self) -> Result<(), GaveUp> {
        let stall = STALL_NS.load(Ordering::Relaxed);
        if stall != 0 {
            dsu_sys::raw::nap(Duration::from_nanos(stall));
        }
        match GATE.compare_exchange(
            self.word,
            self.word - OPEN + COMMITTED,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) => Ok(()),
            Err(_) => Err(self.gave_up().unwrap_or(GaveUp {
                tid: 0,
                bound: self.bound,
            })),
        }
    }

    /// The thread that gave up this attempt, if one did. *Async-signal-safe*.
    pub fn gave_up(&self) -> Option<GaveUp> {
        let now = GATE.load(Ordering::SeqCst);
        (now == self.word - OPEN + ABANDONED).then(|| GaveUp {
            tid: GAVE_UP.load(Ordering::SeqCst) as i32,
            bound: self.bound,
        })
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let attempt = self.word & !3;
        let _ = GATE.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
            (now & !3 == attempt).then_some(attempt | NONE)
        });
    }
}

/// How many timed-out waits of [`SLICE`] a thread waits before it may [give up](give_up);
/// `None` when no attempt is open. *Async-signal-safe*.
pub(crate) fn bound_slices() -> Option<u32> {
    matches!(phase(GATE.load(Ordering::SeqCst)), OPEN | ABANDONED)
        .then(|| BOUND_SLICES.load(Ordering::SeqCst))
}

/// The waits left before a waiting thread may give up, after one more wait of [`SLICE`]
/// (`timed_out`: it lasted the whole slice; a wake-up or a signal does not count). A thread
/// that started waiting with no attempt open takes the bound of one opened since.
/// *Async-signal-safe*.
pub(crate) fn after_wait(left: Option<u32>, timed_out: bool) -> Option<u32> {
    match left {
        Some(n) if timed_out => Some(n.saturating_sub(1)),
        Some(n) => Some(n),
        None => bound_slices(),
    }
}

/// Called by thread `tid` that has waited its bound: gives the open attempt up, unless the
/// agent has committed it. Returns whether the thread may go on (the attempt is abandoned, by
/// this thread or another). *Async-signal-safe*.
pub(crate) fn give_up(tid: i32) -> bool {
    let mut now = GATE.load(Ordering::SeqCst);
    loop {
        match phase(now) {
            ABANDONED => return true,
            OPEN => {}
            _ => return false,
        }
        let _ = GAVE_UP.compare_exchange(0, tid as u32, Ordering::SeqCst, Ordering::SeqCst);
        match GATE.compare_exchange(
            now,
            now - OPEN + ABANDONED,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) => return true,
            Err(seen) => now = seen,
        }
    }
}

/// Whether the open attempt was given up (a thread that reaches a breakpoint then goes on at
/// once). *Async-signal-safe*.
pub(crate) fn abandoned() -> bool {
    phase(GATE.load(Ordering::SeqCst)) == ABANDONED
}

/// In a forked child: no agent thread will commit or end the attempt copied from the parent.
/// *Async-signal-safe*.
pub(crate) fn forget_in_child() {
    GATE.store(NONE, Ordering::SeqCst);
}

/// Testing only: makes every commit sleep `stall` first (see `DSU_TEST_STALL_BEFORE_WRITE_MS`).
pub fn set_test_stall(stall: Duration) {
    STALL_NS.store(
        stall.as_nanos().min(u128::from(u64::MAX)) as u64,
        Ordering::Relaxed,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test for the whole protocol: the gate is process-wide state.
    #[test]
    fn the_agent_and_a_waiting_thread_agree_on_who_wins() {
        // No attempt open: a waiter has no bound and may not go on.
        assert_eq!(bound_slices(), None);
        assert!(!give_up(7));
        assert!(!abandoned());

        // The agent commits first: no waiter gives up afterwards.
        let mut gate = Gate::open(Duration::from_millis(120));
        assert_eq!(
            bound_slices(),
            Some(3),
            "120 ms in waits of 50 ms, rounded up"
        );
        assert_eq!(gate.gave_up(), None);
        assert_eq!(gate.commit(), Ok(()));
        assert_eq!(GATE.load(Ordering::SeqCst), gate.word - OPEN + COMMITTED);
        assert!(!give_up(7));
        assert!(!abandoned());
        assert_eq!(bound_slices(), None, "committed: nothing to count down to");
        drop(gate);
        assert_eq!(bound_slices(), None);
        assert_eq!(phase(GATE.load(Ordering::SeqCst)), NONE);

        // A waiter gives up first: the commit fails and names it; later waiters go on too.
        let mut gate = Gate::open(Duration::from_secs(3));
        assert_eq!(bound_slices(), Some(60));
        assert!(give_up(41));
        assert!(abandoned());
        assert!(give_up(42));
        assert_eq!(
            bound_slices(),
            Some(60),
            "abandoned: waiters still go on at once"
        );
        let expected = GaveUp {
            tid: 41,
            bound: Duration::from_secs(3),
        };
        assert_eq!(gate.gave_up(), Some(expected));
        assert_eq!(gate.commit(), Err(expected));
        drop(gate);
        assert!(!abandoned());

        // A new attempt starts clean: the old attempt's waiter is forgotten.
        let mut gate = Gate::open(Duration::from_nanos(1));
        assert_eq!(bound_slices(), Some(1), "never less than one wait");
        assert_eq!(gate.gave_up(), None);
        // The gate of an older attempt does not end a newer one.
        let older = Gate {
            word: gate.word - 4,
            bound: gate.bound,
        };
        drop(older);
        assert_eq!(bound_slices(), Some(1));
        assert_eq!(gate.commit(), Ok(()));
        drop(gate);

        // Counting down: only whole waits count; no bound until an attempt opens.
        let _gate = Gate::open(Duration::from_millis(100));
        assert_eq!(after_wait(Some(2), true), Some(1));
        assert_eq!(after_wait(Some(0), true), Some(0));
        assert_eq!(after_wait(Some(2), false), Some(2));
        assert_eq!(
            after_wait(None, false),
            Some(2),
            "the bound of the attempt opened since"
        );
        drop(_gate);
        assert_eq!(after_wait(None, true), None);

        // In a forked child nothing is open any more.
        let _gate = Gate::open(Duration::from_secs(1));
        forget_in_child();
        assert_eq!(bound_slices(), None);
        assert!(!give_up(9));
    }
}
