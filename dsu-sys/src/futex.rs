//! Private futex wait and wake on an `AtomicU32`.
//!
//! Used by the stop-the-world handshake: parked threads sleep on a generation word, the agent
//! sleeps on a counter of parked threads. Both calls are *async-signal-safe*: one raw
//! `futex(2)` syscall each, no allocation, no lock.
//!
//! Issued without the C library ([`crate::raw`]). `unsafe` is needed for the raw syscall only; the kernel reads the word through the address
//! of a live `&AtomicU32`, which is the whole contract of `FUTEX_WAIT`/`FUTEX_WAKE`.

use std::io;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

const FUTEX_WAIT_PRIVATE: libc::c_int = libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG;
const FUTEX_WAKE_PRIVATE: libc::c_int = libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG;

/// Why [`wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Woken by [`wake_all`], or the word already differed from `expected` (`EAGAIN`), or a
    /// spurious wake-up: re-check the word.
    Woken,
    /// Interrupted by a signal handler (`EINTR`): re-check the word.
    Interrupted,
    /// The timeout elapsed.
    TimedOut,
}

/// Sleeps while `word == expected`, at most `timeout` (relative) when given.
///
/// Returns at once when the word already differs. Callers loop on their own condition: a
/// return never proves the word changed. Async-signal-safe.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> io::Result<Wake> {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        // Always below 1e9, fits every `c_long`.
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, aligned 4-byte atomic for the duration of the call; `ts_ptr` is
    // null or points to `ts`, alive on this frame. FUTEX_WAIT only reads both.
    let rc = unsafe {
        crate::raw::call(
            libc::SYS_futex,
            &[
                word.as_ptr() as usize,
                FUTEX_WAIT_PRIVATE as usize,
                expected as usize,
                ts_ptr as usize,
            ],
        )
    };
    match rc {
        Ok(_) => Ok(Wake::Woken),
        Err(err) => match err.raw_os_error() {
            Some(libc::EAGAIN) => Ok(Wake::Woken),
            Some(libc::EINTR) => Ok(Wake::Interrupted),
            Some(libc::ETIMEDOUT) => Ok(Wake::TimedOut),
            _ => Err(err),
        },
    }
}

/// Wakes every thread sleeping in [`wait`] on `word`; returns how many were woken.
/// Async-signal-safe.
pub fn wake_all(word: &AtomicU32) -> io::Result<usize> {
    wake(word, i32::MAX)
}

/// Wakes at most `n` threads sleeping in [`wait`] on `word`. Async-signal-safe.
pub fn wake(word: &AtomicU32, n: i32) -> io::Result<usize> {
    // SAFETY: `word` is a live, aligned 4-byte atomic; FUTEX_WAKE does not access memory
    // beyond using the address as a key.
    unsafe {
        crate::raw::call(
            libc::SYS_futex,
            &[
                word.as_ptr() as usize,
                FUTEX_WAKE_PRIVATE as usize,
                n as usize,
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    #[test]
    fn wait_returns_when_word_differs() {
        let w = AtomicU32::new(1);
        assert_eq!(wait(&w, 2, None).unwrap(), Wake::Woken);
    }

    #[test]
    fn wait_times_out() {
        let w = AtomicU32::new(0);
        let t = Instant::now();
        assert_eq!(
            wait(&w, 0, Some(Duration::from_millis(20))).unwrap(),
            Wake::TimedOut
        );
        assert!(t.elapsed() >= Duration::from_millis(15));
    }

    #[test]
    fn wake_all_releases_waiters() {
        let w = Arc::new(AtomicU32::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let w = Arc::clone(&w);
                std::thread::spawn(move || {
                    while w.load(Ordering::Acquire) == 0 {
                        wait(&w, 0, Some(Duration::from_secs(5))).unwrap();
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        w.store(1, Ordering::Release);
        wake_all(&w).unwrap();
        for h in handles {
            h.join().unwrap();
        }
    }
}
