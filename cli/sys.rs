//! The few system calls `dsu` makes that `std` does not wrap: a pidfd and waiting on it.
//!
//! Each function is one call with its `unsafe` block, returning `io::Result`. They are here
//! rather than in `dsu-sys` because the agent never needs them.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

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

/// Waits up to `timeout` until one of `fds` is readable; returns which are. An interrupted
/// wait returns all false, like a timeout: callers loop anyway.
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<bool>> {
    dsu_sys::net::poll_readable(fds, Some(timeout))
}
