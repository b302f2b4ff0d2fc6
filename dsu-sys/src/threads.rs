//! Threads of this process: ids, listing (`/proc/self/task`), signalling (`tgkill`).
//!
//! [`list`] allocates and is for ordinary code. [`list_into`] and [`state`] allocate nothing
//! and take no lock: they are *async-signal-safe* and may run while other threads are stopped
//! (one of them may hold the malloc lock). They use raw `open`/`getdents64`/`read` into
//! caller-provided buffers.
//!
//! `unsafe` is needed for the raw syscalls; every buffer handed to the kernel is a live Rust
//! slice whose length is passed with it.

use std::io;

/// `ENOBUFS`: returned by the non-allocating listers when a caller buffer is too small.
/// Grow the buffers (outside the stop) and retry.
pub const CAPACITY_EXCEEDED: i32 = libc::ENOBUFS;

/// The kernel thread id of the calling thread. Async-signal-safe.
pub fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { crate::raw::syscall6(libc::SYS_gettid, [0; 6]) as i32 }
}

/// The calling thread's thread pointer: the x86_64 TLS ABI keeps it at `%fs:0`.
/// *Async-signal-safe*.
pub fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: reads one word at `%fs:0`, which the x86_64 TLS ABI requires to hold the thread
    // pointer itself in every thread (glibc and musl both set it up before any code runs).
    unsafe {
        std::arch::asm!(
            "mov {}, qword ptr fs:[0]",
            out(reg) tp,
            options(nostack, readonly, preserves_flags)
        );
    }
    tp
}

/// The process id (the thread-group id). Async-signal-safe.
pub fn getpid() -> i32 {
    // SAFETY: getpid takes no arguments and cannot fail.
    unsafe { crate::raw::syscall6(libc::SYS_getpid, [0; 6]) as i32 }
}

/// Sends `sig` to thread `tid` of this process. `sig == 0` only checks that the thread exists.
/// An exited thread gives `ESRCH`. Async-signal-safe.
pub fn tgkill(tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain integer arguments; the kernel validates them.
    unsafe {
        crate::raw::call(
            libc::SYS_tgkill,
            &[getpid() as usize, tid as usize, sig as usize],
        )
    }
    .map(drop)
}

/// Thread ids of this process, from `/proc/self/task`. Allocates.
pub fn list() -> io::Result<Vec<i32>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(tid);
        }
    }
    Ok(out)
}

/// A file descriptor closed on drop. Async-signal-safe.
#[derive(Debug)]
pub(crate) struct Fd(pub(crate) libc::c_int);

impl Fd {
    /// Opens a NUL-terminated path read-only with `extra` flags, without allocating.
    pub(crate) fn open(path: &[u8], extra: libc::c_int) -> io::Result<Fd> {
        debug_assert_eq!(path.last(), Some(&0));
        if path.last() != Some(&0) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: `path` is a live, NUL-terminated byte string (checked above).
        let fd = unsafe {
            crate::raw::call(
                libc::SYS_openat,
                &[
                    libc::AT_FDCWD as usize,
                    path.as_ptr() as usize,
                    (libc::O_RDONLY | libc::O_CLOEXEC | extra) as usize,
                ],
            )
        }?;
        Ok(Fd(fd as libc::c_int))
    }

    /// `read(2)` into `buf`, retrying on `EINTR`.
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes.
            let n = unsafe {
                crate::raw::call(
                    libc::SYS_read,
                    &[self.0 as usize, buf.as_mut_ptr() as usize, buf.len()],
                )
            };
            match n {
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
                other => return other,
            }
        }
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor and close it once.
        let _ = unsafe { crate::raw::call(libc::SYS_close, &[self.0 as usize]) };
    }
}

/// Reads a whole file (by NUL-terminated path) into `buf`; returns its length, or
/// `CAPACITY_EXCEEDED` when it does not fit. For the crate's non-allocating `/proc` readers.
/// Async-signal-safe.
pub(crate) fn read_whole(path: &[u8], buf: &mut [u8]) -> io::Result<usize> {
    let fd = Fd::open(path, 0)?;
    let mut len = 0;
    loop {
        if len == buf.len() {
            // Full: either exactly the size or more to come. Probe with one byte.
            let mut probe = [0u8; 1];
            return match fd.read(&mut probe)? {
                0 => Ok(len),
                _ => Err(io::Error::from_raw_os_error(CAPACITY_EXCEEDED)),
            };
        }
        let n = fd.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(len);
        }
        len += n;
    }
}

/// Reads the start of a file (by NUL-terminated path) into `buf`: a file longer than `buf` is
/// cut at its size, for callers that read fields near the start. Async-signal-safe.
pub(crate) fn read_start(path: &[u8], buf: &mut [u8]) -> io::Result<usize> {
    match read_whole(path, buf) {
        Err(e) if e.raw_os_error() == Some(CAPACITY_EXCEEDED) => Ok(buf.len()),
        read => read,
    }
}

/// Lists thread ids of this process into `out`, using `buf` for raw directory entries; returns
/// how many ids were written. Allocates nothing: async-signal-safe.
///
/// Errors with `CAPACITY_EXCEEDED` (`ENOBUFS`) when `out` is too small or `buf` cannot hold one
/// directory entry (use at least 4 KiB).
///
/// A listing taken while threads exit can be cut short: the kernel ends its walk of the thread
/// list at a thread that died meanwhile. Compare its length with [`count`] to know it is
/// complete.
pub fn list_into(buf: &mut [u8], out: &mut [i32]) -> io::Result<usize> {
    let dir = Fd::open(b"/proc/self/task\0", libc::O_DIRECTORY)?;
    let mut count = 0;
    loop {
        // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes.
        let n = unsafe {
            crate::raw::call(
                libc::SYS_getdents64,
                &[dir.0 as usize, buf.as_mut_ptr() as usize, buf.len()],
            )
        }
        .map_err(|err| match err.raw_os_error() {
            Some(libc::EINVAL) => io::Error::from_raw_os_error(CAPACITY_EXCEEDED),
            _ => err,
        })?;
        if n == 0 {
            return Ok(count);
        }
        count = parse_dirents(&buf[..n], out, count)?;
    }
}

/// Pure: appends the numeric names of the `linux_dirent64` records in `raw` to `out[count..]`;
/// returns the new count.
fn parse_dirents(raw: &[u8], out: &mut [i32], mut count: usize) -> io::Result<usize> {
    // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
    const NAME: usize = 19;
    let mut off = 0;
    while off + NAME <= raw.len() {
        let reclen = u16::from_ne_bytes([raw[off + 16], raw[off + 17]]) as usize;
        if reclen < NAME || off + reclen > raw.len() {
            return Err(io::ErrorKind::InvalidData.into());
        }
        let name = &raw[off + NAME..off + reclen];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        if let Some(tid) = parse_decimal(name) {
            let slot = out
                .get_mut(count)
                .ok_or_else(|| io::Error::from_raw_os_error(CAPACITY_EXCEEDED))?;
            *slot = tid;
            count += 1;
        }
        off += reclen;
    }
    Ok(count)
}

/// Pure: a positive decimal `i32`, or `None` (`.`, `..`, overflow, empty).
pub(crate) fn parse_decimal(s: &[u8]) -> Option<i32> {
    if s.is_empty() {
        return None;
    }
    let mut v: i32 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(i32::from(b - b'0'))?;
    }
    Some(v)
}

/// The number of threads of this process (`num_threads` of `/proc/self/stat`), the caller
/// included. Allocates nothing: async-signal-safe.
pub fn count() -> io::Result<usize> {
    let mut buf = [0u8; 1024];
    let n = read_start(b"/proc/self/stat\0", &mut buf)?;
    parse_stat_num_threads(&buf[..n]).ok_or_else(|| io::ErrorKind::InvalidData.into())
}

/// Pure: field 20 (`num_threads`) of a `stat` line, the 18th after the command name.
fn parse_stat_num_threads(line: &[u8]) -> Option<usize> {
    let close = line.iter().rposition(|&b| b == b')')?;
    let field = line[close + 1..]
        .split(|&b| b == b' ')
        .filter(|f| !f.is_empty())
        .nth(17)?;
    usize::try_from(parse_decimal(field)?).ok()
}

/// The scheduler state letter of thread `tid` of this process (`R`, `S`, `D`, `T`, `t`, `Z`,
/// `X`, ...), from `/proc/self/task/<tid>/stat`; `None` when no such thread exists any more.
/// Allocates nothing: async-signal-safe.
pub fn state(tid: i32) -> io::Result<Option<u8>> {
    let mut path = [0u8; 48];
    let prefix = b"/proc/self/task/";
    path[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len() + write_decimal(tid.unsigned_abs(), &mut path[prefix.len()..]);
    let suffix = b"/stat\0";
    path[len..len + suffix.len()].copy_from_slice(suffix);
    len += suffix.len();

    let mut buf = [0u8; 256];
    let n = match read_whole(&path[..len], &mut buf) {
        Ok(n) => n,
        // The line is longer than the buffer: the state letter is near the start anyway.
        Err(e) if e.raw_os_error() == Some(CAPACITY_EXCEEDED) => buf.len(),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    Ok(Some(
        parse_stat_state(&buf[..n]).ok_or(io::ErrorKind::InvalidData)?,
    ))
}

/// Pure: the state letter of a `stat` line: the first non-space after the last `)` (the
/// command name may itself contain parentheses).
fn parse_stat_state(line: &[u8]) -> Option<u8> {
    let close = line.iter().rposition(|&b| b == b')')?;
    line[close + 1..].iter().copied().find(|b| *b != b' ')
}

/// Pure: writes `v` in decimal at the start of `out`, returns the length (at most 10).
pub(crate) fn write_decimal(mut v: u32, out: &mut [u8]) -> usize {
    let mut tmp = [0u8; 10];
    let mut n = 0;
    loop {
        tmp[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        out[i] = tmp[n - 1 - i];
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_start_cuts_a_longer_file_at_the_buffer() {
        let mut small = [0u8; 16];
        assert_eq!(read_start(b"/proc/self/status\0", &mut small).unwrap(), 16);
        assert!(small.starts_with(b"Name:"));
        let mut big = [0u8; 64 * 1024];
        let n = read_start(b"/proc/self/status\0", &mut big).unwrap();
        assert!(n > 16 && n < big.len() && big[..n].ends_with(b"\n"));
        let missing = read_start(b"/proc/self/no-such-file\0", &mut big).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn decimal_round_trip() {
        let mut b = [0u8; 10];
        for v in [0u32, 7, 10, 4_194_304, u32::MAX] {
            let n = write_decimal(v, &mut b);
            assert_eq!(std::str::from_utf8(&b[..n]).unwrap(), v.to_string());
        }
        assert_eq!(parse_decimal(b"123"), Some(123));
        assert_eq!(parse_decimal(b"."), None);
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"99999999999"), None);
    }

    #[test]
    fn stat_state_after_last_paren() {
        assert_eq!(parse_stat_state(b"12 (a) b)) S 1 2"), Some(b'S'));
        assert_eq!(parse_stat_state(b"12 (x) Z 1"), Some(b'Z'));
        assert_eq!(parse_stat_state(b"garbage"), None);
    }

    #[test]
    fn stat_num_threads() {
        let line = b"25526 (a) b) S 24749 24746 2941 0 -1 4194304 279 0 0 0 0 0 0 0 20 0 66 0 21";
        assert_eq!(parse_stat_num_threads(line), Some(66));
        assert_eq!(parse_stat_num_threads(b"1 (x) S 1 2"), None);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || rx.recv().unwrap());
        assert!(count().unwrap() >= 2);
        tx.send(()).unwrap();
        h.join().unwrap();
    }

    #[test]
    fn lists_self_and_new_thread() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            tx.send(gettid()).unwrap();
            done_rx.recv().unwrap();
        });
        let other = rx.recv().unwrap();
        let mut buf = vec![0u8; 4096];
        let mut out = vec![0i32; 4096];
        // Other tests of this binary start and end threads meanwhile, and a listing taken
        // while a thread exits is cut short (see `list_into`): a complete one comes soon.
        let complete = |listing: &[i32]| listing.contains(&gettid()) && listing.contains(&other);
        assert!((0..1000).any(|_| {
            let n = list_into(&mut buf, &mut out).unwrap();
            complete(&out[..n])
        }));
        assert!((0..1000).any(|_| complete(&list().unwrap())));
        assert_eq!(state(gettid()).unwrap(), Some(b'R'));
        tgkill(other, 0).unwrap();
        done_tx.send(()).unwrap();
        h.join().unwrap();
        assert_eq!(state(other).unwrap(), None);
        assert_eq!(
            tgkill(other, 0).unwrap_err().raw_os_error(),
            Some(libc::ESRCH)
        );
    }

    #[test]
    fn list_into_reports_capacity() {
        let mut buf = vec![0u8; 4096];
        let mut out = [0i32; 0];
        let err = list_into(&mut buf, &mut out).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(CAPACITY_EXCEEDED));
    }
}
