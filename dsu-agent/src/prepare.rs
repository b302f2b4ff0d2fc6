//! Prepare: decide, before any thread is stopped, exactly which bytes the write stage will
//! store, and refuse targets that cannot take an entry jump.
//!
//! A 5-byte `jmp rel32` at the entry needs a function of at least 5 bytes (9 when it starts
//! with `endbr64`, which is kept so indirect calls still land on a valid target under CET) and
//! no branch inside the function into the overwritten bytes 1..4: a thread taking such a branch
//! after the update would execute half an instruction. The function is decoded to check.
//!
//! A shorter function takes the jump over the alignment padding after it when there is enough;
//! otherwise, from 2 bytes up, a 2-byte `jmp rel8` to a trampoline: a `jmp rel32` to the new
//! code written into free alignment padding between two other functions within 128 bytes
//! (see [`Surroundings::gaps`]).
//!
//! Unsafe code is allowed here: this module reads the code of the functions being replaced; every
//! block states its invariant.

#![allow(unsafe_code)]

use dsu_sys::x86::{self, ENDBR64, JMP_REL32_LEN};

use crate::resolve::SymbolIndex;
use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind};
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PrepareError {
    #[error(
        "{name} in {module} is {size} bytes: too small for even a short jump ({need} bytes). A replacement that fits in {size} bytes (and keeps its unwind rules) is written in place instead; for a longer one, patch the functions that call {name} instead"
    )]
    TooSmall {
        name: String,
        module: String,
        size: u64,
        need: u64,
    },
    #[error(
        "{name} in {module} is {size} bytes with {free} bytes of free padding after it, too small for an entry jump ({need} bytes), and no free alignment padding within reach of a short jump (128 bytes) can hold a trampoline. A replacement that fits in {size} bytes (and keeps its unwind rules) is written in place instead; for a longer one, patch the functions that call {name} instead"
    )]
    NoTrampolineRoom {
        name: String,
        module: String,
        size: u64,
        free: u64,
        need: u64,
    },
    #[error(
        "{name} in {module} cannot take an entry jump: the instruction at {from:#x} ({bytes}) branches to {to:#x}, inside the bytes the jump overwrites"
    )]
    BranchIntoEntry {
        name: String,
        module: String,
        from: usize,
        to: usize,
        bytes: String,
    },
    #[error(
        "{name} cannot take an entry jump: the instruction at {from:#x} in its split-off part {part} branches to {to:#x}, inside the bytes the jump overwrites"
    )]
    PartBranchIntoEntry {
        name: String,
        part: String,
        from: usize,
        to: usize,
    },
    #[error(
        "{name} in {module} cannot take an entry jump: the jump table at {table:#x} (used by the instruction at {from:#x}) leads to {to:#x}, inside the bytes the jump overwrites"
    )]
    JumpTableIntoEntry {
        name: String,
        module: String,
        from: usize,
        table: usize,
        to: usize,
    },
    #[error("{name} in {module}: cannot decode the instruction at {at:#x} ({bytes})")]
    Undecodable {
        name: String,
        module: String,
        at: usize,
        bytes: String,
    },
    #[error("{name}: new code at {new:#x} is out of rel32 reach of the entry at {site:#x}")]
    OutOfReach {
        name: String,
        site: usize,
        new: usize,
    },
    #[error("{name} in {module}: {size:#x} bytes at {address:#x} are not mapped readable")]
    NotMapped {
        name: String,
        module: String,
        address: usize,
        size: u64,
    },
}

/// The entry jump that switches one function to its new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// Where the jump is written: the entry, or just after its `endbr64`.
    pub site: usize,
    /// The jump: a `jmp rel32` to the new code, or a `jmp rel8` to the trampoline.
    pub bytes: Vec<u8>,
    /// What the jump overwrites in the code given (the function's pristine bytes, and the
    /// padding after them for a jump over it).
    pub original: Vec<u8>,
    /// The `jmp rel32` a short entry jump leads to.
    pub trampoline: Option<Trampoline>,
}

/// A `jmp rel32` to a function's new code in free padding near its entry, reached by a short
/// jump from the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trampoline {
    pub at: usize,
    pub bytes: [u8; JMP_REL32_LEN],
}

/// Length of `jmp rel8`.
pub const JMP_REL8_LEN: usize = 2;

/// How far a `jmp rel8` reaches, from the end of the instruction.
const REL8_REACH: std::ops::RangeInclusive<isize> = -128..=127;

/// `jmp rel8` at `at` to `target`, when in reach.
fn jmp_rel8(at: usize, target: usize) -> Option<[u8; JMP_REL8_LEN]> {
    let d = (target as isize).wrapping_sub(at.wrapping_add(JMP_REL8_LEN) as isize);
    REL8_REACH
        .contains(&d)
        .then(|| [0xeb, (d as i8).to_le_bytes()[0]])
}

/// What besides its own body can lead into a function's first bytes: the parts the compiler
/// split off it (`NAME.cold`, `NAME.cold.N`: they jump back into the body), and the jump tables
/// of both, read through `read`; and the free bytes after it.
pub struct Surroundings<'a> {
    /// `(name, address, code)` of each split-off part.
    pub parts: Vec<(String, usize, Vec<u8>)>,
    /// Reads `len` bytes at an address of the function's module (a jump table); `None` when
    /// they are not there to read.
    pub read: &'a dyn Fn(usize, usize) -> Option<Vec<u8>>,
    /// The alignment padding right after the function, before any other symbol (`nop` and
    /// `int3` encodings only, as they were before any patch; see [`free_padding`]): bytes no
    /// code runs, which an entry jump may cover when the function is shorter than the jump.
    pub padding: Vec<u8>,
    /// For a function shorter than an entry jump: the gaps `[start, end)` near its entry, each
    /// the whole space between the end of a sized symbol and the start of the next, made of
    /// padding instructions only before any patch, and not written by any patch since. No code
    /// runs there; a trampoline may go there.
    pub gaps: Vec<(usize, usize)>,
}

/// How the bytes around a function are read.
pub struct Reader<'a, 'b> {
    /// Reads `len` bytes at an address now; `None` when they are not there to read.
    pub read: &'a dyn Fn(usize, usize) -> Option<Vec<u8>>,
    /// Gives back bytes read at an address as they were before any patch of this function (an
    /// earlier entry jump of it may cover its padding).
    pub before_own: &'b dyn Fn(Vec<u8>, usize) -> Vec<u8>,
    /// Gives back bytes read at an address as they were before any patch at all.
    pub before_any: &'b dyn Fn(Vec<u8>, usize) -> Vec<u8>,
}

impl<'a> Reader<'a, 'static> {
    /// Bytes of a binary or of a process no patch has touched.
    pub fn unpatched(read: &'a dyn Fn(usize, usize) -> Option<Vec<u8>>) -> Reader<'a, 'static> {
        Reader {
            read,
            before_own: &|bytes, _| bytes,
            before_any: &|bytes, _| bytes,
        }
    }
}

impl<'a> Surroundings<'a> {
    /// What surrounds function `name` (`size` bytes at `address`, in module `module` of
    /// `index`): its split-off parts and, for a function shorter than an entry jump, the free
    /// padding after it up to the next symbol and the [gaps](Surroundings::gaps) near it, all
    /// read through `mem` (this process's memory for an apply, the binary's sections for
    /// `inspect`).
    pub fn gather(
        index: &SymbolIndex,
        module: usize,
        name: &str,
        address: usize,
        size: u64,
        mem: &Reader<'a, '_>,
    ) -> Surroundings<'a> {
        let read = mem.read;
        let parts = split_part_names(name)
            .flat_map(|part| {
                index
                    .definitions(&part)
                    .iter()
                    .filter(|p| p.module == module)
                    .filter_map(|p| {
                        Some((part.clone(), p.address, read(p.address, p.size as usize)?))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut padding = Vec::new();
        let mut gaps = Vec::new();
        if (size as usize) < ENDBR64.len() + JMP_REL32_LEN {
            let end = address + size as usize;
            let limit = index
                .next_start_after(module, address)
                .map_or(PADDING_LOOKED_AT, |next| next.saturating_sub(end))
                .min(PADDING_LOOKED_AT);
            if let Some(now) = read(end, limit) {
                let before = (mem.before_own)(now, end);
                padding = before[..free_padding(&before, end)].to_vec();
            }
            gaps = free_gaps(index, module, address, mem);
        }
        Surroundings {
            parts,
            read,
            padding,
            gaps,
        }
    }

    /// Nothing around the function (no split-off part, no readable table, no padding).
    pub fn none() -> Surroundings<'static> {
        Surroundings {
            parts: Vec::new(),
            read: &|_, _| None,
            padding: Vec::new(),
            gaps: Vec::new(),
        }
    }
}

/// The gaps a trampoline for a short jump at or just after `entry` may go in (see
/// [`Surroundings::gaps`]), split where a patch wrote into them.
fn free_gaps(
    index: &SymbolIndex,
    module: usize,
    entry: usize,
    mem: &Reader<'_, '_>,
) -> Vec<(usize, usize)> {
    // A short jump at the entry or after its `endbr64` reaches 128 bytes back, 127 on.
    let lo = entry.saturating_sub(128);
    let hi = entry + ENDBR64.len() + JMP_REL8_LEN + 127 + JMP_REL32_LEN;
    // Every symbol overlapping the window (a long function that starts before it included):
    // the space between the end of one and the start of the next belongs to none. The space
    // before the first is not a gap: what precedes it is unknown.
    let symbols = index.extents_overlapping(module, lo.saturating_sub(64), hi + 64);
    let mut bounds = Vec::new();
    let mut covered: Option<(usize, bool)> = None; // the end so far, and whether it is a size's
    for (start, size) in symbols {
        if let Some((end, true)) = covered
            && start > end
        {
            bounds.push((end, start));
        }
        let own = (start + size as usize, size > 0);
        // At equal ends the later symbol decides: a label without a size at a function's
        // end leaves what follows unbounded.
        covered = Some(match covered {
            Some(c) if c.0 > own.0 => c,
            _ => own,
        });
    }
    let mut free = Vec::new();
    for (start, end) in bounds {
        let Some(now) = (mem.read)(start, end - start) else {
            continue;
        };
        let before = (mem.before_any)(now.clone(), start);
        // Alignment filler through and through, so no code runs there.
        if free_padding(&before, start) != before.len() {
            continue;
        }
        // Bytes a patch wrote (another function's trampoline) are not free.
        let mut run = start;
        for (i, (a, b)) in now.iter().zip(&before).enumerate() {
            if a != b {
                free.push((run, start + i));
                run = start + i + 1;
            }
        }
        free.push((run, end));
    }
    free.retain(|&(start, end)| end >= start + JMP_REL32_LEN);
    free
}

/// The longest prefix of `after` (the bytes after a function, up to the next symbol) made of
/// whole padding instructions: `int3` and the `nop` forms compilers and assemblers align with.
pub fn free_padding(after: &[u8], address: usize) -> usize {
    let mut decoder = Decoder::with_ip(64, after, address as u64, DecoderOptions::NONE);
    let mut free = 0;
    while decoder.can_decode() {
        let instr = decoder.decode();
        if instr.is_invalid() || !matches!(instr.mnemonic(), Mnemonic::Nop | Mnemonic::Int3) {
            break;
        }
        free += instr.len();
    }
    free
}

/// How many bytes after a function are looked at for padding: an entry jump never needs more
/// than 4 of them, and alignment seldom leaves more than 15.
pub const PADDING_LOOKED_AT: usize = 16;

impl std::fmt::Debug for Surroundings<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<(&str, usize)> = self.parts.iter().map(|p| (p.0.as_str(), p.1)).collect();
        f.debug_struct("Surroundings")
            .field("parts", &parts)
            .finish_non_exhaustive()
    }
}

/// The names a compiler gives the cold parts it splits off `name`.
pub fn split_part_names(name: &str) -> impl Iterator<Item = String> + '_ {
    std::iter::once(format!("{name}.cold")).chain((0..4).map(move |n| format!("{name}.cold.{n}")))
}

/// Jump-table entries read before giving up on a table (switches rarely have more cases).
const MAX_TABLE_ENTRIES: usize = 4096;

/// Checks the function's code (`code` is its bytes, read from `address`) and what surrounds
/// it, and builds its jump. A trampoline goes in none of the `taken` spans (other edits of the
/// same update).
pub fn plan_redirect(
    name: &str,
    module: &str,
    address: usize,
    code: &[u8],
    new_address: usize,
    around: &Surroundings<'_>,
    taken: &[(usize, usize)],
) -> Result<Redirect, PrepareError> {
    let skip = entry_skip(code);
    let site = address + skip;
    let need = (skip + JMP_REL32_LEN) as u64;
    // A function shorter than the jump takes it over its alignment padding, which no code runs.
    let mut room = code.to_vec();
    if (code.len() as u64) < need {
        room.extend_from_slice(&around.padding);
    }
    let out_of_reach = || PrepareError::OutOfReach {
        name: name.into(),
        site,
        new: new_address,
    };
    let (bytes, trampoline) = if room.len() as u64 >= need {
        let jump = x86::jmp_rel32(site, new_address).ok_or_else(out_of_reach)?;
        (jump.to_vec(), None)
    } else if code.len() >= skip + JMP_REL8_LEN {
        let (at, jump) = trampoline_slot(site, &around.gaps, taken).ok_or_else(|| {
            PrepareError::NoTrampolineRoom {
                name: name.into(),
                module: module.into(),
                size: code.len() as u64,
                free: around.padding.len() as u64,
                need,
            }
        })?;
        let bytes = x86::jmp_rel32(at, new_address).ok_or_else(out_of_reach)?;
        (jump.to_vec(), Some(Trampoline { at, bytes }))
    } else {
        return Err(PrepareError::TooSmall {
            name: name.into(),
            module: module.into(),
            size: code.len() as u64,
            need: (skip + JMP_REL8_LEN) as u64,
        });
    };
    let mut bodies = vec![(address, address + code.len())];
    bodies.extend(around.parts.iter().map(|(_, at, c)| (*at, at + c.len())));
    let whole = Region {
        name,
        module,
        bodies: &bodies,
        site,
        jump_len: bytes.len(),
        read: around.read,
    };
    whole.check(None, address, code)?;
    for (part, at, part_code) in &around.parts {
        whole.check(Some(part), *at, part_code)?;
    }
    let original = room[skip..skip + bytes.len()].to_vec();
    Ok(Redirect {
        site,
        bytes,
        original,
        trampoline,
    })
}

/// How many bytes at the start of `code` an entry jump leaves alone: its `endbr64`.
fn entry_skip(code: &[u8]) -> usize {
    if code.starts_with(&ENDBR64) {
        ENDBR64.len()
    } else {
        0
    }
}

/// Whether [`plan_redirect`] gives function `code`, with `padding` free after it, a short jump
/// to a trampoline: it is shorter than an entry jump even over its padding.
pub fn needs_trampoline(code: &[u8], padding: &[u8]) -> bool {
    code.len() + padding.len() < entry_skip(code) + JMP_REL32_LEN
}

/// The first place in `gaps`, outside every `taken` span, that a short jump at `site` reaches
/// and a `jmp rel32` fits in; with that short jump.
fn trampoline_slot(
    site: usize,
    gaps: &[(usize, usize)],
    taken: &[(usize, usize)],
) -> Option<(usize, [u8; JMP_REL8_LEN])> {
    gaps.iter()
        .flat_map(|&(start, end)| {
            // Empty when the gap is shorter than the jump.
            start..=end.saturating_sub(JMP_REL32_LEN)
        })
        .filter(|&at| {
            !taken
                .iter()
                .any(|&(lo, hi)| at < hi && lo < at + JMP_REL32_LEN)
        })
        .find_map(|at| Some((at, jmp_rel8(site, at)?)))
}

/// A function being redirected: its bodies (its own and its split-off parts) and the site of
/// its jump.
struct Region<'a> {
    name: &'a str,
    module: &'a str,
    bodies: &'a [(usize, usize)],
    site: usize,
    /// Length of the entry jump: 5, or 2 for a short jump to a trampoline.
    jump_len: usize,
    read: &'a dyn Fn(usize, usize) -> Option<Vec<u8>>,
}

impl Region<'_> {
    fn lands_in_jump(&self, to: usize) -> bool {
        to > self.site && to < self.site + self.jump_len
    }

    fn in_bodies(&self, to: usize) -> bool {
        self.bodies.iter().any(|&(lo, hi)| to >= lo && to < hi)
    }

    /// Refuses a branch from `code` (the function, or its split-off `part`) into the bytes
    /// after the first that the entry jump overwrites, directly or through a jump table.
    fn check(&self, part: Option<&str>, address: usize, code: &[u8]) -> Result<(), PrepareError> {
        let hex = |b: &[u8]| {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        // Jump tables: `lea rX, [rip + table]` then `jmp rY` (position-independent: 32-bit
        // offsets from the table), or `jmp [table + rX * 8]` (absolute addresses).
        let mut relative_tables = Vec::new();
        let mut absolute_tables = Vec::new();
        let mut indirect_jump = false;
        let mut decoder = Decoder::with_ip(64, code, address as u64, DecoderOptions::NONE);
        while decoder.can_decode() {
            let offset = decoder.position();
            let instr = decoder.decode();
            let at = address + offset;
            let bytes = &code[offset..offset + instr.len().max(1).min(code.len() - offset)];
            if instr.is_invalid() {
                return Err(PrepareError::Undecodable {
                    name: self.name.into(),
                    module: self.module.into(),
                    at,
                    bytes: hex(bytes),
                });
            }
            let to = instr.near_branch_target() as usize;
            if self.lands_in_jump(to) {
                return Err(match part {
                    None => PrepareError::BranchIntoEntry {
                        name: self.name.into(),
                        module: self.module.into(),
                        from: at,
                        to,
                        bytes: hex(bytes),
                    },
                    Some(part) => PrepareError::PartBranchIntoEntry {
                        name: self.name.into(),
                        part: part.into(),
                        from: at,
                        to,
                    },
                });
            }
            if instr.mnemonic() == Mnemonic::Lea && instr.is_ip_rel_memory_operand() {
                relative_tables.push((at, instr.ip_rel_memory_address() as usize));
            }
            if instr.flow_control() == FlowControl::IndirectBranch {
                indirect_jump = true;
                if instr.op0_kind() == OpKind::Memory
                    && instr.memory_base() == iced_x86::Register::None
                    && instr.memory_index() != iced_x86::Register::None
                    && instr.memory_index_scale() == 8
                {
                    absolute_tables.push((at, instr.memory_displacement64() as usize));
                }
            }
        }
        if indirect_jump {
            for &(from, table) in &relative_tables {
                self.check_table(from, table, 4, |entry| {
                    let offset = i32::from_le_bytes(entry.try_into().ok()?);
                    table.checked_add_signed(offset as isize)
                })?;
            }
        }
        for &(from, table) in &absolute_tables {
            self.check_table(from, table, 8, |entry| {
                Some(u64::from_le_bytes(entry.try_into().ok()?) as usize)
            })?;
        }
        Ok(())
    }

    /// Follows the entries of a jump table at `table` (each `width` bytes, decoded by `target`)
    /// while they lead into the function's bodies: where they stop doing so the table ends.
    fn check_table(
        &self,
        from: usize,
        table: usize,
        width: usize,
        target: impl Fn(&[u8]) -> Option<usize>,
    ) -> Result<(), PrepareError> {
        for i in 0..MAX_TABLE_ENTRIES {
            let Some(entry) = (self.read)(table + i * width, width) else {
                return Ok(());
            };
            let Some(to) = target(&entry).filter(|&to| self.in_bodies(to)) else {
                return Ok(());
            };
            if self.lands_in_jump(to) {
                return Err(PrepareError::JumpTableIntoEntry {
                    name: self.name.into(),
                    module: self.module.into(),
                    from,
                    table,
                    to,
                });
            }
        }
        Ok(())
    }
}

/// Reads a function's bytes from this process, after checking they are mapped readable.
pub fn read_code(
    name: &str,
    module: &str,
    address: usize,
    size: u64,
    maps: &[dsu_sys::maps::MapEntry],
) -> Result<Vec<u8>, PrepareError> {
    let end = address.checked_add(size as usize);
    if !end.is_some_and(|end| readable(maps, address, end)) {
        return Err(PrepareError::NotMapped {
            name: name.into(),
            module: module.into(),
            address,
            size,
        });
    }
    // SAFETY: `[address, address + size)` is covered by readable mappings (checked above);
    // code mappings of loaded modules are not unmapped while the agent runs.
    let code = unsafe { std::slice::from_raw_parts(address as *const u8, size as usize) };
    Ok(code.to_vec())
}

/// `len` bytes at `address` of this process, when mapped readable (`maps` is a snapshot of the
/// memory map; module mappings do not go away while the agent runs).
pub fn read_bytes(maps: &[dsu_sys::maps::MapEntry], address: usize, len: usize) -> Option<Vec<u8>> {
    let end = address.checked_add(len)?;
    if !readable(maps, address, end) {
        return None;
    }
    // SAFETY: `[address, end)` is covered by readable mappings (checked above), and the
    // mappings of loaded modules (where jump tables live) are not unmapped while the agent runs.
    let bytes = unsafe { std::slice::from_raw_parts(address as *const u8, len) };
    Some(bytes.to_vec())
}

/// Whether `[start, end)` is covered by readable mappings without a gap: a text mapping split
/// by an `mprotect` elsewhere in it still reads as one range.
pub fn readable(maps: &[dsu_sys::maps::MapEntry], start: usize, end: usize) -> bool {
    let mut at = start;
    for m in maps.iter().filter(|m| m.perms.read && m.end > start) {
        if m.start > at {
            return false;
        }
        at = at.max(m.end);
        if at >= end {
            return true;
        }
    }
    at >= end
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: usize = 0x40_0000;

    /// [`plan_redirect`] with no other edit in the update.
    fn plan(
        name: &str,
        module: &str,
        address: usize,
        code: &[u8],
        new_address: usize,
        around: &Surroundings<'_>,
    ) -> Result<Redirect, PrepareError> {
        plan_redirect(name, module, address, code, new_address, around, &[])
    }

    fn map(start: usize, end: usize, read: bool) -> dsu_sys::maps::MapEntry {
        dsu_sys::maps::MapEntry {
            start,
            end,
            perms: dsu_sys::maps::Perms {
                read,
                exec: true,
                ..Default::default()
            },
            offset: 0,
            path: None,
        }
    }

    #[test]
    fn a_range_across_split_mappings_is_readable() {
        let maps = [map(0x1000, 0x2000, true), map(0x2000, 0x3000, true)];
        assert!(readable(&maps, 0x1ff0, 0x2010));
        assert!(readable(&maps, 0x1000, 0x3000));
        assert!(!readable(&maps, 0x1000, 0x3001));
        let gap = [map(0x1000, 0x2000, true), map(0x2100, 0x3000, true)];
        assert!(!readable(&gap, 0x1ff0, 0x2110));
        let unreadable = [map(0x1000, 0x2000, true), map(0x2000, 0x3000, false)];
        assert!(!readable(&unreadable, 0x1ff0, 0x2010));
    }

    #[test]
    fn plain_function_gets_a_jump_at_its_entry() {
        // mov eax, 1; add eax, edi; ret
        let code = [0xb8, 1, 0, 0, 0, 0x01, 0xf8, 0xc3];
        let r = plan("f", "m", AT, &code, AT + 0x1000, &Surroundings::none()).unwrap();
        assert_eq!(r.site, AT);
        assert_eq!(r.bytes, [0xe9, 0xfb, 0x0f, 0, 0]);
        assert_eq!(r.original, [0xb8, 1, 0, 0, 0]);
    }

    #[test]
    fn endbr64_is_kept_and_the_jump_follows_it() {
        let mut code = ENDBR64.to_vec();
        code.extend([0xb8, 1, 0, 0, 0, 0xc3]);
        let r = plan("f", "m", AT, &code, AT + 0x1000, &Surroundings::none()).unwrap();
        assert_eq!(r.site, AT + 4);
        assert_eq!(r.bytes[0], 0xe9);
        assert_eq!(
            i32::from_le_bytes(r.bytes[1..].try_into().unwrap()),
            0x1000 - 9
        );
    }

    #[test]
    fn short_functions_without_room_for_a_trampoline_are_refused() {
        let e = plan(
            "tiny",
            "m",
            AT,
            &[0x31, 0xc0, 0xc3],
            AT + 64,
            &Surroundings::none(),
        )
        .unwrap_err();
        assert!(matches!(
            e,
            PrepareError::NoTrampolineRoom {
                size: 3,
                need: 5,
                ..
            }
        ));
        let mut code = ENDBR64.to_vec();
        code.extend([0x31, 0xc0, 0xc3]);
        let e = plan("tiny", "m", AT, &code, AT + 64, &Surroundings::none()).unwrap_err();
        assert!(matches!(
            e,
            PrepareError::NoTrampolineRoom {
                size: 7,
                need: 9,
                ..
            }
        ));
    }

    #[test]
    fn functions_shorter_than_a_short_jump_are_refused_whatever_the_room() {
        let around = Surroundings {
            gaps: vec![(AT + 16, AT + 32)],
            ..Surroundings::none()
        };
        let e = plan("ret", "m", AT, &[0xc3], AT + 0x1000, &around).unwrap_err();
        assert!(matches!(
            e,
            PrepareError::TooSmall {
                size: 1,
                need: 2,
                ..
            }
        ));
        let mut code = ENDBR64.to_vec();
        code.push(0xc3);
        let e = plan("ret", "m", AT, &code, AT + 0x1000, &around).unwrap_err();
        assert!(matches!(
            e,
            PrepareError::TooSmall {
                size: 5,
                need: 6,
                ..
            }
        ));
        assert!(
            e.to_string()
                .contains("patch the functions that call ret instead"),
            "{e}"
        );
    }

    /// A module at `AT` whose bytes are `bytes`, with `symbols` `(name, offset, size)`.
    fn module_of(symbols: &[(&str, usize, u64)]) -> SymbolIndex {
        use crate::resolve::{ModuleInfo, ProcessSymbol, SymbolKind};
        let mut index = SymbolIndex::default();
        let info = ModuleInfo {
            name: "m".into(),
            path: "m".into(),
            bias: 0,
            is_main: true,
            tls_modid: 0,
        };
        let symbols: Vec<(&[u8], ProcessSymbol)> = symbols
            .iter()
            .map(|&(name, offset, size)| {
                let sym = ProcessSymbol {
                    module: 0,
                    address: AT + offset,
                    size,
                    kind: SymbolKind::Function,
                    global: true,
                    file: 0,
                };
                (name.as_bytes(), sym)
            })
            .collect();
        index.add_symbols(info, symbols);
        index
    }

    #[test]
    fn gaps_lie_between_a_sized_symbol_and_the_next_and_hold_only_filler() {
        // 0x00 f (0x10), then 0x10..0x20 int3; 0x20 g (0x08), then 0x28..0x30 nop + one
        // push; 0x30 h (0x04), then 0x34..0x40 int3; 0x40 z (size 0), then 0x41..0x50 int3;
        // 0x50 w (0x10), holding a nested sized symbol n (0x52, 2) and nops after it.
        let mut bytes = vec![0xccu8; 0x60];
        bytes[..0x10].fill(0x90);
        bytes[0x20..0x28].fill(0x90);
        bytes[0x28..0x2f].fill(0x90);
        bytes[0x2f] = 0x55;
        bytes[0x30..0x34].fill(0x90);
        bytes[0x50..0x60].fill(0x90);
        let index = module_of(&[
            ("f", 0x00, 0x10),
            ("g", 0x20, 0x08),
            ("h", 0x30, 0x04),
            ("z", 0x40, 0),
            ("w", 0x50, 0x10),
            ("n", 0x52, 2),
            ("end", 0x60, 1),
        ]);
        // A label without a size at h's end: what follows h is unbounded too.
        let labelled = module_of(&[
            ("f", 0x00, 0x10),
            ("g", 0x20, 0x08),
            ("h", 0x30, 0x04),
            ("h_end", 0x34, 0),
            ("z", 0x40, 0),
        ]);
        let read = |at: usize, len: usize| {
            let off = at.checked_sub(AT)?;
            bytes.get(off..off + len).map(<[u8]>::to_vec)
        };
        let mem = Reader::unpatched(&read);
        let gaps = free_gaps(&index, 0, AT + 0x30, &mem);
        // Not 0x28..0x30 (a push in it), not after z (no size), not inside w.
        assert_eq!(gaps, [(AT + 0x10, AT + 0x20), (AT + 0x34, AT + 0x40)]);
        assert_eq!(
            free_gaps(&labelled, 0, AT + 0x30, &mem),
            [(AT + 0x10, AT + 0x20)]
        );

        // Bytes a patch wrote into a gap split it; a run shorter than a jump is dropped.
        let pristine = |mut now: Vec<u8>, at: usize| {
            for (i, b) in now.iter_mut().enumerate() {
                if (AT + 0x14..AT + 0x19).contains(&(at + i)) || at + i == AT + 0x3b {
                    *b = 0xcc;
                }
            }
            now
        };
        let mut patched = bytes.clone();
        patched[0x14..0x19].copy_from_slice(&[0xe9, 1, 2, 3, 4]);
        patched[0x3b] = 0xe9;
        let read_patched = |at: usize, len: usize| {
            let off = at.checked_sub(AT)?;
            patched.get(off..off + len).map(<[u8]>::to_vec)
        };
        let mem = Reader {
            read: &read_patched,
            before_own: &|b, _| b,
            before_any: &pristine,
        };
        let gaps = free_gaps(&index, 0, AT + 0x30, &mem);
        assert_eq!(gaps, [(AT + 0x19, AT + 0x20), (AT + 0x34, AT + 0x3b)]);

        // Out of a short jump's reach (the window is 128 bytes back, 138 on): none.
        assert!(free_gaps(&index, 0, AT + 0x400, &Reader::unpatched(&read)).is_empty());
    }

    #[test]
    fn gaps_at_the_edges_of_a_short_jumps_reach_are_found() {
        // Entry at 0x100 with `endbr64`: the short jump at 0x104 reaches 0x86..=0x185. A gap
        // ending just past the window's start, and one starting just before its end.
        let entry = 0x100;
        let mut bytes = vec![0x90u8; 0x500];
        bytes[entry..entry + 4].copy_from_slice(&ENDBR64);
        use crate::resolve::{ModuleInfo, ProcessSymbol, SymbolKind};
        let sym = |offset: usize, size: u64, kind: SymbolKind| ProcessSymbol {
            module: 0,
            address: if kind == SymbolKind::ThreadLocal {
                offset
            } else {
                AT + offset
            },
            size,
            kind,
            global: true,
            file: 0,
        };
        let info = |name: &str| ModuleInfo {
            name: name.into(),
            path: name.into(),
            bias: 0,
            is_main: false,
            tls_modid: 0,
        };
        let function = SymbolKind::Function;
        let mut index = SymbolIndex::default();
        let symbols: [(&[u8], ProcessSymbol); 7] = [
            (b"a", sym(0x00, 0x70, function)),
            (b"b", sym(0x90, 0x70, function)),
            (b"f", sym(entry, 0x06, function)),
            (b"c", sym(0x106, 0x7c, function)),
            // d starts just inside the symbols looked at (the window and 64 bytes), far just
            // outside: a narrower window loses the far gap, a wider one finds another.
            (b"d", sym(0x1c8, 0x04, function)),
            (b"far", sym(0x1e0, 0x10, function)),
            // A thread-local symbol's value is an offset, not an address here.
            (b"tls", sym(AT + 0x78, 4, SymbolKind::ThreadLocal)),
        ];
        index.add_symbols(info("m"), symbols);
        // Another module's symbols bound nothing in this one.
        index.add_symbols(info("other"), [(&b"elsewhere"[..], sym(0x78, 4, function))]);
        let read = |at: usize, len: usize| {
            let off = at.checked_sub(AT)?;
            bytes.get(off..off + len).map(<[u8]>::to_vec)
        };
        let gaps = free_gaps(&index, 0, AT + entry, &Reader::unpatched(&read));
        assert_eq!(gaps, [(AT + 0x70, AT + 0x90), (AT + 0x182, AT + 0x1c8)]);
        // The far one is reached at its very start, the near one from 0x86 on.
        let around = Surroundings {
            gaps: gaps.clone(),
            ..Surroundings::none()
        };
        let mut code = ENDBR64.to_vec();
        code.extend([0x31, 0xc0]);
        let r = plan("f", "m", AT + entry, &code, AT + 0x1000, &around).unwrap();
        assert_eq!(r.trampoline.unwrap().at, AT + 0x86);
        let taken = [(AT + 0x70, AT + 0x90)];
        let r = plan_redirect("f", "m", AT + entry, &code, AT + 0x1000, &around, &taken).unwrap();
        assert_eq!(r.trampoline.unwrap().at, AT + 0x182);
    }

    #[test]
    fn a_trampoline_may_touch_other_edits_but_not_overlap_them() {
        let code = [0x6b, 0xc7, 0x64, 0xc3];
        let around = Surroundings {
            gaps: vec![(AT + 0x10, AT + 0x20)],
            ..Surroundings::none()
        };
        // An edit ending where the slot starts, or starting where it ends, leaves it free.
        let before = [(AT + 0x0e, AT + 0x10)];
        let r = plan_redirect("price", "m", AT, &code, AT + 0x1000, &around, &before).unwrap();
        assert_eq!(r.trampoline.unwrap().at, AT + 0x10);
        let after = [(AT + 0x15, AT + 0x17)];
        let r = plan_redirect("price", "m", AT, &code, AT + 0x1000, &around, &after).unwrap();
        assert_eq!(r.trampoline.unwrap().at, AT + 0x10);
        let inside = [(AT + 0x14, AT + 0x15)];
        let r = plan_redirect("price", "m", AT, &code, AT + 0x1000, &around, &inside).unwrap();
        assert_eq!(r.trampoline.unwrap().at, AT + 0x15);
    }

    #[test]
    fn a_short_function_jumps_short_to_a_trampoline_in_a_gap() {
        // imul eax, edi, 100; ret (4 bytes), no padding; a gap 0x40 bytes on.
        let code = [0x6b, 0xc7, 0x64, 0xc3];
        let around = Surroundings {
            gaps: vec![(AT + 0x40, AT + 0x48)],
            ..Surroundings::none()
        };
        let r = plan("price", "m", AT, &code, AT + 0x1000, &around).unwrap();
        assert_eq!(r.site, AT);
        assert_eq!(r.bytes, [0xeb, 0x3e]); // to AT + 2 + 0x3e
        assert_eq!(r.original, [0x6b, 0xc7]);
        let t = r.trampoline.unwrap();
        assert_eq!(t.at, AT + 0x40);
        assert_eq!(t.bytes, x86::jmp_rel32(AT + 0x40, AT + 0x1000).unwrap());
        // Behind an `endbr64` the short jump follows it, and may go backwards.
        let mut code = ENDBR64.to_vec();
        code.extend([0x31, 0xc0, 0xc3]);
        let around = Surroundings {
            gaps: vec![(AT - 0x10, AT - 0x8)],
            ..Surroundings::none()
        };
        let r = plan("zero", "m", AT, &code, AT + 0x1000, &around).unwrap();
        assert_eq!(r.site, AT + 4);
        assert_eq!(r.bytes, [0xeb, (-0x16i8) as u8]);
        assert_eq!(r.trampoline.unwrap().at, AT - 0x10);
    }

    #[test]
    fn a_trampoline_goes_in_reach_and_outside_other_edits() {
        let code = [0x6b, 0xc7, 0x64, 0xc3];
        // The first gap ends too soon for a jump after the taken span; the second starts out
        // of reach (AT + 2 + 127 is the last byte a short jump reaches).
        let around = Surroundings {
            gaps: vec![(AT + 0x10, AT + 0x18), (AT + 0x7d, AT + 0x90)],
            ..Surroundings::none()
        };
        let taken = [(AT + 0x12, AT + 0x14)];
        let r = plan_redirect("price", "m", AT, &code, AT + 0x1000, &around, &taken).unwrap();
        assert_eq!(r.trampoline.unwrap().at, AT + 0x7d);
        let r = plan_redirect("price", "m", AT, &code, AT + 0x1000, &around, &[]).unwrap();
        assert_eq!(r.trampoline.unwrap().at, AT + 0x10);
        let far = Surroundings {
            gaps: vec![(AT + 0x82, AT + 0x90), (AT - 0x90, AT - 0x7f)],
            ..Surroundings::none()
        };
        let e = plan("price", "m", AT, &code, AT + 0x1000, &far).unwrap_err();
        assert!(matches!(e, PrepareError::NoTrampolineRoom { .. }), "{e:?}");
        // The edge of reach: -128 from the end of the short jump.
        let edge = Surroundings {
            gaps: vec![(AT - 0x90, AT + 2 - 128 + 5)],
            ..Surroundings::none()
        };
        let r = plan("price", "m", AT, &code, AT + 0x1000, &edge).unwrap();
        assert_eq!(r.trampoline.unwrap().at, AT + 2 - 128);
        assert_eq!(r.bytes, [0xeb, 0x80]);
    }

    #[test]
    fn a_branch_into_the_second_byte_of_a_short_jump_is_refused() {
        // A 2-byte jump covers only byte 1: a branch to 1 is refused, a branch to 2 is fine
        // (a 5-byte jump would cover both). 0: nop; 1: jmp 1
        let code = [0x90, 0xeb, 0xfe];
        let around = Surroundings {
            gaps: vec![(AT + 0x20, AT + 0x30)],
            ..Surroundings::none()
        };
        let e = plan("f", "m", AT, &code, AT + 0x1000, &around).unwrap_err();
        assert!(
            matches!(e, PrepareError::BranchIntoEntry { to, .. } if to == AT + 1),
            "{e:?}"
        );
        // 0: xor eax,eax; 2: jmp 2: the branch lands after the short jump.
        let code = [0x31, 0xc0, 0xeb, 0xfe];
        let r = plan("f", "m", AT, &code, AT + 0x1000, &around).unwrap();
        assert_eq!(r.bytes.len(), JMP_REL8_LEN);
    }

    #[test]
    fn a_branch_into_the_overwritten_bytes_is_refused() {
        // 0: xor eax,eax (2) ; 2: inc eax (2) ; 4: cmp eax,5 (3) ; 7: jne 2 (2) ; 9: ret
        let code = [0x31, 0xc0, 0xff, 0xc0, 0x83, 0xf8, 0x05, 0x75, 0xf9, 0xc3];
        let e = plan("loop", "m", AT, &code, AT + 64, &Surroundings::none()).unwrap_err();
        match e {
            PrepareError::BranchIntoEntry {
                from, to, bytes, ..
            } => {
                assert_eq!(from, AT + 7);
                assert_eq!(to, AT + 2);
                assert_eq!(bytes, "75 f9");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_branch_back_to_the_entry_itself_is_fine() {
        // 0: dec edi (2); 2: nop*3; 5: jnz 0 (2); 7: ret
        let code = [0xff, 0xcf, 0x90, 0x90, 0x90, 0x75, 0xf9, 0xc3];
        assert!(plan("loop", "m", AT, &code, AT + 64, &Surroundings::none()).is_ok());
    }

    #[test]
    fn undecodable_bytes_are_refused() {
        let code = [0xb8, 1, 0, 0, 0, 0x0f, 0xff];
        let e = plan("f", "m", AT, &code, AT + 64, &Surroundings::none()).unwrap_err();
        assert!(matches!(e, PrepareError::Undecodable { at, .. } if at == AT + 5));
    }

    #[test]
    fn out_of_reach_new_code_is_refused() {
        let code = [0xb8, 1, 0, 0, 0, 0xc3];
        let e = plan("f", "m", AT, &code, AT + (1 << 33), &Surroundings::none()).unwrap_err();
        assert!(matches!(e, PrepareError::OutOfReach { .. }));
    }

    /// The fixture's `dsu_cold_target` (at 0x1280) and its part `.cold` (at 0x1090), which
    /// jumps back to entry + 3.
    const COLD_MAIN: [u8; 14] = [
        0x48, 0x85, 0xff, 0x0f, 0x88, 0x07, 0xfe, 0xff, 0xff, 0x48, 0x8d, 0x47, 0x01, 0xc3,
    ];
    const COLD_PART: [u8; 11] = [
        0x48, 0xf7, 0xdf, 0x48, 0x85, 0xff, 0xe9, 0xe8, 0x01, 0x00, 0x00,
    ];

    #[test]
    fn a_split_off_part_that_jumps_into_the_entry_bytes_is_refused() {
        let around = Surroundings {
            parts: vec![("f.cold".into(), 0x1090, COLD_PART.to_vec())],
            read: &|_, _| None,
            padding: vec![],
            gaps: vec![],
        };
        let e = plan("f", "m", 0x1280, &COLD_MAIN, 0x9000, &around).unwrap_err();
        assert_eq!(
            e,
            PrepareError::PartBranchIntoEntry {
                name: "f".into(),
                part: "f.cold".into(),
                from: 0x1096,
                to: 0x1283,
            }
        );
        // Without the part in view, the body alone is fine.
        assert!(plan("f", "m", 0x1280, &COLD_MAIN, 0x9000, &Surroundings::none()).is_ok());
    }

    /// The fixture's `dsu_table_target` at 0x1290, with its table at 0x2004.
    const TABLE_MAIN: [u8; 28] = [
        0x31, 0xc0, 0x48, 0x01, 0xf8, 0x48, 0x83, 0xf8, 0x03, 0x77, 0x10, 0x48, 0x8d, 0x15, 0x62,
        0x0d, 0x00, 0x00, 0x48, 0x63, 0x0c, 0x82, 0x48, 0x01, 0xd1, 0xff, 0xe1, 0xc3,
    ];

    fn table(entries: &[i32]) -> Vec<u8> {
        entries.iter().flat_map(|e| e.to_le_bytes()).collect()
    }

    fn read_from(at: usize, data: Vec<u8>) -> impl Fn(usize, usize) -> Option<Vec<u8>> {
        move |a, len| {
            let from = a.checked_sub(at)?;
            data.get(from..from + len).map(<[u8]>::to_vec)
        }
    }

    #[test]
    fn a_jump_table_entry_into_the_entry_bytes_is_refused() {
        let ret = 0x12ab - 0x2004;
        let read = read_from(
            0x2004,
            table(&[ret, ret, ret, 0x1292 - 0x2004, 0x7fff_0000]),
        );
        let around = Surroundings {
            parts: vec![],
            read: &read,
            padding: vec![],
            gaps: vec![],
        };
        let e = plan("f", "m", 0x1290, &TABLE_MAIN, 0x9000, &around).unwrap_err();
        assert_eq!(
            e,
            PrepareError::JumpTableIntoEntry {
                name: "f".into(),
                module: "m".into(),
                from: 0x129b,
                table: 0x2004,
                to: 0x1292,
            }
        );
    }

    #[test]
    fn a_jump_table_ends_where_its_entries_leave_the_function() {
        let ret = 0x12ab - 0x2004;
        // Past the first entry that leads outside, words are not the table's: not followed.
        let read = read_from(0x2004, table(&[ret, ret, 0x7000, 0x1292 - 0x2004]));
        let around = Surroundings {
            parts: vec![],
            read: &read,
            padding: vec![],
            gaps: vec![],
        };
        assert!(plan("f", "m", 0x1290, &TABLE_MAIN, 0x9000, &around).is_ok());
        // An entry to the entry itself (not inside the jump) is fine too.
        let read = read_from(0x2004, table(&[ret, 0x1290 - 0x2004, 0x7000]));
        let around = Surroundings {
            parts: vec![],
            read: &read,
            padding: vec![],
            gaps: vec![],
        };
        assert!(plan("f", "m", 0x1290, &TABLE_MAIN, 0x9000, &around).is_ok());
    }

    #[test]
    fn an_absolute_jump_table_entry_into_the_entry_bytes_is_refused() {
        // jmp [rax * 8 + 0x402000]; ret
        let code = [0xff, 0x24, 0xc5, 0x00, 0x20, 0x40, 0x00, 0xc3];
        let entries: Vec<u8> = [0x401007u64, 0x401002]
            .iter()
            .flat_map(|e| e.to_le_bytes())
            .collect();
        let read = read_from(0x402000, entries);
        let around = Surroundings {
            parts: vec![],
            read: &read,
            padding: vec![],
            gaps: vec![],
        };
        let e = plan("f", "m", 0x401000, &code, 0x409000, &around).unwrap_err();
        assert!(
            matches!(
                e,
                PrepareError::JumpTableIntoEntry {
                    table: 0x402000,
                    to: 0x401002,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn the_split_off_parts_have_the_names_compilers_give_them() {
        let names: Vec<String> = split_part_names("f").collect();
        assert_eq!(
            names,
            ["f.cold", "f.cold.0", "f.cold.1", "f.cold.2", "f.cold.3"]
        );
    }

    #[test]
    fn a_function_exactly_as_long_as_the_jump_takes_it() {
        // xor rax, rax; nop; ret: 5 bytes.
        let code = [0x48, 0x31, 0xc0, 0x90, 0xc3];
        assert!(plan("f", "m", AT, &code, AT + 64, &Surroundings::none()).is_ok());
    }

    #[test]
    fn jump_table_entries_just_past_the_jump_or_at_the_end_of_a_body_are_fine() {
        // Entry + 5 is the first byte after the jump: an instruction boundary that stays.
        let read = read_from(0x2004, table(&[0x1295 - 0x2004]));
        let around = Surroundings {
            parts: vec![],
            read: &read,
            padding: vec![],
            gaps: vec![],
        };
        assert!(plan("f", "m", 0x1290, &TABLE_MAIN, 0x9000, &around).is_ok());
        // The first entry leads to the end of the body (outside it): the table ends there,
        // and the word after it is not an entry.
        let read = read_from(0x2004, table(&[0x12ac - 0x2004, 0x1292 - 0x2004]));
        let around = Surroundings {
            parts: vec![],
            read: &read,
            padding: vec![],
            gaps: vec![],
        };
        assert!(plan("f", "m", 0x1290, &TABLE_MAIN, 0x9000, &around).is_ok());
    }

    #[test]
    fn a_jump_table_is_followed_through_entries_into_a_split_off_part() {
        // The first entry leads into the cold part (part of the function), the second into the
        // jump: the table goes on through the part's range.
        let read = read_from(0x2004, table(&[0x3004 - 0x2004, 0x1292 - 0x2004]));
        let around = Surroundings {
            parts: vec![("f.cold".into(), 0x3000, vec![0xc3; 16])],
            read: &read,
            padding: vec![],
            gaps: vec![],
        };
        let e = plan("f", "m", 0x1290, &TABLE_MAIN, 0x9000, &around).unwrap_err();
        assert!(
            matches!(e, PrepareError::JumpTableIntoEntry { to: 0x1292, .. }),
            "{e:?}"
        );
        assert!(format!("{around:?}").contains("f.cold"));
        // Past the part's end the table has ended.
        let read = read_from(0x2004, table(&[0x3010 - 0x2004, 0x1292 - 0x2004]));
        let around = Surroundings {
            parts: vec![("f.cold".into(), 0x3000, vec![0xc3; 16])],
            read: &read,
            padding: vec![],
            gaps: vec![],
        };
        assert!(plan("f", "m", 0x1290, &TABLE_MAIN, 0x9000, &around).is_ok());
    }

    /// Memory whose every word, read as a table's first entry (a 32-bit offset from where it is
    /// read, or a 64-bit address), leads to 0x401002: inside a jump at 0x401000.
    fn into_the_jump_everywhere(a: usize, len: usize) -> Option<Vec<u8>> {
        Some(match len {
            4 => ((0x401002 - a as i64) as i32).to_le_bytes().to_vec(),
            _ => 0x401002u64.to_le_bytes().to_vec(),
        })
    }

    #[test]
    fn only_lea_rip_and_scaled_index_jumps_are_taken_for_tables() {
        // The reader does lead into the jump for a real table: lea rdx, [rip + 0x0ff9];
        // jmp rdx; ret.
        let code = [0x48, 0x8d, 0x15, 0xf9, 0x0f, 0x00, 0x00, 0xff, 0xe2, 0xc3];
        let around = Surroundings {
            parts: vec![],
            read: &into_the_jump_everywhere,
            padding: vec![],
            gaps: vec![],
        };
        assert!(plan("f", "m", 0x401000, &code, 0x409000, &around).is_err());
        let around = Surroundings {
            parts: vec![],
            read: &into_the_jump_everywhere,
            padding: vec![],
            gaps: vec![],
        };
        // mov rax, [rip + 0x0ff9] (data, not a table base); jmp rax; ret
        let code = [0x48, 0x8b, 0x05, 0xf9, 0x0f, 0x00, 0x00, 0xff, 0xe0, 0xc3];
        assert!(plan("f", "m", 0x401000, &code, 0x409000, &around).is_ok());
        // lea rax, [rbx + 8] (not rip-relative); jmp rax; ret
        let code = [0x48, 0x8d, 0x43, 0x08, 0xff, 0xe0, 0xc3];
        assert!(plan("f", "m", 0x401000, &code, 0x409000, &around).is_ok());
        // jmp [rax * 4 + 0x402000] (scale 4: not a table of addresses); ret
        let code = [0xff, 0x24, 0x85, 0x00, 0x20, 0x40, 0x00, 0xc3];
        assert!(plan("f", "m", 0x401000, &code, 0x409000, &around).is_ok());
        // jmp [rbx + rax * 8 + 0x402000] (a base register: not a fixed table); ret
        let code = [0xff, 0xa4, 0xc3, 0x00, 0x20, 0x40, 0x00, 0xc3];
        assert!(plan("f", "m", 0x401000, &code, 0x409000, &around).is_ok());
        // jmp [rip + 0x0ff9] (one pointer, no index); ret
        let code = [0xff, 0x25, 0xf9, 0x0f, 0x00, 0x00, 0xc3];
        assert!(plan("f", "m", 0x401000, &code, 0x409000, &around).is_ok());
    }

    #[test]
    fn a_truncated_last_instruction_is_named_by_its_bytes() {
        // ret; then the first byte of a two-byte instruction, cut off.
        let code = [0x90, 0x90, 0x90, 0x90, 0xc3, 0x0f];
        let e = plan("f", "m", AT, &code, AT + 64, &Surroundings::none()).unwrap_err();
        assert_eq!(
            e,
            PrepareError::Undecodable {
                name: "f".into(),
                module: "m".into(),
                at: AT + 5,
                bytes: "0f".into(),
            }
        );
    }

    static DATA: [u8; 64] = [0x5a; 64];

    #[test]
    fn this_process_is_read_where_it_is_mapped_and_nowhere_else() {
        let maps = dsu_sys::maps::read_self().unwrap();
        let at = DATA.as_ptr() as usize;
        assert_eq!(read_bytes(&maps, at, 64), Some(DATA.to_vec()));
        assert_eq!(read_code("d", "m", at, 64, &maps), Ok(DATA.to_vec()));
        // Page 0 is never mapped; the top of the address space wraps.
        assert_eq!(read_bytes(&maps, 16, 8), None);
        assert_eq!(read_bytes(&maps, usize::MAX - 3, 8), None);
        assert!(matches!(
            read_code("d", "m", 16, 8, &maps),
            Err(PrepareError::NotMapped {
                address: 16,
                size: 8,
                ..
            })
        ));
    }

    #[test]
    fn a_function_shorter_than_the_jump_takes_it_over_its_padding() {
        // imul eax, edi, 100; ret (4 bytes), then alignment: nop dword [rax + 0]; int3 x8.
        let code = [0x6b, 0xc7, 0x64, 0xc3];
        let after = [
            0x0f, 0x1f, 0x40, 0x00, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
        ];
        assert_eq!(free_padding(&after, AT + 4), 12);
        let around = Surroundings {
            parts: vec![],
            read: &|_, _| None,
            padding: after.to_vec(),
            gaps: vec![],
        };
        let r = plan("price", "m", AT, &code, AT + 0x1000, &around).unwrap();
        assert_eq!(r.site, AT);
        assert_eq!(r.original, [0x6b, 0xc7, 0x64, 0xc3, 0x0f]);
        assert_eq!(r.trampoline, None);
        // Without the padding or a gap: refused, saying what would fit and what to do.
        let e = plan("price", "m", AT, &code, AT + 0x1000, &Surroundings::none()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "price in m is 4 bytes with 0 bytes of free padding after it, too small for an \
             entry jump (5 bytes), and no free alignment padding within reach of a short jump \
             (128 bytes) can hold a trampoline. A replacement that fits in 4 bytes (and keeps \
             its unwind rules) is written in place instead; for a longer one, patch the \
             functions that call price instead"
        );
    }

    #[test]
    fn padding_ends_at_the_first_byte_that_is_not_a_filler() {
        // 66 90 (xchg ax, ax), 66 2e 0f 1f 84 00 00 00 00 00 (cs nop word), then push rbp.
        let after = [
            0x66, 0x90, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0, 0x55, 0xcc,
        ];
        assert_eq!(free_padding(&after, AT), 12);
        assert_eq!(free_padding(&[0x55, 0xcc], AT), 0);
        // A filler cut short by the end of what was read is not counted.
        assert_eq!(free_padding(&[0xcc, 0x0f, 0x1f], AT), 1);
        assert_eq!(free_padding(&[], AT), 0);
    }
}
