//! Debuggers see new code: each applied patch's new functions are announced through GDB's JIT
//! interface ([`dsu_sys::gdb_jit`]), so that a debugger attached to the process names them in
//! a backtrace and unwinds out of them into their callers.
//!
//! For a patch the engine builds a [`symfile`]: an ELF object in memory holding the names,
//! addresses and sizes of the new code in the patch's image (replaced functions under their
//! own names, and the patch's helpers) and a copy of the patch's `.eh_frame`, which is already
//! relocated to where the code runs. The symfile is linked into the interface's list once the
//! update is committed and the threads run again (it allocates), and unlinked when the patch
//! is reverted, before its code is unmapped. Dropping the [`Announcement`] unlinks it.
//!
//! A function replaced in place needs no entry: its new code lies in the old function's bytes,
//! which the module's own symbol names, and its unwind rules are the old ones (checked before
//! an in-place write is chosen).
//!
//! Announcing is a courtesy to debuggers: a failure never fails an update; the engine reports
//! it as a warning.

mod elf;
pub mod symfile;

use dsu_sys::gdb_jit::{Interface, Registration};
use thiserror::Error;

pub use self::symfile::{Contents, Function, SymfileError};

/// Why a patch's code could not be announced to debuggers.
#[derive(Debug, Error)]
pub enum AnnounceError {
    #[error("cannot describe patch {id}'s code for debuggers: {source}")]
    Symfile {
        id: u64,
        #[source]
        source: SymfileError,
    },
    #[error(
        "cannot register patch {id}'s code with the debuggers' JIT interface \
         (descriptor at {descriptor:#x}): {source}"
    )]
    Register {
        id: u64,
        descriptor: usize,
        #[source]
        source: std::io::Error,
    },
}

/// One patch's code, announced to debuggers until dropped.
#[derive(Debug)]
pub struct Announcement {
    /// The patch it describes.
    pub id: u64,
    registration: Registration,
}

impl Announcement {
    /// The symfile registered.
    pub fn symfile(&self) -> &[u8] {
        self.registration.symfile()
    }
}

/// Announces patch `id`'s code to debuggers, through the process's JIT interface (see
/// [`dsu_sys::gdb_jit`] for which one). `None` when there is nothing to name. Allocates and
/// takes locks: never call it while threads are stopped.
pub fn announce(id: u64, contents: &Contents<'_>) -> Result<Option<Announcement>, AnnounceError> {
    if contents.functions.is_empty() {
        return Ok(None);
    }
    let symfile =
        symfile::build(contents).map_err(|source| AnnounceError::Symfile { id, source })?;
    let interface = Interface::of_process();
    let registration =
        Registration::register(interface, symfile.into_boxed_slice()).map_err(|source| {
            AnnounceError::Register {
                id,
                descriptor: interface.descriptor_address(),
                source,
            }
        })?;
    Ok(Some(Announcement { id, registration }))
}
