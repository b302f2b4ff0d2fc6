//! Write: store the prepared entry jumps while every other thread is parked, then make every
//! core resynchronise before any of them runs again.
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
