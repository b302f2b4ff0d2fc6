//! Expectations: what a patch was built for, in its `.dsu.expect` section.
//!
//! The section (`SHT_PROGBITS`, not allocated: the loader ignores it) holds text, one line
//! each, written by `dsu pack` and `dsu build --against`:
//!
//! ```text
//! dsu-expect 1
//! function <symbol> <build id, hex> <SHA-256 of the original code, hex> <module path>
//! unchanged <symbol> <build id, hex> <SHA-256 of the code, hex> <module path>
//! ```
//!
//! For each function the patch replaces, the agent compares the GNU build id of the module
//! that holds it (read from the module's `PT_NOTE` segments in memory, so a binary replaced on
//! disk after start does not fool it) and the SHA-256 of the function's original code (the
//! pristine bytes, before any patch of this agent). The module path is only for messages.
//!
//! An `unchanged` line vouches for a compiler clone of a replaced function (`f.part.0`,
//! `f.constprop.1`) that the patch does not replace: `dsu build` compared it in the objects
//! before and after the fix, found it the same, and found the program's copy to be the one it
//! compared. Its callers then run the code the fixed build would run, so the clone is not
//! stale ([`vouches_for`]); the agent holds the clone's code to the same build id and hash.

use object::{Object, ObjectSection};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::keys::hex;

/// The section's name.
pub const SECTION: &str = ".dsu.expect";
/// Its first line.
pub const HEADER: &str = "dsu-expect 1";

/// What an expectation line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A function the patch replaces (`function`).
    Replaced,
    /// A compiler clone of a replaced function that the fix leaves as it is (`unchanged`).
    Unchanged,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Replaced => "function",
            Kind::Unchanged => "unchanged",
        }
    }
}

/// What one replaced function (or one clone vouched for) was packed against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    pub kind: Kind,
    pub function: String,
    /// The GNU build id of its module, hex.
    pub build_id: String,
    /// SHA-256 of its original code, hex.
    pub code_sha256: String,
    /// The module's path where it was packed.
    pub module: String,
}

/// Why a patch does not fit this process.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BindingError {
    #[error("malformed {SECTION} section: {reason}; nothing was changed")]
    Malformed { reason: String },
    #[error(
        "the patch was built for another build of {module}: it expects build id {expected} \
         (packed against {packed}), the process runs build id {found}; nothing was changed"
    )]
    BuildId {
        module: String,
        packed: String,
        expected: String,
        found: String,
    },
    #[error(
        "the original code of {function} in {module} differs from the code the patch was \
         packed against (SHA-256 {expected}, found {found}); nothing was changed"
    )]
    Code {
        function: String,
        module: String,
        expected: String,
        found: String,
    },
    #[error(
        "the patch carries no expectation for {function} (build id and code hash, `dsu pack`), \
         and this agent requires every patch to be bound (DSU_REQUIRE_BINDING); nothing was \
         changed"
    )]
    Unbound { function: String },
}

/// The section's text for `expectations`.
pub fn encode(expectations: &[Expectation]) -> String {
    let mut text = format!("{HEADER}\n");
    for e in expectations {
        text.push_str(&format!(
            "{} {} {} {} {}\n",
            e.kind.word(),
            e.function,
            e.build_id,
            e.code_sha256,
            e.module
        ));
    }
    text
}

/// The expectations of an object (none without the section).
pub fn of_object(object: &[u8]) -> Result<Vec<Expectation>, BindingError> {
    let malformed = |reason: String| BindingError::Malformed { reason };
    let Ok(file) = object::File::parse(object) else {
        return Ok(Vec::new()); // not ELF: the loader says so precisely
    };
    let Some(section) = file.section_by_name(SECTION) else {
        return Ok(Vec::new());
    };
    let data = section.data().map_err(|e| malformed(e.to_string()))?;
    let text = std::str::from_utf8(data).map_err(|e| malformed(e.to_string()))?;
    parse(text).map_err(malformed)
}

/// Parses the section's text.
pub fn parse(text: &str) -> Result<Vec<Expectation>, String> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, HEADER)) => {}
        other => {
            return Err(format!(
                "it starts with {:?}, not {HEADER:?}",
                other.map_or("", |l| l.1)
            ));
        }
    }
    let is_hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut out = Vec::new();
    for (i, line) in lines.filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |what: &str| format!("line {}: {what}", i + 1);
        const SHAPE: &str = "expected `function|unchanged NAME BUILD_ID SHA256 MODULE`";
        let mut words = line.splitn(5, ' ');
        let kind = match words.next() {
            Some("function") => Kind::Replaced,
            Some("unchanged") => Kind::Unchanged,
            _ => return Err(bad(SHAPE)),
        };
        let (Some(function), Some(build_id), Some(code), Some(module)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(bad(SHAPE));
        };
        if build_id.is_empty() || build_id.len() > 128 || !is_hex(build_id, build_id.len()) {
            return Err(bad("the build id is not hex"));
        }
        if !is_hex(code, 64) {
            return Err(bad("the code hash is not 64 hex digits"));
        }
        out.push(Expectation {
            kind,
            function: function.to_owned(),
            build_id: build_id.to_ascii_lowercase(),
            code_sha256: code.to_ascii_lowercase(),
            module: module.to_owned(),
        });
    }
    Ok(out)
}

/// A function the patch replaces, as the agent found it.
#[derive(Debug, Clone, Copy)]
pub struct Found<'a> {
    pub function: &'a str,
    pub module: &'a str,
    /// The module's build id, if it has one.
    pub build_id: Option<&'a [u8]>,
    /// The function's original code.
    pub pristine: &'a [u8],
}

/// Checks every replaced function against its expectation; `required`: a function without
/// one is refused.
pub fn check(
    expectations: &[Expectation],
    found: &[Found<'_>],
    required: bool,
) -> Result<(), BindingError> {
    for f in found {
        let Some(e) = find(expectations, Kind::Replaced, f.function) else {
            if required {
                return Err(BindingError::Unbound {
                    function: f.function.to_owned(),
                });
            }
            continue;
        };
        holds(e, f)?;
    }
    Ok(())
}

/// Whether the expectations vouch for `clone`, a compiler clone of a replaced function that
/// the patch does not replace: an `unchanged` line names it and its module's build id and its
/// code match. A line that names it but does not match is an error: the program is not the
/// one the patch was built against.
pub fn vouches_for(expectations: &[Expectation], clone: &Found<'_>) -> Result<bool, BindingError> {
    match find(expectations, Kind::Unchanged, clone.function) {
        None => Ok(false),
        Some(e) => holds(e, clone).map(|()| true),
    }
}

/// The line of `kind` that names `name`, if any.
pub fn find<'e>(
    expectations: &'e [Expectation],
    kind: Kind,
    name: &str,
) -> Option<&'e Expectation> {
    expectations
        .iter()
        .find(|e| e.kind == kind && e.function == name)
}

/// `f` has the build id and the code `e` expects.
fn holds(e: &Expectation, f: &Found<'_>) -> Result<(), BindingError> {
    let build_id = f.build_id.map_or_else(|| "none".to_owned(), hex);
    if build_id != e.build_id {
        return Err(BindingError::BuildId {
            module: f.module.to_owned(),
            packed: e.module.clone(),
            expected: e.build_id.clone(),
            found: build_id,
        });
    }
    let code = code_hash(f.pristine);
    if code != e.code_sha256 {
        return Err(BindingError::Code {
            function: f.function.to_owned(),
            module: f.module.to_owned(),
            expected: e.code_sha256.clone(),
            found: code,
        });
    }
    Ok(())
}

/// SHA-256 of a function's code, hex.
pub fn code_hash(code: &[u8]) -> String {
    hex(&Sha256::digest(code))
}

/// The GNU build id in the bytes of a `PT_NOTE` segment or `.note.gnu.build-id` section.
pub fn build_id_in_notes(mut notes: &[u8]) -> Option<&[u8]> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let word = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let align = |n: usize| n.checked_add(3).map(|n| n & !3);
    while notes.len() >= 12 {
        let namesz = word(notes, 0)? as usize;
        let descsz = word(notes, 4)? as usize;
        let kind = word(notes, 8)?;
        let name_end = 12usize.checked_add(namesz)?;
        let desc_start = align(name_end)?;
        let desc_end = desc_start.checked_add(descsz)?;
        let name = notes.get(12..name_end)?;
        let desc = notes.get(desc_start..desc_end)?;
        if kind == NT_GNU_BUILD_ID && name == b"GNU\0" {
            return Some(desc);
        }
        notes = notes.get(align(desc_end)?.min(notes.len())..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(kind: u32, name: &[u8], desc: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(name);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(desc);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    #[test]
    fn the_build_id_note_is_found_among_others() {
        let mut notes = note(1, b"GNU\0", &[0; 16]);
        notes.extend(note(3, b"GNU\0", &[0xab, 0xcd, 0xef]));
        assert_eq!(build_id_in_notes(&notes), Some(&[0xab, 0xcd, 0xef][..]));
        assert_eq!(build_id_in_notes(&notes[..notes.len() - 4]), None);
        assert_eq!(build_id_in_notes(&[0xff; 40]), None);
    }

    #[test]
    fn expectations_round_trip_and_mismatches_name_what_differs() {
        let code = b"\x55\x48\x89\xe5\xc3";
        let e = Expectation {
            kind: Kind::Replaced,
            function: "price".into(),
            build_id: "abcd".into(),
            code_sha256: code_hash(code),
            module: "/usr/bin/shop v2".into(),
        };
        let parsed = parse(&encode(std::slice::from_ref(&e))).unwrap();
        assert_eq!(parsed, vec![e]);
        let found = |id: &'static [u8], code: &'static [u8]| Found {
            function: "price",
            module: "/usr/bin/shop",
            build_id: Some(id),
            pristine: code,
        };
        assert_eq!(check(&parsed, &[found(&[0xab, 0xcd], code)], true), Ok(()));
        assert!(matches!(
            check(&parsed, &[found(&[0xab, 0xce], code)], false),
            Err(BindingError::BuildId { found, .. }) if found == "abce"
        ));
        assert!(matches!(
            check(&parsed, &[found(&[0xab, 0xcd], b"\xc3")], false),
            Err(BindingError::Code { function, .. }) if function == "price"
        ));
        assert_eq!(check(&[], &[found(&[0xab, 0xcd], code)], false), Ok(()));
        assert!(matches!(
            check(&[], &[found(&[0xab, 0xcd], code)], true),
            Err(BindingError::Unbound { .. })
        ));
        for bad in ["", "dsu-expect 2\n", "dsu-expect 1\nfunction f zz 00 m\n"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_unchanged_clone_is_vouched_for_only_by_its_own_line_and_only_when_it_matches() {
        let code = b"\x55\x48\x89\xe5\xc3";
        let line = |kind, function: &str| Expectation {
            kind,
            function: function.into(),
            build_id: "abcd".into(),
            code_sha256: code_hash(code),
            module: "/usr/bin/shop".into(),
        };
        let both = vec![
            line(Kind::Replaced, "audit"),
            line(Kind::Unchanged, "audit.part.0"),
        ];
        let text = encode(&both);
        assert!(text.contains("\nunchanged audit.part.0 abcd "), "{text}");
        assert_eq!(parse(&text).unwrap(), both);
        let found = |function: &'static str, id: &'static [u8], code: &'static [u8]| Found {
            function,
            module: "/usr/bin/shop",
            build_id: Some(id),
            pristine: code,
        };
        let clone = found("audit.part.0", &[0xab, 0xcd], code);
        assert_eq!(vouches_for(&both, &clone), Ok(true));
        // A `function` line is no voucher, and an `unchanged` one binds no replaced function.
        assert_eq!(vouches_for(&both[..1], &clone), Ok(false));
        assert!(matches!(
            check(
                &both[1..],
                &[found("audit.part.0", &[0xab, 0xcd], code)],
                true
            ),
            Err(BindingError::Unbound { .. })
        ));
        assert!(matches!(
            vouches_for(&both, &found("audit.part.0", &[0xab, 0xcd], b"\xc3")),
            Err(BindingError::Code { function, .. }) if function == "audit.part.0"
        ));
        assert!(matches!(
            vouches_for(&both, &found("audit.part.0", &[0xab, 0xce], code)),
            Err(BindingError::BuildId { .. })
        ));
        assert!(parse("dsu-expect 1\nsame f abcd 00 m\n").is_err());
    }
}
