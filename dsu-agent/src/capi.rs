//! The C API (`include/dsu.h`) and the `LD_PRELOAD` entry point.
//!
//! Unsafe code is allowed here: this module exports C symbols (`no_mangle`) and a loader
//! constructor (`.init_array`); every block states its invariant.

#![allow(unsafe_code)]

use std::ffi::c_int;

/// Installs the agent with the default configuration. Returns 0, or a negative errno-style
/// code (`-EACCES` for a control directory problem, `-EPERM` for an insecure one, ...).
/// Idempotent.
#[unsafe(no_mangle)]
pub extern "C" fn dsu_install() -> c_int {
    match std::panic::catch_unwind(crate::install) {
        Ok(Ok(_)) => 0,
        Ok(Err(e)) => {
            eprintln!("dsu: install failed: {e}");
            e.errno()
        }
        Err(_) => -libc::EIO,
    }
}

/// Installs the agent trusting only patches signed by a key of the file `keys_file` (one
/// public key per line, as `dsu keygen` writes them), and, when `require_binding` is not 0,
/// only patches bound to this program (`dsu pack`). `keys_file` NULL: the default
/// (`DSU_TRUSTED_KEYS`, else `/etc/dsu/trusted-keys` when present). Returns as
/// [`dsu_install`]; `-EINVAL` for a `keys_file` that is not UTF-8 or a bad key file.
///
/// # Safety
/// `keys_file` is NULL or points to a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dsu_install_trusting(
    keys_file: *const std::ffi::c_char,
    require_binding: c_int,
) -> c_int {
    let mut builder = crate::Builder::new().require_binding(require_binding != 0);
    if !keys_file.is_null() {
        // SAFETY: not null, and NUL-terminated by this function's contract.
        let path = unsafe { std::ffi::CStr::from_ptr(keys_file) };
        let Ok(path) = path.to_str() else {
            return -libc::EINVAL;
        };
        builder = builder.trusted_keys_file(path);
    }
    match std::panic::catch_unwind(move || builder.install()) {
        Ok(Ok(_)) => 0,
        Ok(Err(e)) => {
            eprintln!("dsu: install failed: {e}");
            e.errno()
        }
        Err(_) => -libc::EIO,
    }
}

/// Runs when `libdsu_agent.so` is loaded. It installs the agent only when the library was
/// brought in by `LD_PRELOAD` (an unmodified program), so a program that links the library
/// and calls `dsu_install()` itself keeps control of when that happens.
extern "C" fn preload_constructor() {
    let preloaded = std::env::var_os("LD_PRELOAD")
        .is_some_and(|v| v.to_string_lossy().contains("libdsu_agent"));
    if preloaded {
        dsu_install();
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static PRELOAD_CONSTRUCTOR: extern "C" fn() = preload_constructor;

/// Declares the stack `[lo, lo + len)` (a coroutine's) so every update checks it. Returns 0,
/// or `-EINVAL` (`lo` null or `len` 0), `-EOVERFLOW` (the range wraps), `-EEXIST` (it
/// overlaps a declared stack), `-ENOSPC` (the table is full). See [`crate::stacks::declare`].
#[unsafe(no_mangle)]
pub extern "C" fn dsu_stack_declare(lo: *mut std::ffi::c_void, len: usize) -> c_int {
    match crate::stacks::declare(lo as usize, len) {
        Ok(_) => 0,
        Err(e) => e.errno(),
    }
}

/// Forgets the declared stack starting at `lo`. Returns 0, or `-ENOENT` when no declared
/// stack starts there. See [`crate::stacks::forget`].
#[unsafe(no_mangle)]
pub extern "C" fn dsu_stack_forget(lo: *mut std::ffi::c_void) -> c_int {
    match crate::stacks::forget(lo as usize) {
        Ok(_) => 0,
        Err(e) => e.errno(),
    }
}
