//! What the fuzz targets run, shared with the regression test of the normal test suite
//! (`dsu-agent/tests/fuzz_regressions.rs` includes this file by path), so a crash input kept
//! there replays exactly what the fuzzer ran.
//!
//! Each `check_*` function runs one stage of linking over patch bytes against a synthetic
//! process ([`synthetic_index`]) and asserts invariants beyond "no panic"; it returns the
//! stage's outcome so a test can assert the precise error.

use dsu_agent::link::{self, LinkError, RelocatedImage};
use dsu_agent::load::{self, Definition, LoadError, PatchObject, SectionKind};
use dsu_agent::place::{self, GOT_SLOT_LEN, STUB_LEN};
use dsu_agent::relocate::Form;
use dsu_agent::resolve::{self, ModuleInfo, ProcessSymbol, Resolution, SymbolIndex, SymbolKind};

/// Page size the synthetic image is laid out for.
pub const PAGE: usize = 4096;

/// Load bias of the synthetic executable (a PIE near where Linux maps them).
pub const MAIN_BIAS: usize = 0x5555_5555_0000;
/// Load bias of the synthetic C library, far from the executable (beyond rel32 reach).
pub const LIBC_BIAS: usize = 0x7fff_f7c0_0000;
/// Load bias of the synthetic dynamic loader.
pub const LDSO_BIAS: usize = 0x7fff_f7fc_0000;

fn sym(address: usize, size: u64, kind: SymbolKind, global: bool) -> ProcessSymbol {
    ProcessSymbol {
        module: 0,
        address,
        size,
        kind,
        global,
        file: 0,
    }
}

fn module(name: &str, bias: usize, is_main: bool, tls_modid: usize) -> ModuleInfo {
    ModuleInfo {
        name: name.to_string(),
        path: name.into(),
        bias,
        is_main,
        tls_modid,
    }
}

/// A process of three modules whose names the seed corpus (fuzz/seeds/) refers to:
/// functions and data of the executable, libc's functions, one name defined `static` in two
/// modules (ambiguous), one global defined twice (the executable's wins), two names of one
/// function, indirect functions (IFUNC) and a thread-local variable.
///
/// Thread-local variables live in the TLS block of this process's own executable when it has
/// one (Rust programs do), so initial-exec access can be computed for real; otherwise their
/// module has no TLS and such access is refused.
pub fn synthetic_index() -> SymbolIndex {
    use SymbolKind::{Function, IndirectFunction, Object, ThreadLocal};
    let tls_modid = dsu_sys::modules::loaded()
        .into_iter()
        .find(|m| m.is_main)
        .map_or(0, |m| m.tls_modid);
    let main = |offset: usize| MAIN_BIAS + offset;
    let libc = |offset: usize| LIBC_BIAS + offset;
    let mut index = SymbolIndex::default();
    let exe: &[(&[u8], ProcessSymbol)] = &[
        (b"price", sym(main(0x1100), 0x40, Function, true)),
        (b"compute", sym(main(0x1140), 0x20, Function, true)),
        (b"greet", sym(main(0x1160), 0x60, Function, true)),
        (b"tick", sym(main(0x11c0), 0x10, Function, false)),
        (b"handle_request", sym(main(0x11d0), 0x80, Function, true)),
        (b"counter_next", sym(main(0x1250), 0x30, Function, true)),
        (b"name_of", sym(main(0x1280), 0x18, Function, true)),
        (b"tick_tls", sym(main(0x12a0), 0x20, Function, true)),
        // Two names of one function.
        (b"alias_a", sym(main(0x12c0), 0x20, Function, true)),
        (b"alias_b", sym(main(0x12c0), 0x20, Function, true)),
        (b"price_rs", sym(main(0x1300), 0x30, Function, true)),
        (b"checksum_rs", sym(main(0x1330), 0x50, Function, true)),
        (b"label_rs", sym(main(0x1380), 0x30, Function, true)),
        (b"helper_static", sym(main(0x13b0), 0x10, Function, false)),
        (b"dispatch", sym(main(0x13c0), 0x10, IndirectFunction, true)),
        (b"dup", sym(main(0x13d0), 0x10, Function, true)),
        (
            b"_RNvNtCsgEmfK2I1SDS_4core9panicking18panic_bounds_check",
            sym(main(0x1400), 0x40, Function, true),
        ),
        (b"counter", sym(main(0x4000), 4, Object, true)),
        (b"config_name", sym(main(0x4008), 8, Object, true)),
        (b"data_init", sym(main(0x4010), 4, Object, false)),
        (b"tls_counter", sym(0, 4, ThreadLocal, true)),
    ];
    index.add_symbols(
        module("synthetic/app", MAIN_BIAS, true, tls_modid),
        exe.iter().cloned(),
    );
    let libc_symbols: &[(&[u8], ProcessSymbol)] = &[
        (b"puts", sym(libc(0x8_0000), 0x200, Function, true)),
        (b"snprintf", sym(libc(0x6_0000), 0x100, Function, true)),
        (b"strlen", sym(libc(0x9_0000), 0x40, Function, true)),
        (b"strchr", sym(libc(0x9_1000), 0x40, IndirectFunction, true)),
        (b"memcpy", sym(libc(0x9_2000), 0x40, Function, true)),
        (b"helper_static", sym(libc(0xa_0000), 0x10, Function, false)),
        (b"dup", sym(libc(0xa_1000), 0x10, Function, true)),
        (b"stdout", sym(libc(0x20_0000), 8, Object, true)),
        (b"errno_tls", sym(0x10, 4, ThreadLocal, true)),
    ];
    index.add_symbols(
        module("synthetic/libc.so.6", LIBC_BIAS, false, 0),
        libc_symbols.iter().cloned(),
    );
    let ldso: &[(&[u8], ProcessSymbol)] = &[(
        b"__tls_get_addr",
        sym(LDSO_BIAS + 0x1_0000, 0x30, Function, true),
    )];
    index.add_symbols(
        module("synthetic/ld-linux-x86-64.so.2", LDSO_BIAS, false, 0),
        ldso.iter().cloned(),
    );
    index
}

/// Every error must say something: the message is what a user gets.
fn assert_displays(error: &dyn std::error::Error) {
    assert!(!error.to_string().is_empty(), "empty message for {error:?}");
}

/// Load: parses `data`; a parsed patch must be internally consistent (every later stage
/// relies on it), a refusal must display.
pub fn check_load(data: &[u8]) -> Result<PatchObject, LoadError> {
    let result = load::parse(data);
    match &result {
        Ok(patch) => check_patch(patch),
        Err(e) => assert_displays(e),
    }
    result
}

fn check_patch(patch: &PatchObject) {
    assert!(
        patch.sections.is_sorted_by_key(|s| s.index),
        "sections out of ELF order"
    );
    assert!(patch.sections.iter().any(|s| s.kind == SectionKind::Code));
    let mut total = 0u64;
    for s in &patch.sections {
        assert!(
            s.align.is_power_of_two(),
            "section {} align {}",
            s.name,
            s.align
        );
        assert!(s.size > 0);
        if s.kind == SectionKind::Bss {
            assert!(s.data.is_empty());
        } else {
            assert_eq!(s.data.len() as u64, s.size, "section {}", s.name);
        }
        total += s.size;
    }
    assert!(total <= load::MAX_IMAGE_BYTES);
    for (i, s) in patch.symbols.iter().enumerate() {
        match s.definition {
            Definition::Section { section, offset } => {
                let sec = patch
                    .section(section)
                    .unwrap_or_else(|| panic!("symbol #{i} in a section that is not loaded"));
                assert!(
                    offset
                        .checked_add(s.size)
                        .is_some_and(|end| end <= sec.size)
                );
            }
            Definition::Common { size, align } => {
                assert!(align.is_power_of_two());
                assert!(size <= load::MAX_IMAGE_BYTES);
            }
            _ => {}
        }
        let _ = patch.symbol_label(i);
    }
    for r in &patch.relocations {
        assert!(patch.section(r.section).is_some(), "relocation of {r:?}");
        assert!(r.symbol < patch.symbols.len(), "relocation of {r:?}");
        assert_ne!(r.r_type, 0, "R_X86_64_NONE kept");
        // Zeroed sections have no bytes to relocate (the image leaves them to zero pages).
        assert_ne!(
            patch.section(r.section).map(|s| s.kind),
            Some(SectionKind::Bss),
            "relocation of a zeroed section: {r:?}"
        );
    }
}

/// Resolve: loads `data` and binds it to the synthetic process. A resolution must name only
/// functions the patch defines and process functions the index has, and bind every undefined
/// symbol a relocation uses.
pub fn check_resolve(data: &[u8], index: &SymbolIndex) -> Result<Resolution, LinkError> {
    let patch = check_load(data)?;
    let result = resolve::resolve(&patch, index);
    match &result {
        Ok(resolution) => {
            assert!(!resolution.targets.is_empty());
            for t in &resolution.targets {
                let s = &patch.symbols[t.patch_symbol];
                assert!(s.is_replacement_candidate());
                assert_eq!(s.name, t.name);
                assert!(
                    index
                        .definitions(&t.name)
                        .iter()
                        .any(|d| d.address == t.address && d.kind == SymbolKind::Function)
                );
            }
            for r in &patch.relocations {
                let s = &patch.symbols[r.symbol];
                if r.symbol != 0
                    && s.definition == Definition::Undefined
                    && s.name != resolve::GOT_SYMBOL
                {
                    assert!(
                        resolution.imports.contains_key(&r.symbol),
                        "{} unbound",
                        s.name
                    );
                }
            }
            for &i in resolution.imports.keys() {
                assert_eq!(patch.symbols[i].definition, Definition::Undefined);
            }
        }
        Err(e) => assert_displays(e),
    }
    Ok(result?)
}

/// Relocate: loads and resolves `data`, lays the image out and relocates it into a buffer at
/// the address placement would choose (the middle of the window every reference reaches),
/// the targets that can go in place relocated over their old functions. A relocated image
/// must differ from the unrelocated sections only at relocation places, GOT slots and stubs.
pub fn check_relocate(data: &[u8], index: &SymbolIndex) -> Result<RelocatedImage, LinkError> {
    let resolved = match link::resolve_patch(data, index) {
        Ok(resolved) => resolved,
        Err(e) => {
            assert_displays(&e);
            return Err(e);
        }
    };
    let in_place: Vec<usize> = (0..resolved.targets().len())
        .filter(|&i| resolved.in_place_candidate(i).is_some())
        .collect();
    let result = relocate(&resolved, &in_place);
    match &result {
        Ok(image) => {
            // Parsing is deterministic: the same patch as the one resolved.
            let patch = load::parse(data).expect("parsed once already");
            check_image(&patch, image, &in_place, &resolved);
        }
        Err(e) => assert_displays(e),
    }
    result
}

fn relocate(resolved: &link::Resolved, in_place: &[usize]) -> Result<RelocatedImage, LinkError> {
    let layout = resolved.layout(PAGE)?;
    // Where placement would centre the image.
    let (anchor, _) = place::window(&resolved.near_points(), layout.size)?;
    let base = anchor & !(PAGE - 1);
    Ok(resolved.relocate(layout, base, in_place)?)
}

fn check_image(
    patch: &PatchObject,
    image: &RelocatedImage,
    in_place: &[usize],
    resolved: &link::Resolved,
) {
    let layout = &image.layout;
    assert_eq!(image.image.len(), layout.size);
    assert_eq!(layout.size % PAGE, 0);
    assert!(layout.exec_end <= layout.read_only_end && layout.read_only_end <= layout.size);
    assert!(layout.stubs + layout.stub_count * STUB_LEN <= layout.exec_end);
    assert!(layout.got >= layout.exec_end);
    assert!(layout.got + layout.got_count * GOT_SLOT_LEN <= layout.read_only_end);
    assert_eq!(image.moved.len(), in_place.len());
    for (&i, code) in &image.moved {
        let candidate = resolved
            .in_place_candidate(i)
            .expect("moved a non-candidate");
        assert_eq!(code.len(), candidate.len());
    }

    // The image as it would be unrelocated, and the ranges relocation may write.
    let mut before = vec![0u8; layout.size];
    let mut writable: Vec<(usize, usize)> = vec![
        (layout.stubs, layout.stubs + layout.stub_count * STUB_LEN),
        (layout.got, layout.got + layout.got_count * GOT_SLOT_LEN),
    ];
    for s in &patch.sections {
        let at = layout.sections[&s.index];
        let end = at + s.size as usize;
        let region = match s.kind {
            SectionKind::Code => (0, layout.exec_end),
            SectionKind::ReadOnly | SectionKind::RelRo | SectionKind::EhFrame => {
                (layout.exec_end, layout.read_only_end)
            }
            SectionKind::Data | SectionKind::Bss => (layout.read_only_end, layout.size),
        };
        assert!(
            region.0 <= at && end <= region.1,
            "section {} outside its part",
            s.name
        );
        if s.kind != SectionKind::Bss {
            before[at..end].copy_from_slice(&s.data);
        }
    }
    for &i in in_place {
        let t = &resolved.targets()[i];
        if let Definition::Section { section, .. } = patch.symbols[t.patch_symbol].definition {
            let at = layout.sections[&section];
            let size = patch.section(section).map_or(0, |s| s.size as usize);
            writable.push((at, at + size));
        }
    }
    for r in &patch.relocations {
        let width = Form::of(r.r_type).expect("relocated").width();
        let at = layout.sections[&r.section] + r.offset as usize;
        let section_end =
            layout.sections[&r.section] + patch.section(r.section).map_or(0, |s| s.size as usize);
        assert!(
            at + width <= section_end,
            "relocation {r:?} writes past its section"
        );
        writable.push((at, at + width));
    }
    for (offset, (b, a)) in before.iter().zip(&image.image).enumerate() {
        if b != a {
            assert!(
                writable.iter().any(|&(s, e)| s <= offset && offset < e),
                "byte {offset:#x} changed outside every relocation, GOT slot and stub"
            );
        }
    }
}
