//! Instruction-stream synchronisation and process-wide CPU/memory policy queries.
//!
//! `unsafe` here is limited to the `membarrier` and `prctl` system calls, which take integer
//! arguments only.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

// `membarrier(2)` commands (`include/uapi/linux/membarrier.h`), defined here because the
// `libc` crate exports them for Android only.
const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 6;

/// Set once registration succeeded; the kernel refuses the SYNC_CORE command before it.
static SYNC_CORE_REGISTERED: AtomicBool = AtomicBool::new(false);

/// `membarrier(cmd, 0, 0)`: the command's result or the OS error.
fn membarrier(cmd: libc::c_int) -> io::Result<libc::c_long> {
    // SAFETY: membarrier takes integers only and touches no user memory. Issued without the C
    // library: the writer calls it right after changing code that may be libc's own.
    unsafe { crate::raw::call(libc::SYS_membarrier, &[cmd as usize, 0, 0]) }
        .map(|r| r as libc::c_long)
}

/// Registers the process for `MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE`. Idempotent.
/// Returns `Ok(false)` when the kernel does not support it.
///
/// Registration may wait for an RCU grace period: call it at start-up, not while threads are
/// stopped.
pub fn register_sync_core() -> io::Result<bool> {
    if SYNC_CORE_REGISTERED.load(Ordering::Acquire) {
        return Ok(true);
    }
    let supported = match membarrier(MEMBARRIER_CMD_QUERY) {
        Ok(mask) => mask & libc::c_long::from(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE) != 0,
        // No membarrier at all (kernel < 4.3, or filtered by seccomp).
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => false,
        Err(e) => return Err(io::Error::new(e.kind(), format!("membarrier QUERY: {e}"))),
    };
    if !supported {
        return Ok(false);
    }
    match membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) {
        Ok(_) => {
            SYNC_CORE_REGISTERED.store(true, Ordering::Release);
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("membarrier REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: {e}"),
        )),
    }
}

/// Whether `register_sync_core` has succeeded in this process.
pub fn sync_core_registered() -> bool {
    SYNC_CORE_REGISTERED.load(Ordering::Acquire)
}

/// Clears instruction caches for a modified range. A no-op on x86_64 (coherent), kept so the
/// write sequence reads the same on every architecture. Async-signal-safe.
pub fn flush_icache(addr: usize, len: usize) {
    let _ = (addr, len);
}

/// Makes every core of the process execute a serialising instruction before it runs user
/// code again (membarrier SYNC_CORE when registered, else a no-op: returns `Ok(false)`).
/// Async-signal-safe.
///
/// Without it, x86_64 still guarantees that a thread sees modified code after it executes a
/// serialising instruction; returning from a signal handler (`rt_sigreturn`, i.e. `iret`)
/// is one, so stopped threads resumed from a handler are safe either way. Running threads
/// are what this call covers. Errors carry only the OS error code (no allocation).
pub fn sync_cores() -> io::Result<bool> {
    if !sync_core_registered() {
        return Ok(false);
    }
    membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE).map(|_| true)
}

/// Whether the process forbids gaining execute permission (`PR_GET_MDWE`).
pub fn mdwe_enabled() -> bool {
    // SAFETY: prctl(PR_GET_MDWE) takes integers only and touches no user memory.
    let r = unsafe { libc::prctl(libc::PR_GET_MDWE, 0, 0, 0, 0) };
    // -1 with EINVAL: a kernel before 6.3, which has no MDWE.
    r > 0 && (r as libc::c_uint) & libc::PR_MDWE_REFUSE_EXEC_GAIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_is_idempotent_and_enables_sync() {
        let first = register_sync_core().unwrap();
        let second = register_sync_core().unwrap();
        assert_eq!(first, second);
        assert_eq!(sync_core_registered(), first);
        assert_eq!(sync_cores().unwrap(), first);
        eprintln!("membarrier SYNC_CORE supported: {first}");
    }

    #[test]
    fn query_reports_sync_core_support() {
        // Whatever the answer, the query itself works on any kernel we support (>= 4.3).
        let mask = membarrier(MEMBARRIER_CMD_QUERY).unwrap();
        assert!(mask >= 0);
    }

    #[test]
    fn flush_icache_is_a_no_op() {
        flush_icache(0, usize::MAX);
    }

    #[test]
    fn mdwe_matches_prctl() {
        // SAFETY: prctl(PR_GET_MDWE) takes integers only.
        let raw = unsafe { libc::prctl(libc::PR_GET_MDWE, 0, 0, 0, 0) };
        assert_eq!(mdwe_enabled(), raw > 0 && raw & 1 == 1);
        // `code::tests::mdwe_child` checks the enabled case in a child process.
    }
}
