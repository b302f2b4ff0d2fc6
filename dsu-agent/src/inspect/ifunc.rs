//! Indirect functions (`STT_GNU_IFUNC`) of another process: which implementation *it* picked.
//!
//! An IFUNC symbol's address is its resolver's; the loader of each process runs the resolver
//! and stores the implementation it returns in the slots bound to the symbol. The agent asks
//! its own loader at apply time, inside the target; from outside, inspect reads those slots
//! from the target's memory (`/proc/PID/mem`, which needs the right to trace it): a
//! `GLOB_DAT`, `JUMP_SLOT` or `64` relocation against the name in any module of the process,
//! or the defining module's own `IRELATIVE` relocation with the resolver as addend. It never
//! runs a resolver in dsu's process, whose CPU features and libraries may differ.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use object::read::ReadCache;
use object::read::elf::{FileHeader, Rela as _, SectionHeader as _, Sym as _};
use object::{Endianness, elf};

use crate::resolve::{ModuleInfo, ProcessSymbol, SymbolIndex};

/// The implementation a process uses for an IFUNC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub address: usize,
    /// The module whose slot held it.
    pub slot_module: String,
}

/// A slot of a module bound to a symbol: where, and what the loader adds to the symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    address: usize,
    addend: i64,
}

/// The implementation process `pid` bound to the IFUNC `name`, defined by `def` (its
/// resolver). `ranges` holds each module's mapped addresses, by module index. An error says
/// why it is not known (no module bound it yet, the memory cannot be read).
pub fn chosen_in_process(
    pid: u32,
    index: &SymbolIndex,
    ranges: &[Range<usize>],
    name: &str,
    def: &ProcessSymbol,
) -> Result<Choice, String> {
    let mem = File::open(format!("/proc/{pid}/mem"))
        .map_err(|e| format!("cannot read the memory of process {pid}: {e}"))?;
    let Some(home) = ranges.get(def.module) else {
        return Err("its module is not mapped".into());
    };
    let defining = &index.modules()[def.module];
    let resolver_link = def.address.wrapping_sub(defining.bias) as i64;
    let mut read_error = None;
    for (m, module) in index.modules().iter().enumerate() {
        let Some(found) = slots(module, name, (m == def.module).then_some(resolver_link)) else {
            continue;
        };
        for slot in found.slots {
            let mut bytes = [0u8; 8];
            if let Err(e) = mem.read_exact_at(&mut bytes, slot.address as u64) {
                read_error = Some(format!(
                    "cannot read process {pid}'s slot at {:#x} in {}: {e}",
                    slot.address, module.name
                ));
                continue;
            }
            let value = (u64::from_le_bytes(bytes) as usize).wrapping_sub(slot.addend as usize);
            // A lazily bound slot still points into its module's PLT; a bound one into the
            // defining module, never at the resolver.
            let bound = home.contains(&value)
                && value != def.address
                && !found.plt.iter().any(|p| p.contains(&value));
            if bound {
                return Ok(Choice {
                    address: value,
                    slot_module: module.name.clone(),
                });
            }
        }
    }
    Err(read_error.unwrap_or_else(|| "no module of the process has bound it yet".into()))
}

/// The slots of `module` bound to `name` and its PLT (run-time addresses).
struct Slots {
    slots: Vec<Slot>,
    plt: Vec<Range<usize>>,
}

/// Reads `module`'s dynamic relocations for slots bound to `name`; with `resolver`, also its
/// `IRELATIVE` slots whose addend is that (link-time) resolver address. `None` when the file
/// cannot be read: that module then tells nothing.
fn slots(module: &ModuleInfo, name: &str, resolver: Option<i64>) -> Option<Slots> {
    let file = File::open(&module.path).ok()?;
    let cache = ReadCache::new(file);
    let header = elf::FileHeader64::<Endianness>::parse(&cache).ok()?;
    let endian = header.endian().ok()?;
    let sections = header.sections(endian, &cache).ok()?;
    let dynsym = sections.symbols(endian, &cache, elf::SHT_DYNSYM).ok()?;
    let mut out = Slots {
        slots: vec![],
        plt: vec![],
    };
    for s in sections.iter() {
        if let Ok(section_name) = sections.section_name(endian, s)
            && section_name.starts_with(b".plt")
        {
            let start = (s.sh_addr(endian) as usize).wrapping_add(module.bias);
            out.plt
                .push(start..start.saturating_add(s.sh_size(endian) as usize));
        }
    }
    for s in sections.iter() {
        let Ok(Some((relas, link))) = s.rela(endian, &cache) else {
            continue;
        };
        let bound_to_dynsym = link == dynsym.section();
        for r in relas {
            let r_type = r.r_type(endian, false);
            let at = (r.r_offset(endian) as usize).wrapping_add(module.bias);
            let addend = r.r_addend(endian);
            let by_name = matches!(
                r_type,
                elf::R_X86_64_GLOB_DAT | elf::R_X86_64_JUMP_SLOT | elf::R_X86_64_64
            ) && bound_to_dynsym
                && dynsym
                    .symbol(object::SymbolIndex(r.r_sym(endian, false) as usize))
                    .ok()
                    .and_then(|sym| sym.name(endian, dynsym.strings()).ok())
                    == Some(name.as_bytes());
            let own = r_type == elf::R_X86_64_IRELATIVE && resolver == Some(addend);
            if by_name {
                let addend = if r_type == elf::R_X86_64_64 {
                    addend
                } else {
                    0
                };
                out.slots.push(Slot {
                    address: at,
                    addend,
                });
            } else if own {
                out.slots.push(Slot {
                    address: at,
                    addend: 0,
                });
            }
        }
    }
    Some(out)
}
