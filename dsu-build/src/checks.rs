//! Checks that two objects can be compared at all: machine code (no LTO), one function per
//! section, one variable per section, and the same compiler and flags.

use crate::error::BuildError;
use crate::read::{Role, Unit};

/// Refuses objects that hold link-time-optimisation code instead of machine code.
pub(crate) fn no_lto(unit: &Unit) -> Result<(), BuildError> {
    match unit
        .sections
        .iter()
        .flatten()
        .find(|s| s.name.starts_with(".gnu.lto_") || s.name == ".llvmbc" || s.name == ".llvm.lto")
    {
        Some(section) => Err(BuildError::Lto {
            object: unit.label.to_string(),
            section: section.name.clone(),
        }),
        None => Ok(()),
    }
}

/// Refuses a Rust object that link-time optimisation made from the whole program: it
/// defines the allocator shim (`__rust_alloc`), which rustc otherwise puts in an object of
/// its own at link time, with std's code beside the crate's.
pub(crate) fn no_rust_lto(unit: &Unit) -> Result<(), BuildError> {
    let shim = unit.symbols.iter().find(|s| {
        s.role == Role::Function
            && (s.name == "__rust_alloc"
                || (s.name.starts_with("_R") && s.name.ends_with("7___rustc12___rust_alloc")))
    });
    match shim {
        Some(s) => Err(BuildError::RustLto {
            object: unit.label.to_string(),
            symbol: s.name.clone(),
        }),
        None => Ok(()),
    }
}

/// Refuses objects compiled without `-ffunction-sections` or `-fdata-sections`: without them
/// a call between functions of one file is resolved by the assembler and leaves no relocation,
/// so code cannot be compared or moved one function at a time.
pub(crate) fn one_per_section(unit: &Unit) -> Result<(), BuildError> {
    for (index, section) in unit.sections.iter().enumerate() {
        let Some(section) = section else { continue };
        let functions = unit.defined_in(index, &[Role::Function]);
        let first_offset = functions.first().map(|&f| unit.symbols[f].value);
        let bare_text = section.name == ".text" && !functions.is_empty();
        let several = functions
            .iter()
            .any(|&f| Some(unit.symbols[f].value) != first_offset);
        if bare_text || several || first_offset.is_some_and(|v| v != 0) {
            let symbol = functions
                .iter()
                .map(|&f| unit.symbols[f].name.clone())
                .next_back()
                .unwrap_or_default();
            return Err(BuildError::NoFunctionSections {
                object: unit.label.to_string(),
                symbol,
                section: section.name.clone(),
            });
        }
        let data = unit.defined_in(index, &[Role::Data, Role::ThreadLocal]);
        if data.len() > 1 || (!data.is_empty() && !functions.is_empty()) {
            return Err(BuildError::NoDataSections {
                object: unit.label.to_string(),
                symbol: unit.symbols[data[data.len() - 1]].name.clone(),
                section: section.name.clone(),
            });
        }
    }
    Ok(())
}

/// The compiler and flags DWARF records (`DW_AT_producer`, in `.debug_str` with `-g`):
/// `GNU C17 12.2.0 -mtune=generic -march=x86-64 -g -O2 ...`.
fn producer(unit: &Unit) -> Option<String> {
    let strings = unit.section_named(".debug_str")?;
    strings
        .data
        .split(|&b| b == 0)
        .find(|s| {
            (s.starts_with(b"GNU ") || s.starts_with(b"clang version"))
                && s.windows(2).any(|w| w == b" -")
        })
        .map(|s| String::from_utf8_lossy(s).into_owned())
}

/// Refuses objects from different compilers (`.comment`) or with different recorded flags
/// (`.GCC.command.line`, written with `-frecord-gcc-switches`, and the DWARF producer string
/// when both have debug information).
pub(crate) fn same_compilation(original: &Unit, fixed: &Unit) -> Result<(), BuildError> {
    let text = |unit: &Unit, name: &str| {
        unit.section_named(name).map(|s| {
            s.data
                .split(|&b| b == 0)
                .filter(|part| !part.is_empty())
                .map(|part| String::from_utf8_lossy(part).into_owned())
                .collect::<Vec<_>>()
                .join("; ")
        })
    };
    let (a, b) = (text(original, ".comment"), text(fixed, ".comment"));
    if a != b {
        return Err(BuildError::DifferentCompiler {
            original: a.unwrap_or_else(|| "none".into()),
            fixed: b.unwrap_or_else(|| "none".into()),
        });
    }
    let (a, b) = (
        text(original, ".GCC.command.line"),
        text(fixed, ".GCC.command.line"),
    );
    if a != b {
        return Err(BuildError::DifferentFlags {
            original: a.unwrap_or_else(|| "none recorded".into()),
            fixed: b.unwrap_or_else(|| "none recorded".into()),
            place: ".GCC.command.line",
        });
    }
    if let (Some(a), Some(b)) = (producer(original), producer(fixed))
        && a != b
    {
        return Err(BuildError::DifferentFlags {
            original: a,
            fixed: b,
            place: "the DWARF producer",
        });
    }
    Ok(())
}
