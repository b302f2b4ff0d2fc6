//! Read: one object file into owned sections, symbols and relocations, indexed as in the ELF
//! file, with each symbol given the role it plays in a comparison.

use object::elf;
use object::read::elf::{ElfFile64, FileHeader, SectionHeader, Sym};
use object::{
    Architecture, Endianness, Object, ObjectKind, ObjectSection, ObjectSymbol, RelocationFlags,
    RelocationTarget,
};

use crate::error::BuildError;

/// One section of an object, with the relocations that apply to it.
#[derive(Debug, Clone)]
pub(crate) struct Section {
    pub name: String,
    /// Contents; empty for `SHT_NOBITS`.
    pub data: Vec<u8>,
    pub size: u64,
    pub align: u64,
    pub nobits: bool,
    pub flags: u64,
    pub entsize: u64,
    pub relocs: Vec<Reloc>,
}

impl Section {
    pub fn is_code(&self) -> bool {
        self.flags & elf::SHF_EXECINSTR.0 != 0
    }
    pub fn is_writable(&self) -> bool {
        self.flags & elf::SHF_WRITE.0 != 0
    }
    pub fn is_strings(&self) -> bool {
        let merge_strings = elf::SHF_MERGE.0 | elf::SHF_STRINGS.0;
        self.flags & merge_strings == merge_strings
    }
    pub fn is_merge(&self) -> bool {
        self.flags & elf::SHF_MERGE.0 != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reloc {
    pub offset: u64,
    pub r_type: u32,
    /// ELF symbol index.
    pub symbol: usize,
    pub addend: i64,
}

/// What a symbol is to the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A defined function: compared by name, replaced or referred to by name.
    Function,
    /// A defined variable or constant the source names (globals, statics, static locals
    /// such as `count.1`): its identity is the program's; referred to by name.
    Data,
    /// A defined thread-local variable.
    ThreadLocal,
    /// A constant the compiler made (`CSWTCH.N`, `__func__.N`): no identity, compared by
    /// content and copied into the patch.
    Constant,
    /// An assembler label (`.LC0`) or other unnamed place: compared by content.
    Label,
    /// A section symbol.
    Section,
    /// Defined nowhere in this object: the program's.
    Undefined,
    /// `SHN_COMMON` (`-fcommon`): the program's, by name.
    Common,
    /// File names, absolute symbols and anything else.
    Other,
}

#[derive(Debug, Clone)]
pub(crate) struct Symbol {
    pub name: String,
    pub role: Role,
    pub local: bool,
    pub section: Option<usize>,
    pub value: u64,
    pub size: u64,
}

/// An object file as the comparison sees it.
#[derive(Debug, Clone)]
pub(crate) struct Unit {
    /// `ORIGINAL.o` or `FIXED.o`, for messages.
    pub label: &'static str,
    /// The name of the object's `STT_FILE` symbol, as the compiler wrote it.
    pub file: Option<String>,
    /// By ELF section index; `None` for the null section and relocation sections.
    pub sections: Vec<Option<Section>>,
    /// By ELF symbol index (0 is the null symbol).
    pub symbols: Vec<Symbol>,
}

impl Unit {
    pub fn section(&self, index: usize) -> Option<&Section> {
        self.sections.get(index).and_then(Option::as_ref)
    }

    /// Contents of a named section, if present.
    pub fn section_named(&self, name: &str) -> Option<&Section> {
        self.sections.iter().flatten().find(|s| s.name == name)
    }

    /// Symbols of the given role defined in section `index`, lowest address first.
    pub fn defined_in(&self, index: usize, roles: &[Role]) -> Vec<usize> {
        let mut found: Vec<usize> = (0..self.symbols.len())
            .filter(|&i| {
                let s = &self.symbols[i];
                s.section == Some(index) && roles.contains(&s.role)
            })
            .collect();
        found.sort_by_key(|&i| self.symbols[i].value);
        found
    }

    fn not_object(&self, reason: impl Into<String>) -> BuildError {
        BuildError::NotObject {
            object: self.label.to_string(),
            reason: reason.into(),
        }
    }
}

/// Names of constants the compiler creates, which no source names and no other file refers
/// to: switch tables and `__func__` strings.
const COMPILER_CONSTANTS: [&str; 4] = [
    "CSWTCH.",
    "__func__.",
    "__PRETTY_FUNCTION__.",
    "__FUNCTION__.",
];

/// Whether `name` is a constant or label the compiler made without a source name: an
/// assembler-local label (`.LC0`, rustc's `.Lanon.HASH.N` and `.L__unnamed_N`) or rustc's
/// `anon.HASH.N`. Their names are not stable between two builds (the numbers shift with the
/// source), so they are compared by the bytes they label.
fn is_anonymous(name: &str) -> bool {
    if name.starts_with(".L") {
        return true;
    }
    let Some(rest) = name.strip_prefix("anon.") else {
        return false;
    };
    let Some((hash, number)) = rest.split_once('.') else {
        return false;
    };
    !hash.is_empty()
        && hash.bytes().all(|b| b.is_ascii_hexdigit())
        && !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
}

/// Largest section alignment taken (as the agent's loader).
const MAX_ALIGN: u64 = 1 << 16;
/// Largest zero-filled section taken: far above a compiler's, and it keeps sizes summed
/// while writing the patch from overflowing.
const MAX_ZEROED: u64 = 1 << 32;

/// Parses `data`, an ELF64 x86_64 relocatable object; `label` names it in errors.
pub(crate) fn parse(label: &'static str, data: &[u8]) -> Result<Unit, BuildError> {
    let mut unit = Unit {
        label,
        file: None,
        sections: Vec::new(),
        symbols: Vec::new(),
    };
    let file = ElfFile64::<Endianness>::parse(data).map_err(|e| unit.not_object(e.to_string()))?;
    if file.architecture() != Architecture::X86_64 {
        return Err(unit.not_object(format!(
            "built for {:?}; dsu patches are x86_64",
            file.architecture()
        )));
    }
    if file.kind() != ObjectKind::Relocatable {
        return Err(unit
            .not_object("not a relocatable object; pass the .o files the compiler wrote (cc -c)"));
    }
    let endian = file.endian();

    let count = file.elf_section_table().len();
    unit.sections = vec![None; count];
    for section in file.sections() {
        let header = section.elf_section_header();
        let sh_type = header.sh_type(endian);
        if matches!(
            sh_type,
            elf::SHT_RELA | elf::SHT_REL | elf::SHT_SYMTAB | elf::SHT_STRTAB
        ) {
            continue;
        }
        let name = section
            .name()
            .map_err(|e| unit.not_object(e.to_string()))?
            .to_string();
        let nobits = sh_type == elf::SHT_NOBITS;
        let data = if nobits {
            Vec::new()
        } else {
            section
                .data()
                .map_err(|e| unit.not_object(format!("section {name}: {e}")))?
                .to_vec()
        };
        let mut relocs = Vec::new();
        for (offset, reloc) in section.relocations() {
            let RelocationFlags::Elf { r_type } = reloc.flags() else {
                return Err(
                    unit.not_object(format!("section {name}: a relocation that is not ELF"))
                );
            };
            if r_type == elf::R_X86_64_NONE {
                continue;
            }
            let symbol = match reloc.target() {
                RelocationTarget::Symbol(index) => index.0,
                _ => {
                    return Err(unit.not_object(format!(
                        "section {name}: relocation at {offset:#x} has no symbol"
                    )));
                }
            };
            relocs.push(Reloc {
                offset,
                r_type: r_type.0,
                symbol,
                addend: reloc.addend(),
            });
        }
        relocs.sort_by_key(|r| r.offset);
        let index = section.index().0;
        let align = header.sh_addralign(endian).max(1);
        if !align.is_power_of_two() || align > MAX_ALIGN {
            return Err(unit.not_object(format!("section {name} has an invalid alignment {align}")));
        }
        let size = header.sh_size(endian);
        if nobits && size > MAX_ZEROED {
            return Err(unit.not_object(format!(
                "section {name} is {size} bytes of zeroes, over the limit of {MAX_ZEROED}"
            )));
        }
        unit.sections[index] = Some(Section {
            name,
            data,
            size,
            align,
            nobits,
            flags: header.sh_flags(endian).0,
            entsize: header.sh_entsize(endian),
            relocs,
        });
    }

    let table = file.elf_symbol_table();
    unit.symbols = vec![
        Symbol {
            name: String::new(),
            role: Role::Other,
            local: true,
            section: None,
            value: 0,
            size: 0,
        };
        table.len()
    ];
    for symbol in file.symbols() {
        let raw = symbol.elf_symbol();
        let name = symbol.name().unwrap_or("").to_string();
        let section = symbol.section_index().map(|i| i.0);
        let shndx = raw.st_shndx(endian);
        let local = raw.st_bind() == elf::STB_LOCAL;
        let present = section.and_then(|i| unit.section(i));
        let writable = present.is_some_and(Section::is_writable);
        let role = match raw.st_type() {
            elf::STT_FILE => {
                if unit.file.is_none() {
                    unit.file = Some(name.clone());
                }
                Role::Other
            }
            elf::STT_SECTION => Role::Section,
            _ if shndx == elf::SHN_UNDEF => Role::Undefined,
            _ if shndx == elf::SHN_COMMON => Role::Common,
            _ if present.is_none() => Role::Other,
            elf::STT_FUNC | elf::STT_GNU_IFUNC => Role::Function,
            elf::STT_TLS => Role::ThreadLocal,
            elf::STT_OBJECT
                if local && !writable && COMPILER_CONSTANTS.iter().any(|p| name.starts_with(p)) =>
            {
                Role::Constant
            }
            elf::STT_OBJECT if local && is_anonymous(&name) => Role::Label,
            elf::STT_OBJECT => Role::Data,
            // Unnamed places, and local labels such as rustc's `GCC_except_table4` (the
            // exception table an FDE points at): compared by what they label.
            elf::STT_NOTYPE if local => Role::Label,
            _ if local && (name.is_empty() || name.starts_with(".L")) => Role::Label,
            _ => Role::Other,
        };
        unit.symbols[symbol.index().0] = Symbol {
            name,
            role,
            local,
            section,
            value: raw.st_value(endian),
            size: raw.st_size(endian),
        };
    }
    for section in unit.sections.iter().flatten() {
        if let Some(reloc) = section
            .relocs
            .iter()
            .find(|r| r.symbol >= unit.symbols.len())
        {
            return Err(unit.not_object(format!(
                "section {}: relocation at {:#x} refers to symbol #{}, beyond the symbol table",
                section.name, reloc.offset, reloc.symbol
            )));
        }
    }
    check_header(&unit, file.elf_header().e_type(endian))?;
    Ok(unit)
}

fn check_header(unit: &Unit, e_type: elf::FileType) -> Result<(), BuildError> {
    if e_type != elf::ET_REL {
        return Err(unit.not_object("not a relocatable object (ET_REL)"));
    }
    Ok(())
}
