//! Compare: what a relocation refers to, and a description of a function or variable that is
//! equal between two objects exactly when the code or data is the same.
//!
//! Offsets of sections and symbol indices differ between two compilations of the same file;
//! what a relocation *means* does not. So a relocation target is described by the name of the
//! function or variable it points at (a section symbol plus addend is first turned into the
//! symbol it lands on), or, for what the compiler made without a name of its own (string
//! literals, constants, switch tables), by the bytes it points at.

use crate::error::BuildError;
use crate::read::{Reloc, Role, Section, Unit};

/// What a relocation refers to, in one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// A function or named variable (symbol index), at an addend from its start.
    Named { symbol: usize, addend: i64 },
    /// A symbol this object does not define (or a common one): the program's, by name.
    External { symbol: usize, addend: i64 },
    /// Something the compiler made, inside section `section` at `addend` from its start.
    Unnamed {
        section: usize,
        addend: i64,
        piece: Piece,
    },
}

/// The bytes that identify an unnamed target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece {
    /// A NUL-terminated string starting at this section offset.
    String(u64),
    /// One `entsize` entry of a merged-constants section.
    Entry(u64),
    /// The bytes a sized label covers: (start, size).
    Span(u64, u64),
    /// The whole section.
    Whole,
}

/// Resolves one relocation of `unit` to what it refers to.
pub(crate) fn target(unit: &Unit, reloc: &Reloc, what: &str) -> Result<Target, BuildError> {
    let symbol = &unit.symbols[reloc.symbol];
    let unsupported = |reason| BuildError::UnsupportedReference {
        object: unit.label.to_string(),
        what: what.to_string(),
        symbol: if symbol.name.is_empty() {
            format!("#{}", reloc.symbol)
        } else {
            symbol.name.clone()
        },
        reason,
    };
    let in_section = |section: usize| {
        unit.section(section)
            .ok_or_else(|| unsupported("in a section that is not loaded"))
    };
    match symbol.role {
        Role::Function | Role::Data | Role::ThreadLocal => Ok(Target::Named {
            symbol: reloc.symbol,
            addend: reloc.addend,
        }),
        Role::Undefined | Role::Common => Ok(Target::External {
            symbol: reloc.symbol,
            addend: reloc.addend,
        }),
        Role::Section => {
            let index = symbol
                .section
                .ok_or_else(|| unsupported("a section symbol without a section"))?;
            let named = unit.defined_in(index, &[Role::Function, Role::Data, Role::ThreadLocal]);
            // With -ffunction-sections and -fdata-sections, a section holds one function or
            // variable at its start; otherwise the one the addend lands in.
            let land = reloc.addend.max(0) as u64;
            let pick = match named.as_slice() {
                [] => None,
                [one] => Some(*one),
                many => Some(
                    *many
                        .iter()
                        .rev()
                        .find(|&&i| unit.symbols[i].value <= land)
                        .unwrap_or(&many[0]),
                ),
            };
            match pick {
                Some(i) => Ok(Target::Named {
                    symbol: i,
                    addend: reloc.addend - unit.symbols[i].value as i64,
                }),
                None => {
                    let section = in_section(index)?;
                    // Into merged strings (rustc refers to its file names so): the string the
                    // relocation lands in, not every string of the section.
                    let piece = if section.is_strings() {
                        Piece::String(string_start(section, landing(reloc)))
                    } else {
                        Piece::Whole
                    };
                    Ok(Target::Unnamed {
                        section: index,
                        addend: reloc.addend,
                        piece,
                    })
                }
            }
        }
        Role::Label | Role::Constant => {
            let index = symbol
                .section
                .ok_or_else(|| unsupported("a label without a section"))?;
            let section = in_section(index)?;
            let piece = if symbol.role == Role::Constant {
                Piece::Whole
            } else if symbol.size > 0 {
                // rustc's `.Lanon.HASH.N`: several sized constants in one section.
                Piece::Span(symbol.value, symbol.size)
            } else if section.is_strings() {
                Piece::String(symbol.value)
            } else if section.is_merge() && section.entsize > 0 {
                Piece::Entry(symbol.value)
            } else {
                Piece::Whole
            };
            Ok(Target::Unnamed {
                section: index,
                addend: reloc.addend + symbol.value as i64,
                piece,
            })
        }
        Role::Other => Err(unsupported("an absolute or unknown symbol")),
    }
}

/// The offset in its target section a relocation to a section symbol refers to: the addend,
/// plus the 4 bytes a PC-relative field is measured from (the end of a `lea` or `mov`
/// displacement, where a string address is loaded).
fn landing(reloc: &Reloc) -> u64 {
    u64::try_from(offset_into(reloc, reloc.addend)).unwrap_or(0)
}

/// Where a relocation whose target resolved at `addend` from a symbol's start lands in that
/// symbol: a PC-relative field is 4 bytes before the next instruction, which the addend
/// makes up for (`call f` is `f - 4`).
pub(crate) fn offset_into(reloc: &Reloc, addend: i64) -> i64 {
    use object::elf;
    let pc_relative = [
        elf::R_X86_64_PC32,
        elf::R_X86_64_PLT32,
        elf::R_X86_64_GOTPCREL,
        elf::R_X86_64_GOTPCRELX,
        elf::R_X86_64_REX_GOTPCRELX,
    ]
    .iter()
    .any(|t| t.0 == reloc.r_type);
    if pc_relative {
        addend.saturating_add(4)
    } else {
        addend
    }
}

/// The start of the NUL-terminated string of `section` that holds byte `at`.
fn string_start(section: &Section, at: u64) -> u64 {
    let Ok(at) = usize::try_from(at) else {
        return 0;
    };
    let at = at.min(section.data.len());
    section.data[..at]
        .iter()
        .rposition(|&b| b == 0)
        .map_or(0, |nul| nul + 1) as u64
}

/// A description of code or data that two objects share exactly when they mean the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Content {
    pub bytes: Vec<u8>,
    /// Zero-filled (`SHT_NOBITS`): `bytes` is empty and only `size` counts.
    pub zeroed: bool,
    pub size: u64,
    pub relocs: Vec<(u64, u32, Ref)>,
}

/// A relocation target described independently of offsets and symbol indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ref {
    /// By name, at an addend from the symbol.
    Name(String, i64),
    /// Unnamed bytes, at an addend from where the piece starts.
    Bytes(Box<Content>, i64),
    /// Too deep to describe: compared by section name only.
    Opaque(String, i64),
}

/// How deep unnamed data pointing at unnamed data is followed.
const MAX_DEPTH: usize = 6;

/// Describes the bytes `[start, start + size)` of `section` with the relocations inside.
pub(crate) fn content(
    unit: &Unit,
    section: &Section,
    start: u64,
    size: u64,
    depth: usize,
) -> Result<Content, BuildError> {
    let end = start.saturating_add(size);
    let bytes = if section.nobits {
        Vec::new()
    } else {
        let lo = usize::try_from(start)
            .unwrap_or(usize::MAX)
            .min(section.data.len());
        let hi = usize::try_from(end)
            .unwrap_or(usize::MAX)
            .min(section.data.len());
        section.data[lo..hi].to_vec()
    };
    let mut relocs = Vec::new();
    for reloc in section
        .relocs
        .iter()
        .filter(|r| r.offset >= start && r.offset < end)
    {
        let what = format!("{}+{:#x}", section.name, reloc.offset);
        let target = target(unit, reloc, &what)?;
        relocs.push((
            reloc.offset - start,
            reloc.r_type,
            describe(unit, &target, depth)?,
        ));
    }
    Ok(Content {
        bytes,
        zeroed: section.nobits,
        size: end - start,
        relocs,
    })
}

/// Describes a relocation target.
pub(crate) fn describe(unit: &Unit, target: &Target, depth: usize) -> Result<Ref, BuildError> {
    Ok(match *target {
        Target::Named { symbol, addend } | Target::External { symbol, addend } => {
            Ref::Name(unit.symbols[symbol].name.clone(), addend)
        }
        Target::Unnamed {
            section,
            addend,
            piece,
        } => {
            let s = unit.section(section).expect("checked by target()");
            if depth >= MAX_DEPTH {
                return Ok(Ref::Opaque(s.name.clone(), addend));
            }
            let (start, size) = match piece {
                Piece::Whole => (0, s.size),
                Piece::String(at) => {
                    let tail = s.data.get(at as usize..).unwrap_or(&[]);
                    let len = tail
                        .iter()
                        .position(|&b| b == 0)
                        .map_or(tail.len(), |n| n + 1);
                    (at, len as u64)
                }
                Piece::Entry(at) => (at, s.entsize),
                Piece::Span(at, size) => (at, size),
            };
            let mut content = content(unit, s, start, size, depth + 1)?;
            forget_panic_line(&mut content);
            Ref::Bytes(Box::new(content), addend - start as i64)
        }
    })
}

/// The description of the function or variable `symbol`: its bytes with what each relocation
/// in them refers to. A function is its whole section (`-ffunction-sections`).
pub(crate) fn describe_symbol(unit: &Unit, symbol: usize) -> Result<Content, BuildError> {
    let s = &unit.symbols[symbol];
    let section = unit
        .section(s.section.expect("defined"))
        .expect("defined in a loaded section");
    if s.role == Role::Function {
        content(unit, section, 0, section.size, 0)
    } else {
        content(unit, section, s.value, s.size, 0)
    }
}

/// Size of rustc's `core::panic::Location`: the file name (pointer and length), line and
/// column as two `u32`.
const LOCATION_SIZE: usize = 24;

/// A Rust panic location (`core::panic::Location`, the file, line and column an `unwrap`,
/// an index or an overflow check reports) is described without its line and column.
///
/// A fix that adds or removes lines moves the locations of every function below it in the
/// file; those functions did not change, and the program's versions of them report the lines
/// of the source the program was built from, which is right for them. A function that did
/// change carries FIXED.o's locations in the patch. Recognised by shape: 24 bytes of
/// unnamed read-only data whose only relocation is an absolute pointer at its start to a
/// string that ends in `.rs`, with the string's length after it.
fn forget_panic_line(content: &mut Content) {
    use object::elf;
    if content.zeroed || content.bytes.len() != LOCATION_SIZE || content.relocs.len() != 1 {
        return;
    }
    let (offset, r_type, Ref::Bytes(file, 0)) = &content.relocs[0] else {
        return;
    };
    if *offset != 0 || *r_type != elf::R_X86_64_64.0 || !file.relocs.is_empty() {
        return;
    }
    let name = file.bytes.strip_suffix(&[0]).unwrap_or(&file.bytes);
    let length = u64::from_le_bytes(content.bytes[8..16].try_into().expect("24 bytes"));
    let counted = [name.len() as u64, file.bytes.len() as u64];
    if name.ends_with(b".rs") && counted.contains(&length) {
        content.bytes[16..LOCATION_SIZE].fill(0);
    }
}
