//! Thread-local storage of loaded modules, as the dynamic loader lays it out.

use std::ffi::c_void;
use std::io;

/// The argument of `__tls_get_addr` (the psABI's `tls_index`).
#[repr(C)]
struct TlsIndex {
    module: usize,
    offset: usize,
}

unsafe extern "C" {
    fn __tls_get_addr(index: *const TlsIndex) -> *mut c_void;
}

/// Largest distance below the thread pointer at which static TLS is accepted. glibc's static
/// TLS block (initial modules plus its surplus) is far smaller; a dynamically allocated block
/// (a module `dlopen`ed later) lies elsewhere in memory.
const STATIC_TLS_LIMIT: isize = 16 << 20;

/// The thread pointer (`%fs:0` holds the TCB's own address on x86_64).
fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: reads the first word of the TCB, which glibc points at itself; no side effect.
    unsafe {
        std::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags));
    }
    tp
}

/// Offset from the thread pointer of variable `offset` of module `module`'s TLS block, when
/// the block is in the static TLS area (the same offset in every thread): what initial-exec
/// code (`R_X86_64_GOTTPOFF`) adds to `%fs:0`.
///
/// # Safety
/// `module` is the TLS module id of a loaded module that has a TLS block, and `offset` lies
/// inside that block (`__tls_get_addr` allocates the calling thread's block if needed).
pub unsafe fn static_offset(module: usize, offset: usize) -> io::Result<isize> {
    if module == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the module has no thread-local storage (TLS module id 0)",
        ));
    }
    let index = TlsIndex { module, offset };
    // SAFETY: a valid `tls_index` for a loaded module with TLS, by the caller's contract.
    let address = unsafe { __tls_get_addr(&index) } as usize;
    let tp_offset = address.wrapping_sub(thread_pointer()) as isize;
    if !(-STATIC_TLS_LIMIT..0).contains(&tp_offset) {
        return Err(io::Error::other(format!(
            "module {module}'s TLS block is not in the static TLS area (offset {tp_offset:#x} \
             from the thread pointer)"
        )));
    }
    Ok(tp_offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        static VALUE: Cell<u64> = const { Cell::new(5) };
    }

    #[test]
    fn the_thread_pointer_is_above_this_threads_static_tls() {
        // The executable's TLS (module 1) sits just below the thread pointer.
        let here = VALUE.with(|v| v as *const Cell<u64> as usize);
        let tp = thread_pointer();
        assert!(here < tp && tp - here < STATIC_TLS_LIMIT as usize);
    }
}
