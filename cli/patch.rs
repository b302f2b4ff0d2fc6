//! Reading a patch file named on the command line, with the checks `dsu` can make locally.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use dsu_agent::control::MAX_PATCH_SIZE;

use crate::error::CliError;

/// Reads `path` and refuses it unless it is an ELF file within the agent's size limit. The
/// agent checks everything else (class, machine, relocatable type, symbols); this only spares
/// a round trip for the obvious mistakes, such as passing the source file.
///
/// The file is where a patch could be swapped on its way to the agent, so it is opened
/// without following a symbolic link (`O_NOFOLLOW`) and must be a regular file owned by the
/// user running `dsu` or by root, writable by neither group nor others. The checks are made on
/// the opened descriptor, so what is checked is what is read.
pub fn read_patch(path: &Path) -> Result<Vec<u8>, CliError> {
    let read_error = |source| CliError::ReadPatch {
        path: path.to_owned(),
        source,
    };
    // Non-blocking: a FIFO named as the patch must not hang `open`.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                CliError::PatchSymlink {
                    path: path.to_owned(),
                }
            } else {
                read_error(e)
            }
        })?;
    let meta = file.metadata().map_err(read_error)?;
    check_file(path, &meta, crate::sys::effective_uid())?;
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

/// A regular file, owned by `me` or root, not writable by group or others.
fn check_file(path: &Path, meta: &std::fs::Metadata, me: u32) -> Result<(), CliError> {
    if !meta.is_file() {
        return Err(CliError::PatchNotFile {
            path: path.to_owned(),
        });
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Err(CliError::PatchOwner {
            path: path.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(CliError::PatchWritable {
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Reads a whole file for `keygen`, `sign` and `pack`, naming it on failure.
pub fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| file_error(what, path, e))
}

/// Writes `bytes` to `path` through a temporary file renamed over it, with `mode`; with
/// `new`, an existing `path` is refused instead of replaced.
pub fn write_file(
    what: &'static str,
    path: &Path,
    bytes: &[u8],
    mode: u32,
    new: bool,
) -> Result<(), CliError> {
    use std::io::Write;
    if new && std::fs::symlink_metadata(path).is_ok() {
        return Err(file_error(
            what,
            path,
            io::Error::new(io::ErrorKind::AlreadyExists, "it exists; remove it first"),
        ));
    }
    let name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let temp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(file_error(what, path, e));
    }
    Ok(())
}

fn file_error(what: &'static str, path: &Path, e: io::Error) -> CliError {
    CliError::File {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_a_private_regular_file_of_mine_or_roots_passes() {
        let dir = std::env::temp_dir().join(format!("dsu-patch-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.o");
        std::fs::write(&file, b"\x7fELF").unwrap();
        let me = crate::sys::effective_uid();
        let check = |mode: u32, me: u32| {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            check_file(&file, &std::fs::metadata(&file).unwrap(), me)
        };
        assert!(check(0o644, me).is_ok());
        assert!(matches!(
            check(0o664, me),
            Err(CliError::PatchWritable { .. })
        ));
        assert!(matches!(
            check(0o646, me),
            Err(CliError::PatchWritable { .. })
        ));
        if me != 0 {
            assert!(matches!(
                check(0o644, me + 1),
                Err(CliError::PatchOwner { .. })
            ));
        }
        assert!(matches!(
            check_file(&dir, &std::fs::metadata(&dir).unwrap(), me),
            Err(CliError::PatchNotFile { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
