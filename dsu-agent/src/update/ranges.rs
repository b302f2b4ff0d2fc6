//! Which code an update checks and which code a patch's unwind tables may describe: pure
//! computations over the applied patches, kept apart so each range is proven by a unit test
//! (a thread held at one exact trampoline byte is not something an end-to-end test can
//! arrange).

use dsu_sys::x86::JMP_REL32_LEN;

use super::record::{AppliedFunction, AppliedPatch, Strategy};
use crate::check::Ranges;

/// Every version of every target of an apply (`functions`, labelled by index): the original
/// body, each earlier patch's new code, and each earlier trampoline, which still leads to
/// that patch's version.
pub(super) fn of_apply(functions: &[AppliedFunction], applied: &[AppliedPatch]) -> Ranges {
    let mut ranges = Ranges::new();
    for (i, f) in functions.iter().enumerate() {
        ranges.push(f.old_address, f.old_address + f.old_size as usize, i);
        for g in applied.iter().flat_map(|p| &p.functions) {
            if g.old_address != f.old_address {
                continue;
            }
            if g.new_address != g.old_address {
                ranges.push(g.new_address, g.new_address + g.new_size as usize, i);
            }
            if let Some(at) = g.trampoline {
                ranges.push(at, at + JMP_REL32_LEN, i);
            }
        }
    }
    ranges
}

/// What a revert of `patch` must find inactive, labelled by index into the names returned
/// with it: each function's current version (the new code, or the old place for code written
/// in place), each trampoline the revert takes away (a thread held there is active too), and
/// the rest of the patch's code (its helpers), which is unmapped afterwards. The helpers'
/// ranges are only the parts outside the functions', so an activity is named precisely.
pub(super) fn of_revert(patch: &AppliedPatch) -> (Ranges, Vec<String>) {
    let mut ranges = Ranges::new();
    for (i, f) in patch.functions.iter().enumerate() {
        let end = match f.strategy {
            Strategy::InPlace => f.old_address + f.old_size as usize,
            Strategy::Redirect => f.new_address + f.new_size as usize,
        };
        ranges.push(f.new_address, end, i);
        if let Some(at) = f.trampoline {
            ranges.push_held_too(at, at + JMP_REL32_LEN, i);
        }
    }
    let mut names: Vec<String> = patch.functions.iter().map(|f| f.name.clone()).collect();
    let (code_start, code_end) = patch.code;
    let mut bodies: Vec<(usize, usize)> = ranges.iter().map(|(s, e, _)| (s, e)).collect();
    bodies.sort_unstable();
    let mut from = code_start;
    for (start, end) in bodies.into_iter().chain([(code_end, code_end)]) {
        // Empty where no code lies between two bodies: `push` drops it.
        ranges.push(from, start.min(code_end), names.len());
        from = from.max(end);
    }
    names.push(format!("code of patch {}", patch.id));
    (ranges, names)
}

/// The code a new patch's `.eh_frame` may describe: the patch's own code (`code`), and the old
/// functions its code is written over in place.
pub(super) fn unwind_code(
    code: (usize, usize),
    functions: &[AppliedFunction],
) -> Vec<(usize, usize)> {
    let in_place = functions
        .iter()
        .filter(|f| f.strategy == Strategy::InPlace)
        .map(|f| (f.old_address, f.old_address + f.old_size as usize));
    std::iter::once(code).chain(in_place).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(
        name: &str,
        old: (usize, u64),
        new: (usize, u64),
        strategy: Strategy,
        trampoline: Option<usize>,
    ) -> AppliedFunction {
        AppliedFunction {
            name: name.into(),
            module: "m".into(),
            old_address: old.0,
            old_size: old.1,
            new_address: new.0,
            new_size: new.1,
            strategy,
            call_sites: 0,
            trampoline,
            edits: Vec::new(),
        }
    }

    fn patch(id: u64, code: (usize, usize), functions: Vec<AppliedFunction>) -> AppliedPatch {
        AppliedPatch {
            id,
            file: format!("{id}.patch"),
            sha256: String::new(),
            signer: None,
            applied_at: std::time::SystemTime::UNIX_EPOCH,
            functions,
            image: (code.0, code.1 - code.0),
            code,
            keeps_data: false,
            eh_frames: Vec::new(),
            added: Vec::new(),
            helpers: Vec::new(),
        }
    }

    /// `price` (0x1000, 4 bytes) redirected by patch 1 to 0x9000 through a trampoline at
    /// 0x1100; `other` (0x2000) by patch 2 through one at 0x2100; `tax` in place by patch 3.
    fn applied() -> Vec<AppliedPatch> {
        vec![
            patch(
                1,
                (0x9000, 0x9100),
                vec![function(
                    "price",
                    (0x1000, 4),
                    (0x9000, 0x40),
                    Strategy::Redirect,
                    Some(0x1100),
                )],
            ),
            patch(
                2,
                (0xa000, 0xa100),
                vec![function(
                    "other",
                    (0x2000, 4),
                    (0xa000, 0x40),
                    Strategy::Redirect,
                    Some(0x2100),
                )],
            ),
            patch(
                3,
                (0xb000, 0xb100),
                vec![function(
                    "tax",
                    (0x3000, 0x30),
                    (0x3000, 0x10),
                    Strategy::InPlace,
                    None,
                )],
            ),
        ]
    }

    #[test]
    fn an_apply_checks_every_earlier_version_and_trampoline_of_its_targets_only() {
        let next = [
            function(
                "price",
                (0x1000, 4),
                (0xc000, 0x50),
                Strategy::Redirect,
                None,
            ),
            function(
                "tax",
                (0x3000, 0x30),
                (0x3000, 0x8),
                Strategy::InPlace,
                None,
            ),
        ];
        let ranges = of_apply(&next, &applied());
        for (addr, want) in [
            (0x1000, Some(0)),
            (0x1003, Some(0)),
            (0x1004, None),
            (0x9000, Some(0)),
            (0x903f, Some(0)),
            (0x9040, None),
            // Patch 1's trampoline still leads to its version, all five bytes of it.
            (0x1100, Some(0)),
            (0x1104, Some(0)),
            (0x1105, None),
            (0x3000, Some(1)),
            (0x302f, Some(1)),
            (0x3030, None),
            // Another function's versions and trampoline are not this apply's business.
            (0x2000, None),
            (0x2100, None),
            (0xa000, None),
            // The new code is not running yet.
            (0xc000, None),
        ] {
            assert_eq!(ranges.find(addr), want, "{addr:#x}");
        }
        assert!(ranges.find_held(0x1100).is_none(), "not taken away");
    }

    #[test]
    fn a_revert_checks_its_versions_its_trampoline_held_too_and_its_helpers() {
        let mut p = patch(
            4,
            (0x9000, 0x9200),
            vec![
                function(
                    "price",
                    (0x1000, 4),
                    (0x9040, 0x40),
                    Strategy::Redirect,
                    Some(0x1100),
                ),
                function(
                    "tax",
                    (0x3000, 0x30),
                    (0x3000, 0x10),
                    Strategy::InPlace,
                    None,
                ),
                function(
                    "cut",
                    (0x4000, 0x20),
                    (0x9100, 0x20),
                    Strategy::Redirect,
                    None,
                ),
            ],
        );
        let (ranges, names) = of_revert(&p);
        assert_eq!(names, ["price", "tax", "cut", "code of patch 4"]);
        // Three bodies, a trampoline, and the three helper gaps between and around the bodies
        // in the patch's code: no helper range over a body, so an activity is named precisely.
        assert_eq!(ranges.len(), 7, "{:x?}", ranges.iter().collect::<Vec<_>>());
        for (addr, want) in [
            (0x9040, Some(0)),
            (0x907f, Some(0)),
            // In place: the whole old function, not only the new code's length.
            (0x3000, Some(1)),
            (0x302f, Some(1)),
            (0x3030, None),
            (0x9100, Some(2)),
            (0x911f, Some(2)),
            // The helpers: before, between and after the functions' code.
            (0x9000, Some(3)),
            (0x903f, Some(3)),
            (0x9080, Some(3)),
            (0x90ff, Some(3)),
            (0x9120, Some(3)),
            (0x91ff, Some(3)),
            (0x9200, None),
            (0x1100, Some(0)),
            (0x1104, Some(0)),
            (0x1105, None),
            (0x1000, None),
        ] {
            assert_eq!(ranges.find(addr), want, "{addr:#x}");
        }
        // A thread held at a breakpoint on the trampoline would resume into padding.
        for (site, want) in [(0x1100, Some(0)), (0x1104, Some(0)), (0x1105, None)] {
            assert_eq!(ranges.find_held(site), want, "{site:#x}");
        }
        assert_eq!(ranges.find_held(0x9040), None, "a body is not held");

        // Code that is all functions has no helper range.
        p.code = (0x9040, 0x9080);
        p.functions.truncate(1);
        let (ranges, _) = of_revert(&p);
        assert_eq!(ranges.len(), 2, "the body and the trampoline only");
        assert_eq!(ranges.find(0x9040), Some(0));
    }

    #[test]
    fn unwind_tables_may_describe_the_patch_and_the_old_functions_written_in_place() {
        let functions = [
            function(
                "price",
                (0x1000, 4),
                (0x9040, 0x40),
                Strategy::Redirect,
                None,
            ),
            function(
                "tax",
                (0x3000, 0x30),
                (0x3000, 0x10),
                Strategy::InPlace,
                None,
            ),
        ];
        assert_eq!(
            unwind_code((0x9000, 0x9100), &functions),
            [(0x9000, 0x9100), (0x3000, 0x3030)]
        );
    }
}
