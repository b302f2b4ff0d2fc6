//! Writing instruction bytes into executable memory without ever making it writable and
//! executable at once.
//!
//! The primary path is `pwrite` to `/proc/self/mem`, which the kernel lets through to
//! read+execute mappings. The fallback (when `/proc/self/mem` is not writable) changes the page
//! to read+write, copies, and restores read+execute; it is refused when the process forbids
//! gaining execute permission (`PR_SET_MDWE`), and refused for a page that holds the writer's
//! own code.
//!
//! `unsafe` here writes to code memory. The fallback's critical section is raw `syscall` and
//! `rep movsb` instructions in one function, because while a page is read+write it cannot run
//! code: a call into libc's `mprotect` or `memcpy`, or a signal handler, that happened to live
//! on that page would fault.

use std::arch::asm;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::mem::{Mapping, Prot, page_size, round_down, round_up};

/// How code bytes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    ProcSelfMem,
    Mprotect,
}

/// Writes code bytes. Open it before stopping threads; `write` is async-signal-safe.
///
/// The `/proc/self/mem` descriptor refers to the address space it was opened in: a child
/// created by `fork` must open its own writer.
#[derive(Debug)]
pub struct CodeWriter {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    ProcSelfMem(OwnedFd),
    Mprotect,
}

impl CodeWriter {
    /// Opens `/proc/self/mem` and probes that it writes into read+execute memory; falls back
    /// to `Method::Mprotect` when it does not (and MDWE is off), else errors.
    pub fn open() -> io::Result<CodeWriter> {
        let proc_err = match CodeWriter::open_with(Method::ProcSelfMem) {
            Ok(writer) => return Ok(writer),
            Err(e) => e,
        };
        if crate::cpu::mdwe_enabled() {
            return Err(io::Error::new(
                proc_err.kind(),
                format!(
                    "cannot write code: {proc_err}, and the process forbids gaining execute \
                     permission (PR_SET_MDWE, MemoryDenyWriteExecute), so mprotect cannot \
                     either; allow writes to /proc/self/mem (proc_mem.force_override)"
                ),
            ));
        }
        CodeWriter::open_with(Method::Mprotect).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot write code: {proc_err}; fallback: {e}"),
            )
        })
    }

    /// Opens a writer using `method` only, probed on a fresh read+execute page.
    pub fn open_with(method: Method) -> io::Result<CodeWriter> {
        let inner = match method {
            Method::ProcSelfMem => Inner::ProcSelfMem(open_proc_self_mem()?),
            Method::Mprotect if crate::cpu::mdwe_enabled() => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "mprotect code writing: the process forbids gaining execute permission \
                     (PR_SET_MDWE)",
                ));
            }
            Method::Mprotect => Inner::Mprotect,
        };
        let writer = CodeWriter { inner };
        writer.probe()?;
        Ok(writer)
    }

    pub fn method(&self) -> Method {
        match self.inner {
            Inner::ProcSelfMem(_) => Method::ProcSelfMem,
            Inner::Mprotect => Method::Mprotect,
        }
    }

    /// Checks, before threads are stopped, that `write` would accept the range, with an error
    /// naming it. `write` repeats the check but can only return a bare error kind.
    pub fn check(&self, addr: usize, len: usize) -> io::Result<()> {
        let invalid = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot write {len:#x} code bytes at {addr:#x}: {why}"),
            )
        };
        let end = addr
            .checked_add(len)
            .ok_or_else(|| invalid("the range wraps around"))?;
        match self.inner {
            Inner::ProcSelfMem(_) if i64::try_from(end).is_err() => {
                Err(invalid("beyond the user address space"))
            }
            Inner::ProcSelfMem(_) => Ok(()),
            Inner::Mprotect => {
                let (first, pages_len) =
                    page_span(addr, end).ok_or_else(|| invalid("beyond the last page"))?;
                if overlaps_writer(first, pages_len) {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "cannot write {len:#x} code bytes at {addr:#x} with mprotect: pages \
                             {first:#x}..{:#x} hold the code writer itself, which must stay \
                             executable",
                            first + pages_len
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Writes `bytes` at `addr`. Async-signal-safe.
    ///
    /// Errors are allocation-free: an OS error code, or a bare `InvalidInput` (range wraps or
    /// leaves the address space) or `PermissionDenied` (the `Mprotect` method and a page of the
    /// writer's own code). Use `check` first for a message.
    ///
    /// # Safety
    /// `[addr, addr + bytes.len())` is mapped and no thread executes or will execute those
    /// bytes until the write is complete and cores are synchronised (`cpu::sync_cores`).
    ///
    /// With `Method::Mprotect` also: the range lies in private read+execute mappings (they are
    /// restored to read+execute, whatever they were), and no other thread runs any code on the
    /// pages it touches while the write is in progress (those pages are not executable
    /// meanwhile); stop the other threads first.
    pub unsafe fn write(&self, addr: usize, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let end = addr
            .checked_add(bytes.len())
            .ok_or(io::ErrorKind::InvalidInput)?;
        match &self.inner {
            Inner::ProcSelfMem(fd) => pwrite_all(fd.as_raw_fd(), addr, bytes),
            Inner::Mprotect => {
                let (first, pages_len) = page_span(addr, end).ok_or(io::ErrorKind::InvalidInput)?;
                if overlaps_writer(first, pages_len) {
                    return Err(io::ErrorKind::PermissionDenied.into());
                }
                // SAFETY: the caller vouches for the range (mapped, private, read+execute, not
                // executed meanwhile); the pages do not hold `patch_window` (checked above).
                let r = unsafe {
                    patch_window(first, pages_len, addr, bytes.as_ptr() as usize, bytes.len())
                };
                if r < 0 {
                    return Err(io::Error::from_raw_os_error(-r as i32));
                }
                Ok(())
            }
        }
    }

    /// Writes one `ret` into a fresh read+execute page and reads it back.
    fn probe(&self) -> io::Result<()> {
        const RET: u8 = 0xc3;
        let page = Mapping::map_anywhere(1, Prot::ReadExec)?;
        // SAFETY: the page is ours, mapped read+execute and never executed.
        unsafe { self.write(page.addr(), &[RET]) }.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{:?} cannot write into read+execute memory at {:#x}: {e}",
                    self.method(),
                    page.addr()
                ),
            )
        })?;
        // SAFETY: the page is mapped readable and at least one byte long.
        let got = unsafe { std::ptr::read_volatile(page.addr() as *const u8) };
        if got != RET {
            return Err(io::Error::other(format!(
                "{:?} wrote {RET:#x} at {:#x} but {got:#x} reads back",
                self.method(),
                page.addr()
            )));
        }
        Ok(())
    }
}

fn open_proc_self_mem() -> io::Result<OwnedFd> {
    // std opens with O_CLOEXEC.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")
        .map_err(|e| io::Error::new(e.kind(), format!("opening /proc/self/mem: {e}")))?;
    Ok(file.into())
}

/// Writes each `(address, bytes)` of `writes` into this process's code through a
/// `/proc/self/mem` opened for this call alone, with raw system calls only (no allocation, no
/// C library: async-signal-safe). For a forked child: the descriptor of a [`CodeWriter`] it
/// inherited still writes into the parent's memory. Every write is tried; the first failure is
/// returned.
///
/// # Safety
/// As [`CodeWriter::write`] through `/proc/self/mem`: every range lies in this process's code,
/// and no thread runs the bytes while they change.
pub unsafe fn write_through_fresh_proc_mem<'a>(
    writes: impl IntoIterator<Item = (usize, &'a [u8])>,
) -> io::Result<()> {
    let path = c"/proc/self/mem";
    // SAFETY: a NUL-terminated path that outlives the call; openat only reads it.
    let fd = unsafe {
        crate::raw::call(
            libc::SYS_openat,
            &[
                libc::AT_FDCWD as usize,
                path.as_ptr() as usize,
                (libc::O_RDWR | libc::O_CLOEXEC) as usize,
            ],
        )
    }? as RawFd;
    let mut written = Ok(());
    for (addr, bytes) in writes {
        let result = pwrite_all(fd, addr, bytes);
        if written.is_ok() {
            written = result;
        }
    }
    // SAFETY: closes the descriptor opened above, used by nothing else.
    let _ = unsafe { crate::raw::call(libc::SYS_close, &[fd as usize]) };
    written
}

/// `pwrite` all of `bytes` at offset `addr` of `/proc/self/mem` (open as `fd`), across short
/// writes and `EINTR`. Async-signal-safe.
fn pwrite_all(fd: RawFd, addr: usize, bytes: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while let Some(rest) = bytes.get(done..).filter(|r| !r.is_empty()) {
        let offset = addr
            .checked_add(done)
            .and_then(|at| i64::try_from(at).ok())
            .ok_or(io::ErrorKind::InvalidInput)?;
        // SAFETY: `rest` is a live slice of `rest.len()` readable bytes; the kernel writes
        // into the target range, which the caller of `write` vouches for.
        // Without the C library: the code being written may be libc's `pwrite64` itself.
        let n = unsafe {
            crate::raw::call(
                libc::SYS_pwrite64,
                &[
                    fd as usize,
                    rest.as_ptr() as usize,
                    rest.len(),
                    offset as usize,
                ],
            )
        };
        match n {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// First page and length in bytes of the pages covering `[addr, end)`.
fn page_span(addr: usize, end: usize) -> Option<(usize, usize)> {
    let page = page_size();
    let first = round_down(addr, page);
    let last = round_up(end, page)?;
    Some((first, last - first))
}

/// Whether the pages `[first, first + len)` may hold `patch_window`, the code that runs while
/// they are not executable. The function is far smaller than a page, so it lies in the page of
/// its address or spills into the next one.
fn overlaps_writer(first: usize, len: usize) -> bool {
    let page = page_size();
    let own = round_down(patch_window as *const () as usize, page);
    let own_end = own.saturating_add(2 * page);
    first < own_end && own < first.saturating_add(len)
}

/// Makes `[first, first + pages_len)` read+write, copies `len` bytes from `src` to `dst`, and
/// makes the pages read+execute again. Returns 0 or a negated errno (of the first failure).
///
/// Every signal is blocked and no function is called between the two `mprotect`s: all of it
/// is inline `syscall` and `rep movsb`, so nothing needs to execute code on the pages while
/// they are not executable, even in a debug build. Read+execute is restored even when making
/// them writable failed, since `mprotect` may fail after changing some of the pages.
///
/// # Safety
/// - `[first, first + pages_len)` are whole pages of private read+execute mappings, none of
///   them holding this function, and no other thread runs code on them meanwhile;
/// - `[dst, dst + len)` lies in those pages, `[src, src + len)` is readable and separate.
#[inline(never)]
unsafe fn patch_window(
    first: usize,
    pages_len: usize,
    dst: usize,
    src: usize,
    len: usize,
) -> isize {
    // The kernel's signal set on x86_64: 64 bits.
    const SIGSET_SIZE: usize = 8;
    let all: u64 = !0;
    let mut old: u64 = 0;
    // SAFETY: rt_sigprocmask reads `all` and writes `old`, live locals of `SIGSET_SIZE` bytes each.
    let blocked = unsafe {
        syscall4(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as usize,
            &all as *const u64 as usize,
            &mut old as *mut u64 as usize,
            SIGSET_SIZE,
        )
    };
    if blocked < 0 {
        return blocked;
    }
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as usize;
    let rx = (libc::PROT_READ | libc::PROT_EXEC) as usize;
    // SAFETY: the caller guarantees these pages are code nobody runs meanwhile, and none of
    // them holds this function, so dropping execute from them cannot fault here.
    let made_writable = unsafe { syscall4(libc::SYS_mprotect, first, pages_len, rw, 0) };
    if made_writable == 0 {
        // SAFETY: `[dst, dst + len)` is now writable and `[src, src + len)` readable and
        // separate (caller's contract); the direction flag is clear per the ABI.
        unsafe {
            asm!(
                "rep movsb",
                inout("rcx") len => _,
                inout("rdi") dst => _,
                inout("rsi") src => _,
                options(nostack, preserves_flags)
            );
        }
    }
    // SAFETY: as above; this restores the protection the caller guarantees the pages had.
    let restored = unsafe { syscall4(libc::SYS_mprotect, first, pages_len, rx, 0) };
    // SAFETY: rt_sigprocmask reads `old`, a live local of `SIGSET_SIZE` bytes.
    unsafe {
        syscall4(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as usize,
            &old as *const u64 as usize,
            0,
            SIGSET_SIZE,
        )
    };
    if made_writable < 0 {
        made_writable
    } else {
        restored
    }
}

/// A raw x86_64 `syscall` instruction with four arguments, inlined so that no call is made.
///
/// # Safety
/// The system call's own preconditions for memory its arguments point to.
#[inline(always)]
unsafe fn syscall4(nr: libc::c_long, a1: usize, a2: usize, a3: usize, a4: usize) -> isize {
    let ret: isize;
    // SAFETY: the `syscall` instruction clobbers only rax (result), rcx and r11, declared
    // here; memory effects are the caller's responsibility.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            in("r10") a4,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack, preserves_flags)
        );
    }
    ret
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `mov eax, 42; ret`
    const RETURN_42: [u8; 6] = [0xb8, 0x2a, 0x00, 0x00, 0x00, 0xc3];
    const MDWE_CHILD_ENV: &str = "DSU_SYS_MDWE_CHILD";

    /// Places a function in a fresh read+execute page, then changes what it returns.
    fn rewrites_function(writer: &CodeWriter) {
        let page = Mapping::map_anywhere(1, Prot::ReadExec).unwrap();
        // SAFETY: our own fresh page; nothing executes it during the write.
        unsafe { writer.write(page.addr(), &RETURN_42) }.unwrap();
        crate::cpu::sync_cores().unwrap();
        // SAFETY: the page now holds a complete `extern "C" fn() -> i32` (mov eax, imm; ret).
        let f: extern "C" fn() -> i32 = unsafe { std::mem::transmute(page.addr()) };
        assert_eq!(f(), 42);
        // SAFETY: as above; `f` is not running while we write.
        unsafe { writer.write(page.addr() + 1, &7i32.to_le_bytes()) }.unwrap();
        crate::cpu::flush_icache(page.addr(), RETURN_42.len());
        crate::cpu::sync_cores().unwrap();
        assert_eq!(f(), 7);
        let maps = crate::maps::read_self().unwrap();
        let e = maps.iter().find(|e| e.contains(page.addr())).unwrap();
        assert!(e.perms.exec && !e.perms.write, "still read+execute: {e:?}");
    }

    fn writes_and_reads_back(writer: &CodeWriter) {
        let page = Mapping::map_anywhere(3 * page_size(), Prot::ReadExec).unwrap();
        // Straddles a page boundary.
        let at = page.addr() + page_size() - 3;
        let bytes: Vec<u8> = (0..=255u8).cycle().take(page_size() + 10).collect();
        // SAFETY: our own fresh pages; nothing executes them.
        unsafe { writer.write(at, &bytes) }.unwrap();
        // SAFETY: the range is mapped readable and was just written.
        let back = unsafe { std::slice::from_raw_parts(at as *const u8, bytes.len()) };
        assert_eq!(back, &bytes[..]);
        // SAFETY: as above.
        unsafe { writer.write(at, &[]) }.unwrap();
    }

    #[test]
    fn open_probes_a_method() {
        let writer = CodeWriter::open().unwrap();
        eprintln!("code writer method: {:?}", writer.method());
        rewrites_function(&writer);
        writes_and_reads_back(&writer);
    }

    #[test]
    fn proc_self_mem_writes_read_exec_memory() {
        match CodeWriter::open_with(Method::ProcSelfMem) {
            Ok(writer) => {
                assert_eq!(writer.method(), Method::ProcSelfMem);
                rewrites_function(&writer);
                writes_and_reads_back(&writer);
            }
            // A kernel that refuses forced writes (proc_mem.force_override=never).
            Err(e) => eprintln!("/proc/self/mem unusable here: {e}"),
        }
    }

    /// Two bytes of code in this executable's own (file-backed) text: `mov eax, 1; ret`,
    /// padded so that the immediate can be rewritten in place.
    #[unsafe(naked)]
    extern "C" fn returns_one() -> i32 {
        std::arch::naked_asm!("mov eax, 1", "ret", "int3", "int3")
    }

    #[test]
    fn proc_self_mem_writes_file_backed_text() {
        let Ok(writer) = CodeWriter::open_with(Method::ProcSelfMem) else {
            return; // reported by `proc_self_mem_writes_read_exec_memory`
        };
        let f: extern "C" fn() -> i32 = std::hint::black_box(returns_one);
        assert_eq!(f(), 1);
        let imm = returns_one as *const () as usize + 1;
        // SAFETY: `returns_one` is mapped and only this test runs it, not during the write.
        unsafe { writer.write(imm, &2i32.to_le_bytes()) }.unwrap();
        crate::cpu::sync_cores().unwrap();
        assert_eq!(f(), 2);
        let maps = crate::maps::read_self().unwrap();
        let e = maps.iter().find(|e| e.contains(imm)).unwrap();
        assert!(e.perms.exec && !e.perms.write && !e.perms.shared, "{e:?}");
    }

    #[test]
    fn mprotect_writes_read_exec_memory() {
        let writer = CodeWriter::open_with(Method::Mprotect).unwrap();
        assert_eq!(writer.method(), Method::Mprotect);
        rewrites_function(&writer);
        writes_and_reads_back(&writer);
    }

    #[test]
    fn mprotect_refuses_its_own_code() {
        let writer = CodeWriter::open_with(Method::Mprotect).unwrap();
        let own = patch_window as *const () as usize;
        let err = writer.check(own, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains(&format!("{own:#x}")), "{err}");
        // SAFETY: refused before any memory is touched (what this test checks); the byte
        // written is the one already there, so even a wrong write would change nothing.
        let same = unsafe { std::ptr::read_volatile(own as *const u8) };
        // SAFETY: see above.
        let err = unsafe { writer.write(own, &[same]) }.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        // The next page may hold the tail of the function.
        let next = round_down(own, page_size()) + page_size();
        assert!(writer.check(next, 1).is_err());
    }

    #[test]
    fn bad_ranges_are_errors() {
        for writer in [
            CodeWriter::open_with(Method::Mprotect).unwrap(),
            CodeWriter::open().unwrap(),
        ] {
            assert!(writer.check(usize::MAX, 2).is_err());
            // SAFETY: the range wraps and is refused before any syscall.
            let err = unsafe { writer.write(usize::MAX, &[0, 0]) }.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            // SAFETY: nothing is ever mapped at 0x1000 (below vm.mmap_min_addr), so the
            // kernel refuses without touching memory.
            let err = unsafe { writer.write(0x1000, &[0xc3]) }.unwrap_err();
            assert!(err.raw_os_error().is_some(), "{err:?}");
        }
    }

    /// Runs only in the child started by `mdwe_refuses_mprotect_not_proc_self_mem`: MDWE
    /// cannot be turned off again, so it must not hit the test process itself.
    #[test]
    fn mdwe_child() {
        if std::env::var_os(MDWE_CHILD_ENV).is_none() {
            return;
        }
        let refuse_exec_gain = libc::PR_MDWE_REFUSE_EXEC_GAIN as libc::c_ulong;
        // SAFETY: prctl(PR_SET_MDWE) takes integers only.
        let r = unsafe { libc::prctl(libc::PR_SET_MDWE, refuse_exec_gain, 0, 0, 0) };
        if r != 0 {
            println!("MDWE-SKIPPED: {}", io::Error::last_os_error());
            return;
        }
        assert!(crate::cpu::mdwe_enabled());
        // The kernel refuses gaining execute, but maps fresh read+execute memory.
        let page = page_size();
        let data = Mapping::map_anywhere(page, Prot::ReadWrite).unwrap();
        assert!(data.protect(0, page, Prot::ReadExec).is_err());
        let code = Mapping::map_anywhere(page, Prot::ReadExec).unwrap();
        code.protect(0, page, Prot::Read).unwrap();
        assert!(
            code.protect(0, page, Prot::ReadExec).is_err(),
            "exec lost is lost"
        );
        let err = CodeWriter::open_with(Method::Mprotect).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        match CodeWriter::open() {
            Ok(writer) => {
                assert_eq!(writer.method(), Method::ProcSelfMem);
                rewrites_function(&writer);
            }
            Err(e) => assert!(e.to_string().contains("PR_SET_MDWE"), "{e}"),
        }
        println!("MDWE-CHILD-OK");
    }

    #[test]
    fn mdwe_refuses_mprotect_not_proc_self_mem() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "code::tests::mdwe_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(MDWE_CHILD_ENV, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains("MDWE-CHILD-OK") || stdout.contains("MDWE-SKIPPED"),
            "child did not run the test:\n{stdout}\n{stderr}"
        );
        eprintln!(
            "{}",
            stdout.lines().find(|l| l.starts_with("MDWE")).unwrap_or("")
        );
    }
}
