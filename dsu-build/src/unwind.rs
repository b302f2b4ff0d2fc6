//! Unwind tables: the records of an `.eh_frame` section that describe the kept functions.
//!
//! An `.eh_frame` is a sequence of records, each a 4-byte length then its body: a CIE (id 0)
//! holds what its FDEs share, an FDE (id: the distance back to its CIE) describes one
//! function, found through the relocation of its `pc_begin` field at offset 8. Every CIE is
//! kept (they are small and shared); an FDE is kept when its function is.

use crate::read::Reloc;

/// A filtered `.eh_frame`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Filtered {
    pub data: Vec<u8>,
    /// Relocations at their offsets in `data`.
    pub relocs: Vec<(u64, Reloc)>,
    /// FDEs kept.
    pub functions: usize,
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// The records of `data` (with relocations `relocs`, sorted by offset) whose FDE `kept`
/// accepts by its `pc_begin` relocation, plus every CIE. `None` for a layout this does not
/// read (64-bit lengths, a record past the end, an FDE without a relocation or before its
/// CIE).
pub(crate) fn filter(
    data: &[u8],
    relocs: &[Reloc],
    kept: impl Fn(&Reloc) -> bool,
) -> Option<Filtered> {
    let mut out = Filtered {
        data: Vec::new(),
        relocs: Vec::new(),
        functions: 0,
    };
    // Old offset of each CIE -> its new offset.
    let mut cies = std::collections::BTreeMap::new();
    let mut at = 0usize;
    while at < data.len() {
        let length = u32_at(data, at)?;
        if length == 0 {
            break; // terminator
        }
        if length == u32::MAX {
            return None;
        }
        let end = at.checked_add(4)?.checked_add(length as usize)?;
        if end > data.len() || length < 4 {
            return None;
        }
        let id = u32_at(data, at + 4)?;
        let inside = |r: &&Reloc| r.offset >= at as u64 && r.offset < end as u64;
        let new_at = out.data.len();
        if id == 0 {
            cies.insert(at, new_at);
        } else {
            let pc_begin = relocs.iter().find(|r| r.offset == at as u64 + 8)?;
            if !kept(pc_begin) {
                at = end;
                continue;
            }
            let cie = (at + 4).checked_sub(id as usize)?;
            let new_cie = *cies.get(&cie)?;
            out.functions += 1;
            out.data.extend_from_slice(&data[at..end]);
            // The CIE pointer: from this field back to the CIE, in the new layout.
            let pointer = u32::try_from(new_at + 4 - new_cie).ok()?;
            out.data[new_at + 4..new_at + 8].copy_from_slice(&pointer.to_le_bytes());
            for r in relocs.iter().filter(inside) {
                out.relocs.push((r.offset - at as u64 + new_at as u64, *r));
            }
            at = end;
            continue;
        }
        out.data.extend_from_slice(&data[at..end]);
        for r in relocs.iter().filter(inside) {
            out.relocs.push((r.offset - at as u64 + new_at as u64, *r));
        }
        at = end;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reloc(offset: u64, symbol: usize) -> Reloc {
        Reloc {
            offset,
            r_type: 2,
            symbol,
            addend: 0,
        }
    }

    /// A CIE of 8 bytes of body, then FDEs of 16 bytes of body for symbols 1, 2, 3.
    fn frames() -> (Vec<u8>, Vec<Reloc>) {
        let mut data = Vec::new();
        data.extend_from_slice(&8u32.to_le_bytes());
        data.extend_from_slice(&0u32.to_le_bytes());
        data.extend_from_slice(&[1, b'z', b'R', 0]);
        let mut relocs = Vec::new();
        for symbol in 1..=3 {
            let at = data.len();
            data.extend_from_slice(&16u32.to_le_bytes());
            data.extend_from_slice(&((at + 4) as u32).to_le_bytes());
            data.extend_from_slice(&[0; 4]); // pc_begin
            data.extend_from_slice(&(symbol as u32).to_le_bytes()); // pc_range
            data.extend_from_slice(&[0; 4]);
            relocs.push(reloc(at as u64 + 8, symbol));
        }
        data.extend_from_slice(&0u32.to_le_bytes());
        (data, relocs)
    }

    #[test]
    fn keeps_the_cie_and_the_kept_functions_fdes_with_their_cie_pointers_rewritten() {
        let (data, relocs) = frames();
        let out = filter(&data, &relocs, |r| r.symbol == 3).unwrap();
        assert_eq!(out.functions, 1);
        assert_eq!(out.data.len(), 12 + 20);
        assert_eq!(&out.data[..12], &data[..12]);
        // The FDE now follows the CIE directly: its pointer is 12 + 4 back.
        assert_eq!(u32_at(&out.data, 16), Some(16));
        assert_eq!(u32_at(&out.data, 24), Some(3));
        assert_eq!(out.relocs, [(20, reloc(60, 3))]);
    }

    #[test]
    fn malformed_tables_are_not_read() {
        let (data, relocs) = frames();
        assert!(filter(&data[..30], &relocs, |_| true).is_none());
        let mut long = data.clone();
        long[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(filter(&long, &relocs, |_| true).is_none());
        assert!(filter(&data, &[], |_| true).is_none());
    }
}
