//! What an unwinder computes at each offset of a function: the rows of its FDE, relative to the
//! function's entry. Used to decide whether new code may be written over old code (issue 10,
//! "unwind tables switch with the code").
//!
//! An in-place update leaves two tables describing one address range: the module's own FDE (for
//! the old code) and the patch's (for the new code). A registered table wins in the C++ and
//! Rust unwinders, and it is registered before the switch, which may retry for seconds; after a
//! revert it goes only after the old bytes are back. So both tables describe both codes for a
//! while, and at no moment may either describe code it was not built for. That holds exactly
//! when the two agree at every offset the new code covers: the same CFA rule and the same
//! register rules, and no language-specific data (landing pads are addresses in one code only).
//! When they do not agree the function is redirected instead: its new code lives at a new
//! address, described only by its own table.

use gimli::{
    BaseAddresses, CfaRule, EhFrame, FrameDescriptionEntry, NativeEndian, Register, RegisterRule,
    UnwindContext, UnwindSection,
};

type Offset = usize;

/// One row: `[start, end)` relative to the function's entry, and the rules there.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    start: u64,
    end: u64,
    cfa: CfaRule<Offset>,
    /// Sorted by register number: rule maps compare regardless of insertion order.
    registers: Vec<(u16, RegisterRule<Offset>)>,
}

/// The unwind description of one function, relative to its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRules {
    rows: Vec<Row>,
    /// The FDE points at language-specific data (C++ or Rust landing pads).
    lsda: bool,
    signal_frame: bool,
    return_register: u16,
}

impl FrameRules {
    /// The rules of `fde`, relative to `entry` (which the FDE must cover).
    pub fn of_fde<R: gimli::Reader<Offset = Offset>>(
        fde: &FrameDescriptionEntry<R>,
        eh_frame: &EhFrame<R>,
        bases: &BaseAddresses,
        entry: u64,
    ) -> gimli::Result<FrameRules> {
        if !fde.contains(entry) {
            return Err(gimli::Error::NoUnwindInfoForAddress);
        }
        let mut ctx = UnwindContext::new();
        let mut table = fde.rows(eh_frame, bases, &mut ctx)?;
        let mut rows = Vec::new();
        while let Some(row) = table.next_row()? {
            if row.end_address() <= entry {
                continue;
            }
            let mut registers: Vec<(u16, RegisterRule<Offset>)> = row
                .registers()
                .map(|(Register(r), rule)| (*r, rule.clone()))
                .collect();
            registers.sort_unstable_by_key(|&(r, _)| r);
            rows.push(Row {
                start: row.start_address().saturating_sub(entry),
                end: row.end_address() - entry,
                cfa: row.cfa().clone(),
                registers,
            });
        }
        Ok(FrameRules {
            rows,
            lsda: fde.lsda().is_some(),
            signal_frame: fde.is_signal_trampoline(),
            return_register: fde.cie().return_address_register().0,
        })
    }

    /// Every FDE of an unrelocated `.eh_frame` section of a relocatable object, by its offset in
    /// the section, with its rules relative to its own start. The object's address fields are
    /// still zero: only the offsets between rows are meaningful, which is all this keeps.
    pub fn of_object_section(data: &[u8]) -> gimli::Result<Vec<(usize, FrameRules)>> {
        let eh_frame = EhFrame::new(data, NativeEndian);
        let bases = BaseAddresses::default().set_eh_frame(0);
        let mut out = Vec::new();
        let mut entries = eh_frame.entries(&bases);
        while let Some(entry) = entries.next()? {
            if let gimli::CieOrFde::Fde(partial) = entry {
                let fde = partial.parse(EhFrame::cie_from_offset)?;
                if fde.len() > 0 {
                    let rules = FrameRules::of_fde(&fde, &eh_frame, &bases, fde.initial_address())?;
                    out.push((fde.offset(), rules));
                }
            }
        }
        Ok(out)
    }

    /// Whether `self` (the new code's rules) and `old` give an unwinder the same answer at every
    /// offset below `len` (the new code's length), with no landing pads in either.
    pub fn interchangeable_with(&self, old: &FrameRules, len: u64) -> bool {
        if self.lsda
            || old.lsda
            || self.signal_frame != old.signal_frame
            || self.return_register != old.return_register
        {
            return false;
        }
        fn rule_at(rules: &FrameRules, at: u64) -> Option<&Row> {
            rules.rows.iter().find(|r| r.start <= at && at < r.end)
        }
        // Rules change only where a row of either table starts or ends: compare there.
        let bounds = self
            .rows
            .iter()
            .chain(&old.rows)
            .flat_map(|r| [r.start, r.end]);
        std::iter::once(0)
            .chain(bounds)
            .filter(|&at| at < len)
            .all(|at| match (rule_at(self, at), rule_at(old, at)) {
                (Some(a), Some(b)) => a.cfa == b.cfa && a.registers == b.registers,
                _ => false,
            })
    }
}

/// Whether new code may be written over old code as far as unwinding goes: both have the same
/// rules over the new code's `len` bytes, or neither has unwind information at all.
pub fn in_place_keeps_unwinding(
    old: Option<&FrameRules>,
    new: Option<&FrameRules>,
    len: u64,
) -> bool {
    match (old, new) {
        (None, None) => true,
        (Some(old), Some(new)) => new.interchangeable_with(old, len),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(start: u64, end: u64, cfa_offset: i64) -> Row {
        Row {
            start,
            end,
            cfa: CfaRule::RegisterAndOffset {
                register: Register(7),
                offset: cfa_offset,
            },
            registers: vec![(16, RegisterRule::Offset(-8))],
        }
    }

    fn rules(rows: Vec<Row>) -> FrameRules {
        FrameRules {
            rows,
            lsda: false,
            signal_frame: false,
            return_register: 16,
        }
    }

    #[test]
    fn the_same_leaf_frame_is_interchangeable_over_the_shorter_code() {
        let old = rules(vec![row(0, 12, 8)]);
        let new = rules(vec![row(0, 6, 8)]);
        assert!(in_place_keeps_unwinding(Some(&old), Some(&new), 6));
    }

    #[test]
    fn a_different_frame_size_after_the_prologue_is_not() {
        let old = rules(vec![row(0, 1, 8), row(1, 40, 0xd0)]);
        let new = rules(vec![row(0, 1, 8), row(1, 20, 16)]);
        assert!(!in_place_keeps_unwinding(Some(&old), Some(&new), 20));
        // The same prologue, a change only past the new code's end: interchangeable.
        let new = rules(vec![row(0, 1, 8), row(1, 20, 0xd0)]);
        let old = rules(vec![row(0, 1, 8), row(1, 30, 0xd0), row(30, 40, 8)]);
        assert!(in_place_keeps_unwinding(Some(&old), Some(&new), 20));
    }

    #[test]
    fn a_change_at_a_row_start_of_only_one_table_is_seen() {
        let old = rules(vec![row(0, 4, 8), row(4, 20, 16)]);
        let new = rules(vec![row(0, 20, 8)]);
        assert!(!in_place_keeps_unwinding(Some(&old), Some(&new), 20));
        assert!(!in_place_keeps_unwinding(Some(&new), Some(&old), 20));
    }

    #[test]
    fn landing_pads_or_one_sided_tables_refuse_in_place() {
        let plain = rules(vec![row(0, 12, 8)]);
        let mut with_pads = plain.clone();
        with_pads.lsda = true;
        assert!(!in_place_keeps_unwinding(
            Some(&plain),
            Some(&with_pads),
            12
        ));
        assert!(!in_place_keeps_unwinding(
            Some(&with_pads),
            Some(&plain),
            12
        ));
        assert!(!in_place_keeps_unwinding(Some(&plain), None, 12));
        assert!(!in_place_keeps_unwinding(None, Some(&plain), 12));
        assert!(in_place_keeps_unwinding(None, None, 12));
        // A signal frame, or another return-address register, is another kind of frame.
        let mut signal = plain.clone();
        signal.signal_frame = true;
        assert!(!in_place_keeps_unwinding(Some(&plain), Some(&signal), 12));
        assert!(!in_place_keeps_unwinding(Some(&signal), Some(&plain), 12));
        let mut other_ra = plain.clone();
        other_ra.return_register = 15;
        assert!(!in_place_keeps_unwinding(Some(&plain), Some(&other_ra), 12));
        // Rows that stop short of the new code's end describe nothing there.
        assert!(!in_place_keeps_unwinding(
            Some(&rules(vec![row(0, 8, 8)])),
            Some(&plain),
            12
        ));
    }

    /// The `.eh_frame` of `source` compiled as a patch is (`-O2 -fPIC -ffunction-sections`),
    /// by `compiler` (`cc` or `c++`).
    fn eh_frame_of(compiler: &str, source: &str, ext: &str) -> Vec<u8> {
        use object::{Object, ObjectSection};
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dsu-frame-rules-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join(format!("f.{ext}"));
        let obj = dir.join("f.o");
        std::fs::write(&src, source).unwrap();
        let status = std::process::Command::new(compiler)
            .args(["-c", "-O2", "-fPIC", "-ffunction-sections", "-o"])
            .arg(&obj)
            .arg(&src)
            .status()
            .unwrap();
        assert!(status.success(), "{compiler} failed");
        let bytes = std::fs::read(&obj).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let file = object::File::parse(&*bytes).unwrap();
        file.section_by_name(".eh_frame")
            .unwrap()
            .data()
            .unwrap()
            .to_vec()
    }

    const C_FUNCTIONS: &str = "
        extern long ext(long);
        long leaf(long x) { return x * 3 + 1; }
        long other_leaf(long x) { return x * 5 + 2; }
        long framed(long x) { volatile long b[32]; b[0] = x; return ext(b[0]) + b[0]; }
    ";

    #[test]
    fn rules_of_real_functions_tell_frames_apart() {
        let data = eh_frame_of("cc", C_FUNCTIONS, "c");
        let fdes = FrameRules::of_object_section(&data).unwrap();
        assert_eq!(fdes.len(), 3, "{fdes:?}");
        // FDE order follows the sections: leaf, other_leaf, framed.
        let (leaf, other, framed) = (&fdes[0].1, &fdes[1].1, &fdes[2].1);
        assert!(fdes[0].0 < fdes[1].0 && fdes[1].0 < fdes[2].0);
        assert_eq!(leaf.rows.len(), 1, "{leaf:?}");
        assert_eq!(
            leaf.rows[0].cfa,
            CfaRule::RegisterAndOffset {
                register: Register(7),
                offset: 8
            }
        );
        assert!(!leaf.lsda && !leaf.signal_frame && leaf.return_register == 16);
        assert!(framed.rows.len() > 1, "{framed:?}");
        assert!(leaf.interchangeable_with(other, 4));
        assert!(!framed.interchangeable_with(leaf, 16));
        assert!(!leaf.interchangeable_with(framed, 16));
    }

    #[test]
    fn landing_pads_are_seen_in_real_code() {
        let data = eh_frame_of(
            "c++",
            "extern void ext(); int guarded() { try { ext(); } catch (...) { return 1; } return 0; }",
            "cc",
        );
        let fdes = FrameRules::of_object_section(&data).unwrap();
        // The function and its cold part (the handler), each with the landing pads' table.
        assert!(!fdes.is_empty(), "{fdes:?}");
        for (_, rules) in &fdes {
            assert!(rules.lsda, "{rules:?}");
            assert!(!rules.interchangeable_with(rules, 4));
        }
    }

    #[test]
    fn an_entry_outside_the_fde_is_refused() {
        let data = eh_frame_of("cc", C_FUNCTIONS, "c");
        let eh_frame = EhFrame::new(&data[..], NativeEndian);
        let bases = BaseAddresses::default().set_eh_frame(0);
        let mut entries = eh_frame.entries(&bases);
        while let Some(entry) = entries.next().unwrap() {
            if let gimli::CieOrFde::Fde(partial) = entry {
                let fde = partial.parse(EhFrame::cie_from_offset).unwrap();
                let start = fde.initial_address();
                assert!(FrameRules::of_fde(&fde, &eh_frame, &bases, start).is_ok());
                assert!(FrameRules::of_fde(&fde, &eh_frame, &bases, start + fde.len()).is_err());
                // Rows are relative to the entry asked for.
                let inside = FrameRules::of_fde(&fde, &eh_frame, &bases, start + 1).unwrap();
                assert!(inside.rows.iter().all(|r| r.end < fde.len()));
            }
        }
    }
}
