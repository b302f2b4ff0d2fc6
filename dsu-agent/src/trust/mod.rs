//! Trust: which patches this agent accepts, checked before anything is linked or stopped.
//!
//! Two questions, each answered from the patch bytes and the running process alone:
//!
//! - **Who signed it** ([`keys`], [`trailer`]): a signed patch carries an ed25519 signature of
//!   its bytes in a trailer after the ELF data. An agent configured with trusted keys
//!   ([`TrustPolicy::keys`]) applies only patches whose trailer verifies with one of them;
//!   without keys it accepts unsigned patches and strips the trailer of signed ones.
//! - **What it was built for** ([`expect`]): a packed patch carries, in its `.dsu.expect`
//!   section, the GNU build id of the module of each function it replaces and the SHA-256 of
//!   that function's original code. A mismatch is refused naming the module or the function.
//!   With [`TrustPolicy::require_binding`], a replaced function without an expectation is
//!   refused too.
//!
//! `docs/security.md` is the user's account of both. Nothing here allocates while threads
//! are stopped: the checks run before the update's first stage.

pub mod expect;
pub mod keys;
pub mod trailer;

use std::path::PathBuf;

use thiserror::Error;

pub use self::expect::{BindingError, Expectation};
pub use self::keys::{KeyFileError, KeyId, PublicKey, SecretKey};
pub use self::trailer::TrailerError;

/// The system-wide trusted-keys file, read when present and neither the builder nor
/// `DSU_TRUSTED_KEYS` names keys.
pub const SYSTEM_KEYS_FILE: &str = "/etc/dsu/trusted-keys";

/// What an agent requires of a patch.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    /// Keys that may sign patches; empty: signatures are not required.
    pub keys: Vec<PublicKey>,
    /// Where the keys came from, for messages (`DSU_TRUSTED_KEYS=...`, a file, the builder).
    pub source: String,
    /// Refuse a patch that does not carry an expectation for every function it replaces.
    pub require_binding: bool,
}

/// A patch that passed the signature check.
#[derive(Debug, Clone, Copy)]
pub struct Verified<'a> {
    /// The patch without its trailer: the ELF object to load.
    pub object: &'a [u8],
    /// The key id of the trailer, if the patch is signed.
    pub signer: Option<KeyId>,
    /// Whether the signature was verified against a trusted key (false without keys).
    pub verified: bool,
}

/// Why a patch is not trusted. Every one is a refusal, made before anything was linked.
#[derive(Debug, Error)]
pub enum TrustError {
    #[error("{0}; nothing was changed")]
    Trailer(#[from] TrailerError),
    #[error(
        "the patch is unsigned, and this agent applies only patches signed by one of its \
         trusted keys ({keys}); sign it with `dsu sign PATCH --key KEY`; nothing was changed"
    )]
    Unsigned { keys: String },
    #[error(
        "the patch is signed by key {key_id}, which is not one of this agent's trusted keys \
         ({keys}); nothing was changed"
    )]
    UnknownKey { key_id: KeyId, keys: String },
    #[error(
        "the signature by key {key_id} does not verify: the patch was changed after it was \
         signed (or the signature is not that key's); nothing was changed"
    )]
    BadSignature { key_id: KeyId },
    #[error(transparent)]
    Binding(#[from] BindingError),
}

impl TrustPolicy {
    /// Checks the signature of `patch` against this policy.
    pub fn verify<'a>(&self, patch: &'a [u8]) -> Result<Verified<'a>, TrustError> {
        let (object, trailer) = trailer::split(patch)?;
        let signer = trailer.map(|t| KeyId(t.key_id));
        if self.keys.is_empty() {
            return Ok(Verified {
                object,
                signer,
                verified: false,
            });
        }
        let Some(trailer) = trailer else {
            return Err(TrustError::Unsigned {
                keys: self.source.clone(),
            });
        };
        let key_id = KeyId(trailer.key_id);
        let Some(key) = self.keys.iter().find(|k| k.id() == key_id) else {
            return Err(TrustError::UnknownKey {
                key_id,
                keys: self.source.clone(),
            });
        };
        if !key.verifies(object, &trailer.signature) {
            return Err(TrustError::BadSignature { key_id });
        }
        Ok(Verified {
            object,
            signer,
            verified: true,
        })
    }
}

/// The key id a patch's trailer names, if it has one (not verified: for records).
pub fn claimed_signer(patch: &[u8]) -> Option<KeyId> {
    trailer::split(patch)
        .ok()
        .and_then(|(_, t)| t)
        .map(|t| KeyId(t.key_id))
}

/// Where an agent's trusted keys come from, in order: the builder, `DSU_TRUSTED_KEYS`, the
/// system file when it exists.
pub(crate) fn load_keys(
    builder: &[PublicKey],
    builder_file: Option<&PathBuf>,
) -> Result<(Vec<PublicKey>, String), KeyFileError> {
    if !builder.is_empty() {
        return Ok((builder.to_vec(), "configured by the program".to_owned()));
    }
    if let Some(path) = builder_file {
        let keys = keys::read_key_file(path)?;
        return Ok((keys, path.display().to_string()));
    }
    if let Some(path) = std::env::var_os("DSU_TRUSTED_KEYS").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        let keys = keys::read_key_file(&path)?;
        return Ok((keys, format!("DSU_TRUSTED_KEYS={}", path.display())));
    }
    let system = std::path::Path::new(SYSTEM_KEYS_FILE);
    if system.exists() {
        let keys = keys::read_key_file(system)?;
        return Ok((keys, SYSTEM_KEYS_FILE.to_owned()));
    }
    Ok((Vec::new(), String::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(keys: Vec<PublicKey>) -> TrustPolicy {
        TrustPolicy {
            keys,
            source: "test".to_owned(),
            require_binding: false,
        }
    }

    #[test]
    fn signatures_are_checked_only_against_trusted_keys() {
        let ops = SecretKey::from_seed([1; 32]);
        let other = SecretKey::from_seed([2; 32]);
        let patch = b"\x7fELF\x02\x01\x01 patch bytes".to_vec();
        let signed = ops.sign(&patch).unwrap();
        let trusted = policy(vec![ops.public("")]);

        let ok = trusted.verify(&signed).unwrap();
        assert_eq!(ok.object, &patch[..]);
        assert!(ok.verified);
        assert!(matches!(
            trusted.verify(&patch),
            Err(TrustError::Unsigned { .. })
        ));
        assert!(matches!(
            trusted.verify(&other.sign(&patch).unwrap()),
            Err(TrustError::UnknownKey { .. })
        ));
        for at in [
            0,
            5,
            signed.len() - 81,
            signed.len() - 80,
            signed.len() - 17,
        ] {
            let mut tampered = signed.clone();
            tampered[at] ^= 1;
            assert!(
                matches!(
                    trusted.verify(&tampered),
                    Err(TrustError::BadSignature { .. })
                ),
                "byte {at}"
            );
        }
        let mut renamed = signed.clone();
        let n = renamed.len();
        renamed[n - 9] ^= 1; // the key id
        assert!(matches!(
            trusted.verify(&renamed),
            Err(TrustError::UnknownKey { .. })
        ));
        // Without keys: unsigned accepted, signed stripped.
        let open = policy(Vec::new());
        assert_eq!(open.verify(&patch).unwrap().object, &patch[..]);
        assert_eq!(open.verify(&signed).unwrap().object, &patch[..]);
    }
}
