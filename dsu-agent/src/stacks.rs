//! Stacks no thread is running on: the stacks of suspended coroutines (`makecontext` /
//! `swapcontext`, boost.context fibres, green threads) that a program declares so the
//! activeness check covers them.
//!
//! A coroutine suspended inside a function keeps a return address into it on its own stack,
//! which no thread's walk reaches; writing new code over that function in place, or
//! reverting a patch under it, crashes the coroutine when it resumes. A program that switches
//! stacks declares each one with [`declare`] (C: `dsu_stack_declare`) when it creates it and
//! [`forget`]s it (C: `dsu_stack_forget`) before it frees it. Every activeness check then
//! scans each declared stack that no thread runs on, conservatively, word by word
//! ([`crate::check::Checker::find_active_declared`]).
//!
//! The registry is a fixed table of [`CAPACITY`] slots of atomics: the agent reads it while
//! threads are stopped, without a lock and without allocating. Declaring and forgetting take
//! a lock among themselves only (the agent never takes it), so they are cheap, callable from
//! any thread at any time, but not from a signal handler.
//!
//! Whether a program switches stacks without declaring them is detected before an update
//! stops anything ([`undeclared_switching`]): a loaded module other than the C library that
//! imports `makecontext` or `swapcontext`, or a module that defines boost.context's
//! `make_fcontext` / `jump_fcontext`. Such a program is refused unless it has declared a
//! stack at least once (it then manages its stacks) or the policy allows it.

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::Mutex;

/// How many stacks can be declared at once.
pub const CAPACITY: usize = 16 * 1024;

/// One slot: `lo == 0` is free; `hi` is written before `lo` is published.
struct Slot {
    lo: AtomicUsize,
    hi: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialise `SLOTS`
const FREE: Slot = Slot {
    lo: AtomicUsize::new(0),
    hi: AtomicUsize::new(0),
};

static SLOTS: [Slot; CAPACITY] = [FREE; CAPACITY];
/// Slots at or above this index have never been used: readers stop there.
static HIGH: AtomicUsize = AtomicUsize::new(0);
/// Set by the first successful [`declare`]: the program manages its stacks.
static EVER: AtomicBool = AtomicBool::new(false);
/// Serialises declare and forget (never taken by the agent).
static WRITERS: Mutex<()> = Mutex::new(());

/// Why a stack was not declared or forgotten. Each has an errno-style code for the C API
/// ([`StackError::errno`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StackError {
    #[error("a stack cannot start at address 0")]
    Null,
    #[error("the stack at {lo:#x} is empty (length 0)")]
    Empty { lo: usize },
    #[error("a stack of {len} bytes at {lo:#x} would wrap around the end of the address space")]
    Overflow { lo: usize, len: usize },
    #[error(
        "the stack {lo:#x}-{hi:#x} overlaps the declared stack {other_lo:#x}-{other_hi:#x}; \
         forget that one first"
    )]
    Overlaps {
        lo: usize,
        hi: usize,
        other_lo: usize,
        other_hi: usize,
    },
    #[error("no declared stack starts at {lo:#x}")]
    NotDeclared { lo: usize },
    #[error("{CAPACITY} stacks are declared already; forget the stacks of finished coroutines")]
    Full,
}

impl StackError {
    /// The negative errno-style code the C API returns for it.
    pub fn errno(&self) -> c_int {
        match self {
            StackError::Null | StackError::Empty { .. } => -libc::EINVAL,
            StackError::Overflow { .. } => -libc::EOVERFLOW,
            StackError::Overlaps { .. } => -libc::EEXIST,
            StackError::NotDeclared { .. } => -libc::ENOENT,
            StackError::Full => -libc::ENOSPC,
        }
    }
}

/// A declared stack: `[lo, hi)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeclaredStack {
    pub lo: usize,
    pub hi: usize,
}

impl DeclaredStack {
    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.lo && addr < self.hi
    }
}

impl std::fmt::Display for DeclaredStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "declared stack {:#x}-{:#x}", self.lo, self.hi)
    }
}

/// Declares `[lo, lo + len)` as a stack code may run on (and be suspended on) while no
/// thread runs there, such as a coroutine's. Every activeness check scans it until it is
/// [`forget`]ed. Nothing is read or written there by this call.
pub fn declare(lo: usize, len: usize) -> Result<DeclaredStack, StackError> {
    if lo == 0 {
        return Err(StackError::Null);
    }
    if len == 0 {
        return Err(StackError::Empty { lo });
    }
    let hi = lo
        .checked_add(len)
        .ok_or(StackError::Overflow { lo, len })?;
    let _writers = WRITERS.lock();
    let mut free = None;
    let high = HIGH.load(Ordering::Relaxed);
    for (i, slot) in SLOTS[..high].iter().enumerate() {
        let other_lo = slot.lo.load(Ordering::Relaxed);
        if other_lo == 0 {
            free.get_or_insert(i);
            continue;
        }
        let other_hi = slot.hi.load(Ordering::Relaxed);
        if lo < other_hi && other_lo < hi {
            return Err(StackError::Overlaps {
                lo,
                hi,
                other_lo,
                other_hi,
            });
        }
    }
    let i = match free {
        Some(i) => i,
        None if high < CAPACITY => {
            HIGH.store(high + 1, Ordering::Release);
            high
        }
        None => return Err(StackError::Full),
    };
    SLOTS[i].hi.store(hi, Ordering::Relaxed);
    SLOTS[i].lo.store(lo, Ordering::Release);
    EVER.store(true, Ordering::Release);
    Ok(DeclaredStack { lo, hi })
}

/// Forgets the declared stack that starts at `lo`. Call it before the stack's memory is
/// freed or reused for something else.
pub fn forget(lo: usize) -> Result<DeclaredStack, StackError> {
    if lo == 0 {
        return Err(StackError::NotDeclared { lo });
    }
    let _writers = WRITERS.lock();
    let high = HIGH.load(Ordering::Relaxed);
    let slot = SLOTS[..high]
        .iter()
        .find(|s| s.lo.load(Ordering::Relaxed) == lo)
        .ok_or(StackError::NotDeclared { lo })?;
    let hi = slot.hi.load(Ordering::Relaxed);
    slot.lo.store(0, Ordering::Release);
    Ok(DeclaredStack { lo, hi })
}

/// Whether the program has ever declared a stack: it then declares the stacks it switches to.
pub fn ever_declared() -> bool {
    EVER.load(Ordering::Acquire)
}

/// Calls `f` with every stack declared now, until it breaks. Lock-free and allocation-free:
/// safe while threads are stopped (a stopped thread may be inside [`declare`] or
/// [`forget`]; a stack declared or forgotten meanwhile may or may not be seen, and a slot
/// read while it changes is skipped or seen with one of its two values).
pub fn for_each<B>(mut f: impl FnMut(DeclaredStack) -> std::ops::ControlFlow<B>) -> Option<B> {
    let high = HIGH.load(Ordering::Acquire).min(CAPACITY);
    for slot in &SLOTS[..high] {
        let lo = slot.lo.load(Ordering::Acquire);
        if lo == 0 {
            continue;
        }
        let hi = slot.hi.load(Ordering::Acquire);
        if hi <= lo || slot.lo.load(Ordering::Acquire) != lo {
            continue;
        }
        if let std::ops::ControlFlow::Break(b) = f(DeclaredStack { lo, hi }) {
            return Some(b);
        }
    }
    None
}

/// The declared stack holding `addr`, if any. Allocation-free, lock-free.
pub fn containing(addr: usize) -> Option<DeclaredStack> {
    for_each(|s| {
        if s.contains(addr) {
            std::ops::ControlFlow::Break(s)
        } else {
            std::ops::ControlFlow::Continue(())
        }
    })
}

/// A sign that the program switches stacks, found in a loaded module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switching {
    /// The module's file.
    pub module: String,
    /// The function that shows it (`makecontext`, `swapcontext`, `make_fcontext`, ...).
    pub function: &'static str,
    /// Whether the module imports it (else it defines it).
    pub imports: bool,
}

impl std::fmt::Display for Switching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.imports { "imports" } else { "defines" };
        write!(f, "{} {verb} {}", self.module, self.function)
    }
}

/// Functions whose import shows that a module switches stacks.
const IMPORTED: [&str; 2] = ["makecontext", "swapcontext"];
/// Functions whose definition shows it (boost.context).
const DEFINED: [&str; 2] = ["make_fcontext", "jump_fcontext"];

/// The first sign that the program switches stacks, if it has never declared a stack. Reads
/// the dynamic symbol tables of the loaded modules (cached per module and load address).
/// Allocates: call it before threads are stopped.
pub fn undeclared_switching() -> Option<Switching> {
    if ever_declared() {
        return None;
    }
    static CACHE: Mutex<Vec<(String, usize, Option<Switching>)>> = Mutex::new(Vec::new());
    let modules = dsu_sys::modules::loaded();
    let mut cache = CACHE.lock();
    for m in &modules {
        let Some(path) = &m.path else { continue };
        let known = cache
            .iter()
            .find(|(p, bias, _)| *bias == m.bias && p == &m.name)
            .map(|(_, _, found)| found.clone());
        let found = match known {
            Some(found) => found,
            None => {
                let name = if m.is_main {
                    path.display().to_string()
                } else {
                    m.name.clone()
                };
                let found = scan_module(path, &name);
                cache.push((m.name.clone(), m.bias, found.clone()));
                found
            }
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// The sign of stack switching in one module's `.dynsym`, if any. The C library itself
/// defines the ucontext functions and is not a sign.
fn scan_module(path: &std::path::Path, name: &str) -> Option<Switching> {
    use object::read::elf::{FileHeader, Sym};
    use object::{Endianness, elf};

    // Mapped: read through `object::ReadCache`, each name was a system call.
    let map = dsu_sys::file_map::FileMap::open(path).ok()?;
    let data = map.bytes();
    let header = elf::FileHeader64::<Endianness>::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let sections = header.sections(endian, data).ok()?;
    let table = sections.symbols(endian, data, elf::SHT_DYNSYM).ok()?;
    for sym in table.iter() {
        let Ok(sym_name) = table.symbol_name(endian, sym) else {
            continue;
        };
        let Ok(sym_name) = std::str::from_utf8(sym_name) else {
            continue;
        };
        if sym.is_undefined(endian) {
            if let Some(&function) = IMPORTED.iter().find(|&&f| f == sym_name) {
                return Some(Switching {
                    module: name.to_string(),
                    function,
                    imports: true,
                });
            }
        } else if let Some(&function) = DEFINED.iter().find(|&&f| f == sym_name) {
            return Some(Switching {
                module: name.to_string(),
                function,
                imports: false,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the registry is process-global.
    #[test]
    fn declare_and_forget_refuse_bad_input_precisely() {
        assert_eq!(declare(0, 4096), Err(StackError::Null));
        assert_eq!(declare(0x1000, 0), Err(StackError::Empty { lo: 0x1000 }));
        assert_eq!(
            declare(usize::MAX - 10, 4096),
            Err(StackError::Overflow {
                lo: usize::MAX - 10,
                len: 4096
            })
        );
        let s = declare(0x10000, 0x1000).unwrap();
        assert_eq!(s.to_string(), "declared stack 0x10000-0x11000");
        assert!(ever_declared());
        assert_eq!(containing(0x10800), Some(s));
        assert_eq!(containing(0x11000), None);
        assert!(matches!(
            declare(0x10800, 0x1000),
            Err(StackError::Overlaps {
                other_lo: 0x10000,
                ..
            })
        ));
        // Adjacent is fine.
        let t = declare(0x11000, 0x1000).unwrap();
        assert_eq!(
            forget(0x10008),
            Err(StackError::NotDeclared { lo: 0x10008 })
        );
        assert_eq!(forget(0x10000), Ok(s));
        assert_eq!(
            forget(0x10000),
            Err(StackError::NotDeclared { lo: 0x10000 })
        );
        assert_eq!(forget(0), Err(StackError::NotDeclared { lo: 0 }));
        // The freed slot is reused.
        let high = HIGH.load(Ordering::Relaxed);
        declare(0x20000, 0x1000).unwrap();
        assert_eq!(HIGH.load(Ordering::Relaxed), high);
        let mut seen = Vec::new();
        for_each::<()>(|s| {
            seen.push(s);
            std::ops::ControlFlow::Continue(())
        });
        seen.sort_by_key(|s| s.lo);
        assert_eq!(
            seen,
            [
                t,
                DeclaredStack {
                    lo: 0x20000,
                    hi: 0x21000
                }
            ]
        );
        forget(0x11000).unwrap();
        forget(0x20000).unwrap();
        assert_eq!(StackError::Full.errno(), -libc::ENOSPC);
        assert_eq!(StackError::Null.errno(), -libc::EINVAL);
    }
}
