//! Emit: write a [`Plan`] as an ELF64 x86_64 relocatable object with `object`'s writer.

use object::elf;
use object::write::{Object, Relocation, SectionId, Symbol, SymbolId, SymbolSection};
use object::{
    Architecture, BinaryFormat, Endianness, RelocationFlags, SectionKind, SymbolFlags, SymbolKind,
    SymbolScope,
};

use crate::error::BuildError;
use crate::plan::{Plan, PlanReloc, To};
use crate::read::{Role, Unit};

/// Name of the section that tells the agent in which file each file-local name lives:
/// records `NAME\0FILE\0`.
pub const SCOPE_SECTION: &str = ".dsu.scope";

/// Writes the patch object.
pub(crate) fn emit(plan: &Plan, fixed: &Unit) -> Result<Vec<u8>, BuildError> {
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
    if let Some(file) = &plan.summary.file {
        obj.add_file_symbol(file.as_bytes().to_vec());
    }

    let mut sections: Vec<SectionId> = Vec::with_capacity(plan.sections.len());
    for &index in &plan.sections {
        let s = fixed.section(index).expect("planned sections exist");
        let kind = if s.nobits {
            SectionKind::UninitializedData
        } else if s.is_code() {
            SectionKind::Text
        } else if s.is_writable() {
            SectionKind::Data
        } else {
            SectionKind::ReadOnlyData
        };
        let id = obj.add_section(Vec::new(), s.name.as_bytes().to_vec(), kind);
        // The kind gives the flags: allocated, and writable or executable as the original;
        // no merging flags, as the patch refers into these sections by offset.
        let section = obj.section_mut(id);
        if s.nobits {
            section.append_bss(s.size, s.align);
        } else {
            section.set_data(s.data.clone(), s.align);
        }
        sections.push(id);
    }

    let mut defined: Vec<SymbolId> = Vec::with_capacity(plan.defined.len());
    for d in &plan.defined {
        let s = &fixed.symbols[d.symbol];
        let id = obj.add_symbol(Symbol {
            name: s.name.as_bytes().to_vec(),
            value: s.value,
            size: s.size,
            kind: if s.role == Role::Function {
                SymbolKind::Text
            } else {
                SymbolKind::Data
            },
            scope: if d.global {
                SymbolScope::Dynamic
            } else {
                SymbolScope::Compilation
            },
            weak: false,
            section: SymbolSection::Section(sections[d.section]),
            flags: SymbolFlags::None,
        });
        defined.push(id);
    }
    let mut imports: Vec<SymbolId> = Vec::with_capacity(plan.imports.len());
    for i in &plan.imports {
        imports.push(obj.add_symbol(Symbol {
            name: i.name.as_bytes().to_vec(),
            value: 0,
            size: 0,
            kind: if i.function {
                SymbolKind::Text
            } else {
                SymbolKind::Unknown
            },
            scope: SymbolScope::Dynamic,
            weak: false,
            section: SymbolSection::Undefined,
            flags: SymbolFlags::None,
        }));
    }

    let relocate = |obj: &mut Object, section: SectionId, r: &PlanReloc| {
        let symbol = match r.to {
            To::Section(s) => obj.section_symbol(sections[s]),
            To::Defined(d) => defined[d],
            To::Import(i) => imports[i],
        };
        let relocation = Relocation {
            offset: r.offset,
            symbol,
            addend: r.addend,
            flags: RelocationFlags::Elf {
                r_type: elf::RelocationType(r.r_type),
            },
        };
        obj.add_relocation(section, relocation)
            .map_err(|e| BuildError::Write(e.to_string()))
    };
    for (planned, relocs) in plan.relocs.iter().enumerate() {
        for r in relocs {
            relocate(&mut obj, sections[planned], r)?;
        }
    }
    if let Some(eh) = &plan.eh_frame {
        let id = obj.add_section(Vec::new(), b".eh_frame".to_vec(), SectionKind::ReadOnlyData);
        obj.section_mut(id).set_data(eh.data.clone(), eh.align);
        for r in &eh.relocs {
            relocate(&mut obj, id, r)?;
        }
    }

    if !plan.scope.is_empty() {
        let mut records = Vec::new();
        for (name, file) in &plan.scope {
            records.extend_from_slice(name.as_bytes());
            records.push(0);
            records.extend_from_slice(file.as_bytes());
            records.push(0);
        }
        let id = obj.add_section(
            Vec::new(),
            SCOPE_SECTION.as_bytes().to_vec(),
            SectionKind::Other,
        );
        obj.section_mut(id).set_data(records, 1);
    }
    obj.write().map_err(|e| BuildError::Write(e.to_string()))
}
