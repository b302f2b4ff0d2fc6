//! The ELF64 (x86_64, little-endian) values a symfile uses: sizes, header fields, section and
//! symbol kinds. Raw ABI definitions only, as the System V ABI and its x86_64 supplement give
//! them; `symfile` uses them.

/// Size of the file header.
pub const EHDR_SIZE: usize = 64;
/// Size of one section header.
pub const SHDR_SIZE: usize = 64;
/// Size of one symbol table entry.
pub const SYM_SIZE: usize = 24;

/// `e_ident`: magic, 64-bit class, little-endian data, current version, System V ABI.
pub const IDENT: [u8; 16] = [0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// `e_type`: relocatable object.
pub const ET_REL: u16 = 1;
/// `e_machine`: x86_64.
pub const EM_X86_64: u16 = 62;
/// `e_version`.
pub const EV_CURRENT: u32 = 1;

pub const SHT_PROGBITS: u32 = 1;
pub const SHT_SYMTAB: u32 = 2;
pub const SHT_STRTAB: u32 = 3;
pub const SHT_NOBITS: u32 = 8;

pub const SHF_ALLOC: u64 = 0x2;
pub const SHF_EXECINSTR: u64 = 0x4;

/// `st_info` of a global function.
pub const GLOBAL_FUNC: u8 = (1 << 4) | 2;
