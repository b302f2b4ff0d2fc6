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
//!
//! Unsafe code is allowed here: this module registers unwind tables with the C runtime, reads
//! them back to announce the new code to debuggers, and releases reverted code; every block
//! states its invariant.

#![allow(unsafe_code)]

mod attempt;
mod error;
mod plan;
mod ranges;
mod record;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dsu_sys::code::CodeWriter;
use sha2::{Digest, Sha256};

pub use self::error::{StaleClones, UpdateError};
pub use self::record::{AppliedFunction, AppliedPatch, Policy, Stages, Strategy};
use crate::callsites::CallIndex;
use crate::check::{Checker, Ranges};
use crate::debugger::{self, AnnounceError, Announcement};
use crate::link::{self, LinkError, LinkedPatch};
use crate::names::{self, CodeName};
use crate::prepare;
use crate::resolve::{ResolveError, SymbolIndex};
use crate::stop::StopWorld;
use crate::trust::{self, TrustPolicy, expect};
use crate::unwind;
use crate::write::{self, CodeEdit};

/// What a successful apply or revert reports: the patch that took effect (or, for a revert,
/// the patch that no longer does).
#[derive(Debug, Clone)]
pub struct Switched {
    pub patch: AppliedPatch,
    pub attempts: u32,
    pub elapsed: Duration,
    pub stages: Stages,
    /// What went wrong besides the update, which took effect regardless (the new code could
    /// not be announced to debuggers, say): one line each, for the log.
    pub warnings: Vec<String>,
}

/// What a successful apply reports.
pub type Applied = Switched;

/// What a successful revert reports.
pub type Reverted = Switched;

/// Which modules are loaded where: the symbol index is rebuilt when this changes.
type ModuleKey = Vec<(String, usize)>;

/// The update engine: owns the stop machinery, the code writer and the applied patches.
/// Runs on the agent's thread only, one update at a time.
pub struct Engine {
    stopper: StopWorld,
    writer: CodeWriter,
    index: Option<(ModuleKey, Arc<SymbolIndex>)>,
    /// Direct call sites per module (by name, with its load bias), decoded once.
    calls: HashMap<String, (usize, Arc<CallIndex>)>,
    patches: Vec<AppliedPatch>,
    /// The applied patches' code as announced to debuggers, by patch id.
    announced: Vec<Announcement>,
    live: attempt::LiveBuffers,
    /// Names of code applied but not yet in the perf map (see [`Engine::publish_names`]).
    unpublished: Vec<CodeName>,
    /// Which patches are accepted: signatures and bindings, checked before linking.
    trust: TrustPolicy,
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
        // Without it, every update stops every thread (see `live_writes`).
        let _ = crate::hold::install(stopper.signal());
        Engine {
            stopper,
            writer,
            index: None,
            calls: HashMap::new(),
            patches: Vec::new(),
            announced: Vec::new(),
            live: attempt::LiveBuffers::new(),
            unpublished: Vec::new(),
            trust: TrustPolicy::default(),
        }
    }

    /// Sets which patches are accepted (signatures, bindings); see [`crate::trust`].
    pub fn set_trust(&mut self, trust: TrustPolicy) {
        self.trust = trust;
    }

    /// The patches in effect, oldest first.
    pub fn patches(&self) -> &[AppliedPatch] {
        &self.patches
    }

    /// Builds the symbol index and the executable's call-site index ahead of the first
    /// update, on the agent thread at start-up, so that update is as fast as the next ones
    /// (decoding a large executable takes 10-20 ms). Costs the call-site index's memory from
    /// the start (see `docs/benchmarks.md`, memory). Errors are left for the update to report.
    pub fn warm_up(&mut self) {
        // The survey's buffers and the stack-copy buffer (an update sizes them again for the
        // threads there are then).
        let _ = self.live.prepare();
        let Ok(index) = self.index() else { return };
        index.sort_by_address();
        let Some(main) = index.modules().iter().find(|m| m.is_main) else {
            return;
        };
        let name = main.name.clone();
        let Ok(maps) = dsu_sys::maps::read_self() else {
            return;
        };
        let _ = self.call_index(&name, &index, &maps);
        // Reads every module's dynamic symbols once (cached): the first update need not.
        let _ = crate::stacks::undeclared_switching();
        let _ = main_stack_end();
        // SHA-256 asks the CPU for its features once (`cpuid`, which a virtual machine traps):
        // 4% of the agents' time in a first rollout on a VM.
        let _ = Sha256::digest([]);
    }

    /// Appends the names of the code applied since the last call to the perf map, for
    /// profilers. The agent calls it once it has answered the request: the first call creates
    /// the file, which takes 0.1-0.3 ms, more than a tenth of an update, and a profiler reads
    /// the map only when it reports. Best effort: an update never fails for it.
    pub fn publish_names(&mut self) -> std::io::Result<()> {
        if self.unpublished.is_empty() {
            return Ok(());
        }
        let names = std::mem::take(&mut self.unpublished);
        names::publish(&names)
    }

    /// The symbol index, rebuilt when the set of loaded modules changed (a `dlopen`).
    fn index(&mut self) -> Result<Arc<SymbolIndex>, ResolveError> {
        let key: ModuleKey = dsu_sys::modules::loaded_in_memory()
            .into_iter()
            .map(|m| (m.name, m.bias))
            .collect();
        if self.index.as_ref().is_none_or(|(k, _)| *k != key) {
            // Call-site indices stay valid for modules still loaded where they were: they were
            // decoded before any call site in them was rewritten. One decoded now would list
            // rewritten sites under the patch code they lead to, which a later patch could
            // reuse the address of.
            let index = SymbolIndex::of_process()?;
            self.calls.retain(|name, (bias, _)| {
                index
                    .modules()
                    .iter()
                    .any(|m| m.name == *name && m.bias == *bias)
            });
            self.index = Some((key, Arc::new(index)));
        }
        Ok(self.index.as_ref().expect("just built").1.clone())
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
        // Trust first: a patch from the wrong signer is not even parsed further.
        let verified = self.trust.verify(bytes)?;
        let (object, signer) = (verified.object, verified.signer);
        let expectations = expect::of_object(object).map_err(trust::TrustError::from)?;
        let index = self.index().map_err(LinkError::from)?;
        let maps = dsu_sys::maps::read_self().map_err(UpdateError::Maps)?;
        let resolved = link::resolve_patch(object, &index)?;
        if let Some(t) = resolved
            .targets()
            .iter()
            .find(|t| is_agent_code(&t.name, &t.module))
        {
            return Err(UpdateError::AgentCode {
                function: t.name.clone(),
                module: t.module.clone(),
            });
        }
        let stale = self.stale_clones(&resolved, &index, &maps, &expectations);
        let mut clone_warnings = Vec::new();
        for e in stale {
            if !policy.allow_stale_clones {
                return Err(e);
            }
            clone_warnings.push(e.to_string());
        }

        let mut current = Vec::new();
        let mut pristine = Vec::new();
        for t in resolved.targets() {
            let now = prepare::read_code(&t.name, &t.module, t.address, t.size, &maps)?;
            pristine.push(plan::pristine_code(&now, t.address, &self.patches));
            current.push(now);
        }
        if !expectations.is_empty() || self.trust.require_binding {
            let build_ids: Vec<Option<Vec<u8>>> = resolved
                .targets()
                .iter()
                .map(|t| module_build_id(&index, &maps, &t.module))
                .collect();
            let found: Vec<expect::Found<'_>> = resolved
                .targets()
                .iter()
                .zip(&build_ids)
                .zip(&pristine)
                .map(|((t, id), code)| expect::Found {
                    function: &t.name,
                    module: &t.module,
                    build_id: id.as_deref(),
                    pristine: code,
                })
                .collect();
            expect::check(&expectations, &found, self.trust.require_binding)
                .map_err(trust::TrustError::from)?;
        }
        let mut in_place: Vec<usize> = (0..resolved.targets().len())
            .filter(|&i| plan::fits_in_place(&resolved, i, &pristine[i], &index))
            .collect();
        // The loaded modules' unwind tables: for the in-place decision now (before any patch
        // table is added to it), for the activeness check later.
        let checker = Checker::for_loaded_modules();
        if !in_place.is_empty() {
            let new_rules = resolved.new_frame_rules();
            in_place
                .retain(|&i| plan::unwinds_in_place(&resolved, i, &new_rules, checker.tables()));
        }
        let linked = resolved.link(&self.writer, &in_place, &maps)?;
        let linked_at = Instant::now();
        let read = |at: usize, len: usize| prepare::read_bytes(&maps, at, len);
        let around: Vec<prepare::Surroundings> = linked
            .targets
            .iter()
            .map(|t| plan::surroundings(&t.target, &index, &read, &self.patches))
            .collect();
        let mut functions = plan::plan_functions(&linked, &pristine, &current, &around)?;
        self.plan_call_sites(&mut functions, &index, &maps);

        let edits: Vec<CodeEdit> = functions.iter().flat_map(|f| f.edits.clone()).collect();
        let edit_names: Vec<&str> = functions
            .iter()
            .flat_map(|f| f.edits.iter().map(|_| f.name.as_str()))
            .collect();
        let ranges = ranges::of_apply(&functions, &self.patches);
        let names: Vec<&str> = functions.iter().map(|f| f.name.as_str()).collect();
        // Unwindable before any caller can reach it, with tables checked first.
        let code_ranges = ranges::unwind_code(linked.code_range(), &functions);
        for &(start, len) in &linked.eh_frames {
            // SAFETY: the `.eh_frame` lies in the read-only part of the mapped image, which
            // `linked` owns for this whole function.
            unsafe { unwind::validate_patch_eh_frame(start, len, &code_ranges) }
                .map_err(UpdateError::UnwindInfo)?;
        }
        let registered = register_frames(&linked.eh_frames);
        let switched = self.switch(
            checker,
            &edits,
            &edit_names,
            &ranges,
            &names,
            &linked.eh_frames,
            policy,
            started,
        );
        let (attempts, mut stages) = match switched {
            Ok(done) => done,
            Err(e) => {
                deregister_frames(&registered);
                return Err(e);
            }
        };

        stages.link = linked_at - started;
        stages.prepare -= stages.link.min(stages.prepare);
        let signer = signer.map(|k| k.to_string());
        let patch = self.record(linked, functions, id, file, bytes, signer);
        self.unpublished.extend(code_names(&patch));
        // After the commit, threads running: announcing allocates.
        let mut warnings = clone_warnings;
        match announce(&patch) {
            Ok(announced) => self.announced.extend(announced),
            Err(e) => warnings.push(e.to_string()),
        }
        Ok(Applied {
            patch,
            attempts,
            elapsed: started.elapsed(),
            stages,
            warnings,
        })
    }

    /// For each function the patch replaces, its compiler clones that the patch does not
    /// replace too ([`SymbolIndex::clones_of`]), with the functions that call them directly:
    /// code that would keep running the old version.
    fn stale_clones(
        &mut self,
        resolved: &link::Resolved,
        index: &SymbolIndex,
        maps: &[dsu_sys::maps::MapEntry],
        expectations: &[expect::Expectation],
    ) -> Vec<UpdateError> {
        let replaced: Vec<(&str, usize)> = resolved
            .targets()
            .iter()
            .map(|t| (t.name.as_str(), t.address))
            .collect();
        let mut out = Vec::new();
        for t in resolved.targets() {
            let Some(module) = index.module_named(&t.module) else {
                continue;
            };
            let mut clones: Vec<(&str, usize)> = Vec::new();
            for (name, d) in index.clones_of(module, &t.name) {
                if replaced.iter().any(|r| r.1 == d.address) {
                    continue;
                }
                // `dsu build` vouched for it: the fix leaves it as it is.
                match self.vouched_for(name, &t.module, d, index, maps, expectations) {
                    Ok(true) => continue,
                    Ok(false) => clones.push((name, d.address)),
                    Err(e) => {
                        out.push(e);
                        clones.push((name, d.address));
                    }
                }
            }
            if clones.is_empty() {
                continue;
            }
            let calls = self.call_index(&t.module, index, maps);
            let mut callers: Vec<String> = clones
                .iter()
                .flat_map(|&(_, at)| {
                    calls.iter().flat_map(move |c| {
                        let near = c.sites(at).iter().map(|s| s.at);
                        near.chain(c.short_sites(at).iter().copied())
                            .collect::<Vec<_>>()
                    })
                })
                .filter_map(|site| index.function_holding(module, site))
                .map(str::to_owned)
                .collect();
            callers.sort();
            callers.dedup();
            out.push(UpdateError::StaleClones(Box::new(error::StaleClones {
                function: t.name.clone(),
                module: t.module.clone(),
                clones: clones.iter().map(|c| c.0.to_owned()).collect(),
                callers,
            })));
        }
        out
    }

    /// Whether the patch's expectations vouch for the clone `name` (defined by `d` in
    /// `module`): an `unchanged` line of `dsu build` whose build id and code hash match its
    /// pristine code. A line that does not match is an error naming what differs.
    fn vouched_for(
        &self,
        name: &str,
        module: &str,
        d: &crate::resolve::ProcessSymbol,
        index: &SymbolIndex,
        maps: &[dsu_sys::maps::MapEntry],
        expectations: &[expect::Expectation],
    ) -> Result<bool, UpdateError> {
        if expect::find(expectations, expect::Kind::Unchanged, name).is_none() {
            return Ok(false);
        }
        let now = prepare::read_code(name, module, d.address, d.size, maps)?;
        let pristine = plan::pristine_code(&now, d.address, &self.patches);
        let build_id = module_build_id(index, maps, module);
        let found = expect::Found {
            function: name,
            module,
            build_id: build_id.as_deref(),
            pristine: &pristine,
        };
        expect::vouches_for(expectations, &found)
            .map_err(|e| UpdateError::from(trust::TrustError::from(e)))
    }

    /// Adds call-site edits to each planned function: direct calls to its old entry (or to an
    /// earlier version's) go straight to the new entry.
    fn plan_call_sites(
        &mut self,
        functions: &mut [AppliedFunction],
        index: &SymbolIndex,
        maps: &[dsu_sys::maps::MapEntry],
    ) {
        let mut excluded: Vec<(usize, usize)> = functions
            .iter()
            .map(|f| (f.old_address, f.old_address + f.old_size as usize))
            .collect();
        excluded.extend(
            self.patches
                .iter()
                .flat_map(|p| &p.functions)
                .map(|f| (f.old_address, f.old_address + f.old_size as usize)),
        );
        for f in functions.iter_mut() {
            let Some(calls) = self.call_index(&f.module, index, maps) else {
                continue;
            };
            let earlier: Vec<usize> = self
                .patches
                .iter()
                .flat_map(|p| &p.functions)
                .filter(|g| g.old_address == f.old_address && g.new_address != f.old_address)
                .map(|g| g.new_address)
                .collect();
            plan::rewrite_call_sites(f, &calls, &earlier, &excluded);
        }
    }

    /// The call sites of `module`, decoded on first use. `maps` is the apply's snapshot:
    /// module code does not move while the agent runs.
    fn call_index(
        &mut self,
        module: &str,
        index: &SymbolIndex,
        maps: &[dsu_sys::maps::MapEntry],
    ) -> Option<Arc<CallIndex>> {
        if let Some((_, found)) = self.calls.get(module) {
            return Some(found.clone());
        }
        let m = index.module_named(module)?;
        let readable = |&(a, size): &(usize, usize)| prepare::readable(maps, a, a + size);
        let functions: Vec<(usize, usize)> =
            index.functions_in(m).into_iter().filter(readable).collect();
        // SAFETY: every range was just checked to be covered by readable mappings of a loaded
        // module, and loaded modules are not unmapped while the agent decodes them.
        let calls = Arc::new(unsafe { CallIndex::build(&functions) });
        self.calls
            .insert(module.to_string(), (index.modules()[m].bias, calls.clone()));
        Some(calls)
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
        // A newer patch that replaces the same function, or whose edits touch the same bytes
        // (a call site inside a function it redirected, say), must go first: writing back
        // this patch's original bytes would tear its code.
        let spans = |p: &AppliedPatch| -> Vec<(usize, usize, String)> {
            p.functions
                .iter()
                .flat_map(|f| {
                    f.edits
                        .iter()
                        .map(move |e| (e.site, e.site + e.len(), f.name.clone()))
                })
                .collect()
        };
        let mine = spans(patch);
        for newer in &self.patches[at + 1..] {
            let same_function = newer.functions.iter().find(|f| {
                patch
                    .functions
                    .iter()
                    .any(|g| g.old_address == f.old_address)
            });
            let overlapping = spans(newer)
                .into_iter()
                .find(|(lo, hi, _)| mine.iter().any(|(mlo, mhi, _)| lo < mhi && mlo < hi));
            let function = match (same_function, overlapping) {
                (Some(f), _) => f.name.clone(),
                (None, Some((_, _, name))) => name,
                (None, None) => continue,
            };
            return Err(UpdateError::Superseded {
                id: patch.id,
                by: newer.id,
                function,
            });
        }
        let mut edits = Vec::new();
        let mut edit_names = Vec::new();
        for f in &patch.functions {
            for e in write::inverse(&f.edits) {
                edits.push(e);
                edit_names.push(f.name.clone());
            }
        }
        let (ranges, names) = ranges::of_revert(patch);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let edit_names: Vec<&str> = edit_names.iter().map(String::as_str).collect();
        let (attempts, stages) = self.switch(
            Checker::for_loaded_modules(),
            &edits,
            &edit_names,
            &ranges,
            &names,
            &[],
            policy,
            started,
        )?;

        let patch = self.patches.remove(at);
        deregister_frames(&patch.eh_frames.iter().map(|f| f.0).collect::<Vec<_>>());
        // Debuggers forget the code (and stop reading its `.eh_frame`) before it goes.
        self.announced.retain(|a| a.id != patch.id);
        // The code is released. Data the program may keep pointers to (a string literal or a
        // static the patch returned) stays mapped; an image holding only unwind tables, GOT
        // and stubs goes whole.
        let len = if patch.keeps_data {
            patch.code.1 - patch.code.0
        } else {
            patch.image.1
        };
        debug_assert!(patch.image.0 == patch.code.0 && len <= patch.image.1);
        // SAFETY: no thread executes or returns into the code (checked while stopped above,
        // against its whole range), no jump or rewritten call leads there any more (its edits
        // were reverted in the same stop), and the unwind tables were just deregistered. Only
        // a function pointer the program kept to patch code could still lead there, which the
        // guide documents.
        let _ = unsafe { dsu_sys::mem::unmap(patch.image.0, len) };
        Ok(Reverted {
            patch,
            attempts,
            elapsed: started.elapsed(),
            stages,
            warnings: Vec::new(),
        })
    }

    /// Stops the world until nothing in `ranges` is active, then writes the edits. Returns
    /// the number of attempts. `checker` holds the loaded modules' unwind tables; the applied
    /// patches' and `new_eh_frames` are added here.
    #[allow(clippy::too_many_arguments)]
    fn switch(
        &mut self,
        mut checker: Checker,
        edits: &[CodeEdit],
        edit_names: &[&str],
        ranges: &Ranges,
        names: &[&str],
        new_eh_frames: &[(usize, usize)],
        policy: &Policy,
        started: Instant,
    ) -> Result<(u32, Stages), UpdateError> {
        let frames = self.patches.iter().flat_map(|p| p.eh_frames.iter());
        for &(start, len) in frames.chain(new_eh_frames) {
            // SAFETY: each range is the relocated `.eh_frame` of a patch image that stays
            // mapped while the checker is used (applied images are unmapped only after their
            // revert's check; the new image is owned by the caller for the whole update).
            unsafe { checker.add_eh_frame(start, len) }.map_err(UpdateError::Unwind)?;
        }
        if !policy.allow_undeclared_stacks
            && let Some(sign) = crate::stacks::undeclared_switching()
        {
            return Err(UpdateError::SwitchesStacks { sign });
        }
        self.stopper.prepare().map_err(UpdateError::StopPrepare)?;
        self.live.prepare().map_err(UpdateError::StopPrepare)?;
        self.check_own_stack(&mut checker, ranges, names)?;
        let live = self.live_writes();
        if live {
            crate::hold::register_sites(edits.iter().map(|e| e.site));
        }
        let own_stacks =
            (!policy.allow_undeclared_stacks && !crate::stacks::ever_declared()).then(|| {
                attempt::OwnStacks {
                    pid: dsu_sys::threads::getpid(),
                    main_stack_end: main_stack_end(),
                }
            });
        let job = attempt::Job {
            writer: &self.writer,
            edits,
            ranges,
            policy,
            own_stacks,
        };
        let mut backoff = policy.backoff;
        let mut attempts = 0;
        let mut stages = Stages {
            every_thread_stopped: !live,
            ..Stages::default()
        };
        let mut tally = attempt::Tally::new(names.len());
        loop {
            attempts += 1;
            if attempts == 1 {
                // Up to the first attempt only: time spent waiting for active functions to
                // return is the rest of `elapsed`. The buffers were sized just above.
                stages.prepare = started.elapsed();
            } else {
                // Threads come and go while the update waits.
                self.stopper.prepare().map_err(UpdateError::StopPrepare)?;
                if live {
                    self.live.prepare().map_err(UpdateError::StopPrepare)?;
                }
            }
            let outcome = if live {
                attempt::live(
                    &mut self.stopper,
                    &mut self.live,
                    &mut checker,
                    &job,
                    &mut tally,
                    &mut stages,
                )?
            } else {
                attempt::all_stopped(
                    &mut self.stopper,
                    &mut checker,
                    &job,
                    &mut tally,
                    &mut stages,
                )?
            };
            let blocker = match outcome {
                attempt::Outcome::Done => return Ok((attempts, stages)),
                attempt::Outcome::Busy(blocker) => blocker,
                attempt::Outcome::PrepareAgain if attempts < 1000 => continue,
                attempt::Outcome::PrepareAgain => None,
                attempt::Outcome::ForeignStack { tid, sp } => {
                    return Err(UpdateError::ForeignStack {
                        tid,
                        name: dsu_sys::tasks::name(tid),
                        sp,
                    });
                }
                attempt::Outcome::AgentTrapped { site } => {
                    let at = edits.iter().position(|e| e.site == site);
                    return Err(UpdateError::AgentUses {
                        function: at
                            .and_then(|i| edit_names.get(i))
                            .unwrap_or(&"?")
                            .to_string(),
                        site,
                    });
                }
                attempt::Outcome::WriteFailed(failure) => {
                    return Err(UpdateError::Write {
                        function: edit_names.get(failure.index).unwrap_or(&"?").to_string(),
                        site: edits[failure.index].site,
                        source: failure.error,
                        rolled_back: failure.rolled_back,
                    });
                }
            };
            tally.end_attempt();
            let waited = started.elapsed();
            if waited + backoff >= policy.timeout {
                return Err(refusal(
                    &tally,
                    names,
                    blocker,
                    attempts,
                    waited,
                    self.stopper.signal(),
                    live,
                ));
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(policy.max_backoff);
        }
    }

    /// Refuses when the agent thread itself returns into code being replaced: it runs the
    /// update from inside those functions (the C library's or std's frames under it), so no
    /// retry can help. Its stack is checked like a waiting thread's, from here.
    fn check_own_stack(
        &mut self,
        checker: &mut Checker,
        ranges: &Ranges,
        names: &[&str],
    ) -> Result<(), UpdateError> {
        let (sp, pc) = here();
        let me = dsu_sys::threads::gettid();
        let found = checker.find_active_waiting(
            self.stopper.maps(),
            me,
            (sp, pc),
            &mut self.live.stack,
            ranges,
        );
        match found {
            Ok(Some(a)) if !matches!(a.how, crate::check::How::StackScan { .. }) => {
                Err(UpdateError::OnAgentStack {
                    function: names.get(a.target).unwrap_or(&"?").to_string(),
                    how: a.how.to_string(),
                })
            }
            // A conservative hit on the agent's own stack is a stale word: the precise walk
            // covers the agent's frames, built with unwind tables.
            _ => Ok(()),
        }
    }

    /// Whether updates may write code while threads that wait keep running (see
    /// [`attempt`]): our `SIGTRAP` handler is installed, cores can be resynchronised, code is
    /// written through `/proc/self/mem`, and no debugger is attached. Allocates.
    fn live_writes(&self) -> bool {
        crate::hold::installed()
            && dsu_sys::cpu::sync_core_registered()
            && self.writer.method() == dsu_sys::code::Method::ProcSelfMem
            && !traced()
            && !TEST_STOP_ALL.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn record(
        &mut self,
        linked: LinkedPatch,
        functions: Vec<AppliedFunction>,
        id: u64,
        file: &str,
        bytes: &[u8],
        signer: Option<String>,
    ) -> AppliedPatch {
        let code = linked.code_range();
        let keeps_data = linked.keeps_data;
        let eh_frames = linked.eh_frames.clone();
        let added = linked.added.clone();
        let extra_names = linked
            .functions
            .iter()
            .filter(|f| !functions.iter().any(|g| g.name == f.name))
            .map(|f| CodeName {
                address: f.address,
                size: f.size,
                name: f.name.clone(),
            })
            .collect();
        let image = linked.into_raw();
        let patch = AppliedPatch {
            id,
            file: file.to_string(),
            sha256: hex(&Sha256::digest(bytes)),
            signer,
            applied_at: SystemTime::now(),
            functions,
            image,
            code,
            keeps_data,
            eh_frames,
            added,
            helpers: extra_names,
        };
        self.patches.push(patch.clone());
        patch
    }
}

/// Registers each `.eh_frame` with the C runtime's unwinder; returns what was registered.
/// The stack and instruction pointers of the caller, at the call: where a walk of the
/// calling thread's own stack starts.
#[inline(always)]
fn here() -> (u64, u64) {
    let (sp, pc): (u64, u64);
    // SAFETY: reads two registers, touches no memory.
    unsafe {
        std::arch::asm!(
            "lea {pc}, [rip]",
            "mov {sp}, rsp",
            pc = out(reg) pc,
            sp = out(reg) sp,
            options(nomem, nostack, preserves_flags)
        );
    }
    (sp, pc)
}

/// Whether a replaced function belongs to the agent itself: the agent's shared library, or
/// the agent's and its platform layer's functions linked into the program (Rust mangles the
/// crate names as `9dsu_agent` and `7dsu_sys`). The agent runs the update with that code.
fn is_agent_code(name: &str, module: &str) -> bool {
    let file = module.rsplit('/').next().unwrap_or(module);
    file.starts_with("libdsu_agent")
        || name.contains("9dsu_agent")
        || name.contains("7dsu_sys")
        || name == "dsu_install"
}

/// Testing only (`DSU_TEST_STOP_ALL=1`): every update parks every thread and writes while
/// they are parked, the path it takes under a debugger or without live writes, so tests reach
/// it on a machine where live writes work.
static TEST_STOP_ALL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) fn set_test_stop_all() {
    TEST_STOP_ALL.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether a tracer (a debugger) is attached: it would take our breakpoints for its own.
/// One read into a stack buffer: `read_to_string` on a `/proc` file (size 0) took eight.
fn traced() -> bool {
    dsu_sys::tasks::tracer_pid().map_or(true, |pid| pid != 0)
}

/// The refusal after the timeout: the function that held the update back most often (not
/// whichever the last check met first: a function every thread calls all the time is active
/// now and then, the real blocker in every attempt), else why a thread could not be checked.
/// `live`: the attempts stopped only running threads (else every thread was parked, which
/// changes what a thread blocking the stop signal can do about it).
fn refusal(
    tally: &attempt::Tally,
    names: &[&str],
    blocker: Option<attempt::Blocker>,
    attempts: u32,
    waited: Duration,
    stop_signal: i32,
    live: bool,
) -> UpdateError {
    let waited_ms = waited.as_millis() as u64;
    let busiest = (0..names.len())
        .filter(|&i| tally.last_seen[i].is_some())
        .max_by_key(|&i| (tally.rounds_active[i], tally.active_now[i]));
    if let Some(i) = busiest
        && let Some(a) = tally.last_seen[i]
    {
        if let crate::check::How::DeclaredStack { .. } = a.how {
            return UpdateError::ActiveOnStack {
                function: names[i].to_string(),
                how: a.how.to_string(),
                attempts,
                waited_ms,
            };
        }
        return UpdateError::Active {
            function: names[i].to_string(),
            tid: a.tid,
            how: a.how.to_string(),
            attempts,
            waited_ms,
        };
    }
    match blocker {
        Some(attempt::Blocker::StopSignalBlocked { tid }) => {
            let name = dsu_sys::tasks::name(tid);
            let signal = stop_signal;
            if live {
                UpdateError::StopSignalBlocked {
                    tid,
                    name,
                    signal,
                    attempts,
                    waited_ms,
                }
            } else {
                UpdateError::StopSignalBlockedAllParked {
                    tid,
                    name,
                    signal,
                    attempts,
                    waited_ms,
                }
            }
        }
        Some(attempt::Blocker::GaveUp(g)) => UpdateError::WaitBound {
            tid: g.tid,
            name: dsu_sys::tasks::name(g.tid),
            bound_ms: g.bound.as_millis() as u64,
            attempts,
            waited_ms,
        },
        Some(attempt::Blocker::Unproven(reason)) => UpdateError::Unproven {
            reason,
            attempts,
            waited_ms,
        },
        None => UpdateError::Unsettled {
            attempts,
            waited_ms,
        },
    }
}

/// The end of the main thread's stack (the `[stack]` mapping), which never moves: read once.
fn main_stack_end() -> Option<usize> {
    static END: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *END.get_or_init(|| {
        dsu_sys::maps::read_self().ok().and_then(|maps| {
            maps.iter()
                .find(|m| m.path.as_deref() == Some("[stack]"))
                .map(|m| m.end)
        })
    })
}

fn register_frames(frames: &[(usize, usize)]) -> Vec<usize> {
    frames
        .iter()
        .map(|&(start, _)| {
            // SAFETY: a relocated `.eh_frame` of a mapped patch image, followed by the zero
            // terminator `place::layout` reserves; registered once, deregistered before the
            // image is unmapped.
            unsafe { dsu_sys::frames::register(start) };
            start
        })
        .collect()
}

fn deregister_frames(frames: &[usize]) {
    for &start in frames {
        // SAFETY: registered by `register_frames` and not deregistered since.
        unsafe { dsu_sys::frames::deregister(start) };
    }
}

/// Names of the patch's code for profilers: new versions (in the image or in place) and
/// helpers.
fn code_names(patch: &AppliedPatch) -> Vec<CodeName> {
    let mut out: Vec<CodeName> = patch
        .functions
        .iter()
        .map(|f| CodeName {
            address: f.new_address,
            size: f.new_size,
            name: format!("{} [dsu patch {}]", f.name, patch.id),
        })
        .collect();
    out.extend(patch.helpers.iter().cloned());
    out
}

/// Announces `patch`'s new code to debuggers: the functions whose new code is in its image,
/// under their own names, its helpers, and its first `.eh_frame` (a patch object has one).
fn announce(patch: &AppliedPatch) -> Result<Option<Announcement>, AnnounceError> {
    let (start, end) = patch.code;
    let functions: Vec<debugger::Function<'_>> = patch
        .functions
        .iter()
        .filter(|f| f.strategy == Strategy::Redirect)
        .map(|f| (f.name.as_str(), f.new_address, f.new_size))
        .chain(
            patch
                .helpers
                .iter()
                .map(|h| (h.name.as_str(), h.address, h.size)),
        )
        .filter(|&(_, address, size)| size > 0 && address >= start && address < end)
        .map(|(name, address, size)| debugger::Function {
            name,
            address,
            size,
        })
        .collect();
    let eh_frame = patch.eh_frames.first().map(|&(at, len)| {
        // SAFETY: the relocated `.eh_frame` in the read-only part of the patch's image, which
        // stays mapped while the patch is applied, and is never written after linking; the
        // announcement copies it before this returns.
        (at, unsafe {
            std::slice::from_raw_parts(at as *const u8, len)
        })
    });
    debugger::announce(
        patch.id,
        &debugger::Contents {
            text: (start, end),
            functions: &functions,
            eh_frame,
        },
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The GNU build id of the loaded module named `module` (as the symbol index names it), read
/// from its `PT_NOTE` segments in memory: what runs, even if its file was replaced since.
fn module_build_id(
    index: &SymbolIndex,
    maps: &[dsu_sys::maps::MapEntry],
    module: &str,
) -> Option<Vec<u8>> {
    let bias = index.modules().iter().find(|m| m.name == module)?.bias;
    let loaded = dsu_sys::modules::loaded_in_memory();
    let notes = &loaded.iter().find(|m| m.bias == bias)?.notes;
    notes.iter().find_map(|&(at, len)| {
        let bytes = prepare::read_bytes(maps, at, len)?;
        expect::build_id_in_notes(&bytes).map(<[u8]>::to_vec)
    })
}
