//! Load: parse a patch file (an ELF64 x86_64 relocatable object) into owned sections, symbols
//! and relocations, refusing anything else with a precise reason.
//!
//! Pure: no syscalls, so it can be fuzzed. Nothing here decides addresses; `place` and
//! `relocate` do.

use object::elf;
use object::read::elf::{FileHeader, Rela as _, SectionHeader, Sym};
use object::{Endianness, SectionIndex};
use thiserror::Error;

/// Why a patch file was refused before anything was mapped.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LoadError {
    #[error("not an ELF file (the file starts with {found:02x?}, expected 7f 45 4c 46)")]
    NotElf { found: Vec<u8> },
    #[error("32-bit ELF object; dsu patches must be ELF64 x86_64 (build with a 64-bit compiler)")]
    Elf32,
    #[error("big-endian ELF object; dsu patches must be little-endian x86_64")]
    BigEndian,
    #[error("ELF object for {machine} (e_machine {code}); dsu patches must be x86_64")]
    WrongMachine { machine: &'static str, code: u16 },
    #[error(
        "ELF file is {kind}, not a relocatable object; build the patch with `cc -c -fPIC` or `rustc --emit=obj`"
    )]
    NotRelocatable { kind: &'static str },
    #[error("malformed ELF object: {0}")]
    Malformed(String),
    #[error("section {section} is truncated or out of the file's bounds")]
    Truncated { section: String },
    #[error("section {section} is compressed; build the patch without compressed sections")]
    Compressed { section: String },
    #[error(
        "section {section} defines thread-local storage; a patch cannot add thread-local variables"
    )]
    ThreadLocalSection { section: String },
    #[error(
        "relocation section {section} relocates {target}, a zeroed section (SHT_NOBITS) that has no bytes to relocate"
    )]
    RelocatesZeroed { section: String, target: String },
    #[error("section {section} uses REL relocations; x86_64 objects use RELA")]
    RelRelocations { section: String },
    #[error("the object has no symbol table")]
    NoSymbolTable,
    #[error(
        "symbol {symbol} ({offset:#x}, {size} bytes) lies outside its section {section} ({section_size:#x} bytes)"
    )]
    SymbolOutsideSection {
        symbol: String,
        section: String,
        offset: u64,
        size: u64,
        section_size: u64,
    },
    #[error("common symbol {symbol} has an invalid alignment {align}")]
    CommonAlignment { symbol: String, align: u64 },
    #[error(
        "the patch needs {size} bytes of memory, over the limit of {limit} bytes for one patch"
    )]
    TooLarge { size: u64, limit: u64 },
    #[error("function {symbol} is an indirect function (IFUNC); a patch cannot define one")]
    IndirectFunction { symbol: String },
    #[error(
        "section {section} holds constructors or destructors, which dsu does not run; initialise state on first use instead"
    )]
    Constructors { section: String },
    #[error(
        "the object defines no function{}",
        if *.lto {
            ": it holds link-time-optimisation intermediate code (.gnu.lto_*/.llvmbc), not \
             machine code; compile the patch without -flto (or with -ffat-lto-objects)"
        } else {
            "; a patch holds the new versions compiled to machine code (`cc -c -fPIC`, \
             `rustc --emit=obj`); in Rust, give each function #[unsafe(no_mangle)] and make it \
             `pub`, or the compiler drops it as unused"
        }
    )]
    NoFunctions { lto: bool },
}

/// Most memory one patch may occupy: far above any real patch, it keeps a malformed or
/// hostile file from making the process commit gigabytes.
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;

/// What a loaded section holds, which decides where it is placed and its final protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// Instructions: ends read+execute.
    Code,
    /// Constants and strings: ends read-only.
    ReadOnly,
    /// Data that needs relocating but is read-only afterwards (`.data.rel.ro*`).
    RelRo,
    /// Unwind tables: read-only, and registered for unwinding.
    EhFrame,
    /// Writable data.
    Data,
    /// Zero-initialised writable data (`SHT_NOBITS`).
    Bss,
}

impl SectionKind {
    /// Whether the final protection is read-only (not writable, not executable).
    pub fn is_read_only(self) -> bool {
        matches!(self, Self::ReadOnly | Self::RelRo | Self::EhFrame)
    }
}

/// One section of the patch that occupies memory at run time.
#[derive(Debug, Clone)]
pub struct Section {
    /// ELF section index.
    pub index: usize,
    pub name: String,
    pub kind: SectionKind,
    pub align: u64,
    pub size: u64,
    /// Contents; empty for `Bss`.
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    Local,
    Global,
    Weak,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolType {
    Function,
    Object,
    Section,
    ThreadLocal,
    Other,
}

/// Where a patch symbol is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Definition {
    /// Resolved against the running process.
    Undefined,
    /// In a loaded section, at an offset from its start.
    Section {
        section: usize,
        offset: u64,
    },
    /// In a section that is not loaded (debug info, say): usable only by non-loaded sections.
    NotLoaded,
    Absolute(u64),
    /// A common symbol (`-fcommon`): allocated in the patch's zeroed data.
    Common {
        size: u64,
        align: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Symbol {
    pub name: String,
    pub definition: Definition,
    pub kind: SymbolType,
    pub binding: Binding,
    /// Default or protected visibility: seen outside the object.
    pub exported: bool,
    pub size: u64,
}

impl Symbol {
    /// A function that replaces the process's function of the same name, if it has one: global
    /// binding, default or protected visibility, defined in code (BRIEF §4). Weak and hidden
    /// functions are private to the patch.
    pub fn is_replacement_candidate(&self) -> bool {
        self.kind == SymbolType::Function
            && self.binding == Binding::Global
            && self.exported
            && matches!(self.definition, Definition::Section { .. })
    }
}

/// One relocation to apply inside a loaded section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relocation {
    /// ELF index of the section being patched.
    pub section: usize,
    pub offset: u64,
    pub r_type: u32,
    /// Index into `PatchObject::symbols` (0 is the null symbol).
    pub symbol: usize,
    pub addend: i64,
}

/// A parsed patch, all data owned.
#[derive(Debug, Clone)]
pub struct PatchObject {
    pub sections: Vec<Section>,
    pub symbols: Vec<Symbol>,
    pub relocations: Vec<Relocation>,
    /// Names the patch scopes to a `static` of one source file of the program, with that
    /// file's name (its [`SCOPE_SECTION`]), sorted by name.
    pub scopes: Vec<(String, String)>,
}

/// The section in which a patch names the `static` symbols of the program it means, each with
/// its source file: records `NAME\0FILE\0`, FILE as the compiler wrote it in the `STT_FILE`
/// symbol (the source file's base name). `dsu build` writes it, for a patch that refers to or
/// replaces a `static` function or variable whose name other files of the program use too.
pub const SCOPE_SECTION: &str = ".dsu.scope";

impl PatchObject {
    /// The source file whose `static` the patch means by `name`, if it scoped it.
    pub fn scope_of(&self, name: &str) -> Option<&str> {
        self.scopes
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| self.scopes[i].1.as_str())
    }

    pub fn section(&self, index: usize) -> Option<&Section> {
        // Sections are kept in ELF index order: a binary search, not a scan per relocation.
        self.sections
            .binary_search_by_key(&index, |s| s.index)
            .ok()
            .map(|i| &self.sections[i])
    }

    /// Name for messages: the symbol's name, or its section's name for section symbols.
    pub fn symbol_label(&self, symbol: usize) -> String {
        match self.symbols.get(symbol) {
            Some(s) if !s.name.is_empty() => s.name.clone(),
            Some(Symbol {
                definition: Definition::Section { section, .. },
                ..
            }) => self
                .section(*section)
                .map_or_else(|| format!("section #{section}"), |s| s.name.clone()),
            _ => format!("symbol #{symbol}"),
        }
    }

    /// Functions of the patch that may replace process functions.
    pub fn replacement_candidates(&self) -> impl Iterator<Item = (usize, &Symbol)> {
        self.symbols
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_replacement_candidate())
    }
}

type Elf = elf::FileHeader64<Endianness>;

/// Parses and validates a patch file.
pub fn parse(data: &[u8]) -> Result<PatchObject, LoadError> {
    check_ident(data)?;
    let header = Elf::parse(data).map_err(malformed)?;
    let endian = header.endian().map_err(malformed)?;
    check_header(header, endian)?;
    let table = header.sections(endian, data).map_err(malformed)?;

    let mut sections = Vec::new();
    for (index, shdr) in table.enumerate() {
        let name = section_name(&table, endian, shdr);
        if let Some(section) = load_section(index, name, shdr, endian, data)? {
            sections.push(section);
        }
    }
    if !sections.iter().any(|s| s.kind == SectionKind::Code) {
        let lto = table.iter().any(|shdr| {
            let name = section_name(&table, endian, shdr);
            name.starts_with(".gnu.lto_") || name == ".llvmbc" || name == ".llvm.lto"
        });
        return Err(LoadError::NoFunctions { lto });
    }

    let symtab = table
        .symbols(endian, data, elf::SHT_SYMTAB)
        .map_err(malformed)?;
    if symtab.is_empty() {
        return Err(LoadError::NoSymbolTable);
    }
    // Sections are pushed in ELF index order.
    let loaded = |i: usize| sections.binary_search_by_key(&i, |s| s.index).is_ok();
    let mut symbols = Vec::with_capacity(symtab.len());
    for (index, sym) in symtab.enumerate() {
        let name = symtab.symbol_name(endian, sym).map_err(malformed)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let section = symtab
            .symbol_section(endian, sym, index)
            .map_err(malformed)?;
        let symbol = convert_symbol(name, sym, section, endian, &loaded);
        check_symbol(&symbol, &sections)?;
        if sym.st_type() == elf::STT_GNU_IFUNC && symbol.definition != Definition::Undefined {
            return Err(LoadError::IndirectFunction {
                symbol: symbol.name,
            });
        }
        symbols.push(symbol);
    }
    let total = sections.iter().map(|s| s.size).sum::<u64>()
        + symbols
            .iter()
            .map(|s| match s.definition {
                Definition::Common { size, .. } => size,
                _ => 0,
            })
            .sum::<u64>();
    if total > MAX_IMAGE_BYTES {
        return Err(LoadError::TooLarge {
            size: total,
            limit: MAX_IMAGE_BYTES,
        });
    }

    let mut relocations = Vec::new();
    for shdr in table.iter() {
        let sh_type = shdr.sh_type(endian);
        if sh_type != elf::SHT_RELA && sh_type != elf::SHT_REL {
            continue;
        }
        let target = shdr.sh_info(endian) as usize;
        let name = section_name(&table, endian, shdr);
        let target_section = match table.section(object::SectionIndex(target)) {
            Ok(t) if target != 0 => t,
            _ => {
                return Err(LoadError::Malformed(format!(
                    "relocation section {name} applies to section #{target}, which does not exist"
                )));
            }
        };
        // Compilers and linkers name a relocation section after the section it applies to;
        // any other pairing would relocate the wrong bytes or leave code unrelocated.
        let target_name = section_name(&table, endian, target_section);
        let prefix = if sh_type == elf::SHT_RELA {
            ".rela"
        } else {
            ".rel"
        };
        if name.strip_prefix(prefix) != Some(target_name.as_str()) {
            return Err(LoadError::Malformed(format!(
                "relocation section {name} applies to section {target_name} (#{target}); it \
                 should apply to the section its name follows"
            )));
        }
        if !loaded(target) {
            // Relocations of debug information and other sections that occupy no memory are
            // not needed. Anything else would leave loaded code unrelocated: refused.
            let occupies_memory = target_section.sh_flags(endian).contains(elf::SHF_ALLOC);
            if occupies_memory && shdr.sh_size(endian) != 0 {
                return Err(LoadError::Malformed(format!(
                    "relocation section {name} applies to section {target_name}, which occupies \
                     memory but is not loaded"
                )));
            }
            continue;
        }
        if sh_type == elf::SHT_REL {
            return Err(LoadError::RelRelocations { section: name });
        }
        let Some((relas, _)) = shdr.rela(endian, data).map_err(malformed)? else {
            continue;
        };
        // A zeroed section's bytes are the kernel's zero pages: a value relocated there would
        // be silently lost.
        let zeroed = target_section.sh_type(endian) == elf::SHT_NOBITS;
        for rela in relas {
            let symbol = rela.r_sym(endian, false) as usize;
            if symbol >= symbols.len() {
                return Err(LoadError::Malformed(format!(
                    "relocation in {name} refers to symbol #{symbol}, beyond the symbol table"
                )));
            }
            if rela.r_type(endian, false).0 == elf::R_X86_64_NONE.0 {
                continue;
            }
            if zeroed {
                return Err(LoadError::RelocatesZeroed {
                    section: name,
                    target: target_name,
                });
            }
            relocations.push(Relocation {
                section: target,
                offset: rela.r_offset(endian),
                r_type: rela.r_type(endian, false).0,
                symbol,
                addend: rela.r_addend(endian),
            });
        }
    }

    let scopes = match table
        .iter()
        .find(|shdr| section_name(&table, endian, shdr) == SCOPE_SECTION)
    {
        Some(shdr) if shdr.sh_type(endian) != elf::SHT_NOBITS => {
            parse_scopes(shdr.data(endian, data).map_err(malformed)?)?
        }
        _ => Vec::new(),
    };

    Ok(PatchObject {
        sections,
        symbols,
        relocations,
        scopes,
    })
}

/// The records of a [`SCOPE_SECTION`], sorted by name; a name given two files is refused.
pub fn parse_scopes(bytes: &[u8]) -> Result<Vec<(String, String)>, LoadError> {
    let bad = |why: String| LoadError::Malformed(format!("section {SCOPE_SECTION}: {why}"));
    let Some(body) = bytes.strip_suffix(&[0]) else {
        return Err(bad("does not end with a NUL byte".into()));
    };
    let fields: Vec<&[u8]> = body.split(|&b| b == 0).collect();
    if !fields.len().is_multiple_of(2) {
        return Err(bad(
            "holds a name without a file (records are NAME\\0FILE\\0)".into(),
        ));
    }
    let mut scopes = Vec::with_capacity(fields.len() / 2);
    for pair in fields.chunks(2) {
        let text = |b: &[u8]| {
            std::str::from_utf8(b)
                .ok()
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
        };
        let (Some(name), Some(file)) = (text(pair[0]), text(pair[1])) else {
            return Err(bad(format!(
                "record {} has an empty or non-UTF-8 name or file",
                scopes.len() + 1
            )));
        };
        scopes.push((name, file));
    }
    scopes.sort();
    scopes.dedup();
    if let Some(w) = scopes.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(bad(format!(
            "{} is scoped to two files, {} and {}",
            w[0].0, w[0].1, w[1].1
        )));
    }
    Ok(scopes)
}

fn malformed(e: object::read::Error) -> LoadError {
    LoadError::Malformed(e.to_string())
}

/// Checks the identification bytes before anything else, so each refusal is specific.
fn check_ident(data: &[u8]) -> Result<(), LoadError> {
    if data.len() < 4 || data[..4] != elf::ELFMAG {
        return Err(LoadError::NotElf {
            found: data.iter().take(4).copied().collect(),
        });
    }
    // e_ident: magic (4), class (1), data encoding (1).
    match data.get(4).copied() {
        Some(c) if c == elf::ELFCLASS64.0 => {}
        Some(c) if c == elf::ELFCLASS32.0 => return Err(LoadError::Elf32),
        _ => return Err(LoadError::Malformed("unknown ELF class".into())),
    }
    match data.get(5).copied() {
        Some(d) if d == elf::ELFDATA2LSB.0 => Ok(()),
        Some(d) if d == elf::ELFDATA2MSB.0 => Err(LoadError::BigEndian),
        _ => Err(LoadError::Malformed("unknown ELF data encoding".into())),
    }
}

fn check_header(header: &Elf, endian: Endianness) -> Result<(), LoadError> {
    let machine = header.e_machine(endian);
    if machine != elf::EM_X86_64 {
        return Err(LoadError::WrongMachine {
            machine: machine_name(machine),
            code: machine.0,
        });
    }
    match header.e_type(endian) {
        elf::ET_REL => Ok(()),
        elf::ET_EXEC => Err(LoadError::NotRelocatable {
            kind: "an executable",
        }),
        elf::ET_DYN => Err(LoadError::NotRelocatable {
            kind: "a shared object or PIE executable",
        }),
        elf::ET_CORE => Err(LoadError::NotRelocatable {
            kind: "a core dump",
        }),
        _ => Err(LoadError::NotRelocatable {
            kind: "of an unknown type",
        }),
    }
}

fn machine_name(machine: elf::Machine) -> &'static str {
    match machine {
        elf::EM_386 => "i386",
        elf::EM_ARM => "ARM",
        elf::EM_AARCH64 => "AArch64",
        elf::EM_RISCV => "RISC-V",
        elf::EM_PPC64 => "PowerPC64",
        elf::EM_S390 => "s390",
        elf::EM_LOONGARCH => "LoongArch",
        _ => "another architecture",
    }
}

fn section_name(
    table: &object::read::elf::SectionTable<'_, Elf>,
    endian: Endianness,
    shdr: &<Elf as FileHeader>::SectionHeader,
) -> String {
    table.section_name(endian, shdr).map_or_else(
        |_| "<unnamed>".to_string(),
        |n| String::from_utf8_lossy(n).into_owned(),
    )
}

fn load_section(
    index: SectionIndex,
    name: String,
    shdr: &<Elf as FileHeader>::SectionHeader,
    endian: Endianness,
    data: &[u8],
) -> Result<Option<Section>, LoadError> {
    let flags = shdr.sh_flags(endian);
    let sh_type = shdr.sh_type(endian);
    let size = shdr.sh_size(endian);
    if !flags.contains(elf::SHF_ALLOC) || size == 0 {
        return Ok(None);
    }
    if flags.contains(elf::SHF_TLS) {
        return Err(LoadError::ThreadLocalSection { section: name });
    }
    if [
        ".init_array",
        ".fini_array",
        ".preinit_array",
        ".ctors",
        ".dtors",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
    {
        return Err(LoadError::Constructors { section: name });
    }
    if size > MAX_IMAGE_BYTES {
        return Err(LoadError::TooLarge {
            size,
            limit: MAX_IMAGE_BYTES,
        });
    }
    if flags.contains(elf::SHF_COMPRESSED) {
        return Err(LoadError::Compressed { section: name });
    }
    let kind = if sh_type == elf::SHT_NOBITS {
        SectionKind::Bss
    } else if flags.contains(elf::SHF_EXECINSTR) {
        SectionKind::Code
    } else if sh_type == elf::SHT_X86_64_UNWIND || name == ".eh_frame" {
        SectionKind::EhFrame
    } else if name.starts_with(".data.rel.ro") {
        SectionKind::RelRo
    } else if flags.contains(elf::SHF_WRITE) {
        SectionKind::Data
    } else {
        SectionKind::ReadOnly
    };
    let bytes = if kind == SectionKind::Bss {
        Vec::new()
    } else {
        let bytes = shdr.data(endian, data).map_err(|_| LoadError::Truncated {
            section: name.clone(),
        })?;
        if bytes.len() as u64 != size {
            return Err(LoadError::Truncated { section: name });
        }
        bytes.to_vec()
    };
    let align = shdr.sh_addralign(endian).max(1);
    if !align.is_power_of_two() || align > 1 << 16 {
        return Err(LoadError::Malformed(format!(
            "section {name} has an invalid alignment {align}"
        )));
    }
    Ok(Some(Section {
        index: index.0,
        name,
        kind,
        align,
        size,
        data: bytes,
    }))
}

/// A defined symbol must lie inside its section, and a common one have a sane alignment and
/// size, or the layout and relocation arithmetic would address memory outside the image.
fn check_symbol(symbol: &Symbol, sections: &[Section]) -> Result<(), LoadError> {
    match symbol.definition {
        Definition::Section { section, offset } => {
            let Some(s) = sections.iter().find(|s| s.index == section) else {
                return Ok(());
            };
            let end = offset.checked_add(symbol.size);
            if offset > s.size || end.is_none_or(|end| end > s.size) {
                return Err(LoadError::SymbolOutsideSection {
                    symbol: symbol.name.clone(),
                    section: s.name.clone(),
                    offset,
                    size: symbol.size,
                    section_size: s.size,
                });
            }
        }
        Definition::Common { size, align } => {
            if !align.is_power_of_two() || align > 1 << 16 {
                return Err(LoadError::CommonAlignment {
                    symbol: symbol.name.clone(),
                    align,
                });
            }
            if size > MAX_IMAGE_BYTES {
                return Err(LoadError::TooLarge {
                    size,
                    limit: MAX_IMAGE_BYTES,
                });
            }
        }
        _ => {}
    }
    Ok(())
}

fn convert_symbol(
    name: String,
    sym: &<Elf as FileHeader>::Sym,
    section: Option<SectionIndex>,
    endian: Endianness,
    loaded: &impl Fn(usize) -> bool,
) -> Symbol {
    let shndx = sym.st_shndx(endian);
    let value = sym.st_value(endian);
    let size = sym.st_size(endian);
    let definition = match (shndx, section) {
        (elf::SHN_UNDEF, None) => Definition::Undefined,
        (elf::SHN_ABS, _) => Definition::Absolute(value),
        (elf::SHN_COMMON, _) => Definition::Common {
            size,
            align: value.max(1),
        },
        (_, Some(index)) if loaded(index.0) => Definition::Section {
            section: index.0,
            offset: value,
        },
        _ => Definition::NotLoaded,
    };
    let kind = match sym.st_type() {
        elf::STT_FUNC | elf::STT_GNU_IFUNC => SymbolType::Function,
        elf::STT_OBJECT => SymbolType::Object,
        elf::STT_SECTION => SymbolType::Section,
        elf::STT_TLS => SymbolType::ThreadLocal,
        _ => SymbolType::Other,
    };
    let binding = match sym.st_bind() {
        elf::STB_GLOBAL | elf::STB_GNU_UNIQUE => Binding::Global,
        elf::STB_WEAK => Binding::Weak,
        _ => Binding::Local,
    };
    let visibility = sym.st_other().visibility();
    Symbol {
        name,
        definition,
        kind,
        binding,
        exported: visibility == elf::STV_DEFAULT || visibility == elf::STV_PROTECTED,
        size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scoped_name_gives_its_file_and_others_none() {
        let patch = PatchObject {
            sections: vec![],
            symbols: vec![],
            relocations: vec![],
            scopes: parse_scopes(b"helper\0b.c\0count.0\0a.c\0").unwrap(),
        };
        assert_eq!(patch.scope_of("helper"), Some("b.c"));
        assert_eq!(patch.scope_of("count.0"), Some("a.c"));
        assert_eq!(patch.scope_of("count"), None);
        assert_eq!(patch.scope_of(""), None);
    }

    #[test]
    fn scope_records_are_read_sorted_and_checked() {
        let scopes = parse_scopes(b"helper\0b.c\0count.0\0a.c\0helper\0b.c\0").unwrap();
        assert_eq!(
            scopes,
            [
                ("count.0".to_string(), "a.c".to_string()),
                ("helper".to_string(), "b.c".to_string())
            ]
        );
        let message = |bytes: &[u8]| parse_scopes(bytes).unwrap_err().to_string();
        assert_eq!(
            message(b"helper\0a.c\0helper\0b.c\0"),
            "malformed ELF object: section .dsu.scope: helper is scoped to two files, a.c and b.c"
        );
        assert!(message(b"helper\0a.c").contains("does not end with a NUL byte"));
        assert!(message(b"helper\0").contains("a name without a file"));
        assert!(message(b"helper\0\0").contains("record 1 has an empty"));
        assert!(message(b"a\0b\0\xff\0c\0").contains("record 2 has an empty or non-UTF-8"));
        assert!(message(b"").contains("does not end with a NUL byte"));
    }
}
