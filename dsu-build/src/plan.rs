//! Plan: from two compared objects, what the patch holds (a value, no output written yet).
//!
//! Kept: every function of FIXED.o whose description differs from ORIGINAL.o's (changed) or
//! that ORIGINAL.o lacks (new), the new variables they use, and what the compiler made for
//! them (strings, constants, switch and jump tables), copied. Everything else they refer to
//! is the program's: an undefined symbol of the same name, listed in `.dsu.scope` with its
//! file when it is file-local.

use std::collections::{BTreeMap, BTreeSet};

use crate::compare::{Target, describe_symbol, offset_into, target};
use crate::error::BuildError;
use crate::lines::{Lines, line_only_differences};
use crate::read::{Reloc, Role, Unit};
use crate::unwind;
use crate::{Function, Reference, Summary};

/// Where a relocation of the patch points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum To {
    /// A section of the patch (index into [`Plan::sections`]), at the addend from its start.
    Section(usize),
    /// A symbol the patch defines (index into [`Plan::defined`]).
    Defined(usize),
    /// A symbol of the program (index into [`Plan::imports`]).
    Import(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PlanReloc {
    pub offset: u64,
    pub r_type: u32,
    pub to: To,
    pub addend: i64,
}

/// A symbol defined in the patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Defined {
    /// FIXED.o's symbol index.
    pub symbol: usize,
    /// Index into [`Plan::sections`].
    pub section: usize,
    /// Global (a replacement) or local (new, private to the patch).
    pub global: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Import {
    pub name: String,
    pub function: bool,
}

/// An `.eh_frame` made for the patch.
#[derive(Debug, Clone)]
pub(crate) struct EhFrame {
    pub data: Vec<u8>,
    pub align: u64,
    pub relocs: Vec<PlanReloc>,
}

/// The patch as a value.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// FIXED.o's section indices, in the order they are written.
    pub sections: Vec<usize>,
    /// Relocations of each planned section.
    pub relocs: Vec<Vec<PlanReloc>>,
    pub defined: Vec<Defined>,
    pub imports: Vec<Import>,
    /// `.dsu.scope` records: (name, file).
    pub scope: Vec<(String, String)>,
    /// Unwind tables of the kept functions.
    pub eh_frame: Option<EhFrame>,
    pub summary: Summary,
}

/// Compiler clones share their function's name up to a suffix like these.
const CLONE_MARKERS: [&str; 5] = [".constprop.", ".isra.", ".part.", ".cold", ".localalias"];

fn is_clone(name: &str) -> bool {
    let suffix = &name[rust_mangled_len(name)..];
    CLONE_MARKERS.iter().any(|m| suffix.contains(m))
}

/// How much of `name` is a Rust mangled name, which may hold dots of its own (legacy
/// mangling writes `::` inside generic arguments as `..`: `drop_in_place$LT$a..cold..B$GT$`);
/// 0 for other names. A compiler suffix comes after it.
fn rust_mangled_len(name: &str) -> usize {
    if name.starts_with("_R") {
        // v0: letters, digits and `_` only.
        return name.find('.').unwrap_or(name.len());
    }
    if !name.starts_with("_ZN") {
        return 0;
    }
    // Legacy: ends with the hash `17h` + 16 hex digits + `E`.
    let bytes = name.as_bytes();
    (0..bytes.len())
        .rev()
        .find(|&at| {
            bytes.get(at..at + 20).is_some_and(|h| {
                h.starts_with(b"17h") && h[3..19].iter().all(u8::is_ascii_hexdigit) && h[19] == b'E'
            })
        })
        .map_or(0, |at| at + 20)
}

/// `count.1` -> `count`: the name a static local was declared with.
fn static_local_base(name: &str) -> Option<&str> {
    let (base, number) = name.rsplit_once('.')?;
    (!base.is_empty() && !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
        .then_some(base)
}

fn kind_name(role: Role) -> &'static str {
    match role {
        Role::Function => "a function",
        Role::ThreadLocal => "a thread-local variable",
        _ => "a variable",
    }
}

/// Functions, variables and thread-locals of a unit by name.
fn by_name(unit: &Unit) -> Result<BTreeMap<&str, usize>, BuildError> {
    let mut map = BTreeMap::new();
    for (i, s) in unit.symbols.iter().enumerate() {
        if !matches!(s.role, Role::Function | Role::Data | Role::ThreadLocal) {
            continue;
        }
        if map.insert(s.name.as_str(), i).is_some() {
            return Err(BuildError::DuplicateSymbol {
                object: unit.label.to_string(),
                symbol: s.name.clone(),
            });
        }
    }
    Ok(map)
}

/// Compares the two objects and plans the patch.
pub(crate) fn plan(original: &Unit, fixed: &Unit) -> Result<Plan, BuildError> {
    let old = by_name(original)?;
    let new = by_name(fixed)?;

    // Variables keep the program's layout and values; functions are compared.
    let mut changed = BTreeSet::new();
    let mut added = BTreeSet::new();
    let mut line_only = Vec::new();
    let lines = Lines::of(original).zip(Lines::of(fixed));
    for (&name, &n) in &new {
        let ns = &fixed.symbols[n];
        let Some(&o) = old.get(name) else {
            match ns.role {
                Role::Function => {
                    added.insert(name);
                }
                Role::ThreadLocal => {
                    return Err(BuildError::NewThreadLocal {
                        symbol: name.to_string(),
                    });
                }
                _ => check_not_renumbered(name, ns.local, &old, &new)?,
            }
            continue;
        };
        let os = &original.symbols[o];
        if os.role != ns.role {
            return Err(BuildError::KindChanged {
                symbol: name.to_string(),
                old: kind_name(os.role),
                new: kind_name(ns.role),
            });
        }
        if ns.role != Role::Function && os.size != ns.size {
            return Err(BuildError::DataSize {
                symbol: name.to_string(),
                old: os.size,
                new: ns.size,
            });
        }
        let same = describe_symbol(original, o)? == describe_symbol(fixed, n)?;
        if same {
            continue;
        }
        if ns.role == Role::Function && same_but_lines(original, o, fixed, n, lines.as_ref())? {
            line_only.push(name.to_string());
            continue;
        }
        match ns.role {
            Role::Function => {
                changed.insert(name);
            }
            _ if ns.local && static_local_base(name).is_some() => {
                return Err(BuildError::StaticLocalInitializer {
                    symbol: name.to_string(),
                });
            }
            _ => {
                return Err(BuildError::DataInitializer {
                    symbol: name.to_string(),
                });
            }
        }
    }
    for (&name, &o) in &old {
        let os = &original.symbols[o];
        if os.role == Role::Function && !os.local && !new.contains_key(name) {
            return Err(BuildError::RemovedFunction {
                symbol: name.to_string(),
            });
        }
    }
    if changed.is_empty() && added.is_empty() {
        return Err(BuildError::NothingChanged);
    }
    // A function that branches into the body of a changed one (a `.cold` part jumping back
    // into its hot part) is tied to that body's layout: kept, the new code's branch to it
    // would come back into the old code. It goes into the patch, branching into the new body.
    loop {
        let mut tied = Vec::new();
        for (&name, &n) in &new {
            let function = &fixed.symbols[n];
            if function.role == Role::Function
                && !changed.contains(name)
                && old.contains_key(name)
                && enters_body_of(fixed, n, &changed)?
            {
                tied.push(name);
            }
        }
        if tied.is_empty() {
            break;
        }
        changed.extend(tied);
    }
    // Clones of a replaced function present and the same in both objects: what they run is
    // what the fixed build runs.
    let unchanged_clones: Vec<Reference> = old
        .iter()
        .filter(|&(&name, &o)| {
            original.symbols[o].role == Role::Function
                && !changed.contains(name)
                && new.contains_key(name)
                && changed.iter().any(|f| {
                    name.strip_prefix(f)
                        .is_some_and(|rest| rest.starts_with('.') && is_clone(rest))
                })
        })
        .map(|(&name, &o)| Reference {
            name: name.to_string(),
            local: original.symbols[o].local,
        })
        .collect();

    let mut builder = Builder {
        original,
        fixed,
        old: &old,
        plan: Plan {
            sections: Vec::new(),
            relocs: Vec::new(),
            defined: Vec::new(),
            imports: Vec::new(),
            scope: Vec::new(),
            eh_frame: None,
            summary: Summary {
                file: original.file.clone(),
                unchanged_clones,
                line_only,
                ..Summary::default()
            },
        },
        section_of: BTreeMap::new(),
        defined_of: BTreeMap::new(),
        import_of: BTreeMap::new(),
        queue: Vec::new(),
    };
    for &name in changed.iter().chain(&added) {
        let symbol = new[name];
        let global = changed.contains(name);
        builder.define(symbol, global);
        let local_in_program = global && original.symbols[old[name]].local;
        if global {
            if local_in_program {
                builder.scope(name)?;
            }
            builder.plan.summary.changed.push(Function {
                name: name.to_string(),
                local: local_in_program,
                clone: is_clone(name),
            });
        } else {
            builder.plan.summary.added.push(name.to_string());
        }
    }
    while let Some(planned) = builder.queue.pop() {
        builder.relocate(planned)?;
    }
    builder.unwind_tables()?;
    // Exception tables the unwind tables point at.
    while let Some(planned) = builder.queue.pop() {
        builder.relocate(planned)?;
    }
    builder.plan.summary.references = builder
        .plan
        .imports
        .iter()
        .map(|i| Reference {
            name: i.name.clone(),
            local: builder
                .old
                .get(i.name.as_str())
                .is_some_and(|&o| original.symbols[o].local),
        })
        .collect();
    Ok(builder.plan)
}

/// Whether function `o` of ORIGINAL.o and `n` of FIXED.o differ only in the line numbers they
/// pass on ([`crate::lines`]): everything else, relocations included, the same.
fn same_but_lines(
    original: &Unit,
    o: usize,
    fixed: &Unit,
    n: usize,
    lines: Option<&(Lines, Lines)>,
) -> Result<bool, BuildError> {
    let Some((old_lines, new_lines)) = lines else {
        return Ok(false);
    };
    let Some(differing) = line_only_differences((original, old_lines, o), (fixed, new_lines, n))
    else {
        return Ok(false);
    };
    let old = describe_symbol(original, o)?;
    let mut new = describe_symbol(fixed, n)?;
    let (old_start, new_start) = (
        original.symbols[o].value as usize,
        fixed.symbols[n].value as usize,
    );
    for at in differing {
        match (
            old.bytes.get(old_start + at),
            new.bytes.get_mut(new_start + at),
        ) {
            (Some(&was), Some(now)) => *now = was,
            _ => return Ok(false),
        }
    }
    Ok(old == new)
}

/// Whether function `symbol` of `unit` has a relocation that lands inside (not at the start
/// of) one of the `changed` functions.
fn enters_body_of(
    unit: &Unit,
    symbol: usize,
    changed: &BTreeSet<&str>,
) -> Result<bool, BuildError> {
    let s = &unit.symbols[symbol];
    let Some(section) = s.section.and_then(|i| unit.section(i)) else {
        return Ok(false);
    };
    for reloc in &section.relocs {
        if let Target::Named { symbol: to, addend } = target(unit, reloc, &s.name)? {
            let to = &unit.symbols[to];
            if to.role == Role::Function
                && changed.contains(to.name.as_str())
                && offset_into(reloc, addend) != 0
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A new static local whose base name ORIGINAL.o had under another number is the same
/// variable renumbered: using a fresh copy would silently lose the program's state.
fn check_not_renumbered(
    name: &str,
    local: bool,
    old: &BTreeMap<&str, usize>,
    new: &BTreeMap<&str, usize>,
) -> Result<(), BuildError> {
    let Some(base) = static_local_base(name).filter(|_| local) else {
        return Ok(());
    };
    match old
        .keys()
        .find(|o| static_local_base(o) == Some(base) && !new.contains_key(*o))
    {
        Some(o) => Err(BuildError::StaticLocalRenumbered {
            symbol: name.to_string(),
            old: o.to_string(),
        }),
        None => Ok(()),
    }
}

struct Builder<'a> {
    original: &'a Unit,
    fixed: &'a Unit,
    old: &'a BTreeMap<&'a str, usize>,
    plan: Plan,
    /// FIXED section index -> planned section.
    section_of: BTreeMap<usize, usize>,
    /// FIXED symbol index -> defined symbol.
    defined_of: BTreeMap<usize, usize>,
    import_of: BTreeMap<String, usize>,
    /// Planned sections whose relocations are still to plan.
    queue: Vec<usize>,
}

impl Builder<'_> {
    /// Plans FIXED's section `index` once; returns its planned index.
    fn keep_section(&mut self, index: usize) -> usize {
        if let Some(&planned) = self.section_of.get(&index) {
            return planned;
        }
        let planned = self.plan.sections.len();
        self.plan.sections.push(index);
        self.plan.relocs.push(Vec::new());
        self.section_of.insert(index, planned);
        self.queue.push(planned);
        planned
    }

    /// Defines FIXED's `symbol` in the patch (its section kept); returns its index.
    fn define(&mut self, symbol: usize, global: bool) -> usize {
        if let Some(&d) = self.defined_of.get(&symbol) {
            return d;
        }
        let section = self.fixed.symbols[symbol]
            .section
            .expect("a defined symbol");
        let section = self.keep_section(section);
        let d = self.plan.defined.len();
        self.plan.defined.push(Defined {
            symbol,
            section,
            global,
        });
        self.defined_of.insert(symbol, d);
        d
    }

    fn import(&mut self, name: &str, function: bool) -> Result<usize, BuildError> {
        if let Some(&i) = self.import_of.get(name) {
            return Ok(i);
        }
        if let Some(&o) = self.old.get(name)
            && self.original.symbols[o].local
        {
            self.scope(name)?;
        }
        let i = self.plan.imports.len();
        self.plan.imports.push(Import {
            name: name.to_string(),
            function,
        });
        self.import_of.insert(name.to_string(), i);
        Ok(i)
    }

    fn scope(&mut self, name: &str) -> Result<(), BuildError> {
        let file = self
            .original
            .file
            .clone()
            .ok_or_else(|| BuildError::NoFileSymbol {
                symbol: name.to_string(),
            })?;
        self.plan.scope.push((name.to_string(), file));
        Ok(())
    }

    /// Plans the relocations of planned section `planned`, keeping what they need.
    fn relocate(&mut self, planned: usize) -> Result<(), BuildError> {
        let fixed = self.fixed;
        let index = self.plan.sections[planned];
        let section = fixed.section(index).expect("planned sections exist");
        let mut out = Vec::with_capacity(section.relocs.len());
        for reloc in &section.relocs {
            let what = format!("{}+{:#x}", section.name, reloc.offset);
            let (to, addend) = self.map(reloc, &what)?;
            out.push(PlanReloc {
                offset: reloc.offset,
                r_type: reloc.r_type,
                to,
                addend,
            });
        }
        self.plan.relocs[planned] = out;
        Ok(())
    }

    /// Where a relocation of FIXED.o points in the patch, keeping what it needs.
    fn map(&mut self, reloc: &Reloc, what: &str) -> Result<(To, i64), BuildError> {
        let fixed = self.fixed;
        Ok(match target(fixed, reloc, what)? {
            Target::Named { symbol, addend } => {
                let s = &fixed.symbols[symbol];
                let name = s.name.as_str();
                let function = s.role == Role::Function;
                if let Some(&d) = self.defined_of.get(&symbol) {
                    (To::Defined(d), addend)
                } else if self.old.contains_key(name) {
                    // Unchanged (compared above): the program's.
                    (To::Import(self.import(name, function)?), addend)
                } else {
                    // A new variable (new functions are defined from the start).
                    self.plan.summary.new_data.push(name.to_string());
                    (To::Defined(self.define(symbol, false)), addend)
                }
            }
            Target::External { symbol, addend } => {
                let name = fixed.symbols[symbol].name.clone();
                (To::Import(self.import(&name, false)?), addend)
            }
            Target::Unnamed {
                section: target,
                addend,
                ..
            } => {
                let t = self.keep_section(target);
                let ts = fixed.section(target).expect("checked by target()");
                let warned = |w: &String| w.contains(&ts.name);
                if ts.is_writable() && !self.plan.summary.warnings.iter().any(warned) {
                    self.plan.summary.warnings.push(format!(
                        "unnamed writable data {} is copied: the patch uses its own copy, \
                         not the program's",
                        ts.name
                    ));
                }
                (To::Section(t), addend)
            }
        })
    }

    /// The unwind tables of the kept functions: FIXED.o's `.eh_frame` with only their FDEs
    /// (and the CIEs), so the new code unwinds (activeness checks of later patches,
    /// debuggers, exceptions) as the program's does.
    fn unwind_tables(&mut self) -> Result<(), BuildError> {
        let fixed = self.fixed;
        let Some(index) = (0..fixed.sections.len())
            .find(|&i| fixed.section(i).is_some_and(|s| s.name == ".eh_frame"))
        else {
            return Ok(());
        };
        let section = fixed.section(index).expect("found above");
        let kept = |reloc: &Reloc| match target(fixed, reloc, ".eh_frame") {
            Ok(Target::Named { symbol, .. }) => self.defined_of.contains_key(&symbol),
            _ => false,
        };
        let Some(filtered) = unwind::filter(&section.data, &section.relocs, kept) else {
            self.plan.summary.warnings.push(
                "FIXED.o's .eh_frame is not in a form dsu build reads: the patch has no unwind \
                 tables"
                    .to_string(),
            );
            return Ok(());
        };
        if filtered.functions == 0 {
            return Ok(());
        }
        let mut relocs = Vec::with_capacity(filtered.relocs.len());
        for (offset, reloc) in filtered.relocs {
            let (to, addend) = self.map(&reloc, ".eh_frame")?;
            relocs.push(PlanReloc {
                offset,
                r_type: reloc.r_type,
                to,
                addend,
            });
        }
        self.plan.eh_frame = Some(EhFrame {
            data: filtered.data,
            align: section.align,
            relocs,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::is_clone;

    #[test]
    fn clone_suffixes_are_found_after_a_rust_mangled_name_not_inside_it() {
        assert!(is_clone("scale.constprop.0"));
        assert!(is_clone("check.cold"));
        assert!(is_clone("_ZN4shop5price17h0123456789abcdefE.cold.1"));
        assert!(is_clone("_RNvCs1234_4shop5price.cold"));
        assert!(!is_clone(
            "_ZN4core3ptr43drop_in_place$LT$shop..cold..Tier$GT$17h0123456789abcdefE"
        ));
        assert!(!is_clone("_ZN4shop5price17h0123456789abcdefE"));
        assert!(!is_clone("_RNvCs1234_4shop5price"));
        assert!(!is_clone("price"));
    }
}
