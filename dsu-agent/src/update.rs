//! Update: the whole sequence for one patch, as one step that happens completely or not at all.
//!
//! ```text
//! link (load, resolve, relocate, place)   may allocate, threads running
//! prepare (decode targets, plan jumps)    may allocate, threads running
//! loop:
//!     stop every other thread             nothing allocated from here ...
//!     check activeness of every version
//!     if none active: write jumps, sync cores
//!     resume                              ... to here
//!     done, or back off and retry until the timeout
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use dsu_sys::code::CodeWriter;
use thiserror::Error;

use crate::check::{Activity, CheckError, Checker, Ranges};
use crate::link::{self, LinkError, LinkedPatch};
use crate::prepare::{self, PrepareError, Redirect};
use crate::resolve::{ResolveError, SymbolIndex};
use crate::stop::{StopError, StopWorld};
use crate::write::{self, CodeEdit};

/// Why an attempt found the world not ready for the switch.
enum Busy {
    Active(Activity),
    /// A thread could not be proven inactive (its stack could not be read).
    Unproven(CheckError),
}

/// How long and how often to retry while a function is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Give up (refuse) after this long.
    pub timeout: Duration,
    /// First pause between attempts; doubles up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// How long every thread has to park once signalled.
    pub park_timeout: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            timeout: Duration::from_secs(5),
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(100),
            park_timeout: Duration::from_secs(1),
        }
    }
}

/// Why an update did not happen. In every case the process's code is as it was.
#[derive(Debug, Error)]
pub enum UpdateError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error("cannot stop the process's threads: {0}")]
    Stop(#[from] StopError),
    #[error(
        "{function} is active in thread {tid} ({how}) after {attempts} attempts over {waited_ms} ms; nothing was changed"
    )]
    Active {
        function: String,
        tid: i32,
        how: String,
        attempts: u32,
        waited_ms: u64,
    },
    #[error(
        "cannot prove the functions inactive after {attempts} attempts over {waited_ms} ms: {reason}; nothing was changed"
    )]
    Unproven {
        reason: CheckError,
        attempts: u32,
        waited_ms: u64,
    },
    #[error(
        "writing the entry jump of {function} at {site:#x} failed: {source}; nothing was changed"
    )]
    Write {
        function: String,
        site: usize,
        source: std::io::Error,
    },
    #[error("cannot prepare to stop threads: {0}")]
    StopPrepare(std::io::Error),
    #[error("unwind information: {0}")]
    Unwind(CheckError),
    #[error("cannot read the process's memory map: {0}")]
    Maps(std::io::Error),
    #[error("no applied patch has id {0}")]
    UnknownPatch(u64),
    #[error("the agent thread has stopped")]
    AgentGone,
    #[error("internal error in the agent: {0}; nothing was changed")]
    Internal(String),
}

impl UpdateError {
    /// Refused (the input or the moment was wrong) rather than failed (the system was).
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            UpdateError::Write { .. }
                | UpdateError::Maps(_)
                | UpdateError::StopPrepare(_)
                | UpdateError::AgentGone
                | UpdateError::Internal(_)
        )
    }

    /// Number of activeness checks made before giving up, when known.
    pub fn attempts(&self) -> u32 {
        match self {
            UpdateError::Active { attempts, .. } | UpdateError::Unproven { attempts, .. } => {
                *attempts
            }
            _ => 0,
        }
    }
}

/// How a function was switched to its new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Entry jump to new code.
    Redirect,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Redirect => "redirect",
        }
    }
}

/// One function of an applied patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedFunction {
    pub name: String,
    pub module: String,
    pub old_address: usize,
    pub old_size: u64,
    pub new_address: usize,
    pub new_size: u64,
    pub strategy: Strategy,
    pub call_sites: u32,
    /// The entry edit (for revert: its `original` is what was there before this patch).
    pub edit: CodeEdit,
}

/// A patch in effect.
#[derive(Debug, Clone)]
pub struct AppliedPatch {
    pub id: u64,
    pub file: String,
    pub applied_at: SystemTime,
    pub functions: Vec<AppliedFunction>,
    /// The image's range; it stays mapped while the patch is applied.
    pub image: (usize, usize),
    pub eh_frames: Vec<(usize, usize)>,
    pub added: Vec<String>,
}

/// What a successful apply reports.
#[derive(Debug, Clone)]
pub struct Applied {
    pub patch: AppliedPatch,
    pub attempts: u32,
    pub elapsed: Duration,
}

/// The update engine: owns the stop machinery, the code writer and the applied patches.
/// Runs on the agent's thread only, one update at a time.
pub struct Engine {
    stopper: StopWorld,
    writer: CodeWriter,
    index: Option<(Vec<(String, usize)>, SymbolIndex)>,
    patches: Vec<AppliedPatch>,
    next_id: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("patches", &self.patches)
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub fn new(stopper: StopWorld, writer: CodeWriter) -> Engine {
        Engine {
            stopper,
            writer,
            index: None,
            patches: Vec::new(),
            next_id: 1,
        }
    }

    pub fn patches(&self) -> &[AppliedPatch] {
        &self.patches
    }

    /// Builds the symbol index ahead of the first update, so that update is as fast as the
    /// next ones. Errors are left for the update to report.
    pub fn warm_up(&mut self) {
        let _ = self.index();
    }

    /// The symbol index, rebuilt when the set of loaded modules changed (a `dlopen`).
    fn index(&mut self) -> Result<&SymbolIndex, ResolveError> {
        let key: Vec<(String, usize)> = dsu_sys::modules::loaded()
            .into_iter()
            .map(|m| (m.name, m.bias))
            .collect();
        if self.index.as_ref().is_none_or(|(k, _)| *k != key) {
            self.index = Some((key, SymbolIndex::of_process()?));
        }
        Ok(&self.index.as_ref().expect("just built").1)
    }

    /// Applies one patch file's bytes. `file` names it in reports.
    pub fn apply(
        &mut self,
        bytes: &[u8],
        file: &str,
        policy: &Policy,
    ) -> Result<Applied, UpdateError> {
        let started = Instant::now();
        self.index().map_err(LinkError::from)?;
        let index = &self.index.as_ref().expect("built above").1;
        let linked = link::link(bytes, index, &self.writer)?;
        let redirects = self.plan(&linked)?;
        let edits: Vec<CodeEdit> = redirects
            .iter()
            .map(|r| CodeEdit {
                site: r.site,
                bytes: r.bytes,
                original: r.original,
            })
            .collect();
        let ranges = self.version_ranges(&redirects);
        let names: Vec<&str> = redirects.iter().map(|r| r.name.as_str()).collect();
        let attempts = self.switch(&edits, &ranges, &names, &linked.eh_frames, policy, started)?;

        let patch = self.record(linked, &redirects, &edits, file);
        Ok(Applied {
            patch,
            attempts,
            elapsed: started.elapsed(),
        })
    }

    /// Plans each entry jump, decoding the pristine code even when an earlier patch already
    /// put a jump there (stacking).
    fn plan(&self, linked: &LinkedPatch) -> Result<Vec<Redirect>, UpdateError> {
        let maps = dsu_sys::maps::read_self().map_err(UpdateError::Maps)?;
        let mut out = Vec::with_capacity(linked.targets.len());
        for t in &linked.targets {
            let tg = &t.target;
            let mut code = prepare::read_code(&tg.name, &tg.module, tg.address, tg.size, &maps)?;
            let current = self.current_edit(tg.address);
            if let Some(edit) = current {
                let at = edit.site - tg.address;
                code[at..at + edit.bytes.len()].copy_from_slice(&self.pristine(edit.site));
            }
            let mut r =
                prepare::plan_redirect(&tg.name, &tg.module, tg.address, &code, t.new_address)?;
            if let Some(edit) = current {
                r.original = edit.bytes; // what is there now: the previous patch's jump
            }
            out.push(r);
        }
        Ok(out)
    }

    /// The newest edit at a function's entry, if a patch in effect made one.
    fn current_edit(&self, old_address: usize) -> Option<CodeEdit> {
        self.patches
            .iter()
            .rev()
            .flat_map(|p| &p.functions)
            .find(|f| f.old_address == old_address)
            .map(|f| f.edit)
    }

    /// The bytes at `site` before any patch.
    fn pristine(&self, site: usize) -> [u8; 5] {
        self.patches
            .iter()
            .flat_map(|p| &p.functions)
            .find(|f| f.edit.site == site)
            .map(|f| f.edit.original)
            .expect("a current edit has a first edit")
    }

    /// Every version of every target: the original body and each earlier patch's new code.
    fn version_ranges(&self, redirects: &[Redirect]) -> Ranges {
        let mut ranges = Ranges::new();
        for (i, r) in redirects.iter().enumerate() {
            ranges.push(r.old_address, r.old_address + r.old_size as usize, i);
            for f in self.patches.iter().flat_map(|p| &p.functions) {
                if f.old_address == r.old_address {
                    ranges.push(f.new_address, f.new_address + f.new_size as usize, i);
                }
            }
        }
        ranges
    }

    /// Stops the world until no version is active, then writes the edits. Returns the number
    /// of attempts.
    fn switch(
        &mut self,
        edits: &[CodeEdit],
        ranges: &Ranges,
        names: &[&str],
        new_eh_frames: &[(usize, usize)],
        policy: &Policy,
        started: Instant,
    ) -> Result<u32, UpdateError> {
        let mut checker = Checker::for_loaded_modules();
        let frames = self.patches.iter().flat_map(|p| p.eh_frames.iter());
        for &(start, len) in frames.chain(new_eh_frames) {
            // SAFETY: each range is the relocated `.eh_frame` of a patch image that stays
            // mapped while the checker is used (applied images are never unmapped; the new
            // image is owned by the caller for the whole update).
            unsafe { checker.add_eh_frame(start, len) }.map_err(UpdateError::Unwind)?;
        }
        let mut backoff = policy.backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            self.stopper.prepare().map_err(UpdateError::StopPrepare)?;
            let activity = {
                // ---- threads stopped: no allocation, no lock, no output ----
                let stopped = match self.stopper.stop(policy.park_timeout) {
                    Ok(stopped) => stopped,
                    // A thread was created meanwhile and the slots are full: grow, retry.
                    Err(StopError::PrepareAgain { .. }) if attempts < 1000 => continue,
                    Err(e) => return Err(e.into()),
                };
                let result = match checker.find_any_active(&stopped, ranges) {
                    Ok(None) => {
                        // SAFETY: every other thread is parked and none is in a version of a
                        // target (checked just above); sites are entries of mapped functions.
                        unsafe { write::apply_all(&self.writer, edits) }.map(|()| None)
                    }
                    Ok(Some(activity)) => Ok(Some(Busy::Active(activity))),
                    Err(unproven) => Ok(Some(Busy::Unproven(unproven))),
                };
                stopped.resume();
                // ---- threads running ----
                result
            };
            match activity {
                Ok(None) => return Ok(attempts),
                Err(failure) => {
                    return Err(UpdateError::Write {
                        function: names[failure.index].to_string(),
                        site: edits[failure.index].site,
                        source: failure.error,
                    });
                }
                Ok(Some(busy)) => {
                    let waited = started.elapsed();
                    if waited + backoff >= policy.timeout {
                        let waited_ms = waited.as_millis() as u64;
                        return Err(match busy {
                            Busy::Active(a) => UpdateError::Active {
                                function: names[a.target].to_string(),
                                tid: a.tid,
                                how: a.how.to_string(),
                                attempts,
                                waited_ms,
                            },
                            Busy::Unproven(reason) => UpdateError::Unproven {
                                reason,
                                attempts,
                                waited_ms,
                            },
                        });
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(policy.max_backoff);
                }
            }
        }
    }

    fn record(
        &mut self,
        linked: LinkedPatch,
        redirects: &[Redirect],
        edits: &[CodeEdit],
        file: &str,
    ) -> AppliedPatch {
        let sizes: HashMap<usize, u64> = linked
            .targets
            .iter()
            .map(|t| (t.new_address, t.new_size))
            .collect();
        let functions = redirects
            .iter()
            .zip(edits)
            .map(|(r, e)| AppliedFunction {
                name: r.name.clone(),
                module: r.module.clone(),
                old_address: r.old_address,
                old_size: r.old_size,
                new_address: r.new_address,
                new_size: sizes.get(&r.new_address).copied().unwrap_or(0),
                strategy: Strategy::Redirect,
                call_sites: 0,
                edit: *e,
            })
            .collect();
        let eh_frames = linked.eh_frames.clone();
        let added = linked.added.clone();
        let image = linked.into_raw();
        let patch = AppliedPatch {
            id: self.next_id,
            file: file.to_string(),
            applied_at: SystemTime::now(),
            functions,
            image,
            eh_frames,
            added,
        };
        self.next_id += 1;
        self.patches.push(patch.clone());
        patch
    }
}
