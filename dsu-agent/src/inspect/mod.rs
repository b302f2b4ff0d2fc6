//! Inspect: what a patch replaces, adds and needs, checked against a binary or a running
//! process without changing anything (the `dsu inspect` command).
//!
//! Against a binary, its libraries are found as the loader would find them ([`libraries`])
//! and indexed at synthetic bases; against a process, its modules are read from its memory
//! map at their load addresses. Nothing of dsu's own process stands in for the target: an
//! indirect function (IFUNC) is reported as such, with the implementation the target picked
//! when that can be read from it ([`ifunc`]).

pub mod ifunc;
pub mod libraries;

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use object::read::ReadCache;
use object::read::elf::{FileHeader, ProgramHeader as _, SectionHeader as _};
use object::{Endianness, elf};
use serde::Serialize;
use thiserror::Error;

use crate::load::{self, Definition, LoadError, SymbolType};
use crate::prepare;
use crate::relocate::{self, Form};
use crate::resolve::{ModuleInfo, ProcessSymbol, ResolveError, SymbolIndex, SymbolKind};
use libraries::{LibraryError, SearchPaths};

/// What to check the patch against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Against {
    /// Only the patch itself.
    Nothing,
    /// A binary on disk at its link-time addresses, with the libraries the loader would load
    /// for it (found through [`SearchPaths::of_host`]), each at a synthetic base.
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
    #[error(transparent)]
    Binary(#[from] LibraryError),
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
    /// `"0x... in MODULE"`, when checked against something and found: the address the patch
    /// would use. For an indirect function, only when the target's own choice was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolves_to: Option<String>,
    /// Set when the name is an indirect function (IFUNC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub indirect: Option<Indirect>,
}

/// An indirect function (`STT_GNU_IFUNC`) a patch needs: its resolver picks the
/// implementation in the target, never in dsu's process.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Indirect {
    /// The module that defines it.
    pub module: String,
    /// The resolver's address (not the implementation's).
    pub resolver: String,
    /// How the implementation is known, or when it will be picked.
    pub resolved: String,
}

/// A library of a binary, as the loader would load it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Library {
    /// The `DT_NEEDED` name.
    pub name: String,
    /// The file found for it.
    pub path: String,
    /// The synthetic address its first page is placed at in this report.
    pub base: String,
    /// The module that needs it.
    pub needed_by: String,
}

/// The report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct Inspection {
    pub against: Option<String>,
    /// The binary's libraries in load order (against a binary only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub libraries: Vec<Library>,
    pub replaces: Vec<Replacement>,
    /// Global functions that match nothing (or were not checked): new code.
    pub adds: Vec<String>,
    pub needs: Vec<Need>,
    pub unresolved: Vec<String>,
    /// Problems that make the patch unusable as it is (unsupported relocations, ambiguity).
    pub errors: Vec<String>,
    /// What the check could not see (a library not found or unreadable): names that would
    /// resolve there are listed unresolved.
    pub warnings: Vec<String>,
}

/// Inspects `bytes`. Bad input gives an error; problems found in a valid patch are listed in
/// the report.
pub fn inspect(bytes: &[u8], against: &Against) -> Result<Inspection, InspectError> {
    let patch = load::parse(bytes)?;
    // A malformed section is the apply's refusal to report; here it only vouches for nothing.
    let expectations = crate::trust::expect::of_object(bytes).unwrap_or_default();
    let mut out = Inspection {
        against: match against {
            Against::Nothing => None,
            Against::Binary(p) => Some(p.display().to_string()),
            Against::Process(pid) => Some(format!("process {pid}")),
        },
        ..Inspection::default()
    };
    let mut ranges = Vec::new();
    let index = match against {
        Against::Nothing => None,
        Against::Binary(path) => Some(index_binary(path, &SearchPaths::of_host(), &mut out)?),
        Against::Process(pid) => {
            let (index, mapped) = index_process_modules(*pid)?;
            ranges = mapped;
            Some(index)
        }
    };

    let mut trampolines: Vec<(usize, usize)> = Vec::new();
    // Modules of the replaced functions: hidden symbols bind there first, as `apply` does.
    let mut home = Vec::new();
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
        match index.replacement_target_in(&sym.name, patch.scope_of(&sym.name)) {
            Ok(Some(t)) => {
                home.push(t.module);
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
                let planned = code_of(module, t.address, t.size).map(|code| {
                    prepare::plan_redirect(
                        &sym.name,
                        &module.name,
                        t.address,
                        &code,
                        t.address,
                        &around,
                        &trampolines,
                    )
                });
                if let Some(Ok(prepare::Redirect {
                    trampoline: Some(tr),
                    ..
                })) = &planned
                {
                    // As apply does: each trampoline of the patch in a place of its own.
                    trampolines.push((tr.at, tr.at + tr.bytes.len()));
                }
                if let Some(Err(e)) = planned {
                    // Longer than the old function, it cannot go in place either: apply
                    // refuses it. Otherwise apply may still write it in place.
                    if sym.size > t.size {
                        out.errors.push(e.to_string());
                    } else {
                        warnings.push(e.to_string());
                    }
                }
                // Clones the patch leaves alone keep their callers on the old code: apply
                // refuses unless told to accept it.
                let mut stale: Vec<&str> = Vec::new();
                for (clone, d) in index.clones_of(t.module, &sym.name) {
                    if patch.replacement_candidates().any(|(_, p)| p.name == clone) {
                        continue;
                    }
                    match vouched(&expectations, module, clone, d) {
                        Ok(true) => {}
                        Ok(false) => stale.push(clone),
                        Err(e) => {
                            out.errors.push(e.to_string());
                            stale.push(clone);
                        }
                    }
                }
                if !stale.is_empty() {
                    out.errors.push(
                        crate::update::StaleClones {
                            function: sym.name.clone(),
                            module: module.name.clone(),
                            clones: stale.iter().map(|c| c.to_string()).collect(),
                            callers: Vec::new(),
                        }
                        .to_string(),
                    );
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
        let mut need = Need {
            name: sym.name.clone(),
            resolves_to: None,
            indirect: None,
        };
        // `lookup`, not `resolve`: an IFUNC is resolved by the target, not by this process.
        match index.as_ref().map(|index| {
            let found = index.lookup_from(&sym.name, patch.scope_of(&sym.name), &home);
            (index, found)
        }) {
            None => {}
            Some((index, Ok(Some(found)))) if found.kind == SymbolKind::IndirectFunction => {
                let (resolves_to, indirect) =
                    describe_indirect(index, &sym.name, &found, against, &ranges);
                need.resolves_to = resolves_to;
                need.indirect = Some(indirect);
            }
            Some((index, Ok(Some(found)))) => {
                need.resolves_to = Some(format!(
                    "{:#x} in {}",
                    found.address,
                    index.module_name(found.module)
                ));
            }
            // An unresolved weak reference is null, as with the static linker.
            Some((_, Ok(None))) if sym.binding == load::Binding::Weak => {}
            Some((_, Ok(None))) => out.unresolved.push(sym.name.clone()),
            Some((_, Err(e))) => out.errors.push(e.to_string()),
        }
        out.needs.push(need);
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

/// What is known of an IFUNC the patch needs: against a process, the implementation it
/// bound (read from its memory), when some module bound one; otherwise the resolver only.
fn describe_indirect(
    index: &SymbolIndex,
    name: &str,
    found: &ProcessSymbol,
    against: &Against,
    ranges: &[Range<usize>],
) -> (Option<String>, Indirect) {
    let module = index.module_name(found.module).to_string();
    let resolver = format!("{:#x}", found.address);
    let (resolves_to, resolved) = match against {
        Against::Process(pid) => match ifunc::chosen_in_process(*pid, index, ranges, name, found) {
            Ok(choice) => (
                Some(format!("{:#x} in {module}", choice.address)),
                format!(
                    "by process {pid}: the implementation bound in {}",
                    choice.slot_module
                ),
            ),
            Err(why) => (
                None,
                format!("in the process when the patch is applied ({why})"),
            ),
        },
        _ => (
            None,
            "in the target when the patch is applied (its CPU picks the implementation)".into(),
        ),
    };
    (
        resolves_to,
        Indirect {
            module,
            resolver,
            resolved,
        },
    )
}

/// Indexes the binary at `path` (at its link-time addresses) and the libraries the loader
/// would load for it (at synthetic bases), listing them and what is missing in `out`.
pub fn index_binary(
    path: &Path,
    paths: &SearchPaths,
    out: &mut Inspection,
) -> Result<SymbolIndex, InspectError> {
    let order = libraries::load_order(path, paths)?;
    let mut index = SymbolIndex::default();
    for (i, m) in order.modules.iter().enumerate() {
        let info = ModuleInfo {
            name: m.path.display().to_string(),
            path: m.path.clone(),
            bias: m.bias as usize,
            is_main: i == 0,
            tls_modid: 0,
        };
        if i == 0 {
            index.add_module(info)?;
            continue;
        }
        // A library whose symbols cannot be read is a hole in the view, not a failure.
        if let Err(e) = index.add_module(info) {
            out.warnings.push(e.to_string());
            continue;
        }
        out.libraries.push(Library {
            name: m.needed.clone().unwrap_or_default(),
            path: m.path.display().to_string(),
            base: format!("{:#x}", m.bias.wrapping_add(m.dynamic.span.start)),
            needed_by: m
                .needed_by
                .map(|b| order.modules[b].path.display().to_string())
                .unwrap_or_default(),
        });
    }
    out.warnings
        .extend(order.missing.iter().map(ToString::to_string));
    out.warnings
        .extend(order.unusable.iter().map(ToString::to_string));
    Ok(index)
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

/// Whether the patch's `unchanged` line for the clone `name` (defined by `d` in `module`)
/// matches the clone's code and build id in the module's file, as apply checks them in memory.
fn vouched(
    expectations: &[crate::trust::Expectation],
    module: &ModuleInfo,
    name: &str,
    d: &crate::resolve::ProcessSymbol,
) -> Result<bool, crate::trust::BindingError> {
    use crate::trust::expect;
    if expect::find(expectations, expect::Kind::Unchanged, name).is_none() {
        return Ok(false);
    }
    let Some(code) = code_of(module, d.address, d.size) else {
        return Ok(false);
    };
    let build_id = File::open(&module.path)
        .ok()
        .and_then(|f| crate::persist::build_id::bytes_of_file(&f).ok().flatten());
    let found = expect::Found {
        function: name,
        module: &module.name,
        build_id: build_id.as_deref(),
        pristine: &code,
    };
    expect::vouches_for(expectations, &found)
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
    index_process_modules(pid).map(|(index, _)| index)
}

/// [`index_process`], with the addresses each module maps (by module index).
fn index_process_modules(pid: u32) -> Result<(SymbolIndex, Vec<Range<usize>>), InspectError> {
    let err = |source| InspectError::Process { pid, source };
    let text = std::fs::read(format!("/proc/{pid}/maps")).map_err(err)?;
    let maps = dsu_sys::maps::parse_bytes(&text).map_err(err)?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(err)?;
    let mut index = SymbolIndex::default();
    let mut ranges: Vec<Range<usize>> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for m in &maps {
        let Some(path) = &m.path else { continue };
        if let Some(at) = index.module_named(path) {
            let r = &mut ranges[at];
            *r = r.start.min(m.start)..r.end.max(m.end);
            continue;
        }
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
        ranges.push(m.start..m.end);
    }
    Ok((index, ranges))
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
