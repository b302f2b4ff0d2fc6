//! A file's bytes mapped read-only, for parsing ELF files without a system call per read.
//!
//! The agent reads the symbol tables of every loaded module at start-up. Read through
//! `object::ReadCache`, each symbol name was an `lseek` and a `read`: most of the 30-40 ms of
//! CPU an agent spent starting. Mapped, the names are read from the page cache the loader
//! already filled.
//!
//! A mapped file that another program truncates makes reads past its new end fault
//! (`SIGBUS`). The files mapped here are the modules the process runs: truncating one breaks
//! the process at its next page fault in that module's code anyway, and the running
//! executable cannot be written at all (`ETXTBSY`). Replacing a file (a new inode, as package
//! managers do) leaves the mapping on the old one.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// A whole file mapped `PROT_READ`, `MAP_PRIVATE`; unmapped on drop.
#[derive(Debug)]
pub struct FileMap {
    addr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value: sharing or moving it between
// threads shares or moves immutable bytes.
unsafe impl Send for FileMap {}
// SAFETY: as above; no method mutates through `&self`.
unsafe impl Sync for FileMap {}

impl FileMap {
    /// Maps the whole of `file` (as it is now). An empty file maps to an empty slice.
    pub fn of(file: &File) -> io::Result<FileMap> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::from(io::ErrorKind::FileTooLarge))?;
        if len == 0 {
            return Ok(FileMap {
                addr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
            });
        }
        // SAFETY: a fresh read-only private mapping of an open file at an address the kernel
        // chooses replaces nothing; the descriptor may be closed afterwards.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(FileMap {
            addr: ptr as *const u8,
            len,
        })
    }

    /// Opens and maps the file at `path`.
    pub fn open(path: &std::path::Path) -> io::Result<FileMap> {
        FileMap::of(&File::open(path)?)
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `addr..addr + len` is mapped readable for the life of `self` (or `len` is 0
        // and `addr` is a dangling, aligned pointer, valid for an empty slice).
        unsafe { std::slice::from_raw_parts(self.addr, self.len) }
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping `of` made, which no slice outlives (`bytes`
            // borrows `self`).
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_a_file_as_it_is_and_an_empty_one_as_nothing() {
        let dir = std::env::temp_dir().join(format!("dsu-file-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(b"\x7fELF and more").unwrap();
        drop(f);
        let map = FileMap::open(&path).unwrap();
        assert_eq!(map.bytes(), b"\x7fELF and more");
        drop(map); // before the truncation below: reading it afterwards would fault
        std::fs::write(&path, b"").unwrap();
        assert_eq!(FileMap::open(&path).unwrap().bytes(), b"");
        assert!(FileMap::open(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
