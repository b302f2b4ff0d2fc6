//! Registration of unwind tables for code the dynamic loader does not know about, with the
//! unwinder of the C runtime (libgcc's `__register_frame`), so that exceptions and panics
//! unwind through it and backtraces see through it.

use std::ffi::c_void;

unsafe extern "C" {
    fn __register_frame(begin: *const c_void);
    fn __deregister_frame(begin: *const c_void);
}

/// Registers the `.eh_frame` section starting at `begin`.
///
/// # Safety
/// - `begin` is the start of a `.eh_frame` section relocated for where it and the code it
///   describes are mapped, ended by a zero length word;
/// - it stays mapped until `deregister(begin)` has returned;
/// - it is registered at most once.
pub unsafe fn register(begin: usize) {
    // SAFETY: guaranteed by the caller (above).
    unsafe { __register_frame(begin as *const c_void) }
}

/// Removes a registration made by [`register`].
///
/// # Safety
/// `begin` was registered with [`register`] and not deregistered since.
pub unsafe fn deregister(begin: usize) {
    // SAFETY: guaranteed by the caller (above).
    unsafe { __deregister_frame(begin as *const c_void) }
}
