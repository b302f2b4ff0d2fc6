//! Link: load -> resolve -> place -> relocate, giving new code and data that sit in the
//! process, fully relocated against it, but that no caller reaches yet.
//!
//! [`link_in_process`] is the in-process entry point: tests and programs can call the linked
//! functions directly, without switching any caller to them.
//!
//! Unsafe code is allowed here: this module asks the dynamic loader for a thread-local variable's
//! static offset; every block states its invariant.

#![allow(unsafe_code)]

use std::collections::HashMap;

use dsu_sys::code::CodeWriter;
use dsu_sys::mem::Mapping;
use dsu_sys::x86;
use thiserror::Error;

use crate::frame_rules::FrameRules;
use crate::load::{self, Definition, LoadError, PatchObject, SectionKind};
use crate::place::{self, Layout, PlaceError, STUB_LEN};
use crate::relocate::{self, Form, Inputs, RelocError, RelocProblem};
use crate::resolve::{self, Resolution, ResolveError, SymbolIndex, Target};

/// Why a patch could not be linked into the process. Nothing of it remains mapped.
#[derive(Debug, Error)]
pub enum LinkError {
    #[error("invalid patch: {0}")]
    Load(#[from] LoadError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Relocation(#[from] RelocError),
    #[error(transparent)]
    Place(#[from] PlaceError),
    #[error("cannot write code into the process: {0}")]
    CodeWriter(std::io::Error),
    #[error("cannot read the process's memory map: {0}")]
    Maps(std::io::Error),
}

/// A replaced function and where its new version lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedTarget {
    pub target: Target,
    /// Where the new version runs: in the image, or the old address when in place.
    pub new_address: usize,
    pub new_size: u64,
    /// In place: the new code relocated for the old function's address, to be written there.
    pub in_place: Option<Vec<u8>>,
}

/// A function of the linked patch, for profilers and debuggers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedFunction {
    pub name: String,
    pub address: usize,
    pub size: u64,
}

/// A patch mapped and relocated in this process. Dropping it unmaps the image: only drop it
/// while nothing can run or reference its code (the engine keeps applied patches forever, or
/// until reverted).
#[derive(Debug)]
pub struct LinkedPatch {
    mapping: Mapping,
    pub layout: Layout,
    pub targets: Vec<LinkedTarget>,
    /// Global functions of the patch that replace nothing.
    pub added: Vec<String>,
    pub functions: Vec<LinkedFunction>,
    /// `.eh_frame` sections of the image: (address, length).
    pub eh_frames: Vec<(usize, usize)>,
    /// Whether the image holds data the program may come to point into (`.rodata`,
    /// `.data.rel.ro`, `.data`, `.bss`, commons), as opposed to unwind tables, GOT and stubs.
    pub keeps_data: bool,
    symbols: HashMap<String, usize>,
}

impl LinkedPatch {
    /// Address of a named symbol defined by the patch.
    pub fn symbol(&self, name: &str) -> Option<usize> {
        self.symbols.get(name).copied()
    }

    /// The image's address range.
    pub fn image(&self) -> (usize, usize) {
        (self.mapping.addr(), self.mapping.len())
    }

    /// The code part's address range.
    pub fn code_range(&self) -> (usize, usize) {
        (
            self.mapping.addr(),
            self.mapping.addr() + self.layout.exec_end,
        )
    }

    /// Gives up ownership of the image, which then stays mapped; returns its range.
    pub fn into_raw(self) -> (usize, usize) {
        self.mapping.leak()
    }
}

/// Links `bytes` against this process, building the symbol index and code writer itself.
pub fn link_in_process(bytes: &[u8]) -> Result<LinkedPatch, LinkError> {
    let index = SymbolIndex::of_process()?;
    let writer = CodeWriter::open().map_err(LinkError::CodeWriter)?;
    link(bytes, &index, &writer)
}

/// Links `bytes` against the process described by `index`, every new function in new space.
pub fn link(
    bytes: &[u8],
    index: &SymbolIndex,
    writer: &CodeWriter,
) -> Result<LinkedPatch, LinkError> {
    let resolved = resolve_patch(bytes, index)?;
    let maps = dsu_sys::maps::read_self().map_err(LinkError::Maps)?;
    resolved.link(writer, &[], &maps)
}

/// Loads and resolves a patch: the first phase of linking, before anything is mapped, when
/// the caller decides which functions go in place.
pub fn resolve_patch(bytes: &[u8], index: &SymbolIndex) -> Result<Resolved, LinkError> {
    let patch = load::parse(bytes)?;
    let resolution = resolve::resolve(&patch, index)?;
    let plan = Plan::new(&patch, &resolution)?;
    Ok(Resolved {
        patch,
        resolution,
        plan,
    })
}

/// The unwind rules of a patch's code: `(section, offset in it, rules)` per FDE, or why the
/// `.eh_frame` could not be read ([`Resolved::new_frame_rules`]).
#[derive(Debug)]
pub struct NewFrameRules(Result<Vec<(usize, u64, FrameRules)>, String>);

impl NewFrameRules {
    /// The rules of target `i`'s new code (an FDE starting at its symbol), `Ok(None)` when no
    /// FDE describes it.
    pub fn of_target(&self, resolved: &Resolved, i: usize) -> Result<Option<&FrameRules>, String> {
        let fdes = self.0.as_ref().map_err(String::clone)?;
        let t = resolved.resolution.targets.get(i).ok_or("no such target")?;
        let Definition::Section { section, offset } =
            resolved.patch.symbols[t.patch_symbol].definition
        else {
            return Err(format!("{} is not defined in a section", t.name));
        };
        let mut found = fdes
            .iter()
            .filter(|(s, at, _)| *s == section && *at == offset)
            .map(|(_, _, rules)| rules);
        let first = found.next();
        if found.next().is_some() {
            return Err(format!("two FDEs describe {}", t.name));
        }
        Ok(first)
    }
}

/// A patch bound to the process's symbols, not yet mapped.
pub struct Resolved {
    patch: PatchObject,
    resolution: Resolution,
    plan: Plan,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved")
            .field("targets", &self.resolution.targets)
            .finish_non_exhaustive()
    }
}

impl Resolved {
    /// The process functions the patch replaces.
    pub fn targets(&self) -> &[Target] {
        &self.resolution.targets
    }

    /// The new version of target `i`, when it can be written over the old function: it is
    /// the only code of its section (as `-ffunction-sections` and rustc emit), so the section
    /// can be relocated for the old address. Returns its code before relocation (for its size
    /// and first bytes).
    pub fn in_place_candidate(&self, i: usize) -> Option<&[u8]> {
        let t = self.resolution.targets.get(i)?;
        let sym = &self.patch.symbols[t.patch_symbol];
        let Definition::Section { section, offset: 0 } = sym.definition else {
            return None;
        };
        let s = self.patch.section(section)?;
        let alone = !self.patch.symbols.iter().enumerate().any(|(j, other)| {
            j != t.patch_symbol
                && other.kind == load::SymbolType::Function
                && matches!(other.definition, Definition::Section { section: o, offset } if o == section && offset != 0)
        });
        (s.kind == SectionKind::Code && alone && sym.size == s.size).then_some(s.data.as_slice())
    }

    /// The unwind rules the patch's `.eh_frame` sections give its code, by the section each FDE
    /// describes (matched through the relocation of the FDE's start address: the object's own
    /// address fields are still zero). Parsed once for all targets.
    pub fn new_frame_rules(&self) -> NewFrameRules {
        let mut by_section: Vec<(usize, u64, FrameRules)> = Vec::new();
        for s in self
            .patch
            .sections
            .iter()
            .filter(|s| s.kind == SectionKind::EhFrame)
        {
            let fdes = match FrameRules::of_object_section(&s.data) {
                Ok(fdes) => fdes,
                Err(e) => return NewFrameRules(Err(format!("{}: {e}", s.name))),
            };
            for (at, rules) in fdes {
                if s.data.get(at..at + 4) == Some(&[0xff; 4]) {
                    return NewFrameRules(Err(format!("{}: 64-bit FDE at {at:#x}", s.name)));
                }
                // The start address follows the 4-byte length and the 4-byte CIE pointer.
                let start = (at + 8) as u64;
                let Some(r) = self
                    .patch
                    .relocations
                    .iter()
                    .find(|r| r.section == s.index && r.offset == start)
                else {
                    return NewFrameRules(Err(format!(
                        "{}: the FDE at {at:#x} has no relocated start",
                        s.name
                    )));
                };
                if let Some(Definition::Section { section, offset }) =
                    self.patch.symbols.get(r.symbol).map(|s| s.definition)
                {
                    let start = offset as i64 + r.addend;
                    if start >= 0 {
                        by_section.push((section, start as u64, rules));
                    }
                }
            }
        }
        NewFrameRules(Ok(by_section))
    }

    /// Maps and relocates the patch. The targets listed in `in_place` get their new code
    /// relocated for the old function's address (returned in [`LinkedTarget::in_place`], to
    /// be written over the old function while threads are stopped); all others live in the
    /// new image, placed in a gap of `maps` (the caller's snapshot of the memory map).
    pub fn link(
        self,
        writer: &CodeWriter,
        in_place: &[usize],
        maps: &[dsu_sys::maps::MapEntry],
    ) -> Result<LinkedPatch, LinkError> {
        let layout = self.layout(dsu_sys::mem::page_size())?;
        let (anchor, reach) = place::window(&self.near_points(), layout.size)?;
        let mapping = place::map_image(&layout, anchor, reach, maps)?;
        let relocated = self.relocate(layout, mapping.addr(), in_place)?;
        place::publish(&mapping, &relocated.layout, &relocated.image, writer)?;
        let Resolved {
            patch, resolution, ..
        } = self;
        Ok(finish(
            patch,
            resolution,
            mapping,
            relocated.layout,
            &relocated.addresses,
            relocated.moved,
        ))
    }

    /// Addresses every byte of the image must reach with a rel32: the replaced functions and
    /// the process symbols the patch reaches pc-relatively (input of [`place::window`]).
    pub fn near_points(&self) -> Vec<usize> {
        self.plan.near_points(&self.resolution)
    }

    /// Where every part of the image goes for pages of `page` bytes (see [`place`]); refused
    /// when the image would be too large. Pure.
    pub fn layout(&self, page: usize) -> Result<Layout, LinkError> {
        let layout = place::layout(
            &self.patch,
            self.plan.got_slots,
            self.plan.stubs.len(),
            page,
        );
        // Sections and commons are capped at load; alignment padding and the GOT add little.
        if layout.size as u64 > 2 * load::MAX_IMAGE_BYTES {
            return Err(LoadError::TooLarge {
                size: layout.size as u64,
                limit: 2 * load::MAX_IMAGE_BYTES,
            }
            .into());
        }
        Ok(layout)
    }

    /// Builds the image of `layout` (from [`Resolved::layout`]) relocated for an image at
    /// `base`, with the targets listed in `in_place` (indices into [`Resolved::targets`])
    /// relocated for their old function's address instead. Pure: it maps and writes nothing
    /// but the returned buffer, so it can run for any address (tests, fuzzing, `inspect`).
    pub fn relocate(
        &self,
        layout: Layout,
        base: usize,
        in_place: &[usize],
    ) -> Result<RelocatedImage, RelocError> {
        let Resolved {
            patch,
            resolution,
            plan,
        } = self;
        // Section address at run time: in the image, or over the old function when in place.
        let mut sections: HashMap<usize, usize> = layout
            .sections
            .iter()
            .map(|(&s, &at)| (s, base + at))
            .collect();
        for &i in in_place {
            let t = &resolution.targets[i];
            if let Definition::Section { section, .. } = patch.symbols[t.patch_symbol].definition {
                sections.insert(section, t.address);
            }
        }
        let addresses = symbol_addresses(patch, resolution, &layout, base, &sections);
        let mut image = vec![0u8; layout.size];
        for s in &patch.sections {
            if s.kind != SectionKind::Bss {
                let at = layout.sections[&s.index];
                image[at..at + s.data.len()].copy_from_slice(&s.data);
            }
        }
        plan.write_got_and_stubs(&mut image, &layout, base, &addresses, resolution);
        relocate_all(
            patch, plan, resolution, &layout, base, &sections, &addresses, &mut image,
        )?;
        // In-place code leaves the image; its slot there is filled with traps.
        let mut moved = HashMap::new();
        for &i in in_place {
            let t = &resolution.targets[i];
            if let Definition::Section { section, .. } = patch.symbols[t.patch_symbol].definition {
                let at = layout.sections[&section];
                let len = patch.section(section).map_or(0, |s| s.size as usize);
                moved.insert(i, image[at..at + len].to_vec());
                image[at..at + len].fill(0xcc);
            }
        }
        Ok(RelocatedImage {
            layout,
            base,
            image,
            addresses,
            moved,
        })
    }
}

/// A patch image relocated for one address, not mapped anywhere: what [`Resolved::link`]
/// publishes into its mapping.
#[derive(Debug, Clone)]
pub struct RelocatedImage {
    pub layout: Layout,
    /// The address the image is relocated for.
    pub base: usize,
    /// `layout.size` bytes: sections, stubs and GOT, relocated; in-place code replaced by
    /// `int3`.
    pub image: Vec<u8>,
    /// Run-time address of every patch symbol, by symbol index (`None` for symbols in
    /// sections that are not loaded).
    pub addresses: Vec<Option<usize>>,
    /// In-place target (index into [`Resolved::targets`]) -> its code relocated for the old
    /// function's address.
    pub moved: HashMap<usize, Vec<u8>>,
}

/// What a GOT entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum GotEntry {
    /// The address of a symbol (one slot).
    Address(usize),
    /// `{module id, offset}` of a thread-local symbol, for `__tls_get_addr` (two slots).
    TlsPair(usize),
    /// `{module id, 0}`: a module's TLS block, for local-dynamic access (two slots).
    TlsModule(usize),
    /// The offset of a thread-local symbol from the thread pointer (one slot).
    TpOffset(usize),
}

impl GotEntry {
    fn slots(self) -> usize {
        match self {
            GotEntry::TlsPair(_) | GotEntry::TlsModule(_) => 2,
            GotEntry::Address(_) | GotEntry::TpOffset(_) => 1,
        }
    }
}

/// Which symbols need GOT entries and call stubs.
struct Plan {
    /// Entry -> first slot number.
    got: HashMap<GotEntry, usize>,
    got_slots: usize,
    /// Patch symbol index -> stub number (each stub reads the symbol's address slot).
    stubs: HashMap<usize, usize>,
    /// Imports reached by a pc-relative data reference: the image must be near them.
    pc_relative_imports: Vec<usize>,
    /// Static-TLS offsets of thread-local imports reached by initial-exec code.
    tp_offsets: HashMap<usize, isize>,
}

impl Plan {
    fn new(patch: &PatchObject, resolution: &Resolution) -> Result<Plan, RelocError> {
        let mut plan = Plan {
            got: HashMap::new(),
            got_slots: 0,
            stubs: HashMap::new(),
            pc_relative_imports: Vec::new(),
            tp_offsets: HashMap::new(),
        };
        for r in &patch.relocations {
            let error = |reason| reloc_error(patch, r, reason);
            let form = Form::of(r.r_type).ok_or_else(|| error(RelocProblem::Unsupported))?;
            let tls = resolution.tls.get(&r.symbol).copied();
            match (form.is_thread_local(), tls) {
                (false, Some(_)) => return Err(error(RelocProblem::ThreadLocal)),
                (true, None) => return Err(error(RelocProblem::NotThreadLocal)),
                (true, Some((0, _))) => {
                    return Err(error(RelocProblem::NotStaticTls {
                        reason: "its module has no TLS block".into(),
                    }));
                }
                _ => {}
            }
            let import = resolution.imports.contains_key(&r.symbol);
            match (form, tls) {
                (Form::GotPcRel, _) => plan.entry(GotEntry::Address(r.symbol)),
                (Form::Plt32, _) if import => {
                    plan.entry(GotEntry::Address(r.symbol));
                    let n = plan.stubs.len();
                    plan.stubs.entry(r.symbol).or_insert(n);
                }
                (Form::Pc32, _) if import => plan.pc_relative_imports.push(r.symbol),
                (Form::TlsGd, _) => plan.entry(GotEntry::TlsPair(r.symbol)),
                (Form::TlsLd, Some((module, _))) => plan.entry(GotEntry::TlsModule(module)),
                (Form::GotTpOff, Some((module, offset))) => {
                    // SAFETY: `module` is the TLS module id of a loaded module whose symbol
                    // table places this variable at `offset` in its TLS block.
                    let tp =
                        unsafe { dsu_sys::tls::static_offset(module, offset) }.map_err(|e| {
                            error(RelocProblem::NotStaticTls {
                                reason: e.to_string(),
                            })
                        })?;
                    plan.tp_offsets.insert(r.symbol, tp);
                    plan.entry(GotEntry::TpOffset(r.symbol));
                }
                _ => {}
            }
        }
        Ok(plan)
    }

    fn entry(&mut self, entry: GotEntry) {
        if !self.got.contains_key(&entry) {
            self.got.insert(entry, self.got_slots);
            self.got_slots += entry.slots();
        }
    }

    /// The GOT slot a relocation of `form` against `symbol` reads, if any.
    fn slot_for(&self, form: Form, symbol: usize, resolution: &Resolution) -> Option<usize> {
        let entry = match form {
            Form::GotPcRel | Form::Plt32 => GotEntry::Address(symbol),
            Form::TlsGd => GotEntry::TlsPair(symbol),
            Form::TlsLd => GotEntry::TlsModule(resolution.tls.get(&symbol)?.0),
            Form::GotTpOff => GotEntry::TpOffset(symbol),
            _ => return None,
        };
        self.got.get(&entry).copied()
    }

    /// Addresses every byte of the image must reach with a rel32.
    fn near_points(&self, resolution: &Resolution) -> Vec<usize> {
        let mut points: Vec<usize> = resolution
            .targets
            .iter()
            .flat_map(|t| [t.address, t.address + t.size as usize])
            .collect();
        points.extend(
            self.pc_relative_imports
                .iter()
                .map(|s| resolution.imports[s]),
        );
        points
    }

    fn write_got_and_stubs(
        &self,
        image: &mut [u8],
        layout: &Layout,
        base: usize,
        addresses: &[Option<usize>],
        resolution: &Resolution,
    ) {
        let mut put = |slot: usize, value: u64| {
            let at = layout.got_slot(slot);
            image[at..at + 8].copy_from_slice(&value.to_le_bytes());
        };
        for (&entry, &slot) in &self.got {
            match entry {
                GotEntry::Address(symbol) => put(slot, addresses[symbol].unwrap_or(0) as u64),
                GotEntry::TlsPair(symbol) => {
                    let (module, offset) = resolution.tls.get(&symbol).copied().unwrap_or((0, 0));
                    put(slot, module as u64);
                    put(slot + 1, offset as u64);
                }
                GotEntry::TlsModule(module) => {
                    put(slot, module as u64);
                    put(slot + 1, 0);
                }
                GotEntry::TpOffset(symbol) => {
                    put(
                        slot,
                        self.tp_offsets.get(&symbol).copied().unwrap_or(0) as u64,
                    );
                }
            }
        }
        for (&symbol, &n) in &self.stubs {
            let at = layout.stub(n);
            let slot = base + layout.got_slot(self.got[&GotEntry::Address(symbol)]);
            // The GOT follows the code in one mapping far smaller than 2 GiB.
            let jump = x86::jmp_indirect_rip(base + at, slot).expect("GOT within rel32 of stubs");
            image[at..at + jump.len()].copy_from_slice(&jump);
            image[at + jump.len()..at + STUB_LEN].fill(0xcc);
        }
    }
}

fn reloc_error(patch: &PatchObject, r: &load::Relocation, reason: RelocProblem) -> RelocError {
    RelocError {
        r_type: relocate::type_name(r.r_type),
        symbol: patch.symbol_label(r.symbol),
        section: patch
            .section(r.section)
            .map_or_else(|| format!("section #{}", r.section), |s| s.name.clone()),
        offset: r.offset,
        reason,
    }
}

/// Run-time address of every patch symbol (`None` for symbols in unloaded sections).
fn symbol_addresses(
    patch: &PatchObject,
    resolution: &Resolution,
    layout: &Layout,
    base: usize,
    sections: &HashMap<usize, usize>,
) -> Vec<Option<usize>> {
    patch
        .symbols
        .iter()
        .enumerate()
        .map(|(i, s)| match s.definition {
            Definition::Section { section, offset } => {
                sections.get(&section).map(|at| at + offset as usize)
            }
            Definition::Common { .. } => layout.commons.get(&i).map(|at| base + at),
            Definition::Absolute(v) => Some(v as usize),
            Definition::Undefined if s.name == resolve::GOT_SYMBOL => Some(base + layout.got),
            Definition::Undefined => resolution.imports.get(&i).copied(),
            Definition::NotLoaded => None,
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn relocate_all(
    patch: &PatchObject,
    plan: &Plan,
    resolution: &Resolution,
    layout: &Layout,
    base: usize,
    sections: &HashMap<usize, usize>,
    addresses: &[Option<usize>],
    image: &mut [u8],
) -> Result<(), RelocError> {
    for r in &patch.relocations {
        let error = |reason| reloc_error(patch, r, reason);
        let form = Form::of(r.r_type).ok_or_else(|| error(RelocProblem::Unsupported))?;
        let section = patch
            .section(r.section)
            .ok_or_else(|| error(RelocProblem::SymbolNotLoaded))?;
        if r.offset >= section.size {
            return Err(error(RelocProblem::OutsideSection { size: section.size }));
        }
        let section_at = layout.sections[&r.section];
        let place = sections[&r.section] as u64 + r.offset;
        let symbol = if r.symbol == 0 {
            0
        } else {
            addresses[r.symbol].ok_or_else(|| error(RelocProblem::SymbolNotLoaded))?
        };
        let got_slot = plan
            .slot_for(form, r.symbol, resolution)
            .map_or(0, |n| base + layout.got_slot(n));
        let mut target = symbol;
        if form == Form::Plt32 {
            // A call out of reach (libc, far from the executable) goes through its stub.
            let direct = relocate::compute(
                form,
                Inputs {
                    symbol: symbol as u64,
                    addend: r.addend,
                    place,
                    got_slot: 0,
                    got: 0,
                },
            );
            if let (Err(_), Some(&n)) = (direct, plan.stubs.get(&r.symbol)) {
                target = base + layout.stub(n);
            }
        }
        let inputs = Inputs {
            symbol: target as u64,
            addend: r.addend,
            place,
            got_slot: got_slot as u64,
            got: (base + layout.got) as u64,
        };
        let value = relocate::compute(form, inputs).map_err(error)?;
        let bytes = &mut image[section_at..section_at + section.size as usize];
        relocate::store(bytes, r.offset, value).map_err(error)?;
    }
    Ok(())
}

fn finish(
    patch: PatchObject,
    resolution: Resolution,
    mapping: Mapping,
    layout: Layout,
    addresses: &[Option<usize>],
    mut moved: HashMap<usize, Vec<u8>>,
) -> LinkedPatch {
    let targets = resolution
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| LinkedTarget {
            target: t.clone(),
            new_address: addresses[t.patch_symbol].unwrap_or(0),
            new_size: patch.symbols[t.patch_symbol].size,
            in_place: moved.remove(&i),
        })
        .collect();
    let mut symbols = HashMap::new();
    let mut functions = Vec::new();
    for (s, address) in patch.symbols.iter().zip(addresses) {
        let (Some(address), false) = (address, s.name.is_empty()) else {
            continue;
        };
        if !matches!(
            s.definition,
            Definition::Section { .. } | Definition::Common { .. }
        ) {
            continue;
        }
        if s.kind == load::SymbolType::Function {
            functions.push(LinkedFunction {
                name: s.name.clone(),
                address: *address,
                size: s.size,
            });
        }
        // A global wins over a local of the same name.
        if s.binding != load::Binding::Local || !symbols.contains_key(&s.name) {
            symbols.insert(s.name.clone(), *address);
        }
    }
    let base = mapping.addr();
    let eh_frames = patch
        .sections
        .iter()
        .filter(|s| s.kind == SectionKind::EhFrame)
        .map(|s| (base + layout.sections[&s.index], s.size as usize))
        .collect();
    let keeps_data = patch.sections.iter().any(|s| {
        matches!(
            s.kind,
            SectionKind::ReadOnly | SectionKind::RelRo | SectionKind::Data | SectionKind::Bss
        )
    }) || !layout.commons.is_empty();
    LinkedPatch {
        mapping,
        keeps_data,
        layout,
        targets,
        added: resolution.added,
        functions,
        eh_frames,
        symbols,
    }
}
