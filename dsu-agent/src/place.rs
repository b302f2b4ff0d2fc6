//! Place: lay out the patch image and map it within reach of the code it refers to.
//!
//! Image layout (offsets from the mapping's start, each part page-aligned):
//!
//! ```text
//! [ code sections | call stubs ]            read+execute
//! [ rodata, .data.rel.ro, .eh_frame | GOT ] read-only once relocated
//! [ .data | .bss | common symbols ]         read+write
//! ```
//!
//! The whole image is mapped read+execute first (so the code part never *gains* execute, which
//! a process under `PR_SET_MDWE` refuses), the data parts are then switched to read+write (no
//! longer executable), filled, and the read-only part is sealed. Code bytes are written through
//! [`dsu_sys::code::CodeWriter`]; the image is never writable and executable at once.
//!
//! Unsafe code is allowed here: this module writes the relocated image into its fresh mapping;
//! every block states its invariant.

#![allow(unsafe_code)]

use std::collections::HashMap;

use dsu_sys::code::CodeWriter;
use dsu_sys::mem::{Mapping, Prot};
use thiserror::Error;

use crate::load::{Definition, PatchObject, SectionKind};

/// Length of one call stub: `jmp qword [rip + disp32]` padded with `int3`.
pub const STUB_LEN: usize = 8;
/// Length of one GOT slot.
pub const GOT_SLOT_LEN: usize = 8;

/// Bytes after each `.eh_frame` that stay zero: its terminator.
pub const EH_FRAME_TERMINATOR: usize = 4;

/// Reach of a `rel32` from any byte of the image, with a margin for addends.
const REL32_REACH: usize = 0x7fff_0000;

#[derive(Debug, Error)]
pub enum PlaceError {
    #[error(
        "the code the patch must reach spans {span:#x} bytes ({low:#x}..{high:#x}); a rel32 \
         reaches 2 GiB. A patch compiled without -fPIC reaches other modules' data directly: \
         rebuild it with -fPIC (it then goes through its GOT); otherwise split the patch"
    )]
    TooFarApart {
        low: usize,
        high: usize,
        span: usize,
    },
    #[error("no free address range of {len:#x} bytes within reach of {anchor:#x}: {source}")]
    NoSpace {
        anchor: usize,
        len: usize,
        source: std::io::Error,
    },
    #[error("cannot set protection of the patch image at {addr:#x}: {source}")]
    Protect { addr: usize, source: std::io::Error },
    #[error("cannot write patch code at {addr:#x}: {source}")]
    WriteCode { addr: usize, source: std::io::Error },
}

/// Where everything of the patch goes, as offsets into the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    pub size: usize,
    /// `[0, exec_end)` is code.
    pub exec_end: usize,
    /// `[exec_end, read_only_end)` is read-only after relocation; the rest is writable.
    pub read_only_end: usize,
    /// End of initialised data: `[init_end, size)` is `.bss` and commons, left to the
    /// kernel's zero pages.
    pub init_end: usize,
    /// ELF section index -> offset.
    pub sections: HashMap<usize, usize>,
    /// Symbol index of a common symbol -> offset.
    pub commons: HashMap<usize, usize>,
    pub stubs: usize,
    pub stub_count: usize,
    pub got: usize,
    pub got_count: usize,
}

impl Layout {
    pub fn stub(&self, n: usize) -> usize {
        self.stubs + n * STUB_LEN
    }

    pub fn got_slot(&self, n: usize) -> usize {
        self.got + n * GOT_SLOT_LEN
    }
}

fn align_up(x: usize, align: usize) -> usize {
    x.div_ceil(align) * align
}

/// Computes the layout. Pure.
pub fn layout(patch: &PatchObject, got_count: usize, stub_count: usize, page: usize) -> Layout {
    let mut out = Layout::default();
    let mut at = 0;
    let put = |out: &mut Layout, at: &mut usize, kinds: &[SectionKind]| {
        for s in patch.sections.iter().filter(|s| kinds.contains(&s.kind)) {
            *at = align_up(*at, s.align as usize);
            out.sections.insert(s.index, *at);
            *at += s.size as usize;
            if s.kind == SectionKind::EhFrame {
                // A zero length word ends the section for `__register_frame`, as the linker's
                // crtend.o does in a linked binary.
                *at += EH_FRAME_TERMINATOR;
            }
        }
    };

    put(&mut out, &mut at, &[SectionKind::Code]);
    at = align_up(at, 16);
    out.stubs = at;
    out.stub_count = stub_count;
    at += stub_count * STUB_LEN;
    at = align_up(at.max(1), page);
    out.exec_end = at;

    put(
        &mut out,
        &mut at,
        &[
            SectionKind::ReadOnly,
            SectionKind::RelRo,
            SectionKind::EhFrame,
        ],
    );
    at = align_up(at, GOT_SLOT_LEN);
    out.got = at;
    out.got_count = got_count;
    at += got_count * GOT_SLOT_LEN;
    at = align_up(at, page);
    out.read_only_end = at;

    put(&mut out, &mut at, &[SectionKind::Data]);
    out.init_end = at;
    put(&mut out, &mut at, &[SectionKind::Bss]);
    for (i, sym) in patch.symbols.iter().enumerate() {
        if let Definition::Common { size, align } = sym.definition {
            at = align_up(at, align as usize);
            out.commons.insert(i, at);
            at += size as usize;
        }
    }
    out.size = align_up(at, page);
    out
}

/// The anchor and reach such that every byte mapped within `reach` of `anchor` is within
/// rel32 reach of every point (the replaced functions, and process symbols the patch reaches
/// pc-relatively). Pure.
pub fn window(points: &[usize], image_len: usize) -> Result<(usize, usize), PlaceError> {
    let (Some(&low), Some(&high)) = (points.iter().min(), points.iter().max()) else {
        return Err(PlaceError::TooFarApart {
            low: 0,
            high: 0,
            span: 0,
        });
    };
    let span = high - low;
    let budget = REL32_REACH.saturating_sub(image_len);
    if span / 2 + image_len >= budget {
        return Err(PlaceError::TooFarApart { low, high, span });
    }
    Ok((low + span / 2, budget - span / 2 - span % 2))
}

/// Maps the image within `reach` of `anchor`: code part read+execute, the rest read+write.
pub fn map_image(
    layout: &Layout,
    anchor: usize,
    reach: usize,
    maps: &[dsu_sys::maps::MapEntry],
) -> Result<Mapping, PlaceError> {
    let mapping = Mapping::map_near_in(maps, anchor, layout.size, reach, Prot::ReadExec).map_err(
        |source| PlaceError::NoSpace {
            anchor,
            len: layout.size,
            source,
        },
    )?;
    if layout.size > layout.exec_end {
        mapping
            .protect(
                layout.exec_end,
                layout.size - layout.exec_end,
                Prot::ReadWrite,
            )
            .map_err(|source| PlaceError::Protect {
                addr: mapping.addr() + layout.exec_end,
                source,
            })?;
    }
    Ok(mapping)
}

/// Copies the relocated image into the mapping and seals it: code through `writer`, data by
/// plain stores, then the read-only part made read-only.
pub fn publish(
    mapping: &Mapping,
    layout: &Layout,
    image: &[u8],
    writer: &CodeWriter,
) -> Result<(), PlaceError> {
    debug_assert_eq!(image.len(), layout.size);
    let base = mapping.addr();
    let code = &image[..layout.exec_end];
    // SAFETY: the code part is mapped (the mapping is at least `exec_end` long) and nothing
    // executes it yet: no caller has been redirected to this image.
    unsafe { writer.write(base, code) }
        .map_err(|source| PlaceError::WriteCode { addr: base, source })?;
    dsu_sys::cpu::flush_icache(base, code.len());
    // Only initialised data: the zeroed tail stays untouched, costing no memory until used.
    let data = &image[layout.exec_end..layout.init_end.max(layout.exec_end)];
    if !data.is_empty() {
        // SAFETY: `[exec_end, init_end)` lies in the mapping's read+write part (set by
        // `map_image`), owned by this image; `data` has exactly that length.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (base + layout.exec_end) as *mut u8,
                data.len(),
            );
        }
    }
    let ro_len = layout.read_only_end - layout.exec_end;
    if ro_len > 0 {
        mapping
            .protect(layout.exec_end, ro_len, Prot::Read)
            .map_err(|source| PlaceError::Protect {
                addr: base + layout.exec_end,
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{Binding, Section, Symbol, SymbolType};

    fn section(index: usize, kind: SectionKind, size: u64, align: u64) -> Section {
        Section {
            index,
            name: format!(".s{index}"),
            kind,
            align,
            size,
            data: vec![0; size as usize],
        }
    }

    fn patch(sections: Vec<Section>, symbols: Vec<Symbol>) -> PatchObject {
        PatchObject {
            sections,
            symbols,
            relocations: vec![],
            scopes: vec![],
        }
    }

    #[test]
    fn code_then_read_only_then_data_each_page_aligned() {
        let p = patch(
            vec![
                section(1, SectionKind::Code, 10, 16),
                section(2, SectionKind::ReadOnly, 3, 1),
                section(3, SectionKind::Code, 7, 16),
                section(4, SectionKind::Data, 8, 8),
                section(5, SectionKind::EhFrame, 40, 8),
                section(6, SectionKind::Bss, 100, 32),
            ],
            vec![],
        );
        let l = layout(&p, 2, 1, 4096);
        assert_eq!(l.sections[&1], 0);
        assert_eq!(l.sections[&3], 16);
        assert_eq!(l.stubs, 32);
        assert_eq!(l.exec_end, 4096);
        assert_eq!(l.sections[&2], 4096);
        assert_eq!(l.sections[&5], 4096 + 8);
        assert_eq!(l.got, 4096 + 48 + 8); // after the .eh_frame terminator, aligned
        assert_eq!(l.read_only_end, 8192);
        assert_eq!(l.sections[&4], 8192);
        assert_eq!(l.init_end, 8192 + 8);
        assert_eq!(l.sections[&6], 8192 + 32);
        assert_eq!(l.size, 3 * 4096);
    }

    #[test]
    fn commons_are_zeroed_data_with_their_alignment() {
        let common = Symbol {
            name: "counter".into(),
            definition: Definition::Common { size: 4, align: 64 },
            kind: SymbolType::Object,
            binding: Binding::Global,
            exported: true,
            size: 4,
        };
        let p = patch(vec![section(1, SectionKind::Code, 5, 1)], vec![common]);
        let l = layout(&p, 0, 0, 4096);
        assert_eq!(l.read_only_end, 4096);
        assert_eq!(l.commons[&0], 4096);
        assert_eq!(l.size, 8192);
    }

    #[test]
    fn window_centres_on_the_points() {
        let (anchor, reach) = window(&[0x5555_0000_0000, 0x5555_1000_0000], 0x1000).unwrap();
        assert_eq!(anchor, 0x5555_0800_0000);
        assert!(reach + 0x0800_0000 <= REL32_REACH);
        // Every byte within reach of the anchor is within rel32 of both points.
        assert!(anchor + reach - 0x5555_0000_0000 < 0x8000_0000);
        assert!(0x5555_1000_0000 - (anchor - reach) < 0x8000_0000);
    }

    #[test]
    fn window_refuses_points_too_far_apart() {
        let err = window(&[0x5555_0000_0000, 0x7fff_0000_0000], 0x1000).unwrap_err();
        assert!(matches!(err, PlaceError::TooFarApart { .. }));
        assert!(err.to_string().contains("split the patch"));
    }
}
