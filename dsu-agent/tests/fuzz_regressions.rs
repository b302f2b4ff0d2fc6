//! Inputs the fuzz targets (fuzz/, docs/fuzzing.md) crashed on, replayed in the normal test
//! suite through the very checks the targets run, each asserting the precise outcome; and the
//! seed corpus, whose outcomes show the synthetic process covers every stage.
//!
//! A regression is a file `fuzz/regressions/<target>/<name>` with `<name>.expected` beside it:
//! the whole message of the error the input must now be refused with.

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz_checks;

use std::path::{Path, PathBuf};

use dsu_agent::resolve::SymbolIndex;

fn fuzz_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(sub)
}

/// Runs the check of `target` over `data`: `Ok` or the error's message.
fn outcome(target: &str, data: &[u8], index: &SymbolIndex) -> Result<(), String> {
    match target {
        "load" => fuzz_checks::check_load(data)
            .map(drop)
            .map_err(|e| e.to_string()),
        "resolve" => fuzz_checks::check_resolve(data, index)
            .map(drop)
            .map_err(|e| e.to_string()),
        "relocate" => fuzz_checks::check_relocate(data, index)
            .map(drop)
            .map_err(|e| e.to_string()),
        _ => panic!("unknown fuzz target {target}"),
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn every_crash_found_by_fuzzing_is_refused_precisely() {
    let index = fuzz_checks::synthetic_index();
    let mut replayed = 0;
    for target in ["load", "resolve", "relocate"] {
        for input in files(&fuzz_dir("regressions").join(target)) {
            if input.extension().is_some_and(|e| e == "expected") {
                continue;
            }
            let expected_file = input.with_extension("expected");
            let expected = std::fs::read_to_string(&expected_file)
                .unwrap_or_else(|e| panic!("{}: {e}", expected_file.display()));
            let data = std::fs::read(&input).unwrap();
            let got = outcome(target, &data, &index);
            assert_eq!(
                got,
                Err(expected.trim_end().to_string()),
                "{target} regression {}",
                input.display()
            );
            replayed += 1;
        }
    }
    eprintln!("{replayed} regression inputs replayed");
}

#[test]
fn seed_patches_reach_every_stage() {
    // Each seed (fuzz/seeds/, fuzz/seeds.sh) with the outcome of the relocate check: `None`
    // relocated, or a part of the refusal's message.
    let expected: &[(&str, Option<&str>)] = &[
        (
            "c-aliases.o",
            Some("dispatch is an indirect function (IFUNC)"),
        ),
        // Two statics named alike, one in the module of the replaced function: that one.
        ("c-ambiguous.o", None),
        ("c-data.o", None),
        ("c-ifunc.o", Some("cannot resolve indirect function strchr")),
        ("c-price-O0.o", None),
        ("c-price-nopic.o", Some("R_X86_64_32 against")),
        ("c-price.o", None),
        (
            "c-scoped.o",
            Some("count.0 (static in shapes.c), helper (static in shapes.c)"),
        ),
        ("c-tls-defined.o", Some("defines thread-local storage")),
        ("c-tls-gd.o", None),
        ("c-tls-ie.o", None),
        ("rust-patch.o", None),
    ];
    let index = fuzz_checks::synthetic_index();
    let seeds = files(&fuzz_dir("corpus/relocate"));
    assert_eq!(seeds.len(), expected.len(), "{seeds:?}");
    for (seed, (name, refusal)) in seeds.iter().zip(expected) {
        assert!(seed.ends_with(name), "{} is not {name}", seed.display());
        let got = outcome("relocate", &std::fs::read(seed).unwrap(), &index);
        match (refusal, &got) {
            (None, Ok(())) => {}
            (Some(part), Err(message)) if message.contains(part) => {}
            _ => panic!("seed {name}: {got:?}, expected {refusal:?}"),
        }
    }
}
