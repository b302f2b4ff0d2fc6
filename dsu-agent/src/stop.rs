//! Stop the world: park every other thread of the process in a signal handler, read its
//! interrupted registers, and let it go again.
//!
//! # Protocol
//!
//! One real-time signal is reserved for parking. A stop *round* has a number `r` (never 0,
//! unique for the life of the process). The agent's thread, in [`StopWorld::stop`]:
//! 1. opens the round: the slot array's `state` word becomes `(r << 32) | 0` (round, claimed);
//! 2. lists `/proc/self/task` and `tgkill`s every thread but itself;
//! 3. publishes how many it signalled and sleeps on the array's `parked` futex until every
//!    signalled thread has a slot tagged `r` (threads found to have exited are dropped; a
//!    thread found sleeping with the stop signal blocked ends the round with
//!    [`StopError::SignalBlocked`]: it may wait for what a parked thread holds);
//! 4. checks that no thread appeared meanwhile: when `num_threads` of `/proc/self/stat` is
//!    not exactly itself plus the parked threads, it lists again, signals the new threads and
//!    waits for them, until a listing shows no new tid *and* is as long as the thread count
//!    (the kernel cuts a listing short when a thread exits during it; threads that are exiting
//!    never park but are counted until reaped);
//! 5. looks up the mapping holding each thread's stack pointer (its stack bounds).
//!
//! The handler (`park`) claims a slot index with a compare-and-swap on `state` that only
//! succeeds while round `r` is open, copies its interrupted registers into the slot, tags the
//! slot `(r, tid)`, bumps `parked` (waking the stopper once the count reaches what it waits
//! for), then sleeps on the `RELEASED` futex until `RELEASED >= r` (wrapping comparison), or,
//! during an update, until the attempt's bound has passed and it may give the attempt up
//! ([`crate::gate`]).
//! Resuming (or aborting) closes the round (`state` back to 0), then stores `RELEASED = r`
//! and wakes everyone. The tags are the truth; `parked` is only a wake-up hint.
//!
//! Why a generation counter: a thread released from round `r` may not have left the handler
//! when round `r + 1` signals it. Its stop signal stays blocked until it returns, so the new
//! signal waits as pending; the thread sees `RELEASED >= r`, leaves, and the pending signal
//! parks it again in round `r + 1`. A boolean "released" flag would instead be reset by round
//! `r + 1` before the old thread saw it, leaving that thread asleep in round `r` forever. A
//! signal delivered when no round is open (late, or from an aborted round) finds `state == 0`
//! and returns at once; a stale signal arriving during a later round parks the thread in that
//! round, which is harmless (it is one of the threads the round stops anyway).
//!
//! Slot arrays are never freed (they are leaked on growth): a handler may hold a pointer to
//! one for an unbounded time. A round that ends while a claimed slot is still being written
//! retires its array; the next [`StopWorld::stop`] then asks for [`StopWorld::prepare`].
//!
//! While the world is stopped this module allocates nothing, takes no lock and prints
//! nothing: every buffer is sized by [`StopWorld::prepare`].
//!
//! `unsafe` here: reading `siginfo`/`ucontext` in the handler, the slots' interior mutability
//! (one writer per slot per round, published by a release store of the tag), and installing the
//! handler.
//!
//! Unsafe code is allowed here: this module installs the park signal handler and shares parked
//! threads' contexts; every block states its invariant.

#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

// Raw clock reads: the stopper runs while breakpoints may sit in the C library.
use dsu_sys::raw::Moment as Instant;

use dsu_sys::futex;
use dsu_sys::signal::{self, AltStack, BlockDuring, Disposition, NGREG, Registers};
use dsu_sys::stack::StackMaps;
use dsu_sys::{tasks, threads};

use crate::gate;

/// Errors of stopping the world. Every one leaves all threads running.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error(
        "signal {sig} already has a handler at {handler:#x}; choose another stop signal \
         (a real-time signal unused by the program)"
    )]
    SignalInUse { sig: i32, handler: usize },
    #[error(
        "signal {sig} is ignored or reset to its default action by the program; choose another \
         stop signal"
    )]
    SignalIgnored { sig: i32 },
    #[error("the stop handler is already installed for signal {installed}, not {requested}")]
    OtherSignal { installed: i32, requested: i32 },
    #[error("installing the stop handler for signal {sig}: {source}")]
    Install { sig: i32, source: io::Error },
    #[error("another StopWorld exists in this process; only one may stop threads")]
    Busy,
    #[error(
        "not enough room for {what} while threads were stopped; call StopWorld::prepare and retry"
    )]
    PrepareAgain { what: &'static str },
    #[error(
        "thread {tid} did not stop within {waited:?} (it may block the stop signal, or be traced or stopped)"
    )]
    NotParked { tid: i32, waited: Duration },
    #[error(
        "thread {tid} waits in the kernel with the stop signal {sig} blocked, so it cannot stop \
         until it unblocks it"
    )]
    SignalBlocked { tid: i32, sig: i32 },
    #[error(
        "the threads did not settle: {listed} listed but {counted} counted until the timeout \
         (threads exiting or being created without end); retry"
    )]
    Unsettled { listed: usize, counted: usize },
    #[error(
        "the stop signal {sig} could not be queued for thread {tid}: the limit on pending \
         signals (RLIMIT_SIGPENDING) of the process's user is reached; raise it (prlimit \
         --sigpending) or retry when fewer signals are pending"
    )]
    SignalQueueFull { tid: i32, sig: i32 },
    #[error("sending the stop signal to thread {tid}: {source}")]
    Signal { tid: i32, source: io::Error },
    #[error("listing the threads of the process: {0}")]
    ListThreads(io::Error),
    #[error("reading the memory map of the process: {0}")]
    Maps(io::Error),
}

/// `[start, end)` of the memory a stopped thread's stack pointer points into: its alternate
/// signal stack when it runs on it, else the mapping that contains the stack pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackBounds {
    pub start: usize,
    pub end: usize,
}

impl StackBounds {
    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.start && addr < self.end
    }
}

/// A thread held in the park handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParkedThread {
    pub tid: i32,
    /// The registers at the instruction the stop signal interrupted.
    pub regs: Registers,
    /// The thread's alternate signal stack, when it has one.
    pub alt_stack: Option<AltStack>,
    /// Its thread pointer (`%fs:0`). A thread of the C library keeps its control block at the
    /// top of its own stack, so a stack pointer in a mapping that does not hold it means the
    /// thread runs on a stack that is not its own.
    pub thread_pointer: usize,
}

const SLOT_MARGIN: usize = 64;
const DIRENT_BUF: usize = 16 * 1024;
/// How often unparked threads are checked for having exited while waiting.
const LIVENESS_SLICE: Duration = Duration::from_millis(2);

/// Raw copy of a parked thread's context: decoded by the stopper, not in the handler, which
/// may run on a small alternate signal stack.
struct SlotData {
    gregs: [u64; NGREG],
    alt: AltStack,
    thread_pointer: usize,
}

struct Slot {
    /// `(round << 32) | tid`, stored last with `Release` once `data` is written.
    tag: AtomicU64,
    data: UnsafeCell<SlotData>,
}

// SAFETY: `data` has one writer per round (the handler that claimed the slot index through
// `SlotArray::state`) and is read only after an `Acquire` load of `tag` shows that round; an
// array is reused for a new round only when every claimed slot was tagged (see `end_round`).
unsafe impl Sync for Slot {}

struct SlotArray {
    /// `(round << 32) | claimed`; round 0 means no stop in progress.
    state: AtomicU64,
    /// Threads parked in the current round (a futex word the stopper sleeps on; a hint).
    parked: AtomicU32,
    /// How many parked threads the stopper waits for: the handler wakes it from there on.
    expected: AtomicU32,
    /// Thread id of the stopping thread, which the handler ignores.
    stopper: AtomicI32,
    slots: Box<[Slot]>,
}

impl SlotArray {
    fn leak(capacity: usize) -> &'static SlotArray {
        let slots = (0..capacity)
            .map(|_| Slot {
                tag: AtomicU64::new(0),
                data: UnsafeCell::new(SlotData {
                    gregs: [0; NGREG],
                    alt: AltStack::default(),
                    thread_pointer: 0,
                }),
            })
            .collect();
        Box::leak(Box::new(SlotArray {
            state: AtomicU64::new(0),
            parked: AtomicU32::new(0),
            expected: AtomicU32::new(u32::MAX),
            stopper: AtomicI32::new(0),
            slots,
        }))
    }

    /// Whether one of the first `claimed` slots is not tagged with `round` yet: a handler that
    /// claimed it in that round still writes into it.
    fn claim_unwritten(&self, claimed: usize, round: u32) -> bool {
        self.slots[..claimed.min(self.slots.len())]
            .iter()
            .any(|s| tag_round(s.tag.load(Ordering::Acquire)) != round)
    }
}

/// The array the handler claims slots in. Never freed.
static CURRENT: AtomicPtr<SlotArray> = AtomicPtr::new(std::ptr::null_mut());
/// Last released (or aborted) round: parked threads sleep on it.
static RELEASED: AtomicU32 = AtomicU32::new(0);
/// Last round number handed out.
static ROUND: AtomicU32 = AtomicU32::new(0);
/// The signal the handler is installed for (0: none yet).
static INSTALLED: AtomicI32 = AtomicI32::new(0);
/// Whether a `StopWorld` exists.
static OWNED: AtomicBool = AtomicBool::new(false);
static INSTALL_LOCK: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Whether a stop round is open (threads may be parked): code that could take a lock a
/// parked thread holds must not run.
pub(crate) fn in_progress() -> bool {
    let array = CURRENT.load(Ordering::Acquire);
    // SAFETY: slot arrays are leaked, never freed: any non-null pointer stays valid.
    !array.is_null() && unsafe { &*array }.state.load(Ordering::Acquire) >> 32 != 0
}

fn tag_round(tag: u64) -> u32 {
    (tag >> 32) as u32
}

fn tag_tid(tag: u64) -> i32 {
    tag as u32 as i32
}

/// Whether round `r` has been released: `RELEASED >= r` in wrapping order.
fn released(r: u32) -> bool {
    (RELEASED.load(Ordering::Acquire).wrapping_sub(r) as i32) >= 0
}

/// The park handler. *Async-signal-safe*: touches only atomics, the preallocated slot array
/// and raw system calls (`gettid`, `getpid`, `futex`), never the C library (which may be the
/// code being patched) and so never `errno`. Copies the
/// context without stack temporaries: it may run on a nearly full alternate signal stack.
///
/// Acts only on a signal sent by this process with `tgkill` while a round is open; anything
/// else (a late signal, a `kill` from outside) returns at once.
extern "C" fn park(_sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // No C library call in here (raw system calls leave `errno` alone): the thread may be
    // parked while breakpoints sit on code being patched, libc's included.
    if info.is_null() || uc.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo to a SA_SIGINFO handler (non-null: checked).
    let (code, pid) = unsafe { ((*info).si_code, (*info).si_pid()) };
    if code != libc::SI_TKILL || pid != threads::getpid() {
        return;
    }
    let array = CURRENT.load(Ordering::Acquire);
    if array.is_null() {
        return;
    }
    // SAFETY: slot arrays are leaked, never freed: any non-null pointer stays valid.
    let array = unsafe { &*array };
    let tid = threads::gettid();
    if array.stopper.load(Ordering::Relaxed) == tid {
        return;
    }
    let mut state = array.state.load(Ordering::Acquire);
    let (round, index) = loop {
        let round = (state >> 32) as u32;
        if round == 0 {
            return; // no stop in progress: a late signal
        }
        match array.state.compare_exchange_weak(
            state,
            state + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => break (round, state as u32 as usize),
            Err(now) => state = now,
        }
    };
    // Past the capacity the claim still counts (the stopper sees the overflow and aborts),
    // and the thread parks all the same: it must not run while others are stopped.
    if let Some(slot) = array.slots.get(index) {
        let uc = uc.cast::<libc::ucontext_t>();
        // SAFETY: `uc` is the live ucontext the kernel passed (non-null: checked). This handler
        // claimed `index` for `round` through the CAS above: no other writer; the stopper reads
        // only after the tag below (see `impl Sync for Slot`). Copied in place, without
        // temporaries: the handler may run on a nearly full alternate signal stack.
        unsafe {
            let data = slot.data.get();
            signal::copy_gregs(uc, &mut (*data).gregs);
            (*data).alt = AltStack::from_ucontext(uc);
            (*data).thread_pointer = threads::thread_pointer();
        }
        slot.tag.store(
            u64::from(round) << 32 | u64::from(tid as u32),
            Ordering::Release,
        );
    }
    let parked = array.parked.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
    if parked >= array.expected.load(Ordering::Acquire) {
        // A failed wake only delays the stopper until its next timeout slice.
        let _ = futex::wake(&array.parked, 1);
    }
    // Bounded: a thread parked longer than the attempt's bound gives the attempt up and goes
    // on, unless the agent has committed to writing ([`crate::gate`]).
    let mut left = gate::bound_slices();
    loop {
        let seen = RELEASED.load(Ordering::Acquire);
        if (seen.wrapping_sub(round) as i32) >= 0 {
            break;
        }
        if left == Some(0) && gate::give_up(tid) {
            break;
        }
        let woke = futex::wait(&RELEASED, seen, Some(gate::SLICE));
        left = gate::after_wait(left, matches!(woke, Ok(futex::Wake::TimedOut)));
    }
}

/// Stops and resumes all other threads of the process. See the module documentation.
#[derive(Debug)]
pub struct StopWorld {
    sig: i32,
    array: Option<&'static SlotArray>,
    dirents: Vec<u8>,
    listed: Vec<i32>,
    /// Signalled and not known to have exited; sorted.
    expected: Vec<i32>,
    scratch: Vec<i32>,
    parked: Vec<ParkedThread>,
    maps: StackMaps,
    /// The group leader exited and is a zombie: never signal it again.
    zombie_leader: bool,
}

impl std::fmt::Debug for SlotArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotArray")
            .field("capacity", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl StopWorld {
    /// Installs the park handler for `sig` (once per process) and claims the right to stop
    /// threads. Refused when `sig` has a handler that is not ours or is ignored, or when the
    /// handler was installed for another signal, or another `StopWorld` exists.
    pub fn new(sig: i32) -> Result<StopWorld, StopError> {
        {
            let _guard = INSTALL_LOCK.lock();
            let installed = INSTALLED.load(Ordering::Acquire);
            if installed == 0 {
                let install = |source| StopError::Install { sig, source };
                match signal::disposition(sig).map_err(install)? {
                    Disposition::Default => {}
                    Disposition::Ignore => return Err(StopError::SignalIgnored { sig }),
                    Disposition::Handler { addr, .. } => {
                        return Err(StopError::SignalInUse { sig, handler: addr });
                    }
                }
                // SAFETY: `park` is async-signal-safe (see its documentation) and `sig` had
                // the default action: nobody else relies on it.
                unsafe { signal::install(sig, park, BlockDuring::Everything) }.map_err(install)?;
                INSTALLED.store(sig, Ordering::Release);
            } else if installed != sig {
                return Err(StopError::OtherSignal {
                    installed,
                    requested: sig,
                });
            }
        }
        if OWNED.swap(true, Ordering::AcqRel) {
            return Err(StopError::Busy);
        }
        Ok(StopWorld {
            sig,
            array: None,
            dirents: Vec::new(),
            listed: Vec::new(),
            expected: Vec::new(),
            scratch: Vec::new(),
            parked: Vec::new(),
            maps: StackMaps::new(),
            zombie_leader: false,
        })
    }

    /// The stop signal.
    pub fn signal(&self) -> i32 {
        self.sig
    }

    /// Look-up of the mappings (prepared by [`prepare`](Self::prepare)); for threads that are
    /// not stopped, whose stacks are read through copies.
    pub fn maps(&self) -> &StackMaps {
        &self.maps
    }

    /// How many threads a stop can hold without [`prepare`](Self::prepare) again.
    pub fn capacity(&self) -> usize {
        self.array.map_or(0, |a| a.slots.len())
    }

    /// Sizes every buffer a stop needs for the current number of threads plus a margin, and
    /// for the current memory map. Allocates: call it before [`stop`](Self::stop), and again
    /// when `stop` returns [`StopError::PrepareAgain`].
    pub fn prepare(&mut self) -> io::Result<()> {
        let threads = threads::list()?.len();
        let capacity = threads * 2 + SLOT_MARGIN;
        if self.capacity() < capacity {
            let array = SlotArray::leak(capacity);
            // The old array (if any) is leaked: a late handler may still hold it.
            CURRENT.store(std::ptr::from_ref(array).cast_mut(), Ordering::Release);
            self.array = Some(array);
        }
        let capacity = self.capacity();
        self.dirents.resize(DIRENT_BUF, 0);
        self.listed.resize(capacity, 0);
        reserve_exact(&mut self.expected, capacity);
        reserve_exact(&mut self.scratch, capacity);
        reserve_exact(&mut self.parked, capacity);
        self.maps.reserve()
    }

    /// Stops every other thread of the process, within `timeout`. Allocates nothing, takes no
    /// lock, prints nothing. On any error all threads run again.
    pub fn stop(&mut self, timeout: Duration) -> Result<Stopped<'_>, StopError> {
        self.stop_selected(None, timeout)
    }

    /// Stops only the threads `tids` (the threads found running; threads that wait in a system
    /// call are left alone), within `timeout`. Threads that exit meanwhile are dropped. Allocates
    /// nothing, takes no lock, prints nothing. On any error all threads run again.
    pub fn stop_threads(
        &mut self,
        tids: &[i32],
        timeout: Duration,
    ) -> Result<Stopped<'_>, StopError> {
        self.stop_selected(Some(tids), timeout)
    }

    fn stop_selected(
        &mut self,
        only: Option<&[i32]>,
        timeout: Duration,
    ) -> Result<Stopped<'_>, StopError> {
        let array = match self.array {
            Some(a) if std::ptr::eq(CURRENT.load(Ordering::Acquire), a) => a,
            _ => {
                return Err(StopError::PrepareAgain {
                    what: "thread slots",
                });
            }
        };
        // The program may have replaced our handler since: then threads would never park.
        match signal::disposition(self.sig) {
            Ok(Disposition::Handler { addr, .. }) if addr == park as *const () as usize => {}
            Ok(Disposition::Handler { addr, .. }) => {
                return Err(StopError::SignalInUse {
                    sig: self.sig,
                    handler: addr,
                });
            }
            Ok(_) => return Err(StopError::SignalIgnored { sig: self.sig }),
            Err(source) => {
                return Err(StopError::Install {
                    sig: self.sig,
                    source,
                });
            }
        }
        let deadline = Instant::now() + timeout;
        let round = next_round();
        let me = threads::gettid();
        array.stopper.store(me, Ordering::Relaxed);
        array.expected.store(u32::MAX, Ordering::Relaxed);
        array.parked.store(0, Ordering::Relaxed);
        array.state.store(u64::from(round) << 32, Ordering::Release);
        self.expected.clear();
        self.parked.clear();
        let stopped = match only {
            None => self.stop_round(array, round, me, deadline, timeout),
            Some(tids) => self.stop_listed(array, round, tids, deadline, timeout),
        };
        match stopped {
            Ok(()) => Ok(Stopped {
                world: self,
                round,
                resumed: false,
            }),
            Err(e) => {
                self.end_round(round);
                Err(e)
            }
        }
    }

    fn stop_round(
        &mut self,
        array: &'static SlotArray,
        round: u32,
        me: i32,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), StopError> {
        loop {
            let (listed, added) = self.signal_listed(me)?;
            array
                .expected
                .store(self.expected.len() as u32, Ordering::Release);
            self.wait_parked(array, round, deadline, timeout)?;
            let counted = threads::count().map_err(StopError::ListThreads)?;
            let now = Listing {
                counted,
                parked: self.scratch.len(),
                zombie_leader: self.zombie_leader,
                listed,
                added,
            };
            match now.next() {
                NextStep::Done => break,
                NextStep::ListAgain => {}
                NextStep::AwaitExits => {
                    if Instant::now() >= deadline {
                        return Err(StopError::Unsettled { listed, counted });
                    }
                    dsu_sys::raw::yield_now();
                }
            }
        }
        self.collect(array, round)?;
        self.refresh_maps()
    }

    /// A round for the given threads only: signal each, wait until each has parked or exited.
    fn stop_listed(
        &mut self,
        array: &'static SlotArray,
        round: u32,
        tids: &[i32],
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), StopError> {
        for &tid in tids {
            self.signal_one(tid)?;
        }
        self.expected.sort_unstable();
        array
            .expected
            .store(self.expected.len() as u32, Ordering::Release);
        self.wait_parked(array, round, deadline, timeout)?;
        self.collect(array, round)?;
        self.refresh_maps()
    }

    /// Reads the memory map again while every parked thread is held, so the checks bound
    /// each stack read by the mappings as they are now (a no-op where `PROCMAP_QUERY` answers
    /// each question from the live map).
    fn refresh_maps(&mut self) -> Result<(), StopError> {
        self.maps.refresh().map_err(|e| {
            if e.raw_os_error() == Some(threads::CAPACITY_EXCEEDED) {
                StopError::PrepareAgain { what: "memory map" }
            } else {
                StopError::Maps(e)
            }
        })
    }

    /// Sends the stop signal to `tid` and expects it to park; a thread that has exited is
    /// skipped.
    fn signal_one(&mut self, tid: i32) -> Result<(), StopError> {
        match threads::tgkill(tid, self.sig) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
            // A real-time signal takes a queue entry, counted against the user's limit.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                return Err(StopError::SignalQueueFull { tid, sig: self.sig });
            }
            Err(source) => return Err(StopError::Signal { tid, source }),
        }
        if self.expected.len() == self.expected.capacity() {
            return Err(StopError::PrepareAgain {
                what: "thread slots",
            });
        }
        self.expected.push(tid);
        Ok(())
    }

    /// Lists the threads and signals those not signalled yet in this round; returns how many
    /// were listed and how many signalled.
    fn signal_listed(&mut self, me: i32) -> Result<(usize, usize), StopError> {
        let n = threads::list_into(&mut self.dirents, &mut self.listed).map_err(|e| {
            if e.raw_os_error() == Some(threads::CAPACITY_EXCEEDED) {
                StopError::PrepareAgain {
                    what: "thread list",
                }
            } else {
                StopError::ListThreads(e)
            }
        })?;
        let before = self.expected.len();
        let pid = threads::getpid();
        for i in 0..n {
            let tid = self.listed[i];
            if tid == me
                || (tid == pid && self.zombie_leader)
                || self.expected[..before].binary_search(&tid).is_ok()
            {
                continue;
            }
            self.signal_one(tid)?;
        }
        self.expected.sort_unstable();
        Ok((n, self.expected.len() - before))
    }

    /// Waits until every expected thread has a slot tagged `round`, dropping threads that
    /// exited meanwhile. Leaves the parked tids, sorted, in `scratch`.
    fn wait_parked(
        &mut self,
        array: &'static SlotArray,
        round: u32,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), StopError> {
        loop {
            let seen = array.parked.load(Ordering::Acquire);
            let claimed = array.state.load(Ordering::Acquire) as u32 as usize;
            if claimed > array.slots.len() {
                return Err(StopError::PrepareAgain {
                    what: "thread slots",
                });
            }
            self.scratch.clear();
            for slot in &array.slots[..claimed] {
                let tag = slot.tag.load(Ordering::Acquire);
                if tag_round(tag) == round {
                    // Within capacity: at most `claimed <= slots.len()` pushes.
                    self.scratch.push(tag_tid(tag));
                }
            }
            self.scratch.sort_unstable();
            let missing = self
                .expected
                .iter()
                .position(|t| self.scratch.binary_search(t).is_err());
            let Some(first_missing) = missing else {
                return Ok(());
            };
            let now = Instant::now();
            let slice = deadline.saturating_duration_since(now).min(LIVENESS_SLICE);
            let woken = !slice.is_zero()
                && futex::wait(&array.parked, seen, Some(slice)).ok()
                    != Some(futex::Wake::TimedOut);
            if !woken {
                let blocked = self.drop_exited(array, round, first_missing);
                array
                    .expected
                    .store(self.expected.len() as u32, Ordering::Release);
                if let Some(tid) = blocked {
                    return Err(StopError::SignalBlocked { tid, sig: self.sig });
                }
                if Instant::now() >= deadline {
                    // Re-check once: the last parker may have arrived with the deadline.
                    if let Some(tid) = self.first_unparked(array, round) {
                        return Err(StopError::NotParked {
                            tid,
                            waited: timeout,
                        });
                    }
                }
            }
        }
    }

    /// The first expected thread without a slot in `round`, if any.
    fn first_unparked(&self, array: &SlotArray, round: u32) -> Option<i32> {
        self.expected
            .iter()
            .copied()
            .find(|&tid| !parked_in(array, round, tid))
    }

    /// Removes from `expected[from..]` the unparked threads that exited (gone, or a zombie
    /// group leader), and returns the first of the others that sleeps in the kernel with the
    /// stop signal blocked. Such a thread cannot park until it unblocks the signal, which it
    /// may not do while the parked threads hold what it waits for: a thread leaving through
    /// the C library blocks every signal, then takes the lock of the stack cache, which a
    /// parked thread creating a thread may hold. Waiting longer cannot help; the caller gives
    /// the round up. `scratch` holds the tids parked when the wait began, sorted.
    fn drop_exited(&mut self, array: &SlotArray, round: u32, from: usize) -> Option<i32> {
        let pid = threads::getpid();
        let mut blocked = None;
        let mut i = from;
        while i < self.expected.len() {
            let tid = self.expected[i];
            if self.scratch.binary_search(&tid).is_ok() {
                i += 1;
                continue;
            }
            let (gone, sleeping) = match threads::state(tid) {
                Ok(None) | Ok(Some(b'Z' | b'X')) => (true, false),
                Ok(Some(state)) => (false, state == b'S'),
                Err(_) => (threads::tgkill(tid, 0).is_err(), false),
            };
            if gone {
                if tid == pid {
                    self.zombie_leader = true;
                }
                self.expected.remove(i);
            } else {
                // A thread still leaving an earlier round's handler blocks the signal too,
                // but it runs; one in an uninterruptible wait (`D`: the kernel's own locks,
                // which no parked thread holds) goes on by itself. Only a sleeper is given up
                // on, and not one that has parked since `scratch` was taken: it sleeps in the
                // handler, every signal blocked, its slot tagged before it slept.
                if sleeping
                    && blocked.is_none()
                    && matches!(tasks::blocks_signal(tid, self.sig), Ok(Some(true)))
                    && !parked_in(array, round, tid)
                {
                    blocked = Some(tid);
                }
                i += 1;
            }
        }
        blocked
    }

    /// Copies the slots tagged `round` into `parked`.
    fn collect(&mut self, array: &SlotArray, round: u32) -> Result<(), StopError> {
        let claimed = array.state.load(Ordering::Acquire) as u32 as usize;
        if claimed > array.slots.len() {
            return Err(StopError::PrepareAgain {
                what: "thread slots",
            });
        }
        for slot in &array.slots[..claimed] {
            let tag = slot.tag.load(Ordering::Acquire);
            if tag_round(tag) != round {
                continue; // claimed by a late thread still writing: not one we wait for
            }
            // SAFETY: the tag shows the writer of this round finished (Acquire pairs with its
            // Release store); it writes nothing more until the round ends.
            let data = unsafe { &*slot.data.get() };
            let alt = data.alt.enabled().then_some(data.alt);
            if self.parked.len() == self.parked.capacity() {
                return Err(StopError::PrepareAgain {
                    what: "thread slots",
                });
            }
            self.parked.push(ParkedThread {
                tid: tag_tid(tag),
                regs: Registers::from_gregs(&data.gregs),
                alt_stack: alt,
                thread_pointer: data.thread_pointer,
            });
        }
        Ok(())
    }

    /// Closes `round` and releases every thread parked in it. Retires the slot array when a
    /// claimed slot was not written yet (a handler still holds it).
    fn end_round(&mut self, round: u32) {
        let Some(array) = self.array else { return };
        let prev = array.state.swap(0, Ordering::AcqRel);
        let in_flight = array.claim_unwritten(prev as u32 as usize, round);
        RELEASED.store(round, Ordering::Release);
        let _ = futex::wake_all(&RELEASED);
        if in_flight {
            CURRENT.store(std::ptr::null_mut(), Ordering::Release);
            self.array = None;
        }
    }
}

impl Drop for StopWorld {
    fn drop(&mut self) {
        OWNED.store(false, Ordering::Release);
    }
}

fn reserve_exact<T>(v: &mut Vec<T>, capacity: usize) {
    v.clear();
    if v.capacity() < capacity {
        v.reserve_exact(capacity);
    }
}

/// Whether `tid` has a slot tagged `round` in `array`.
fn parked_in(array: &SlotArray, round: u32, tid: i32) -> bool {
    let claimed = (array.state.load(Ordering::Acquire) as u32 as usize).min(array.slots.len());
    array.slots[..claimed].iter().any(|s| {
        let tag = s.tag.load(Ordering::Acquire);
        tag_round(tag) == round && tag_tid(tag) == tid
    })
}

/// Where the stop that parks every thread stands once the threads of a listing have parked.
#[derive(Debug, Clone, Copy)]
struct Listing {
    /// Threads in the process now (exiting ones are counted until reaped).
    counted: usize,
    /// Threads parked in the round.
    parked: usize,
    /// Whether the main thread is a zombie (it left with `pthread_exit`): never parks.
    zombie_leader: bool,
    /// Threads the last listing named.
    listed: usize,
    /// Threads it named that were not signalled before.
    added: usize,
}

/// What the stop does after a [`Listing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NextStep {
    /// Every thread is stopped.
    Done,
    /// New threads were signalled: list again for threads they started meanwhile.
    ListAgain,
    /// Threads are counted that no listing named: exiting ones, or ones a listing cut short
    /// missed. Let exiting threads finish, then list again.
    AwaitExits,
}

impl Listing {
    fn next(self) -> NextStep {
        // Every live thread is the caller, parked, or a zombie leader.
        if self.counted == 1 + self.parked + usize::from(self.zombie_leader) {
            return NextStep::Done;
        }
        if self.added != 0 {
            return NextStep::ListAgain;
        }
        // A listing is cut short when a thread exits while the kernel walks the list:
        // "nothing new" counts only from a listing as long as the thread count, and then the
        // threads neither parked nor the caller are exiting ones.
        if self.listed == self.counted {
            NextStep::Done
        } else {
            NextStep::AwaitExits
        }
    }
}

fn next_round() -> u32 {
    loop {
        let r = ROUND.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        // 0 means "no round"; after a wrap a number must still be newer than the last release.
        if r != 0 && !released(r) {
            return r;
        }
    }
}

/// Bounds of the stack `sp` points into: the alternate signal stack when `sp` is on it, else
/// the readable mapping containing `sp` (or ending at it: an empty stack), clipped to the
/// declared stack holding `sp` if any (a coroutine's, see [`crate::stacks`]). Allocates
/// nothing, takes no lock.
pub fn stack_bounds(maps: &StackMaps, sp: usize, alt: Option<AltStack>) -> Option<StackBounds> {
    let region = maps
        .find(sp)
        .or_else(|| maps.find(sp.wrapping_sub(1)))
        .filter(|r| r.readable)?;
    let (mut start, mut end) = (region.start, region.end);
    if let Some(alt) = alt.filter(|a| a.contains(sp) || a.base + a.size == sp) {
        start = start.max(alt.base);
        end = end.min(alt.base + alt.size);
    }
    if let Some(s) =
        crate::stacks::containing(sp).or_else(|| crate::stacks::containing(sp.wrapping_sub(1)))
    {
        start = start.max(s.lo);
        end = end.min(s.hi);
    }
    Some(StackBounds { start, end })
}

/// The world while stopped. Dropping it resumes the threads.
#[derive(Debug)]
pub struct Stopped<'w> {
    world: &'w mut StopWorld,
    round: u32,
    resumed: bool,
}

impl Stopped<'_> {
    /// Every parked thread (all threads of the process but the caller).
    pub fn threads(&self) -> &[ParkedThread] {
        &self.world.parked
    }

    /// Look-up of the mappings as they are while stopped.
    pub fn maps(&self) -> &StackMaps {
        &self.world.maps
    }

    /// The round number (unique for the life of the process).
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Lets every parked thread run again.
    pub fn resume(mut self) {
        self.resume_now();
    }

    fn resume_now(&mut self) {
        if !self.resumed {
            self.resumed = true;
            self.world.end_round(self.round);
        }
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.resume_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(counted: usize, parked: usize, listed: usize, added: usize) -> Listing {
        Listing {
            counted,
            parked,
            zombie_leader: false,
            listed,
            added,
        }
    }

    #[test]
    fn the_stop_ends_when_every_counted_thread_is_the_caller_or_parked() {
        assert_eq!(listing(5, 4, 5, 0).next(), NextStep::Done);
        // Even right after signalling new threads: they are parked already.
        assert_eq!(listing(5, 4, 5, 2).next(), NextStep::Done);
        // A zombie main thread is counted but never parks.
        let zombie = Listing {
            zombie_leader: true,
            ..listing(5, 3, 4, 0)
        };
        assert_eq!(zombie.next(), NextStep::Done);
        let alive = Listing {
            zombie_leader: false,
            ..zombie
        };
        assert_eq!(alive.next(), NextStep::AwaitExits);
    }

    #[test]
    fn new_threads_mean_another_listing() {
        assert_eq!(listing(9, 4, 9, 3).next(), NextStep::ListAgain);
        assert_eq!(listing(9, 4, 7, 1).next(), NextStep::ListAgain);
    }

    #[test]
    fn a_listing_cut_short_is_not_taken_as_complete() {
        // Nothing new in a listing as long as the count: the rest are exiting threads.
        assert_eq!(listing(9, 6, 9, 0).next(), NextStep::Done);
        // Shorter than the count: a thread exiting during the walk can hide one created
        // meanwhile, which would run unparked.
        assert_eq!(listing(9, 6, 8, 0).next(), NextStep::AwaitExits);
        assert_eq!(listing(9, 6, 0, 0).next(), NextStep::AwaitExits);
    }

    #[test]
    fn a_slot_claimed_but_not_yet_tagged_keeps_the_array_from_reuse() {
        let array = SlotArray::leak(4);
        let tag = |i: usize, round: u64, tid: u64| {
            array.slots[i]
                .tag
                .store(round << 32 | tid, Ordering::Release)
        };
        tag(0, 7, 100);
        tag(1, 7, 101);
        assert!(!array.claim_unwritten(0, 7));
        assert!(!array.claim_unwritten(2, 7), "both claims written");
        assert!(
            array.claim_unwritten(3, 7),
            "the third slot is not written yet"
        );
        tag(2, 6, 102);
        assert!(array.claim_unwritten(3, 7), "written in an earlier round");
        tag(2, 7, 102);
        tag(3, 7, 103);
        assert!(!array.claim_unwritten(4, 7));
        // More claims than slots: only the slots count.
        assert!(!array.claim_unwritten(9, 7));
        assert!(array.claim_unwritten(9, 8));
    }
}
