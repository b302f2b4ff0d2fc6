//! The few system calls `dsu` makes that `std` does not wrap (a pidfd and waiting on it, a
//! link read relative to a directory), and reading `/proc` files in as few calls as `std`
//! would need for a regular file.
//!
//! Each function is one call with its `unsafe` block, returning `io::Result`. They are here
//! rather than in `dsu-sys` because the agent never needs them.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

/// The first read of a `/proc` file asks for this much: a `status` file is about 1.5 KiB.
const PROC_READ: usize = 4096;

/// The text of a `/proc` file. These report a size of 0, so `fs::read_to_string` starts with
/// 32-byte reads and doubles, a system call each (eight for a `status` file, each formatting
/// the file again); a host-wide command reads several per process. One buffer sized for the
/// usual file makes that one read and the one that sees the end.
pub fn read_proc_text(path: impl AsRef<Path>) -> io::Result<String> {
    let mut buf = Vec::with_capacity(PROC_READ);
    File::open(path)?.read_to_end(&mut buf)?;
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// This process's effective uid.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// `pidfd_open(2)`: a descriptor that names process `pid` for as long as it lives, so that a
/// later signal cannot reach another process that reused the pid, and that becomes readable
/// when the process exits.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `kill(2)`; signal 0 only checks that the process exists. `pid` must be positive: 0 and
/// negative values address process groups.
pub fn kill(pid: libc::pid_t, signal: i32) -> io::Result<()> {
    debug_assert!(pid > 0, "kill({pid}) would signal a process group");
    // SAFETY: kill takes two integers; a positive pid addresses one process.
    if unsafe { libc::kill(pid, signal) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `readlinkat(2)`: the target of the symbolic link `name` in directory `dir`, as much as fits
/// in `buf`; returns the length written (a target that fills `buf` may be cut short).
pub fn readlink_at(dir: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `name` is NUL-terminated; the kernel writes at most `buf.len()` bytes to `buf`,
    // which is valid for writes of that length for the duration of the call.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    debug_assert!(n as usize <= buf.len(), "readlinkat wrote past the buffer");
    Ok(n as usize)
}

/// Waits up to `timeout` until one of `fds` is readable; returns which are. An interrupted
/// wait returns all false, like a timeout: callers loop anyway.
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<bool>> {
    dsu_sys::net::poll_readable(fds, Some(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_proc_file_is_read_whole_and_bad_text_is_refused() {
        let status = read_proc_text("/proc/self/status").unwrap();
        assert!(status.contains("\nUid:"), "{status}");
        // Longer than the first read: the rest is read too.
        let path = std::env::temp_dir().join(format!("dsu-proc-text-{}", std::process::id()));
        let text = "0123456789abcdef\n".repeat(3 * PROC_READ / 16);
        std::fs::write(&path, &text).unwrap();
        assert_eq!(read_proc_text(&path).unwrap(), text);
        std::fs::write(&path, b"\xff\xfe").unwrap();
        let e = read_proc_text(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let _ = std::fs::remove_file(&path);
        let e = read_proc_text("/proc/self/no-such-file").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn links_are_read_relative_to_a_directory() {
        let (a, _b) = UnixStream::pair().unwrap();
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", a.as_raw_fd()))
            .unwrap()
            .ino();
        let dir = File::open("/proc/self/fd").unwrap();
        let name = CString::new(a.as_raw_fd().to_string()).unwrap();
        let mut buf = [0u8; 64];
        let n = readlink_at(dir.as_fd(), &name, &mut buf).unwrap();
        assert_eq!(&buf[..n], format!("socket:[{inode}]").as_bytes());
        // A buffer too small gets the first bytes.
        let mut small = [0u8; 4];
        assert_eq!(readlink_at(dir.as_fd(), &name, &mut small).unwrap(), 4);
        assert_eq!(&small, b"sock");
        let missing = CString::new("999999").unwrap();
        let e = readlink_at(dir.as_fd(), &missing, &mut buf).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
