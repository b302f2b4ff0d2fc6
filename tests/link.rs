//! Loading and linking real patches (built with `cc` and `rustc` at test time) into this
//! running test program, then calling the linked new functions directly. No caller is
//! switched: the program's own functions keep their old behaviour.

mod support;

use std::hint::black_box;
use std::sync::atomic::{AtomicI64, Ordering};

use dsu_agent::link::{LinkError, link_in_process};
use dsu_agent::load::LoadError;
use dsu_agent::resolve::ResolveError;

// The "program" the patches are linked against: functions to replace, functions and globals
// for patches to use.

#[unsafe(no_mangle)]
pub static DSU_TEST_COUNTER: AtomicI64 = AtomicI64::new(41);

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dsu_test_price(x: i64) -> i64 {
    black_box(x) + 1
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dsu_test_base(x: i64) -> i64 {
    black_box(x) * 2
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dsu_test_uses_globals(x: i64) -> i64 {
    black_box(x)
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dsu_test_name(i: i32) -> *const u8 {
    black_box(i);
    c"old".as_ptr().cast()
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dsu_test_libc(s: *const u8) -> i64 {
    black_box(s) as i64
}

#[unsafe(no_mangle)]
#[inline(never)]
pub fn dsu_test_describe(x: u32) -> String {
    format!("old {}", black_box(x))
}

/// Keeps the program's functions in the binary (the linker drops unreferenced code).
fn keep_program_symbols() {
    black_box(dsu_test_price as *const () as usize);
    black_box(dsu_test_base as *const () as usize);
    black_box(dsu_test_uses_globals as *const () as usize);
    black_box(dsu_test_name as *const () as usize);
    black_box(dsu_test_libc as *const () as usize);
    black_box(dsu_test_describe as *const () as usize);
    black_box(&DSU_TEST_COUNTER);
}

fn link_file(path: &std::path::Path) -> Result<dsu_agent::link::LinkedPatch, LinkError> {
    keep_program_symbols();
    link_in_process(&std::fs::read(path).unwrap())
}

/// # Safety
/// `addr` is the entry of a function with the C signature `fn(i64) -> i64`.
unsafe fn call_i64(addr: usize, x: i64) -> i64 {
    // SAFETY: guaranteed by the caller.
    let f: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(addr) };
    f(x)
}

#[test]
fn c_patch_links_and_its_new_function_runs() {
    let dir = support::scratch("c-patch");
    let obj = support::cc_object(
        &dir,
        "price",
        "long dsu_test_price(long x) { return x * 100 + 3; }\n",
        &[],
    );
    let patch = link_file(&obj).expect("link");
    assert_eq!(patch.targets.len(), 1);
    let t = &patch.targets[0];
    assert_eq!(t.target.name, "dsu_test_price");
    assert_eq!(t.target.address, dsu_test_price as *const () as usize);
    assert_eq!(Some(t.new_address), patch.symbol("dsu_test_price"));
    // SAFETY: the patch defines `long dsu_test_price(long)`.
    assert_eq!(unsafe { call_i64(t.new_address, 5) }, 503);
    // Linking switched no caller.
    assert_eq!(dsu_test_price(5), 6);
    // The new code is mapped read+execute, never writable.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let line = maps
        .lines()
        .find(|l| {
            let (range, _) = l.split_once(' ').unwrap();
            let (lo, hi) = range.split_once('-').unwrap();
            let lo = usize::from_str_radix(lo, 16).unwrap();
            let hi = usize::from_str_radix(hi, 16).unwrap();
            (lo..hi).contains(&t.new_address)
        })
        .expect("new code mapped");
    assert!(line.contains(" r-xp "), "{line}");
}

#[test]
fn rust_patch_with_panic_locations_and_formatting_links() {
    let dir = support::scratch("rust-patch");
    let obj = support::rustc_object(
        &dir,
        "describe_patch",
        r#"
#[unsafe(no_mangle)]
pub fn dsu_test_describe(x: u32) -> String {
    if x == 13 {
        panic!("unlucky {x}");
    }
    format!("new {} ({})", x, x.wrapping_mul(3))
}
"#,
    );
    let patch = link_file(&obj).expect("link");
    let addr = patch.symbol("dsu_test_describe").expect("symbol");
    // SAFETY: the patch defines `fn dsu_test_describe(u32) -> String`, built by the same rustc.
    let f: fn(u32) -> String = unsafe { std::mem::transmute(addr) };
    assert_eq!(f(7), "new 7 (21)");
    assert_eq!(dsu_test_describe(7), "old 7");
}

#[test]
fn patch_with_static_data_and_strings() {
    let dir = support::scratch("data-patch");
    let obj = support::cc_object(
        &dir,
        "names",
        r#"
static const char *const names[] = { "zero", "one", "two" };
static int calls;
int dsu_patch_calls(void) { return calls; }
const char *dsu_test_name(int i) {
    calls++;
    return i >= 0 && i < 3 ? names[i] : "many";
}
"#,
        &[],
    );
    let patch = link_file(&obj).expect("link");
    assert_eq!(patch.added, vec!["dsu_patch_calls".to_string()]);
    let name = patch.symbol("dsu_test_name").unwrap();
    let calls = patch.symbol("dsu_patch_calls").unwrap();
    // SAFETY: signatures as declared in the C source above.
    let (name, calls): (extern "C" fn(i32) -> *const i8, extern "C" fn() -> i32) = unsafe {
        (
            std::mem::transmute::<usize, extern "C" fn(i32) -> *const i8>(name),
            std::mem::transmute::<usize, extern "C" fn() -> i32>(calls),
        )
    };
    let s = |p: *const i8| {
        // SAFETY: the patch returns pointers to NUL-terminated string literals.
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(s(name(1)), "one");
    assert_eq!(s(name(2)), "two");
    assert_eq!(s(name(9)), "many");
    assert_eq!(calls(), 3);
}

#[test]
fn patch_calls_back_into_the_program_and_reads_its_globals() {
    let dir = support::scratch("callback-patch");
    let obj = support::cc_object(
        &dir,
        "callback",
        r#"
extern long DSU_TEST_COUNTER;
long dsu_test_base(long);
long dsu_test_uses_globals(long x) { return dsu_test_base(x) + DSU_TEST_COUNTER; }
"#,
        &[],
    );
    let patch = link_file(&obj).expect("link");
    let f = patch.symbol("dsu_test_uses_globals").unwrap();
    DSU_TEST_COUNTER.store(41, Ordering::SeqCst);
    // SAFETY: `long dsu_test_uses_globals(long)`.
    assert_eq!(unsafe { call_i64(f, 10) }, 61);
    // It reads the live global, not a copy.
    DSU_TEST_COUNTER.store(1000, Ordering::SeqCst);
    // SAFETY: as above.
    assert_eq!(unsafe { call_i64(f, 10) }, 1020);
    DSU_TEST_COUNTER.store(41, Ordering::SeqCst);
}

#[test]
fn patch_referencing_libc_including_indirect_functions() {
    let dir = support::scratch("libc-patch");
    let obj = support::cc_object(
        &dir,
        "libc",
        r#"
#include <stdio.h>
#include <string.h>
long dsu_test_libc(const char *s) {
    char buf[64];
    snprintf(buf, sizeof buf, "<%s>", s);
    return (long)strlen(buf) * 1000 + (long)(strchr(buf, '>') - buf);
}
"#,
        &[],
    );
    let patch = link_file(&obj).expect("link");
    let f = patch.symbol("dsu_test_libc").unwrap();
    // SAFETY: `long dsu_test_libc(const char *)`.
    let f: extern "C" fn(*const u8) -> i64 = unsafe { std::mem::transmute(f) };
    assert_eq!(f(c"hello".as_ptr().cast()), 7006);
}

// ---- refusals ----

fn valid_object() -> Vec<u8> {
    let dir = support::scratch("valid");
    let obj = support::cc_object(
        &dir,
        "v",
        "long dsu_test_price(long x) { return x; }\n",
        &[],
    );
    std::fs::read(obj).unwrap()
}

fn load_error(bytes: &[u8]) -> LoadError {
    keep_program_symbols();
    match link_in_process(bytes) {
        Err(LinkError::Load(e)) => e,
        other => panic!("expected a load error, got {other:?}"),
    }
}

#[test]
fn refuses_a_file_that_is_not_elf() {
    let e = load_error(b"#!/bin/sh\necho hi\n");
    assert!(matches!(e, LoadError::NotElf { .. }), "{e}");
    assert!(e.to_string().contains("not an ELF file"), "{e}");
    assert!(matches!(load_error(b""), LoadError::NotElf { .. }));
}

#[test]
fn refuses_a_32_bit_object() {
    let mut bytes = valid_object();
    bytes[4] = 1; // ELFCLASS32
    assert_eq!(load_error(&bytes), LoadError::Elf32);
}

#[test]
fn refuses_another_architecture() {
    let mut bytes = valid_object();
    bytes[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    let e = load_error(&bytes);
    assert_eq!(
        e,
        LoadError::WrongMachine {
            machine: "AArch64",
            code: 183
        }
    );
    assert!(e.to_string().contains("AArch64"));
}

#[test]
fn refuses_an_executable() {
    let dir = support::scratch("exe");
    let exe = support::cc_program(&dir, "prog", &[("p.c", "int main(void){return 0;}\n")], &[]);
    let e = load_error(&std::fs::read(exe).unwrap());
    assert!(matches!(e, LoadError::NotRelocatable { .. }), "{e}");
    assert!(e.to_string().contains("not a relocatable object"), "{e}");
}

#[test]
fn refuses_truncated_objects() {
    let bytes = valid_object();
    for len in [10, 64, bytes.len() / 2, bytes.len() - 1] {
        let e = load_error(&bytes[..len]);
        assert!(
            matches!(e, LoadError::Malformed(_) | LoadError::Truncated { .. }),
            "{len}: {e}"
        );
    }
}

#[test]
fn refuses_a_truncated_section() {
    let bytes = valid_object();
    // Point the first code section's data past the end of the file.
    let obj = object::read::elf::ElfFile64::<object::Endianness>::parse(&*bytes).unwrap();
    let shoff = u64::from_le_bytes(bytes[0x28..0x30].try_into().unwrap()) as usize;
    let text = object::Object::section_by_name(&obj, ".text.dsu_test_price").unwrap();
    let index = object::ObjectSection::index(&text).0;
    let mut bytes = bytes.clone();
    let sh = shoff + index * 64;
    let past_end = (bytes.len() as u64 + 16).to_le_bytes();
    bytes[sh + 24..sh + 32].copy_from_slice(&past_end); // sh_offset
    let e = load_error(&bytes);
    assert_eq!(
        e,
        LoadError::Truncated {
            section: ".text.dsu_test_price".into()
        }
    );
}

#[test]
fn refuses_an_unresolvable_symbol_and_names_it() {
    let dir = support::scratch("unresolved");
    let obj = support::cc_object(
        &dir,
        "u",
        r#"
long dsu_no_such_function(long);
extern long dsu_no_such_global;
long dsu_test_price(long x) { return dsu_no_such_function(x) + dsu_no_such_global; }
"#,
        &[],
    );
    match link_file(&obj) {
        Err(LinkError::Resolve(ResolveError::Unresolved { names })) => {
            assert_eq!(names, ["dsu_no_such_function", "dsu_no_such_global"]);
        }
        other => panic!("expected unresolved, got {other:?}"),
    }
}

#[test]
fn refuses_a_patch_that_replaces_nothing() {
    let dir = support::scratch("nothing");
    let obj = support::cc_object(&dir, "n", "long dsu_brand_new(long x) { return x; }\n", &[]);
    let e = link_file(&obj).unwrap_err();
    assert!(
        matches!(&e, LinkError::Resolve(ResolveError::NothingToReplace { functions }) if functions == &["dsu_brand_new"]),
        "{e}"
    );
}

#[test]
fn ambiguous_static_symbols_are_refused_with_candidates() {
    let dir = support::scratch("ambiguous");
    let helper = |n: i32| {
        format!(
            "static int helper(int x) {{ return x + {n}; }}\nint use{n}(int x) {{ return helper(x); }}\n"
        )
    };
    let exe = support::cc_program(
        &dir,
        "prog",
        &[
            ("a.c", &helper(1)),
            ("b.c", &helper(2)),
            (
                "m.c",
                "int use1(int); int use2(int); int main(int c, char **v) { (void)v; return use1(c) + use2(c); }\n",
            ),
        ],
        &["-O0"],
    );
    let index = dsu_agent::resolve::index_file(&exe, 0).unwrap();
    match index.resolve("helper") {
        Err(ResolveError::Ambiguous { name, candidates }) => {
            assert_eq!(name, "helper");
            assert_eq!(candidates.len(), 2, "{candidates:?}");
        }
        other => panic!("expected ambiguity, got {other:?}"),
    }
    // Replacing it is ambiguous too.
    assert!(matches!(
        index.replacement_target("helper"),
        Err(ResolveError::Ambiguous { .. })
    ));
    // A unique static function resolves.
    assert!(index.resolve("use1").unwrap().is_some());
}

#[test]
fn unsupported_relocation_is_named() {
    let dir = support::scratch("gotoff");
    // An offset from the GOT (R_X86_64_GOTOFF64) against a function the program has: resolved,
    // then refused by type, naming it.
    let obj = support::cc_object(
        &dir,
        "gotoff",
        r#"
long dsu_test_price(long x) { return x + 1; }
__asm__(".section .data.gotoff,\"aw\"\n.globl dsu_gotoff\ndsu_gotoff:\n"
        "  .quad dsu_test_base@GOTOFF\n.text\n");
"#,
        &[],
    );
    let e = link_file(&obj).unwrap_err().to_string();
    assert!(
        e.contains("R_X86_64_GOTOFF64 against dsu_test_base")
            && e.contains("unsupported relocation type"),
        "error should name the relocation and its symbol: {e}"
    );
}

/// The section headers of an object: `(index, name, offset of the header in the file)`.
fn section_headers(bytes: &[u8]) -> Vec<(usize, String, usize)> {
    let obj = object::read::elf::ElfFile64::<object::Endianness>::parse(bytes).unwrap();
    let shoff = u64::from_le_bytes(bytes[0x28..0x30].try_into().unwrap()) as usize;
    object::Object::sections(&obj)
        .map(|s| {
            let index = object::ObjectSection::index(&s).0;
            let name = object::ObjectSection::name(&s).unwrap().to_string();
            (index, name, shoff + index * 64)
        })
        .collect()
}

/// A patch whose code has relocations (it calls libc), in `.text.dsu_test_price`.
fn object_with_relocations() -> Vec<u8> {
    let dir = support::scratch("relocated");
    let obj = support::cc_object(
        &dir,
        "r",
        "#include <stdlib.h>\nlong dsu_test_price(long x) { return labs(x) + (long)getenv(\"X\"); }\n",
        &[],
    );
    std::fs::read(obj).unwrap()
}

/// A relocation section pointed (by `sh_info`) at a section that does not exist, or at one
/// it does not belong to (here `.comment`, which is not loaded), used to be skipped: the code
/// went live unrelocated. Both are refused naming the relocation section.
#[test]
fn a_relocation_section_for_the_wrong_section_is_refused() {
    let bytes = object_with_relocations();
    let headers = section_headers(&bytes);
    let (_, _, rela) = headers
        .iter()
        .find(|(_, n, _)| n == ".rela.text.dsu_test_price")
        .cloned()
        .expect("the call is relocated");
    let comment = headers.iter().find(|(_, n, _)| n == ".comment").unwrap().0;
    for (target, says) in [(9999u32, "does not exist"), (0, "does not exist")] {
        let mut bad = bytes.clone();
        bad[rela + 44..rela + 48].copy_from_slice(&target.to_le_bytes()); // sh_info
        let e = load_error(&bad).to_string();
        assert!(
            e.contains(".rela.text.dsu_test_price") && e.contains(says),
            "{target}: {e}"
        );
    }
    let mut bad = bytes.clone();
    bad[rela + 44..rela + 48].copy_from_slice(&(comment as u32).to_le_bytes());
    let e = load_error(&bad).to_string();
    assert!(
        e.contains(".rela.text.dsu_test_price") && e.contains(".comment"),
        "{e}"
    );
}

/// An `R_X86_64_NONE` entry is checked like any other: a symbol index beyond the symbol table
/// is refused, not skipped.
#[test]
fn a_none_relocation_with_a_bad_symbol_is_refused() {
    let bytes = object_with_relocations();
    let headers = section_headers(&bytes);
    let (_, _, rela) = headers
        .iter()
        .find(|(_, n, _)| n == ".rela.text.dsu_test_price")
        .cloned()
        .unwrap();
    let offset = u64::from_le_bytes(bytes[rela + 24..rela + 32].try_into().unwrap()) as usize;
    let mut bad = bytes.clone();
    // r_info of the first entry: symbol 0x7fffff, type R_X86_64_NONE (0).
    let info: u64 = 0x7f_ffff << 32;
    bad[offset + 8..offset + 16].copy_from_slice(&info.to_le_bytes());
    let e = load_error(&bad).to_string();
    assert!(e.contains("beyond the symbol table"), "{e}");
}

/// The refusals a newcomer meets first say what to do (issue 11).
#[test]
fn a_non_pic_patch_is_told_to_use_fpic() {
    let dir = support::scratch("nopic");
    let obj = support::cc_object(
        &dir,
        "nopic",
        "extern char **environ;\nlong dsu_test_price(long x) { return x + (long)environ; }\n",
        &["-fno-pic", "-mcmodel=small", "-fno-PIE"],
    );
    keep_program_symbols();
    let e = link_file(&obj).unwrap_err().to_string();
    assert!(e.contains("-fPIC"), "{e}");
}

#[test]
fn an_lto_object_is_told_to_drop_flto() {
    let dir = support::scratch("lto");
    let obj = support::cc_object(
        &dir,
        "lto",
        "long dsu_test_price(long x) { return x * 3; }\n",
        &["-flto"],
    );
    let e = load_error(&std::fs::read(obj).unwrap());
    assert!(matches!(e, LoadError::NoFunctions { lto: true }), "{e}");
    assert!(e.to_string().contains("without -flto"), "{e}");
}

#[test]
fn a_rust_patch_whose_function_was_dropped_is_told_about_no_mangle() {
    let dir = support::scratch("nomangle");
    // Private and unused: rustc emits no code for it.
    let obj = support::rustc_object(&dir, "dropped", "fn price(x: u32) -> u32 { x * 2 }\n");
    let e = load_error(&std::fs::read(obj).unwrap());
    assert!(matches!(e, LoadError::NoFunctions { lto: false }), "{e}");
    assert!(e.to_string().contains("no_mangle"), "{e}");
}
