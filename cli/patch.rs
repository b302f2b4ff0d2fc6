//! Reading a patch file named on the command line, with the checks `dsu` can make locally.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use dsu_agent::control::MAX_PATCH_SIZE;

use crate::error::CliError;

/// Reads `path` and refuses it unless it is an ELF file within the agent's size limit. The
/// agent checks everything else (class, machine, relocatable type, symbols); this only spares
/// a round trip for the obvious mistakes, such as passing the source file.
pub fn read_patch(path: &Path) -> Result<Vec<u8>, CliError> {
    let read_error = |source| CliError::ReadPatch {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    // One byte over the limit is enough to know it is too large.
    file.take(MAX_PATCH_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_PATCH_SIZE {
        return Err(CliError::PatchTooLarge {
            path: path.to_owned(),
            limit: MAX_PATCH_SIZE,
        });
    }
    if !bytes.starts_with(b"\x7fELF") {
        return Err(CliError::NotElf {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}
