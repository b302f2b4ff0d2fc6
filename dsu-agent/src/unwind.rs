//! Precise stack unwinding of a stopped thread from DWARF call-frame information
//! (`.eh_frame`), without allocating.
//!
//! [`CfiTables`] is built before threads are stopped (it may allocate): for every loaded
//! module it keeps its `.eh_frame` with the binary-search table of its `.eh_frame_hdr`, and for
//! every `.eh_frame` registered later (loaded patches) a sorted table of its FDEs.
//! [`Unwinder::walk`] then follows the CFA and register rules from a thread's interrupted
//! registers, frame by frame, reading only the thread's stack (bounds from the memory map taken
//! while stopped) and the modules' mapped unwind sections; it crosses signal frames (a return
//! into the `rt_sigreturn` trampoline, with the interrupted `ucontext_t` on the stack).
//! Anything it cannot follow ends the walk with [`WalkEnd::Failed`]; the caller falls back
//! to a conservative scan.
//!
//! `unsafe` here: turning module and stack memory into slices / reading words from it. Every
//! read is bounds-checked against a mapping recorded in advance.
//!
//! Unsafe code is allowed here: this module reads unwind tables and stack memory of stopped
//! threads; every block states its invariant.

#![allow(unsafe_code)]

use std::ops::ControlFlow;

use dsu_sys::modules::LoadedModule;
use dsu_sys::signal::{AltStack, NGREG, Registers, SIGRETURN_TRAMPOLINE, UCONTEXT_GREGS_OFFSET};
use dsu_sys::stack::StackMaps;

use crate::frame_rules::FrameRules;
use crate::stop::{StackBounds, stack_bounds};
use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, EhFrameOffset, EndianSlice, NativeEndian,
    ParsedEhFrameHdr, Register, RegisterRule, UnwindContext, UnwindContextStorage, UnwindSection,
};

type Slice = EndianSlice<'static, NativeEndian>;

/// Frames followed before giving up (then the caller scans).
pub const MAX_DEPTH: usize = 512;

/// DWARF register numbers on x86_64 (System V psABI, figure 3.36).
mod dwarf {
    pub const RBX: u16 = 3;
    pub const RBP: u16 = 6;
    pub const RSP: u16 = 7;
    pub const R12: u16 = 12;
    pub const R15: u16 = 15;
    pub const RA: u16 = 16;
    pub const COUNT: usize = 17;
}

/// Fixed-size storage for gimli's unwind context: no heap use while evaluating CFI.
#[derive(Debug)]
struct FixedStorage;

impl<T: gimli::ReaderOffset> UnwindContextStorage<T> for FixedStorage {
    type Rules = [(Register, RegisterRule<T>); 32];
    type Stack = [gimli::UnwindTableRow<T, Self>; 4];
}

/// How to find the FDE covering an address in one `.eh_frame`.
#[derive(Debug)]
enum Index {
    /// The module's `.eh_frame_hdr` binary-search table.
    Hdr(ParsedEhFrameHdr<Slice>),
    /// `(start, end, offset in .eh_frame)`, sorted by start (built by us).
    Sorted(Vec<(u64, u64, usize)>),
}

#[derive(Debug)]
struct Table {
    /// Code this table may describe: `[start, end)` ranges (executable segments, or the span
    /// of the FDEs).
    code: Vec<(usize, usize)>,
    eh_frame: EhFrame<Slice>,
    bases: BaseAddresses,
    index: Index,
}

impl Table {
    fn covers(&self, addr: usize) -> bool {
        self.code.iter().any(|&(s, e)| addr >= s && addr < e)
    }

    fn fde(&self, addr: u64) -> gimli::Result<gimli::FrameDescriptionEntry<Slice>> {
        match &self.index {
            Index::Hdr(hdr) => hdr
                .table()
                .ok_or(gimli::Error::NoUnwindInfoForAddress)?
                .fde_for_address(&self.eh_frame, &self.bases, addr, EhFrame::cie_from_offset),
            Index::Sorted(fdes) => {
                let i = fdes.partition_point(|&(start, _, _)| start <= addr);
                let &(_, end, offset) = i
                    .checked_sub(1)
                    .and_then(|j| fdes.get(j))
                    .ok_or(gimli::Error::NoUnwindInfoForAddress)?;
                if addr >= end {
                    return Err(gimli::Error::NoUnwindInfoForAddress);
                }
                self.eh_frame.fde_from_offset(
                    &self.bases,
                    EhFrameOffset(offset),
                    EhFrame::cie_from_offset,
                )
            }
        }
    }
}

/// A module whose unwind information could not be used (its code is then only covered by the
/// conservative scan).
#[derive(Debug, Clone)]
pub struct SkippedModule {
    pub name: String,
    pub reason: String,
}

/// Unwind information of the process, and where its code is.
#[derive(Debug, Default)]
pub struct CfiTables {
    tables: Vec<Table>,
    /// Executable segments of the modules, sorted and disjoint: where the trampoline bytes may
    /// be read.
    exec: Vec<(usize, usize)>,
    skipped: Vec<SkippedModule>,
}

/// A `'static` slice over mapped memory.
///
/// # Safety
/// `[start, start + len)` is mapped readable for as long as the slice is used.
unsafe fn mapped(start: usize, len: usize) -> &'static [u8] {
    debug_assert!(start != 0 && start.checked_add(len).is_some());
    // SAFETY: the caller guarantees the range is mapped readable while used.
    unsafe { std::slice::from_raw_parts(start as *const u8, len) }
}

impl CfiTables {
    /// Unwind tables of `modules`. A module whose `.eh_frame_hdr` is missing or malformed is
    /// skipped and listed in [`skipped`](Self::skipped).
    ///
    /// # Safety
    /// Every module's segments and `eh_frame_hdr` describe a loaded ELF module at its run-time
    /// addresses (as [`dsu_sys::modules::loaded`] returns them), and the module stays loaded
    /// while these tables are used.
    pub unsafe fn from_modules(modules: &[LoadedModule]) -> CfiTables {
        let mut t = CfiTables::default();
        for m in modules {
            for s in m.segments.iter().filter(|s| s.exec && s.len > 0) {
                t.exec.push((s.start, s.start + s.len));
            }
            // SAFETY: forwarded from this function's contract.
            match unsafe { module_table(m) } {
                Ok(table) => t.tables.push(table),
                Err(reason) => t.skipped.push(SkippedModule {
                    name: m.name.clone(),
                    reason,
                }),
            }
        }
        t.exec.sort_unstable();
        t
    }

    /// Registers a `.eh_frame` section of code loaded later (a patch). Returns the number of
    /// FDEs. Indexes them (allocates): call it before stopping threads.
    ///
    /// # Safety
    /// `[start, start + len)` holds a `.eh_frame` section as linked at `start` (its pointers
    /// resolved for that address) and stays mapped readable while these tables are used.
    pub unsafe fn add_eh_frame(&mut self, start: usize, len: usize) -> gimli::Result<usize> {
        // SAFETY: forwarded from this function's contract.
        let data = unsafe { mapped(start, len) };
        let eh_frame = EhFrame::new(data, NativeEndian);
        let bases = BaseAddresses::default().set_eh_frame(start as u64);
        let mut fdes = Vec::new();
        let mut entries = eh_frame.entries(&bases);
        while let Some(entry) = entries.next()? {
            if let gimli::CieOrFde::Fde(partial) = entry {
                let fde = partial.parse(EhFrame::cie_from_offset)?;
                if fde.len() > 0 {
                    fdes.push((fde.initial_address(), fde.end_address(), fde.offset()));
                }
            }
        }
        fdes.sort_unstable();
        let n = fdes.len();
        let span = match (fdes.first(), fdes.iter().map(|f| f.1).max()) {
            (Some(first), Some(end)) => vec![(first.0 as usize, end as usize)],
            _ => Vec::new(),
        };
        self.tables.push(Table {
            code: span,
            eh_frame,
            bases,
            index: Index::Sorted(fdes),
        });
        Ok(n)
    }

    /// Modules whose unwind information is not used.
    pub fn skipped(&self) -> &[SkippedModule] {
        &self.skipped
    }

    /// The FDE describing `addr`. Tables registered later (patches, newest last) are searched
    /// first: code written in place over a module's function is described by its patch's
    /// table, not by the module's stale one.
    fn fde_for(&self, addr: u64) -> Option<(&Table, gimli::FrameDescriptionEntry<Slice>)> {
        self.tables
            .iter()
            .rev()
            .filter(|t| t.covers(addr as usize))
            .find_map(|t| t.fde(addr).ok().map(|f| (t, f)))
    }

    /// The rules an unwinder finds for the function at `entry` (from the table it would use
    /// there), `None` when no table describes it.
    pub fn frame_rules(&self, entry: usize) -> Option<gimli::Result<FrameRules>> {
        let (table, fde) = self.fde_for(entry as u64)?;
        Some(FrameRules::of_fde(
            &fde,
            &table.eh_frame,
            &table.bases,
            entry as u64,
        ))
    }

    /// Whether `addr` lies in known executable code, with room for `len` bytes.
    fn in_exec(&self, addr: usize, len: usize) -> bool {
        let i = self.exec.partition_point(|&(s, _)| s <= addr);
        i.checked_sub(1)
            .map(|j| self.exec[j])
            .is_some_and(|(_, e)| addr.checked_add(len).is_some_and(|end| end <= e))
    }

    /// Whether `addr` is the first byte of an `rt_sigreturn` trampoline (where a signal
    /// handler returns to).
    pub fn is_sigreturn_start(&self, addr: usize) -> bool {
        let n = SIGRETURN_TRAMPOLINE.len();
        self.in_exec(addr, n) && {
            // SAFETY: `[addr, addr + n)` lies inside an executable segment of a loaded module
            // (checked by `in_exec`), mapped while the tables are used.
            let bytes = unsafe { mapped(addr, n) };
            bytes == SIGRETURN_TRAMPOLINE
        }
    }

    /// Whether `pc` is in an `rt_sigreturn` trampoline before its `syscall` has run (its first
    /// instruction or the `syscall` itself): the stack pointer then points at the interrupted
    /// `ucontext_t`.
    pub fn is_sigreturn(&self, pc: usize) -> bool {
        self.is_sigreturn_start(pc)
            || pc
                .checked_sub(7)
                .is_some_and(|a| self.is_sigreturn_start(a))
    }
}

/// Builds the table of one module from its `.eh_frame_hdr`.
///
/// # Safety
/// As for [`CfiTables::from_modules`].
unsafe fn module_table(m: &LoadedModule) -> Result<Table, String> {
    let hdr_addr = m.eh_frame_hdr.ok_or("no PT_GNU_EH_FRAME")?;
    let seg_end = |addr: usize| {
        m.segments
            .iter()
            .find(|s| s.contains(addr))
            .map(|s| s.start + s.len)
    };
    let hdr_end = seg_end(hdr_addr).ok_or(".eh_frame_hdr outside the module's segments")?;
    // SAFETY: inside a loadable segment of a loaded module (contract of the caller).
    let hdr_data = unsafe { mapped(hdr_addr, hdr_end - hdr_addr) };
    let hdr_bases = BaseAddresses::default().set_eh_frame_hdr(hdr_addr as u64);
    let parsed = EhFrameHdr::new(hdr_data, NativeEndian)
        .parse(&hdr_bases, 8)
        .map_err(|e| format!(".eh_frame_hdr: {e}"))?;
    let eh_addr = parsed
        .eh_frame_ptr()
        .direct()
        .map_err(|e| format!(".eh_frame pointer: {e}"))? as usize;
    let eh_end = seg_end(eh_addr).ok_or(".eh_frame outside the module's segments")?;
    // SAFETY: inside a loadable segment of a loaded module (contract of the caller).
    let eh_data = unsafe { mapped(eh_addr, eh_end - eh_addr) };
    let eh_frame = EhFrame::new(eh_data, NativeEndian);
    let text = m
        .segments
        .iter()
        .find(|s| s.exec)
        .map_or(0, |s| s.start as u64);
    let bases = hdr_bases.set_eh_frame(eh_addr as u64).set_text(text);
    let code: Vec<(usize, usize)> = m
        .segments
        .iter()
        .filter(|s| s.exec)
        .map(|s| (s.start, s.start + s.len))
        .collect();
    let index = if parsed.table().is_some() {
        Index::Hdr(parsed)
    } else {
        // No search table: index the FDEs ourselves (the section ends at its terminator).
        let mut fdes = Vec::new();
        let mut entries = eh_frame.entries(&bases);
        while let Some(entry) = entries.next().map_err(|e| format!(".eh_frame: {e}"))? {
            if let gimli::CieOrFde::Fde(partial) = entry {
                let fde = partial
                    .parse(EhFrame::cie_from_offset)
                    .map_err(|e| format!(".eh_frame FDE: {e}"))?;
                fdes.push((fde.initial_address(), fde.end_address(), fde.offset()));
            }
        }
        fdes.sort_unstable();
        Index::Sorted(fdes)
    };
    Ok(Table {
        code,
        eh_frame,
        bases,
        index,
    })
}

/// Read access to one stopped thread's stacks: its regular stack and alternate signal stack,
/// bounded by the mappings as they are while the thread is stopped.
///
/// For a thread that is not stopped (it waits in a system call and may wake up or exit at any
/// time), the memory is a copy of its stack taken beforehand ([`StackMemory::copied`]): reads
/// outside the copy find nothing.
#[derive(Debug, Clone, Copy)]
pub struct StackMemory<'a> {
    maps: &'a StackMaps,
    alt: Option<AltStack>,
    copy: Option<StackCopy<'a>>,
}

/// A copy of `bytes.len()` bytes of stack that lay at `start`.
#[derive(Debug, Clone, Copy)]
pub struct StackCopy<'a> {
    pub start: usize,
    pub bytes: &'a [u8],
}

impl<'a> StackMemory<'a> {
    /// # Safety
    /// `maps` was refreshed while every thread but the caller was stopped, and they are still
    /// stopped while this is used: no mapping changes.
    pub unsafe fn new(maps: &'a StackMaps, alt: Option<AltStack>) -> StackMemory<'a> {
        StackMemory {
            maps,
            alt,
            copy: None,
        }
    }

    /// Memory of a thread that is not stopped: only `copy` is read, never live memory.
    pub fn copied(maps: &'a StackMaps, copy: StackCopy<'a>) -> StackMemory<'a> {
        StackMemory {
            maps,
            alt: None,
            copy: Some(copy),
        }
    }

    /// The stack region a stack pointer points into (see [`stack_bounds`]); for a copy, the
    /// part of it the copy holds.
    pub fn region(&self, sp: usize) -> Option<StackBounds> {
        let bounds = stack_bounds(self.maps, sp, self.alt)?;
        match self.copy {
            None => Some(bounds),
            Some(c) => {
                let start = bounds.start.max(c.start);
                let end = bounds.end.min(c.start + c.bytes.len());
                (start < end && sp >= start && sp <= end).then_some(StackBounds { start, end })
            }
        }
    }

    /// The word at `addr` if `[addr, addr + 8)` lies in `region`.
    pub fn read(&self, region: StackBounds, addr: usize) -> Option<u64> {
        if addr < region.start || addr.checked_add(8)? > region.end {
            return None;
        }
        debug_assert!(region.contains(addr) && region.contains(addr + 7));
        if let Some(c) = self.copy {
            let at = addr.checked_sub(c.start)?;
            let word: [u8; 8] = c.bytes.get(at..at + 8)?.try_into().ok()?;
            return Some(u64::from_ne_bytes(word));
        }
        // SAFETY: `region` comes from `self.region`, a readable mapping of the snapshot taken
        // while stopped (contract of `new`), and the word lies inside it (checked above).
        let bytes = unsafe { std::ptr::read_volatile(addr as *const [u8; 8]) };
        Some(u64::from_ne_bytes(bytes))
    }

    /// The general registers of a `ucontext_t` at `addr` (a signal frame), if it lies in
    /// `region`.
    pub fn read_ucontext(&self, region: StackBounds, addr: usize) -> Option<Registers> {
        let mut gregs = [0u64; NGREG];
        for (i, g) in gregs.iter_mut().enumerate() {
            *g = self.read(region, addr.checked_add(UCONTEXT_GREGS_OFFSET + 8 * i)?)?;
        }
        Some(Registers::from_gregs(&gregs))
    }
}

/// How a frame's program counter was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// The interrupted instruction of the thread (depth 0).
    Interrupted,
    /// A return address: the call is just before it.
    Return,
    /// The instruction a signal interrupted, restored from a signal frame on the stack.
    Signal,
}

/// One frame of a walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub depth: usize,
    pub pc: u64,
    pub sp: u64,
    pub kind: FrameKind,
}

/// Why a walk could not go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The stack pointer is in no readable mapping.
    NoStack,
    /// No FDE covers the address.
    NoFde,
    /// The CFI could not be evaluated (or needs a DWARF expression).
    BadCfi,
    /// A CFA or saved register outside the stack, or the stack not growing upwards.
    BadFrame,
    /// A register needed is not known in this frame.
    LostRegister,
    /// More than [`MAX_DEPTH`] frames.
    TooDeep,
    /// A frame returns to address 0 without its CFI marking it outermost: a zeroed return
    /// address, or a switch to another stack. The rest of the stack is not proven.
    ZeroReturn,
}

/// How a walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkEnd {
    /// The outermost frame was reached (its return address is undefined or zero).
    Outermost,
    /// The callback asked to stop.
    Stopped,
    /// Unwinding failed above frame `at` (its `sp` and stack region are where to scan from).
    Failed {
        reason: Failure,
        at: Frame,
        region: Option<StackBounds>,
    },
}

/// Walks stacks. Holds gimli's evaluation context in fixed-size storage (allocated once, in
/// [`new`](Self::new)); [`walk`](Self::walk) allocates nothing.
pub struct Unwinder {
    ctx: Box<UnwindContext<usize, FixedStorage>>,
}

impl std::fmt::Debug for Unwinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unwinder").finish_non_exhaustive()
    }
}

impl Default for Unwinder {
    fn default() -> Self {
        Self::new()
    }
}

type Regs = [Option<u64>; dwarf::COUNT];

fn dwarf_regs(r: &Registers) -> Regs {
    [
        Some(r.rax),
        Some(r.rdx),
        Some(r.rcx),
        Some(r.rbx),
        Some(r.rsi),
        Some(r.rdi),
        Some(r.rbp),
        Some(r.rsp),
        Some(r.r8),
        Some(r.r9),
        Some(r.r10),
        Some(r.r11),
        Some(r.r12),
        Some(r.r13),
        Some(r.r14),
        Some(r.r15),
        Some(r.rip),
    ]
}

impl Unwinder {
    pub fn new() -> Unwinder {
        Unwinder {
            ctx: Box::new(UnwindContext::new_in()),
        }
    }

    /// Walks the stack from `regs`, calling `visit` for every frame from the innermost out,
    /// until the outermost frame, a failure, or `visit` breaks. Allocates nothing.
    pub fn walk(
        &mut self,
        tables: &CfiTables,
        mem: &StackMemory<'_>,
        regs: &Registers,
        visit: impl FnMut(&Frame) -> ControlFlow<()>,
    ) -> WalkEnd {
        self.walk_regs(tables, mem, dwarf_regs(regs), visit)
    }

    /// As [`walk`](Self::walk), for a thread of which only the stack and instruction pointers
    /// are known (a thread waiting in a system call): frames whose CFA needs another register
    /// end the walk with [`Failure::LostRegister`].
    pub fn walk_sp_pc(
        &mut self,
        tables: &CfiTables,
        mem: &StackMemory<'_>,
        sp: u64,
        pc: u64,
        visit: impl FnMut(&Frame) -> ControlFlow<()>,
    ) -> WalkEnd {
        let mut regs: Regs = [None; dwarf::COUNT];
        regs[dwarf::RSP as usize] = Some(sp);
        regs[dwarf::RA as usize] = Some(pc);
        self.walk_regs(tables, mem, regs, visit)
    }

    fn walk_regs(
        &mut self,
        tables: &CfiTables,
        mem: &StackMemory<'_>,
        mut regs: Regs,
        mut visit: impl FnMut(&Frame) -> ControlFlow<()>,
    ) -> WalkEnd {
        let mut frame = Frame {
            depth: 0,
            pc: regs[dwarf::RA as usize].unwrap_or(0),
            sp: regs[dwarf::RSP as usize].unwrap_or(0),
            kind: FrameKind::Interrupted,
        };
        let mut region = mem.region(frame.sp as usize);
        loop {
            if visit(&frame).is_break() {
                return WalkEnd::Stopped;
            }
            let fail = |reason| WalkEnd::Failed {
                reason,
                at: frame,
                region,
            };
            let Some(reg) = region else {
                return fail(Failure::NoStack);
            };
            if frame.depth >= MAX_DEPTH {
                return fail(Failure::TooDeep);
            }
            let (kind, next) = if tables.is_sigreturn(frame.pc as usize) {
                // A handler returned here: the interrupted context is at the stack pointer.
                match mem.read_ucontext(reg, frame.sp as usize) {
                    Some(r) => (FrameKind::Signal, dwarf_regs(&r)),
                    None => return fail(Failure::BadFrame),
                }
            } else {
                match self.step(tables, mem, reg, &frame, &regs) {
                    Ok(Some(next)) => (FrameKind::Return, next),
                    Ok(None) => return WalkEnd::Outermost,
                    Err(reason) => return fail(reason),
                }
            };
            let pc = next[dwarf::RA as usize].unwrap_or(0);
            let sp = next[dwarf::RSP as usize].unwrap_or(0);
            if pc == 0 {
                // The thread's real outermost frames (`_start`, `clone`) say so in their CFI
                // (an undefined return address, handled by `step`); a zero found on the stack
                // is no proof that nothing lies above it.
                return WalkEnd::Failed {
                    reason: Failure::ZeroReturn,
                    at: frame,
                    region,
                };
            }
            regs = next;
            frame = Frame {
                depth: frame.depth + 1,
                pc,
                sp,
                kind,
            };
            if kind == FrameKind::Signal {
                region = mem.region(sp as usize);
            }
        }
    }

    /// One CFI step: the caller's registers, `None` at the outermost frame.
    fn step(
        &mut self,
        tables: &CfiTables,
        mem: &StackMemory<'_>,
        region: StackBounds,
        frame: &Frame,
        regs: &Regs,
    ) -> Result<Option<Regs>, Failure> {
        // A return address follows its call: look up the call itself.
        let lookup = match frame.kind {
            FrameKind::Return => frame.pc.wrapping_sub(1),
            FrameKind::Interrupted | FrameKind::Signal => frame.pc,
        };
        let (table, fde) = tables.fde_for(lookup).ok_or(Failure::NoFde)?;
        let row = fde
            .unwind_info_for_address(&table.eh_frame, &table.bases, &mut self.ctx, lookup)
            .map_err(|_| Failure::BadCfi)?;
        let cfa = match row.cfa() {
            CfaRule::RegisterAndOffset { register, offset } => regs
                .get(usize::from(register.0))
                .copied()
                .flatten()
                .ok_or(Failure::LostRegister)?
                .wrapping_add_signed(*offset),
            CfaRule::Expression(_) => return Err(Failure::BadCfi),
        };
        if cfa <= frame.sp || cfa as usize > region.end {
            return Err(Failure::BadFrame);
        }
        let mut next: Regs = [None; dwarf::COUNT];
        next[dwarf::RSP as usize] = Some(cfa);
        let callee_saved = [dwarf::RBX, dwarf::RBP, 12, 13, 14, dwarf::R15];
        debug_assert!(callee_saved.contains(&dwarf::R12));
        for reg in callee_saved.into_iter().chain([dwarf::RA]) {
            let value = match row.register(Register(reg)) {
                // Default rule: callee-saved registers keep their value; the return address
                // always has a rule in a sane CIE.
                None if reg == dwarf::RA => return Err(Failure::BadCfi),
                None | Some(RegisterRule::SameValue) => regs[usize::from(reg)],
                Some(RegisterRule::Undefined) if reg == dwarf::RA => return Ok(None),
                Some(RegisterRule::Undefined) => None,
                Some(RegisterRule::Offset(off)) => Some(
                    mem.read(region, cfa.wrapping_add_signed(off) as usize)
                        .ok_or(Failure::BadFrame)?,
                ),
                Some(RegisterRule::ValOffset(off)) => Some(cfa.wrapping_add_signed(off)),
                Some(RegisterRule::Register(r)) => regs.get(usize::from(r.0)).copied().flatten(),
                Some(_) if reg == dwarf::RA => return Err(Failure::BadCfi),
                Some(_) => None,
            };
            next[usize::from(reg)] = value;
        }
        if next[dwarf::RA as usize].is_none() {
            return Err(Failure::LostRegister);
        }
        Ok(Some(next))
    }
}

/// Checks a patch's `.eh_frame` before anyone unwinds with it: it must parse, use only the
/// pointer encodings the C runtime's unwinder handles (absolute or pc-relative, 4 or 8
/// bytes), and describe only code of the patch (`allowed`): a table covering another module's
/// code would shadow that module's own unwind information for every exception and for the
/// activeness check.
///
/// # Safety
/// `[start, start + len)` is mapped readable while this runs.
pub unsafe fn validate_patch_eh_frame(
    start: usize,
    len: usize,
    allowed: &[(usize, usize)],
) -> Result<usize, String> {
    use gimli::constants::{
        DW_EH_PE_absptr, DW_EH_PE_pcrel, DW_EH_PE_sdata4, DW_EH_PE_sdata8, DW_EH_PE_udata4,
        DW_EH_PE_udata8,
    };
    // SAFETY: forwarded from this function's contract.
    let data = unsafe { mapped(start, len) };
    let eh_frame = EhFrame::new(data, NativeEndian);
    let bases = BaseAddresses::default().set_eh_frame(start as u64);
    let supported = |e: gimli::DwEhPe| {
        let format = gimli::DwEhPe(e.0 & 0x0f);
        let application = gimli::DwEhPe(e.0 & 0x70);
        e.0 & 0x80 == 0
            && [
                DW_EH_PE_absptr,
                DW_EH_PE_udata4,
                DW_EH_PE_sdata4,
                DW_EH_PE_udata8,
                DW_EH_PE_sdata8,
            ]
            .contains(&format)
            && [DW_EH_PE_absptr, DW_EH_PE_pcrel].contains(&application)
    };
    let mut entries = eh_frame.entries(&bases);
    let mut fdes = 0;
    while let Some(entry) = entries
        .next()
        .map_err(|e| format!("malformed .eh_frame: {e}"))?
    {
        let gimli::CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let fde = partial
            .parse(EhFrame::cie_from_offset)
            .map_err(|e| format!("malformed FDE: {e}"))?;
        let cie = fde.cie();
        let personality = cie.personality_with_encoding().map(|(e, _)| e);
        let encodings = [cie.fde_address_encoding(), cie.lsda_encoding(), personality];
        // The personality pointer may be indirect (through `DW.ref.*`), as compilers emit it.
        let personality_ok = personality.is_none_or(|e| supported(gimli::DwEhPe(e.0 & 0x7f)));
        if !encodings[..2].iter().flatten().all(|&e| supported(e)) || !personality_ok {
            return Err("unsupported pointer encoding in a CIE".into());
        }
        let (lo, hi) = (fde.initial_address() as usize, fde.end_address() as usize);
        if !allowed.iter().any(|&(a, b)| a <= lo && hi <= b) {
            return Err(format!(
                "an FDE describes {lo:#x}..{hi:#x}, outside the patch's code"
            ));
        }
        fdes += 1;
    }
    Ok(fdes)
}
