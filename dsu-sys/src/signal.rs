//! Raw signal actions and `ucontext` access.
//!
//! `sigaction` with `SA_SIGINFO` is installed directly (not through `signal-hook`) because the
//! stop-the-world handler needs the interrupted context (`ucontext_t`) and a full signal mask.
//! The ABI facts about the signal frame (offsets of the general registers in `ucontext_t`, the
//! bytes of the `rt_sigreturn` trampoline) live here so that an unwinder elsewhere can cross
//! signal frames without knowing the layout.
//!
//! `unsafe` is needed for `sigaction`, `errno` and reading a `ucontext_t` through a raw pointer.

use std::io;
use std::mem::{self, MaybeUninit};

/// The first real-time signal usable by applications (`SIGRTMIN`, after the C library's own).
pub fn rt_min() -> i32 {
    libc::SIGRTMIN()
}

/// The last real-time signal (`SIGRTMAX`).
pub fn rt_max() -> i32 {
    libc::SIGRTMAX()
}

/// A `SA_SIGINFO` handler: `(signal, siginfo, ucontext)`.
pub type RawHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// What a signal does when delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// `SIG_DFL`.
    Default,
    /// `SIG_IGN`.
    Ignore,
    /// A handler function at `addr`, with its `sa_flags` and the `sa_restorer` the C library set
    /// (on x86_64 glibc and musl: `__restore_rt`, the `rt_sigreturn` trampoline).
    Handler {
        addr: usize,
        flags: i32,
        restorer: Option<usize>,
    },
}

/// A signal action as it was, to put back with [`restore`].
#[derive(Clone, Copy)]
pub struct SavedAction {
    raw: libc::sigaction,
}

impl std::fmt::Debug for SavedAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SavedAction")
            .field(&self.disposition())
            .finish()
    }
}

impl SavedAction {
    pub fn disposition(&self) -> Disposition {
        disposition_of(&self.raw)
    }
}

fn disposition_of(act: &libc::sigaction) -> Disposition {
    match act.sa_sigaction {
        libc::SIG_DFL => Disposition::Default,
        libc::SIG_IGN => Disposition::Ignore,
        addr => Disposition::Handler {
            addr,
            flags: act.sa_flags,
            restorer: act.sa_restorer.map(|f| f as usize),
        },
    }
}

fn query(sig: i32) -> io::Result<libc::sigaction> {
    let mut old = MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null new action only queries; `old` is writable and sized for the kernel ABI
    // struct the C library converts to.
    let rc = unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sigaction succeeded and filled `old`; an all-zero sigaction is valid anyway.
    Ok(unsafe { old.assume_init() })
}

/// The current disposition of `sig`.
pub fn disposition(sig: i32) -> io::Result<Disposition> {
    query(sig).map(|a| disposition_of(&a))
}

/// Whether `sig` has its default disposition (no handler, not ignored).
pub fn is_default(sig: i32) -> io::Result<bool> {
    Ok(disposition(sig)? == Disposition::Default)
}

/// Which signals are blocked while the handler runs (besides the signal itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockDuring {
    /// Only the handled signal.
    Nothing,
    /// Every blockable signal: no other handler can run on a thread inside this one.
    Everything,
    /// Every blockable signal but this one (so a thread waiting inside the handler can still be
    /// stopped with it).
    EverythingBut(i32),
}

/// Installs `handler` for `sig` with `SA_SIGINFO | SA_RESTART | SA_ONSTACK`; returns the
/// previous action.
///
/// # Safety
/// - `handler` is async-signal-safe: it allocates nothing, takes no lock, and saves and
///   restores `errno`;
/// - replacing the previous action is acceptable to whoever installed it (check
///   [`disposition`] first).
pub unsafe fn install(
    sig: i32,
    handler: RawHandler,
    block: BlockDuring,
) -> io::Result<SavedAction> {
    // SAFETY: forwarded from this function's contract.
    unsafe { install_with(sig, handler, block, libc::SA_ONSTACK) }
}

/// As [`install`], but the handler runs on the thread's own stack even where the thread has an
/// alternate signal stack (`SA_SIGINFO | SA_RESTART`). For a handler that waits and inside which
/// another handler may run: two nested signal frames with their saved vector state do not fit
/// on a small alternate stack.
///
/// # Safety
/// As [`install`].
pub unsafe fn install_on_thread_stack(
    sig: i32,
    handler: RawHandler,
    block: BlockDuring,
) -> io::Result<SavedAction> {
    // SAFETY: forwarded from this function's contract.
    unsafe { install_with(sig, handler, block, 0) }
}

/// # Safety
/// As [`install`].
unsafe fn install_with(
    sig: i32,
    handler: RawHandler,
    block: BlockDuring,
    extra_flags: libc::c_int,
) -> io::Result<SavedAction> {
    let mut act = MaybeUninit::<libc::sigaction>::zeroed();
    let act_ptr = act.as_mut_ptr();
    // SAFETY: `act_ptr` points to a zeroed, live sigaction; the fields written are plain data
    // and `sa_mask` is a valid sigset_t for sigemptyset/sigfillset.
    unsafe {
        (*act_ptr).sa_sigaction = handler as usize;
        (*act_ptr).sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | extra_flags;
        match block {
            BlockDuring::Nothing => libc::sigemptyset(&mut (*act_ptr).sa_mask),
            BlockDuring::Everything => libc::sigfillset(&mut (*act_ptr).sa_mask),
            BlockDuring::EverythingBut(other) => {
                libc::sigfillset(&mut (*act_ptr).sa_mask);
                libc::sigdelset(&mut (*act_ptr).sa_mask, other)
            }
        };
    }
    let mut old = MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: `act` is initialised above; `old` is writable. The caller vouches for the
    // handler (see `# Safety`).
    let rc = unsafe { libc::sigaction(sig, act.as_ptr(), old.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sigaction succeeded and filled `old`.
    let raw = unsafe { old.assume_init() };
    Ok(SavedAction { raw })
}

/// Puts back an action returned by [`install`].
///
/// # Safety
/// The saved handler (if any) is still valid code, and no thread relies on the action being
/// replaced.
pub unsafe fn restore(sig: i32, saved: &SavedAction) -> io::Result<()> {
    // SAFETY: `saved.raw` came from the kernel; the caller vouches for the handler it names.
    let rc = unsafe { libc::sigaction(sig, &saved.raw, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Saves `errno` on creation and restores it on drop. Async-signal-safe: every handler starts
/// with `let _errno = SavedErrno::save();`.
#[derive(Debug)]
pub struct SavedErrno(i32);

impl SavedErrno {
    pub fn save() -> SavedErrno {
        // SAFETY: `__errno_location` returns the calling thread's errno slot, always valid.
        SavedErrno(unsafe { *libc::__errno_location() })
    }
}

impl Drop for SavedErrno {
    fn drop(&mut self) {
        // SAFETY: as in `save`.
        unsafe { *libc::__errno_location() = self.0 };
    }
}

/// Number of general registers in `mcontext_t.gregs` on x86_64.
pub const NGREG: usize = 23;

/// Offset of `uc_mcontext.gregs` in a `ucontext_t` (kernel and C library agree on the prefix).
pub const UCONTEXT_GREGS_OFFSET: usize =
    mem::offset_of!(libc::ucontext_t, uc_mcontext) + mem::offset_of!(libc::mcontext_t, gregs);

/// Offset of `uc_stack` (the thread's alternate signal stack) in a `ucontext_t`.
pub const UCONTEXT_STACK_OFFSET: usize = mem::offset_of!(libc::ucontext_t, uc_stack);

/// Bytes of the `rt_sigreturn` trampoline (`__restore_rt` in glibc and musl):
/// `mov rax, 15; syscall`. A signal handler returns into it; at that point the stack pointer
/// points at the interrupted context (`ucontext_t`).
pub const SIGRETURN_TRAMPOLINE: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];

/// The general registers of an interrupted context.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Registers {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub eflags: u64,
}

impl Registers {
    /// From the `gregs` array of an `mcontext_t` (indices `libc::REG_*`).
    pub fn from_gregs(g: &[u64; NGREG]) -> Registers {
        let r = |i: libc::c_int| g[i as usize];
        Registers {
            rax: r(libc::REG_RAX),
            rbx: r(libc::REG_RBX),
            rcx: r(libc::REG_RCX),
            rdx: r(libc::REG_RDX),
            rsi: r(libc::REG_RSI),
            rdi: r(libc::REG_RDI),
            rbp: r(libc::REG_RBP),
            rsp: r(libc::REG_RSP),
            r8: r(libc::REG_R8),
            r9: r(libc::REG_R9),
            r10: r(libc::REG_R10),
            r11: r(libc::REG_R11),
            r12: r(libc::REG_R12),
            r13: r(libc::REG_R13),
            r14: r(libc::REG_R14),
            r15: r(libc::REG_R15),
            rip: r(libc::REG_RIP),
            eflags: r(libc::REG_EFL),
        }
    }

    /// The interrupted registers of a signal context. Async-signal-safe.
    ///
    /// # Safety
    /// `uc` points to a live `ucontext_t`, such as the third argument of a `SA_SIGINFO` handler.
    pub unsafe fn from_ucontext(uc: *const libc::ucontext_t) -> Registers {
        let mut gregs = [0u64; NGREG];
        // SAFETY: forwarded from this function's contract.
        unsafe { copy_gregs(uc, &mut gregs) };
        Registers::from_gregs(&gregs)
    }
}

/// The interrupted instruction and stack pointers of a signal context. Async-signal-safe.
///
/// # Safety
/// `uc` points to a live `ucontext_t`.
pub unsafe fn ucontext_pc_sp(uc: *const libc::ucontext_t) -> (u64, u64) {
    // SAFETY: the caller guarantees `uc` is live; the indices are within `gregs`.
    unsafe {
        let g = &(*uc).uc_mcontext.gregs;
        (
            g[libc::REG_RIP as usize] as u64,
            g[libc::REG_RSP as usize] as u64,
        )
    }
}

/// Sets the instruction pointer the thread resumes at when the handler returns.
/// Async-signal-safe.
///
/// # Safety
/// `uc` points to the live `ucontext_t` of the running handler, and `pc` is an instruction
/// boundary the interrupted code may resume at.
pub unsafe fn set_ucontext_pc(uc: *mut libc::ucontext_t, pc: u64) {
    // SAFETY: the caller guarantees `uc` is the live, writable context of this handler.
    unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] = pc as i64 };
}

/// Copies the general registers of a signal context into `out` (indices `libc::REG_*`), with no
/// temporary on the stack: for handlers that may run on a small alternate signal stack.
/// Async-signal-safe.
///
/// # Safety
/// `uc` points to a live `ucontext_t`.
pub unsafe fn copy_gregs(uc: *const libc::ucontext_t, out: &mut [u64; NGREG]) {
    // Word by word with volatile reads: a block copy could become a call to the C library's
    // `memcpy`, which may be the very code an update is patching.
    // SAFETY: the caller guarantees `uc` is live; `gregs` is `[i64; NGREG]`, read in bounds.
    let src = unsafe { std::ptr::addr_of!((*uc).uc_mcontext.gregs).cast::<u64>() };
    for (i, word) in out.iter_mut().enumerate() {
        // SAFETY: `i < NGREG`, within the live `gregs` array.
        *word = unsafe { std::ptr::read_volatile(src.add(i)) };
    }
}

/// A thread's alternate signal stack, as saved in a signal context.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AltStack {
    pub base: usize,
    pub size: usize,
    /// `SS_DISABLE` when there is none. Other bits vary by kernel (recent ones save the
    /// configured flags, such as `SS_AUTODISARM`, not whether the code ran on it): use
    /// [`contains`](Self::contains) on the interrupted stack pointer instead.
    pub flags: i32,
}

impl AltStack {
    /// Whether an alternate stack is configured.
    pub fn enabled(&self) -> bool {
        self.flags & libc::SS_DISABLE == 0 && self.size != 0
    }

    /// Whether `addr` lies in it.
    pub fn contains(&self, addr: usize) -> bool {
        self.enabled() && addr >= self.base && addr - self.base < self.size
    }

    /// The alternate stack recorded in a signal context. Async-signal-safe.
    ///
    /// # Safety
    /// `uc` points to a live `ucontext_t`.
    pub unsafe fn from_ucontext(uc: *const libc::ucontext_t) -> AltStack {
        // SAFETY: the caller guarantees `uc` is a live ucontext_t.
        let st = unsafe { (*uc).uc_stack };
        AltStack {
            base: st.ss_sp as usize,
            size: st.ss_size,
            flags: st.ss_flags,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    static SEEN_RIP: AtomicU64 = AtomicU64::new(0);
    static SEEN_RSP: AtomicU64 = AtomicU64::new(0);

    extern "C" fn record(_: libc::c_int, _: *mut libc::siginfo_t, uc: *mut libc::c_void) {
        let _errno = SavedErrno::save();
        // SAFETY: the kernel passes a live ucontext_t to a SA_SIGINFO handler.
        let regs = unsafe { Registers::from_ucontext(uc.cast()) };
        SEEN_RIP.store(regs.rip, Ordering::SeqCst);
        SEEN_RSP.store(regs.rsp, Ordering::SeqCst);
    }

    #[test]
    fn layout_matches_kernel_abi() {
        // uc_flags, uc_link, then stack_t (24 bytes): gregs at 40, r8 first.
        assert_eq!(UCONTEXT_STACK_OFFSET, 16);
        assert_eq!(UCONTEXT_GREGS_OFFSET, 40);
        assert_eq!(libc::REG_R8, 0);
        assert_eq!(libc::REG_RIP, 16);
        assert!(rt_min() < rt_max());
    }

    #[test]
    fn handler_sees_interrupted_context() {
        let sig = rt_min() + 9;
        assert!(is_default(sig).unwrap());
        // SAFETY: `record` only touches atomics and errno.
        let saved = unsafe { install(sig, record, BlockDuring::Everything) }.unwrap();
        assert_eq!(saved.disposition(), Disposition::Default);
        match disposition(sig).unwrap() {
            Disposition::Handler { addr, restorer, .. } => {
                assert_eq!(addr, record as *const () as usize);
                assert!(restorer.is_some());
            }
            other => panic!("unexpected {other:?}"),
        }
        let local = 0u8;
        crate::threads::tgkill(crate::threads::gettid(), sig).unwrap();
        let rsp = SEEN_RSP.load(Ordering::SeqCst) as usize;
        let here = std::ptr::addr_of!(local) as usize;
        assert!(
            rsp != 0 && rsp.abs_diff(here) < 1 << 20,
            "{rsp:#x} vs {here:#x}"
        );
        assert_ne!(SEEN_RIP.load(Ordering::SeqCst), 0);
        // SAFETY: puts back the default action.
        unsafe { restore(sig, &saved) }.unwrap();
        assert!(is_default(sig).unwrap());
    }
}

/// A thread's signal mask, as [`block_asynchronous`] found it, to put back with [`set_mask`].
#[derive(Clone, Copy)]
pub struct SignalMask {
    raw: libc::sigset_t,
}

impl std::fmt::Debug for SignalMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignalMask")
    }
}

/// Signals the kernel raises in a thread for what that thread itself did (a bad access, an
/// illegal or trapping instruction, a forbidden system call). Blocking them does not defer
/// them: the kernel delivers them anyway and, when blocked, with the default action, which
/// kills the process even if the program has a handler. So they stay unblocked.
pub const SYNCHRONOUS: [i32; 6] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
    libc::SIGSYS,
];

/// Blocks every signal but the [`SYNCHRONOUS`] ones in the calling thread and returns the mask
/// it had. A thread created while this mask is set inherits it: so the agent's threads never
/// take a signal the program means for its own threads (a `signalfd` or `sigwait` reader
/// relies on that).
pub fn block_asynchronous() -> io::Result<SignalMask> {
    let mut all = MaybeUninit::<libc::sigset_t>::zeroed();
    let mut old = MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: both sets are live, writable sigset_t values; sigfillset initialises `all`
    // before sigdelset and pthread_sigmask read it, and pthread_sigmask fills `old`.
    let rc = unsafe {
        libc::sigfillset(all.as_mut_ptr());
        for sig in SYNCHRONOUS {
            libc::sigdelset(all.as_mut_ptr(), sig);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr())
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: pthread_sigmask succeeded and filled `old`.
    let raw = unsafe { old.assume_init() };
    Ok(SignalMask { raw })
}

/// Sets the calling thread's signal mask back to `mask`.
pub fn set_mask(mask: &SignalMask) -> io::Result<()> {
    // SAFETY: `mask.raw` is a valid sigset_t from the kernel; no old mask is asked for.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &mask.raw, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}
