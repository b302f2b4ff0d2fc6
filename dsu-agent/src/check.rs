//! Activeness check: is any stopped thread executing, or returning into, a function that is
//! about to be replaced?
//!
//! For each parked thread the [`Checker`] first unwinds precisely (see [`crate::unwind`]): the
//! interrupted program counter, then every return address, crossing signal frames. Where the
//! unwind cannot go on, it falls back to a conservative scan of every 8-byte word from that
//! frame's stack pointer to the end of the stack, treating any word inside a range as a return
//! address (and following the interrupted context of any signal frame it meets). The scan may
//! report a function active that is not (a stale word); it never reports one inactive that is.
//!
//! Everything is allocated by [`Checker::new`] and [`Ranges`] before threads are stopped;
//! [`Checker::find_active`] allocates nothing.
//!
//! The calling thread (the agent) is never checked: it is not in the stop's thread list and
//! does not run code being replaced.
//!
//! Unsafe code is allowed here: this module reads stopped threads' stacks and registers through the
//! unwinder; every block states its invariant.

#![allow(unsafe_code)]

use std::ops::ControlFlow;

use dsu_sys::modules::LoadedModule;

use dsu_sys::signal::Registers;
use dsu_sys::stack::StackMaps;

use crate::hold::Holds;
use crate::stacks::{self, DeclaredStack};
use crate::stop::{ParkedThread, StackBounds, Stopped, stack_bounds};
use crate::unwind::{CfiTables, FrameKind, StackCopy, StackMemory, Unwinder, WalkEnd};

/// Address ranges `[start, end)` of the function versions being replaced, each labelled with
/// the index of its target (the function it is a version of).
#[derive(Debug, Clone, Default)]
pub struct Ranges {
    /// Sorted by start.
    items: Vec<(usize, usize, usize)>,
    /// `max_end[i]`: the largest end among `items[..=i]` (ranges may overlap).
    max_end: Vec<usize>,
    /// `[lowest start, highest end)`: most words a scan reads lie outside, rejected at once.
    span: (usize, usize),
    /// Ranges where even a thread held at a breakpoint is active: a trampoline an update takes
    /// away, where the thread would resume into padding.
    held: Vec<(usize, usize, usize)>,
}

impl Ranges {
    pub fn new() -> Ranges {
        Ranges::default()
    }

    /// Adds `[start, end)` for `target`. Empty ranges are ignored. Allocates.
    pub fn push(&mut self, start: usize, end: usize, target: usize) {
        if start >= end {
            return;
        }
        self.items.push((start, end, target));
        self.items.sort_unstable();
        self.max_end.clear();
        let mut m = 0;
        for &(_, e, _) in &self.items {
            m = m.max(e);
            self.max_end.push(m);
        }
        self.span = (self.items[0].0, m);
    }

    /// Adds `[start, end)` for `target` as a range where a thread held at a breakpoint site is
    /// active too (see [`Ranges::find_held`]).
    pub fn push_held_too(&mut self, start: usize, end: usize, target: usize) {
        self.push(start, end, target);
        // An empty range holds no site: `find_held` never matches it.
        self.held.push((start, end, target));
    }

    /// The target of a range where a thread held at breakpoint `site` is active: it was about
    /// to execute bytes the update takes away.
    pub fn find_held(&self, site: usize) -> Option<usize> {
        self.held
            .iter()
            .find(|&&(s, e, _)| site >= s && site < e)
            .map(|&(_, _, t)| t)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The ranges as `(start, end, target)`, sorted by start.
    pub fn iter(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        self.items.iter().copied()
    }

    /// The target of a range containing `addr`.
    pub fn find(&self, addr: usize) -> Option<usize> {
        if addr < self.span.0 || addr >= self.span.1 {
            return None;
        }
        let mut i = self.items.partition_point(|&(s, _, _)| s <= addr);
        while i > 0 && self.max_end[i - 1] > addr {
            i -= 1;
            let (s, e, t) = self.items[i];
            if addr >= s && addr < e {
                return Some(t);
            }
        }
        None
    }

    /// The target of a range a return address `ra` returns into: the call is at `ra - 1`; `ra`
    /// itself is also accepted (conservative, for a call ending a function).
    pub fn find_return(&self, ra: usize) -> Option<usize> {
        self.find(ra.wrapping_sub(1)).or_else(|| self.find(ra))
    }
}

impl FromIterator<(usize, usize, usize)> for Ranges {
    fn from_iter<I: IntoIterator<Item = (usize, usize, usize)>>(iter: I) -> Ranges {
        let mut r = Ranges::new();
        for (s, e, t) in iter {
            r.push(s, e, t);
        }
        r
    }
}

/// How a thread was found in a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// Its interrupted program counter.
    Pc,
    /// A return address found by precise unwinding, `depth` frames out.
    ReturnAddress { depth: usize },
    /// The program counter of a context interrupted by a signal whose handler is still on the
    /// stack, `depth` frames out.
    Interrupted { depth: usize },
    /// A word of the stack at address `at`, found by the conservative scan.
    StackScan { at: usize },
    /// A word at address `at` of a declared stack no thread runs on (a suspended
    /// coroutine's; see [`crate::stacks`]), found by the conservative scan.
    DeclaredStack { stack: DeclaredStack, at: usize },
}

impl std::fmt::Display for How {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            How::Pc => write!(f, "executing it"),
            How::ReturnAddress { depth } => write!(f, "returns into it ({depth} frames up)"),
            How::Interrupted { depth } => {
                write!(f, "interrupted in it by a signal ({depth} frames up)")
            }
            How::StackScan { at } => write!(f, "a return address into it on the stack at {at:#x}"),
            How::DeclaredStack { stack, at } => write!(
                f,
                "a return address into it at {at:#x} on the {stack}: \
                 a suspended coroutine returns into it"
            ),
        }
    }
}

/// A thread (or a declared stack) active in a function being replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    /// Index of the target (as given to [`Ranges::push`]).
    pub target: usize,
    /// The thread; 0 for a declared stack no thread runs on ([`How::DeclaredStack`]).
    pub tid: i32,
    /// The program counter or return address inside the range.
    pub pc: u64,
    pub how: How,
}

/// Errors of the activeness check.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(
        "thread {tid}: stack pointer {sp:#x} is in no readable mapping, so the functions it \
         returns into cannot be verified; retry later"
    )]
    NoStack { tid: i32, sp: u64 },
    #[error(
        "thread {tid}: more than {MAX_SCAN_REGIONS} nested signal stacks to scan, so it \
         cannot be proven inactive; retry later"
    )]
    TooManySignalFrames { tid: i32 },
    #[error(
        "thread {tid} waits with {size} bytes of stack, more than the {copied} bytes copied to \
         check it without stopping it"
    )]
    StackNotCopied {
        tid: i32,
        size: usize,
        copied: usize,
    },
    #[error("unwind information of a patch (.eh_frame at {start:#x}, {len} bytes): {source}")]
    EhFrame {
        start: usize,
        len: usize,
        source: gimli::Error,
    },
}

/// Where a walk starts.
enum Start<'a> {
    /// A stopped thread's interrupted registers.
    Registers(&'a Registers),
    /// A waiting thread's stack and instruction pointers.
    SpPc(u64, u64),
}

/// Signal frames the scan follows from one thread (nested signals).
const MAX_SCAN_REGIONS: usize = 8;

/// Checks stopped threads against [`Ranges`]. Build it before stopping (it allocates), use it
/// while stopped (it does not).
#[derive(Debug)]
pub struct Checker {
    tables: CfiTables,
    unwinder: Unwinder,
    last_end: Option<WalkEnd>,
    /// Where declared stacks are copied, a chunk at a time, to be scanned.
    declared_buf: Vec<u8>,
    _pins: Pins,
}

/// Bytes of a declared stack copied and scanned at a time.
const DECLARED_CHUNK: usize = 64 << 10;

/// References on shared libraries (`dlopen(RTLD_NOLOAD)`) that keep them loaded while a
/// checker reads their unwind tables and code; released by `dlclose` on drop.
#[derive(Debug, Default)]
struct Pins(Vec<usize>);

impl Pins {
    /// Pins every module that could be unloaded; returns the modules that are safe to read:
    /// the executable, the vDSO and the pinned libraries. A library that cannot be pinned is
    /// left out (threads in it are then covered by the scan).
    fn take(modules: Vec<LoadedModule>) -> (Pins, Vec<LoadedModule>) {
        let mut pins = Pins::default();
        let mut kept = Vec::with_capacity(modules.len());
        for m in modules {
            let permanent = m.is_main
                || m.name.is_empty()
                || m.name.starts_with("linux-vdso")
                || m.name.starts_with("linux-gate");
            if !permanent {
                let Ok(name) = std::ffi::CString::new(m.name.as_bytes()) else {
                    continue;
                };
                // SAFETY: `name` is NUL-terminated; RTLD_NOLOAD never loads anything, it only
                // takes a reference on a library already loaded (released in `drop`).
                let handle =
                    unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
                if handle.is_null() {
                    continue;
                }
                pins.0.push(handle as usize);
            }
            kept.push(m);
        }
        (pins, kept)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if crate::stop::in_progress() {
            // `dlclose` takes the loader's lock, which a stopped thread may hold: keep the
            // references rather than risk a deadlock.
            return;
        }
        for &handle in &self.0 {
            // SAFETY: each handle came from a successful `dlopen` in `take`, closed once.
            unsafe { libc::dlclose(handle as *mut libc::c_void) };
        }
    }
}

impl Checker {
    /// A checker for every module loaded now (`dsu_sys::modules::loaded`), each shared
    /// library pinned (kept loaded) until the checker is dropped. Takes the loader's lock:
    /// build and drop it while threads run (a checker dropped during a stop keeps its pins).
    pub fn for_loaded_modules() -> Checker {
        let (pins, modules) = Pins::take(dsu_sys::modules::loaded_in_memory());
        // SAFETY: the records come straight from the dynamic loader and describe modules loaded
        // now; the executable and the vDSO stay for the life of the process, the libraries are
        // pinned by `pins`, which lives as long as the checker.
        let mut checker = unsafe { Checker::new(&modules) };
        checker._pins = pins;
        checker
    }

    /// A checker for `modules`.
    ///
    /// # Safety
    /// As [`CfiTables::from_modules`]: the records describe loaded modules at their run-time
    /// addresses, which stay loaded while the checker is used.
    pub unsafe fn new(modules: &[LoadedModule]) -> Checker {
        Checker {
            // SAFETY: forwarded from this function's contract.
            tables: unsafe { CfiTables::from_modules(modules) },
            unwinder: Unwinder::new(),
            last_end: None,
            declared_buf: vec![0; DECLARED_CHUNK],
            _pins: Pins::default(),
        }
    }

    /// Registers the `.eh_frame` of loaded patch code, so threads are unwound through it.
    /// Returns the number of functions it describes.
    ///
    /// # Safety
    /// As [`CfiTables::add_eh_frame`]: `[start, start + len)` is a `.eh_frame` linked at
    /// `start`, mapped while the checker is used.
    pub unsafe fn add_eh_frame(&mut self, start: usize, len: usize) -> Result<usize, CheckError> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.tables.add_eh_frame(start, len) }.map_err(|source| CheckError::EhFrame {
            start,
            len,
            source,
        })
    }

    /// The unwind tables (for diagnostics: which modules were skipped).
    pub fn tables(&self) -> &CfiTables {
        &self.tables
    }

    /// How the precise walk of the last [`find_active`](Self::find_active) ended (`None` when
    /// it found the thread active on the way, or there were no ranges).
    pub fn last_walk(&self) -> Option<WalkEnd> {
        self.last_end
    }

    /// Whether `thread`, parked in `stopped`, executes or returns into a range. Allocates
    /// nothing. An error means the thread cannot be proven inactive.
    ///
    /// Takes the [`Stopped`] world rather than the thread alone: its memory map, read while
    /// every thread was held, bounds every stack read (and locates the stack a signal frame
    /// returns to).
    pub fn find_active(
        &mut self,
        stopped: &Stopped<'_>,
        thread: &ParkedThread,
        ranges: &Ranges,
    ) -> Result<Option<Activity>, CheckError> {
        self.last_end = None;
        if ranges.is_empty() {
            return Ok(None);
        }
        // SAFETY: the map was read while `stopped` holds every other thread, and it still does
        // (it is borrowed for this call).
        let mem = unsafe { StackMemory::new(stopped.maps(), thread.alt_stack) };
        self.check_walk(&mem, thread.tid, Start::Registers(&thread.regs), ranges)
    }

    /// Whether a thread that waits in a system call, at stack pointer `sp` and instruction
    /// pointer `pc` as `/proc/self/task/<tid>/syscall` showed them, executes or returns into a
    /// range. The thread is not stopped: its stack is first copied into `buf` (through
    /// `process_vm_readv`, so a thread that exits meanwhile costs an error, not a fault), and
    /// only the copy is read. The caller must make sure the thread did not run between the
    /// `syscall` read and the end of this call (its switch count), or the copy may mix two
    /// states. Allocates nothing.
    ///
    /// Only `sp` and `pc` are known, so frames whose CFA needs another register are covered
    /// by the conservative scan of the copy. A stack larger than `buf` that the precise walk
    /// cannot finish is unproven ([`CheckError::StackNotCopied`]).
    pub fn find_active_waiting(
        &mut self,
        maps: &StackMaps,
        tid: i32,
        (sp, pc): (u64, u64),
        buf: &mut [u8],
        ranges: &Ranges,
    ) -> Result<Option<Activity>, CheckError> {
        self.last_end = None;
        if ranges.is_empty() {
            return Ok(None);
        }
        let region =
            stack_bounds(maps, sp as usize, None).ok_or(CheckError::NoStack { tid, sp })?;
        let start = (sp as usize & !7).max(region.start);
        let want = (region.end - start).min(buf.len());
        let got = dsu_sys::mem::copy_from_self(start, &mut buf[..want])
            .map_err(|_| CheckError::NoStack { tid, sp })?;
        if got == 0 {
            return Err(CheckError::NoStack { tid, sp });
        }
        let truncated = start + got < region.end;
        let copy = StackCopy {
            start,
            bytes: &buf[..got],
        };
        let mem = StackMemory::copied(maps, copy);
        let found = self.check_walk(&mem, tid, Start::SpPc(sp, pc), ranges)?;
        if found.is_none() && truncated && matches!(self.last_end, Some(WalkEnd::Failed { .. })) {
            return Err(CheckError::StackNotCopied {
                tid,
                size: region.end - start,
                copied: got,
            });
        }
        Ok(found)
    }

    fn check_walk(
        &mut self,
        mem: &StackMemory<'_>,
        tid: i32,
        start: Start<'_>,
        ranges: &Ranges,
    ) -> Result<Option<Activity>, CheckError> {
        let holds = Holds;
        let mut found = None;
        let mut last_sp = 0;
        let visit = |frame: &crate::unwind::Frame| {
            last_sp = frame.sp;
            let pc = frame.pc as usize;
            let hit = match frame.kind {
                FrameKind::Interrupted => ranges.find(pc).map(|t| (t, How::Pc)),
                FrameKind::Return => ranges.find_return(pc).map(|t| {
                    let depth = frame.depth;
                    (t, How::ReturnAddress { depth })
                }),
                // A thread held at a breakpoint has not executed the site it trapped at; unless
                // the site goes away (a trampoline a revert removes).
                FrameKind::Signal if holds.is_hold(tid, frame.pc, frame.sp) => ranges
                    .find_held(pc.wrapping_sub(1))
                    .map(|t| (t, How::Interrupted { depth: frame.depth })),
                FrameKind::Signal => ranges.find(pc).map(|t| {
                    let depth = frame.depth;
                    (t, How::Interrupted { depth })
                }),
            };
            match hit {
                Some((target, how)) => {
                    found = Some(Activity {
                        target,
                        tid,
                        pc: frame.pc,
                        how,
                    });
                    ControlFlow::Break(())
                }
                None => ControlFlow::Continue(()),
            }
        };
        let end = match start {
            Start::Registers(regs) => self.unwinder.walk(&self.tables, mem, regs, visit),
            Start::SpPc(sp, pc) => self.unwinder.walk_sp_pc(&self.tables, mem, sp, pc, visit),
        };
        if found.is_some() {
            return Ok(found);
        }
        self.last_end = Some(end);
        match end {
            // A frame that says it is the outermost is trusted only up to where it lies: a
            // stack switched to (`makecontext`'s trampoline ends its walk too) may have
            // anything above it, so the rest of the stack is scanned.
            WalkEnd::Outermost => match mem.region(last_sp as usize) {
                Some(region) => self.scan(mem, region, last_sp as usize, tid, ranges),
                None => Ok(None),
            },
            WalkEnd::Stopped => Ok(None),
            WalkEnd::Failed { at, region, .. } => match region {
                Some(region) => self.scan(mem, region, at.sp as usize, tid, ranges),
                None => Err(CheckError::NoStack { tid, sp: at.sp }),
            },
        }
    }

    /// Whether a suspended coroutine returns into a range: scans every declared stack (see
    /// [`crate::stacks`]) for which `occupied` is false, conservatively, word by word. A stack
    /// a thread runs on is `occupied`: its live part is walked as that thread's stack and the
    /// part below its stack pointer is dead. The stack is read through `process_vm_readv`
    /// copies (it may be unmapped meanwhile); pages that cannot be read (a guard page, a stack
    /// freed without being forgotten) hold no frame and are skipped. Allocates nothing, takes
    /// no lock: safe while threads are stopped or held.
    pub fn find_active_declared(
        &mut self,
        ranges: &Ranges,
        occupied: impl Fn(&DeclaredStack) -> bool,
    ) -> Option<Activity> {
        if ranges.is_empty() {
            return None;
        }
        let buf = &mut self.declared_buf;
        stacks::for_each(|stack| {
            if occupied(&stack) {
                return ControlFlow::Continue(());
            }
            match scan_declared(stack, buf, ranges) {
                Some(found) => ControlFlow::Break(found),
                None => ControlFlow::Continue(()),
            }
        })
    }

    /// The conservative scan: every word from `sp` to the end of `region`, then of the stacks
    /// that signal frames found on the way return to.
    fn scan(
        &self,
        mem: &StackMemory<'_>,
        region: StackBounds,
        sp: usize,
        tid: i32,
        ranges: &Ranges,
    ) -> Result<Option<Activity>, CheckError> {
        let mut todo = [(region, sp & !7); MAX_SCAN_REGIONS];
        let mut done = [region; MAX_SCAN_REGIONS];
        let (mut pending, mut seen) = (1, 1);
        while pending > 0 {
            pending -= 1;
            let (region, from) = todo[pending];
            let mut addr = from.max(region.start);
            while let Some(word) = mem.read(region, addr) {
                let w = word as usize;
                if let Some(target) = ranges.find_return(w) {
                    let how = How::StackScan { at: addr };
                    return Ok(Some(Activity {
                        target,
                        tid,
                        pc: word,
                        how,
                    }));
                }
                if self.tables.is_sigreturn_start(w)
                    && let Some(regs) = mem.read_ucontext(region, addr + 8)
                {
                    if let Some(target) = ranges.find(regs.rip as usize) {
                        let how = How::StackScan { at: addr };
                        return Ok(Some(Activity {
                            target,
                            tid,
                            pc: regs.rip,
                            how,
                        }));
                    }
                    // A stack that cannot be read cannot be proven inactive.
                    let next = mem
                        .region(regs.rsp as usize)
                        .ok_or(CheckError::NoStack { tid, sp: regs.rsp })?;
                    if !done[..seen].contains(&next) {
                        if pending == MAX_SCAN_REGIONS || seen == MAX_SCAN_REGIONS {
                            return Err(CheckError::TooManySignalFrames { tid });
                        }
                        todo[pending] = (next, regs.rsp as usize & !7);
                        done[seen] = next;
                        pending += 1;
                        seen += 1;
                    }
                }
                addr += 8;
            }
        }
        Ok(None)
    }
}

/// Scans one declared stack, a chunk at a time, for a word that is a return address into a
/// range (or an interrupted program counter in one, saved in a signal frame). Allocates
/// nothing.
fn scan_declared(stack: DeclaredStack, buf: &mut [u8], ranges: &Ranges) -> Option<Activity> {
    const PAGE: usize = 4096;
    let chunk = buf.len() & !7;
    debug_assert!(chunk >= 8);
    let mut addr = stack.lo.checked_add(7)? & !7;
    while addr.checked_add(8).is_some_and(|end| end <= stack.hi) {
        let want = (stack.hi - addr).min(chunk) & !7;
        let got = dsu_sys::mem::copy_from_self(addr, &mut buf[..want]).unwrap_or(0) & !7;
        if got == 0 {
            // Unreadable now: skip to the next page.
            addr = (addr | (PAGE - 1)).checked_add(1)?;
            continue;
        }
        for (i, word) in buf[..got].chunks_exact(8).enumerate() {
            let w = u64::from_ne_bytes(word.try_into().ok()?);
            if let Some(target) = ranges.find_return(w as usize) {
                return Some(Activity {
                    target,
                    tid: 0,
                    pc: w,
                    how: How::DeclaredStack {
                        stack,
                        at: addr + 8 * i,
                    },
                });
            }
        }
        addr += got;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ranges_pushed_held_too_count_a_held_thread() {
        let mut r = Ranges::new();
        r.push(0x1000, 0x1010, 0);
        r.push_held_too(0x2000, 0x2005, 1);
        // Both count an interrupted pc or a return address.
        assert_eq!(r.find(0x1000), Some(0));
        assert_eq!(r.find(0x2004), Some(1));
        // A thread held at a breakpoint site is active only in the second.
        assert_eq!(r.find_held(0x1000), None);
        assert_eq!(r.find_held(0x2000), Some(1));
        assert_eq!(r.find_held(0x2004), Some(1));
        assert_eq!(r.find_held(0x2005), None);
        assert_eq!(r.find_held(0x1fff), None);
        r.push_held_too(0x3000, 0x3000, 2);
        assert_eq!(r.find_held(0x3000), None, "an empty range holds nothing");
    }

    #[test]
    fn ranges_find_with_overlaps() {
        let r: Ranges = [(100, 200, 0), (150, 160, 1), (300, 400, 2), (120, 500, 3)]
            .into_iter()
            .collect();
        assert_eq!(r.len(), 4);
        assert_eq!(r.find(99), None);
        assert_eq!(r.find(100), Some(0));
        assert_eq!(r.find(155).map(|t| t == 0 || t == 1 || t == 3), Some(true));
        assert_eq!(r.find(250), Some(3));
        assert_eq!(r.find(499), Some(3));
        assert_eq!(r.find(500), None);
        let mut single = Ranges::new();
        single.push(10, 10, 9); // empty: ignored
        assert!(single.is_empty());
        single.push(10, 20, 9);
        assert_eq!(single.find(19), Some(9));
        assert_eq!(single.find(20), None);
    }

    /// An address equal to a range's end lies outside it, also when a wider range around it
    /// holds the address: the function named is the one that contains it.
    #[test]
    fn a_ranges_end_is_outside_it_inside_a_wider_one() {
        let r: Ranges = [(100, 300, 0), (150, 200, 1)].into_iter().collect();
        assert_eq!(r.find(199), Some(1));
        assert_eq!(r.find(200), Some(0));
        assert_eq!(r.find(150), Some(1));
        assert_eq!(r.find(149), Some(0));
    }

    #[test]
    fn return_addresses_match_the_call_before_them() {
        let r: Ranges = [(100, 200, 0)].into_iter().collect();
        // A call ending the function returns to its end: still the function's frame.
        assert_eq!(r.find_return(200), Some(0));
        assert_eq!(r.find_return(101), Some(0));
        assert_eq!(r.find_return(100), Some(0));
        assert_eq!(r.find_return(201), None);
        assert_eq!(r.find_return(0), None);
    }

    #[test]
    fn how_reads_well() {
        assert_eq!(How::Pc.to_string(), "executing it");
        assert!(How::StackScan { at: 0x10 }.to_string().contains("0x10"));
    }
}
