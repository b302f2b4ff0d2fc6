//! Trigger: what wakes the agent thread. The trigger signal's handler (installed through
//! `signal-hook`) only writes a byte to a socket pair, and in-process requests write to the
//! same socket; the agent thread blocks reading the other end. The handler itself does nothing
//! else, so a flood of signals costs a few bytes and coalesces into one wake-up.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

/// The agent thread's end: blocks until woken.
#[derive(Debug)]
pub(crate) struct Waiter {
    read: UnixStream,
}

/// Wakes the agent thread from any thread (not from a signal handler: that is signal-hook's
/// own write end).
#[derive(Debug)]
pub(crate) struct Waker {
    write: UnixStream,
}

/// Registers `signal` to wake the returned waiter.
pub(crate) fn register(signal: libc::c_int) -> io::Result<(Waiter, Waker)> {
    let (read, write) = UnixStream::pair()?;
    let waker = Waker {
        write: write.try_clone()?,
    };
    waker.write.set_nonblocking(true)?;
    signal_hook::low_level::pipe::register(signal, write)?;
    Ok((Waiter { read }, waker))
}

impl Waiter {
    /// Blocks until at least one wake-up, then drains every pending one so that many signals
    /// received meanwhile cause a single pass over the control directory.
    pub(crate) fn wait(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 256];
        loop {
            match self.read.read(&mut buf) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.read.set_nonblocking(true)?;
        while matches!(self.read.read(&mut buf), Ok(n) if n > 0) {}
        self.read.set_nonblocking(false)
    }
}

impl Waker {
    pub(crate) fn wake(&self) {
        // A full socket buffer already guarantees a pending wake-up.
        let _ = (&self.write).write(&[1]);
    }
}
