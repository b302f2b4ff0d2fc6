//! Resolve: the running process's symbols, and the patch's names bound to them.
//!
//! The index is read from the files of the loaded modules (the executable through
//! `/proc/self/exe`, so a binary replaced on disk is never read by mistake), `.symtab` and
//! `.dynsym`, with each module's load bias. It is built before any thread is stopped.

use std::collections::HashMap;

/// A map keyed by symbol or file name, with a fast hash: every name of every module is
/// hashed at start-up, and the names come from the process's own files.
type NameMap<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;
use std::fs::File;
use std::path::{Path, PathBuf};

use dsu_sys::file_map::FileMap;
use object::elf;
use object::read::elf::{FileHeader, SectionHeader as _, Sym as _};
use object::{Endianness, ReadRef};
use thiserror::Error;

use crate::load::{Definition, PatchObject};

/// Why names could not be bound to the running process.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ResolveError {
    #[error("cannot read symbols of {module}: {reason}")]
    Module { module: String, reason: String },
    #[error(
        "undefined symbol{} not found in the process: {}{}",
        plural(.names.len()),
        .names.join(", "),
        unresolved_hint(.names)
    )]
    Unresolved { names: Vec<String> },
    #[error("symbol {name} is ambiguous in the process; candidates: {}", .candidates.join(", "))]
    Ambiguous {
        name: String,
        candidates: Vec<String>,
    },
    #[error("{name} is an indirect function (IFUNC) in {module}; it cannot be replaced")]
    IndirectTarget { name: String, module: String },
    #[error(
        "{first} and {second} are the same function in the process (at {address:#x}): replace it under one name only"
    )]
    OverlappingTargets {
        first: String,
        second: String,
        address: usize,
    },
    #[error(
        "the patch names the static {kind} {name} of source file {file}, which the process does not have (its symbol tables list no {name} after an STT_FILE entry {file}: was the program stripped, or built from other sources?)"
    )]
    NoStatic {
        name: String,
        file: String,
        kind: &'static str,
    },
    #[error("cannot resolve indirect function {name} in {module}")]
    IndirectUnresolved { name: String, module: String },
    #[error(
        "the patch replaces no function of the process; its global functions ({}) match no process function",
        .functions.join(", ")
    )]
    NothingToReplace { functions: Vec<String> },
}

/// What usually explains an unresolved name a patch needs.
fn unresolved_hint(names: &[String]) -> &'static str {
    if names.iter().any(|n| n.contains("panic_const_")) {
        ". The patch checks arithmetic for overflow (core's panic_const_* functions), which a \
         release program does not contain: the patch was built without optimisation or with \
         debug assertions; build it with the program's flags (rustc -O, or \
         -C debug-assertions=off)"
    } else {
        ""
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolKind {
    Function,
    /// `STT_GNU_IFUNC`: the address is the resolver's.
    IndirectFunction,
    Object,
    /// `STT_TLS`: the address is an offset in the module's TLS block.
    ThreadLocal,
    Other,
}

/// A symbol definition of the running process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSymbol {
    /// Index into `SymbolIndex::modules`.
    pub module: usize,
    /// Run-time address (bias applied), or TLS offset for `ThreadLocal`.
    pub address: usize,
    pub size: u64,
    pub kind: SymbolKind,
    /// Global or weak binding (not `static`).
    pub global: bool,
    /// For a `static` symbol of `.symtab`: the source file it belongs to (the `STT_FILE` entry
    /// before it), an id of [`SymbolIndex::file_name`]; 0 when unknown.
    pub file: u32,
}

/// A module as the index knows it.
#[derive(Debug, Clone)]
pub struct ModuleInfo {
    /// Name for messages: the file path.
    pub name: String,
    pub path: PathBuf,
    pub bias: usize,
    pub is_main: bool,
    pub tls_modid: usize,
}

/// All named definitions of the process, by name.
#[derive(Debug, Default)]
pub struct SymbolIndex {
    modules: Vec<ModuleInfo>,
    by_name: NameMap<Vec<ProcessSymbol>>,
    /// Source file names of `static` symbols; id `n` is `files[n - 1]`.
    files: Vec<Box<str>>,
    file_ids: NameMap<u32>,
    /// Names that look like compiler clones (`NAME.constprop.N`, ...), by the name before
    /// their first clone suffix: an update looks its targets' clones up here instead of
    /// scanning every name.
    clone_names: NameMap<Vec<Box<str>>>,
    /// The source file name of the last [`SymbolIndex::file_id`] call and its id: a module
    /// lists a file's `static` symbols together.
    last_file: Option<(Box<[u8]>, u32)>,
    /// Every symbol but thread-local ones by module and address: the neighbours of a function
    /// an update places code around, without a pass over every name (a pass costs more than
    /// the rest of a small update). Built by [`SymbolIndex::sort_by_address`] ahead of the
    /// first update, else on first use.
    by_address: std::sync::OnceLock<ByAddress>,
}

/// The index's symbols sorted by `(module, address)`, each module's largest size, and its
/// functions.
#[derive(Debug, Default)]
struct ByAddress {
    /// `(module, address, size)`.
    extents: Vec<(usize, usize, u64)>,
    max_size: HashMap<usize, u64>,
    /// `(module, address, size)` of every function with a size, one per address (the
    /// smallest size of its aliases): what a call-site index decodes.
    functions: Vec<(usize, usize, usize)>,
}

impl ByAddress {
    fn of(by_name: &NameMap<Vec<ProcessSymbol>>) -> ByAddress {
        let mut extents: Vec<(usize, usize, u64)> = by_name
            .values()
            .flatten()
            .filter(|s| s.kind != SymbolKind::ThreadLocal)
            .map(|s| (s.module, s.address, s.size))
            .collect();
        extents.sort_unstable();
        extents.dedup();
        let mut max_size = HashMap::new();
        for &(module, _, size) in &extents {
            let max = max_size.entry(module).or_insert(0);
            *max = size.max(*max);
        }
        let mut functions: Vec<(usize, usize, usize)> = by_name
            .values()
            .flatten()
            .filter(|s| s.kind == SymbolKind::Function && s.size > 0)
            .map(|s| (s.module, s.address, s.size as usize))
            .collect();
        functions.sort_unstable();
        functions.dedup_by_key(|&mut (m, a, _)| (m, a));
        ByAddress {
            extents,
            max_size,
            functions,
        }
    }

    /// The extents of `module` from the first at or after `from`, in address order.
    fn from(&self, module: usize, from: usize) -> impl Iterator<Item = (usize, u64)> + '_ {
        let at = self
            .extents
            .partition_point(|&(m, a, _)| (m, a) < (module, from));
        self.extents[at..]
            .iter()
            .take_while(move |&&(m, _, _)| m == module)
            .map(|&(_, a, s)| (a, s))
    }
}

impl SymbolIndex {
    /// Indexes every loaded module with a file (the vDSO has none and is skipped).
    pub fn of_process() -> Result<SymbolIndex, ResolveError> {
        let mut index = SymbolIndex::default();
        for m in dsu_sys::modules::loaded() {
            let Some(path) = m.path.clone() else { continue };
            let info = ModuleInfo {
                name: path.display().to_string(),
                path: if m.is_main {
                    PathBuf::from("/proc/self/exe")
                } else {
                    path
                },
                bias: m.bias,
                is_main: m.is_main,
                tls_modid: m.tls_modid,
            };
            index.add_module(info)?;
        }
        Ok(index)
    }

    pub fn modules(&self) -> &[ModuleInfo] {
        &self.modules
    }

    /// Reads one module's `.symtab` and `.dynsym`.
    pub fn add_module(&mut self, info: ModuleInfo) -> Result<(), ResolveError> {
        let err = |reason: String| ResolveError::Module {
            module: info.name.clone(),
            reason,
        };
        let file = File::open(&info.path).map_err(|e| err(e.to_string()))?;
        // Mapped, not read through `ReadCache`: a system call per symbol name was most of an
        // agent's start-up.
        let map = FileMap::of(&file).map_err(|e| err(e.to_string()))?;
        // Collected first: a file that fails half-way adds nothing, so no symbol ever names a
        // module the index does not hold.
        let mut symbols = Vec::new();
        read_symbols(map.bytes(), info.bias, |name, file, sym| {
            symbols.push((name, file, sym));
        })
        .map_err(err)?;
        self.add_symbols_in_files(info, symbols);
        Ok(())
    }

    /// Adds a module whose symbols the caller already knows, instead of reading them from
    /// its file: an index of another process or a saved build, or a synthetic process in tests
    /// and fuzz targets. Each symbol's [`ProcessSymbol::module`] is set to the new module,
    /// whose index is returned. Names that are not UTF-8 are skipped, as when reading a file.
    pub fn add_symbols<'a>(
        &mut self,
        info: ModuleInfo,
        symbols: impl IntoIterator<Item = (&'a [u8], ProcessSymbol)>,
    ) -> usize {
        self.add_symbols_in_files(info, symbols.into_iter().map(|(n, s)| (n, None, s)))
    }

    /// [`SymbolIndex::add_symbols`] with, for each `static` symbol, the source file it belongs
    /// to (its `STT_FILE`), which scoped names of a patch match ([`SymbolIndex::lookup_in`]).
    pub fn add_symbols_in_files<'a>(
        &mut self,
        info: ModuleInfo,
        symbols: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>, ProcessSymbol)>,
    ) -> usize {
        let module = self.modules.len();
        let symbols = symbols.into_iter();
        self.by_name.reserve(symbols.size_hint().0);
        for (name, file, sym) in symbols {
            let file = file.map_or(0, |f| self.file_id(f));
            self.insert(
                name,
                ProcessSymbol {
                    module,
                    file,
                    ..sym
                },
            );
        }
        self.modules.push(info);
        module
    }

    /// The id of source file name `file` (see [`ProcessSymbol::file`]).
    fn file_id(&mut self, file: &[u8]) -> u32 {
        if let Some((last, id)) = &self.last_file
            && **last == *file
        {
            return *id;
        }
        let id = self.file_id_of(file);
        self.last_file = Some((file.into(), id));
        id
    }

    fn file_id_of(&mut self, file: &[u8]) -> u32 {
        let file: Box<str> = String::from_utf8_lossy(file).into();
        if let Some(&id) = self.file_ids.get(&file) {
            return id;
        }
        self.files.push(file.clone());
        let id = self.files.len() as u32;
        self.file_ids.insert(file, id);
        id
    }

    /// The source file name of id `file`, if any.
    pub fn file_name(&self, file: u32) -> Option<&str> {
        (file as usize)
            .checked_sub(1)
            .and_then(|i| self.files.get(i))
            .map(|f| &**f)
    }

    /// The `static` definitions of `name` that source file `file` made.
    fn statics_of<'a>(&'a self, name: &str, file: &str) -> impl Iterator<Item = &'a ProcessSymbol> {
        let id = self.file_ids.get(file).copied();
        self.definitions(name)
            .iter()
            .filter(move |s| !s.global && id.is_some_and(|id| s.file == id))
    }

    /// [`SymbolIndex::replacement_target`] for a name the patch scopes to the `static`
    /// function of source file `file` (its `.dsu.scope` section), when `file` is given.
    pub fn replacement_target_in(
        &self,
        name: &str,
        file: Option<&str>,
    ) -> Result<Option<ProcessSymbol>, ResolveError> {
        let Some(file) = file else {
            return self.replacement_target(name);
        };
        let found: Vec<&ProcessSymbol> = self
            .statics_of(name, file)
            .filter(|s| s.kind == SymbolKind::Function)
            .collect();
        match found.as_slice() {
            [] => Err(ResolveError::NoStatic {
                name: name.to_string(),
                file: file.to_string(),
                kind: "function",
            }),
            [one] => Ok(Some((*one).clone())),
            many => Err(self.ambiguous(name, many)),
        }
    }

    /// [`SymbolIndex::lookup`] for a name the patch scopes to a `static` of source file
    /// `file`, when `file` is given: only that file's definition binds.
    pub fn lookup_in(
        &self,
        name: &str,
        file: Option<&str>,
    ) -> Result<Option<ProcessSymbol>, ResolveError> {
        let Some(file) = file else {
            return self.lookup(name);
        };
        let found: Vec<&ProcessSymbol> = self.statics_of(name, file).collect();
        match found.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some((*one).clone())),
            many => Err(self.ambiguous(name, many)),
        }
    }

    /// [`SymbolIndex::lookup_in`] for a patch whose replaced functions live in the modules
    /// `home`: when several `static` definitions (and no global one) would make an unscoped
    /// name ambiguous, the only one in a home module binds. Hidden symbols are local to the
    /// module that links them (`DW.ref.rust_eh_personality`, `rust_eh_personality`, which
    /// each Rust module carries a copy of), so a patch built from a module's own objects means
    /// that module's.
    pub fn lookup_from(
        &self,
        name: &str,
        file: Option<&str>,
        home: &[usize],
    ) -> Result<Option<ProcessSymbol>, ResolveError> {
        match self.lookup_in(name, file) {
            Err(ResolveError::Ambiguous { .. }) if file.is_none() => {
                let near: Vec<&ProcessSymbol> = self
                    .definitions(name)
                    .iter()
                    .filter(|s| !s.global && home.contains(&s.module))
                    .collect();
                match near.as_slice() {
                    [one] => Ok(Some((*one).clone())),
                    _ => self.lookup_in(name, file),
                }
            }
            other => other,
        }
    }

    fn insert(&mut self, name: &[u8], symbol: ProcessSymbol) {
        let Ok(name) = std::str::from_utf8(name) else {
            return;
        };
        self.by_address.take();
        if let Some(entries) = self.by_name.get_mut(name) {
            // `.symtab` and `.dynsym` list exported symbols twice.
            if !entries
                .iter()
                .any(|e| e.module == symbol.module && e.address == symbol.address)
            {
                entries.push(symbol);
            }
            return;
        }
        if let Some(base) = clone_base(name) {
            self.clone_names
                .entry(base.into())
                .or_default()
                .push(name.into());
        }
        self.by_name.insert(name.into(), vec![symbol]);
    }

    /// All definitions of `name`.
    pub fn definitions(&self, name: &str) -> &[ProcessSymbol] {
        self.by_name.get(name).map_or(&[], Vec::as_slice)
    }

    /// The process function a patch function named `name` replaces: exactly one function of
    /// that name, exported or static, in any module.
    pub fn replacement_target(&self, name: &str) -> Result<Option<ProcessSymbol>, ResolveError> {
        let found: Vec<&ProcessSymbol> = self
            .definitions(name)
            .iter()
            .filter(|s| matches!(s.kind, SymbolKind::Function | SymbolKind::IndirectFunction))
            .collect();
        match found.as_slice() {
            [] => Ok(None),
            [one] if one.kind == SymbolKind::IndirectFunction => {
                Err(ResolveError::IndirectTarget {
                    name: name.to_string(),
                    module: self.modules[one.module].name.clone(),
                })
            }
            [one] => Ok(Some((*one).clone())),
            many => Err(self.ambiguous(name, many)),
        }
    }

    /// Binds an undefined patch symbol in *this* process, as the dynamic linker would (see
    /// [`SymbolIndex::lookup`]), an indirect function (IFUNC) to the implementation the
    /// loader picks for it here. Only for an index of the process that runs this code (the
    /// agent); an index of another process or of files uses [`SymbolIndex::lookup`].
    pub fn resolve(&self, name: &str) -> Result<Option<ProcessSymbol>, ResolveError> {
        match self.lookup(name)? {
            Some(found) => self.materialise(name, &found).map(Some),
            None => Ok(None),
        }
    }

    /// The definition an undefined patch symbol binds to, as the dynamic linker would pick
    /// it: the first global definition in load order (the executable first); failing that,
    /// the only `static` definition of that name. An indirect function (IFUNC) stays one:
    /// its address is its resolver's, and nothing runs to pick the implementation.
    pub fn lookup(&self, name: &str) -> Result<Option<ProcessSymbol>, ResolveError> {
        let defs = self.definitions(name);
        let global = self
            .modules
            .iter()
            .enumerate()
            .find_map(|(m, _)| defs.iter().find(|d| d.global && d.module == m));
        if let Some(found) = global {
            return Ok(Some(found.clone()));
        }
        let locals: Vec<&ProcessSymbol> = defs.iter().collect();
        match locals.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some((*one).clone())),
            many => Err(self.ambiguous(name, many)),
        }
    }

    /// An IFUNC resolves to the implementation the dynamic linker picks for this CPU, asked
    /// of the loader of this process.
    fn materialise(&self, name: &str, s: &ProcessSymbol) -> Result<ProcessSymbol, ResolveError> {
        if s.kind != SymbolKind::IndirectFunction {
            return Ok(s.clone());
        }
        let module = &self.modules[s.module];
        let unresolved = || ResolveError::IndirectUnresolved {
            name: name.to_string(),
            module: module.name.clone(),
        };
        let address =
            dsu_sys::dl::dlsym_in(module.is_main, &module.path, name).ok_or_else(unresolved)?;
        Ok(ProcessSymbol {
            address,
            kind: SymbolKind::Function,
            ..s.clone()
        })
    }

    fn ambiguous(&self, name: &str, many: &[&ProcessSymbol]) -> ResolveError {
        ResolveError::Ambiguous {
            name: name.to_string(),
            candidates: many
                .iter()
                .map(|s| format!("{:#x} in {}", s.address, self.modules[s.module].name))
                .collect(),
        }
    }

    /// Names of the functions defined at `address`.
    pub fn names_at(&self, address: usize) -> Vec<&str> {
        self.by_name
            .iter()
            .filter(|(_, defs)| {
                defs.iter().any(|s| {
                    s.address == address
                        && matches!(s.kind, SymbolKind::Function | SymbolKind::IndirectFunction)
                })
            })
            .map(|(n, _)| &**n)
            .collect()
    }

    /// Every function of `module` with a size: `(address, size)`, sorted, duplicates
    /// (aliases) removed.
    ///
    /// A range of the by-address view, not a pass over every name of the process: the first
    /// update of a library function would otherwise spend a tenth of its time here.
    pub fn functions_in(&self, module: usize) -> Vec<(usize, usize)> {
        let functions = &self.by_address().functions;
        let start = functions.partition_point(|&(m, _, _)| m < module);
        let end = functions.partition_point(|&(m, _, _)| m <= module);
        functions[start..end]
            .iter()
            .map(|&(_, a, size)| (a, size))
            .collect()
    }

    /// Where the first symbol of `module` after `address` starts (any kind but thread-local,
    /// whose values are offsets): the end of the bytes that may belong to the symbol at
    /// `address`.
    pub fn next_start_after(&self, module: usize, address: usize) -> Option<usize> {
        self.by_address()
            .from(module, address.checked_add(1)?)
            .map(|(a, _)| a)
            .next()
    }

    /// Sorts the symbols by address for [`SymbolIndex::next_start_after`] and
    /// [`SymbolIndex::extents_overlapping`] now rather than in the first update that asks.
    pub fn sort_by_address(&self) {
        self.by_address();
    }

    fn by_address(&self) -> &ByAddress {
        self.by_address.get_or_init(|| ByAddress::of(&self.by_name))
    }

    /// `(start, size)` of every symbol of `module` (any kind but thread-local) whose bytes
    /// overlap `[lo, hi)` (a symbol without a size counts as one byte), sorted by start.
    pub fn extents_overlapping(&self, module: usize, lo: usize, hi: usize) -> Vec<(usize, u64)> {
        let by_address = self.by_address();
        // No symbol starting before `lo - max_size` reaches `lo`.
        let reach = by_address
            .max_size
            .get(&module)
            .copied()
            .unwrap_or(0)
            .max(1);
        let from = lo.saturating_sub(usize::try_from(reach).unwrap_or(usize::MAX));
        by_address
            .from(module, from)
            .take_while(|&(a, _)| a < hi)
            .filter(|&(a, s)| a.saturating_add(s.max(1) as usize) > lo)
            .collect()
    }

    /// The compiler clones of function `name` in `module` (`NAME.constprop.N`, `NAME.isra.N`,
    /// `NAME.part.N`, and combinations): specialised copies the compiler made, which some callers
    /// call instead of `name`. Sorted by name.
    pub fn clones_of(&self, module: usize, name: &str) -> Vec<(&str, &ProcessSymbol)> {
        let candidates = self.clone_names.get(name).map_or(&[][..], Vec::as_slice);
        let mut out: Vec<(&str, &ProcessSymbol)> = candidates
            .iter()
            .filter(|n| is_clone_of(n, name))
            .flat_map(|n| self.definitions(n).iter().map(move |d| (&**n, d)))
            .filter(|(_, d)| d.module == module && d.kind == SymbolKind::Function)
            .collect();
        out.sort_unstable_by_key(|(n, d)| (*n, d.address));
        out
    }

    /// The function of `module` whose bytes hold `address`, by name.
    pub fn function_holding(&self, module: usize, address: usize) -> Option<&str> {
        self.by_name
            .iter()
            .flat_map(|(n, defs)| defs.iter().map(move |d| (&**n, d)))
            .filter(|(_, d)| d.module == module && d.kind == SymbolKind::Function)
            .filter(|(_, d)| address >= d.address && address < d.address + d.size as usize)
            .map(|(n, _)| n)
            .min()
    }

    /// The index of the module named `name`.
    pub fn module_named(&self, name: &str) -> Option<usize> {
        self.modules.iter().position(|m| m.name == name)
    }

    pub fn module_name(&self, module: usize) -> &str {
        self.modules.get(module).map_or("?", |m| m.name.as_str())
    }
}

/// The name before the first clone suffix of `name` (`f` for `f.isra.0.constprop.1`), when it
/// has one.
fn clone_base(name: &str) -> Option<&str> {
    // Most names have no dot: asked of every symbol of every module at start-up.
    if !name.contains('.') {
        return None;
    }
    [".constprop.", ".isra.", ".part."]
        .iter()
        .filter_map(|suffix| name.find(suffix))
        .min()
        .map(|at| &name[..at])
}

/// Whether `candidate` names a compiler clone of function `name`: `name.` then `constprop`,
/// `isra` or `part` and a number (GCC's suffixes, which combine: `f.isra.0.constprop.0`).
pub fn is_clone_of(candidate: &str, name: &str) -> bool {
    let Some(rest) = candidate
        .strip_prefix(name)
        .and_then(|r| r.strip_prefix('.'))
    else {
        return false;
    };
    let parts: Vec<&str> = rest.split('.').collect();
    parts.len() >= 2
        && parts.len().is_multiple_of(2)
        && parts.chunks(2).all(|p| {
            matches!(p[0], "constprop" | "isra" | "part")
                && !p[1].is_empty()
                && p[1].bytes().all(|b| b.is_ascii_digit())
        })
}

/// Calls `add` for every defined, named symbol of the ELF file, address biased.
fn read_symbols<'a, R: ReadRef<'a>>(
    data: R,
    bias: usize,
    mut add: impl FnMut(&'a [u8], Option<&'a [u8]>, ProcessSymbol),
) -> Result<(), String> {
    let header = elf::FileHeader64::<Endianness>::parse(data).map_err(|e| e.to_string())?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    let sections = header.sections(endian, data).map_err(|e| e.to_string())?;
    for sh_type in [elf::SHT_SYMTAB, elf::SHT_DYNSYM] {
        let table = sections
            .symbols(endian, data, sh_type)
            .map_err(|e| e.to_string())?;
        if table.is_empty() {
            continue;
        }
        let versym = if sh_type == elf::SHT_DYNSYM {
            sections
                .iter()
                .find_map(|s| s.gnu_versym(endian, data).ok().flatten())
                .map(|(v, _)| v)
        } else {
            None
        };
        // The `STT_FILE` entry in force: the linker lists each input file's `static` symbols
        // after one naming its source file.
        let mut file: Option<&[u8]> = None;
        for (i, sym) in table.enumerate() {
            if sym.st_type() == elf::STT_FILE {
                file = table
                    .symbol_name(endian, sym)
                    .ok()
                    .filter(|f| !f.is_empty());
                continue;
            }
            if sym.is_undefined(endian) || sym.st_shndx(endian) == elf::SHN_ABS {
                continue;
            }
            // A hidden version (`memcpy@GLIBC_2.2.5`) is not what a new reference binds to.
            if let Some(v) = versym.and_then(|v| v.get(i.0))
                && v.0.get(endian).is_hidden()
            {
                continue;
            }
            let kind = match sym.st_type() {
                elf::STT_FUNC => SymbolKind::Function,
                elf::STT_GNU_IFUNC => SymbolKind::IndirectFunction,
                elf::STT_OBJECT | elf::STT_COMMON => SymbolKind::Object,
                elf::STT_TLS => SymbolKind::ThreadLocal,
                elf::STT_NOTYPE => SymbolKind::Other,
                _ => continue, // sections and files
            };
            let Ok(name) = table.symbol_name(endian, sym) else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            let value = sym.st_value(endian) as usize;
            let address = if kind == SymbolKind::ThreadLocal {
                value
            } else {
                value.wrapping_add(bias)
            };
            let global = matches!(
                sym.st_bind(),
                elf::STB_GLOBAL | elf::STB_WEAK | elf::STB_GNU_UNIQUE
            );
            add(
                name,
                if global { None } else { file },
                ProcessSymbol {
                    module: 0,
                    address,
                    size: sym.st_size(endian),
                    kind,
                    global,
                    file: 0,
                },
            );
        }
    }
    Ok(())
}

/// A process function that a patch function replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Index of the replacing function in `PatchObject::symbols`.
    pub patch_symbol: usize,
    pub name: String,
    pub module: String,
    pub address: usize,
    pub size: u64,
}

/// Where each undefined symbol of a patch lives in the process.
#[derive(Debug, Clone, Default)]
pub struct Resolution {
    pub targets: Vec<Target>,
    /// New functions of the patch (replacing nothing).
    pub added: Vec<String>,
    /// Patch symbol index -> process address, for every undefined symbol a relocation uses.
    pub imports: HashMap<usize, usize>,
    /// Names of those imports, for messages.
    pub import_names: HashMap<usize, String>,
    /// Thread-local imports: patch symbol index -> (TLS module id, offset in its block).
    pub tls: HashMap<usize, (usize, usize)>,
}

/// Name the linker gives the GOT; a patch may refer to it and gets its own GOT.
pub const GOT_SYMBOL: &str = "_GLOBAL_OFFSET_TABLE_";

/// Binds the patch's replacement functions and undefined symbols to the process.
pub fn resolve(patch: &PatchObject, index: &SymbolIndex) -> Result<Resolution, ResolveError> {
    let mut out = Resolution::default();
    let mut home = Vec::new();
    for (i, sym) in patch.replacement_candidates() {
        match index.replacement_target_in(&sym.name, patch.scope_of(&sym.name))? {
            Some(t) => {
                home.push(t.module);
                out.targets.push(Target {
                    patch_symbol: i,
                    name: sym.name.clone(),
                    module: index.module_name(t.module).to_string(),
                    address: t.address,
                    size: t.size,
                })
            }
            None => out.added.push(sym.name.clone()),
        }
    }
    // Two names of one function (an alias, folded code) would get two edits of the same
    // bytes, the last one winning: refuse.
    for (i, a) in out.targets.iter().enumerate() {
        let overlaps = |b: &Target| {
            a.address < b.address + (b.size as usize).max(1)
                && b.address < a.address + (a.size as usize).max(1)
        };
        if let Some(b) = out.targets[i + 1..].iter().find(|b| overlaps(b)) {
            return Err(ResolveError::OverlappingTargets {
                first: a.name.clone(),
                second: b.name.clone(),
                address: a.address,
            });
        }
    }
    if out.targets.is_empty() {
        return Err(ResolveError::NothingToReplace {
            functions: out.added.clone(),
        });
    }

    let mut missing = Vec::new();
    let mut used: Vec<usize> = patch.relocations.iter().map(|r| r.symbol).collect();
    used.sort_unstable();
    used.dedup();
    for i in used {
        let sym = &patch.symbols[i];
        if i == 0 || sym.definition != Definition::Undefined || sym.name == GOT_SYMBOL {
            continue;
        }
        let scope = patch.scope_of(&sym.name);
        let found = match index.lookup_from(&sym.name, scope, &home)? {
            Some(found) => Some(index.materialise(&sym.name, &found)?),
            None => None,
        };
        match found {
            Some(found) => {
                if found.kind == SymbolKind::ThreadLocal {
                    let modid = index.modules()[found.module].tls_modid;
                    out.tls.insert(i, (modid, found.address));
                }
                out.imports.insert(i, found.address);
                out.import_names.insert(i, sym.name.clone());
            }
            // An unresolved weak reference is null, as with the static linker.
            None if sym.binding == crate::load::Binding::Weak => {
                out.imports.insert(i, 0);
                out.import_names.insert(i, sym.name.clone());
            }
            None => missing.push(match scope {
                Some(file) => format!("{} (static in {file})", sym.name),
                None => sym.name.clone(),
            }),
        }
    }
    if !missing.is_empty() {
        missing.sort();
        missing.dedup();
        return Err(ResolveError::Unresolved { names: missing });
    }
    Ok(out)
}

/// Indexes a single ELF file as if loaded at `bias` (used by `inspect --against BINARY`).
pub fn index_file(path: &Path, bias: usize) -> Result<SymbolIndex, ResolveError> {
    let mut index = SymbolIndex::default();
    index.add_module(ModuleInfo {
        name: path.display().to_string(),
        path: path.to_path_buf(),
        bias,
        is_main: true,
        tls_modid: 0,
    })?;
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> ModuleInfo {
        ModuleInfo {
            name: name.into(),
            path: name.into(),
            bias: 0,
            is_main: false,
            tls_modid: 0,
        }
    }

    fn function(address: usize, global: bool) -> ProcessSymbol {
        ProcessSymbol {
            module: 0,
            address,
            size: 0x10,
            kind: SymbolKind::Function,
            global,
            file: 0,
        }
    }

    #[test]
    fn extents_overlap_a_range_exactly() {
        let mut index = SymbolIndex::default();
        let symbols: [(&[u8], ProcessSymbol); 3] = [
            (b"a", function(0x100, false)),
            (b"b", function(0x110, false)),
            (
                b"tls",
                ProcessSymbol {
                    kind: SymbolKind::ThreadLocal,
                    ..function(0x110, false)
                },
            ),
        ];
        index.add_symbols(info("m"), symbols);
        index.add_symbols(info("other"), [(&b"c"[..], function(0x110, true))]);
        // a ends where the range starts, b starts where it ends: neither overlaps.
        assert_eq!(index.extents_overlapping(0, 0x110, 0x120), [(0x110, 0x10)]);
        assert_eq!(index.extents_overlapping(0, 0x100, 0x110), [(0x100, 0x10)]);
        assert_eq!(index.extents_overlapping(1, 0x100, 0x120), [(0x110, 0x10)]);
    }

    #[test]
    fn functions_of_a_module_are_sorted_sized_and_unaliased() {
        let with = |address, size, kind| ProcessSymbol {
            size,
            kind,
            ..function(address, false)
        };
        let mut index = SymbolIndex::default();
        index.add_symbols(info("before"), [(&b"z"[..], function(0x50, true))]);
        index.add_symbols(
            info("m"),
            [
                (&b"late"[..], with(0x300, 0x20, SymbolKind::Function)),
                (b"early", with(0x100, 0x40, SymbolKind::Function)),
                (b"alias", with(0x100, 0x30, SymbolKind::Function)),
                (b"bare", with(0x200, 0, SymbolKind::Function)),
                (b"table", with(0x180, 0x10, SymbolKind::Object)),
            ],
        );
        // Asked once before the last module is added: the view must take it in.
        assert_eq!(index.functions_in(1), [(0x100, 0x30), (0x300, 0x20)]);
        index.add_symbols(info("after"), [(&b"y"[..], function(0x10, true))]);
        assert_eq!(index.functions_in(0), [(0x50, 0x10)]);
        assert_eq!(index.functions_in(1), [(0x100, 0x30), (0x300, 0x20)]);
        assert_eq!(index.functions_in(2), [(0x10, 0x10)]);
        assert_eq!(index.functions_in(3), []);
    }

    #[test]
    fn neighbours_are_found_however_far_a_symbol_reaches() {
        let sized = |address, size| ProcessSymbol {
            size,
            ..function(address, false)
        };
        let mut index = SymbolIndex::default();
        index.add_symbols(
            info("m"),
            [
                (&b"big"[..], sized(0x1000, 0x800)),
                (b"bare", sized(0x1400, 0)),
                (b"small", sized(0x1500, 0x10)),
                (b"far", sized(0x3000, 0x10)),
            ],
        );
        // Asked before the module below is added: the sorted view must be rebuilt after it.
        assert_eq!(index.next_start_after(0, 0x1500), Some(0x3000));
        index.add_symbols(info("other"), [(&b"x"[..], function(0x1600, true))]);
        assert_eq!(index.next_start_after(1, 0x1500), Some(0x1600));
        assert_eq!(index.next_start_after(0, 0x1000), Some(0x1400));
        assert_eq!(index.next_start_after(0, 0x3000), None);
        assert_eq!(index.next_start_after(0, usize::MAX), None);
        // A symbol starting far before the range still overlaps it; one without a size
        // counts as one byte.
        assert_eq!(
            index.extents_overlapping(0, 0x1508, 0x1600),
            [(0x1000, 0x800), (0x1500, 0x10)]
        );
        assert_eq!(
            index.extents_overlapping(0, 0x1400, 0x1401),
            [(0x1000, 0x800), (0x1400, 0)]
        );
        assert_eq!(index.extents_overlapping(0, 0x1800, 0x3000), []);
        assert_eq!(
            index.extents_overlapping(1, 0x1000, 0x2000),
            [(0x1600, 0x10)]
        );
    }

    #[test]
    fn an_indirect_function_binds_to_the_implementation_this_process_calls() {
        let index = SymbolIndex::of_process().unwrap();
        let found = index.resolve("strlen").unwrap().unwrap();
        assert_eq!(found.kind, SymbolKind::Function);
        let called = dsu_sys::dl::dlsym_in(false, std::path::Path::new("libc.so.6"), "strlen");
        assert_eq!(Some(found.address), called);
        let found = index.lookup("strlen").unwrap().unwrap();
        assert_eq!(
            found.kind,
            SymbolKind::IndirectFunction,
            "lookup runs nothing"
        );
    }

    #[test]
    fn scoped_names_bind_only_to_the_static_of_their_file() {
        let mut index = SymbolIndex::default();
        let counter = ProcessSymbol {
            kind: SymbolKind::Object,
            ..function(0x3000, false)
        };
        type InFile<'a> = (&'a [u8], Option<&'a [u8]>, ProcessSymbol);
        let exe: [InFile; 3] = [
            (b"helper", Some(b"a.c"), function(0x1000, false)),
            (b"helper", Some(b"b.c"), function(0x2000, false)),
            (b"count.0", Some(b"b.c"), counter),
        ];
        index.add_symbols_in_files(info("exe"), exe);
        let lib: [InFile; 2] = [
            (b"helper", None, function(0x9000, true)),
            (b"helper", Some(b"c.c"), function(0x9100, false)),
        ];
        index.add_symbols_in_files(info("lib"), lib);

        // Unscoped, the global binds, as with the dynamic linker.
        assert_eq!(index.lookup("helper").unwrap().unwrap().address, 0x9000);
        let at = |file| {
            index
                .lookup_in("helper", Some(file))
                .unwrap()
                .map(|s| s.address)
        };
        assert_eq!(at("a.c"), Some(0x1000));
        assert_eq!(at("b.c"), Some(0x2000));
        assert_eq!(at("c.c"), Some(0x9100));
        assert_eq!(at("d.c"), None);
        let c = index.lookup_in("helper", Some("c.c")).unwrap().unwrap();
        assert_eq!(c.module, 1);
        let count = index.lookup_in("count.0", Some("b.c")).unwrap().unwrap();
        assert_eq!(count.address, 0x3000);
        assert_eq!(index.lookup_in("count.0", Some("a.c")).unwrap(), None);

        let replaced = index.replacement_target_in("helper", Some("b.c")).unwrap();
        assert_eq!(replaced.unwrap().address, 0x2000);
        let unscoped = index.replacement_target_in("helper", None).unwrap_err();
        assert!(matches!(unscoped, ResolveError::Ambiguous { .. }));
        let e = index
            .replacement_target_in("count.0", Some("b.c"))
            .unwrap_err();
        assert!(matches!(e, ResolveError::NoStatic { .. }), "{e:?}");
        let e = index
            .replacement_target_in("helper", Some("d.c"))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("static function helper of source file d.c"),
            "{e}"
        );

        let id = count.file;
        assert_eq!(index.file_name(id), Some("b.c"));
        assert_ne!(c.file, id);
        assert_eq!(index.file_name(c.file), Some("c.c"));
        assert_eq!(index.file_name(0), None);
        assert_eq!(index.file_name(99), None);
    }

    #[test]
    fn clone_names_are_gcc_suffixes_with_numbers() {
        assert!(is_clone_of("price.constprop.0", "price"));
        assert!(is_clone_of("price.isra.12", "price"));
        assert!(is_clone_of("price.part.0", "price"));
        assert!(is_clone_of("price.isra.0.constprop.1", "price"));
        assert!(
            !is_clone_of("price.cold", "price"),
            "a split-off part, not a clone"
        );
        assert!(!is_clone_of("price.constprop", "price"));
        assert!(!is_clone_of("price.constprop.x", "price"));
        assert!(!is_clone_of("price.lto_priv.0", "price"));
        assert!(!is_clone_of("prices.constprop.0", "price"));
        assert!(!is_clone_of("price", "price"));
        assert!(!is_clone_of("price.isra.0.", "price"));
    }

    #[test]
    fn an_ambiguous_static_binds_in_the_module_of_the_replaced_functions() {
        let mut index = SymbolIndex::default();
        let module = |name: &str| ModuleInfo {
            name: name.to_string(),
            path: PathBuf::from(name),
            bias: 0,
            is_main: name == "prog",
            tls_modid: 0,
        };
        let static_at = |address| ProcessSymbol {
            module: 0,
            address,
            size: 8,
            kind: SymbolKind::Object,
            global: false,
            file: 0,
        };
        let name: &[u8] = b"DW.ref.rust_eh_personality";
        let prog = index.add_symbols(module("prog"), [(name, static_at(0x1000))]);
        let agent = index.add_symbols(module("libagent.so"), [(name, static_at(0x9000))]);
        let name = "DW.ref.rust_eh_personality";
        assert!(matches!(
            index.lookup_in(name, None),
            Err(ResolveError::Ambiguous { .. })
        ));
        let found = index.lookup_from(name, None, &[prog]).unwrap().unwrap();
        assert_eq!((found.module, found.address), (prog, 0x1000));
        let found = index.lookup_from(name, None, &[agent]).unwrap().unwrap();
        assert_eq!(found.address, 0x9000);
        // Replacing in both, or in neither: still ambiguous.
        assert!(index.lookup_from(name, None, &[prog, agent]).is_err());
        assert!(index.lookup_from(name, None, &[]).is_err());
        assert_eq!(index.lookup_from("missing", None, &[prog]).unwrap(), None);
    }

    #[test]
    fn an_overflow_check_the_program_lacks_says_the_patch_was_built_unoptimised() {
        let e = ResolveError::Unresolved {
            names: vec![
                "_RNvNtNtCsk2PQ1Tgl0K4_4core9panicking11panic_const24panic_const_mul_overflow"
                    .into(),
            ],
        };
        let text = e.to_string();
        assert!(
            text.contains("built without optimisation") && text.contains("rustc -O"),
            "{text}"
        );
        let e = ResolveError::Unresolved {
            names: vec!["missing_helper".into()],
        };
        assert_eq!(
            e.to_string(),
            "undefined symbol not found in the process: missing_helper"
        );
    }
}
