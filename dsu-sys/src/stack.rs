//! Bounds of the mapping that holds a stack pointer, learnt without allocating.
//!
//! While other threads are stopped the agent may not allocate (a stopped thread may hold the
//! malloc lock), yet it must know how far each thread's stack extends to read it safely.
//! [`StackMaps`] answers "which mapping contains this address" two ways:
//! - `PROCMAP_QUERY` (Linux 6.11+): one `ioctl` on an open `/proc/self/maps` per question,
//!   about 0.4 us, whatever the number of mappings;
//! - otherwise [`MapsSnapshot`]: `/proc/self/maps` read with raw `open`/`read` into a buffer
//!   sized in advance, keeping the start, end and permissions of each mapping in a
//!   preallocated array (about 250 us for 300 mappings). Parsing ([`parse_into`]) is pure.
//!
//! `unsafe` here: the `PROCMAP_QUERY` ioctl, on a struct of ours.

use std::io;

use crate::threads::{self, CAPACITY_EXCEEDED, Fd, read_whole};

/// One mapping of the address space: `[start, end)` and whether it can be read and written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Region {
    pub start: usize,
    pub end: usize,
    pub readable: bool,
    pub writable: bool,
}

impl Region {
    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.start && addr < self.end
    }
}

/// Pure: parses the `start-end perms` prefix of every line of a maps file into `out`; returns
/// how many regions were written. `CAPACITY_EXCEEDED` (`ENOBUFS`) when `out` is too small,
/// `InvalidData` on a malformed line.
pub fn parse_into(text: &[u8], out: &mut [Region]) -> io::Result<usize> {
    let mut n = 0;
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let region = parse_line(line).ok_or(io::ErrorKind::InvalidData)?;
        let slot = out
            .get_mut(n)
            .ok_or_else(|| io::Error::from_raw_os_error(CAPACITY_EXCEEDED))?;
        *slot = region;
        n += 1;
    }
    Ok(n)
}

fn parse_line(line: &[u8]) -> Option<Region> {
    let dash = line.iter().position(|&b| b == b'-')?;
    let space = dash + 1 + line[dash + 1..].iter().position(|&b| b == b' ')?;
    let start = parse_hex(&line[..dash])?;
    let end = parse_hex(&line[dash + 1..space])?;
    let perms = line.get(space + 1..space + 5)?;
    if end < start {
        return None;
    }
    Some(Region {
        start,
        end,
        readable: perms[0] == b'r',
        writable: perms[1] == b'w',
    })
}

fn parse_hex(s: &[u8]) -> Option<usize> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    s.iter().try_fold(0usize, |acc, &b| {
        let d = (b as char).to_digit(16)? as usize;
        Some(acc << 4 | d)
    })
}

/// The mappings of this process at the last [`refresh`](MapsSnapshot::refresh), sorted by
/// address.
#[derive(Debug, Default)]
pub struct MapsSnapshot {
    buf: Vec<u8>,
    regions: Vec<Region>,
    len: usize,
}

impl MapsSnapshot {
    pub fn new() -> MapsSnapshot {
        MapsSnapshot::default()
    }

    /// Sizes the buffers for the current maps with generous room to grow (twice the current
    /// size plus a margin), and takes a snapshot. Allocates: call it before stopping threads.
    pub fn reserve(&mut self) -> io::Result<()> {
        let text = std::fs::read("/proc/self/maps")?;
        let lines = text.iter().filter(|&&b| b == b'\n').count();
        let want_buf = text.len() * 2 + 64 * 1024;
        let want_regions = lines * 2 + 256;
        if self.buf.len() < want_buf {
            self.buf.resize(want_buf, 0);
        }
        if self.regions.len() < want_regions {
            self.regions.resize(want_regions, Region::default());
        }
        self.refresh()
    }

    /// Re-reads `/proc/self/maps` into the reserved buffers. Allocates nothing:
    /// async-signal-safe. `CAPACITY_EXCEEDED` (`ENOBUFS`) when the maps outgrew the
    /// reservation: call [`reserve`](MapsSnapshot::reserve) again outside the stop.
    pub fn refresh(&mut self) -> io::Result<()> {
        self.len = 0;
        if self.buf.is_empty() {
            return Err(io::Error::from_raw_os_error(CAPACITY_EXCEEDED));
        }
        let n = read_whole(b"/proc/self/maps\0", &mut self.buf)?;
        self.len = parse_into(&self.buf[..n], &mut self.regions)?;
        Ok(())
    }

    /// The mappings, sorted by start address.
    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.len]
    }

    /// The mapping containing `addr`, if any.
    pub fn find(&self, addr: usize) -> Option<Region> {
        let regions = self.regions();
        let i = regions.partition_point(|r| r.end <= addr);
        regions.get(i).copied().filter(|r| r.contains(addr))
    }
}

/// `struct procmap_query` of `<linux/fs.h>` (Linux 6.11).
#[repr(C)]
#[derive(Debug, Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: u64 =
    (3 << 30) | ((std::mem::size_of::<ProcmapQuery>() as u64) << 16) | ((b'f' as u64) << 8) | 17;
const PROCMAP_QUERY_VMA_READABLE: u64 = 1;
const PROCMAP_QUERY_VMA_WRITABLE: u64 = 2;

/// An open `/proc/self/maps` answering `PROCMAP_QUERY`.
#[derive(Debug)]
struct MapQuery {
    fd: Fd,
    /// The process the descriptor describes (a forked child must reopen it).
    pid: i32,
}

impl MapQuery {
    /// Opens `/proc/self/maps`; `Ok(None)` when the kernel lacks `PROCMAP_QUERY`.
    /// Async-signal-safe.
    fn open() -> io::Result<Option<MapQuery>> {
        let q = MapQuery {
            fd: Fd::open(b"/proc/self/maps\0", 0)?,
            pid: threads::getpid(),
        };
        let probe = 0u8;
        match q.query(std::ptr::addr_of!(probe) as usize) {
            Ok(Some(_)) => Ok(Some(q)),
            Ok(None) => Err(io::ErrorKind::NotFound.into()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The mapping containing `addr`, `None` when there is none. Async-signal-safe.
    fn query(&self, addr: usize) -> io::Result<Option<Region>> {
        let mut q = ProcmapQuery {
            size: std::mem::size_of::<ProcmapQuery>() as u64,
            query_addr: addr as u64,
            ..ProcmapQuery::default()
        };
        // SAFETY: `q` is a live, writable procmap_query of the size it declares; name and
        // build-id sizes are 0, so the kernel writes nothing else.
        let rc = unsafe {
            crate::raw::call(
                libc::SYS_ioctl,
                &[
                    self.fd.0 as usize,
                    PROCMAP_QUERY as usize,
                    &raw mut q as usize,
                ],
            )
        };
        if let Err(e) = rc {
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(Region {
            start: q.vma_start as usize,
            end: q.vma_end as usize,
            readable: q.vma_flags & PROCMAP_QUERY_VMA_READABLE != 0,
            writable: q.vma_flags & PROCMAP_QUERY_VMA_WRITABLE != 0,
        }))
    }
}

/// Finds the mapping that contains an address, by `PROCMAP_QUERY` where the kernel has it and
/// through a [`MapsSnapshot`] otherwise. [`reserve`](StackMaps::reserve) before stopping
/// threads (allocates), [`refresh`](StackMaps::refresh) once they are stopped (does not), then
/// [`find`](StackMaps::find) (does not).
#[derive(Debug, Default)]
pub struct StackMaps {
    query: Option<MapQuery>,
    snapshot: MapsSnapshot,
}

impl StackMaps {
    pub fn new() -> StackMaps {
        StackMaps::default()
    }

    /// Opens `/proc/self/maps` for queries, or (on kernels without `PROCMAP_QUERY`) sizes and
    /// takes a snapshot. Allocates.
    pub fn reserve(&mut self) -> io::Result<()> {
        if self
            .query
            .as_ref()
            .is_none_or(|q| q.pid != threads::getpid())
        {
            self.query = MapQuery::open()?;
        }
        match self.query {
            Some(_) => Ok(()),
            None => self.snapshot.reserve(),
        }
    }

    /// Makes [`find`](StackMaps::find) describe the address space as it is now: nothing to do
    /// with queries (a forked child reopens the file), a re-read of the snapshot otherwise.
    /// Allocates nothing: async-signal-safe.
    pub fn refresh(&mut self) -> io::Result<()> {
        match &self.query {
            Some(q) if q.pid == threads::getpid() => Ok(()),
            Some(_) => {
                self.query = MapQuery::open()?;
                self.refresh()
            }
            None => self.snapshot.refresh(),
        }
    }

    /// Whether lookups use `PROCMAP_QUERY`.
    pub fn uses_query(&self) -> bool {
        self.query.is_some()
    }

    /// The mapping containing `addr`, if any (a failed query counts as none). Async-signal-safe.
    pub fn find(&self, addr: usize) -> Option<Region> {
        match &self.query {
            Some(q) => q.query(addr).ok().flatten(),
            None => self.snapshot.find(addr),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = b"\
55d0c0a00000-55d0c0a21000 r--p 00000000 08:01 1234   /usr/bin/x
55d0c0a21000-55d0c0b00000 r-xp 00021000 08:01 1234   /usr/bin/x
7ffc1e000000-7ffc1e021000 rw-p 00000000 00:00 0      [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]
";

    #[test]
    fn parses_bounds_and_perms() {
        let mut out = [Region::default(); 8];
        let n = parse_into(SAMPLE, &mut out).unwrap();
        assert_eq!(n, 4);
        assert_eq!(out[2].start, 0x7ffc_1e00_0000);
        assert_eq!(out[2].end, 0x7ffc_1e02_1000);
        assert!(out[2].readable && out[2].writable);
        assert!(!out[3].readable);
        assert!(out[1].readable && !out[1].writable);
    }

    #[test]
    fn capacity_and_malformed() {
        let mut out = [Region::default(); 2];
        let e = parse_into(SAMPLE, &mut out).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(CAPACITY_EXCEEDED));
        let mut out = [Region::default(); 8];
        assert_eq!(
            parse_into(b"zz-10 rw-p\n", &mut out).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        assert!(parse_into(b"10-20\n", &mut out).is_err());
    }

    #[test]
    fn finds_own_stack() {
        let mut snap = MapsSnapshot::new();
        assert!(snap.refresh().is_err());
        snap.reserve().unwrap();
        let local = 0u64;
        let addr = std::ptr::addr_of!(local) as usize;
        let r = snap.find(addr).expect("stack mapped");
        assert!(r.readable && r.writable && r.contains(addr));
        assert!(snap.find(0).is_none());
        let sorted = snap.regions().windows(2).all(|w| w[0].end <= w[1].start);
        assert!(sorted);
    }

    #[test]
    fn stack_maps_agree_with_snapshot() {
        let mut maps = StackMaps::new();
        maps.reserve().unwrap();
        maps.refresh().unwrap();
        let local = 0u64;
        let addr = std::ptr::addr_of!(local) as usize;
        let r = maps.find(addr).expect("stack mapped");
        assert!(r.readable && r.writable && r.contains(addr));
        let mut snap = MapsSnapshot::new();
        snap.reserve().unwrap();
        let s = snap.find(addr).unwrap();
        // Adjacent anonymous mappings may merge or split between reads; the stack is stable.
        assert_eq!((r.start, r.end), (s.start, s.end));
        assert!(maps.find(0).is_none());
        let code = maps
            .find(stack_maps_agree_with_snapshot as *const () as usize)
            .unwrap();
        assert!(code.readable && !code.writable);
    }
}
