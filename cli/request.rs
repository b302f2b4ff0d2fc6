//! One request to an agent, `dsu` side: lock, write, signal, wait for the answer, and withdraw
//! the request if no answer comes (`docs/control-protocol.md`).

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dsu_agent::control::{
    LOCK_FILE, REQUEST_FILE, REQUEST_PATCH_FILE, RESULT_FILE, RequestFile, RequestOp, write_atomic,
    write_json,
};
use dsu_agent::report::Outcome;

use crate::error::CliError;
use crate::target::Target;

/// Time the agent gets beyond the request's own timeout: it loads and links the patch before
/// its retry clock starts, and writes the answer after it stops.
const GRACE: Duration = Duration::from_secs(2);

/// Waits between looks at `result.json`: every 100 us for the first 10 ms, since an apply
/// takes well under a millisecond when nothing is active (a doubling step overshot the answer
/// by half a millisecond), then every 500 us while the agent retries.
/// (Polling, not inotify: closing an inotify descriptor waits for an SRCU grace period, which
/// measured 14-20 ms, far more than all the polling costs.)
const FAST_STEP: Duration = Duration::from_micros(100);
const FAST_PERIOD: Duration = Duration::from_millis(10);
const SLOW_STEP: Duration = Duration::from_micros(500);

/// Sends `op` (with `patch` written first, for an apply) to the target's agent and waits for
/// its answer. `Ok` is any answer the agent gave; the caller judges its status.
pub fn exchange(
    target: &Target,
    op: RequestOp,
    patch: Option<&[u8]>,
    timeout: Duration,
) -> Result<Outcome, CliError> {
    let started = Instant::now();
    let deadline = started + timeout + GRACE;
    let dir = &target.dir;
    let chown = target.chown();
    let _lock = lock(dir, chown, deadline)?;

    let id = new_id();
    if let Some(bytes) = patch {
        write_atomic(dir, REQUEST_PATCH_FILE, bytes, chown)?;
    }
    let request = RequestFile {
        id: id.clone(),
        op,
        timeout_ms: Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
    };
    write_json(dir, REQUEST_FILE, &request, chown)?;

    if let Err(e) = target.process().signal(target.agent.signal) {
        withdraw(dir, &id, patch.is_some());
        return Err(e);
    }

    loop {
        if let Some(outcome) = read_answer(dir, &id) {
            return Ok(outcome);
        }
        let now = Instant::now();
        if now >= deadline {
            let withdrawn = withdraw(dir, &id, patch.is_some());
            return Err(CliError::TimedOut {
                pid: target.pid,
                waited: now - started,
                withdrawn,
            });
        }
        let step = if now - started < FAST_PERIOD {
            FAST_STEP
        } else {
            SLOW_STEP
        };
        if target.process().wait(step.min(deadline - now)) {
            // The answer may have been written just before the exit.
            if let Some(outcome) = read_answer(dir, &id) {
                return Ok(outcome);
            }
            withdraw(dir, &id, patch.is_some());
            return Err(CliError::Exited { pid: target.pid });
        }
    }
}

/// Reads `result.json` if it answers request `id`. An unreadable or older answer is no answer
/// yet: the agent replaces the file atomically, so a torn read cannot happen.
pub fn read_answer(dir: &Path, id: &str) -> Option<Outcome> {
    // Bounded and link-free: the directory belongs to the target's user.
    let bytes = dsu_agent::control::read_limited(
        &dir.join(RESULT_FILE),
        dsu_agent::control::MAX_ANSWER_SIZE,
    )
    .ok()?;
    let outcome: Outcome = serde_json::from_slice(&bytes).ok()?;
    (outcome.request.as_deref() == Some(id)).then_some(outcome)
}

/// Takes back request `id` if the agent has not claimed it yet; returns whether it did.
/// Claiming is a rename on both sides, so exactly one side gets the file: if `dsu` does, the
/// agent never sees the request; if the agent did, it may still act on it.
fn withdraw(dir: &Path, id: &str, had_patch: bool) -> bool {
    let request = dir.join(REQUEST_FILE);
    let claimed = dir.join(format!(".{REQUEST_FILE}.{}.withdrawn", std::process::id()));
    if fs::rename(&request, &claimed).is_err() {
        return false;
    }
    let ours = fs::read(&claimed)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<RequestFile>(&bytes).ok())
        .is_some_and(|request| request.id == id);
    if !ours {
        // Not the request we wrote (someone else's, despite the lock): put it back.
        let _ = fs::rename(&claimed, &request);
        return false;
    }
    let _ = fs::remove_file(&claimed);
    if had_patch {
        // The patch goes too, or a later raw trigger would apply it.
        let _ = fs::remove_file(dir.join(REQUEST_PATCH_FILE));
    }
    true
}

/// Takes `<dir>/lock` exclusively, waiting until `deadline` for another `dsu` to finish.
fn lock(dir: &Path, chown: Option<(u32, u32)>, deadline: Instant) -> Result<File, CliError> {
    let path = dir.join(LOCK_FILE);
    let io_error = |source: io::Error| {
        CliError::ControlDir(dsu_agent::control::ControlError::Io {
            action: "lock",
            path: path.clone(),
            source,
        })
    };
    let open = |create_new| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create_new)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
    };
    let file = match open(true) {
        Ok(file) => {
            // Only a file this call created is given away: chowning whatever the directory's
            // owner placed under this name (a hard link, say) would hand them that file.
            if let Some((uid, gid)) = chown {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io_error)?;
            }
            file
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open(false).map_err(io_error)?,
        Err(e) => return Err(io_error(e)),
    };
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(TryLockError::WouldBlock) => return Err(CliError::LockTimedOut { path }),
            Err(TryLockError::Error(e)) => return Err(io_error(e)),
        }
    }
}

/// Unique per request: this process's pid and the time in nanoseconds.
fn new_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}
