//! Why `dsu build` refused: each error names the object, section or symbol and what to do.

use thiserror::Error;

/// A change that cannot become a live patch, or objects that cannot be compared.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BuildError {
    #[error("{object}: not an object file dsu can compare: {reason}")]
    NotObject { object: String, reason: String },
    #[error(
        "{object} holds link-time-optimisation intermediate code (section {section}), not \
         machine code; compile this file without -flto"
    )]
    Lto { object: String, section: String },
    #[error(
        "{object} holds the whole program after link-time optimisation (it defines the \
         allocator shim {symbol}, which only the linked program has); build the crate with \
         lto = false (the default) in its release profile"
    )]
    RustLto { object: String, symbol: String },
    #[error(
        "{object}: function {symbol} shares section {section} with other code; compile the file \
         with -ffunction-sections (and -fdata-sections)"
    )]
    NoFunctionSections {
        object: String,
        symbol: String,
        section: String,
    },
    #[error(
        "{object}: variable {symbol} shares section {section} with other data; compile the file \
         with -fdata-sections"
    )]
    NoDataSections {
        object: String,
        symbol: String,
        section: String,
    },
    #[error(
        "the objects were built by different compilers ({original:?} and {fixed:?} in .comment); \
         build both with the program's compiler"
    )]
    DifferentCompiler { original: String, fixed: String },
    #[error(
        "the objects were compiled with different flags ({original:?} and {fixed:?} in \
         {place}); compile both with the program's flags"
    )]
    DifferentFlags {
        original: String,
        fixed: String,
        place: &'static str,
    },
    #[error(
        "the size of {symbol} changed from {old} to {new} bytes; a live patch cannot change the \
         layout of existing data (the running program keeps it)"
    )]
    DataSize { symbol: String, old: u64, new: u64 },
    #[error(
        "the initial value of {symbol} changed; the running program keeps its current value, so \
         a live patch cannot change an initializer: leave it as it was and change the code"
    )]
    DataInitializer { symbol: String },
    #[error(
        "the initial value of static local {symbol} changed; the running program keeps its \
         current value, so a live patch cannot change it: leave it as it was"
    )]
    StaticLocalInitializer { symbol: String },
    #[error(
        "static local {symbol} of FIXED.o has no counterpart in ORIGINAL.o, which has {old} \
         instead (the compiler numbered it differently); the patch would start a new variable \
         instead of using the program's; declare the static locals in the same order as before"
    )]
    StaticLocalRenumbered { symbol: String, old: String },
    #[error("{symbol} changed from {old} to {new}; a live patch cannot change what a symbol is")]
    KindChanged {
        symbol: String,
        old: &'static str,
        new: &'static str,
    },
    #[error(
        "function {symbol} is in ORIGINAL.o but not in FIXED.o; other files of the program may \
         still call it and a live patch cannot remove a function: keep it in the fixed source"
    )]
    RemovedFunction { symbol: String },
    #[error("thread-local variable {symbol} is new; a live patch cannot add thread-local storage")]
    NewThreadLocal { symbol: String },
    #[error("{object}: two definitions of {symbol}; cannot tell which one a reference means")]
    DuplicateSymbol { object: String, symbol: String },
    #[error(
        "{object}: {what} refers to symbol {symbol} ({reason}); dsu build cannot carry that \
         reference into a patch"
    )]
    UnsupportedReference {
        object: String,
        what: String,
        symbol: String,
        reason: &'static str,
    },
    #[error(
        "ORIGINAL.o has no STT_FILE symbol naming its source file, which the patch needs to \
         refer to the program's static {symbol}"
    )]
    NoFileSymbol { symbol: String },
    #[error(
        "no function changed between ORIGINAL.o and FIXED.o (data-only or no changes): nothing \
         to patch"
    )]
    NothingChanged,
    #[error(
        "{program} has no function {symbol}; the patch would replace nothing there (is \
         ORIGINAL.o from this program?)"
    )]
    NotInProgram { symbol: String, program: String },
    #[error(
        "{symbol} in {program} is not the code ORIGINAL.o has (first difference at byte {offset}); \
         the program was built from other sources or with other flags: build ORIGINAL.o as the \
         program was built"
    )]
    ProgramDiffers {
        symbol: String,
        program: String,
        offset: u64,
    },
    #[error("cannot write the patch object: {0}")]
    Write(String),
}
