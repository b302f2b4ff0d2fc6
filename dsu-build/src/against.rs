//! Against: check that the program runs the code ORIGINAL.o describes, function by function,
//! before a patch built from it replaces that code (Ksplice's run-pre matching, in spirit).
//!
//! Each replaced function is looked up in the program's symbol table (a `static` one after
//! the program's `STT_FILE` symbol of ORIGINAL.o's file) and its bytes compared with
//! ORIGINAL.o's, the bytes the linker fills in or rewrites (relocated fields, relaxed GOT and
//! TLS sequences) excepted. A patch built from other sources, other flags or another
//! compiler than the program is refused.

use object::elf;
use object::read::elf::ElfFile64;
use object::{Endianness, Object, ObjectSection, ObjectSymbol, SymbolKind};

use crate::error::BuildError;
use crate::read::{self, Unit};

/// Whether a program (an executable or shared library file) defines any of `functions`
/// (named as in a built patch's summary). `static` ones count in ORIGINAL.o's file only.
pub fn defines_any(original: &[u8], program: &[u8], functions: &[String]) -> bool {
    let Ok(original) = read::parse("ORIGINAL.o", original) else {
        return false;
    };
    let Ok(file) = ElfFile64::<Endianness>::parse(program) else {
        return false;
    };
    functions
        .iter()
        .any(|f| find(&file, original.file.as_deref(), f).is_some())
}

/// Checks each of `functions` (the names a built patch replaces) in `program`, the bytes of
/// the executable or shared library that holds them; `label` names it in errors.
pub fn check(
    original: &[u8],
    program: &[u8],
    label: &str,
    functions: &[String],
) -> Result<(), BuildError> {
    let original = read::parse("ORIGINAL.o", original)?;
    let file = ElfFile64::<Endianness>::parse(program).map_err(|e| BuildError::NotObject {
        object: label.to_string(),
        reason: e.to_string(),
    })?;
    for name in functions {
        let Some(expected) = original_code(&original, name) else {
            continue; // new in FIXED.o: nothing to match
        };
        let found = find(&file, original.file.as_deref(), name).ok_or_else(|| {
            BuildError::NotInProgram {
                symbol: name.clone(),
                program: label.to_string(),
            }
        })?;
        if let Some(offset) = first_difference(&expected, &found) {
            return Err(BuildError::ProgramDiffers {
                symbol: name.clone(),
                program: label.to_string(),
                offset,
            });
        }
    }
    Ok(())
}

/// ORIGINAL.o's bytes of `name`, and which of them the linker may change.
fn original_code(unit: &Unit, name: &str) -> Option<(Vec<u8>, Vec<bool>)> {
    let symbol = unit
        .symbols
        .iter()
        .find(|s| s.name == name && s.role == read::Role::Function)?;
    let section = unit.section(symbol.section?)?;
    let start = symbol.value as usize;
    let end = start.checked_add(symbol.size as usize)?;
    let bytes = section.data.get(start..end)?.to_vec();
    let mut linked = vec![false; bytes.len()];
    for r in &section.relocs {
        let (before, width) = linked_bytes(r.r_type);
        let at = r.offset as i64 - start as i64;
        for i in (at - before)..(at + width) {
            if let Some(m) = usize::try_from(i).ok().and_then(|i| linked.get_mut(i)) {
                *m = true;
            }
        }
    }
    Some((bytes, linked))
}

/// Bytes before a relocated field the linker may rewrite (relaxations), and the field's width
/// (and what follows it in a relaxed sequence).
fn linked_bytes(r_type: u32) -> (i64, i64) {
    match elf::RelocationType(r_type) {
        elf::R_X86_64_64 | elf::R_X86_64_PC64 | elf::R_X86_64_GOTOFF64 | elf::R_X86_64_DTPOFF64 => {
            (0, 8)
        }
        // mov/call/jmp/binop through the GOT become lea/direct/immediate forms: prefix,
        // opcode and ModRM change.
        elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX | elf::R_X86_64_GOTPCREL => (3, 4),
        elf::R_X86_64_GOTTPOFF => (3, 4),
        // General and local dynamic TLS sequences: the 16 bytes around the call.
        elf::R_X86_64_TLSGD | elf::R_X86_64_TLSLD => (4, 12),
        _ => (0, 4),
    }
}

/// The program's bytes of `name`: a global definition, or a local one after `file`'s
/// `STT_FILE` symbol.
fn find(file: &ElfFile64<'_, Endianness>, source: Option<&str>, name: &str) -> Option<Vec<u8>> {
    let mut in_file = false;
    let mut global = None;
    let mut local = None;
    for symbol in file.symbols() {
        let raw = symbol.elf_symbol();
        if raw.st_type() == elf::STT_FILE {
            in_file = source.is_some_and(|s| symbol.name() == Ok(s));
            continue;
        }
        if symbol.kind() != SymbolKind::Text || symbol.name() != Ok(name) || symbol.is_undefined() {
            continue;
        }
        if raw.st_bind() == elf::STB_LOCAL {
            if in_file && local.is_none() {
                local = Some(symbol);
            }
        } else if global.is_none() {
            global = Some(symbol);
        }
    }
    let symbol = local.or(global)?;
    let section = file.section_by_index(symbol.section_index()?).ok()?;
    let data = section.data_range(symbol.address(), symbol.size()).ok()??;
    Some(data.to_vec())
}

/// Where the program's code differs from ORIGINAL.o's, outside the linker's bytes.
fn first_difference((expected, linked): &(Vec<u8>, Vec<bool>), found: &[u8]) -> Option<u64> {
    if expected.len() != found.len() {
        return Some(expected.len().min(found.len()) as u64);
    }
    (0..expected.len())
        .find(|&i| !linked[i] && expected[i] != found[i])
        .map(|i| i as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linked_bytes_do_not_count_as_differences() {
        let expected = (
            vec![0xe8, 0, 0, 0, 0, 0xc3],
            vec![false, true, true, true, true, false],
        );
        assert_eq!(first_difference(&expected, &[0xe8, 1, 2, 3, 4, 0xc3]), None);
        assert_eq!(
            first_difference(&expected, &[0xe8, 1, 2, 3, 4, 0xc2]),
            Some(5)
        );
        assert_eq!(first_difference(&expected, &[0xe8, 1, 2, 3, 4]), Some(5));
    }

    #[test]
    fn relaxable_got_loads_cover_their_opcode() {
        assert_eq!(linked_bytes(elf::R_X86_64_REX_GOTPCRELX.0), (3, 4));
        assert_eq!(linked_bytes(elf::R_X86_64_PLT32.0), (0, 4));
        assert_eq!(linked_bytes(elf::R_X86_64_64.0), (0, 8));
    }

    #[test]
    fn garbage_programs_are_errors() {
        assert!(!defines_any(b"", b"", &["f".into()]));
        assert!(check(b"", b"", "prog", &["f".into()]).is_err());
    }
}
