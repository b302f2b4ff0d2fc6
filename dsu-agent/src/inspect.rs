//! Inspect: what a patch replaces, adds and needs, checked against a binary or a running
//! process without changing anything (the `dsu inspect` command).

use std::fs::File;
use std::path::{Path, PathBuf};

use object::read::ReadCache;
use object::read::elf::{FileHeader, ProgramHeader as _, SectionHeader as _};
use object::{Endianness, elf};
use serde::Serialize;
use thiserror::Error;

use crate::load::{self, Definition, LoadError, SymbolType};
use crate::prepare;
use crate::relocate::{self, Form};
use crate::resolve::{ModuleInfo, ResolveError, SymbolIndex};

/// What to check the patch against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Against {
    /// Only the patch itself.
    Nothing,
    /// A binary on disk, as if loaded at its link-time addresses.
    Binary(PathBuf),
    /// A running process (its executable and libraries, at their load addresses).
    Process(u32),
}

#[derive(Debug, Error)]
pub enum InspectError {
    #[error("invalid patch: {0}")]
    Load(#[from] LoadError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("cannot read the modules of process {pid}: {source}")]
    Process { pid: u32, source: std::io::Error },
}

/// A function the patch replaces.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Replacement {
    pub name: String,
    pub new_size: u64,
    /// Where the old function is, when checked against something.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_size: Option<u64>,
    /// Why replacing it may not work or may not reach every caller.
    pub warnings: Vec<String>,
}

/// An undefined symbol of the patch.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Need {
    pub name: String,
    /// `"0x... in MODULE"`, when checked against something and found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolves_to: Option<String>,
}

/// The report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct Inspection {
    pub against: Option<String>,
    pub replaces: Vec<Replacement>,
    /// Global functions that match nothing (or were not checked): new code.
    pub adds: Vec<String>,
    pub needs: Vec<Need>,
    pub unresolved: Vec<String>,
    /// Problems that make the patch unusable as it is (unsupported relocations, ambiguity).
    pub errors: Vec<String>,
}

/// Inspects `bytes`. Bad input gives an error; problems found in a valid patch are listed in
/// the report.
pub fn inspect(bytes: &[u8], against: &Against) -> Result<Inspection, InspectError> {
    let patch = load::parse(bytes)?;
    let index = match against {
        Against::Nothing => None,
        Against::Binary(path) => Some(crate::resolve::index_file(path, 0)?),
        Against::Process(pid) => Some(index_process(*pid)?),
    };
    let mut out = Inspection {
        against: match against {
            Against::Nothing => None,
            Against::Binary(p) => Some(p.display().to_string()),
            Against::Process(pid) => Some(format!("process {pid}")),
        },
        ..Inspection::default()
    };

    for (_, sym) in patch.replacement_candidates() {
        let Some(index) = &index else {
            out.replaces.push(Replacement {
                name: sym.name.clone(),
                new_size: sym.size,
                module: None,
                address: None,
                old_size: None,
                warnings: vec![],
            });
            continue;
        };
        match index.replacement_target(&sym.name) {
            Ok(Some(t)) => {
                let module = &index.modules()[t.module];
                let mut warnings = aliases(index, &sym.name, t.address);
                let read = |at: usize, len: usize| code_of(module, at, len as u64);
                let around = prepare::Surroundings::gather(
                    index,
                    t.module,
                    &sym.name,
                    t.address,
                    t.size,
                    &prepare::Reader::unpatched(&read),
                );
                if let Some(code) = code_of(module, t.address, t.size)
                    && let Err(e) = prepare::plan_redirect(
                        &sym.name,
                        &module.name,
                        t.address,
                        &code,
                        t.address,
                        &around,
                        &[],
                    )
                {
                    // Longer than the old function, it cannot go in place either: apply
                    // refuses it. Otherwise apply may still write it in place.
                    if sym.size > t.size {
                        out.errors.push(e.to_string());
                    } else {
                        warnings.push(e.to_string());
                    }
                }
                out.replaces.push(Replacement {
                    name: sym.name.clone(),
                    new_size: sym.size,
                    module: Some(module.name.clone()),
                    address: Some(format!("{:#x}", t.address)),
                    old_size: Some(t.size),
                    warnings,
                });
            }
            Ok(None) => out.adds.push(sym.name.clone()),
            Err(e) => out.errors.push(e.to_string()),
        }
    }
    for s in patch.symbols.iter().filter(|s| {
        s.kind == SymbolType::Function
            && matches!(s.definition, Definition::Section { .. })
            && !s.is_replacement_candidate()
            && s.binding != load::Binding::Local
    }) {
        out.adds.push(s.name.clone());
    }

    let mut used: Vec<usize> = patch.relocations.iter().map(|r| r.symbol).collect();
    used.sort_unstable();
    used.dedup();
    for i in used {
        let sym = &patch.symbols[i];
        if i == 0 || sym.definition != Definition::Undefined {
            continue;
        }
        let resolves_to = match &index {
            None => None,
            Some(index) => match index.resolve(&sym.name) {
                Ok(Some(found)) => Some(format!(
                    "{:#x} in {}",
                    found.address,
                    index.module_name(found.module)
                )),
                Ok(None) => {
                    if sym.binding != load::Binding::Weak {
                        out.unresolved.push(sym.name.clone());
                    }
                    None
                }
                Err(e) => {
                    out.errors.push(e.to_string());
                    None
                }
            },
        };
        out.needs.push(Need {
            name: sym.name.clone(),
            resolves_to,
        });
    }
    for r in &patch.relocations {
        if Form::of(r.r_type).is_none() {
            let msg = format!(
                "unsupported relocation {} against {}",
                relocate::type_name(r.r_type),
                patch.symbol_label(r.symbol)
            );
            if !out.errors.contains(&msg) {
                out.errors.push(msg);
            }
        }
    }
    Ok(out)
}

/// Other function names at the same address: identical code folding or aliases, whose callers
/// are redirected too.
fn aliases(index: &SymbolIndex, name: &str, address: usize) -> Vec<String> {
    let mut others: Vec<&str> = index
        .names_at(address)
        .into_iter()
        .filter(|n| *n != name)
        .collect();
    others.sort_unstable();
    others.dedup();
    if others.is_empty() {
        return vec![];
    }
    vec![format!(
        "shares its address with {}: replacing it replaces those too (identical code folding or an alias)",
        others.join(", ")
    )]
}

/// The bytes of `[address, address + size)` from the module's file.
fn code_of(module: &ModuleInfo, address: usize, size: u64) -> Option<Vec<u8>> {
    let file = File::open(&module.path).ok()?;
    let cache = ReadCache::new(file);
    let header = elf::FileHeader64::<Endianness>::parse(&cache).ok()?;
    let endian = header.endian().ok()?;
    let vaddr = (address.checked_sub(module.bias)?) as u64;
    let sections = header.sections(endian, &cache).ok()?;
    for s in sections.iter() {
        let start = s.sh_addr(endian);
        if s.sh_type(endian) == elf::SHT_PROGBITS
            && vaddr >= start
            && vaddr + size <= start + s.sh_size(endian)
        {
            let data = s.data(endian, &cache).ok()?;
            let at = (vaddr - start) as usize;
            return data.get(at..at + size as usize).map(<[u8]>::to_vec);
        }
    }
    None
}

/// Indexes a running process's modules from its memory map.
pub fn index_process(pid: u32) -> Result<SymbolIndex, InspectError> {
    let err = |source| InspectError::Process { pid, source };
    let text = std::fs::read(format!("/proc/{pid}/maps")).map_err(err)?;
    let maps = dsu_sys::maps::parse_bytes(&text).map_err(err)?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(err)?;
    let mut index = SymbolIndex::default();
    let mut seen: Vec<String> = Vec::new();
    for m in &maps {
        let Some(path) = &m.path else { continue };
        if !path.starts_with('/') || seen.contains(path) {
            continue;
        }
        seen.push(path.clone());
        let is_main = Path::new(path) == exe;
        let open_path = if is_main {
            PathBuf::from(format!("/proc/{pid}/exe"))
        } else {
            PathBuf::from(path)
        };
        let Some(first_load) = first_load_vaddr(&open_path) else {
            continue; // not an ELF module (a mapped data file)
        };
        // Maps are sorted: the first mapping of a file is its lowest, the first PT_LOAD.
        let bias = m.start.wrapping_sub(first_load & !0xfff);
        index.add_module(ModuleInfo {
            name: path.clone(),
            path: open_path,
            bias,
            is_main,
            tls_modid: 0,
        })?;
    }
    Ok(index)
}

fn first_load_vaddr(path: &Path) -> Option<usize> {
    let file = File::open(path).ok()?;
    let cache = ReadCache::new(file);
    let header = elf::FileHeader64::<Endianness>::parse(&cache).ok()?;
    let endian = header.endian().ok()?;
    header
        .program_headers(endian, &cache)
        .ok()?
        .iter()
        .find(|p| p.p_type(endian) == elf::PT_LOAD)
        .map(|p| p.p_vaddr(endian) as usize)
}
