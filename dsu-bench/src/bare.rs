//! The floors an update's pause is measured against: stopping and resuming the same threads
//! with nothing else done.
//!
//! - [`Handshake`]: the bare cycle of the brief. List the threads, signal each, wait until all
//!   are parked, release. Its handler parks on a futex with a generation counter (the field
//!   notes' lesson) and does nothing else but note when it leaves, so the cycle also knows
//!   when the last thread really ran again. With `cascade`, each released thread also wakes
//!   the others before it returns: a stopper preempted in the middle of its wake-up call (by
//!   the first thread it woke) then holds nobody.
//! - [`stop_world_cycle`]: the agent's own `StopWorld::stop` + `resume`, which also collects
//!   every thread's registers and refreshes the memory map while the threads are held.
//!
//! `unsafe` here: installing the handshake's signal handler.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dsu_agent::stop::{StopError, StopWorld};
use dsu_sys::futex;
use dsu_sys::signal::{self, BlockDuring, Disposition, SavedErrno};
use dsu_sys::threads;

/// The last round opened; a round `r` is open while `RELEASED != r`.
static ROUND: AtomicU32 = AtomicU32::new(0);
/// The last round released: parked threads sleep on it.
static RELEASED: AtomicU32 = AtomicU32::new(0);
/// Threads parked in the open round (the stopper sleeps on it).
static PARKED: AtomicU32 = AtomicU32::new(0);
/// How many the stopper waits for.
static EXPECTED: AtomicU32 = AtomicU32::new(u32::MAX);
/// The stopping thread, which never parks.
static STOPPER: AtomicI32 = AtomicI32::new(0);
/// Latest `CLOCK_MONOTONIC` time, ns, at which a thread left the handler; and how many left.
static LAST_EXIT_NS: AtomicU64 = AtomicU64::new(0);
static EXITED: AtomicU32 = AtomicU32::new(0);
/// Whether a released thread wakes the others too.
static CASCADE: AtomicBool = AtomicBool::new(false);

/// `CLOCK_MONOTONIC` in nanoseconds. Async-signal-safe.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// *Async-signal-safe*: atomics, raw `futex` and `gettid` only; `errno` saved and restored.
extern "C" fn park(_sig: libc::c_int, _info: *mut libc::siginfo_t, _uc: *mut libc::c_void) {
    let _errno = SavedErrno::save();
    let round = ROUND.load(Ordering::Acquire);
    if round == RELEASED.load(Ordering::Acquire)
        || threads::gettid() == STOPPER.load(Ordering::Relaxed)
    {
        return; // no round open: a late signal
    }
    let parked = PARKED.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
    if parked >= EXPECTED.load(Ordering::Acquire) {
        let _ = futex::wake(&PARKED, 1);
    }
    loop {
        let seen = RELEASED.load(Ordering::Acquire);
        if (seen.wrapping_sub(round) as i32) >= 0 {
            break;
        }
        let _ = futex::wait(&RELEASED, seen, None);
    }
    if CASCADE.load(Ordering::Relaxed) {
        let _ = futex::wake_all(&RELEASED);
    }
    LAST_EXIT_NS.fetch_max(monotonic_ns(), Ordering::AcqRel);
    EXITED.fetch_add(1, Ordering::AcqRel);
}

/// The agent's default stop signal, `SIGRTMIN + 5`.
pub fn agent_stop_signal() -> i32 {
    signal::rt_min() + 5
}

/// The bare stop/resume cycle, on its own signal.
#[derive(Debug)]
pub struct Handshake {
    sig: i32,
    /// Threads never signalled: the agent's own thread, which blocks every asynchronous
    /// signal and is never stopped by an update either.
    exclude: Vec<i32>,
}

/// One cycle's times, all from its start (listing the threads).
#[derive(Debug, Clone, Copy)]
pub struct Cycle {
    /// Threads signalled (not counting the caller).
    pub threads: usize,
    /// Until the last thread parked.
    pub stop: Duration,
    /// Until the stopper's release call returned: how the agent measures its pause.
    pub total: Duration,
    /// Until the last thread left the handler (the real longest hold); `None` for a
    /// `StopWorld` cycle, whose handler notes nothing.
    pub last_exit: Option<Duration>,
}

impl Handshake {
    /// Installs the park handler for `sig`, which must have its default action.
    pub fn install(sig: i32) -> io::Result<Handshake> {
        if signal::disposition(sig)? != Disposition::Default {
            return Err(io::Error::other(format!("signal {sig} is already in use")));
        }
        // SAFETY: `park` is async-signal-safe (see its documentation) and `sig` had the
        // default action: nobody else relies on it.
        unsafe { signal::install(sig, park, BlockDuring::Everything) }?;
        Ok(Handshake {
            sig,
            exclude: Vec::new(),
        })
    }

    /// Leaves the threads named `dsu-agent` (the agent's) out of every later cycle.
    pub fn exclude_agent_threads(&mut self) {
        self.exclude = threads::list()
            .unwrap_or_default()
            .into_iter()
            .filter(|&t| dsu_sys::tasks::name(t) == "dsu-agent")
            .collect();
    }

    /// Stops every other thread of the process and releases it at once. Fails (after
    /// releasing) when a thread does not park within `timeout`. With `cascade`, released
    /// threads wake each other; with `observe`, waits (untimed) until every thread left the
    /// handler, to fill [`Cycle::last_exit`].
    pub fn cycle(&mut self, timeout: Duration, cascade: bool, observe: bool) -> io::Result<Cycle> {
        CASCADE.store(cascade, Ordering::Relaxed);
        LAST_EXIT_NS.store(0, Ordering::Relaxed);
        EXITED.store(0, Ordering::Relaxed);
        let t0_ns = monotonic_ns();
        let t0 = Instant::now();
        let me = threads::gettid();
        let tids = threads::list()?;
        let round = ROUND.load(Ordering::Relaxed).wrapping_add(1).max(1);
        STOPPER.store(me, Ordering::Relaxed);
        PARKED.store(0, Ordering::Relaxed);
        EXPECTED.store(u32::MAX, Ordering::Relaxed);
        ROUND.store(round, Ordering::Release);
        let mut signalled = 0u32;
        for &tid in tids
            .iter()
            .filter(|&&t| t != me && !self.exclude.contains(&t))
        {
            match threads::tgkill(tid, self.sig) {
                Ok(()) => signalled += 1,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => {
                    self.release(round);
                    return Err(e);
                }
            }
        }
        EXPECTED.store(signalled, Ordering::Release);
        let deadline = t0 + timeout;
        loop {
            let seen = PARKED.load(Ordering::Acquire);
            if seen >= signalled {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.release(round);
                return Err(io::Error::other(format!(
                    "{seen} of {signalled} threads parked within {timeout:?}"
                )));
            }
            let _ = futex::wait(&PARKED, seen, Some(left.min(Duration::from_millis(10))));
        }
        let t1 = Instant::now();
        self.release(round);
        let total = t0.elapsed();
        if !observe {
            return Ok(Cycle {
                threads: signalled as usize,
                stop: t1 - t0,
                total,
                last_exit: None,
            });
        }
        // Wait (untimed) until every thread left, to read when the last one did.
        let until = Instant::now() + timeout;
        while EXITED.load(Ordering::Acquire) < signalled && Instant::now() < until {
            std::thread::sleep(Duration::from_micros(200));
        }
        let last = LAST_EXIT_NS.load(Ordering::Acquire);
        Ok(Cycle {
            threads: signalled as usize,
            stop: t1 - t0,
            total,
            last_exit: (EXITED.load(Ordering::Acquire) >= signalled)
                .then(|| Duration::from_nanos(last.saturating_sub(t0_ns))),
        })
    }

    fn release(&mut self, round: u32) {
        RELEASED.store(round, Ordering::Release);
        let _ = futex::wake_all(&RELEASED);
    }
}

/// One `StopWorld::stop` + `resume` (preparing again when the slots are too few).
pub fn stop_world_cycle(world: &mut StopWorld, timeout: Duration) -> io::Result<Cycle> {
    for _ in 0..3 {
        match try_stop_world_cycle(world, timeout) {
            Ok(cycle) => return Ok(cycle),
            Err(StopError::PrepareAgain { .. }) => world.prepare()?,
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
    }
    Err(io::Error::other("StopWorld kept asking to prepare again"))
}

fn try_stop_world_cycle(world: &mut StopWorld, timeout: Duration) -> Result<Cycle, StopError> {
    let t0 = Instant::now();
    let stopped = world.stop(timeout)?;
    let threads = stopped.threads().len();
    let t1 = Instant::now();
    stopped.resume();
    Ok(Cycle {
        threads,
        stop: t1 - t0,
        total: t0.elapsed(),
        last_exit: None,
    })
}
