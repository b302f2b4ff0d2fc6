//! `dsu pack`: bind a patch to the program it was written for.
//!
//! For each global function the patch defines that the program also has, the patch records the
//! GNU build id of the module holding it and the SHA-256 of its code there, in a `.dsu.expect`
//! section (`dsu_agent::trust::expect`). The agent then refuses the patch in any process that
//! runs another build or whose function differs. The object is rewritten with `object`'s ELF
//! builder, which keeps every other section, symbol and relocation as it was.

use std::path::{Path, PathBuf};

use clap::Args;
use dsu_agent::trust::expect::{self, Expectation};
use dsu_agent::trust::keys::hex;
use dsu_agent::trust::trailer;
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

use crate::error::CliError;
use crate::patch::{read_file, write_file};

#[derive(Debug, Args)]
pub struct PackArgs {
    /// The patch (an ELF relocatable object).
    #[arg(value_name = "PATCH")]
    patch: PathBuf,
    /// The program it is for: a running process (a number) or the binary file (`./123` for a
    /// file named 123).
    #[arg(long, value_name = "PID|BINARY")]
    against: String,
    /// Where to write the packed patch; PATCH itself (replaced atomically) by default.
    #[arg(short, long, value_name = "OUT")]
    out: Option<PathBuf>,
}

pub fn run(args: &PackArgs) -> Result<(), CliError> {
    let bad = |reason: String| CliError::File {
        what: "cannot pack",
        path: args.patch.clone(),
        reason,
    };
    let bytes = read_file("cannot read patch", &args.patch)?;
    let (object_bytes, trailer) = trailer::split(&bytes).map_err(|e| bad(e.to_string()))?;
    if trailer.is_some() {
        eprintln!(
            "dsu: warning: the signature of {} is dropped; sign the packed patch",
            args.patch.display()
        );
    }
    // Clones a `dsu build --against` vouched for are bound again, to this program.
    let unchanged: Vec<String> = expect::of_object(object_bytes)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.kind == expect::Kind::Unchanged)
        .map(|e| e.function)
        .collect();
    let (packed, expectations) =
        bind(object_bytes, &args.against, &unchanged).map_err(|e| match e {
            BindError::Cli(e) => e,
            BindError::Object(reason) => bad(reason),
        })?;
    let out = args.out.as_ref().unwrap_or(&args.patch);
    write_file("cannot write packed patch", out, &packed, 0o644, false)?;
    for e in &expectations {
        let what = match e.kind {
            expect::Kind::Replaced => "",
            expect::Kind::Unchanged => " (unchanged clone)",
        };
        crate::output::print_line(format_args!(
            "{}{what}: {} build id {}, code sha256 {}",
            e.function, e.module, e.build_id, e.code_sha256
        ));
    }
    let clones = unchanged_count(&expectations);
    crate::output::print_line(format_args!(
        "packed {} against {} ({} functions bound{})",
        out.display(),
        args.against,
        expectations.len() - clones,
        match clones {
            0 => String::new(),
            1 => ", 1 unchanged clone vouched for".to_string(),
            n => format!(", {n} unchanged clones vouched for"),
        }
    ));
    Ok(())
}

/// How many of `expectations` vouch for unchanged clones (the rest bind replaced functions).
pub fn unchanged_count(expectations: &[Expectation]) -> usize {
    expectations
        .iter()
        .filter(|e| e.kind == expect::Kind::Unchanged)
        .count()
}

/// Why a patch could not be bound.
pub enum BindError {
    Cli(CliError),
    /// The patch object could not be read or rewritten.
    Object(String),
}

/// `object_bytes` (a patch without signature) with a `.dsu.expect` section binding each global
/// function it defines to its code in `against` (a pid, or a binary's path), and those
/// expectations. A function the program does not have is new: nothing to bind (a warning). A
/// name the program defines more than once (`static`s of several files) is not bound either:
/// the first definition may not be the one the patch replaces (a warning). Each of
/// `unchanged` (clones of replaced functions that `dsu build` found the fix leaves as they
/// are) is bound the same way, as an `unchanged` line.
pub fn bind(
    object_bytes: &[u8],
    against: &str,
    unchanged: &[String],
) -> Result<(Vec<u8>, Vec<Expectation>), BindError> {
    let patch = object::File::parse(object_bytes).map_err(|e| BindError::Object(e.to_string()))?;
    let wanted: Vec<String> = patch
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.is_definition() && s.is_global())
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .collect();
    let modules = modules_of(against).map_err(BindError::Cli)?;
    let mut expectations = Vec::new();
    for name in &wanted {
        if definitions(name, &modules) > 1 {
            eprintln!(
                "dsu: warning: {name} is defined more than once in {against}: not bound (the \
                 agent still checks which one the patch replaces)"
            );
            continue;
        }
        match find(name, expect::Kind::Replaced, &modules) {
            Some(e) => expectations.push(e),
            None => eprintln!(
                "dsu: warning: {name} is not a function of {against}: it is new, nothing to bind"
            ),
        }
    }
    for name in unchanged {
        // Not vouched for, the clone is taken for stale: the agent refuses the patch naming it.
        let found = (definitions(name, &modules) == 1)
            .then(|| find(name, expect::Kind::Unchanged, &modules))
            .flatten();
        match found {
            Some(e) => expectations.push(e),
            None => eprintln!(
                "dsu: warning: the clone {name} is not defined once in {against}: not vouched \
                 for (the agent will take it for stale)"
            ),
        }
    }
    let packed = with_section(object_bytes, expect::encode(&expectations).into_bytes())
        .map_err(BindError::Object)?;
    Ok((packed, expectations))
}

/// How many function definitions named `name` the `modules` have, at distinct addresses.
fn definitions(name: &str, modules: &[(PathBuf, Vec<u8>)]) -> usize {
    modules
        .iter()
        .filter_map(|(_, data)| object::File::parse(&**data).ok())
        .map(|file| {
            let mut at: Vec<u64> = file
                .symbols()
                .chain(file.dynamic_symbols())
                .filter(|s| s.kind() == SymbolKind::Text && s.is_definition())
                .filter(|s| s.name() == Ok(name))
                .map(|s| s.address())
                .collect();
            at.sort_unstable();
            at.dedup();
            at.len()
        })
        .sum()
}

/// The module files to look in: the binary, or the process's executable and the files it
/// has mapped executable (from `/proc/PID/maps`), executable first.
fn modules_of(against: &str) -> Result<Vec<(PathBuf, Vec<u8>)>, CliError> {
    let read = |path: PathBuf| -> Result<(PathBuf, Vec<u8>), CliError> {
        let data = read_file("cannot read", &path)?;
        Ok((path, data))
    };
    let Ok(pid) = against.parse::<u32>() else {
        return Ok(vec![read(PathBuf::from(against))?]);
    };
    let exe_link = PathBuf::from(format!("/proc/{pid}/exe"));
    let exe = std::fs::read_link(&exe_link).map_err(|e| CliError::proc(exe_link, e))?;
    let mut paths = vec![exe];
    for path in crate::target::executable_files(pid)? {
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    paths
        .into_iter()
        .filter(|p| p.is_file())
        .map(read)
        .collect()
}

/// The expectation for function `name`: its first definition among `modules`.
fn find(name: &str, kind: expect::Kind, modules: &[(PathBuf, Vec<u8>)]) -> Option<Expectation> {
    for (path, data) in modules {
        let Ok(file) = object::File::parse(&**data) else {
            continue;
        };
        let symbol = file
            .symbols()
            .chain(file.dynamic_symbols())
            .find(|s| s.kind() == SymbolKind::Text && s.is_definition() && s.name() == Ok(name));
        let Some(symbol) = symbol else { continue };
        let code = code_of(&file, symbol.address(), symbol.size())?;
        let build_id = file
            .build_id()
            .ok()
            .flatten()
            .map_or_else(|| "none".to_owned(), hex);
        return Some(Expectation {
            kind,
            function: name.to_owned(),
            build_id,
            code_sha256: expect::code_hash(code),
            module: display(path),
        });
    }
    None
}

/// The file bytes of `[address, address + size)` (link-time addresses).
fn code_of<'a>(file: &object::File<'a>, address: u64, size: u64) -> Option<&'a [u8]> {
    file.sections()
        .find_map(|s| s.data_range(address, size).ok().flatten())
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// `object` with a `.dsu.expect` section holding `text` (replacing any it had).
fn with_section(object: &[u8], text: Vec<u8>) -> Result<Vec<u8>, String> {
    use object::build::elf::{Builder, SectionData};
    let mut builder = Builder::read(object).map_err(|e| e.to_string())?;
    let existing = builder
        .sections
        .iter_mut()
        .find(|s| s.name.as_slice() == expect::SECTION.as_bytes());
    let section = match existing {
        Some(s) => s,
        None => {
            let s = builder.sections.add();
            s.name = expect::SECTION.as_bytes().to_vec().into();
            s
        }
    };
    section.sh_type = object::elf::SHT_PROGBITS;
    section.sh_flags = object::elf::SectionFlags::default();
    section.sh_addralign = 1;
    section.data = SectionData::Data(text.into());
    let mut out = Vec::new();
    builder.write(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}
