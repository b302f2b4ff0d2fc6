//! Prepare: decide, before any thread is stopped, exactly which bytes the write stage will
//! store, and refuse targets that cannot take an entry jump.
//!
//! A 5-byte `jmp rel32` at the entry needs a function of at least 5 bytes (9 when it starts
//! with `endbr64`, which is kept so indirect calls still land on a valid target under CET) and
//! no branch inside the function into the overwritten bytes 1..4: a thread taking such a branch
//! after the update would execute half an instruction. The function is decoded to check.
//!
//! Unsafe code is allowed here: this module reads the code of the functions being replaced; every
//! block states its invariant.

#![allow(unsafe_code)]

use dsu_sys::x86::{self, ENDBR64, JMP_REL32_LEN};
use iced_x86::{Decoder, DecoderOptions};
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PrepareError {
    #[error(
        "{name} in {module} is {size} bytes; an entry jump needs {need}: too small to patch (was it inlined or folded?)"
    )]
    TooSmall {
        name: String,
        module: String,
        size: u64,
        need: u64,
    },
    #[error(
        "{name} in {module} cannot take an entry jump: the instruction at {from:#x} ({bytes}) branches to {to:#x}, inside the bytes the jump overwrites"
    )]
    BranchIntoEntry {
        name: String,
        module: String,
        from: usize,
        to: usize,
        bytes: String,
    },
    #[error("{name} in {module}: cannot decode the instruction at {at:#x} ({bytes})")]
    Undecodable {
        name: String,
        module: String,
        at: usize,
        bytes: String,
    },
    #[error("{name}: new code at {new:#x} is out of rel32 reach of the entry at {site:#x}")]
    OutOfReach {
        name: String,
        site: usize,
        new: usize,
    },
    #[error("{name} in {module}: {size:#x} bytes at {address:#x} are not mapped readable")]
    NotMapped {
        name: String,
        module: String,
        address: usize,
        size: u64,
    },
}

/// The entry jump that switches one function to its new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// Where the jump is written: the entry, or just after its `endbr64`.
    pub site: usize,
    /// The jump.
    pub bytes: [u8; JMP_REL32_LEN],
    /// What the jump overwrites in the code given (the function's pristine bytes).
    pub original: [u8; JMP_REL32_LEN],
}

/// Checks the function's code (`code` is its bytes, read from `address`) and builds its jump.
pub fn plan_redirect(
    name: &str,
    module: &str,
    address: usize,
    code: &[u8],
    new_address: usize,
) -> Result<Redirect, PrepareError> {
    let skip = if code.starts_with(&ENDBR64) {
        ENDBR64.len()
    } else {
        0
    };
    let need = (skip + JMP_REL32_LEN) as u64;
    if (code.len() as u64) < need {
        return Err(PrepareError::TooSmall {
            name: name.into(),
            module: module.into(),
            size: code.len() as u64,
            need,
        });
    }
    let site = address + skip;
    check_branches(name, module, address, code, site)?;
    let bytes = x86::jmp_rel32(site, new_address).ok_or_else(|| PrepareError::OutOfReach {
        name: name.into(),
        site,
        new: new_address,
    })?;
    let mut original = [0; JMP_REL32_LEN];
    original.copy_from_slice(&code[skip..skip + JMP_REL32_LEN]);
    Ok(Redirect {
        site,
        bytes,
        original,
    })
}

/// Refuses a branch from anywhere in the function into `(site, site + 5)`.
fn check_branches(
    name: &str,
    module: &str,
    address: usize,
    code: &[u8],
    site: usize,
) -> Result<(), PrepareError> {
    let hex = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut decoder = Decoder::with_ip(64, code, address as u64, DecoderOptions::NONE);
    while decoder.can_decode() {
        let offset = decoder.position();
        let instr = decoder.decode();
        let at = address + offset;
        let bytes = &code[offset..offset + instr.len().max(1).min(code.len() - offset)];
        if instr.is_invalid() {
            return Err(PrepareError::Undecodable {
                name: name.into(),
                module: module.into(),
                at,
                bytes: hex(bytes),
            });
        }
        let to = instr.near_branch_target() as usize;
        if to > site && to < site + JMP_REL32_LEN {
            return Err(PrepareError::BranchIntoEntry {
                name: name.into(),
                module: module.into(),
                from: at,
                to,
                bytes: hex(bytes),
            });
        }
    }
    Ok(())
}

/// Reads a function's bytes from this process, after checking they are mapped readable.
pub fn read_code(
    name: &str,
    module: &str,
    address: usize,
    size: u64,
    maps: &[dsu_sys::maps::MapEntry],
) -> Result<Vec<u8>, PrepareError> {
    let end = address.checked_add(size as usize);
    if !end.is_some_and(|end| readable(maps, address, end)) {
        return Err(PrepareError::NotMapped {
            name: name.into(),
            module: module.into(),
            address,
            size,
        });
    }
    // SAFETY: `[address, address + size)` is covered by readable mappings (checked above);
    // code mappings of loaded modules are not unmapped while the agent runs.
    let code = unsafe { std::slice::from_raw_parts(address as *const u8, size as usize) };
    Ok(code.to_vec())
}

/// Whether `[start, end)` is covered by readable mappings without a gap: a text mapping split
/// by an `mprotect` elsewhere in it still reads as one range.
pub fn readable(maps: &[dsu_sys::maps::MapEntry], start: usize, end: usize) -> bool {
    let mut at = start;
    for m in maps.iter().filter(|m| m.perms.read && m.end > start) {
        if m.start > at {
            return false;
        }
        at = at.max(m.end);
        if at >= end {
            return true;
        }
    }
    at >= end
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: usize = 0x40_0000;

    fn map(start: usize, end: usize, read: bool) -> dsu_sys::maps::MapEntry {
        dsu_sys::maps::MapEntry {
            start,
            end,
            perms: dsu_sys::maps::Perms {
                read,
                exec: true,
                ..Default::default()
            },
            offset: 0,
            path: None,
        }
    }

    #[test]
    fn a_range_across_split_mappings_is_readable() {
        let maps = [map(0x1000, 0x2000, true), map(0x2000, 0x3000, true)];
        assert!(readable(&maps, 0x1ff0, 0x2010));
        assert!(readable(&maps, 0x1000, 0x3000));
        assert!(!readable(&maps, 0x1000, 0x3001));
        let gap = [map(0x1000, 0x2000, true), map(0x2100, 0x3000, true)];
        assert!(!readable(&gap, 0x1ff0, 0x2110));
        let unreadable = [map(0x1000, 0x2000, true), map(0x2000, 0x3000, false)];
        assert!(!readable(&unreadable, 0x1ff0, 0x2010));
    }

    #[test]
    fn plain_function_gets_a_jump_at_its_entry() {
        // mov eax, 1; add eax, edi; ret
        let code = [0xb8, 1, 0, 0, 0, 0x01, 0xf8, 0xc3];
        let r = plan_redirect("f", "m", AT, &code, AT + 0x1000).unwrap();
        assert_eq!(r.site, AT);
        assert_eq!(r.bytes, [0xe9, 0xfb, 0x0f, 0, 0]);
        assert_eq!(r.original, [0xb8, 1, 0, 0, 0]);
    }

    #[test]
    fn endbr64_is_kept_and_the_jump_follows_it() {
        let mut code = ENDBR64.to_vec();
        code.extend([0xb8, 1, 0, 0, 0, 0xc3]);
        let r = plan_redirect("f", "m", AT, &code, AT + 0x1000).unwrap();
        assert_eq!(r.site, AT + 4);
        assert_eq!(r.bytes[0], 0xe9);
        assert_eq!(
            i32::from_le_bytes(r.bytes[1..].try_into().unwrap()),
            0x1000 - 9
        );
    }

    #[test]
    fn too_small_functions_are_refused() {
        let e = plan_redirect("tiny", "m", AT, &[0x31, 0xc0, 0xc3], AT + 64).unwrap_err();
        assert!(matches!(
            e,
            PrepareError::TooSmall {
                size: 3,
                need: 5,
                ..
            }
        ));
        let mut code = ENDBR64.to_vec();
        code.extend([0x31, 0xc0, 0xc3]);
        let e = plan_redirect("tiny", "m", AT, &code, AT + 64).unwrap_err();
        assert!(matches!(
            e,
            PrepareError::TooSmall {
                size: 7,
                need: 9,
                ..
            }
        ));
    }

    #[test]
    fn a_branch_into_the_overwritten_bytes_is_refused() {
        // 0: xor eax,eax (2) ; 2: inc eax (2) ; 4: cmp eax,5 (3) ; 7: jne 2 (2) ; 9: ret
        let code = [0x31, 0xc0, 0xff, 0xc0, 0x83, 0xf8, 0x05, 0x75, 0xf9, 0xc3];
        let e = plan_redirect("loop", "m", AT, &code, AT + 64).unwrap_err();
        match e {
            PrepareError::BranchIntoEntry {
                from, to, bytes, ..
            } => {
                assert_eq!(from, AT + 7);
                assert_eq!(to, AT + 2);
                assert_eq!(bytes, "75 f9");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_branch_back_to_the_entry_itself_is_fine() {
        // 0: dec edi (2); 2: nop*3; 5: jnz 0 (2); 7: ret
        let code = [0xff, 0xcf, 0x90, 0x90, 0x90, 0x75, 0xf9, 0xc3];
        assert!(plan_redirect("loop", "m", AT, &code, AT + 64).is_ok());
    }

    #[test]
    fn undecodable_bytes_are_refused() {
        let code = [0xb8, 1, 0, 0, 0, 0x0f, 0xff];
        let e = plan_redirect("f", "m", AT, &code, AT + 64).unwrap_err();
        assert!(matches!(e, PrepareError::Undecodable { at, .. } if at == AT + 5));
    }

    #[test]
    fn out_of_reach_new_code_is_refused() {
        let code = [0xb8, 1, 0, 0, 0, 0xc3];
        let e = plan_redirect("f", "m", AT, &code, AT + (1 << 33)).unwrap_err();
        assert!(matches!(e, PrepareError::OutOfReach { .. }));
    }
}
