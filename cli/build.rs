//! `dsu build ORIGINAL.o FIXED.o -o PATCH.o`: a live patch from the objects of one source file
//! before and after a fix (`dsu-build` does the work).
//!
//! Exit 0 with a summary of what the patch replaces, adds and keeps using; 1 when the change
//! cannot be live-patched (the reason names the symbol); 2 when an input cannot be read or is
//! not an object file, or the patch cannot be written.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::error::CliError;
use crate::inspect::{Against, parse_against};
use crate::output::print_line;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The source file's object as the program was built from it (compiled with the
    /// program's flags plus -ffunction-sections -fdata-sections).
    #[arg(value_name = "ORIGINAL.o")]
    pub original: PathBuf,
    /// The same source file with the fix, compiled with the same flags.
    #[arg(value_name = "FIXED.o")]
    pub fixed: PathBuf,
    /// Where to write the patch.
    #[arg(short, long, value_name = "PATCH.o")]
    pub output: PathBuf,
    /// Check that the program (a running process, or an executable or library file) runs
    /// the code ORIGINAL.o describes for each function the patch replaces; refuse otherwise.
    #[arg(long, value_name = "PID|BINARY", value_parser = parse_against)]
    pub against: Option<Against>,
}

/// Objects larger than this are not compiler output for one file.
const MAX_OBJECT_SIZE: u64 = 256 << 20;

fn read_object(path: &Path) -> Result<Vec<u8>, CliError> {
    let read = |source| CliError::ReadObject {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_OBJECT_SIZE {
        return Err(CliError::PatchTooLarge {
            path: path.to_path_buf(),
            limit: MAX_OBJECT_SIZE,
        });
    }
    std::fs::read(path).map_err(read)
}

pub fn run(args: &BuildArgs) -> Result<(), CliError> {
    let original = read_object(&args.original)?;
    let fixed = read_object(&args.fixed)?;
    let patch = dsu_build::build(&original, &fixed)?;
    let replaced: Vec<String> = patch
        .summary
        .changed
        .iter()
        .map(|f| f.name.clone())
        .collect();
    let checked = match &args.against {
        None => None,
        Some(against) => Some(check_against(against, &original, &replaced)?),
    };
    // Clones the fix leaves as they are, vouched for when the program runs the ones compared.
    let clones: Vec<String> = patch
        .summary
        .unchanged_clones
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let vouched: Vec<String> = match &checked {
        None => Vec::new(),
        Some((label, program)) => clones
            .iter()
            .filter(|&c| {
                let same =
                    dsu_build::against::check(&original, program, label, std::slice::from_ref(c));
                if let Err(e) = &same {
                    eprintln!("dsu: warning: the unchanged clone {c} is not vouched for: {e}");
                }
                same.is_ok()
            })
            .cloned()
            .collect(),
    };
    // Against a program, the patch is bound to it (`dsu pack`): the agent refuses it in a
    // process that runs another build or other code.
    let mut object = patch.object.clone();
    let mut bound = Vec::new();
    if let Some(against) = &args.against {
        let label = match against {
            Against::Pid(pid) => pid.to_string(),
            Against::Binary(path) => {
                let text = path.display().to_string();
                if text.bytes().all(|b| b.is_ascii_digit()) {
                    format!("./{text}")
                } else {
                    text
                }
            }
        };
        let (packed, expectations) =
            crate::pack::bind(&object, &label, &vouched).map_err(|e| match e {
                crate::pack::BindError::Cli(e) => e,
                crate::pack::BindError::Object(reason) => CliError::File {
                    what: "cannot bind the patch to",
                    path: PathBuf::from(&label),
                    reason,
                },
            })?;
        object = packed;
        bound = expectations;
    }
    std::fs::write(&args.output, &object).map_err(|source| CliError::WritePatch {
        path: args.output.clone(),
        source,
    })?;
    for line in summary_lines(&patch.summary) {
        print_line(line);
    }
    if let Some((program, _)) = checked {
        print_line(format_args!(
            "matches {program}: {} function{} as in ORIGINAL.o",
            replaced.len(),
            if replaced.len() == 1 { "" } else { "s" }
        ));
    }
    if args.against.is_some() {
        let clones = crate::pack::unchanged_count(&bound);
        let functions = bound.len() - clones;
        print_line(format_args!(
            "bound: {functions} function{}{} (build id and code hash, as dsu pack does)",
            if functions == 1 { "" } else { "s" },
            match clones {
                0 => String::new(),
                1 => " and 1 unchanged clone".to_string(),
                n => format!(" and {n} unchanged clones"),
            }
        ));
    }
    print_line(format_args!(
        "wrote {} ({} bytes)",
        args.output.display(),
        object.len()
    ));
    Ok(())
}

/// Checks the replaced functions in the program; returns the file that holds them, by name
/// and its bytes.
fn check_against(
    against: &Against,
    original: &[u8],
    replaced: &[String],
) -> Result<(String, Vec<u8>), CliError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CliError::ReadObject {
            path: path.to_path_buf(),
            source,
        })
    };
    let (path, bytes) = match against {
        Against::Binary(path) => (path.clone(), read(path)?),
        Against::Pid(pid) => {
            // The module that defines the functions: the executable or a loaded library.
            let modules = crate::target::executable_files(*pid)?;
            let found = modules.into_iter().find_map(|path| {
                let bytes = std::fs::read(&path).ok()?;
                dsu_build::against::defines_any(original, &bytes, replaced).then_some((path, bytes))
            });
            match found {
                Some(found) => found,
                None => {
                    return Err(dsu_build::BuildError::NotInProgram {
                        symbol: replaced.join(", "),
                        program: format!("process {pid}"),
                    }
                    .into());
                }
            }
        }
    };
    let label = path.display().to_string();
    dsu_build::against::check(original, &bytes, &label, replaced)?;
    Ok((label, bytes))
}

fn summary_lines(summary: &dsu_build::Summary) -> Vec<String> {
    let file = summary.file.as_deref().unwrap_or("its file");
    let mut lines = Vec::new();
    let plain: Vec<_> = summary.changed.iter().filter(|f| !f.clone).collect();
    let clones: Vec<_> = summary.changed.iter().filter(|f| f.clone).collect();
    for (title, functions) in [("changed", &plain), ("clones", &clones)] {
        lines.push(format!("{title} {}:", functions.len()));
        for f in functions {
            lines.push(if f.local {
                format!("  {} (static in {file})", f.name)
            } else {
                format!("  {}", f.name)
            });
        }
    }
    lines.push(format!(
        "new {}:",
        summary.added.len() + summary.new_data.len()
    ));
    for name in &summary.added {
        lines.push(format!("  {name}"));
    }
    for name in &summary.new_data {
        lines.push(format!("  {name} (data)"));
    }
    let listing = |lines: &mut Vec<String>, title: &str, references: &[dsu_build::Reference]| {
        lines.push(format!("{title} {}:", references.len()));
        for r in references {
            lines.push(if r.local {
                format!("  {} (static in {file})", r.name)
            } else {
                format!("  {}", r.name)
            });
        }
    };
    listing(&mut lines, "references kept", &summary.references);
    if !summary.unchanged_clones.is_empty() {
        listing(&mut lines, "unchanged clones", &summary.unchanged_clones);
    }
    if !summary.line_only.is_empty() {
        // Kept as the program's: they report the lines of the source it was built from.
        lines.push(format!("line numbers only {}:", summary.line_only.len()));
        for name in &summary.line_only {
            lines.push(format!("  {name}"));
        }
    }
    for w in &summary.warnings {
        lines.push(format!("warning: {w}"));
    }
    lines
}
