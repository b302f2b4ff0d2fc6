//! Anonymous memory mapped near an address (within reach of a `rel32`).
//!
//! `unsafe` here wraps `mmap`, `mprotect` and `munmap` on ranges this module owns. Placement is
//! split into a pure part (`free_candidates`: which addresses would do, from a maps listing)
//! and the syscalls (`Mapping::map_near` tries them with `MAP_FIXED_NOREPLACE`, which never
//! replaces an existing mapping, so a stale listing costs a retry, not a clobbered mapping).
//!
//! Under `PR_SET_MDWE` a mapping can never gain execute permission later: map code memory
//! `Prot::ReadExec` from the start and write it through `code::CodeWriter`.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::maps::MapEntry;

/// Lowest address we place mappings at (the kernel's default `vm.mmap_min_addr`).
pub const USER_MIN: usize = 0x1_0000;
/// End of the x86_64 user address space with 4-level paging (the last page is never mapped).
pub const USER_MAX: usize = 0x7fff_ffff_f000;
/// Most candidates `free_candidates` returns.
pub const MAX_CANDIDATES: usize = 64;

/// Space kept free below the top of the main stack (`[stack]`): the stack grows down into it,
/// and the kernel itself keeps at least 128 MiB there (`MIN_GAP` in `mm/util.c`) plus the
/// stack guard gap. A mapping inside it would cap the main thread's stack.
const STACK_RESERVE: usize = 128 << 20;
/// Space kept free above `[heap]` so that `brk` can still grow the heap.
const HEAP_RESERVE: usize = 1 << 30;

/// Protection of a mapping; never writable and executable at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prot {
    None,
    Read,
    ReadWrite,
    ReadExec,
}

impl Prot {
    /// The `PROT_*` bits. There is deliberately no writable+executable combination.
    pub fn bits(self) -> libc::c_int {
        match self {
            Prot::None => libc::PROT_NONE,
            Prot::Read => libc::PROT_READ,
            Prot::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
            Prot::ReadExec => libc::PROT_READ | libc::PROT_EXEC,
        }
    }
}

static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);

/// The system page size.
pub fn page_size() -> usize {
    let cached = PAGE_SIZE.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    // SAFETY: `sysconf` has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    // sysconf cannot fail for _SC_PAGESIZE on Linux; 4 KiB is the x86_64 page if it ever does.
    let size = usize::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096);
    PAGE_SIZE.store(size, Ordering::Relaxed);
    size
}

/// `n` rounded up to a multiple of `page` (a power of two); `None` on overflow.
pub fn round_up(n: usize, page: usize) -> Option<usize> {
    debug_assert!(page.is_power_of_two());
    Some(n.checked_add(page - 1)? & !(page - 1))
}

/// `n` rounded down to a multiple of `page` (a power of two).
pub fn round_down(n: usize, page: usize) -> usize {
    debug_assert!(page.is_power_of_two());
    n & !(page - 1)
}

/// Pure: candidate start addresses for `len` bytes (page-aligned) in the gaps between
/// `maps` (sorted by start), such that the whole range lies within `reach` bytes of `anchor`
/// (both ends). Nearest first.
///
/// "Within reach" means `|start - anchor| <= reach` and `|start + len - anchor| <= reach`
/// (the end being exclusive, this is slightly conservative). Only gaps inside
/// `[USER_MIN, USER_MAX)` are used, and the growth areas below `[stack]` and above `[heap]` are
/// avoided. Each gap contributes its lowest and highest fitting address and the one nearest to
/// `anchor`; at most `MAX_CANDIDATES` are returned, ordered by the distance from `anchor` to
/// the farther end of the range. `len` 0 gives no candidates.
pub fn free_candidates(maps: &[MapEntry], anchor: usize, len: usize, reach: usize) -> Vec<usize> {
    candidates_with_page(maps, anchor, len, reach, page_size())
}

/// `free_candidates` with an explicit page size (a power of two).
pub fn candidates_with_page(
    maps: &[MapEntry],
    anchor: usize,
    len: usize,
    reach: usize,
    page: usize,
) -> Vec<usize> {
    let Some(len) = round_up(len, page).filter(|&l| l != 0) else {
        return Vec::new();
    };
    // The window every byte of the range must lie in.
    let lo_limit = anchor.saturating_sub(reach);
    let hi_limit = anchor.saturating_add(reach);
    let mut found: Vec<usize> = Vec::new();
    for (gap_start, gap_end) in gaps(maps, page) {
        let Some(lo) = round_up(gap_start.max(lo_limit), page) else {
            continue;
        };
        let Some(last_start) = gap_end.min(hi_limit).checked_sub(len) else {
            continue;
        };
        let hi = round_down(last_start, page);
        if lo > hi {
            continue;
        }
        let near = round_down(anchor, page).clamp(lo, hi);
        for x in [lo, hi, near] {
            if !found.contains(&x) {
                found.push(x);
            }
        }
    }
    found.sort_by_key(|&x| far_distance(x, len, anchor));
    found.truncate(MAX_CANDIDATES);
    found
}

/// Distance from `anchor` to the farther end of `[x, x + len]`.
fn far_distance(x: usize, len: usize, anchor: usize) -> usize {
    x.abs_diff(anchor).max((x + len).abs_diff(anchor))
}

/// Free page-aligned gaps `[start, end)` in the user address space, given `maps` in any order.
fn gaps(maps: &[MapEntry], page: usize) -> Vec<(usize, usize)> {
    let mut used: Vec<(usize, usize)> = maps.iter().map(occupied).collect();
    used.sort_unstable();
    let mut out = Vec::new();
    let mut cursor = USER_MIN;
    for (start, end) in used {
        push_gap(&mut out, cursor, start.min(USER_MAX), page);
        cursor = cursor.max(end);
        if cursor >= USER_MAX {
            return out;
        }
    }
    push_gap(&mut out, cursor, USER_MAX, page);
    out
}

fn push_gap(out: &mut Vec<(usize, usize)>, start: usize, end: usize, page: usize) {
    let (Some(start), end) = (round_up(start, page), round_down(end, page)) else {
        return;
    };
    if start < end {
        out.push((start, end));
    }
}

/// The range a mapping keeps others out of, including the growth areas of stack and heap.
fn occupied(m: &MapEntry) -> (usize, usize) {
    match m.path.as_deref() {
        Some("[stack]") => (m.start.min(m.end.saturating_sub(STACK_RESERVE)), m.end),
        Some("[heap]") => (m.start, m.end.saturating_add(HEAP_RESERVE)),
        _ => (m.start, m.end),
    }
}

/// An anonymous private mapping owned by the caller. Dropping it unmaps it unless `leak` was
/// called.
#[derive(Debug)]
pub struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes (rounded up to pages) with `prot` at an address such that the whole
    /// mapping lies within `reach` bytes of `anchor`, using `MAP_FIXED_NOREPLACE` on the
    /// candidates from `free_candidates`.
    pub fn map_near(anchor: usize, len: usize, reach: usize, prot: Prot) -> io::Result<Mapping> {
        Self::map_near_in(&crate::maps::read_self()?, anchor, len, reach, prot)
    }

    /// As [`Mapping::map_near`], choosing candidates from a snapshot of the maps the caller
    /// already read. A stale snapshot is safe: `MAP_FIXED_NOREPLACE` refuses an address taken
    /// since, and the next candidate is tried.
    pub fn map_near_in(
        maps: &[crate::maps::MapEntry],
        anchor: usize,
        len: usize,
        reach: usize,
        prot: Prot,
    ) -> io::Result<Mapping> {
        let len = rounded_len(len)?;
        for addr in free_candidates(maps, anchor, len, reach) {
            if let Some(mapping) = try_map_at(addr, len, prot)? {
                debug_assert!(far_distance(mapping.addr, len, anchor) <= reach);
                return Ok(mapping);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("no free {len:#x} bytes within {reach:#x} of {anchor:#x}"),
        ))
    }

    /// Maps `len` bytes anywhere.
    pub fn map_anywhere(len: usize, prot: Prot) -> io::Result<Mapping> {
        let len = rounded_len(len)?;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choice replaces nothing.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot.bits(), flags, -1, 0) };
        if ptr == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("mmap of {len:#x} bytes ({prot:?}): {e}"),
            ));
        }
        Ok(Mapping {
            addr: ptr as usize,
            len,
        })
    }

    pub fn addr(&self) -> usize {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Changes the protection of the page-aligned sub-range `[offset, offset + len)`.
    pub fn protect(&self, offset: usize, len: usize, prot: Prot) -> io::Result<()> {
        let page = page_size();
        let in_bounds = offset.checked_add(len).is_some_and(|end| end <= self.len);
        if !offset.is_multiple_of(page) || !len.is_multiple_of(page) || !in_bounds {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "protect [{offset:#x}, +{len:#x}) of the mapping at {:#x} (+{:#x}): \
                     not page-aligned or out of bounds",
                    self.addr, self.len
                ),
            ));
        }
        let addr = self.addr + offset;
        debug_assert!(addr.is_multiple_of(page) && addr + len <= self.addr + self.len);
        // SAFETY: the range is inside this mapping (checked above), which this value owns.
        let r = unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot.bits()) };
        if r != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("mprotect {addr:#x} +{len:#x} to {prot:?}: {e}"),
            ));
        }
        Ok(())
    }

    /// Keeps the memory mapped for the life of the process and returns its range.
    pub fn leak(self) -> (usize, usize) {
        let range = (self.addr, self.len);
        std::mem::forget(self);
        range
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: this value owns the range; the Rust API hands out only its address as an
        // integer, so no reference into it outlives the mapping.
        let r = unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        debug_assert_eq!(r, 0, "munmap {:#x} +{:#x}", self.addr, self.len);
    }
}

/// Unmaps a range previously returned by `Mapping::leak`.
///
/// # Safety
/// - `[addr, addr + len)` was returned by `Mapping::leak` and is not unmapped yet;
/// - nothing (no thread's program counter or return address, no pointer in use) refers to it.
pub unsafe fn unmap(addr: usize, len: usize) -> io::Result<()> {
    let page = page_size();
    if !addr.is_multiple_of(page) || len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unmap {addr:#x} +{len:#x}: not a page-aligned, non-empty range"),
        ));
    }
    // SAFETY: the caller guarantees the range is a leaked mapping nothing refers to.
    let r = unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("munmap {addr:#x} +{len:#x}: {e}"),
        ));
    }
    Ok(())
}

/// `len` rounded up to whole pages; 0 or an overflowing length is an error.
fn rounded_len(len: usize) -> io::Result<usize> {
    round_up(len, page_size())
        .filter(|&l| l != 0)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot map {len:#x} bytes"),
            )
        })
}

/// Maps exactly at `addr`; `Ok(None)` when the place is taken or refused, so the caller can
/// try the next candidate.
fn try_map_at(addr: usize, len: usize, prot: Prot) -> io::Result<Option<Mapping>> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; on kernels that ignore
    // it, the address is only a hint and is checked below.
    let ptr = unsafe { libc::mmap(addr as *mut libc::c_void, len, prot.bits(), flags, -1, 0) };
    if ptr == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // Taken since the maps were read, or refused at this address (below
            // mmap_min_addr, over the map count or a memory limit): try elsewhere.
            Some(libc::EEXIST | libc::EPERM | libc::ENOMEM) => Ok(None),
            _ => Err(io::Error::new(
                e.kind(),
                format!("mmap {len:#x} bytes at {addr:#x} ({prot:?}): {e}"),
            )),
        };
    }
    let mapping = Mapping {
        addr: ptr as usize,
        len,
    };
    if mapping.addr != addr {
        // A kernel older than 4.17 treated the address as a hint; dropping unmaps it.
        return Ok(None);
    }
    Ok(Some(mapping))
}

/// Copies `buf.len()` bytes of this process's memory from `addr` into `buf` without faulting
/// on an unmapped page: `process_vm_readv` on the own process, which returns how many bytes it
/// could copy (fewer when the range reaches an unmapped page, 0 or `EFAULT` when `addr` is
/// unmapped). For memory another thread may unmap meanwhile, such as the stack of a thread
/// that is not stopped and may exit. Async-signal-safe.
pub fn copy_from_self(addr: usize, buf: &mut [u8]) -> io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, a live writable slice of its length; `remote` is only
    // read by the kernel, which checks it against this process's mappings.
    unsafe {
        crate::raw::call(
            libc::SYS_process_vm_readv,
            &[
                crate::threads::getpid() as usize,
                &raw const local as usize,
                1,
                &raw const remote as usize,
                1,
                0,
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_from_self_stops_at_unmapped_memory() {
        let data = [7u8, 8, 9, 10];
        let mut buf = [0u8; 4];
        assert_eq!(copy_from_self(data.as_ptr() as usize, &mut buf).unwrap(), 4);
        assert_eq!(buf, data);
        let page = Mapping::map_anywhere(1, Prot::Read).unwrap();
        let mut big = vec![0u8; page.len() + 16];
        // Up to the end of the mapping (the next page is unmapped or another mapping).
        let n = copy_from_self(page.addr(), &mut big).unwrap_or(0);
        assert!(n >= page.len() || n == 0);
        let (addr, len) = page.leak();
        // SAFETY: the page was just mapped here and nothing refers to it.
        unsafe { unmap(addr, len) }.unwrap();
        assert!(copy_from_self(addr, &mut buf).map_or(true, |n| n == 0));
        assert_eq!(copy_from_self(0, &mut []).unwrap(), 0);
    }
    use crate::maps::Perms;

    const PAGE: usize = 0x1000;
    const GIB2: usize = 1 << 31;

    fn entry(start: usize, end: usize, path: Option<&str>) -> MapEntry {
        MapEntry {
            start,
            end,
            perms: Perms::default(),
            offset: 0,
            path: path.map(Into::into),
        }
    }

    fn assert_fits(maps: &[MapEntry], c: usize, len: usize, anchor: usize, reach: usize) {
        assert_eq!(c % PAGE, 0, "{c:#x} aligned");
        assert!(c.abs_diff(anchor) <= reach, "{c:#x} start in reach");
        assert!((c + len).abs_diff(anchor) <= reach, "{c:#x} end in reach");
        assert!(c >= USER_MIN && c + len <= USER_MAX);
        for m in maps {
            assert!(c + len <= m.start || c >= m.end, "{c:#x} overlaps {m:?}");
        }
    }

    #[test]
    fn page_size_is_cached_power_of_two() {
        let p = page_size();
        assert!(p.is_power_of_two() && p >= 4096);
        assert_eq!(page_size(), p);
    }

    #[test]
    fn rounding() {
        assert_eq!(round_up(0, PAGE), Some(0));
        assert_eq!(round_up(1, PAGE), Some(PAGE));
        assert_eq!(round_up(PAGE, PAGE), Some(PAGE));
        assert_eq!(round_up(usize::MAX, PAGE), None);
        assert_eq!(round_down(PAGE + 1, PAGE), PAGE);
    }

    #[test]
    fn nearest_candidates_hug_the_anchor_mapping() {
        let text = 0x5555_5555_4000;
        let maps = [
            entry(text, text + 0x10000, Some("/bin/app")),
            entry(0x7f00_0000_0000, 0x7f00_0010_0000, Some("/lib/libc.so.6")),
        ];
        let anchor = text + 0x1234;
        let c = candidates_with_page(&maps, anchor, 0x1800, GIB2, PAGE);
        assert!(!c.is_empty() && c.len() <= MAX_CANDIDATES);
        // Just below the mapping and just above it are the two nearest.
        assert_eq!(c[0], text - 0x2000);
        assert_eq!(c[1], text + 0x10000);
        for &x in &c {
            assert_fits(&maps, x, 0x2000, anchor, GIB2);
        }
        let dist: Vec<_> = c.iter().map(|&x| far_distance(x, 0x2000, anchor)).collect();
        assert!(dist.windows(2).all(|w| w[0] <= w[1]), "nearest first");
    }

    #[test]
    fn anchor_in_a_gap_gets_the_page_at_the_anchor() {
        let maps = [
            entry(0x10_0000, 0x20_0000, None),
            entry(0x90_0000, 0xa0_0000, None),
        ];
        let c = candidates_with_page(&maps, 0x50_0123, PAGE, 0x10_0000, PAGE);
        assert_eq!(c[0], 0x50_0000);
        for &x in &c {
            assert_fits(&maps, x, PAGE, 0x50_0123, 0x10_0000);
        }
    }

    #[test]
    fn nothing_in_reach() {
        let maps = [entry(USER_MIN, 0x7000_0000_0000, None)];
        assert!(candidates_with_page(&maps, 0x1000_0000, PAGE, GIB2, PAGE).is_empty());
        // A gap smaller than the request.
        let maps = [
            entry(USER_MIN, 0x10_0000, None),
            entry(0x10_1000, USER_MAX, None),
        ];
        assert!(candidates_with_page(&maps, 0x10_0800, 0x2000, GIB2, PAGE).is_empty());
        assert_eq!(
            candidates_with_page(&maps, 0x10_0800, PAGE, GIB2, PAGE),
            vec![0x10_0000]
        );
        // Reach too small for the length.
        assert!(candidates_with_page(&[], 0x10_0000, 0x4000, 0x1000, PAGE).is_empty());
        // Zero length.
        assert!(candidates_with_page(&[], 0x10_0000, 0, GIB2, PAGE).is_empty());
    }

    #[test]
    fn edges_of_the_address_space() {
        // Anchor near zero: nothing below USER_MIN.
        let c = candidates_with_page(&[], 0x100, PAGE, GIB2, PAGE);
        assert_eq!(c[0], USER_MIN);
        assert!(c.iter().all(|&x| x >= USER_MIN));
        // Anchor at the top, maps up in the kernel half: nothing at or above USER_MAX.
        let maps = [entry(
            0xffff_ffff_ff60_0000,
            0xffff_ffff_ff60_1000,
            Some("[vsyscall]"),
        )];
        let c = candidates_with_page(&maps, usize::MAX - 5, PAGE, usize::MAX, PAGE);
        assert!(c.iter().all(|&x| x + PAGE <= USER_MAX));
        assert_eq!(c[0], USER_MAX - PAGE);
        // Huge lengths and reaches do not overflow.
        assert!(candidates_with_page(&[], 0x10_0000, usize::MAX, usize::MAX, PAGE).is_empty());
    }

    #[test]
    fn unsorted_and_overlapping_input() {
        let maps = [
            entry(0x30_0000, 0x40_0000, None),
            entry(0x10_0000, 0x35_0000, None),
        ];
        let c = candidates_with_page(&maps, 0x30_0000, PAGE, 0x20_0000, PAGE);
        for &x in &c {
            assert_fits(&maps, x, PAGE, 0x30_0000, 0x20_0000);
        }
        assert_eq!(c[0], 0x40_0000);
    }

    #[test]
    fn stack_and_heap_growth_areas_are_avoided() {
        let stack_end = 0x7ffc_0000_0000;
        let maps = [
            entry(0x5555_0000_0000, 0x5555_0010_0000, Some("[heap]")),
            entry(stack_end - 0x2_0000, stack_end, Some("[stack]")),
        ];
        let c = candidates_with_page(&maps, stack_end - 0x3_0000, PAGE, GIB2, PAGE);
        assert!(
            c.iter()
                .all(|&x| x + PAGE <= stack_end - STACK_RESERVE || x >= stack_end)
        );
        let c = candidates_with_page(&maps, 0x5555_0010_0000, PAGE, GIB2, PAGE);
        assert!(
            c.iter()
                .all(|&x| x + PAGE <= 0x5555_0000_0000 || x >= 0x5555_0010_0000 + HEAP_RESERVE)
        );
        assert!(!c.is_empty());
    }

    #[test]
    fn at_most_max_candidates() {
        // Many small gaps, all in reach.
        let maps: Vec<_> = (0..500)
            .map(|i| entry(0x100_0000 + i * 0x2000, 0x100_1000 + i * 0x2000, None))
            .collect();
        let c = candidates_with_page(&maps, 0x110_0000, PAGE, GIB2, PAGE);
        assert_eq!(c.len(), MAX_CANDIDATES);
    }

    #[test]
    fn map_near_lands_in_reach() {
        let anchor = map_near_lands_in_reach as *const () as usize;
        let reach = GIB2 - 1;
        let m = Mapping::map_near(anchor, 3 * PAGE + 1, reach, Prot::ReadWrite).unwrap();
        assert_eq!(m.len(), round_up(3 * PAGE + 1, page_size()).unwrap());
        assert!(m.addr().abs_diff(anchor) <= reach);
        assert!((m.addr() + m.len()).abs_diff(anchor) <= reach);
        // SAFETY: the mapping is read+write and `len` bytes long.
        unsafe { std::ptr::write_bytes(m.addr() as *mut u8, 0xab, m.len()) };
        let maps = crate::maps::read_self().unwrap();
        let e = maps.iter().find(|e| e.contains(m.addr())).unwrap();
        assert!(e.perms.read && e.perms.write && !e.perms.exec);
    }

    #[test]
    fn map_near_close_reach() {
        // 64 MiB around our own code: the gap next to the executable is that close.
        let anchor = map_near_close_reach as *const () as usize;
        let m = Mapping::map_near(anchor, PAGE, 64 << 20, Prot::ReadExec).unwrap();
        assert!(far_distance(m.addr(), m.len(), anchor) <= 64 << 20);
    }

    #[test]
    fn map_near_impossible_is_out_of_memory() {
        let anchor = map_near_impossible_is_out_of_memory as *const () as usize;
        let err = Mapping::map_near(anchor, PAGE, 0, Prot::Read).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::OutOfMemory);
        assert!(err.to_string().contains(&format!("{anchor:#x}")), "{err}");
        let err = Mapping::map_near(anchor, 0, GIB2, Prot::Read).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn protect_checks_and_changes() {
        let page = page_size();
        let m = Mapping::map_anywhere(2 * page, Prot::ReadWrite).unwrap();
        assert!(m.protect(1, page, Prot::Read).is_err());
        assert!(m.protect(0, 1, Prot::Read).is_err());
        assert!(m.protect(page, 2 * page, Prot::Read).is_err());
        assert!(m.protect(usize::MAX - page + 1, page, Prot::Read).is_err());
        m.protect(page, page, Prot::ReadExec).unwrap();
        let maps = crate::maps::read_self().unwrap();
        let second = maps.iter().find(|e| e.contains(m.addr() + page)).unwrap();
        assert!(second.perms.exec && !second.perms.write);
        let first = maps.iter().find(|e| e.contains(m.addr())).unwrap();
        assert!(first.perms.write && !first.perms.exec);
    }

    #[test]
    fn fixed_noreplace_never_clobbers() {
        let page = page_size();
        let m = Mapping::map_anywhere(page, Prot::ReadWrite).unwrap();
        // SAFETY: the mapping is read+write and a page long.
        unsafe { (m.addr() as *mut u8).write(0x5a) };
        assert!(try_map_at(m.addr(), page, Prot::Read).unwrap().is_none());
        // SAFETY: as above; still our mapping, untouched.
        assert_eq!(unsafe { (m.addr() as *const u8).read() }, 0x5a);
    }

    /// Whether an inaccessible mapping covers all of `[addr, addr + len)`. Other tests map
    /// memory concurrently and may reuse a freed range, but none maps that much `PROT_NONE`.
    fn reserved(addr: usize, len: usize) -> bool {
        crate::maps::read_self()
            .unwrap()
            .iter()
            .any(|e| e.start <= addr && addr + len <= e.end && !(e.perms.read || e.perms.exec))
    }

    #[test]
    fn drop_unmaps_and_leak_keeps() {
        let len = 37 * page_size();
        let m = Mapping::map_anywhere(len, Prot::None).unwrap();
        let addr = m.addr();
        assert!(reserved(addr, len));
        drop(m);
        assert!(!reserved(addr, len));

        let (addr, len) = Mapping::map_anywhere(len, Prot::None).unwrap().leak();
        assert!(reserved(addr, len));
        // SAFETY: a misaligned range is rejected before any syscall.
        assert!(unsafe { unmap(addr + 1, len) }.is_err());
        // SAFETY: the range was just leaked and nothing refers to it.
        unsafe { unmap(addr, len) }.unwrap();
        assert!(!reserved(addr, len));
    }
}
