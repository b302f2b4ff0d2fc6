//! Process life: running code when the process exits normally.
//!
//! `unsafe` is needed to register a C callback with `atexit(3)`.

use std::io;

/// Registers `handler` to run when the process calls `exit(3)` or returns from `main`
/// (not on a signal, `_exit` or `abort`). A forked child inherits the registration: the
/// handler must check which process it runs in.
pub fn at_exit(handler: extern "C" fn()) -> io::Result<()> {
    // SAFETY: `handler` is a plain `extern "C" fn()` with static lifetime, as atexit expects.
    if unsafe { libc::atexit(handler) } != 0 {
        return Err(io::Error::other("atexit: no room for another handler"));
    }
    Ok(())
}
