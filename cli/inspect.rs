//! `dsu inspect PATCH [--against PID|BINARY] [--json]`: what a patch replaces, adds and needs,
//! and which of its symbols do not resolve.
//!
//! Exit 0 when the patch is valid and, checked against something, everything resolves; 1
//! when it is invalid or has problems (which are printed first).

use std::path::PathBuf;

use clap::Args;

use dsu_agent::inspect as agent;

use crate::error::CliError;
use crate::output;
use crate::patch::read_patch;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The patch: an ELF relocatable object (`cc -c -fPIC`, `rustc --emit=obj`).
    #[arg(value_name = "PATCH")]
    pub patch: PathBuf,
    /// Check the patch against a running process (a number is a pid; write `./123` for a
    /// file named 123) or a binary on disk, with the libraries the loader would load for it
    /// (its RPATH/RUNPATH, this command's LD_LIBRARY_PATH, /etc/ld.so.conf).
    #[arg(long, value_name = "PID|BINARY", value_parser = parse_against)]
    pub against: Option<Against>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What to resolve the patch against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Against {
    Pid(u32),
    Binary(PathBuf),
}

pub fn parse_against(value: &str) -> Result<Against, String> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value
            .parse()
            .map(Against::Pid)
            .map_err(|e| format!("{value} is not a pid: {e}"));
    }
    Ok(Against::Binary(PathBuf::from(value)))
}

pub fn run(args: &InspectArgs) -> Result<(), CliError> {
    let bytes = read_patch(&args.patch)?;
    let against = match &args.against {
        None => agent::Against::Nothing,
        Some(Against::Pid(pid)) => agent::Against::Process(*pid),
        Some(Against::Binary(path)) => agent::Against::Binary(path.clone()),
    };
    let report = agent::inspect(&bytes, &against)?;
    if args.json {
        output::print_line(serde_json::to_string_pretty(&report).expect("the report serialises"));
    } else {
        for line in human(&report) {
            output::print_line(line);
        }
    }
    let count = report.unresolved.len() + report.errors.len();
    match (&report.against, count) {
        (Some(against), 1..) => Err(CliError::InspectProblems {
            count,
            against: against.clone(),
        }),
        _ => Ok(()),
    }
}

/// The report for a person: one section per kind, one line per item.
fn human(report: &agent::Inspection) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(against) = &report.against {
        out.push(format!("against {against}"));
    }
    if !report.libraries.is_empty() {
        out.push(format!(
            "libraries {} (at the bases this report uses):",
            report.libraries.len()
        ));
        for l in &report.libraries {
            out.push(format!("  {} -> {} at {}", l.name, l.path, l.base));
        }
    }
    out.push(format!("replaces {}:", report.replaces.len()));
    for r in &report.replaces {
        let at = match (&r.address, &r.module, r.old_size) {
            (Some(a), Some(m), Some(size)) => format!(" at {a} in {m} ({size} bytes)"),
            _ => String::new(),
        };
        out.push(format!(
            "  {}{at}, new version {} bytes",
            r.name, r.new_size
        ));
        for w in &r.warnings {
            out.push(format!("    warning: {w}"));
        }
    }
    out.push(format!("adds {}:", report.adds.len()));
    out.extend(report.adds.iter().map(|a| format!("  {a}")));
    out.push(format!("needs {}:", report.needs.len()));
    for n in &report.needs {
        match (&n.resolves_to, &n.indirect) {
            (Some(to), Some(i)) => out.push(format!(
                "  {} -> {to} (IFUNC, resolver at {}; resolved {})",
                n.name, i.resolver, i.resolved
            )),
            (None, Some(i)) => out.push(format!(
                "  {} -> IFUNC in {}, resolver at {}; resolved {}",
                n.name, i.module, i.resolver, i.resolved
            )),
            (Some(to), None) => out.push(format!("  {} -> {to}", n.name)),
            (None, None) => out.push(format!("  {}", n.name)),
        }
    }
    if !report.unresolved.is_empty() {
        out.push(format!("unresolved: {}", report.unresolved.join(", ")));
    }
    for w in &report.warnings {
        out.push(format!("warning: {w}"));
    }
    for e in &report.errors {
        out.push(format!("error: {e}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_name_a_pid_and_anything_else_a_file() {
        assert_eq!(parse_against("123"), Ok(Against::Pid(123)));
        assert_eq!(
            parse_against("./123"),
            Ok(Against::Binary(PathBuf::from("./123")))
        );
        assert_eq!(
            parse_against("/usr/bin/app"),
            Ok(Against::Binary(PathBuf::from("/usr/bin/app")))
        );
        assert!(parse_against("99999999999").is_err());
    }
}
