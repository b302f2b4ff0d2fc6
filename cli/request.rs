//! One request to an agent, `dsu` side: connect to its control socket, send the request, wait
//! for the answer (`docs/control-protocol.md`). No file is written and no signal sent; the
//! agent serialises concurrent requests itself.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dsu_agent::control::socket::{self, Reply, SOCKET_FILE};
use dsu_agent::control::{MAX_ANSWER_SIZE, RequestFile, RequestOp};
use dsu_agent::report::Outcome;

use crate::error::CliError;
use crate::target::Target;

/// Time the agent gets beyond the request's own timeout: it loads and links the patch before
/// its retry clock starts, and writes the answer after it stops.
const GRACE: Duration = Duration::from_secs(2);

/// How long a connection closed without an answer waits for the process to finish exiting:
/// the kernel closes its descriptors first, then reports the exit.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 8 << 10;

/// Sends `op` (with `patch`, for an apply) to the target's agent and waits for its answer.
/// `Ok` is any answer the agent gave; the caller judges its status.
pub fn exchange(
    target: &Target,
    op: RequestOp,
    patch: Option<&[u8]>,
    timeout: Duration,
    allow_stale_clones: bool,
) -> Result<Outcome, CliError> {
    let started = Instant::now();
    let deadline = started + timeout + GRACE;
    let path = target.dir.join(SOCKET_FILE);
    let stream = socket::connect(&target.dir).map_err(|source| CliError::NoListener {
        pid: target.pid,
        path: path.clone(),
        source,
    })?;
    let request = RequestFile {
        id: new_id(),
        op,
        timeout_ms: Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
        patch_len: patch.map(|p| p.len() as u64),
        allow_stale_clones,
    };
    // Never blocked beyond the deadline by an agent busy with another request.
    let _ = stream.set_write_timeout(Some(timeout + GRACE));
    // A failed send is not final: the agent may have refused before reading (another
    // user's agent) and its answer is waiting.
    let sent = socket::send_request(&stream, &request, patch);
    let mut reader = Lines::new(&stream);
    let mut taken = false;
    loop {
        let now = Instant::now();
        if now >= deadline {
            // Shutting down first makes the agent's `taken` fail if it has not written it
            // yet: then it drops the request, and what has arrived tells which happened.
            let _ = stream.shutdown(Shutdown::Both);
            let _ = stream.set_nonblocking(true);
            while let Ok(Some(line)) = reader.next_line() {
                taken |= matches!(Reply::parse(&line), Ok(Reply::Taken(_)));
            }
            return Err(CliError::TimedOut {
                pid: target.pid,
                waited: now - started,
                withdrawn: !taken,
                stopped: is_stopped(target.pid),
            });
        }
        let mut fds = vec![stream.as_fd()];
        fds.extend(target.process().pidfd());
        let ready = crate::sys::wait_readable(&fds, deadline - now).unwrap_or_default();
        if ready.get(1).copied().unwrap_or(false) && !ready[0] {
            return Err(CliError::Exited { pid: target.pid });
        }
        if !ready.first().copied().unwrap_or(false) {
            continue;
        }
        let malformed = |reason: String| CliError::Malformed {
            path: path.clone(),
            reason,
        };
        match reader.next_line() {
            Ok(Some(line)) => match Reply::parse(&line) {
                Ok(Reply::Taken(_)) => taken = true,
                Ok(Reply::Answer(outcome)) => return Ok(*outcome),
                Err(e) => return Err(malformed(e.to_string())),
            },
            Ok(None) if reader.closed => {
                if target.process().exits_within(EXIT_GRACE) {
                    return Err(CliError::Exited { pid: target.pid });
                }
                if let Err(source) = sent {
                    return Err(CliError::Send {
                        pid: target.pid,
                        source,
                    });
                }
                return Err(CliError::HungUp { pid: target.pid });
            }
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(malformed(e.to_string()));
            }
            Err(_) if target.process().exits_within(EXIT_GRACE) => {
                return Err(CliError::Exited { pid: target.pid });
            }
            Err(_) => return Err(CliError::HungUp { pid: target.pid }),
        }
    }
}

/// Lines from the socket, read as they come: never blocks when called after the socket was
/// reported readable.
struct Lines<'a> {
    stream: &'a UnixStream,
    buf: Vec<u8>,
    closed: bool,
}

impl<'a> Lines<'a> {
    fn new(stream: &'a UnixStream) -> Lines<'a> {
        Lines {
            stream,
            buf: Vec::new(),
            closed: false,
        }
    }

    /// A complete line if one has arrived; reads once when none is buffered.
    fn next_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        if let Some(line) = self.split() {
            return Ok(Some(line));
        }
        if self.closed {
            return Ok(None);
        }
        // An answer is usually well under a kilobyte; a large one takes a few reads. (A
        // 64 KiB buffer, zeroed for every read, was a visible part of `--all`'s CPU.)
        let mut chunk = [0u8; READ_CHUNK];
        let n = (&mut &*self.stream).read(&mut chunk)?;
        if n == 0 {
            self.closed = true;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        if self.buf.len() as u64 > MAX_ANSWER_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an answer over {MAX_ANSWER_SIZE} bytes"),
            ));
        }
        Ok(self.split())
    }

    fn split(&mut self) -> Option<Vec<u8>> {
        let end = self.buf.iter().position(|&b| b == b'\n')?;
        let mut line: Vec<u8> = self.buf.drain(..=end).collect();
        line.pop();
        Some(line)
    }
}

/// Unique per request: this process's pid and the time in nanoseconds.
fn new_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// Whether process `pid` is stopped: by a signal (`T`) or by a tracer (`t`), the state that
/// follows the command name in `/proc/PID/stat`.
fn is_stopped(pid: u32) -> bool {
    crate::sys::read_proc_text(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, after) = stat.rsplit_once(')')?;
            after
                .split_whitespace()
                .next()
                .map(|s| s == "T" || s == "t")
        })
        .unwrap_or(false)
}
