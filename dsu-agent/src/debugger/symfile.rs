//! The symfile of a patch: a small ELF64 relocatable object that tells a debugger what lies in
//! the patch's code, built in memory. Pure: no system calls.
//!
//! ```text
//! file header
//! .eh_frame bytes      (copy of the patch's relocated unwind tables)
//! .symtab, .strtab     (one global function symbol per named range of new code)
//! .shstrtab
//! section headers      null, .text, [.eh_frame], .symtab, .strtab, .shstrtab
//! ```
//!
//! `.text` occupies no bytes in the file (`SHT_NOBITS`): its `sh_addr` is where the code lives
//! in the process, and symbol values are offsets into it, as in any relocatable object. A
//! debugger takes every allocated section's `sh_addr` as its address, so the symbols land on
//! the new code. `.eh_frame` keeps the address it has in the process: its pc-relative
//! pointers, already relocated there, stay right.

use thiserror::Error;

use super::elf::*;

/// One named range of code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Function<'a> {
    pub name: &'a str,
    pub address: usize,
    pub size: u64,
}

/// What the symfile describes.
#[derive(Debug, Clone, Copy)]
pub struct Contents<'a> {
    /// The code range `[start, end)` every function lies in.
    pub text: (usize, usize),
    pub functions: &'a [Function<'a>],
    /// The unwind tables: where they are in the process, and their bytes.
    pub eh_frame: Option<(usize, &'a [u8])>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SymfileError {
    #[error(
        "function {name} at {address:#x} ({size} bytes) lies outside the code {start:#x}..{end:#x}"
    )]
    OutsideText {
        name: String,
        address: usize,
        size: u64,
        start: usize,
        end: usize,
    },
    #[error("function name {name:?} holds a NUL byte")]
    NulInName { name: String },
    #[error("the symbol names take more than 4 GiB")]
    TooManyNames,
}

/// One section header's fields.
struct Section {
    name: u32,
    kind: u32,
    flags: u64,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
    info: u32,
    align: u64,
    entsize: u64,
}

/// Builds the symfile of `contents`.
pub fn build(contents: &Contents<'_>) -> Result<Vec<u8>, SymfileError> {
    let (start, end) = contents.text;
    let mut strtab = vec![0u8];
    let mut symtab = vec![0u8; SYM_SIZE]; // the null symbol
    for f in contents.functions {
        let inside = f.address >= start
            && (f.address as u64)
                .checked_add(f.size)
                .is_some_and(|e| e <= end as u64);
        if !inside {
            return Err(SymfileError::OutsideText {
                name: f.name.to_string(),
                address: f.address,
                size: f.size,
                start,
                end,
            });
        }
        if f.name.contains('\0') {
            return Err(SymfileError::NulInName {
                name: f.name.to_string(),
            });
        }
        let name = u32::try_from(strtab.len()).map_err(|_| SymfileError::TooManyNames)?;
        strtab.extend_from_slice(f.name.as_bytes());
        strtab.push(0);
        symtab.extend_from_slice(&symbol(name, TEXT, (f.address - start) as u64, f.size));
    }
    u32::try_from(strtab.len()).map_err(|_| SymfileError::TooManyNames)?;

    let mut names = Names::default();
    let mut out = vec![0u8; EHDR_SIZE];
    let mut sections = vec![Section {
        name: 0,
        kind: 0,
        flags: 0,
        addr: 0,
        offset: 0,
        size: 0,
        link: 0,
        info: 0,
        align: 0,
        entsize: 0,
    }];
    sections.push(Section {
        name: names.add(".text"),
        kind: SHT_NOBITS,
        flags: SHF_ALLOC | SHF_EXECINSTR,
        addr: start as u64,
        offset: out.len() as u64,
        size: (end - start) as u64,
        link: 0,
        info: 0,
        align: 16,
        entsize: 0,
    });
    if let Some((at, bytes)) = contents.eh_frame {
        let offset = append_aligned(&mut out, bytes, 8);
        sections.push(Section {
            name: names.add(".eh_frame"),
            kind: SHT_PROGBITS,
            flags: SHF_ALLOC,
            addr: at as u64,
            offset,
            size: bytes.len() as u64,
            link: 0,
            info: 0,
            align: 8,
            entsize: 0,
        });
    }
    let symtab_index = sections.len() as u32;
    let offset = append_aligned(&mut out, &symtab, 8);
    sections.push(Section {
        name: names.add(".symtab"),
        kind: SHT_SYMTAB,
        flags: 0,
        addr: 0,
        offset,
        size: symtab.len() as u64,
        link: symtab_index + 1, // .strtab, next
        info: 1,                // the first global symbol: all but the null one are global
        align: 8,
        entsize: SYM_SIZE as u64,
    });
    let offset = append_aligned(&mut out, &strtab, 1);
    sections.push(Section {
        name: names.add(".strtab"),
        kind: SHT_STRTAB,
        flags: 0,
        addr: 0,
        offset,
        size: strtab.len() as u64,
        link: 0,
        info: 0,
        align: 1,
        entsize: 0,
    });
    let shstrtab_name = names.add(".shstrtab");
    let offset = append_aligned(&mut out, &names.0, 1);
    sections.push(Section {
        name: shstrtab_name,
        kind: SHT_STRTAB,
        flags: 0,
        addr: 0,
        offset,
        size: names.0.len() as u64,
        link: 0,
        info: 0,
        align: 1,
        entsize: 0,
    });

    let shoff = append_aligned(&mut out, &[], 8);
    for s in &sections {
        out.extend_from_slice(&section_header(s));
    }
    let count = sections.len() as u16;
    out[..EHDR_SIZE].copy_from_slice(&file_header(shoff, count, count - 1));
    Ok(out)
}

/// Index of `.text`, the section every symbol is defined in.
const TEXT: u16 = 1;

/// The section name table being built.
#[derive(Default)]
struct Names(Vec<u8>);

impl Names {
    fn add(&mut self, name: &str) -> u32 {
        if self.0.is_empty() {
            self.0.push(0);
        }
        let at = self.0.len() as u32;
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(0);
        at
    }
}

/// Appends `bytes` at the next multiple of `align`; returns where they start.
fn append_aligned(out: &mut Vec<u8>, bytes: &[u8], align: usize) -> u64 {
    out.resize(out.len().next_multiple_of(align), 0);
    let at = out.len() as u64;
    out.extend_from_slice(bytes);
    at
}

fn file_header(shoff: u64, shnum: u16, shstrndx: u16) -> [u8; EHDR_SIZE] {
    let mut h = [0u8; EHDR_SIZE];
    h[0..16].copy_from_slice(&IDENT);
    h[16..18].copy_from_slice(&ET_REL.to_le_bytes());
    h[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    h[20..24].copy_from_slice(&EV_CURRENT.to_le_bytes());
    // e_entry (24..32) and e_phoff (32..40) are zero: no entry, no program headers.
    h[40..48].copy_from_slice(&shoff.to_le_bytes());
    // e_flags (48..52) is zero.
    h[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    // e_phentsize (54..56) and e_phnum (56..58) are zero.
    h[58..60].copy_from_slice(&(SHDR_SIZE as u16).to_le_bytes());
    h[60..62].copy_from_slice(&shnum.to_le_bytes());
    h[62..64].copy_from_slice(&shstrndx.to_le_bytes());
    h
}

fn section_header(s: &Section) -> [u8; SHDR_SIZE] {
    let mut h = [0u8; SHDR_SIZE];
    h[0..4].copy_from_slice(&s.name.to_le_bytes());
    h[4..8].copy_from_slice(&s.kind.to_le_bytes());
    h[8..16].copy_from_slice(&s.flags.to_le_bytes());
    h[16..24].copy_from_slice(&s.addr.to_le_bytes());
    h[24..32].copy_from_slice(&s.offset.to_le_bytes());
    h[32..40].copy_from_slice(&s.size.to_le_bytes());
    h[40..44].copy_from_slice(&s.link.to_le_bytes());
    h[44..48].copy_from_slice(&s.info.to_le_bytes());
    h[48..56].copy_from_slice(&s.align.to_le_bytes());
    h[56..64].copy_from_slice(&s.entsize.to_le_bytes());
    h
}

/// A global function symbol.
fn symbol(name: u32, section: u16, value: u64, size: u64) -> [u8; SYM_SIZE] {
    let mut s = [0u8; SYM_SIZE];
    s[0..4].copy_from_slice(&name.to_le_bytes());
    s[4] = GLOBAL_FUNC;
    // st_other (5) is zero: default visibility.
    s[6..8].copy_from_slice(&section.to_le_bytes());
    s[8..16].copy_from_slice(&value.to_le_bytes());
    s[16..24].copy_from_slice(&size.to_le_bytes());
    s
}

#[cfg(test)]
mod tests {
    use object::read::elf::ElfFile64;
    use object::{Object, ObjectSection, ObjectSymbol, SectionFlags, SymbolKind};

    use super::*;

    const TEXT_AT: usize = 0x7f00_1234_0000;
    const EH_AT: usize = 0x7f00_1234_2000;

    fn functions() -> [Function<'static>; 2] {
        [
            Function {
                name: "price",
                address: TEXT_AT + 0x10,
                size: 0x30,
            },
            Function {
                name: "_RNvCs1234_5crate6helper",
                address: TEXT_AT + 0x40,
                size: 8,
            },
        ]
    }

    #[test]
    fn the_object_reader_finds_sections_and_symbols_where_the_code_lives() {
        let eh = [
            0x14u8, 0, 0, 0, 0, 0, 0, 0, 1, b'z', b'R', 0, 1, 0x78, 0x10, 1, 0x1b, 0xc, 7, 8,
        ];
        let functions = functions();
        let bytes = build(&Contents {
            text: (TEXT_AT, TEXT_AT + 0x100),
            functions: &functions,
            eh_frame: Some((EH_AT, &eh)),
        })
        .unwrap();
        let file = ElfFile64::<object::LittleEndian>::parse(&bytes[..]).unwrap();
        assert_eq!(file.architecture(), object::Architecture::X86_64);
        assert_eq!(file.kind(), object::ObjectKind::Relocatable);

        let text = file.section_by_name(".text").unwrap();
        assert_eq!(text.address(), TEXT_AT as u64);
        assert_eq!(text.size(), 0x100);
        assert_eq!(
            text.flags(),
            SectionFlags::Elf {
                sh_type: object::elf::SectionType(SHT_NOBITS),
                sh_flags: object::elf::SectionFlags(SHF_ALLOC | SHF_EXECINSTR),
            }
        );
        assert!(text.data().unwrap().is_empty(), "SHT_NOBITS");
        let eh_frame = file.section_by_name(".eh_frame").unwrap();
        assert_eq!(eh_frame.address(), EH_AT as u64);
        assert_eq!(eh_frame.data().unwrap(), &eh);

        let symbols: Vec<_> = file.symbols().collect();
        assert_eq!(symbols.len(), 2);
        for (s, f) in symbols.iter().zip(&functions) {
            assert_eq!(s.name().unwrap(), f.name);
            assert_eq!(s.kind(), SymbolKind::Text);
            assert!(s.is_global());
            assert_eq!(s.section_index(), Some(text.index()));
            // Relocatable: the value is the offset in the section.
            assert_eq!(text.address() + s.address(), f.address as u64);
            assert_eq!(s.size(), f.size);
        }
    }

    #[test]
    fn without_unwind_tables_there_is_no_eh_frame_section() {
        let bytes = build(&Contents {
            text: (TEXT_AT, TEXT_AT + 0x100),
            functions: &functions(),
            eh_frame: None,
        })
        .unwrap();
        let file = ElfFile64::<object::LittleEndian>::parse(&bytes[..]).unwrap();
        assert!(file.section_by_name(".eh_frame").is_none());
        assert_eq!(file.symbols().count(), 2);
        assert_eq!(file.section_by_name(".text").unwrap().index().0, 1);
    }

    #[test]
    fn a_function_outside_the_code_is_refused() {
        let functions = functions();
        let err = build(&Contents {
            text: (TEXT_AT, TEXT_AT + 0x40),
            functions: &functions,
            eh_frame: None,
        })
        .unwrap_err();
        assert!(
            matches!(err, SymfileError::OutsideText { ref name, .. } if name == "_RNvCs1234_5crate6helper"),
            "{err}"
        );
        let bad = [Function {
            name: "a\0b",
            address: TEXT_AT,
            size: 1,
        }];
        let err = build(&Contents {
            text: (TEXT_AT, TEXT_AT + 0x40),
            functions: &bad,
            eh_frame: None,
        })
        .unwrap_err();
        assert!(matches!(err, SymfileError::NulInName { .. }));
    }

    #[test]
    fn the_header_fields_are_at_their_offsets() {
        let bytes = build(&Contents {
            text: (TEXT_AT, TEXT_AT),
            functions: &[],
            eh_frame: None,
        })
        .unwrap();
        assert_eq!(&bytes[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([bytes[16], bytes[17]]), ET_REL);
        assert_eq!(u16::from_le_bytes([bytes[18], bytes[19]]), EM_X86_64);
        let shoff = u64::from_le_bytes(bytes[40..48].try_into().unwrap()) as usize;
        let shnum = u16::from_le_bytes([bytes[60], bytes[61]]) as usize;
        assert_eq!(shnum, 5);
        assert_eq!(shoff % 8, 0);
        assert_eq!(bytes.len(), shoff + shnum * SHDR_SIZE);
    }
}
