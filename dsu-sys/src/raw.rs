//! System calls issued with the `syscall` instruction itself, not through the C library.
//!
//! Everything a thread does while an update holds other threads, or while it waits parked or
//! at a breakpoint, goes through here: the C library is code a patch may replace (a libc
//! security fix is a main use of live patching), and a thread sleeping inside libc's
//! `syscall()` or writing code with libc's `pwrite64` would return into bytes that were
//! rewritten under it. These wrappers are inlined into the caller and touch no `errno`.
//!
//! *Async-signal-safe*. `unsafe` here: the `syscall` instruction, whose memory effects are
//! the caller's responsibility.

use std::arch::asm;
use std::io;

/// A raw x86_64 `syscall` with up to six arguments; returns the kernel's value (negative
/// errno on failure).
///
/// # Safety
/// The system call's own preconditions for any memory its arguments point to.
#[inline(always)]
pub unsafe fn syscall6(nr: libc::c_long, args: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the `syscall` instruction clobbers only rax (result), rcx and r11, declared
    // here; memory effects are the caller's responsibility (see `# Safety`).
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") args[0],
            in("rsi") args[1],
            in("rdx") args[2],
            in("r10") args[3],
            in("r8") args[4],
            in("r9") args[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack, preserves_flags)
        );
    }
    ret
}

/// A raw system call's value as a result.
#[inline(always)]
pub fn result(ret: isize) -> io::Result<usize> {
    if (-4095..0).contains(&ret) {
        Err(io::Error::from_raw_os_error(-ret as i32))
    } else {
        Ok(ret as usize)
    }
}

/// [`syscall6`] with the unused arguments zero, as a result.
///
/// # Safety
/// As for [`syscall6`].
#[inline(always)]
pub unsafe fn call(nr: libc::c_long, a: &[usize]) -> io::Result<usize> {
    let mut args = [0usize; 6];
    args[..a.len()].copy_from_slice(a);
    // SAFETY: forwarded from this function's contract.
    result(unsafe { syscall6(nr, args) })
}

/// `sched_yield` without the C library.
pub fn yield_now() {
    // SAFETY: sched_yield takes no arguments and touches no memory.
    let _ = unsafe { call(libc::SYS_sched_yield, &[]) };
}

/// Sleeps for `d` (`nanosleep` without the C library; an interrupted sleep ends early).
pub fn nap(d: std::time::Duration) {
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `ts` is a live timespec; no remainder is asked for.
    let _ = unsafe { call(libc::SYS_nanosleep, &[&raw const ts as usize, 0]) };
}

/// A point of `CLOCK_MONOTONIC` read with a raw system call: for code that runs while
/// breakpoints may sit in the C library (whose `clock_gettime` `std::time::Instant` uses).
/// The same operations as `Instant`, which it stands in for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Moment(u64);

impl Moment {
    pub fn now() -> Moment {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a live, writable timespec.
        let _ = unsafe {
            call(
                libc::SYS_clock_gettime,
                &[libc::CLOCK_MONOTONIC as usize, &raw mut ts as usize],
            )
        };
        Moment(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }

    pub fn saturating_duration_since(&self, earlier: Moment) -> std::time::Duration {
        std::time::Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    pub fn elapsed(&self) -> std::time::Duration {
        Moment::now().saturating_duration_since(*self)
    }
}

impl std::ops::Add<std::time::Duration> for Moment {
    type Output = Moment;
    fn add(self, d: std::time::Duration) -> Moment {
        Moment(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}

impl std::ops::Sub for Moment {
    type Output = std::time::Duration;
    fn sub(self, earlier: Moment) -> std::time::Duration {
        self.saturating_duration_since(earlier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_calls_match_the_kernel() {
        // SAFETY: getpid and gettid take no arguments.
        let pid = unsafe { call(libc::SYS_getpid, &[]) }.unwrap();
        assert_eq!(pid as u32, std::process::id());
        // SAFETY: close of an invalid descriptor touches no memory.
        let err = unsafe { call(libc::SYS_close, &[usize::MAX >> 1]) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        assert!(result(-4096).is_ok());
        yield_now();
        let before = Moment::now();
        nap(std::time::Duration::from_micros(100));
        assert!(before.elapsed() >= std::time::Duration::from_micros(100));
        let a = Moment::now();
        let b = a + std::time::Duration::from_millis(5);
        assert_eq!(b - a, std::time::Duration::from_millis(5));
        assert_eq!(a - b, std::time::Duration::ZERO);
        assert!(Moment::now() >= a && a.elapsed() < std::time::Duration::from_secs(60));
    }
}
