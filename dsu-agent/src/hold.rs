//! Breakpoint holds: how code is rewritten while threads that wait in system calls keep
//! running (the sequence of the Linux kernel's `text_poke_bp`).
//!
//! Threads blocked in a system call are not stopped during an update: a signal would make
//! their `poll`, `epoll_wait` or `nanosleep` return early. Any of them may wake up while code
//! is being written, so every edit goes in three steps, with all cores resynchronised after
//! each ([`crate::write`]):
//!
//! 1. an `int3` replaces the first byte of every edit: a thread that reaches an edit site from
//!    now on traps into the handler (`on_trap`), which holds it there;
//! 2. the other bytes of every edit are written (no thread can be executing them: the first
//!    byte traps, and the activeness check showed that no thread was inside);
//! 3. the first bytes are written, then the window is closed and the held threads resume at
//!    the site, where they execute the complete new instruction (or, when the update was
//!    abandoned, the original one).
//!
//! The handler recognises its own breakpoints by address: every site ever used is recorded in
//! `SITES` (a trap whose byte has meanwhile been restored re-executes the site), and a trap
//! at a site that still holds `int3` while a window is open waits for that window. Anything
//! else (a breakpoint of the program's own, a `SIGTRAP` sent by someone) goes to the handler
//! that was installed before ours, or gets the default action.
//!
//! Each held thread leaves a record `(tid, pc, sp)` of the trap, so that the activeness check
//! knows that the signal frame it finds on that thread's stack is a hold at a site, not an
//! execution of the function ([`Holds::is_hold`]).
//!
//! A thread that blocks `SIGTRAP` cannot be held this way: the kernel kills a process whose
//! thread hits a breakpoint with `SIGTRAP` blocked. Such a thread is only at risk if it wakes
//! during the window (microseconds) and runs exactly the code being changed; `docs/design.md`
//! says so.
//!
//! The handler is *async-signal-safe*: atomics, the preallocated tables, raw `futex`,
//! `tgkill`, `sigaction` and the code writer's raw `pwrite` only. It never blocks the stop
//! signal, so a held thread can still be parked and checked, and it runs on the thread's own
//! stack (two nested handlers do not fit on a small alternate stack). A held thread waits at
//! most the attempt's bound: then it gives the attempt up, puts the original first bytes back
//! and goes on ([`crate::gate`]). A child forked while a window is open gets the original
//! bytes of every edit back at once (`pthread_atfork`), since no agent thread will close the
//! window there.
//!
//! Unsafe code is allowed here: this module installs the `SIGTRAP` handler, reads and changes
//! the trapped context, and calls the previous handler; every block states its invariant.

#![allow(unsafe_code)]

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use dsu_sys::code::CodeWriter;
use dsu_sys::futex;
use dsu_sys::signal::{self, BlockDuring, Disposition, SavedAction, SavedErrno};
use dsu_sys::threads;

use crate::gate;
use crate::write::CodeEdit;

/// `int3`.
pub const BREAKPOINT: u8 = 0xcc;
/// Held threads recorded at once; more are still held, but checked as if active.
const HOLD_SLOTS: usize = 256;
/// `si_code` of a breakpoint trap on x86_64.
const SI_KERNEL: i32 = 0x80;

/// Every site a window has ever used, sorted. Replaced (the old one leaked, a late handler may
/// still read it) when a window adds new sites.
struct SiteTable {
    sites: Box<[usize]>,
}

static SITES: AtomicPtr<SiteTable> = AtomicPtr::new(std::ptr::null_mut());
/// `(generation << 1) | open` of the latest window, in one word so that the handler can tell
/// from two reads around its look at the code that no window opened or closed in between.
static STATE: AtomicU64 = AtomicU64::new(0);
/// The last closed window's generation: held threads sleep on it.
static CLOSED: AtomicU32 = AtomicU32::new(0);
/// Last generation handed out (windows are opened by the agent thread only).
static GENERATION: AtomicU32 = AtomicU32::new(0);
/// The handler before ours, to chain to.
static PREVIOUS: OnceLock<SavedAction> = OnceLock::new();

/// One held thread: `tid` (0 when free), and the trap's pc (the byte after the site) and sp.
struct HoldSlot {
    tid: AtomicU32,
    pc: AtomicU64,
    sp: AtomicU64,
    /// The held thread's thread pointer (see [`Holds::thread_pointer`]).
    tp: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: HoldSlot = HoldSlot {
    tid: AtomicU32::new(0),
    pc: AtomicU64::new(0),
    sp: AtomicU64::new(0),
    tp: AtomicU64::new(0),
};
static HELD: [HoldSlot; HOLD_SLOTS] = [FREE; HOLD_SLOTS];

/// Why the breakpoint handler could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("installing the SIGTRAP handler that holds threads at breakpoints: {0}")]
    Install(io::Error),
}

/// Installs the `SIGTRAP` handler (once per process), chaining to the one installed before.
/// `stop_signal` stays deliverable inside it.
pub fn install(stop_signal: i32) -> Result<(), HoldError> {
    static INSTALL: parking_lot::Mutex<bool> = parking_lot::Mutex::new(false);
    let mut done = INSTALL.lock();
    if *done {
        return Ok(());
    }
    // On the thread's own stack: a held thread waits in the handler and may be parked there
    // by the stop signal, whose handler runs on the alternate stack; both nested frames did not
    // fit in a small alternate stack (a stack overflow, seen in debug builds).
    // SAFETY: `on_trap` is async-signal-safe (module documentation) and passes every trap
    // that is not ours to the previous action, saved first.
    let previous = unsafe {
        signal::install_on_thread_stack(
            libc::SIGTRAP,
            on_trap,
            BlockDuring::EverythingBut(stop_signal),
        )
    }
    .map_err(HoldError::Install)?;
    let _ = PREVIOUS.set(previous);
    AGENT_PID.store(threads::getpid() as u32, Ordering::SeqCst);
    // SAFETY: `restore_in_child` is async-signal-safe (raw system calls and atomics only), as a
    // handler run in a child of a multi-threaded process must be.
    let rc = unsafe { libc::pthread_atfork(None, None, Some(restore_in_child)) };
    if rc != 0 {
        return Err(HoldError::Install(io::Error::from_raw_os_error(rc)));
    }
    *done = true;
    Ok(())
}

/// The process the agent runs in. A forked child has a copy of the open window (its
/// breakpoints, maybe half-written new code) but no agent thread to finish it, and a copy of
/// the code writer's descriptor, which still writes into the parent.
static AGENT_PID: AtomicU32 = AtomicU32::new(0);

/// In a child forked while a window was open: puts back the whole original bytes of every edit,
/// through the child's own `/proc/self/mem`, and closes the window, so the child runs the old
/// code throughout. Runs from `pthread_atfork` (and from the trap handler for a child made
/// without it). *Async-signal-safe*: raw system calls and atomics only.
extern "C" fn restore_in_child() {
    if STATE.load(Ordering::SeqCst) & 1 == 0 {
        return;
    }
    let edits = EDITS.load(Ordering::SeqCst);
    let len = EDITS_LEN.load(Ordering::SeqCst) as usize;
    if !edits.is_null() && len > 0 {
        // SAFETY: published by `Window::open` from a live slice; the child's copy of the parent's
        // memory holds it unchanged (the agent thread that owned it does not exist here).
        let edits = unsafe { std::slice::from_raw_parts(edits, len) };
        // SAFETY: every edit's site is in this process's code (the child's copy of it), and
        // the child's only thread is here, not running those bytes.
        let _ = unsafe {
            dsu_sys::code::write_through_fresh_proc_mem(
                edits.iter().map(|e| (e.site, e.original.as_slice())),
            )
        };
    }
    let generation = (STATE.load(Ordering::SeqCst) >> 1) as u32;
    STATE.store(u64::from(generation) << 1, Ordering::SeqCst);
    CLOSED.store(generation, Ordering::SeqCst);
    EDITS_LEN.store(0, Ordering::SeqCst);
    OWNER.store(0, Ordering::SeqCst);
    gate::forget_in_child();
}

/// Whether this is a child forked from the agent's process.
fn in_child() -> bool {
    let agent = AGENT_PID.load(Ordering::SeqCst);
    agent != 0 && agent != threads::getpid() as u32
}

/// Whether our handler is the one installed now (a program may replace it; then no window may
/// be opened, and updates stop every thread instead).
pub fn installed() -> bool {
    PREVIOUS.get().is_some()
        && matches!(
            signal::disposition(libc::SIGTRAP),
            Ok(Disposition::Handler { addr, .. }) if addr == on_trap as *const () as usize
        )
}

/// Records `sites` as breakpoint sites. Allocates: call before the window opens.
pub fn register_sites(sites: impl IntoIterator<Item = usize>) {
    let current = SITES.load(Ordering::Acquire);
    let mut all: Vec<usize> = if current.is_null() {
        Vec::new()
    } else {
        // SAFETY: site tables are leaked, never freed: a non-null pointer stays valid.
        unsafe { &*current }.sites.to_vec()
    };
    let before = all.len();
    all.extend(sites);
    all.sort_unstable();
    all.dedup();
    if all.len() == before {
        return;
    }
    let table = Box::leak(Box::new(SiteTable {
        sites: all.into_boxed_slice(),
    }));
    SITES.store(table, Ordering::Release);
}

fn known_site(site: usize) -> bool {
    let table = SITES.load(Ordering::Acquire);
    // SAFETY: site tables are leaked, never freed: a non-null pointer stays valid.
    !table.is_null() && unsafe { &*table }.sites.binary_search(&site).is_ok()
}

/// The thread that opened the current window (the agent's), and what it is writing: if that
/// thread itself reaches one of its breakpoints (a C library function it calls while
/// checking, such as `memcpy`, is being patched), holding it would deadlock, so the handler
/// puts the original first bytes back, marks the window, and lets it go on.
static OWNER: AtomicU32 = AtomicU32::new(0);
static WRITER: AtomicPtr<CodeWriter> = AtomicPtr::new(std::ptr::null_mut());
static EDITS: AtomicPtr<CodeEdit> = AtomicPtr::new(std::ptr::null_mut());
static EDITS_LEN: AtomicU64 = AtomicU64::new(0);
/// The site the owner trapped at (0: none) in the current window.
static OWNER_TRAPPED: AtomicU64 = AtomicU64::new(0);

/// An open breakpoint window. Closing it (explicitly or on drop) releases every held thread.
/// Opening and closing allocate nothing: both run while threads are held.
#[derive(Debug)]
pub struct Window<'a> {
    generation: u32,
    closed: bool,
    _edits: std::marker::PhantomData<&'a [CodeEdit]>,
}

impl<'a> Window<'a> {
    /// Opens a window for `edits`, written with `writer` by the calling thread: from now on
    /// a thread that traps at a registered site waits.
    pub fn open(writer: &'a CodeWriter, edits: &'a [CodeEdit]) -> Window<'a> {
        OWNER.store(threads::gettid() as u32, Ordering::SeqCst);
        WRITER.store(std::ptr::from_ref(writer).cast_mut(), Ordering::SeqCst);
        EDITS.store(edits.as_ptr().cast_mut(), Ordering::SeqCst);
        EDITS_LEN.store(edits.len() as u64, Ordering::SeqCst);
        OWNER_TRAPPED.store(0, Ordering::SeqCst);
        let mut generation = GENERATION.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        if generation == 0 {
            generation = GENERATION.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        }
        STATE.store(u64::from(generation) << 1 | 1, Ordering::SeqCst);
        Window {
            generation,
            closed: false,
            _edits: std::marker::PhantomData,
        }
    }

    /// The site at which the window's own thread trapped, if it did: its breakpoints were
    /// then removed and the attempt must be given up (the agent cannot patch what it runs).
    pub fn owner_trapped(&self) -> Option<usize> {
        match OWNER_TRAPPED.load(Ordering::SeqCst) {
            0 => None,
            site => Some(site as usize),
        }
    }

    /// Releases the held threads; they resume at their site, whose bytes must be complete
    /// (written and cores synchronised) by now.
    pub fn close(mut self) {
        self.close_now();
    }

    fn close_now(&mut self) {
        if !self.closed {
            self.closed = true;
            STATE.store(u64::from(self.generation) << 1, Ordering::SeqCst);
            OWNER.store(0, Ordering::SeqCst);
            EDITS_LEN.store(0, Ordering::SeqCst);
            CLOSED.store(self.generation, Ordering::Release);
            let _ = futex::wake_all(&CLOSED);
        }
    }
}

impl Drop for Window<'_> {
    fn drop(&mut self) {
        self.close_now();
    }
}

/// The held threads as recorded now. Reads only atomics: usable while threads are held.
#[derive(Debug, Clone, Copy, Default)]
pub struct Holds;

impl Holds {
    /// Whether a signal frame of thread `tid` that interrupted it at `pc` with stack pointer
    /// `sp` is one of our holds: the thread trapped at the site `pc - 1` and has not executed
    /// it.
    pub fn is_hold(&self, tid: i32, pc: u64, sp: u64) -> bool {
        HELD.iter().any(|slot| {
            slot.tid.load(Ordering::Acquire) == tid as u32
                && slot.pc.load(Ordering::Acquire) == pc
                && slot.sp.load(Ordering::Acquire) == sp
        })
    }

    /// The thread pointer of thread `tid` when it is held now: it tells the thread's own stack
    /// (see [`crate::update`]'s check for threads on foreign stacks).
    pub fn thread_pointer(&self, tid: i32) -> Option<usize> {
        HELD.iter()
            .find(|slot| slot.tid.load(Ordering::Acquire) == tid as u32)
            .map(|slot| slot.tp.load(Ordering::Acquire) as usize)
    }

    /// How many threads are held now.
    pub fn count(&self) -> usize {
        HELD.iter()
            .filter(|s| s.tid.load(Ordering::Acquire) != 0)
            .count()
    }
}

/// The `SIGTRAP` handler. *Async-signal-safe*.
extern "C" fn on_trap(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // No C library call before the hold, not even `__errno_location`: it may be the code
    // being patched, and a breakpoint hit in here (SIGTRAP blocked) would kill the process.
    // Raw system calls leave `errno` alone; `chain` saves it.
    if info.is_null() || uc.is_null() {
        return chain(sig, info, uc);
    }
    // SAFETY: the kernel passes a valid siginfo to a SA_SIGINFO handler (non-null: checked).
    let code = unsafe { (*info).si_code };
    let uc = uc.cast::<libc::ucontext_t>();
    // SAFETY: `uc` is the live context the kernel passed (non-null: checked).
    let (pc, sp) = unsafe { signal::ucontext_pc_sp(uc) };
    let site = pc.wrapping_sub(1) as usize;
    if code != SI_KERNEL || !known_site(site) {
        return chain(sig, info, uc.cast());
    }
    if in_child() {
        // Forked without the fork handlers (a raw `clone`): restore here, never through the
        // parent's writer.
        restore_in_child();
    }
    if STATE.load(Ordering::SeqCst) & 1 == 1
        && OWNER.load(Ordering::SeqCst) == threads::gettid() as u32
    {
        // SAFETY: the window's edits and writer are published by `Window::open` and live
        // until the window closes, which this very thread does later.
        unsafe { owner_trapped(site) };
        // SAFETY: `uc` is this handler's live context; the original byte is back at `site`.
        unsafe { signal::set_ucontext_pc(uc, site as u64) };
        return;
    }
    // The breakpoint may belong to a window that is still open (hold until it closes), to
    // one that has closed since (the byte is restored: execute it), or to the next window,
    // opened while this thread waited for the CPU (hold again). Only an `int3` with no window
    // open, and no window opened or closed while it was read, is not ours.
    loop {
        let before = STATE.load(Ordering::SeqCst);
        // SAFETY: `site` is the byte the thread just executed as `int3`: mapped and readable.
        let byte = unsafe { std::ptr::read_volatile(site as *const u8) };
        let after = STATE.load(Ordering::SeqCst);
        if byte != BREAKPOINT {
            break;
        }
        if after & 1 == 1 {
            hold_until_closed((after >> 1) as u32, pc, sp);
            continue;
        }
        if before == after {
            return chain(sig, info, uc.cast());
        }
    }
    // The site holds a complete instruction again: execute it.
    // SAFETY: `uc` is this handler's live context; `site` is the start of the instruction the
    // breakpoint replaced (a registered edit site).
    unsafe { signal::set_ucontext_pc(uc, site as u64) };
}

/// The window's own thread trapped at `site`: put every original first byte back (no thread
/// can be past a breakpoint: the tails are written only after the checks, by this thread,
/// which calls no C library function then), resynchronise, and mark the window.
///
/// # Safety
/// Called on the window's owner thread while its window is open.
unsafe fn owner_trapped(site: usize) {
    // SAFETY: forwarded from this function's contract.
    unsafe { restore_first_bytes() };
    OWNER_TRAPPED.store(site as u64, Ordering::SeqCst);
}

/// Puts the original first byte of every edit of the open window back and resynchronises the
/// cores. No thread can be past a breakpoint: the tails are written only after the checks and
/// the commit, which neither an owner trap nor a given-up attempt lets happen.
///
/// # Safety
/// A window is open (its edits and writer are published and outlive it), and its agent will
/// not write new code (its thread trapped, or the attempt was given up).
unsafe fn restore_first_bytes() {
    let writer = WRITER.load(Ordering::SeqCst);
    let edits = EDITS.load(Ordering::SeqCst);
    let len = EDITS_LEN.load(Ordering::SeqCst) as usize;
    if !writer.is_null() && !edits.is_null() {
        // SAFETY: published by `Window::open` from live references that outlive the window.
        let (writer, edits) = unsafe { (&*writer, std::slice::from_raw_parts(edits, len)) };
        for edit in edits {
            if let Some(&first) = edit.original.first() {
                // SAFETY: the original byte of an edit site, which a breakpoint replaced.
                let _ = unsafe { writer.write(edit.site, &[first]) };
            }
        }
        let _ = dsu_sys::cpu::sync_cores();
    }
}

/// Waits until window `generation` is closed, recorded as a hold of `(pc, sp)` meanwhile.
/// Bounded: once the attempt's bound has passed (or another thread gave the attempt up), the
/// thread gives the attempt up, puts back every original first byte and goes on, unless the
/// agent has committed to writing ([`crate::gate`]).
fn hold_until_closed(generation: u32, pc: u64, sp: u64) {
    let slot = claim_slot(pc, sp);
    let mut left = gate::bound_slices();
    loop {
        let seen = CLOSED.load(Ordering::Acquire);
        if (seen.wrapping_sub(generation) as i32) >= 0 {
            break;
        }
        if (gate::abandoned() || left == Some(0)) && gate::give_up(threads::gettid()) {
            // SAFETY: a window is open (`generation` is not closed), so its edits and writer
            // are published and live; the attempt is abandoned, so the agent writes no tail or
            // new first byte any more.
            unsafe { restore_first_bytes() };
            break;
        }
        let woke = futex::wait(&CLOSED, seen, Some(gate::SLICE));
        left = gate::after_wait(left, matches!(woke, Ok(futex::Wake::TimedOut)));
    }
    if let Some(slot) = slot {
        slot.tid.store(0, Ordering::Release);
    }
}

fn claim_slot(pc: u64, sp: u64) -> Option<&'static HoldSlot> {
    let tid = threads::gettid() as u32;
    for slot in &HELD {
        if slot
            .tid
            .compare_exchange(0, u32::MAX, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            slot.pc.store(pc, Ordering::Release);
            slot.sp.store(sp, Ordering::Release);
            slot.tp
                .store(threads::thread_pointer() as u64, Ordering::Release);
            slot.tid.store(tid, Ordering::Release);
            return Some(slot);
        }
    }
    None
}

/// Hands a trap that is not ours to the action installed before ours. *Async-signal-safe*.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    let _errno = SavedErrno::save();
    match PREVIOUS.get().map(SavedAction::disposition) {
        Some(Disposition::Handler { addr, flags, .. }) => {
            if flags & libc::SA_SIGINFO != 0 {
                // SAFETY: `addr` is the SA_SIGINFO handler the program installed for SIGTRAP;
                // it is called as the kernel would have called it.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(addr) };
                f(sig, info, uc);
            } else {
                // SAFETY: `addr` is the plain handler the program installed for SIGTRAP.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(addr) };
                f(sig);
            }
        }
        _ => {
            // Default (or ignored, which the kernel overrides for a breakpoint): end the process
            // as it would have ended. SIGTRAP stays blocked until this handler returns, then
            // the re-sent signal takes its default action.
            let mut act: libc::sigaction = {
                // SAFETY: an all-zero sigaction is valid (SIG_DFL, empty mask).
                unsafe { std::mem::zeroed() }
            };
            act.sa_sigaction = libc::SIG_DFL;
            // SAFETY: `act` is a valid action; sigaction is async-signal-safe.
            unsafe { libc::sigaction(libc::SIGTRAP, &act, std::ptr::null_mut()) };
            let _ = threads::tgkill(threads::gettid(), libc::SIGTRAP);
        }
    }
}
