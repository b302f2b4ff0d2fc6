//! Call sites: the direct `call rel32` and `jmp rel32` (and `jcc rel32`) instructions of a
//! module, found by decoding its functions by their symbol ranges, so that a patched direct
//! call can go straight to the new code instead of through the old entry's jump.
//!
//! Built before any thread is stopped, once per module, and kept: decoding a large executable
//! takes tens of milliseconds.
//!
//! Unsafe code is allowed here: this module reads the code of loaded modules to decode it; every
//! block states its invariant.

#![allow(unsafe_code)]

use std::collections::HashMap;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction};

/// A direct branch with a 32-bit displacement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallSite {
    /// Address of the instruction.
    pub at: usize,
    /// Address of its rel32 field.
    pub field: usize,
    /// Address of the next instruction (what rel32 is relative to).
    pub next: usize,
}

impl CallSite {
    /// The rel32 field's bytes to reach `target`, `None` when out of reach.
    pub fn field_for(&self, target: usize) -> Option<[u8; 4]> {
        dsu_sys::x86::rel32(self.next, target).map(i32::to_le_bytes)
    }
}

/// Direct branch sites of one module, by the address they branch to.
#[derive(Debug, Default)]
pub struct CallIndex {
    by_target: HashMap<usize, Vec<CallSite>>,
    /// Short (`rel8`) branches that leave their function, by target: they cannot be
    /// retargeted, but they name callers (a tail call to a nearby clone, say).
    short: HashMap<usize, Vec<usize>>,
}

impl CallIndex {
    /// Decodes `functions` (`(address, size)`, mapped readable code) and records every direct
    /// rel32 branch.
    ///
    /// # Safety
    /// Every `[address, address + size)` is mapped readable for the duration of the call.
    pub unsafe fn build(functions: &[(usize, usize)]) -> CallIndex {
        let mut index = CallIndex::default();
        for &(address, size) in functions {
            // SAFETY: mapped readable, by this function's contract.
            let code = unsafe { std::slice::from_raw_parts(address as *const u8, size) };
            index.add_function(address, code);
        }
        index
    }

    /// Records the direct branches of one function's code, decoded from its start. Pure.
    pub fn add_function(&mut self, address: usize, code: &[u8]) {
        let mut decoder = Decoder::with_ip(64, code, address as u64, DecoderOptions::NONE);
        let mut instr = Instruction::default();
        while decoder.can_decode() {
            decoder.decode_out(&mut instr);
            if instr.is_invalid() {
                break; // data or padding: the rest of this range is not code we understand
            }
            if let Some(site) = rel32_branch(&instr) {
                self.by_target
                    .entry(instr.near_branch_target() as usize)
                    .or_default()
                    .push(site);
            } else if instr.is_jmp_short_or_near() || instr.is_jcc_short_or_near() {
                let to = instr.near_branch_target() as usize;
                if to < address || to >= address + code.len() {
                    self.short.entry(to).or_default().push(instr.ip() as usize);
                }
            }
        }
    }

    /// Sites branching to `target`.
    pub fn sites(&self, target: usize) -> &[CallSite] {
        self.by_target.get(&target).map_or(&[], Vec::as_slice)
    }

    /// Where the short branches to `target` from other functions are.
    pub fn short_sites(&self, target: usize) -> &[usize] {
        self.short.get(&target).map_or(&[], Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.by_target.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_target.is_empty()
    }
}

/// The site of `instr` when it is a direct branch whose displacement is the last 4 bytes.
fn rel32_branch(instr: &Instruction) -> Option<CallSite> {
    let len = instr.len();
    let rel32 = matches!(instr.code(), Code::Call_rel32_64 | Code::Jmp_rel32_64)
        || (instr.is_jcc_near() && len == 6);
    if !rel32 || len < 5 {
        return None;
    }
    let next = instr.next_ip() as usize;
    Some(CallSite {
        at: instr.ip() as usize,
        field: next - 4,
        next,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_calls_jumps_and_conditional_jumps_to_a_target() {
        let base = 0x1000;
        let target = 0x2000usize;
        let rel = |next: usize| ((target as i64 - next as i64) as i32).to_le_bytes();
        let mut code = vec![0x55]; // push rbp
        code.push(0xe8); // call target
        code.extend(rel(base + 6));
        code.extend([0x0f, 0x84]); // je target
        code.extend(rel(base + 12));
        code.push(0xe9); // jmp target
        code.extend(rel(base + 17));
        code.extend([0xeb, 0x00]); // jmp short: cannot be retargeted
        code.push(0xc3);
        code.extend([0xeb, 0x10]); // jmp short out of the function
        code.extend([0x74, 0xfe]); // je short to itself
        let mut index = CallIndex::default();
        index.add_function(base, &code);
        let sites = index.sites(target);
        assert_eq!(sites.len(), 3);
        assert_eq!(
            sites[0],
            CallSite {
                at: base + 1,
                field: base + 2,
                next: base + 6
            }
        );
        assert_eq!(sites[1].field, base + 8);
        assert_eq!(sites[2].at, base + 12);
        assert_eq!(
            sites[0].field_for(0x3000),
            Some(((0x3000 - (base + 6)) as i32).to_le_bytes())
        );
        assert!(index.sites(0x9999).is_empty());
        let out = base + code.len() - 4 + 2 + 0x10;
        assert_eq!(index.short_sites(out), [base + code.len() - 4]);
        assert!(
            index.short_sites(base + code.len() - 2).is_empty(),
            "inside the function"
        );
        assert!(
            index.short_sites(base + 19).is_empty(),
            "inside the function"
        );
    }

    #[test]
    fn a_short_branch_back_to_the_functions_own_entry_stays_inside() {
        let base = 0x1000;
        let mut index = CallIndex::default();
        // nop; jmp short base (back to the first byte); jmp short base + 5 (just past the end).
        index.add_function(base, &[0x90, 0xeb, 0xfd, 0xeb, 0x00]);
        assert!(index.short_sites(base).is_empty());
        assert_eq!(index.short_sites(base + 5), [base + 3]);
    }

    #[test]
    fn stops_at_undecodable_bytes() {
        let mut index = CallIndex::default();
        // 0f 0b = ud2 decodes; 0f ff with nothing after does not.
        index.add_function(0x1000, &[0x0f, 0xff]);
        assert!(index.is_empty());
    }
}
