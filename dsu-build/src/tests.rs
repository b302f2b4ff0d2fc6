//! Objects made with `object`'s writer, shaped as gcc writes them with `-ffunction-sections
//! -fdata-sections`, and what `build` makes of each pair.

use object::elf;
use object::read::elf::ElfFile64;
use object::write::{Object, Relocation, SectionId, Symbol, SymbolId, SymbolSection};
use object::{
    Architecture, BinaryFormat, Endianness, Object as _, ObjectSection as _, ObjectSymbol as _,
    RelocationFlags, SectionKind, SymbolFlags, SymbolKind, SymbolScope,
};

use crate::{BuildError, SCOPE_SECTION, build};

const PC32: u32 = elf::R_X86_64_PC32.0;
const PLT32: u32 = elf::R_X86_64_PLT32.0;

struct Obj(Object<'static>);

impl Obj {
    fn new() -> Obj {
        let mut o = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        o.add_file_symbol(b"shop.c".to_vec());
        Obj(o)
    }

    fn section(&mut self, name: &str, kind: SectionKind, bytes: &[u8]) -> SectionId {
        let id = self
            .0
            .add_section(Vec::new(), name.as_bytes().to_vec(), kind);
        if kind == SectionKind::UninitializedData {
            self.0.section_mut(id).append_bss(bytes.len() as u64, 8);
        } else {
            self.0.section_mut(id).set_data(bytes.to_vec(), 16);
        }
        id
    }

    fn symbol(
        &mut self,
        name: &str,
        kind: SymbolKind,
        local: bool,
        section: SectionId,
        value: u64,
        size: u64,
    ) -> SymbolId {
        self.0.add_symbol(Symbol {
            name: name.as_bytes().to_vec(),
            value,
            size,
            kind,
            scope: if local {
                SymbolScope::Compilation
            } else {
                SymbolScope::Dynamic
            },
            weak: false,
            section: SymbolSection::Section(section),
            flags: SymbolFlags::None,
        })
    }

    /// A function in its own `.text.NAME` section.
    fn function(&mut self, name: &str, local: bool, code: &[u8]) -> (SectionId, SymbolId) {
        let section = self.section(&format!(".text.{name}"), SectionKind::Text, code);
        let symbol = self.symbol(name, SymbolKind::Text, local, section, 0, code.len() as u64);
        (section, symbol)
    }

    /// A variable in its own `.data.NAME` (or `.bss.NAME`) section.
    fn variable(
        &mut self,
        name: &str,
        local: bool,
        bytes: &[u8],
        zeroed: bool,
    ) -> (SectionId, SymbolId) {
        let (prefix, kind) = if zeroed {
            (".bss", SectionKind::UninitializedData)
        } else {
            (".data", SectionKind::Data)
        };
        let section = self.section(&format!("{prefix}.{name}"), kind, bytes);
        let symbol = self.symbol(
            name,
            SymbolKind::Data,
            local,
            section,
            0,
            bytes.len() as u64,
        );
        (section, symbol)
    }

    fn undefined(&mut self, name: &str) -> SymbolId {
        self.0.add_symbol(Symbol {
            name: name.as_bytes().to_vec(),
            value: 0,
            size: 0,
            kind: SymbolKind::Unknown,
            scope: SymbolScope::Dynamic,
            weak: false,
            section: SymbolSection::Undefined,
            flags: SymbolFlags::None,
        })
    }

    fn reloc(
        &mut self,
        section: SectionId,
        offset: u64,
        symbol: SymbolId,
        addend: i64,
        r_type: u32,
    ) {
        self.0
            .add_relocation(
                section,
                Relocation {
                    offset,
                    symbol,
                    addend,
                    flags: RelocationFlags::Elf {
                        r_type: elf::RelocationType(r_type),
                    },
                },
            )
            .unwrap();
    }

    fn bytes(&self) -> Vec<u8> {
        self.0.write().unwrap()
    }
}

/// A call (`e8 rel32`) then `ret`, relocated against `target`.
const CALL: [u8; 6] = [0xe8, 0, 0, 0, 0, 0xc3];

/// A file: `price` calls the static `margin` and reads the static local `count.0`; `grade`
/// loads a string at `string_at` in a merged-strings section holding `strings`.
fn shop(price: &[u8], count: &[u8], strings: &[u8], string_at: u64) -> Vec<u8> {
    let mut o = Obj::new();
    let (_, margin) = o.function("margin", true, &[0x48, 0x8d, 0x47, 0x01, 0xc3]);
    let (count_section, _) = o.variable("count.0", true, count, false);
    let count_sym = o.0.section_symbol(count_section);
    let (text, _) = o.function("price", false, price);
    o.reloc(text, 1, margin, -4, PLT32);
    o.reloc(text, 7, count_sym, -4, PC32);
    let strs = o.section(".rodata.grade.str1.1", SectionKind::ReadOnlyString, strings);
    let label = o.symbol(".LC0", SymbolKind::Label, true, strs, string_at, 0);
    let (grade, _) = o.function("grade", false, &[0x48, 0x8d, 0x05, 0, 0, 0, 0, 0xc3]);
    o.reloc(grade, 3, label, -4, PC32);
    o.bytes()
}

/// `call margin; mov count.0(%rip), %eax; ret` with `imm` in a spare byte.
fn price(imm: u8) -> Vec<u8> {
    vec![
        0xe8, 0, 0, 0, 0, 0x8b, 0x05, 0, 0, 0, 0, 0x83, 0xc0, imm, 0xc3,
    ]
}

fn symbols(patch: &[u8]) -> Vec<(String, elf::SymbolBind, elf::SymbolType, bool)> {
    let file = ElfFile64::<Endianness>::parse(patch).unwrap();
    file.symbols()
        .map(|s| {
            let raw = s.elf_symbol();
            (
                s.name().unwrap().to_string(),
                raw.st_bind(),
                raw.st_type(),
                s.is_undefined(),
            )
        })
        .collect()
}

fn scope(patch: &[u8]) -> Vec<u8> {
    let file = ElfFile64::<Endianness>::parse(patch).unwrap();
    file.section_by_name(SCOPE_SECTION)
        .map(|s| s.data().unwrap().to_vec())
        .unwrap_or_default()
}

#[test]
fn garbage_and_truncated_input_is_an_error_not_a_panic() {
    let good = shop(&price(1), &[0; 8], b"big\0", 0);
    for bad in [&b""[..], b"hello", &good[..good.len() / 2], &good[..64]] {
        let err = build(bad, &good).unwrap_err();
        assert!(matches!(err, BuildError::NotObject { .. }), "{err}");
        assert!(build(&good, bad).is_err());
    }
}

#[test]
fn identical_objects_have_nothing_to_patch() {
    let a = shop(&price(1), &[0; 8], b"big\0", 0);
    assert_eq!(build(&a, &a).unwrap_err(), BuildError::NothingChanged);
}

#[test]
fn a_string_that_only_moved_is_no_change_and_new_text_is() {
    let a = shop(&price(1), &[0; 8], b"big\0", 0);
    let moved = shop(&price(1), &[0; 8], b"xx\0big\0", 3);
    assert_eq!(build(&a, &moved).unwrap_err(), BuildError::NothingChanged);
    let new_text = shop(&price(1), &[0; 8], b"large\0", 0);
    let patch = build(&a, &new_text).unwrap();
    let names: Vec<_> = patch
        .summary
        .changed
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(names, ["grade"]);
    // The string travels with the patch; nothing of the program is needed.
    assert!(patch.summary.references.is_empty());
}

#[test]
fn a_changed_function_is_global_and_refers_to_the_programs_statics() {
    let a = shop(&price(1), &[0; 8], b"big\0", 0);
    let b = shop(&price(2), &[0; 8], b"big\0", 0);
    let patch = build(&a, &b).unwrap();
    let s = &patch.summary;
    assert_eq!(s.changed.len(), 1);
    assert_eq!(s.changed[0].name, "price");
    assert!(!s.changed[0].local && !s.changed[0].clone);
    let refs: Vec<_> = s
        .references
        .iter()
        .map(|r| (r.name.as_str(), r.local))
        .collect();
    assert_eq!(refs, [("margin", true), ("count.0", true)]);

    let syms = symbols(&patch.object);
    assert!(
        syms.contains(&("price".into(), elf::STB_GLOBAL, elf::STT_FUNC, false)),
        "{syms:?}"
    );
    for name in ["margin", "count.0"] {
        assert!(
            syms.iter()
                .any(|s| s.0 == name && s.3 && s.1 == elf::STB_GLOBAL),
            "{name}: {syms:?}"
        );
    }
    assert!(!syms.iter().any(|s| s.0 == "grade"), "{syms:?}");
    assert_eq!(scope(&patch.object), b"margin\0shop.c\0count.0\0shop.c\0");
}

#[test]
fn a_changed_static_function_replaces_the_files_static() {
    let file = |code: &[u8]| {
        let mut o = Obj::new();
        let (_, helper) = o.function("helper.constprop.0", true, code);
        let (text, _) = o.function("run", false, &CALL);
        o.reloc(text, 1, helper, -4, PLT32);
        o.bytes()
    };
    let patch = build(&file(&[0x31, 0xc0, 0xc3]), &file(&[0x31, 0xc9, 0xc3])).unwrap();
    let changed = &patch.summary.changed;
    assert_eq!(changed.len(), 1);
    assert!(changed[0].local && changed[0].clone, "{changed:?}");
    let syms = symbols(&patch.object);
    assert!(syms.contains(&(
        "helper.constprop.0".into(),
        elf::STB_GLOBAL,
        elf::STT_FUNC,
        false
    )));
    assert_eq!(scope(&patch.object), b"helper.constprop.0\0shop.c\0");
}

#[test]
fn changed_data_is_refused_naming_it() {
    let a = shop(&price(1), &[0; 8], b"big\0", 0);
    let b = shop(&price(2), &[0; 16], b"big\0", 0);
    assert_eq!(
        build(&a, &b).unwrap_err(),
        BuildError::DataSize {
            symbol: "count.0".into(),
            old: 8,
            new: 16
        }
    );
    let c = shop(&price(2), &[1, 0, 0, 0, 0, 0, 0, 0], b"big\0", 0);
    assert_eq!(
        build(&a, &c).unwrap_err(),
        BuildError::StaticLocalInitializer {
            symbol: "count.0".into()
        }
    );
}

#[test]
fn a_global_variable_with_a_new_initializer_is_refused() {
    let file = |value: u8| {
        let mut o = Obj::new();
        o.variable("limit", false, &[value, 0, 0, 0], false);
        o.function("run", false, &[0xc3]);
        o.bytes()
    };
    assert_eq!(
        build(&file(1), &file(2)).unwrap_err(),
        BuildError::DataInitializer {
            symbol: "limit".into()
        }
    );
}

#[test]
fn a_renumbered_static_local_is_refused() {
    let file = |name: &str| {
        let mut o = Obj::new();
        let (section, _) = o.variable(name, true, &[0; 8], true);
        let sym = o.0.section_symbol(section);
        let (text, _) = o.function("tick", false, &[0x8b, 0x05, 0, 0, 0, 0, 0xc3]);
        o.reloc(text, 2, sym, -4, PC32);
        o.bytes()
    };
    let err = build(&file("count.0"), &file("count.1")).unwrap_err();
    assert_eq!(
        err,
        BuildError::StaticLocalRenumbered {
            symbol: "count.1".into(),
            old: "count.0".into()
        }
    );
}

#[test]
fn a_removed_global_function_is_refused() {
    let file = |with_old: bool| {
        let mut o = Obj::new();
        if with_old {
            o.function("old_api", false, &[0xc3]);
        }
        o.function("run", false, &[0x90, 0xc3]);
        o.bytes()
    };
    assert_eq!(
        build(&file(true), &file(false)).unwrap_err(),
        BuildError::RemovedFunction {
            symbol: "old_api".into()
        }
    );
}

#[test]
fn new_functions_and_variables_are_private_to_the_patch() {
    let file = |new: bool| {
        let mut o = Obj::new();
        let (text, _) = o.function("run", false, &CALL);
        if new {
            let (_, helper) = o.function("helper", false, &[0xc3]);
            o.reloc(text, 1, helper, -4, PLT32);
            let (_, var) = o.variable("seen", false, &[0; 4], true);
            let (t2, _) = o.function("mark", true, &[0xc7, 0x05, 0, 0, 0, 0, 1, 0, 0, 0, 0xc3]);
            o.reloc(t2, 2, var, -8, PC32);
        } else {
            let puts = o.undefined("puts");
            o.reloc(text, 1, puts, -4, PLT32);
        }
        o.bytes()
    };
    let patch = build(&file(false), &file(true)).unwrap();
    assert_eq!(patch.summary.added, ["helper", "mark"]);
    assert_eq!(patch.summary.new_data, ["seen"]);
    let syms = symbols(&patch.object);
    for name in ["helper", "mark", "seen"] {
        assert!(
            syms.iter()
                .any(|s| s.0 == name && s.1 == elf::STB_LOCAL && !s.3),
            "{name}: {syms:?}"
        );
    }
    assert!(syms.contains(&("run".into(), elf::STB_GLOBAL, elf::STT_FUNC, false)));
}

#[test]
fn lto_and_shared_sections_are_refused() {
    let plain = shop(&price(1), &[0; 8], b"big\0", 0);
    let mut o = Obj::new();
    o.section(".gnu.lto_.decls.0", SectionKind::Other, b"x");
    o.function("run", false, &[0xc3]);
    assert!(matches!(
        build(&plain, &o.bytes()).unwrap_err(),
        BuildError::Lto { .. }
    ));

    let mut o = Obj::new();
    let text = o.section(".text", SectionKind::Text, &[0xc3, 0xc3]);
    o.symbol("a", SymbolKind::Text, false, text, 0, 1);
    o.symbol("b", SymbolKind::Text, false, text, 1, 1);
    let err = build(&o.bytes(), &plain).unwrap_err();
    assert!(
        matches!(err, BuildError::NoFunctionSections { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("-ffunction-sections"));
}

#[test]
fn different_compilers_are_refused() {
    let with_comment = |text: &[u8]| {
        let mut o = Obj::new();
        o.section(".comment", SectionKind::OtherString, text);
        o.function("run", false, &[0xc3]);
        o.bytes()
    };
    let err = build(&with_comment(b"\0GCC: 12\0"), &with_comment(b"\0GCC: 13\0")).unwrap_err();
    assert!(matches!(err, BuildError::DifferentCompiler { .. }), "{err}");
}

/// Damaged objects (bytes overwritten, cut short) are refused or compared, never a panic.
#[test]
fn damaged_objects_never_panic() {
    let a = shop(&price(1), &[0; 8], b"big\0", 0);
    let b = shop(&price(2), &[0; 8], b"large\0", 0);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let mut damaged = b.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % damaged.len() as u64) as usize;
            damaged[at] = next() as u8;
        }
        if next() % 8 == 0 {
            damaged.truncate((next() % damaged.len() as u64) as usize);
        }
        let _ = build(&a, &damaged);
        let _ = build(&damaged, &a);
        let _ = crate::against::check(&a, &damaged, "damaged", &["price".into()]);
    }
}

/// A crate as rustc writes it: `handle_price` loads a format template labelled
/// `.Lanon.HASH.{anon}` (sized, in a merged-strings section it shares with the file name);
/// `handle_share` may panic, passing a `core::panic::Location` (unnamed read-only data
/// pointing at the file name through the strings section's symbol) at line `line`.
fn crate_object(price_imm: u8, template: &[u8], anon: u32, line: u32, file: &[u8]) -> Vec<u8> {
    let mut o = Obj::new();
    let mut strings = template.to_vec();
    let file_at = strings.len() as u64;
    strings.extend_from_slice(file);
    strings.push(0);
    let strs = o.section(".rodata.str1.1", SectionKind::ReadOnlyString, &strings);
    let label = o.symbol(
        &format!(".Lanon.0123abcd.{anon}"),
        SymbolKind::Data,
        true,
        strs,
        0,
        template.len() as u64,
    );
    let mut location = vec![0u8; 8];
    location.extend_from_slice(&(file.len() as u64).to_le_bytes());
    location.extend_from_slice(&line.to_le_bytes());
    location.extend_from_slice(&25u32.to_le_bytes());
    let loc = o.section(
        &format!(".data.rel.ro..Lanon.0123abcd.{}", anon + 1),
        SectionKind::ReadOnlyDataWithRel,
        &location,
    );
    let strs_sym = o.0.section_symbol(strs);
    o.reloc(loc, 0, strs_sym, file_at as i64, elf::R_X86_64_64.0);

    let lea = |imm: u8| vec![0x48, 0x8d, 0x3d, 0, 0, 0, 0, 0xb0, imm, 0xc3];
    let (price, _) = o.function(
        "_ZN4shop12handle_price17h0123456789abcdefE",
        true,
        &lea(price_imm),
    );
    o.reloc(price, 3, label, -4, PC32);
    let (share, _) = o.function("_ZN4shop12handle_share17hfedcba9876543210E", true, &lea(0));
    let loc_sym = o.0.section_symbol(loc);
    o.reloc(share, 3, loc_sym, -4, PC32);
    o.bytes()
}

fn changed(patch: &crate::Patch) -> Vec<&str> {
    patch
        .summary
        .changed
        .iter()
        .map(|f| f.name.as_str())
        .collect()
}

#[test]
fn rust_anonymous_constants_renumbered_and_panic_lines_moved_are_no_change() {
    const TEMPLATE: &[u8] = b"\x06price \xc0\x01\n\0";
    let a = crate_object(1, TEMPLATE, 3, 42, b"src/main.rs");
    // The fix added lines above `handle_share` and rustc numbered its constants anew.
    let b = crate_object(1, TEMPLATE, 7, 45, b"src/main.rs");
    assert_eq!(build(&a, &b).unwrap_err(), BuildError::NothingChanged);

    let fixed = crate_object(2, TEMPLATE, 7, 45, b"src/main.rs");
    let patch = build(&a, &fixed).unwrap();
    assert_eq!(
        changed(&patch),
        ["_ZN4shop12handle_price17h0123456789abcdefE"]
    );
    assert!(patch.summary.changed[0].local && !patch.summary.changed[0].clone);
    // The template is copied; the program keeps `handle_share` with its own locations.
    assert!(patch.summary.references.is_empty(), "{:?}", patch.summary);
}

#[test]
fn rust_constants_whose_bytes_changed_change_their_users() {
    let a = crate_object(1, b"\x06price \xc0\x01\n\0", 3, 42, b"src/main.rs");
    let b = crate_object(1, b"\x06cost: \xc0\x01\n\0", 3, 42, b"src/main.rs");
    let patch = build(&a, &b).unwrap();
    assert_eq!(
        changed(&patch),
        ["_ZN4shop12handle_price17h0123456789abcdefE"]
    );
    // Data of the same shape that is no panic location (not a `.rs` file) keeps every byte.
    let a = crate_object(1, b"\x06price \xc0\x01\n\0", 3, 42, b"src/main.txt");
    let b = crate_object(1, b"\x06price \xc0\x01\n\0", 3, 43, b"src/main.txt");
    let patch = build(&a, &b).unwrap();
    assert_eq!(
        changed(&patch),
        ["_ZN4shop12handle_share17hfedcba9876543210E"]
    );
}

#[test]
fn a_rust_object_of_the_whole_program_after_lto_is_refused() {
    let lto = |imm: u8| {
        let mut o = Obj::new();
        o.function("_RNvCsfLfy6EI15iL_7___rustc12___rust_alloc", true, &[0xc3]);
        o.function(
            "_ZN4shop5price17h0123456789abcdefE",
            true,
            &[0xb0, imm, 0xc3],
        );
        o.bytes()
    };
    let err = build(&lto(1), &lto(2)).unwrap_err();
    assert!(matches!(err, BuildError::RustLto { .. }), "{err}");
    assert!(err.to_string().contains("lto = false"), "{err}");
}

#[test]
fn the_unchanged_clones_of_changed_functions_are_listed() {
    // `audit` changes; of its clones `part.0` stays and `constprop.1` changes; `tally.part.0`
    // stays but `tally` does not change; `audit.part.2` is gone from the fixed object;
    // `auditor.part.0` is no clone of `audit`.
    let file = |audit: &[u8], constprop: &[u8], with_part_2: bool| {
        let mut o = Obj::new();
        o.function("audit", false, audit);
        o.function("audit.part.0", true, &[0x31, 0xc0, 0xc3]);
        o.function("audit.constprop.1", true, constprop);
        if with_part_2 {
            o.function("audit.part.2", true, &[0x31, 0xd2, 0xc3]);
        }
        o.function("tally", false, &[0x31, 0xf6, 0xc3]);
        o.function("tally.part.0", true, &[0x31, 0xff, 0xc3]);
        o.function("auditor.part.0", true, &[0x31, 0xdb, 0xc3]);
        o.bytes()
    };
    let original = file(&[0x31, 0xc0, 0xc3], &[0x31, 0xc9, 0xc3], true);
    let fixed = file(&[0x31, 0xc9, 0xc3], &[0x31, 0xc0, 0xc3], false);
    let patch = build(&original, &fixed).unwrap();
    let names: Vec<&str> = patch
        .summary
        .unchanged_clones
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["audit.part.0"]);
    assert!(patch.summary.unchanged_clones[0].local);
}

#[test]
fn a_part_that_branches_into_a_changed_body_changes_with_it_and_a_call_to_its_start_does_not() {
    // `hot.cold` jumps back into `hot` 16 bytes in (through `.text.hot`, as gcc writes it);
    // `caller` and `tail` call `hot` at its start. Only `hot`'s bytes change.
    const JMP: [u8; 5] = [0xe9, 0, 0, 0, 0];
    let file = |hot: u8| {
        let mut o = Obj::new();
        let (hot_text, hot_symbol) = o.function("hot", false, &[0x90; 24].map(|b| b ^ hot));
        let (cold, _) = o.function("hot.cold", true, &JMP);
        let hot_section = o.0.section_symbol(hot_text);
        o.reloc(cold, 1, hot_section, 16 - 4, PC32);
        let (caller, _) = o.function("caller", false, &CALL);
        o.reloc(caller, 1, hot_symbol, -4, PLT32);
        let (tail, _) = o.function("tail", false, &JMP);
        o.reloc(tail, 1, hot_section, -4, PC32);
        o.bytes()
    };
    let patch = build(&file(0), &file(1)).unwrap();
    let changed: Vec<&str> = patch
        .summary
        .changed
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(changed, ["hot", "hot.cold"]);
    assert!(patch.summary.unchanged_clones.is_empty());
}
