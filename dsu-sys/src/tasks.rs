//! What the kernel knows about a thread of this process, read without disturbing it: whether
//! it waits in a system call and where (`/proc/self/task/<tid>/syscall`), how often it has
//! been scheduled (`schedstat`), which signals it blocks (`status`), and its name (`comm`).
//!
//! Reading `syscall` does not wake the thread: the kernel waits until the thread is off its
//! CPU and reports its user stack and instruction pointers as they were when it entered the
//! kernel, or `running` when it is not blocked. That is how the agent checks threads that wait
//! without sending them a signal (which would make `poll` or `nanosleep` return early).
//!
//! Everything but [`name`] allocates nothing: *async-signal-safe*, usable while other threads
//! are held.

use std::io;

use crate::threads::{parse_decimal, read_start, write_decimal};

/// What a thread was doing when its `syscall` file was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallState {
    /// On a CPU or ready to run: its registers cannot be read without stopping it.
    Running,
    /// Blocked in the kernel: in system call `nr` (`-1`: blocked outside a system call, as a
    /// thread stopped by `SIGSTOP` or a tracer), with these user stack and instruction
    /// pointers.
    Blocked { nr: i64, sp: u64, pc: u64 },
}

/// `/proc/self/task/<tid>/<file>` as a NUL-terminated path in `out`; returns its length.
fn task_path(tid: i32, file: &[u8], out: &mut [u8; 64]) -> usize {
    let prefix = b"/proc/self/task/";
    out[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len() + write_decimal(tid.unsigned_abs(), &mut out[prefix.len()..]);
    out[len] = b'/';
    len += 1;
    out[len..len + file.len()].copy_from_slice(file);
    len += file.len();
    out[len] = 0;
    len + 1
}

/// Reads a task file into `buf`; `None` when the thread is gone. A file longer than `buf` is
/// cut at its size (the callers read fields near the start).
fn read_task(tid: i32, file: &[u8], buf: &mut [u8]) -> io::Result<Option<usize>> {
    debug_assert!(file.len() <= 20);
    let mut path = [0u8; 64];
    let len = task_path(tid, file, &mut path);
    match read_start(&path[..len], buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What thread `tid` is doing (`None`: it has exited). Async-signal-safe.
pub fn syscall_state(tid: i32) -> io::Result<Option<SyscallState>> {
    let mut buf = [0u8; 256];
    let Some(n) = read_task(tid, b"syscall", &mut buf)? else {
        return Ok(None);
    };
    parse_syscall(&buf[..n])
        .map(Some)
        .ok_or_else(|| io::ErrorKind::InvalidData.into())
}

/// How many times thread `tid` has been put on a CPU (third field of `schedstat`): unchanged
/// between two reads means it did not run in between. `None`: it has exited.
/// Async-signal-safe.
pub fn switch_ins(tid: i32) -> io::Result<Option<u64>> {
    let mut buf = [0u8; 128];
    let Some(n) = read_task(tid, b"schedstat", &mut buf)? else {
        return Ok(None);
    };
    parse_schedstat(&buf[..n])
        .map(Some)
        .ok_or_else(|| io::ErrorKind::InvalidData.into())
}

/// Whether thread `tid` blocks signal `sig` (its `SigBlk` mask). `None`: it has exited.
/// Async-signal-safe.
pub fn blocks_signal(tid: i32, sig: i32) -> io::Result<Option<bool>> {
    let mut buf = [0u8; 2048];
    let Some(n) = read_task(tid, b"status", &mut buf)? else {
        return Ok(None);
    };
    let mask = parse_mask(&buf[..n], b"SigBlk:").ok_or(io::ErrorKind::InvalidData)?;
    Ok(Some(signal_bit(sig).is_some_and(|bit| mask & bit != 0)))
}

/// The pid of the process tracing this one (`TracerPid` of `/proc/self/status`; 0: none).
/// One read into a stack buffer (the field is near the start of the file). Async-signal-safe.
pub fn tracer_pid() -> io::Result<i32> {
    let mut buf = [0u8; 4096];
    let n = read_start(b"/proc/self/status\0", &mut buf)?;
    parse_tracer_pid(&buf[..n]).ok_or_else(|| io::ErrorKind::InvalidData.into())
}

/// Pure: the `TracerPid:` line of a `status` file.
fn parse_tracer_pid(status: &[u8]) -> Option<i32> {
    parse_decimal(status_field(status, b"TracerPid:")?)
}

/// Pure: the value of the `status` line starting with `key`, blanks trimmed.
fn status_field<'a>(status: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    status
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim_ascii())
}

/// The thread's name (`comm`), or `?` when it cannot be read. Allocates: for messages, not for
/// use while threads are held.
pub fn name(tid: i32) -> String {
    let mut buf = [0u8; 64];
    match read_task(tid, b"comm", &mut buf) {
        Ok(Some(n)) => String::from_utf8_lossy(&buf[..n]).trim_end().to_owned(),
        _ => "?".to_owned(),
    }
}

/// Pure: bit of signal `sig` (1..=64) in a `/proc` signal mask.
fn signal_bit(sig: i32) -> Option<u64> {
    u32::try_from(sig.checked_sub(1)?)
        .ok()
        .and_then(|shift| 1u64.checked_shl(shift))
}

/// Pure: a `syscall` file: `running`, or `NR ARG1..ARG6 SP PC`, or `-1 SP PC`.
pub fn parse_syscall(text: &[u8]) -> Option<SyscallState> {
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    if text == b"running" {
        return Some(SyscallState::Running);
    }
    let mut fields = text.split(|&b| b == b' ').filter(|f| !f.is_empty());
    let first = fields.next()?;
    let nr = match first.strip_prefix(b"-") {
        Some(digits) => -i64::from(parse_decimal(digits)?),
        None => i64::from(parse_decimal(first)?),
    };
    let mut values = [0u64; 8];
    let mut count = 0;
    for f in fields {
        *values.get_mut(count)? = parse_hex(f)?;
        count += 1;
    }
    // Blocked outside a system call: `-1 SP PC`; in one: six arguments, then SP and PC.
    let expected = if nr < 0 { 2 } else { 8 };
    if count != expected {
        return None;
    }
    Some(SyscallState::Blocked {
        nr,
        sp: values[count - 2],
        pc: values[count - 1],
    })
}

/// Pure: `0x`-prefixed hexadecimal.
fn parse_hex(field: &[u8]) -> Option<u64> {
    let digits = field.strip_prefix(b"0x")?;
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    let mut v = 0u64;
    for &b in digits {
        let d = (b as char).to_digit(16)?;
        v = v << 4 | u64::from(d);
    }
    Some(v)
}

/// Pure: the third field of a `schedstat` line (`run_ns wait_ns timeslices`).
fn parse_schedstat(text: &[u8]) -> Option<u64> {
    let field = text
        .split(|&b| b == b' ' || b == b'\n')
        .filter(|f| !f.is_empty())
        .nth(2)?;
    let mut v = 0u64;
    for &b in field {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// Pure: a hexadecimal mask line of a `status` file, such as `SigBlk:\t0000000000010000`.
fn parse_mask(status: &[u8], key: &[u8]) -> Option<u64> {
    let digits = status_field(status, key)?;
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    let mut v = 0u64;
    for &b in digits {
        v = v << 4 | u64::from((b as char).to_digit(16)?);
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn tracer_pid_lines_parse() {
        let status = b"Name:\tx\nTgid:\t7\nTracerPid:\t4242\nUid:\t0\n";
        assert_eq!(parse_tracer_pid(status), Some(4242));
        assert_eq!(parse_tracer_pid(b"TracerPid:\t0\n"), Some(0));
        assert_eq!(parse_tracer_pid(b"Name:\tx\n"), None);
        assert_eq!(parse_tracer_pid(b"TracerPid:\t\n"), None);
        // Not traced while the tests run (a debugger attached would make this fail).
        assert_eq!(tracer_pid().unwrap(), 0);
    }

    #[test]
    fn syscall_lines_parse() {
        assert_eq!(parse_syscall(b"running\n"), Some(SyscallState::Running));
        assert_eq!(
            parse_syscall(b"7 0x0 0x0 0x186a0 0x0 0x0 0x7f2e 0x7f2e82948ea0 0x7f2e8324a26f\n"),
            Some(SyscallState::Blocked {
                nr: 7,
                sp: 0x7f2e_8294_8ea0,
                pc: 0x7f2e_8324_a26f
            })
        );
        assert_eq!(
            parse_syscall(b"-1 0x7ffd10 0x401000\n"),
            Some(SyscallState::Blocked {
                nr: -1,
                sp: 0x7ffd10,
                pc: 0x401000
            })
        );
        for bad in [
            &b""[..],
            b"runnin",
            b"7 0x0 0x1",
            b"-1 0x1 0x2 0x3",
            b"x 0x0",
            b"7 0x0 0x0 0x0 0x0 0x0 0x0 0x0 0x0 0x0",
            b"7 0 0 0 0 0 0 0 0",
            b"7 0x 0x0 0x0 0x0 0x0 0x0 0x0 0x0",
            b"7 0x11111111111111111 0x0 0x0 0x0 0x0 0x0 0x0 0x0",
        ] {
            assert_eq!(
                parse_syscall(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn schedstat_and_masks_parse() {
        assert_eq!(parse_schedstat(b"27546 3003922 15\n"), Some(15));
        assert_eq!(parse_schedstat(b"1 2\n"), None);
        assert_eq!(parse_schedstat(b"1 2 x\n"), None);
        let status = b"Name:\tx\nSigPnd:\t0000000000000000\nSigBlk:\t0000000000010002\n";
        assert_eq!(parse_mask(status, b"SigBlk:"), Some(0x10002));
        assert_eq!(parse_mask(status, b"SigCgt:"), None);
        assert_eq!(signal_bit(2), Some(2));
        assert_eq!(signal_bit(64), Some(1 << 63));
        assert_eq!(signal_bit(0), None);
        assert_eq!(signal_bit(65), None);
        let mut path = [0u8; 64];
        let n = task_path(123, b"syscall", &mut path);
        assert_eq!(&path[..n], b"/proc/self/task/123/syscall\0");
    }

    #[test]
    fn a_waiting_thread_reads_as_blocked_and_does_not_run() {
        let (tx, rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            tx.send(crate::threads::gettid()).unwrap();
            done_rx.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        // Blocked in futex (202) once it has reached recv.
        let state = (0..1000)
            .find_map(|_| match syscall_state(tid).unwrap() {
                Some(s @ SyscallState::Blocked { nr: 202, .. }) => Some(s),
                _ => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    None
                }
            })
            .expect("the thread blocks in futex");
        let SyscallState::Blocked { sp, pc, .. } = state else {
            unreachable!()
        };
        assert!(sp != 0 && pc != 0);
        let before = switch_ins(tid).unwrap().unwrap();
        assert_eq!(syscall_state(tid).unwrap(), Some(state));
        assert_eq!(switch_ins(tid).unwrap(), Some(before));
        assert_eq!(blocks_signal(tid, libc::SIGUSR1).unwrap(), Some(false));
        assert!(!name(tid).is_empty());
        done_tx.send(()).unwrap();
        h.join().unwrap();
        assert_eq!(syscall_state(tid).unwrap(), None);
        assert_eq!(switch_ins(tid).unwrap(), None);
        let me = crate::threads::gettid();
        // Reading one's own file: the kernel reports the read itself.
        assert!(matches!(
            syscall_state(me).unwrap(),
            Some(SyscallState::Blocked { nr: 0, .. }) | Some(SyscallState::Running)
        ));
    }
}
