//! `/proc/self/maps`: parsing (pure) and reading.
//!
//! `parse` is a pure function of the text so it can be unit-tested and fuzzed. While other
//! threads are stopped, `stack::StackMaps` answers "which mapping holds this address" without
//! allocating.
//!
//! The line format (`fs/proc/task_mmu.c`, `show_map_vma`):
//!
//! ```text
//! 7f1c2a000000-7f1c2a021000 r-xp 00000000 08:01 1234       /usr/lib/x86_64-linux-gnu/libc.so.6
//! start-end                 perms offset  dev   inode      path (optional, may contain spaces)
//! ```
//!
//! The kernel pads before the path (and leaves a trailing space on anonymous lines) and escapes
//! only a newline in it, so the path is everything after the inode field with leading blanks
//! removed; a ` (deleted)` suffix stays part of it. Paths are bytes, not necessarily UTF-8.

use std::io;

/// Permissions of one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
}

/// One line of `/proc/<pid>/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: usize,
    pub end: usize,
    pub perms: Perms,
    pub offset: u64,
    /// Path or pseudo-name (`[stack]`, `[vdso]`, ...); `None` for anonymous mappings.
    pub path: Option<String>,
}

impl MapEntry {
    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the mapping is empty (never true for a line the kernel printed).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Whether `addr` lies in `[start, end)`.
    pub fn contains(&self, addr: usize) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// One parsed line borrowing its path from the text, so it can be produced without
/// allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLine<'a> {
    pub start: usize,
    pub end: usize,
    pub perms: Perms,
    pub offset: u64,
    /// Raw path bytes, `None` for anonymous mappings.
    pub path: Option<&'a [u8]>,
}

impl MapLine<'_> {
    /// Parses one line (without its newline). The error says which field is malformed.
    pub fn parse(line: &[u8]) -> Result<MapLine<'_>, &'static str> {
        let (range, rest) = next_field(line).ok_or("missing address range")?;
        let (start, end) = parse_range(range)?;
        let (perms, rest) = next_field(rest).ok_or("missing permissions")?;
        let perms = parse_perms(perms)?;
        let (offset, rest) = next_field(rest).ok_or("missing offset")?;
        let offset = parse_hex(offset).ok_or("bad offset")?;
        let (dev, rest) = next_field(rest).ok_or("missing device")?;
        check_dev(dev)?;
        let (inode, rest) = next_field(rest).ok_or("missing inode")?;
        if inode.is_empty() || !inode.iter().all(u8::is_ascii_digit) {
            return Err("bad inode");
        }
        let path = trim_blanks_start(rest);
        Ok(MapLine {
            start,
            end,
            perms,
            offset,
            path: (!path.is_empty()).then_some(path),
        })
    }

    /// Whether `addr` lies in `[start, end)`.
    pub fn contains(&self, addr: usize) -> bool {
        self.start <= addr && addr < self.end
    }

    /// An owned copy; a path that is not UTF-8 is converted lossily. Allocates.
    pub fn to_entry(&self) -> MapEntry {
        MapEntry {
            start: self.start,
            end: self.end,
            perms: self.perms,
            offset: self.offset,
            path: self.path.map(|p| String::from_utf8_lossy(p).into_owned()),
        }
    }
}

/// Parses the text of a maps file. A malformed line is an `InvalidData` error naming it.
pub fn parse(text: &str) -> io::Result<Vec<MapEntry>> {
    parse_bytes(text.as_bytes())
}

/// Reads and parses `/proc/self/maps`.
pub fn read_self() -> io::Result<Vec<MapEntry>> {
    // Read bytes, not a String: a mapped file's name need not be UTF-8.
    let text = std::fs::read("/proc/self/maps")
        .map_err(|e| io::Error::new(e.kind(), format!("reading /proc/self/maps: {e}")))?;
    parse_bytes(&text)
}

/// `parse` over raw bytes (non-UTF-8 paths converted lossily).
pub fn parse_bytes(text: &[u8]) -> io::Result<Vec<MapEntry>> {
    lines(text)
        .enumerate()
        .map(|(i, line)| {
            MapLine::parse(line)
                .map(|l| l.to_entry())
                .map_err(|why| malformed(i + 1, line, why))
        })
        .collect()
}

fn malformed(number: usize, line: &[u8], why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "malformed maps line {number} ({why}): {:?}",
            String::from_utf8_lossy(line)
        ),
    )
}

/// Non-blank lines of `text`.
fn lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|&b| b == b'\n')
        .filter(|l| !trim_blanks_start(l).is_empty())
}

fn is_blank(b: &u8) -> bool {
    *b == b' ' || *b == b'\t'
}

fn trim_blanks_start(s: &[u8]) -> &[u8] {
    let skip = s.iter().take_while(|b| is_blank(b)).count();
    &s[skip..]
}

/// Splits off the next blank-separated field; `None` when nothing is left.
fn next_field(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let s = trim_blanks_start(s);
    if s.is_empty() {
        return None;
    }
    let end = s.iter().position(is_blank).unwrap_or(s.len());
    Some(s.split_at(end))
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    // `from_str_radix` would accept a leading `+`; the kernel never prints one.
    if s.is_empty() || s.len() > 16 || !s.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let s = std::str::from_utf8(s).ok()?;
    u64::from_str_radix(s, 16).ok()
}

fn parse_addr(s: &[u8]) -> Option<usize> {
    usize::try_from(parse_hex(s)?).ok()
}

fn parse_range(s: &[u8]) -> Result<(usize, usize), &'static str> {
    let dash = s
        .iter()
        .position(|&b| b == b'-')
        .ok_or("bad address range")?;
    let start = parse_addr(&s[..dash]).ok_or("bad start address")?;
    let end = parse_addr(&s[dash + 1..]).ok_or("bad end address")?;
    if end < start {
        return Err("end address below start");
    }
    Ok((start, end))
}

fn parse_perms(s: &[u8]) -> Result<Perms, &'static str> {
    let flag = |b: u8, yes: u8| match b {
        b'-' => Ok(false),
        _ if b == yes => Ok(true),
        _ => Err("bad permissions"),
    };
    let [r, w, x, p] = s else {
        return Err("bad permissions");
    };
    let shared = match p {
        b's' => true,
        b'p' => false,
        _ => return Err("bad permissions"),
    };
    Ok(Perms {
        read: flag(*r, b'r')?,
        write: flag(*w, b'w')?,
        exec: flag(*x, b'x')?,
        shared,
    })
}

fn check_dev(s: &[u8]) -> Result<(), &'static str> {
    let colon = s.iter().position(|&b| b == b':').ok_or("bad device")?;
    let (major, minor) = (&s[..colon], &s[colon + 1..]);
    match (parse_hex(major), parse_hex(minor)) {
        (Some(_), Some(_)) => Ok(()),
        _ => Err("bad device"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d1c0a00000-55d1c0a02000 r--p 00000000 fe:00 247030                     /usr/bin/cat
55d1c0a02000-55d1c0a07000 r-xp 00002000 fe:00 247030                     /usr/bin/cat
561db2ffa000-561db301b000 rw-p 00000000 00:00 0                          [heap]
7f9dc9822000-7f9dc9844000 rw-p 00000000 00:00 0 
7f9dc98cd000-7f9dc9a23000 r-xp 00026000 08:01 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f9dc9a8a000-7f9dc9a91000 r--s 00000000 fe:00 325745                     /tmp/my dir/with  spaces.so (deleted)
7ffc6d5e4000-7ffc6d605000 rw-p 00000000 00:00 0                          [stack]
7ffc6d7e0000-7ffc6d7e2000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_sample() {
        let maps = parse(SAMPLE).unwrap();
        assert_eq!(maps.len(), 9);
        assert_eq!(
            maps[0],
            MapEntry {
                start: 0x55d1c0a00000,
                end: 0x55d1c0a02000,
                perms: Perms {
                    read: true,
                    write: false,
                    exec: false,
                    shared: false
                },
                offset: 0,
                path: Some("/usr/bin/cat".into()),
            }
        );
        assert!(maps[1].perms.exec && maps[1].perms.read && !maps[1].perms.write);
        assert_eq!(maps[1].offset, 0x2000);
        assert_eq!(maps[2].path.as_deref(), Some("[heap]"));
        assert_eq!(maps[3].path, None, "anonymous line with trailing blank");
        assert!(maps[3].perms.write);
        assert_eq!(maps[4].offset, 0x26000);
        assert_eq!(
            maps[5].path.as_deref(),
            Some("/tmp/my dir/with  spaces.so (deleted)")
        );
        assert!(maps[5].perms.shared);
        assert_eq!(maps[6].path.as_deref(), Some("[stack]"));
        assert_eq!(maps[7].path.as_deref(), Some("[vdso]"));
        assert_eq!(maps[8].start, 0xffffffffff600000);
        assert!(maps[8].perms.exec && !maps[8].perms.read);
    }

    #[test]
    fn anonymous_line_without_trailing_blank() {
        let maps = parse("1000-2000 ---p 00000000 00:00 0").unwrap();
        assert_eq!(maps[0].path, None);
        assert_eq!(maps[0].perms, Perms::default());
        assert_eq!(maps[0].len(), 0x1000);
        assert!(maps[0].contains(0x1fff) && !maps[0].contains(0x2000));
    }

    #[test]
    fn empty_and_blank_lines() {
        assert!(parse("").unwrap().is_empty());
        assert_eq!(parse("\n1000-2000 r--p 0 00:00 0\n\n").unwrap().len(), 1);
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        let bad = [
            "garbage",
            "1000-2000",
            "1000 r--p 00000000 00:00 0",
            "1000-zz00 r--p 00000000 00:00 0",
            "2000-1000 r--p 00000000 00:00 0",
            "1000-2000 rwx 00000000 00:00 0",
            "1000-2000 rwxq 00000000 00:00 0",
            "1000-2000 xwrp 00000000 00:00 0",
            "1000-2000 r--p 0000g000 00:00 0",
            "1000-2000 r--p 00000000 0000 0",
            "1000-2000 r--p 00000000 00:00",
            "1000-2000 r--p 00000000 00:00 12a /x",
            "+1000-2000 r--p 00000000 00:00 0",
            "10000000000000000-10000000000000001 r--p 0 00:00 0",
        ];
        for line in bad {
            let text = format!("1000-2000 r--p 00000000 00:00 0\n{line}\n");
            let err = parse(&text).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{line}");
            let msg = err.to_string();
            assert!(msg.contains("line 2"), "{msg}");
            assert!(msg.contains(line), "{msg}");
        }
    }

    #[test]
    fn non_utf8_path_is_lossy() {
        let maps = parse_bytes(b"1000-2000 r--p 0 00:00 5 /tmp/\xff.so\n").unwrap();
        assert_eq!(maps[0].path.as_deref(), Some("/tmp/\u{fffd}.so"));
    }

    #[test]
    fn reads_self() {
        let maps = read_self().unwrap();
        let here = reads_self as *const () as usize;
        let m = maps
            .iter()
            .find(|m| m.contains(here))
            .expect("own code mapped");
        assert!(m.perms.exec && m.perms.read && !m.perms.write);
        assert!(maps.iter().any(|m| m.path.as_deref() == Some("[stack]")));
        assert!(maps.windows(2).all(|w| w[0].end <= w[1].start), "sorted");
    }
}
