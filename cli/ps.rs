//! `dsu ps`: the processes with a dsu agent, their executable, build id and patches.
//!
//! The patches are read from each agent's `status.json` (rewritten after every change) rather
//! than asked for: listing a host sends nothing to any agent and never waits behind an update
//! that is retrying.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Args;
use dsu_agent::control::{STATUS_FILE, verify_dir};
use dsu_agent::report::StatusReport;
use serde::Serialize;

use crate::error::CliError;
use crate::fleet::{self, AgentProcess, Filter};
use crate::output;

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Print a JSON array with one object per process.
    #[arg(long)]
    json: bool,
    /// Only processes running this executable: the same file, or the same path once
    /// symbolic links are resolved.
    #[arg(long, value_name = "PATH")]
    exe: Option<PathBuf>,
    /// Only processes whose executable's GNU build id starts with these hex digits (8 at
    /// least).
    #[arg(long, value_name = "HEX", value_parser = fleet::parse_build_id)]
    build_id: Option<String>,
}

/// One process, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Row {
    pid: u32,
    uid: u32,
    /// The user name of `uid` in this host's `/etc/passwd`, if it has one.
    user: Option<String>,
    exe: String,
    build_id: Option<String>,
    control_dir: String,
    /// `None` when `status.json` cannot be trusted or read (`error` says why).
    patches: Option<Vec<PatchRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct PatchRow {
    id: u64,
    sha256: String,
}

pub fn run(args: &PsArgs) -> Result<(), CliError> {
    let filter = Filter::new(args.exe.as_deref(), args.build_id.as_deref());
    let users = users();
    let rows: Vec<Row> = fleet::list()
        .into_iter()
        .filter(|p| filter.mismatch(p).is_none())
        .map(|p| row(p, &users))
        .collect();
    if args.json {
        output::print_line(serde_json::to_string(&rows).expect("rows serialise"));
        return Ok(());
    }
    if rows.is_empty() {
        let filter = filter.describe();
        output::print_line(crate::error::nothing_found(
            filter.as_deref(),
            crate::sys::effective_uid(),
        ));
        return Ok(());
    }
    for line in table(&rows) {
        output::print_line(line);
    }
    Ok(())
}

fn row(p: AgentProcess, users: &HashMap<u32, String>) -> Row {
    let (patches, error) = match patches(&p) {
        Ok(patches) => (Some(patches), None),
        Err(e) => (None, Some(e.one_line())),
    };
    Row {
        pid: p.pid,
        uid: p.uid,
        user: users.get(&p.uid).cloned(),
        exe: p.exe,
        build_id: p.build_id,
        control_dir: p.dir.display().to_string(),
        patches,
        error,
    }
}

/// The patches `status.json` lists, from a directory that passes the agent's own checks
/// (another user could otherwise plant the file).
fn patches(p: &AgentProcess) -> Result<Vec<PatchRow>, CliError> {
    verify_dir(&p.dir, p.uid)?;
    let path = p.dir.join(STATUS_FILE);
    let Some(text) = crate::read_optional(&path)? else {
        return Ok(Vec::new());
    };
    let status: StatusReport = serde_json::from_str(&text).map_err(|e| CliError::Malformed {
        path,
        reason: e.to_string(),
    })?;
    Ok(status
        .patches
        .into_iter()
        .map(|p| PatchRow {
            id: p.id,
            sha256: p.sha256,
        })
        .collect())
}

/// `PID USER BUILD-ID PATCHES EXECUTABLE`, columns as wide as their widest entry; the build id
/// shortened to 16 digits (enough for `--build-id`), patches as their ids.
fn table(rows: &[Row]) -> Vec<String> {
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let patches = match &r.patches {
                None => "?".to_owned(),
                Some(p) if p.is_empty() => "-".to_owned(),
                Some(p) => p
                    .iter()
                    .map(|p| p.id.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            };
            [
                r.pid.to_string(),
                r.user.clone().unwrap_or_else(|| r.uid.to_string()),
                r.build_id
                    .as_deref()
                    .map_or("-", |id| id.get(..16).unwrap_or(id))
                    .to_owned(),
                patches,
                r.exe.clone(),
            ]
        })
        .collect();
    let header = ["PID", "USER", "BUILD ID", "PATCHES", "EXECUTABLE"].map(str::to_owned);
    let mut widths = [0usize; 4];
    for row in std::iter::once(&header).chain(&cells) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    std::iter::once(&header)
        .chain(&cells)
        .map(|row| {
            let mut line = String::new();
            for (cell, width) in row.iter().zip(widths) {
                line.push_str(&format!("{cell:<width$}  "));
            }
            line.push_str(&row[4]);
            line
        })
        .collect()
}

/// User names by uid from `/etc/passwd` (`name:password:uid:...`); empty when unreadable.
fn users() -> HashMap<u32, String> {
    let text = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    parse_passwd(&text)
}

fn parse_passwd(text: &str) -> HashMap<u32, String> {
    let mut users = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split(':');
        if let (Some(name), Some(_), Some(uid)) = (fields.next(), fields.next(), fields.next())
            && let Ok(uid) = uid.parse()
        {
            // The first entry of a uid is the name `ls -l` shows.
            users.entry(uid).or_insert_with(|| name.to_owned());
        }
    }
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lines_name_uids() {
        let users = parse_passwd(
            "root:x:0:0::/root:/bin/sh\n# junk\nalice:x:1000:1000::/:/\nalias:x:1000:1:::\n",
        );
        assert_eq!(users[&0], "root");
        assert_eq!(users[&1000], "alice");
        assert_eq!(users.len(), 2);
    }

    #[test]
    fn the_table_aligns_columns_and_shortens_build_ids() {
        let row = |pid, patches: Option<Vec<u64>>| Row {
            pid,
            uid: 1000,
            user: Some("alice".into()),
            exe: "/usr/bin/shop".into(),
            build_id: Some("0123456789abcdef0123".into()),
            control_dir: String::new(),
            patches: patches.map(|ids| {
                ids.into_iter()
                    .map(|id| PatchRow {
                        id,
                        sha256: String::new(),
                    })
                    .collect()
            }),
            error: None,
        };
        let lines = table(&[
            row(7, Some(vec![])),
            row(12345, Some(vec![1, 3])),
            row(9, None),
        ]);
        assert_eq!(
            lines,
            [
                "PID    USER   BUILD ID          PATCHES  EXECUTABLE",
                "7      alice  0123456789abcdef  -        /usr/bin/shop",
                "12345  alice  0123456789abcdef  1,3      /usr/bin/shop",
                "9      alice  0123456789abcdef  ?        /usr/bin/shop",
            ]
        );
    }
}
