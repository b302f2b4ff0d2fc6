//! The signature trailer: 80 bytes appended after a patch's ELF bytes.
//!
//! ```text
//! offset  size  field
//! 0       64    ed25519 signature of every byte before the trailer
//! 64      8     key id: the first 8 bytes of SHA-256 of the signer's 32-byte public key
//! 72      6     magic "DSUSIG"
//! 78      2     format version, little endian (1)
//! ```
//!
//! ELF readers find everything through the header's offsets and ignore bytes after the last
//! section, so a signed patch is still a plain object file to `readelf` and `objdump`. The
//! magic and version sit at the very end so that a reader can tell a signed file from an
//! unsigned one by its last 8 bytes. Parsing is input handling: it never panics, whatever the
//! bytes.

use thiserror::Error;

/// Bytes of a trailer.
pub const TRAILER_LEN: usize = 80;
/// What the trailer's last 8 bytes start with.
pub const MAGIC: [u8; 6] = *b"DSUSIG";
/// The one version this agent reads and `dsu sign` writes.
pub const VERSION: u16 = 1;
/// Bytes of a key id.
pub const KEY_ID_LEN: usize = 8;

/// A parsed trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub signature: [u8; 64],
    pub key_id: [u8; KEY_ID_LEN],
}

/// Why the end of a file that claims to carry a trailer (it ends with the magic) is not one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TrailerError {
    #[error(
        "the signature trailer is truncated: the file ends with the dsu signature magic but \
         holds only {len} bytes, fewer than the {TRAILER_LEN}-byte trailer and an ELF header"
    )]
    Truncated { len: usize },
    #[error(
        "the signature trailer has format version {found}; this agent reads version {VERSION} \
         (sign the patch again with this version of dsu)"
    )]
    Version { found: u16 },
}

/// Splits `bytes` into the signed content and its trailer. `Ok((bytes, None))` when the file
/// does not end with the magic: an unsigned patch.
pub fn split(bytes: &[u8]) -> Result<(&[u8], Option<Trailer>), TrailerError> {
    let Some(tail) = bytes.len().checked_sub(8).and_then(|at| bytes.get(at..)) else {
        return Ok((bytes, None));
    };
    if tail[..6] != MAGIC {
        return Ok((bytes, None));
    }
    let found = u16::from_le_bytes([tail[6], tail[7]]);
    if found != VERSION {
        return Err(TrailerError::Version { found });
    }
    // Content of at least an ELF identification, so an empty "patch" is never signed content.
    let Some(content_len) = bytes.len().checked_sub(TRAILER_LEN).filter(|&n| n >= 16) else {
        return Err(TrailerError::Truncated { len: bytes.len() });
    };
    let (content, trailer) = bytes.split_at(content_len);
    let mut signature = [0u8; 64];
    signature.copy_from_slice(&trailer[..64]);
    let mut key_id = [0u8; KEY_ID_LEN];
    key_id.copy_from_slice(&trailer[64..64 + KEY_ID_LEN]);
    Ok((content, Some(Trailer { signature, key_id })))
}

/// The trailer's bytes.
pub fn encode(trailer: &Trailer) -> [u8; TRAILER_LEN] {
    let mut out = [0u8; TRAILER_LEN];
    out[..64].copy_from_slice(&trailer.signature);
    out[64..72].copy_from_slice(&trailer.key_id);
    out[72..78].copy_from_slice(&MAGIC);
    out[78..].copy_from_slice(&VERSION.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(content: &[u8]) -> Vec<u8> {
        let mut bytes = content.to_vec();
        bytes.extend_from_slice(&encode(&Trailer {
            signature: [7; 64],
            key_id: [9; 8],
        }));
        bytes
    }

    #[test]
    fn a_trailer_round_trips_and_leaves_the_content() {
        let content = b"\x7fELF and then some object bytes";
        let bytes = signed(content);
        let (got, trailer) = split(&bytes).unwrap();
        assert_eq!(got, content);
        assert_eq!(trailer.unwrap().key_id, [9; 8]);
        assert_eq!(trailer.unwrap().signature, [7; 64]);
    }

    #[test]
    fn without_the_magic_a_file_is_unsigned() {
        for bytes in [
            &b""[..],
            b"\x7fELF",
            b"\x7fELF0123456789abcdefDSUSIX\x01\x00",
        ] {
            assert_eq!(split(bytes), Ok((bytes, None)));
        }
    }

    #[test]
    fn a_truncated_trailer_is_refused() {
        let bytes = signed(b"\x7fELF0123456789abcdef");
        for cut in 1..=TRAILER_LEN {
            // Drop bytes from the front: the end (magic and version) stays.
            let short = &bytes[bytes.len() - TRAILER_LEN + cut.min(TRAILER_LEN - 8)..];
            assert!(
                matches!(split(short), Err(TrailerError::Truncated { .. })),
                "{cut}"
            );
        }
        assert!(matches!(
            split(&signed(b"\x7fELF")),
            Err(TrailerError::Truncated { .. })
        ));
    }

    #[test]
    fn another_version_is_refused_naming_it() {
        let mut bytes = signed(b"\x7fELF0123456789abcdef");
        let n = bytes.len();
        bytes[n - 2..].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(split(&bytes), Err(TrailerError::Version { found: 2 }));
    }

    #[test]
    fn any_bytes_parse_without_panicking() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for len in 0..300 {
            let mut bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = split(&bytes);
            if len >= 8 {
                bytes[len - 8..len - 2].copy_from_slice(&MAGIC);
                let _ = split(&bytes);
            }
        }
    }
}
