//! What happened in each process of a host-wide command, and how it is told: a summary on
//! stdout (counts, then one line per process skipped or failed) or one JSON document.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::fleet::AgentProcess;
use crate::output;
pub use crate::persist::KeptChange;

/// What became of the request in one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// The agent applied (or reverted) patch `patch_id`, perhaps with warnings.
    Done {
        patch_id: u64,
        warnings: Vec<String>,
        /// SHA-256 of the patch applied or reverted, as the agent recorded it.
        sha256: Option<String>,
    },
    /// Not attempted, for this reason.
    Skipped(String),
    /// Attempted and not done (the agent refused, or could not be reached), for this reason.
    Failed(String),
}

impl Fate {
    pub fn failed(&self) -> bool {
        matches!(self, Fate::Failed(_))
    }
}

/// One process of the summary.
pub struct Entry<'a> {
    pub process: &'a AgentProcess,
    pub done: Fate,
    pub canary: bool,
}

/// The canary stage, when there was one.
pub struct Canary {
    pub pids: Vec<u32>,
    pub wait: Duration,
    pub passed: bool,
}

/// A host-wide command's result.
pub struct Summary<'a> {
    /// `apply` or `revert`.
    pub op: &'static str,
    /// The patch file (apply) or the patch id asked for (revert), as a phrase:
    /// `fix.o`, `patch 3`, `the newest patch`.
    pub what: String,
    pub patch: Option<String>,
    pub patch_id: Option<u64>,
    pub filter: Option<String>,
    /// Every process with an agent that was found, in pid order.
    pub entries: Vec<Entry<'a>>,
    pub canary: Option<Canary>,
    pub elapsed: Duration,
    /// Kept copies written or removed, once per build.
    pub kept: Vec<KeptChange>,
}

impl Summary<'_> {
    /// `applied` or `reverted`: the status of a process where it worked.
    fn verb(&self) -> &'static str {
        if self.op == "revert" {
            "reverted"
        } else {
            "applied"
        }
    }

    fn count(&self, which: fn(&Fate) -> bool) -> usize {
        self.entries.iter().filter(|e| which(&e.done)).count()
    }

    pub fn failed(&self) -> usize {
        self.count(Fate::failed)
    }

    /// The summary lines for stdout.
    pub fn lines(&self) -> Vec<String> {
        let done = self.count(|d| matches!(d, Fate::Done { .. }));
        let skipped = self.count(|d| matches!(d, Fate::Skipped(_)));
        let mut lines = vec![format!(
            "{} {}: {done} {}, {skipped} skipped, {} failed ({} with a dsu agent) in {:.2} s",
            self.op,
            self.what,
            self.verb(),
            self.failed(),
            processes(self.entries.len()),
            self.elapsed.as_secs_f64()
        )];
        if let Some(canary) = &self.canary {
            let pids = list(&canary.pids);
            lines.push(if canary.passed {
                format!(
                    "canary: {pids}: alive, answering and still patched after {:.1} s",
                    canary.wait.as_secs_f64()
                )
            } else {
                format!("canary: {pids}: failed; the rest were not attempted")
            });
        }
        lines.extend(self.kept.iter().map(KeptChange::line));
        for entry in &self.entries {
            let (word, reason) = match &entry.done {
                Fate::Skipped(reason) => ("skipped", reason),
                Fate::Failed(reason) => ("failed", reason),
                Fate::Done { .. } => continue,
            };
            lines.push(format!(
                "{word}: process {} ({}): {reason}",
                entry.process.pid, entry.process.exe
            ));
        }
        lines
    }

    /// The agents' warnings, each once, with the processes that gave it: for stderr.
    pub fn warnings(&self) -> Vec<String> {
        let mut by_text: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for entry in &self.entries {
            if let Fate::Done { warnings, .. } = &entry.done {
                for warning in warnings {
                    by_text.entry(warning).or_default().push(entry.process.pid);
                }
            }
        }
        by_text
            .into_iter()
            .map(|(text, pids)| format!("warning: {text} ({})", list(&pids)))
            .collect()
    }

    /// The `--json` document.
    pub fn json(&self) -> Document<'_> {
        let done = self.count(|d| matches!(d, Fate::Done { .. }));
        let revert = self.op == "revert";
        Document {
            op: self.op,
            patch: self.patch.as_deref(),
            patch_id: self.patch_id,
            filter: self.filter.as_deref(),
            counts: Counts {
                applied: (!revert).then_some(done),
                reverted: revert.then_some(done),
                skipped: self.count(|d| matches!(d, Fate::Skipped(_))),
                failed: self.failed(),
            },
            elapsed_ms: u64::try_from(self.elapsed.as_millis()).unwrap_or(u64::MAX),
            canary: self.canary.as_ref().map(|c| CanaryDocument {
                pids: &c.pids,
                wait_ms: u64::try_from(c.wait.as_millis()).unwrap_or(u64::MAX),
                passed: c.passed,
            }),
            kept: &self.kept,
            processes: self
                .entries
                .iter()
                .map(|e| {
                    let (status, patch_id, reason, warnings) = match &e.done {
                        Fate::Done {
                            patch_id, warnings, ..
                        } => (self.verb(), Some(*patch_id), None, warnings.as_slice()),
                        Fate::Skipped(reason) => ("skipped", None, Some(reason.as_str()), &[][..]),
                        Fate::Failed(reason) => ("failed", None, Some(reason.as_str()), &[][..]),
                    };
                    ProcessDocument {
                        pid: e.process.pid,
                        uid: e.process.uid,
                        exe: &e.process.exe,
                        build_id: e.process.build_id.as_deref(),
                        status,
                        patch_id,
                        reason,
                        canary: e.canary,
                        warnings,
                    }
                })
                .collect(),
        }
    }

    /// Prints the summary (or the document) on stdout and the warnings on stderr.
    pub fn print(&self, as_json: bool) {
        if as_json {
            output::print_line(serde_json::to_string(&self.json()).expect("a summary serialises"));
        } else {
            for line in self.lines() {
                output::print_line(line);
            }
        }
        for warning in self.warnings() {
            eprintln!("dsu: {warning}");
        }
    }
}

/// The `--json` document of a host-wide command (`docs/cli.md`).
#[derive(Debug, Serialize)]
pub struct Document<'a> {
    op: &'static str,
    patch: Option<&'a str>,
    patch_id: Option<u64>,
    filter: Option<&'a str>,
    counts: Counts,
    elapsed_ms: u64,
    canary: Option<CanaryDocument<'a>>,
    #[serde(skip_serializing_if = "<[KeptChange]>::is_empty")]
    kept: &'a [KeptChange],
    processes: Vec<ProcessDocument<'a>>,
}

/// `applied` for an apply, `reverted` for a revert.
#[derive(Debug, Serialize)]
struct Counts {
    #[serde(skip_serializing_if = "Option::is_none")]
    applied: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reverted: Option<usize>,
    skipped: usize,
    failed: usize,
}

#[derive(Debug, Serialize)]
struct CanaryDocument<'a> {
    pids: &'a [u32],
    wait_ms: u64,
    passed: bool,
}

#[derive(Debug, Serialize)]
struct ProcessDocument<'a> {
    pid: u32,
    uid: u32,
    exe: &'a str,
    build_id: Option<&'a str>,
    /// `applied` or `reverted`, `skipped`, `failed`.
    status: &'static str,
    patch_id: Option<u64>,
    reason: Option<&'a str>,
    canary: bool,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

/// `1 process`, `53 processes`.
fn processes(n: usize) -> String {
    match n {
        1 => "1 process".to_owned(),
        n => format!("{n} processes"),
    }
}

/// `process 12`, `processes 12, 13, 14`, up to 8 pids then `and N more`.
fn list(pids: &[u32]) -> String {
    const SHOWN: usize = 8;
    let shown: Vec<String> = pids.iter().take(SHOWN).map(u32::to_string).collect();
    let more = match pids.len().saturating_sub(SHOWN) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    match pids.len() {
        1 => format!("process {}", shown[0]),
        _ => format!("processes {}{more}", shown.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    fn process(pid: u32, exe: &str) -> AgentProcess {
        let mut p = crate::fleet::tests::process(exe, Some("abcd"));
        p.pid = pid;
        p.dir = PathBuf::from("/tmp");
        p
    }

    #[test]
    fn the_summary_counts_and_lists_what_did_not_happen() {
        let (a, b, c) = (
            process(10, "/bin/shop"),
            process(11, "/bin/shop"),
            process(12, "/bin/other"),
        );
        let summary = Summary {
            op: "apply",
            what: "fix.o".into(),
            patch: Some("fix.o".into()),
            patch_id: None,
            filter: Some("--exe /bin/shop".into()),
            entries: vec![
                Entry {
                    process: &a,
                    done: Fate::Done {
                        patch_id: 1,
                        warnings: vec!["w".into()],
                        sha256: None,
                    },
                    canary: true,
                },
                Entry {
                    process: &b,
                    done: Fate::Failed("refused: active".into()),
                    canary: false,
                },
                Entry {
                    process: &c,
                    done: Fate::Skipped("executable /bin/other, not /bin/shop".into()),
                    canary: false,
                },
            ],
            canary: Some(Canary {
                pids: vec![10],
                wait: Duration::from_millis(1500),
                passed: true,
            }),
            elapsed: Duration::from_millis(250),
            kept: vec![KeptChange {
                build_id: "abcd".into(),
                path: PathBuf::from("/k/abcd/0001-00.o"),
                action: "kept",
            }],
        };
        assert_eq!(
            summary.lines(),
            [
                "apply fix.o: 1 applied, 1 skipped, 1 failed (3 processes with a dsu agent) in 0.25 s",
                "canary: process 10: alive, answering and still patched after 1.5 s",
                "kept as /k/abcd/0001-00.o for build abcd: processes of this build started from now on apply it at start-up",
                "failed: process 11 (/bin/shop): refused: active",
                "skipped: process 12 (/bin/other): executable /bin/other, not /bin/shop",
            ]
        );
        assert_eq!(summary.warnings(), ["warning: w (process 10)"]);
        let doc = serde_json::to_value(summary.json()).unwrap();
        assert_eq!(
            doc["counts"],
            json!({"applied": 1, "skipped": 1, "failed": 1})
        );
        assert_eq!(doc["processes"][0]["status"], "applied");
        assert_eq!(doc["processes"][0]["patch_id"], 1);
        assert_eq!(doc["processes"][1]["reason"], "refused: active");
        assert_eq!(doc["processes"][2]["status"], "skipped");
        assert_eq!(doc["canary"]["pids"], json!([10]));
        assert_eq!(
            doc["kept"],
            json!([{"build_id": "abcd", "path": "/k/abcd/0001-00.o", "action": "kept"}])
        );
    }

    #[test]
    fn long_pid_lists_are_cut() {
        assert_eq!(list(&[1]), "process 1");
        assert_eq!(
            list(&(1..=10).collect::<Vec<_>>()),
            "processes 1, 2, 3, 4, 5, 6, 7, 8 and 2 more"
        );
    }
}
