//! `dsu inspect PATCH [--against PID|BINARY] [--json]`: what a patch replaces, adds and needs,
//! and which of its symbols do not resolve.
//!
//! LEAD: wire this to `dsu_agent::inspect::inspect(&bytes, against)` once it exists: map
//! [`Against`] to the agent's type, print its report (human or `--json`), and return
//! `Ok(())`. Until then the command reads and checks the patch, then reports that it is not
//! implemented (exit 1).

use std::path::PathBuf;

use clap::Args;

use crate::error::CliError;
use crate::patch::read_patch;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The patch: an ELF relocatable object (`cc -c -fPIC`, `rustc --emit=obj`).
    #[arg(value_name = "PATCH")]
    pub patch: PathBuf,
    /// Check the patch against a running process (a number is a pid; write `./123` for a
    /// file named 123) or a binary on disk.
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

fn parse_against(value: &str) -> Result<Against, String> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value
            .parse()
            .map(Against::Pid)
            .map_err(|e| format!("{value} is not a pid: {e}"));
    }
    Ok(Against::Binary(PathBuf::from(value)))
}

pub fn run(args: &InspectArgs) -> Result<(), CliError> {
    let _bytes = read_patch(&args.patch)?;
    // LEAD: dsu_agent::inspect::inspect(&_bytes, against) goes here.
    Err(CliError::NotImplemented)
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
