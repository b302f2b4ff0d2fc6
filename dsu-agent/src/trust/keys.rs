//! Keys as text: the files `dsu keygen` writes and the trusted-keys file an agent reads.
//!
//! ```text
//! dsu-ed25519 <64 hex digits: the public key> [comment]        KEY.pub, one line
//! dsu-ed25519-secret <64 hex digits: the secret seed>          KEY, one line, mode 0600
//! ```
//!
//! A trusted-keys file holds public-key lines, one a line; blank lines and lines starting
//! with `#` are ignored. A key is named by its id: the first 8 bytes of SHA-256 of the
//! 32-byte public key, in hex (16 digits), as the signature trailer carries it.

use std::fmt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::trailer::{self, KEY_ID_LEN, Trailer};

/// The word a public-key line starts with.
pub const PUBLIC_TAG: &str = "dsu-ed25519";
/// The word a secret-key line starts with.
pub const SECRET_TAG: &str = "dsu-ed25519-secret";

/// A public key that may sign patches.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    comment: String,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl PublicKey {
    /// Parses one public-key line (`dsu-ed25519 <hex> [comment]`).
    pub fn parse(line: &str) -> Result<PublicKey, String> {
        let mut words = line.trim().splitn(3, char::is_whitespace);
        match words.next() {
            Some(PUBLIC_TAG) => {}
            Some(SECRET_TAG) => {
                return Err("this is a secret key; give the agent the .pub file".to_owned());
            }
            _ => return Err(format!("a public key line starts with {PUBLIC_TAG:?}")),
        }
        let bytes = words
            .next()
            .and_then(decode_hex32)
            .ok_or("the key is not 64 hex digits")?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|e| format!("not an ed25519 public key: {e}"))?;
        let comment = words.next().unwrap_or("").trim().to_owned();
        Ok(PublicKey { key, comment })
    }

    /// The key as a line of a `.pub` or trusted-keys file.
    pub fn to_line(&self) -> String {
        let mut line = format!("{PUBLIC_TAG} {}", hex(self.key.as_bytes()));
        if !self.comment.is_empty() {
            line.push(' ');
            line.push_str(&self.comment);
        }
        line
    }

    /// Its id: the first 8 bytes of SHA-256 of the public key.
    pub fn id(&self) -> KeyId {
        key_id(&self.key)
    }

    /// Whether `signature` signs `content` with this key.
    pub fn verifies(&self, content: &[u8], signature: &[u8; 64]) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.key.verify(content, &signature).is_ok()
    }
}

/// A secret signing key.
pub struct SecretKey {
    key: SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", key_id(&self.key.verifying_key()))
    }
}

impl SecretKey {
    /// The key of a 32-byte random seed (`dsu keygen` reads it from the OS).
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// Parses a secret-key line (`dsu-ed25519-secret <hex>`).
    pub fn parse(text: &str) -> Result<SecretKey, String> {
        let mut words = text.split_whitespace();
        if words.next() != Some(SECRET_TAG) {
            return Err(format!("a secret key file starts with {SECRET_TAG:?}"));
        }
        let seed = words
            .next()
            .and_then(decode_hex32)
            .ok_or("the key is not 64 hex digits")?;
        Ok(SecretKey::from_seed(seed))
    }

    /// The key as the line of a secret-key file.
    pub fn to_line(&self) -> String {
        format!("{SECRET_TAG} {}", hex(self.key.as_bytes()))
    }

    /// Its public key, with `comment`.
    pub fn public(&self, comment: &str) -> PublicKey {
        PublicKey {
            key: self.key.verifying_key(),
            comment: comment.to_owned(),
        }
    }

    /// `patch` with a fresh trailer: any trailer it had is replaced, and the signature covers
    /// every byte before the new one.
    pub fn sign(&self, patch: &[u8]) -> Result<Vec<u8>, trailer::TrailerError> {
        let (content, _) = trailer::split(patch)?;
        let signature = self.key.sign(content).to_bytes();
        let mut out = content.to_vec();
        out.extend_from_slice(&trailer::encode(&Trailer {
            signature,
            key_id: key_id(&self.key.verifying_key()).0,
        }));
        Ok(out)
    }
}

/// A key's id: the first 8 bytes of SHA-256 of its public key; shown as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

fn key_id(key: &VerifyingKey) -> KeyId {
    let digest = Sha256::digest(key.as_bytes());
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&digest[..KEY_ID_LEN]);
    KeyId(id)
}

/// Why a trusted-keys file was refused.
#[derive(Debug, Error)]
pub enum KeyFileError {
    #[error("cannot read trusted keys {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trusted keys {}, line {line}: {reason}", .path.display())]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("trusted keys {} holds no key; an empty list would refuse every patch", .path.display())]
    Empty { path: PathBuf },
}

/// The keys of a trusted-keys file.
pub fn read_key_file(path: &Path) -> Result<Vec<PublicKey>, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let keys = parse_key_list(&text).map_err(|(line, reason)| KeyFileError::Line {
        path: path.to_owned(),
        line,
        reason,
    })?;
    if keys.is_empty() {
        return Err(KeyFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(keys)
}

/// The keys of a trusted-keys text; an error names the line (from 1) and what is wrong.
pub fn parse_key_list(text: &str) -> Result<Vec<PublicKey>, (usize, String)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| PublicKey::parse(l).map_err(|reason| (i + 1, reason)))
        .collect()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// 32 bytes from exactly 64 hex digits.
fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_lines_and_sign() {
        let secret = SecretKey::from_seed([5; 32]);
        let again = SecretKey::parse(&secret.to_line()).unwrap();
        let public = PublicKey::parse(&secret.public("ops@example").to_line()).unwrap();
        assert_eq!(public, again.public("ops@example"));
        let signed = again.sign(b"\x7fELF patch bytes..").unwrap();
        let (content, trailer) = trailer::split(&signed).unwrap();
        let trailer = trailer.unwrap();
        assert_eq!(KeyId(trailer.key_id), public.id());
        assert!(public.verifies(content, &trailer.signature));
        assert!(!public.verifies(b"\x7fELF patch bytes.!", &trailer.signature));
        // Signing a signed file replaces its trailer.
        assert_eq!(again.sign(&signed).unwrap(), signed);
    }

    #[test]
    fn a_key_list_names_the_bad_line() {
        let good = SecretKey::from_seed([1; 32]).public("").to_line();
        let text = format!("# ops\n\n{good}\ndsu-ed25519 123\n");
        assert_eq!(parse_key_list(&text).unwrap_err().0, 4);
        assert_eq!(parse_key_list(&format!("{good}\n")).unwrap().len(), 1);
        let secret = SecretKey::from_seed([1; 32]).to_line();
        assert!(parse_key_list(&secret).unwrap_err().1.contains("secret"));
    }
}
