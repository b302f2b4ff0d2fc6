//! `dsu apply --all` and `dsu revert --all`: one request to every selected process with a
//! dsu agent, a bounded number in flight, and a summary of what happened in each.
//!
//! The sequence: read the patch once (the same checks as for one process); find the agent
//! processes in one pass over `/proc` ([`fleet::list`]); select them with `--exe` and
//! `--build-id`, the others being skipped with the reason; then, `--jobs` at a time
//! ([`fan_out`]), locate each target with the checks `-p` makes (directory, `agent.json`,
//! start time) and send it the one request. The agent applies all or nothing, so a process
//! that refuses is recorded as failed and left as it was, and the others go on.
//!
//! With `--canary N` the N lowest pids go first; they must then stay alive (their pidfds are
//! watched for the whole `--canary-wait`), answer a status request and still list the patch.
//! If any does not, the rest are not attempted.

mod progress;
mod summary;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use dsu_agent::control::RequestOp;
use dsu_agent::report::{Status, StatusReport};

use crate::error::CliError;
use crate::fan_out::fan_out;
use crate::fleet::{self, AgentProcess, Filter};
use crate::target::{Process, Target};
use crate::{patch, request, sys};
use progress::Progress;
use summary::{Entry, Fate, KeptChange, Summary};

/// Requests in flight at once by default. The time per process is mostly the agent's own work
/// in its own process, and waiting for it to wake, so many more than the cores keep them busy:
/// at 4000 processes on two cores 32 and 64 were alike and 16 was 15-40% slower
/// (`docs/benchmarks.md`); not many more, since every update stops its process's running
/// threads and they then wait for a core.
const DEFAULT_JOBS: &str = "32";

/// `-p PID` or `--all`: exactly one.
#[derive(Debug, Args)]
#[group(id = "target", required = true, multiple = false)]
pub struct Which {
    /// Process id of the target.
    #[arg(short, long, value_name = "PID", value_parser = clap::value_parser!(u32).range(1..=i32::MAX as i64))]
    pub pid: Option<u32>,
    /// Every process with a dsu agent that dsu may reach (its user's; as root, every user's,
    /// in containers too), narrowed by --exe and --build-id.
    #[arg(long)]
    pub all: bool,
}

/// The target of `apply` and `revert`: one process, or every selected one.
#[derive(Debug, Args)]
pub struct Targets {
    #[command(flatten)]
    pub which: Which,
    /// The target's control directory, when its agent was configured with one its
    /// environment does not name.
    #[arg(long, value_name = "DIR", conflicts_with = "all")]
    pub control_dir: Option<PathBuf>,
    /// With --all: only processes running this executable (the same file, or the same path
    /// once symbolic links are resolved).
    #[arg(long, value_name = "PATH", conflicts_with = "pid")]
    pub exe: Option<PathBuf>,
    /// With --all: only processes whose executable's GNU build id starts with these hex
    /// digits (8 at least; `dsu ps` shows them).
    #[arg(long, value_name = "HEX", conflicts_with = "pid", value_parser = fleet::parse_build_id)]
    pub build_id: Option<String>,
    /// With --all: requests in flight at once.
    #[arg(long, value_name = "N", conflicts_with = "pid", default_value = DEFAULT_JOBS,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub jobs: u32,
    /// With --all: print one JSON document with every process's result instead of the
    /// summary.
    #[arg(long, conflicts_with = "pid")]
    pub json: bool,
}

impl Targets {
    /// The one process named by `-p`, or `None` for `--all`.
    pub fn single(&self) -> Option<crate::TargetArgs> {
        self.which.pid.map(|pid| crate::TargetArgs {
            pid,
            control_dir: self.control_dir.clone(),
        })
    }
}

/// `apply --all --canary N`.
#[derive(Debug, Args)]
pub struct CanaryArgs {
    /// With --all: apply to the N processes with the lowest pids first, wait --canary-wait,
    /// check that each is alive, answers and still has the patch; only then the rest.
    #[arg(long, value_name = "N", conflicts_with = "pid",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub canary: Option<u32>,
    /// Seconds the canaries must stay alive before the rest are patched.
    #[arg(long, value_name = "SECS", requires = "canary", conflicts_with = "pid", default_value = "5",
          value_parser = crate::parse_timeout)]
    pub canary_wait: Duration,
}

/// What is sent to every selected agent.
enum Request<'a> {
    Apply {
        bytes: &'a [u8],
        /// The label the agent records (the path as given).
        file: String,
        allow_stale_clones: bool,
    },
    Revert {
        id: Option<u64>,
    },
}

/// The agent processes found, and why the filter left each out (`None`: selected).
struct Selection {
    found: Vec<AgentProcess>,
    left_out: Vec<Option<String>>,
    filter: Option<String>,
}

impl Selection {
    fn targets(&self) -> Vec<&AgentProcess> {
        self.found
            .iter()
            .zip(&self.left_out)
            .filter(|(_, why)| why.is_none())
            .map(|(p, _)| p)
            .collect()
    }

    /// Every process found, the targets with `done` (in their order), the others skipped.
    fn entries(&self, done: Vec<Fate>, canaries: usize) -> Vec<Entry<'_>> {
        let mut done = done.into_iter();
        let mut targets = 0;
        self.found
            .iter()
            .zip(&self.left_out)
            .map(|(process, why)| match why {
                Some(why) => Entry {
                    process,
                    done: Fate::Skipped(why.clone()),
                    canary: false,
                },
                None => {
                    targets += 1;
                    Entry {
                        process,
                        done: done.next().unwrap_or_else(|| {
                            Fate::Failed("no result (an internal error of dsu)".into())
                        }),
                        canary: targets <= canaries,
                    }
                }
            })
            .collect()
    }
}

/// The agent processes and the filter's verdict on each. Unlike the commands that name a
/// process, this does not sweep the control directories exited processes left: it finds
/// agents by their sockets, so those are no obstacle, and the sweep reads every directory.
fn select(targets: &Targets) -> Result<Selection, CliError> {
    let filter = Filter::new(targets.exe.as_deref(), targets.build_id.as_deref());
    let found = fleet::list();
    let left_out: Vec<Option<String>> = found.iter().map(|p| filter.mismatch(p)).collect();
    if left_out.iter().all(Option::is_some) {
        return Err(CliError::NoMatch {
            filter: filter.describe(),
            others: found.len(),
            uid: sys::effective_uid(),
        });
    }
    Ok(Selection {
        found,
        left_out,
        filter: filter.describe(),
    })
}

/// `dsu apply --all PATCH`.
pub fn apply(args: &crate::ApplyArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let bytes = patch::read_patch(&args.patch).inspect_err(|e| record_refusal(&args.patch, e))?;
    let selection = select(&args.target)?;
    if args.persist {
        // As `-p --persist`: a patch that could not be kept is not applied either.
        for build_id in build_ids(&selection.targets())? {
            crate::persist::check_place(build_id)?;
        }
    }
    let request = Request::Apply {
        bytes: &bytes,
        file: args.patch.display().to_string(),
        allow_stale_clones: args.allow_stale_clones,
    };
    let jobs = args.target.jobs as usize;
    let targets = selection.targets();
    let mut progress = Progress::new("applying", targets.len());
    let first = args
        .canary
        .canary
        .map_or(0, |n| n as usize)
        .min(targets.len());
    let (canaries, rest) = targets.split_at(first);
    // Opened before the patch goes in, so that an exit right after it is seen.
    let watched: Vec<Option<Process>> =
        canaries.iter().map(|p| Process::open(p.pid).ok()).collect();
    let mut done = run(canaries, &request, args.timeout, jobs, &mut progress);
    let mut canary = None;
    if first > 0 {
        let passed = check_canaries(
            canaries,
            &mut done,
            &watched,
            args.canary.canary_wait,
            args.timeout,
            jobs,
        );
        canary = Some(summary::Canary {
            pids: canaries.iter().map(|p| p.pid).collect(),
            wait: args.canary.canary_wait,
            passed,
        });
    }
    let stopped = canary.as_ref().is_some_and(|c| !c.passed);
    if stopped {
        let failed = canaries
            .iter()
            .zip(&done)
            .filter(|(_, d)| d.failed())
            .map(|(p, _)| p.pid)
            .collect::<Vec<_>>();
        let why = format!(
            "not attempted: the canary stage failed ({})",
            pids_phrase(&failed)
        );
        done.extend(rest.iter().map(|_| Fate::Skipped(why.clone())));
    } else {
        done.extend(run(rest, &request, args.timeout, jobs, &mut progress));
    }
    progress.finish();
    let (kept, keep_error) = if args.persist && !stopped {
        keep_for_builds(&targets, &done, &bytes)
    } else {
        (Vec::new(), None)
    };
    let summary = Summary {
        op: "apply",
        what: args.patch.display().to_string(),
        patch: Some(args.patch.display().to_string()),
        patch_id: None,
        filter: selection.filter.clone(),
        entries: selection.entries(done, first),
        canary,
        elapsed: started.elapsed(),
        kept,
    };
    summary.print(args.target.json);
    if let Some(e) = keep_error {
        return Err(e);
    }
    if stopped {
        let pids = summary
            .entries
            .iter()
            .filter(|e| e.canary && e.done.failed())
            .map(|e| e.process.pid)
            .collect();
        return Err(CliError::CanaryFailed {
            pids,
            untouched: rest.len(),
        });
    }
    outcome(&summary, "apply the patch", targets.len())
}

/// `dsu revert --all [ID]`.
pub fn revert(args: &crate::RevertArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let selection = select(&args.target)?;
    let request = Request::Revert { id: args.id };
    let targets = selection.targets();
    let mut progress = Progress::new("reverting", targets.len());
    let done = run(
        &targets,
        &request,
        args.timeout,
        args.target.jobs as usize,
        &mut progress,
    );
    progress.finish();
    let (kept, forget_error) = forget_for_builds(&targets, &done);
    let summary = Summary {
        op: "revert",
        what: args
            .id
            .map_or_else(|| "the newest patch".to_owned(), |id| format!("patch {id}")),
        patch: None,
        patch_id: args.id,
        filter: selection.filter.clone(),
        entries: selection.entries(done, 0),
        canary: None,
        elapsed: started.elapsed(),
        kept,
    };
    summary.print(args.target.json);
    if let Some(e) = forget_error {
        return Err(e);
    }
    outcome(&summary, "revert", targets.len())
}

/// Exit 0 when no targeted process failed.
fn outcome(summary: &Summary<'_>, op: &'static str, targeted: usize) -> Result<(), CliError> {
    match summary.failed() {
        0 => Ok(()),
        failed => Err(CliError::RolloutFailed {
            op,
            failed,
            targeted,
        }),
    }
}

fn run(
    targets: &[&AgentProcess],
    request: &Request<'_>,
    timeout: Duration,
    jobs: usize,
    progress: &mut Progress,
) -> Vec<Fate> {
    fan_out(
        targets,
        jobs,
        |p| attempt(p, request, timeout).unwrap_or_else(|e| Fate::Failed(e.one_line())),
        |done| progress.step(done.failed()),
    )
}

/// The request in one process: located as `-p` would, then sent.
fn attempt(p: &AgentProcess, request: &Request<'_>, timeout: Duration) -> Result<Fate, CliError> {
    let target = Target::found(p.pid, &p.dir, p.uid)?;
    let (op, patch, allow_stale_clones) = match request {
        Request::Apply {
            bytes,
            file,
            allow_stale_clones,
        } => (
            RequestOp::Apply { file: file.clone() },
            Some(*bytes),
            *allow_stale_clones,
        ),
        Request::Revert { id } => {
            // As of the agent's last change; should that be stale, the agent's answer decides.
            let status = crate::read_status_file(&target)?;
            if let Some(reason) = nothing_to_revert(&status, *id) {
                return Ok(Fate::Skipped(reason));
            }
            (RequestOp::Revert { patch_id: *id }, None, false)
        }
    };
    let outcome = request::exchange(&target, op, patch, timeout, allow_stale_clones)?;
    if outcome.outcome != Status::Applied {
        return Err(CliError::Agent {
            outcome: Box::new(outcome),
        });
    }
    Ok(Fate::Done {
        patch_id: outcome.patch_id.unwrap_or(outcome.seq),
        sha256: outcome.record.and_then(|r| r.patch_sha256),
        warnings: outcome.warnings,
    })
}

/// The distinct build ids of `targets`; every one must have a build id, kept patches being
/// filed by it.
fn build_ids<'a>(targets: &[&'a AgentProcess]) -> Result<BTreeSet<&'a str>, CliError> {
    targets
        .iter()
        .map(|p| {
            p.build_id.as_deref().ok_or_else(|| {
                crate::persist::PersistError::NoBuildId {
                    pid: p.pid,
                    exe: PathBuf::from(&p.exe),
                }
                .into()
            })
        })
        .collect()
}

/// `apply --all --persist`, after the rollout: keeps the patch once for each build it was
/// applied in. The first failure to keep is returned after the summary is printed.
fn keep_for_builds(
    targets: &[&AgentProcess],
    done: &[Fate],
    bytes: &[u8],
) -> (Vec<KeptChange>, Option<CliError>) {
    let mut builds: BTreeMap<&str, (u32, u64)> = BTreeMap::new();
    for (p, fate) in targets.iter().zip(done) {
        if let (Fate::Done { patch_id, .. }, Some(id)) = (fate, p.build_id.as_deref()) {
            builds.entry(id).or_insert((p.pid, *patch_id));
        }
    }
    let mut kept = Vec::new();
    for (build_id, (pid, patch_id)) in builds {
        match crate::persist::keep(bytes, build_id) {
            Ok(file) => kept.push(KeptChange {
                build_id: build_id.to_owned(),
                path: file.path,
                action: if file.new { "kept" } else { "already kept" },
            }),
            Err(e) => {
                let e = crate::persist::PersistError::Keep {
                    pid,
                    patch_id,
                    reason: e.one_line(),
                };
                return (kept, Some(e.into()));
            }
        }
    }
    (kept, None)
}

/// `revert --all`, after the reverts: removes the kept copies of each reverted patch for the
/// builds it was reverted in.
fn forget_for_builds(
    targets: &[&AgentProcess],
    done: &[Fate],
) -> (Vec<KeptChange>, Option<CliError>) {
    let mut pairs: BTreeMap<(&str, &str), u32> = BTreeMap::new();
    for (p, fate) in targets.iter().zip(done) {
        if let (
            Fate::Done {
                sha256: Some(sha), ..
            },
            Some(id),
        ) = (fate, p.build_id.as_deref())
        {
            pairs.entry((id, sha.as_str())).or_insert(p.pid);
        }
    }
    let mut removed = Vec::new();
    if pairs.is_empty() || !crate::persist::anything_kept() {
        return (removed, None);
    }
    for ((build_id, sha256), pid) in pairs {
        match crate::persist::forget(sha256, build_id) {
            Ok(paths) => removed.extend(paths.into_iter().map(|path| KeptChange {
                build_id: build_id.to_owned(),
                path,
                action: "removed",
            })),
            Err((path, e)) => {
                let e = crate::persist::PersistError::Forget {
                    pid,
                    path,
                    reason: e.to_string(),
                };
                return (removed, Some(e.into()));
            }
        }
    }
    (removed, None)
}

/// Why a process has nothing to revert: no patch at all, or not patch `id`.
fn nothing_to_revert(status: &StatusReport, id: Option<u64>) -> Option<String> {
    let ids: Vec<u64> = status.patches.iter().map(|p| p.id).collect();
    match id {
        _ if ids.is_empty() => Some("no patch applied".to_owned()),
        Some(id) if !ids.contains(&id) => Some(format!(
            "no patch {id} applied (patches {})",
            ids.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
        _ => None,
    }
}

/// After the canaries were patched: each must stay alive for `wait`, then answer a status
/// request listing its patch. A canary that does not is marked failed; `false` if any is.
fn check_canaries(
    canaries: &[&AgentProcess],
    done: &mut [Fate],
    watched: &[Option<Process>],
    wait: Duration,
    timeout: Duration,
    jobs: usize,
) -> bool {
    if done.iter().any(Fate::failed) {
        return false;
    }
    // Said at once, whatever stderr is: the wait may be long, and nothing else shows.
    eprintln!(
        "dsu: canary: {} patched; watching for {:.1} s",
        pids_phrase(&canaries.iter().map(|p| p.pid).collect::<Vec<_>>()),
        wait.as_secs_f64()
    );
    let exited = exits_during(watched, wait);
    if !exited.is_empty() {
        for i in exited {
            done[i] = Fate::Failed(format!(
                "canary: exited within {:.1} s after the patch was applied",
                wait.as_secs_f64()
            ));
        }
        return false;
    }
    let patch_ids: Vec<(&AgentProcess, u64)> = canaries
        .iter()
        .zip(done.iter())
        .filter_map(|(p, d)| match d {
            Fate::Done { patch_id, .. } => Some((*p, *patch_id)),
            _ => None,
        })
        .collect();
    let checks = fan_out(
        &patch_ids,
        jobs,
        |(p, id)| still_patched(p, *id, timeout),
        |_| (),
    );
    let mut passed = true;
    for (i, check) in checks.into_iter().enumerate() {
        if let Err(reason) = check {
            done[i] = Fate::Failed(format!("canary: {reason}"));
            passed = false;
        }
    }
    passed
}

/// The indices of `watched` processes that exit within `wait`: watched through their pidfds,
/// so an exit ends the wait at once; then, for any without a pidfd, `kill(pid, 0)`.
fn exits_during(watched: &[Option<Process>], wait: Duration) -> Vec<usize> {
    let deadline = Instant::now() + wait;
    let fds: Vec<(usize, std::os::fd::BorrowedFd<'_>)> = watched
        .iter()
        .enumerate()
        .filter_map(|(i, p)| Some((i, p.as_ref()?.pidfd()?)))
        .collect();
    let borrowed: Vec<_> = fds.iter().map(|(_, fd)| *fd).collect();
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if borrowed.is_empty() {
            std::thread::sleep(deadline - now);
            break;
        }
        match sys::wait_readable(&borrowed, deadline - now) {
            Ok(ready) if ready.iter().any(|r| *r) => {
                return fds
                    .iter()
                    .zip(ready)
                    .filter(|(_, r)| *r)
                    .map(|((i, _), _)| *i)
                    .collect();
            }
            Ok(_) => {} // the time is up, or a signal interrupted the wait
            Err(_) => {
                std::thread::sleep(deadline - now);
                break;
            }
        }
    }
    watched
        .iter()
        .enumerate()
        .filter(|(_, p)| p.as_ref().is_none_or(Process::gone))
        .map(|(i, _)| i)
        .collect()
}

/// Whether the canary's agent answers a status request that lists patch `id`.
fn still_patched(p: &AgentProcess, id: u64, timeout: Duration) -> Result<(), String> {
    let target = Target::found(p.pid, &p.dir, p.uid).map_err(|e| e.one_line())?;
    let answer = request::exchange(&target, RequestOp::Status, None, timeout, false)
        .map_err(|e| format!("no answer to a status request: {}", e.one_line()))?;
    match answer.status {
        Some(status) if status.patches.iter().any(|patch| patch.id == id) => Ok(()),
        Some(_) => Err(format!("its agent no longer lists patch {id}")),
        None => Err(format!(
            "its agent answered a status request with: {}",
            CliError::Agent {
                outcome: Box::new(answer)
            }
            .one_line()
        )),
    }
}

/// `process 12` or `processes 12, 13`.
fn pids_phrase(pids: &[u32]) -> String {
    let list = pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match pids.len() {
        1 => format!("process {list}"),
        _ => format!("processes {list}"),
    }
}

/// A patch file `dsu` refused before any agent saw it goes on record, as for `-p`.
fn record_refusal(patch: &Path, e: &CliError) {
    let audit = dsu_agent::audit::Audit::new(dsu_agent::audit::socket_from_env());
    let line = dsu_agent::audit::tool_refusal_line(
        "apply",
        "all",
        sys::effective_uid(),
        patch,
        &e.to_string(),
    );
    audit.send(&line);
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsu_agent::report::PatchReport;

    fn status(ids: &[u64]) -> StatusReport {
        StatusReport {
            pid: 1,
            patches: ids
                .iter()
                .map(|&id| PatchReport {
                    id,
                    file: String::new(),
                    sha256: String::new(),
                    signer: None,
                    applied_at: 0,
                    functions: Vec::new(),
                    added: Vec::new(),
                })
                .collect(),
            agent: None,
            kept: Vec::new(),
        }
    }

    #[test]
    fn a_process_without_the_patch_is_skipped_with_the_reason() {
        assert_eq!(
            nothing_to_revert(&status(&[]), None).as_deref(),
            Some("no patch applied")
        );
        assert_eq!(
            nothing_to_revert(&status(&[]), Some(2)).as_deref(),
            Some("no patch applied")
        );
        assert_eq!(
            nothing_to_revert(&status(&[1, 3]), Some(2)).as_deref(),
            Some("no patch 2 applied (patches 1, 3)")
        );
        assert_eq!(nothing_to_revert(&status(&[1, 3]), Some(3)), None);
        assert_eq!(nothing_to_revert(&status(&[1]), None), None);
    }
}
