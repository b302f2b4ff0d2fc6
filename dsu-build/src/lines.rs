//! Lines: a function that differs only in the line numbers it passes on (`__LINE__` in an
//! assertion, moved by a fix above it) is the same function.
//!
//! A fix that adds or removes lines changes the `__LINE__` of every assertion below it, so
//! every function that asserts below the fix compiles to other immediates (Redis: a one-line
//! fix of `lookupKey` made 16 more functions of `db.c` differ). The program's versions report
//! the lines of the source the program was built from, which is right for them; replacing them
//! only widens the patch, and with it the functions that must be idle for it to apply.
//!
//! A difference counts as a line number only where the objects say so: both decode to the same
//! instructions, every differing byte lies in an instruction's immediate, and that immediate is
//! the source line `.debug_line` gives for the instruction itself, in each object. A constant a
//! fix changed matches that only if it happens to equal its own line number before and after
//! the fix. Without line tables (no `-g`) functions are compared byte for byte, as before.

use std::collections::BTreeMap;

use iced_x86::{Decoder, DecoderOptions};

use crate::read::{Role, Unit};

/// Source lines of one object's code: by section index, the rows `(offset, line)` in order.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    rows: BTreeMap<usize, Vec<(u64, u64)>>,
}

/// Where relocated addresses put section `index`: its own 2^40-byte window, so a row's
/// address says which section it is in.
const WINDOW: u32 = 40;

impl Lines {
    /// The line table of `unit`, from its `.debug_line` relocated to a window per section;
    /// `None` when it has none or it cannot be read.
    pub fn of(unit: &Unit) -> Option<Lines> {
        let section = unit.section_named(".debug_line")?;
        let mut data = section.data.clone();
        for r in &section.relocs {
            if r.r_type != object::elf::R_X86_64_64.0 {
                continue; // offsets into string sections, not addresses
            }
            let symbol = unit.symbols.get(r.symbol)?;
            let target = symbol.section?;
            let base = (target as u64 + 1) << WINDOW;
            let value = match symbol.role {
                Role::Section => 0,
                _ => symbol.value,
            };
            let address = base.checked_add_signed(r.addend)?.checked_add(value)?;
            let at = usize::try_from(r.offset).ok()?;
            data.get_mut(at..at + 8)?
                .copy_from_slice(&address.to_le_bytes());
        }
        let debug_line = gimli::DebugLine::new(&data, gimli::LittleEndian);
        let mut lines = Lines::default();
        let mut offset = 0usize;
        while offset < data.len() {
            let program = debug_line
                .program(gimli::DebugLineOffset(offset), 8, None, None)
                .ok()?;
            let header = program.header();
            let next = offset
                .checked_add(header.unit_length())?
                .checked_add(usize::from(header.format().initial_length_size()))?;
            let mut rows = program.rows();
            while let Some((_, row)) = rows.next_row().ok()? {
                let (Some(line), false) = (row.line(), row.end_sequence()) else {
                    continue;
                };
                let address = row.address();
                let Some(section) = (address >> WINDOW).checked_sub(1) else {
                    continue;
                };
                lines
                    .rows
                    .entry(section as usize)
                    .or_default()
                    .push((address & ((1 << WINDOW) - 1), line.get()));
            }
            offset = next;
        }
        for rows in lines.rows.values_mut() {
            // Stable: of rows at one offset, the last one read applies.
            rows.sort_by_key(|&(at, _)| at);
        }
        Some(lines)
    }

    /// The line of the instruction at `offset` in section `section`.
    pub fn line_at(&self, section: usize, offset: u64) -> Option<u64> {
        let rows = self.rows.get(&section)?;
        let after = rows.partition_point(|&(at, _)| at <= offset);
        after.checked_sub(1).map(|i| rows[i].1)
    }
}

/// The code of a function: its section's bytes from the symbol's start.
fn code(unit: &Unit, symbol: usize) -> Option<(usize, u64, &[u8])> {
    let s = &unit.symbols[symbol];
    let index = s.section?;
    let data = &unit.section(index)?.data;
    let start = usize::try_from(s.value).ok()?;
    let end = start.checked_add(usize::try_from(s.size).ok()?)?;
    Some((index, s.value, data.get(start..end)?))
}

/// Where the immediates that differ between two functions' code are line numbers, the byte
/// offsets (from the function's start) that differ; `None` when any difference is something
/// else. The callers compare everything else (relocations included) with those bytes equal.
pub(crate) fn line_only_differences(
    original: (&Unit, &Lines, usize),
    fixed: (&Unit, &Lines, usize),
) -> Option<Vec<usize>> {
    let (old_unit, old_lines, o) = original;
    let (new_unit, new_lines, n) = fixed;
    let (old_section, old_start, old) = code(old_unit, o)?;
    let (new_section, new_start, new) = code(new_unit, n)?;
    if old.len() != new.len() || old == new {
        return None;
    }
    let mut old_decoder = Decoder::with_ip(64, old, 0, DecoderOptions::NONE);
    let mut new_decoder = Decoder::with_ip(64, new, 0, DecoderOptions::NONE);
    let mut differing = Vec::new();
    while old_decoder.can_decode() {
        let at = old_decoder.position();
        let a = old_decoder.decode();
        let b = new_decoder.decode();
        let len = a.len();
        if a.is_invalid() || b.is_invalid() || b.len() != len {
            return None;
        }
        let (x, y) = (&old[at..at + len], &new[at..at + len]);
        if x == y {
            continue;
        }
        let offsets = old_decoder.get_constant_offsets(&a);
        let (imm, size) = (offsets.immediate_offset(), offsets.immediate_size());
        if !offsets.has_immediate()
            || new_decoder.get_constant_offsets(&b).immediate_offset() != imm
            || x[..imm] != y[..imm]
            || x[imm + size..] != y[imm + size..]
        {
            return None;
        }
        let value = |bytes: &[u8]| {
            let mut le = [0u8; 8];
            le[..size].copy_from_slice(&bytes[imm..imm + size]);
            u64::from_le_bytes(le)
        };
        let old_line = old_lines.line_at(old_section, old_start + at as u64)?;
        let new_line = new_lines.line_at(new_section, new_start + at as u64)?;
        if !both_lines((value(x), old_line), (value(y), new_line)) {
            return None;
        }
        differing.extend((at + imm..at + imm + size).filter(|&i| old[i] != new[i]));
    }
    Some(differing)
}

/// Whether an immediate is its instruction's own source line in both objects: `(value,
/// line)` as built, then as fixed. One side alone is a constant the fix changed.
fn both_lines(original: (u64, u64), fixed: (u64, u64)) -> bool {
    original.0 == original.1 && fixed.0 == fixed.1
}
