//! `dsu build`: a live patch from two versions of one object file.
//!
//! ORIGINAL.o and FIXED.o are the same translation unit before and after a fix, compiled with
//! the program's flags plus `-ffunction-sections -fdata-sections` (C), or the object of one
//! Rust crate built twice with one codegen unit (`cargo rustc --release -- --emit=obj,link`;
//! rustc's anonymous constants are compared by their bytes, its panic locations without
//! their line and column). [`build`] compares them function by function and writes a patch
//! object that `dsu apply` takes as it is:
//!
//! 1. `read`: each object into sections, symbols and relocations;
//! 2. checks: machine code (no LTO, C or Rust), one function or variable per section, the
//!    same compiler and recorded flags;
//! 3. `compare`: each function and variable described by its bytes and by
//!    what its relocations refer to (names, or the bytes of unnamed constants), never by
//!    offsets or symbol indices;
//! 4. `plan`: changed and new functions kept, with the new data and compiler
//!    constants they use; changed variables refused; everything else referred to by name in
//!    the program, file-local names listed with their file in the `.dsu.scope` section;
//! 5. `emit`: the plan written with `object`'s ELF writer.
//!
//! A changed function becomes a global definition under its own name, so it replaces the
//! program's function of that name (a `static` one included, its file recorded in
//! `.dsu.scope`); compiler clones (`.constprop.N`, `.isra.N`, `.part.N`, `.cold`) that changed
//! replace the program's clones of the same name. New functions and variables are local to
//! the patch.
//!
//! Pure: no system calls, so it runs on any input and under Miri.

pub mod against;
mod checks;
mod compare;
mod emit;
mod error;
mod lines;
mod plan;
mod read;
mod unwind;

pub use emit::SCOPE_SECTION;
pub use error::BuildError;

/// A function the patch replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    pub name: String,
    /// `static` in the program: replaced in the file `.dsu.scope` names.
    pub local: bool,
    /// A compiler clone (`NAME.constprop.N`, `.isra.N`, `.part.N`, `.cold`).
    pub clone: bool,
}

/// Something of the program the patch refers to by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub name: String,
    /// File-local (`static`, a static local such as `count.1`): listed in `.dsu.scope`.
    pub local: bool,
}

/// What a built patch holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The source file named by ORIGINAL.o's `STT_FILE` symbol.
    pub file: Option<String>,
    /// Functions replaced, sorted by name.
    pub changed: Vec<Function>,
    /// New functions, private to the patch.
    pub added: Vec<String>,
    /// New variables, private to the patch.
    pub new_data: Vec<String>,
    /// The program's functions and variables the patch uses, unchanged.
    pub references: Vec<Reference>,
    /// Compiler clones of replaced functions that the fix leaves as they are (the same code
    /// and references in both objects), sorted by name: the program's copies stay, and
    /// `dsu build --against` vouches for them so the agent does not take them for stale.
    pub unchanged_clones: Vec<Reference>,
    /// Functions that differ only in the line numbers they pass on (`__LINE__` moved by the
    /// fix, `.debug_line` says so): not replaced, the program's report its own lines.
    pub line_only: Vec<String>,
    /// Things the user should know that do not stop the build.
    pub warnings: Vec<String>,
}

/// A built patch: the object file's bytes and what it holds.
#[derive(Debug, Clone)]
pub struct Patch {
    pub object: Vec<u8>,
    pub summary: Summary,
}

/// Compares `original` and `fixed` (the bytes of ORIGINAL.o and FIXED.o) and builds the
/// patch, or says why the change cannot be live-patched.
pub fn build(original: &[u8], fixed: &[u8]) -> Result<Patch, BuildError> {
    let original = read::parse("ORIGINAL.o", original)?;
    let fixed = read::parse("FIXED.o", fixed)?;
    for unit in [&original, &fixed] {
        checks::no_lto(unit)?;
        checks::no_rust_lto(unit)?;
    }
    checks::same_compilation(&original, &fixed)?;
    for unit in [&original, &fixed] {
        checks::one_per_section(unit)?;
    }
    let plan = plan::plan(&original, &fixed)?;
    let object = emit::emit(&plan, &fixed)?;
    Ok(Patch {
        object,
        summary: plan.summary,
    })
}

#[cfg(test)]
mod tests;
