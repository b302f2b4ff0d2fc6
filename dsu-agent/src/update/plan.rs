//! Planning an apply, before any thread is stopped: which functions go in place, which get an
//! entry jump, which direct call sites are rewritten, and every byte each edit writes.
//!
//! Unsafe code is allowed here: this module reads the current bytes of call sites; every block
//! states its invariant.

#![allow(unsafe_code)]

use dsu_sys::x86::ENDBR64;

use super::UpdateError;
use super::record::{AppliedFunction, AppliedPatch, Strategy};
use crate::callsites::{CallIndex, CallSite};
use crate::frame_rules;
use crate::link::{LinkedPatch, NewFrameRules, Resolved};
use crate::prepare;
use crate::resolve::{SymbolIndex, Target};
use crate::unwind::CfiTables;
use crate::write::CodeEdit;

/// The bytes of `[address, address + len)` before any patch in effect touched them: the
/// current bytes with every applied edit undone, newest first.
pub(super) fn pristine_code(current: &[u8], address: usize, applied: &[AppliedPatch]) -> Vec<u8> {
    undo_edits(current, address, applied, |_| true)
}

/// The bytes of `[address, address + len)` with the edits undone that switched the functions
/// `of` picks, newest first.
fn undo_edits(
    current: &[u8],
    address: usize,
    applied: &[AppliedPatch],
    of: impl Fn(&AppliedFunction) -> bool,
) -> Vec<u8> {
    let mut code = current.to_vec();
    let end = address + code.len();
    let edits = applied
        .iter()
        .rev()
        .flat_map(|p| p.functions.iter().rev())
        .filter(|f| of(f))
        .flat_map(|f| f.edits.iter().rev());
    for e in edits {
        let (lo, hi) = (e.site.max(address), (e.site + e.len()).min(end));
        if lo < hi {
            code[lo - address..hi - address].copy_from_slice(&e.original[lo - e.site..hi - e.site]);
        }
    }
    code
}

/// Whether target `i` of `resolved` can be written over the old function (`old`, its pristine
/// bytes): its new code is alone in its section and fits, keeps `endbr64` where the old code
/// had it, and no cold part of the old function (`NAME.cold`) jumps back into its body.
pub(super) fn fits_in_place(
    resolved: &Resolved,
    i: usize,
    old: &[u8],
    index: &SymbolIndex,
) -> bool {
    let Some(new) = resolved.in_place_candidate(i) else {
        return false;
    };
    let name = &resolved.targets()[i].name;
    let split = [".cold", ".cold.0", ".cold.1"]
        .iter()
        .any(|suffix| !index.definitions(&format!("{name}{suffix}")).is_empty());
    !new.is_empty()
        && new.len() <= old.len()
        && (!old.starts_with(&ENDBR64) || new.starts_with(&ENDBR64))
        && !split
}

/// Whether target `i` of `resolved`, once it [fits in place](fits_in_place), may also go there as
/// far as unwinding goes: the patch's table for the new code and the process's table for the old
/// code must give the same rules over the new code's length, since each will describe the other
/// code for a while (see [`crate::frame_rules`]). Otherwise the function is redirected.
pub(super) fn unwinds_in_place(
    resolved: &Resolved,
    i: usize,
    new_rules: &NewFrameRules,
    tables: &CfiTables,
) -> bool {
    let (Some(code), Some(target)) = (resolved.in_place_candidate(i), resolved.targets().get(i))
    else {
        return false;
    };
    let Ok(new) = new_rules.of_target(resolved, i) else {
        return false;
    };
    let old = match tables.frame_rules(target.address) {
        None => None,
        Some(Ok(rules)) => Some(rules),
        Some(Err(_)) => return false,
    };
    frame_rules::in_place_keeps_unwinding(old.as_ref(), new, code.len() as u64)
}

/// What surrounds target `t` in this process ([`prepare::Surroundings::gather`]): the padding
/// after it as it was before any patch of it in `applied` (an earlier entry jump of its may
/// cover it; another function's trampoline there makes it no padding), and the gaps near it
/// that no patch wrote into.
pub(super) fn surroundings<'a>(
    t: &Target,
    index: &SymbolIndex,
    read: &'a dyn Fn(usize, usize) -> Option<Vec<u8>>,
    applied: &[AppliedPatch],
) -> prepare::Surroundings<'a> {
    let Some(module) = index.module_named(&t.module) else {
        return prepare::Surroundings {
            parts: Vec::new(),
            read,
            padding: Vec::new(),
            gaps: Vec::new(),
        };
    };
    let mem = prepare::Reader {
        read,
        before_own: &|now, at| undo_edits(&now, at, applied, |f| f.old_address == t.address),
        before_any: &|now, at| pristine_code(&now, at, applied),
    };
    prepare::Surroundings::gather(index, module, &t.name, t.address, t.size, &mem)
}

/// How one function is switched: its strategy, its edits, and where its trampoline is.
type Switch = (Strategy, Vec<CodeEdit>, Option<usize>);

/// Plans the edits of every target of `linked`. `pristine[i]` and `current[i]` are target
/// `i`'s old code before any patch and now.
pub(super) fn plan_functions(
    linked: &LinkedPatch,
    pristine: &[Vec<u8>],
    current: &[Vec<u8>],
    around: &[prepare::Surroundings<'_>],
) -> Result<Vec<AppliedFunction>, UpdateError> {
    let mut entries: Vec<Option<Switch>> = vec![None; linked.targets.len()];
    // In-place writes and entry jumps first: the trampolines of short jumps (the functions
    // shorter than a jump even over their padding) then go where no other edit does.
    let short = |i: usize| {
        linked.targets[i].in_place.is_none()
            && prepare::needs_trampoline(&pristine[i], &around[i].padding)
    };
    let order = (0..linked.targets.len())
        .filter(|&i| !short(i))
        .chain((0..linked.targets.len()).filter(|&i| short(i)));
    let mut taken: Vec<(usize, usize)> = Vec::new();
    for i in order {
        let t = &linked.targets[i];
        let tg = &t.target;
        let planned = match &t.in_place {
            Some(code) => {
                let mut bytes = code.clone();
                bytes.resize(current[i].len(), 0xcc); // traps after the new code
                let edit = CodeEdit {
                    site: tg.address,
                    bytes,
                    original: current[i].clone(),
                };
                (Strategy::InPlace, vec![edit], None)
            }
            None => {
                let r = prepare::plan_redirect(
                    &tg.name,
                    &tg.module,
                    tg.address,
                    &pristine[i],
                    t.new_address,
                    &around[i],
                    &taken,
                )?;
                let trampoline = r.trampoline.as_ref().map(|tr| tr.at);
                let mut edits = vec![CodeEdit {
                    site: r.site,
                    original: current_bytes(tg, &current[i], &around[i], r.site, r.bytes.len())?,
                    bytes: r.bytes,
                }];
                if let Some(tr) = r.trampoline {
                    edits.push(CodeEdit {
                        site: tr.at,
                        original: current_bytes(
                            tg,
                            &current[i],
                            &around[i],
                            tr.at,
                            tr.bytes.len(),
                        )?,
                        bytes: tr.bytes.to_vec(),
                    });
                }
                (Strategy::Redirect, edits, trampoline)
            }
        };
        taken.extend(planned.1.iter().map(|e| (e.site, e.site + e.len())));
        entries[i] = Some(planned);
    }
    let mut out = Vec::with_capacity(linked.targets.len());
    for (t, planned) in linked.targets.iter().zip(entries) {
        let tg = &t.target;
        let (strategy, edits, trampoline) = planned.expect("every target planned");
        out.push(AppliedFunction {
            name: tg.name.clone(),
            module: tg.module.clone(),
            old_address: tg.address,
            old_size: tg.size,
            new_address: t.new_address,
            new_size: t.new_size,
            strategy,
            call_sites: 0,
            trampoline,
            edits,
        });
    }
    Ok(out)
}

/// The bytes an edit of `len` bytes at `site` overwrites now: past the function's end (a jump
/// over its padding, a trampoline) they are read from memory, as an earlier patch may have
/// written them.
fn current_bytes(
    tg: &Target,
    current: &[u8],
    around: &prepare::Surroundings<'_>,
    site: usize,
    len: usize,
) -> Result<Vec<u8>, UpdateError> {
    let inside = site
        .checked_sub(tg.address)
        .and_then(|at| current.get(at..at + len));
    match inside {
        Some(bytes) => Ok(bytes.to_vec()),
        None => (around.read)(site, len).ok_or_else(|| {
            prepare::PrepareError::NotMapped {
                name: tg.name.clone(),
                module: tg.module.clone(),
                address: site,
                size: len as u64,
            }
            .into()
        }),
    }
}

/// Adds to `f` the edits that point direct call sites of its old function (or of an earlier
/// version a patch rewrote them to) at its new entry. Sites inside `excluded` ranges (bodies
/// being replaced or already replaced) are left alone.
pub(super) fn rewrite_call_sites(
    f: &mut AppliedFunction,
    calls: &CallIndex,
    earlier_entries: &[usize],
    excluded: &[(usize, usize)],
) {
    let mut sites: Vec<CallSite> = calls.sites(f.old_address).to_vec();
    for &e in earlier_entries {
        sites.extend_from_slice(calls.sites(e));
    }
    sites.sort_unstable_by_key(|s| s.field);
    sites.dedup_by_key(|s| s.field);
    for site in sites {
        if excluded
            .iter()
            .any(|&(lo, hi)| site.at >= lo && site.at < hi)
        {
            continue;
        }
        let Some(field) = site.field_for(f.new_address) else {
            continue; // out of rel32 reach: it keeps going through the entry
        };
        // The edit covers the whole instruction, opcode included: a write while other threads
        // run puts a breakpoint on its first byte, which must start an instruction.
        let len = site.next - site.at;
        debug_assert!((5..=6).contains(&len) && site.field == site.next - 4);
        // SAFETY: `site` was decoded from a function's code inside a mapped module (the call
        // index reads only mapped code), and code mappings of loaded modules stay mapped.
        let now = unsafe { std::slice::from_raw_parts(site.at as *const u8, len) }.to_vec();
        let mut bytes = now.clone();
        bytes[len - 4..].copy_from_slice(&field);
        if now == bytes {
            continue;
        }
        f.edits.push(CodeEdit {
            site: site.at,
            bytes,
            original: now,
        });
        f.call_sites += 1;
    }
}
