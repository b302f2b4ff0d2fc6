//! Expectations: what a patch was built for, in its `.dsu.expect` section.
//!
//! The section (`SHT_PROGBITS`, not allocated: the loader ignores it) holds text, one line
//! each, written by `dsu pack`:
//!
//! ```text
//! dsu-expect 1
//! function <symbol> <build id, hex> <SHA-256 of the original code, hex> <module path>
//! ```
//!
//! For each function the patch replaces, the agent compares the GNU build id of the module
//! that holds it (read from the module's `PT_NOTE` segments in memory, so a binary replaced on
//! disk after start does not fool it) and the SHA-256 of the function's original code (the
//! pristine bytes, before any patch of this agent). The module path is only for messages.

use object::{Object, ObjectSection};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::keys::hex;

/// The section's name.
pub const SECTION: &str = ".dsu.expect";
/// Its first line.
pub const HEADER: &str = "dsu-expect 1";

/// What one replaced function was packed against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
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
            "function {} {} {} {}\n",
            e.function, e.build_id, e.code_sha256, e.module
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
        let mut words = line.splitn(5, ' ');
        if words.next() != Some("function") {
            return Err(bad("expected `function NAME BUILD_ID SHA256 MODULE`"));
        }
        let (Some(function), Some(build_id), Some(code), Some(module)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(bad("expected `function NAME BUILD_ID SHA256 MODULE`"));
        };
        if build_id.is_empty() || build_id.len() > 128 || !is_hex(build_id, build_id.len()) {
            return Err(bad("the build id is not hex"));
        }
        if !is_hex(code, 64) {
            return Err(bad("the code hash is not 64 hex digits"));
        }
        out.push(Expectation {
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
        let Some(e) = expectations.iter().find(|e| e.function == f.function) else {
            if required {
                return Err(BindingError::Unbound {
                    function: f.function.to_owned(),
                });
            }
            continue;
        };
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
}
