//! x86_64 instruction encodings used to redirect code. Pure functions, unit-tested against
//! known encodings.

/// `endbr64`
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// Length of `jmp rel32`.
pub const JMP_REL32_LEN: usize = 5;

/// Displacement for a rel32 branch whose next instruction starts at `next` and goes to
/// `target`; `None` when out of range.
pub fn rel32(next: usize, target: usize) -> Option<i32> {
    i32::try_from((target as i64).wrapping_sub(next as i64)).ok()
}

/// `jmp rel32` placed at `at` jumping to `target`.
pub fn jmp_rel32(at: usize, target: usize) -> Option<[u8; 5]> {
    let d = rel32(at.wrapping_add(5), target)?;
    let mut out = [0xe9, 0, 0, 0, 0];
    out[1..].copy_from_slice(&d.to_le_bytes());
    Some(out)
}

/// `jmp qword ptr [rip + disp]` placed at `at`, reading its target from `slot`.
pub fn jmp_indirect_rip(at: usize, slot: usize) -> Option<[u8; 6]> {
    let d = rel32(at.wrapping_add(6), slot)?;
    let mut out = [0xff, 0x25, 0, 0, 0, 0];
    out[2..].copy_from_slice(&d.to_le_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel32_range() {
        assert_eq!(rel32(0x1000, 0x2000), Some(0x1000));
        assert_eq!(rel32(0x2000, 0x1000), Some(-0x1000));
        let max = i32::MAX as usize;
        assert_eq!(rel32(0x1000, 0x1000 + max), Some(i32::MAX));
        assert_eq!(rel32(0x1000, 0x1000 + max + 1), None);
        let below = 0x1_0000_0000_usize;
        assert_eq!(rel32(below, below - (1 << 31)), Some(i32::MIN));
        assert_eq!(rel32(below, below - (1 << 31) - 1), None);
    }

    #[test]
    fn jmp_rel32_known_encodings() {
        // jmp to itself: e9 fb ff ff ff
        assert_eq!(
            jmp_rel32(0x1000, 0x1000),
            Some([0xe9, 0xfb, 0xff, 0xff, 0xff])
        );
        // jmp to the next instruction: e9 00 00 00 00
        assert_eq!(jmp_rel32(0x1000, 0x1005), Some([0xe9, 0, 0, 0, 0]));
        assert_eq!(
            jmp_rel32(0x5555_5555_1000, 0x5555_5555_2345),
            Some([0xe9, 0x40, 0x13, 0x00, 0x00])
        );
        assert_eq!(
            jmp_rel32(0x7f00_0000_0000, 0x7eff_ffff_0000),
            Some([0xe9, 0xfb, 0xff, 0xfe, 0xff])
        );
        assert_eq!(JMP_REL32_LEN, 5);
    }

    #[test]
    fn jmp_rel32_out_of_range() {
        assert_eq!(jmp_rel32(0x5555_5555_0000, 0x7f00_0000_0000), None);
        assert_eq!(jmp_rel32(0x7f00_0000_0000, 0x5555_5555_0000), None);
        // The limit counts from the end of the 5-byte instruction.
        let at = 0x1000_0000;
        assert!(jmp_rel32(at, at + 5 + i32::MAX as usize).is_some());
        assert_eq!(jmp_rel32(at, at + 6 + i32::MAX as usize), None);
    }

    #[test]
    fn jmp_indirect_rip_known_encodings() {
        // jmp qword ptr [rip + 0]: the slot right after the instruction.
        assert_eq!(
            jmp_indirect_rip(0x1000, 0x1006),
            Some([0xff, 0x25, 0, 0, 0, 0])
        );
        assert_eq!(
            jmp_indirect_rip(0x1000, 0x2000),
            Some([0xff, 0x25, 0xfa, 0x0f, 0x00, 0x00])
        );
        assert_eq!(
            jmp_indirect_rip(0x2000, 0x1000),
            Some([0xff, 0x25, 0xfa, 0xef, 0xff, 0xff])
        );
        assert_eq!(jmp_indirect_rip(0x1000, 0x1_0000_1000), None);
    }

    #[test]
    fn endbr64_bytes() {
        assert_eq!(ENDBR64, [0xf3, 0x0f, 0x1e, 0xfa]);
    }
}
