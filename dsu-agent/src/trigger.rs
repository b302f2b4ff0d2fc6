//! Trigger: what wakes the agent thread. The trigger signal's handler (installed through
//! `signal-hook`) only writes a byte to a socket pair, and in-process requests write to the
//! same socket; the agent thread waits on the other end and on the control socket's listener
//! at once (`poll(2)`), so every request, whatever its source, runs on that one thread. The
//! handler itself does nothing else, so a flood of signals costs a few bytes and coalesces
//! into one wake-up.
//!
//! The program may replace the handler later (a server that installs its own `SIGUSR2`
//! handler during start-up). [`Trigger::taken_over`] notices by comparing the disposition
//! with the one recorded right after registering.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use dsu_sys::signal::Disposition;

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

/// The trigger signal as registered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Trigger {
    /// The signal, `None` when configured without one.
    pub(crate) signal: Option<libc::c_int>,
    /// Its disposition right after registering (signal-hook's handler).
    registered: Option<Disposition>,
}

impl Trigger {
    /// Whether the program has since replaced the handler (or reset or ignored the signal).
    pub(crate) fn taken_over(&self) -> bool {
        match (self.signal, self.registered) {
            (Some(signal), Some(registered)) => {
                dsu_sys::signal::disposition(signal).is_ok_and(|now| now != registered)
            }
            _ => false,
        }
    }
}

/// What woke the agent thread.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Woken {
    /// The trigger signal or an in-process request.
    pub(crate) trigger: bool,
    /// A connection waits on the control socket.
    pub(crate) socket: bool,
}

/// Registers `signal` (if any) to wake the returned waiter.
pub(crate) fn register(signal: Option<libc::c_int>) -> io::Result<(Waiter, Waker, Trigger)> {
    let (read, write) = UnixStream::pair()?;
    let waker = Waker {
        write: write.try_clone()?,
    };
    waker.write.set_nonblocking(true)?;
    read.set_nonblocking(true)?;
    let registered = match signal {
        Some(signal) => {
            signal_hook::low_level::pipe::register(signal, write)?;
            Some(dsu_sys::signal::disposition(signal)?)
        }
        None => None,
    };
    Ok((Waiter { read }, waker, Trigger { signal, registered }))
}

impl Waiter {
    /// Blocks until a wake-up or a connection on `listener`. Drains every pending wake-up so
    /// that many signals received meanwhile cause a single pass over the control directory.
    pub(crate) fn wait(&mut self, listener: Option<BorrowedFd<'_>>) -> io::Result<Woken> {
        let mut fds = vec![self.read.as_fd()];
        fds.extend(listener);
        let ready = dsu_sys::net::poll_readable(&fds, None)?;
        let mut woken = Woken {
            trigger: false,
            socket: ready.get(1).copied().unwrap_or(false),
        };
        if ready[0] {
            let mut buf = [0u8; 256];
            loop {
                match self.read.read(&mut buf) {
                    Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                    Ok(_) => woken.trigger = true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(woken)
    }
}

impl Waker {
    pub(crate) fn wake(&self) {
        // A full socket buffer already guarantees a pending wake-up.
        let _ = (&self.write).write(&[1]);
    }
}
