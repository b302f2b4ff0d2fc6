//! Update: the whole sequence for one patch, as one step that happens completely or not at all.
//!
//! ```text
//! link (load, resolve, relocate, place)   may allocate, threads running
//! prepare (decode targets, plan edits)    may allocate, threads running
//! loop:
//!     stop every other thread             nothing allocated from here ...
//!     check activeness of every version
//!     if none active: write edits, sync cores
//!     resume                              ... to here
//!     done, or back off and retry until the timeout
//! ```
//!
//! A revert is the same sequence with the inverse edits, checked against the code it removes.

mod error;
mod record;

use std::time::{Duration, Instant, SystemTime};

use dsu_sys::code::CodeWriter;
use sha2::{Digest, Sha256};

pub use self::error::UpdateError;
pub use self::record::{AppliedFunction, AppliedPatch, Policy, Strategy};
use crate::check::{Activity, Checker, Ranges};
use crate::link::{self, LinkError, LinkedPatch};
use crate::prepare::{self, Redirect};
use crate::resolve::{ResolveError, SymbolIndex};
use crate::stop::{StopError, StopWorld};
use crate::write::{self, CodeEdit};

/// What a successful apply reports.
#[derive(Debug, Clone)]
pub struct Applied {
    pub patch: AppliedPatch,
    pub attempts: u32,
    pub elapsed: Duration,
}

/// What a successful revert reports: the patch that is no longer in effect.
#[derive(Debug, Clone)]
pub struct Reverted {
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
        }
    }

    /// The patches in effect, oldest first.
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

    /// Applies one patch file's bytes as patch `id`; `file` names it in reports.
    pub fn apply(
        &mut self,
        bytes: &[u8],
        id: u64,
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
                bytes: r.bytes.to_vec(),
                original: r.original.to_vec(),
            })
            .collect();
        let ranges = self.version_ranges(&redirects);
        let names: Vec<&str> = redirects.iter().map(|r| r.name.as_str()).collect();
        let attempts = self.switch(&edits, &ranges, &names, &linked.eh_frames, policy, started)?;

        let patch = self.record(linked, &redirects, edits, id, file, bytes);
        Ok(Applied {
            patch,
            attempts,
            elapsed: started.elapsed(),
        })
    }

    /// Reverts patch `id`, or the newest. Refused when a newer patch replaces one of its
    /// functions again (revert that one first). Waits, like an apply, until no thread runs the
    /// code being removed; then the image is unmapped.
    pub fn revert(&mut self, id: Option<u64>, policy: &Policy) -> Result<Reverted, UpdateError> {
        let started = Instant::now();
        let at = match id {
            None => self
                .patches
                .len()
                .checked_sub(1)
                .ok_or(UpdateError::NothingApplied)?,
            Some(id) => self
                .patches
                .iter()
                .position(|p| p.id == id)
                .ok_or(UpdateError::UnknownPatch(id))?,
        };
        let patch = &self.patches[at];
        for newer in &self.patches[at + 1..] {
            let again = newer.functions.iter().find(|f| {
                patch
                    .functions
                    .iter()
                    .any(|g| g.old_address == f.old_address)
            });
            if let Some(f) = again {
                return Err(UpdateError::Superseded {
                    id: patch.id,
                    by: newer.id,
                    function: f.name.clone(),
                });
            }
        }
        let edits: Vec<CodeEdit> = patch
            .functions
            .iter()
            .flat_map(|f| write::inverse(&f.edits))
            .collect();
        let mut names: Vec<&str> = patch.functions.iter().map(|f| f.name.as_str()).collect();
        let mut ranges = Ranges::new();
        for (i, f) in patch.functions.iter().enumerate() {
            ranges.push(f.new_address, f.new_address + f.new_size as usize, i);
        }
        // Helpers of the patch too: the image is unmapped afterwards.
        let label = format!("code of patch {}", patch.id);
        ranges.push(patch.code.0, patch.code.1, names.len());
        names.push(&label);
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let attempts = self.switch(&edits, &ranges, &names, &[], policy, started)?;

        let patch = self.patches.remove(at);
        // SAFETY: no thread executes or returns into the image (checked while stopped above,
        // against its whole code range) and no jump leads there any more (its edits were
        // reverted in the same stop). Only a function pointer the program kept to patch code
        // could still lead there, which the guide documents.
        let _ = unsafe { dsu_sys::mem::unmap(patch.image.0, patch.image.1) };
        Ok(Reverted {
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
            let current = self.current_entry_edit(tg.address);
            if let Some(edit) = current {
                let at = edit.site - tg.address;
                code[at..at + edit.len()].copy_from_slice(self.pristine(edit.site));
            }
            let mut r =
                prepare::plan_redirect(&tg.name, &tg.module, tg.address, &code, t.new_address)?;
            if let Some(edit) = current {
                // What is there now: the previous patch's jump, which a revert restores.
                r.original.copy_from_slice(&edit.bytes);
            }
            out.push(r);
        }
        Ok(out)
    }

    /// The newest entry edit of a function, if a patch in effect made one.
    fn current_entry_edit(&self, old_address: usize) -> Option<&CodeEdit> {
        self.patches
            .iter()
            .rev()
            .flat_map(|p| &p.functions)
            .find(|f| f.old_address == old_address)
            .map(AppliedFunction::entry_edit)
    }

    /// The bytes at an entry `site` before any patch in effect.
    fn pristine(&self, site: usize) -> &[u8] {
        self.patches
            .iter()
            .flat_map(|p| &p.functions)
            .map(AppliedFunction::entry_edit)
            .find(|e| e.site == site)
            .map(|e| e.original.as_slice())
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

    /// Stops the world until nothing in `ranges` is active, then writes the edits. Returns
    /// the number of attempts.
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
            // mapped while the checker is used (applied images are unmapped only after their
            // revert's check; the new image is owned by the caller for the whole update).
            unsafe { checker.add_eh_frame(start, len) }.map_err(UpdateError::Unwind)?;
        }
        let mut backoff = policy.backoff;
        let mut attempts = 0;
        // Per target: in how many attempts it was active, and the latest sighting. Allocated
        // here, only updated in place while threads are stopped.
        let mut rounds_active = vec![0u32; names.len()];
        let mut last_seen: Vec<Option<Activity>> = vec![None; names.len()];
        let mut active_now = vec![false; names.len()];
        loop {
            attempts += 1;
            self.stopper.prepare().map_err(UpdateError::StopPrepare)?;
            let outcome = {
                // ---- threads stopped: no allocation, no lock, no output ----
                let stopped = match self.stopper.stop(policy.park_timeout) {
                    Ok(stopped) => stopped,
                    // A thread was created meanwhile and the slots are full: grow, retry.
                    Err(StopError::PrepareAgain { .. }) if attempts < 1000 => continue,
                    Err(e) => return Err(e.into()),
                };
                active_now.fill(false);
                let mut unproven = None;
                for t in stopped.threads() {
                    match checker.find_active(&stopped, t, ranges) {
                        Ok(None) => {}
                        Ok(Some(a)) => {
                            if let Some(flag) = active_now.get_mut(a.target) {
                                *flag = true;
                                last_seen[a.target] = Some(a);
                            }
                        }
                        Err(e) => {
                            unproven.get_or_insert(e);
                        }
                    }
                }
                let busy = active_now.iter().any(|&a| a) || unproven.is_some();
                let result = if busy {
                    Ok(Some(unproven))
                } else {
                    // SAFETY: every other thread is parked and none is in any of `ranges`
                    // (checked just above); sites are in mapped code.
                    unsafe { write::apply_all(&self.writer, edits) }.map(|()| None)
                };
                stopped.resume();
                // ---- threads running ----
                result
            };
            let unproven = match outcome {
                Ok(None) => return Ok(attempts),
                Ok(Some(unproven)) => unproven,
                Err(failure) => {
                    return Err(UpdateError::Write {
                        function: names.get(failure.index).unwrap_or(&"?").to_string(),
                        site: edits[failure.index].site,
                        source: failure.error,
                    });
                }
            };
            for (rounds, &now) in rounds_active.iter_mut().zip(&active_now) {
                *rounds += u32::from(now);
            }
            let waited = started.elapsed();
            if waited + backoff >= policy.timeout {
                let waited_ms = waited.as_millis() as u64;
                // Name the function that held the update back most often, not whichever the
                // last check met first: a function every thread calls all the time is active
                // now and then, the real blocker in every attempt.
                let blocker = (0..names.len())
                    .filter(|&i| last_seen[i].is_some())
                    .max_by_key(|&i| (rounds_active[i], active_now[i]));
                return Err(match (blocker, unproven) {
                    (Some(i), _) => {
                        let a = last_seen[i].expect("filtered on is_some");
                        UpdateError::Active {
                            function: names[i].to_string(),
                            tid: a.tid,
                            how: a.how.to_string(),
                            attempts,
                            waited_ms,
                        }
                    }
                    (None, Some(reason)) => UpdateError::Unproven {
                        reason,
                        attempts,
                        waited_ms,
                    },
                    (None, None) => unreachable!("busy means active or unproven"),
                });
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(policy.max_backoff);
        }
    }

    fn record(
        &mut self,
        linked: LinkedPatch,
        redirects: &[Redirect],
        edits: Vec<CodeEdit>,
        id: u64,
        file: &str,
        bytes: &[u8],
    ) -> AppliedPatch {
        let functions = redirects
            .iter()
            .zip(edits)
            .map(|(r, e)| AppliedFunction {
                name: r.name.clone(),
                module: r.module.clone(),
                old_address: r.old_address,
                old_size: r.old_size,
                new_address: r.new_address,
                new_size: linked
                    .targets
                    .iter()
                    .find(|t| t.new_address == r.new_address)
                    .map_or(0, |t| t.new_size),
                strategy: Strategy::Redirect,
                call_sites: 0,
                edits: vec![e],
            })
            .collect();
        let code = linked.code_range();
        let eh_frames = linked.eh_frames.clone();
        let added = linked.added.clone();
        let image = linked.into_raw();
        let patch = AppliedPatch {
            id,
            file: file.to_string(),
            sha256: hex(&Sha256::digest(bytes)),
            applied_at: SystemTime::now(),
            functions,
            image,
            code,
            eh_frames,
            added,
        };
        self.patches.push(patch.clone());
        patch
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
