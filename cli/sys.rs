//! The few system calls `dsu` makes that `std` does not wrap: a pidfd and waiting on it.
//!
//! Each function is one call with its `unsafe` block, returning `io::Result`. They are here
//! rather than in `dsu-sys` because the agent never needs them.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
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
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: polls is a valid array of polls.len() entries and ts a valid timespec, both
    // alive across the call; a null sigmask keeps the current mask.
    let rc = unsafe {
        libc::ppoll(
            polls.as_mut_ptr(),
            polls.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(err);
    }
    Ok(polls.iter().map(|p| p.revents != 0).collect())
}
