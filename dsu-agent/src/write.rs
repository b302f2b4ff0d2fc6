//! Write: store the prepared edits and make every core resynchronise before any thread runs
//! them. With every other thread parked, [`apply_all`] writes each edit at once; while threads
//! that wait in system calls keep running, [`place_breakpoints`] and
//! [`finish_behind_breakpoints`] write in the three steps of [`crate::hold`].
//!
//! **Runs while threads are stopped**: everything here is async-signal-safe. It allocates
//! nothing, takes no lock and prints nothing; errors carry only an index and an OS error code.
//!
//! Unsafe code is allowed here: this module writes code while other threads are stopped; every
//! block states its invariant.

#![allow(unsafe_code)]

use std::io;

use dsu_sys::code::CodeWriter;
use dsu_sys::cpu;

use crate::hold::BREAKPOINT;

/// One code change: `bytes` replace `original` (of the same length) at `site`. Built before
/// the stop; writing it only reads the buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeEdit {
    pub site: usize,
    pub bytes: Vec<u8>,
    pub original: Vec<u8>,
}

impl CodeEdit {
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// A write that failed: which edit, and the OS error (no allocation).
#[derive(Debug)]
pub struct WriteFailure {
    pub index: usize,
    pub error: io::Error,
    /// Whether every edit written before the failing one was restored.
    pub rolled_back: bool,
}

/// Applies all `edits` or none: on a failure the edits already written are restored.
/// Runs while threads are stopped.
///
/// # Safety
/// Every other thread of the process is parked outside the edited bytes (the activeness
/// check passed), and each `site` lies in mapped code.
pub unsafe fn apply_all(writer: &CodeWriter, edits: &[CodeEdit]) -> Result<(), WriteFailure> {
    for (index, edit) in edits.iter().enumerate() {
        // SAFETY: guaranteed by the caller: mapped, and no thread executes these bytes.
        if let Err(error) = unsafe { writer.write(edit.site, &edit.bytes) } {
            let mut rolled_back = true;
            for done in edits[..index].iter().rev() {
                // SAFETY: as above; restoring bytes this function just wrote.
                rolled_back &= unsafe { writer.write(done.site, &done.original) }.is_ok();
                cpu::flush_icache(done.site, done.original.len());
            }
            let _ = cpu::sync_cores();
            return Err(WriteFailure {
                index,
                error,
                rolled_back,
            });
        }
        cpu::flush_icache(edit.site, edit.bytes.len());
    }
    // Parked threads resume through `sigreturn`, which serialises, but a thread interrupted
    // by the kernel elsewhere must not run stale prefetched bytes either.
    let _ = cpu::sync_cores();
    Ok(())
}

/// Step 1 of a write while some threads run ([`crate::hold`]): an `int3` on the first byte of
/// every edit, then every core resynchronised. From then on a thread that reaches a site is
/// held there. On a failure the breakpoints already placed are removed again.
/// Runs while threads are held: async-signal-safe.
///
/// # Safety
/// Each `site` lies in mapped code and starts an instruction (or is the entry of a function);
/// a breakpoint window is open ([`crate::hold::Window`]) and every site is registered.
pub unsafe fn place_breakpoints(
    writer: &CodeWriter,
    edits: &[CodeEdit],
) -> Result<(), WriteFailure> {
    for (index, edit) in edits.iter().enumerate() {
        // SAFETY: a one-byte store is atomic for every core: a thread executes either the old
        // instruction or the breakpoint (the caller vouches for the site).
        if let Err(error) = unsafe { writer.write(edit.site, &[BREAKPOINT]) } {
            let rolled_back = restore_first_bytes(writer, &edits[..index]);
            let _ = cpu::sync_cores();
            return Err(WriteFailure {
                index,
                error,
                rolled_back,
            });
        }
    }
    let _ = cpu::sync_cores();
    Ok(())
}

/// Undoes [`place_breakpoints`]: the original first byte of every edit, then every core
/// resynchronised. Returns whether every byte was restored. Async-signal-safe.
///
/// # Safety
/// As for [`place_breakpoints`], and only the first bytes were changed.
pub unsafe fn remove_breakpoints(writer: &CodeWriter, edits: &[CodeEdit]) -> bool {
    let restored = restore_first_bytes(writer, edits);
    let _ = cpu::sync_cores();
    restored
}

/// Undoes a write behind breakpoints: the tails of `written` back, every core resynchronised,
/// then the first bytes of all `edits`, resynchronised again. Returns whether every byte was
/// restored. Async-signal-safe.
fn roll_back(writer: &CodeWriter, written: &[CodeEdit], edits: &[CodeEdit]) -> bool {
    let mut restored = restore_tails(writer, written);
    let _ = cpu::sync_cores();
    restored &= restore_first_bytes(writer, edits);
    let _ = cpu::sync_cores();
    restored
}

/// Puts back the bytes after the first of each edit (behind its breakpoint). Returns whether
/// every one was restored. Async-signal-safe.
fn restore_tails(writer: &CodeWriter, edits: &[CodeEdit]) -> bool {
    let mut restored = true;
    for e in edits.iter().rev().filter(|e| e.len() >= 2) {
        // SAFETY: no thread executes these bytes: their instruction starts with a breakpoint
        // (callers' contract); the original bytes go back.
        restored &= unsafe { writer.write(e.site + 1, &e.original[1..]) }.is_ok();
    }
    restored
}

fn restore_first_bytes(writer: &CodeWriter, edits: &[CodeEdit]) -> bool {
    let mut restored = true;
    for edit in edits.iter().rev() {
        let Some(&first) = edit.original.first() else {
            continue;
        };
        // SAFETY: puts back the byte this write replaced with a breakpoint (see callers).
        restored &= unsafe { writer.write(edit.site, &[first]) }.is_ok();
    }
    restored
}

/// Steps 2 and 3 of a write while some threads run: the bytes after the first of every edit,
/// every core resynchronised, then the first bytes, and every core resynchronised again. No
/// thread executes a site meanwhile: its first byte traps. On a failure every edit is put back
/// and the breakpoints removed. Async-signal-safe.
///
/// # Safety
/// [`place_breakpoints`] succeeded for `edits`, and the activeness check showed no thread
/// inside any edited range after that (threads held at a site have not executed it).
pub unsafe fn finish_behind_breakpoints(
    writer: &CodeWriter,
    edits: &[CodeEdit],
) -> Result<(), WriteFailure> {
    for (index, edit) in edits.iter().enumerate() {
        if edit.len() < 2 {
            continue;
        }
        // SAFETY: no thread executes these bytes: the instruction they belong to starts with a
        // breakpoint and no thread was inside (caller's contract).
        if let Err(error) = unsafe { writer.write(edit.site + 1, &edit.bytes[1..]) } {
            let rolled_back = roll_back(writer, &edits[..index], edits);
            return Err(WriteFailure {
                index,
                error,
                rolled_back,
            });
        }
        cpu::flush_icache(edit.site + 1, edit.len() - 1);
    }
    let _ = cpu::sync_cores();
    for (index, edit) in edits.iter().enumerate() {
        let Some(&first) = edit.bytes.first() else {
            continue;
        };
        // SAFETY: one atomic byte completes an instruction whose other bytes are in place and
        // synchronised on every core.
        if let Err(error) = unsafe { writer.write(edit.site, &[first]) } {
            // Rare (the same pages were just written): undo every edit, breakpoints first.
            let _ = cpu::sync_cores();
            let mut rolled_back = true;
            for e in edits {
                // SAFETY: restoring the original bytes of edits this function wrote.
                rolled_back &= unsafe { writer.write(e.site, &[BREAKPOINT]) }.is_ok();
            }
            let _ = cpu::sync_cores();
            rolled_back &= roll_back(writer, edits, edits);
            return Err(WriteFailure {
                index,
                error,
                rolled_back,
            });
        }
        cpu::flush_icache(edit.site, 1);
    }
    let _ = cpu::sync_cores();
    Ok(())
}

/// The inverse edits, in reverse order (to undo `edits`).
pub fn inverse(edits: &[CodeEdit]) -> Vec<CodeEdit> {
    edits
        .iter()
        .rev()
        .map(|e| CodeEdit {
            site: e.site,
            bytes: e.original.clone(),
            original: e.bytes.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two pages, the second unmapped again: a write that reaches past the first fails.
    struct Page {
        base: usize,
        size: usize,
    }

    impl Page {
        fn new() -> Page {
            // SAFETY: `sysconf` has no preconditions.
            let size = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap();
            // SAFETY: a fresh anonymous private mapping, no address hint; the second page is
            // unmapped at once, so only the first is ever touched.
            let base = unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    2 * size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                assert_eq!(libc::munmap(p.cast::<u8>().add(size).cast(), size), 0);
                p as usize
            };
            Page { base, size }
        }

        fn bytes(&self, at: usize, len: usize) -> Vec<u8> {
            assert!(at >= self.base && at + len <= self.base + self.size);
            // SAFETY: inside the mapped first page (asserted).
            unsafe { std::slice::from_raw_parts(at as *const u8, len) }.to_vec()
        }

        fn set(&self, at: usize, bytes: &[u8]) {
            assert!(at >= self.base && at + bytes.len() <= self.base + self.size);
            // SAFETY: inside the mapped, writable first page (asserted).
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at as *mut u8, bytes.len()) };
        }
    }

    impl Drop for Page {
        fn drop(&mut self) {
            // SAFETY: the first page, mapped in `new` and not used after this.
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.size) };
        }
    }

    fn edit(site: usize, bytes: &[u8], original: &[u8]) -> CodeEdit {
        CodeEdit {
            site,
            bytes: bytes.to_vec(),
            original: original.to_vec(),
        }
    }

    /// A write behind breakpoints that fails on its third edit (its tail runs off the mapping)
    /// puts every byte back, breakpoints included, and says so.
    #[test]
    fn a_failed_write_behind_breakpoints_puts_every_byte_back() {
        let page = Page::new();
        let writer = CodeWriter::open().unwrap();
        let last = page.base + page.size - 1;
        let edits = [
            edit(page.base, &[1, 2, 3, 4], &[0xa0, 0xa1, 0xa2, 0xa3]),
            edit(page.base + 16, &[5, 6, 7], &[0xb0, 0xb1, 0xb2]),
            edit(last, &[8, 9], &[0xc0, 0xc1]),
        ];
        page.set(page.base, &edits[0].original);
        page.set(page.base + 16, &edits[1].original);
        page.set(last, &edits[2].original[..1]);
        // SAFETY: the sites lie in a data page of this test that nothing executes.
        unsafe { place_breakpoints(&writer, &edits) }.unwrap();
        assert_eq!(page.bytes(page.base, 1), [BREAKPOINT]);
        assert_eq!(page.bytes(last, 1), [BREAKPOINT]);
        // SAFETY: as above.
        let failure = unsafe { finish_behind_breakpoints(&writer, &edits) }.unwrap_err();
        assert_eq!(failure.index, 2);
        assert!(failure.rolled_back, "every byte was put back");
        assert_eq!(page.bytes(page.base, 4), edits[0].original);
        assert_eq!(page.bytes(page.base + 16, 3), edits[1].original);
        assert_eq!(page.bytes(last, 1), edits[2].original[..1]);
    }

    /// Breakpoints that cannot all be placed are taken away again.
    #[test]
    fn breakpoints_not_all_placed_are_removed() {
        let page = Page::new();
        let writer = CodeWriter::open().unwrap();
        let edits = [
            edit(page.base, &[1, 2], &[0xa0, 0xa1]),
            edit(page.base + 8, &[3, 4], &[0xb0, 0xb1]),
            edit(page.base + page.size, &[5], &[0xc0]),
        ];
        page.set(page.base, &edits[0].original);
        page.set(page.base + 8, &edits[1].original);
        // SAFETY: the sites lie in this test's data page, or just past it (that write fails).
        let failure = unsafe { place_breakpoints(&writer, &edits) }.unwrap_err();
        assert_eq!(failure.index, 2);
        assert!(failure.rolled_back);
        assert_eq!(page.bytes(page.base, 2), edits[0].original);
        assert_eq!(page.bytes(page.base + 8, 2), edits[1].original);
    }

    /// A restore that cannot write says so, whatever was restored before or after it.
    #[test]
    fn a_restore_that_fails_is_reported() {
        let page = Page::new();
        let writer = CodeWriter::open().unwrap();
        let ok = edit(page.base, &[1, 2], &[0xa0, 0xa1]);
        let gone = edit(page.base + page.size, &[3, 4], &[0xb0, 0xb1]);
        page.set(page.base, &[BREAKPOINT, 2]);
        assert!(!restore_first_bytes(&writer, &[ok.clone(), gone.clone()]));
        assert!(!restore_first_bytes(&writer, &[gone.clone(), ok.clone()]));
        assert!(!restore_tails(&writer, &[ok.clone(), gone.clone()]));
        assert!(!restore_tails(&writer, &[gone.clone(), ok.clone()]));
        assert_eq!(
            page.bytes(page.base, 2),
            ok.original,
            "the good one still restored"
        );
        // Tails that fail, first bytes that do not (and the other way round).
        assert!(!roll_back(
            &writer,
            std::slice::from_ref(&gone),
            std::slice::from_ref(&ok)
        ));
        assert!(!roll_back(
            &writer,
            std::slice::from_ref(&ok),
            std::slice::from_ref(&gone)
        ));
        assert!(roll_back(
            &writer,
            std::slice::from_ref(&ok),
            std::slice::from_ref(&ok)
        ));
    }

    #[test]
    fn inverse_undoes_in_reverse_order() {
        let edits = [edit(10, &[1, 2], &[3, 4]), edit(20, &[5], &[6])];
        assert!(!edits[0].is_empty() && edit(30, &[], &[]).is_empty());
        let back = inverse(&edits);
        assert_eq!(back.len(), 2);
        assert_eq!(
            (back[0].site, &back[0].bytes[..], &back[0].original[..]),
            (20, &[6][..], &[5][..])
        );
        assert_eq!(
            (back[1].site, &back[1].bytes[..], &back[1].original[..]),
            (10, &[3, 4][..], &[1, 2][..])
        );
    }
}
