//! Patch bytes -> the trust checks: trailer, expectations and key lists never panic, and a
//! signature never verifies for bytes it does not sign.
#![no_main]

use dsu_agent::trust::{self, SecretKey, TrustPolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = trust::trailer::split(data);
    let _ = trust::expect::of_object(data);
    let _ = trust::expect::build_id_in_notes(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = trust::expect::parse(text);
        let _ = trust::keys::parse_key_list(text);
    }
    let key = SecretKey::from_seed([7; 32]);
    let policy = TrustPolicy {
        keys: vec![key.public("")],
        source: "fuzz".to_owned(),
        require_binding: false,
    };
    if let Ok(verified) = policy.verify(data) {
        // Only bytes this key signed verify: signing the content again gives the same file.
        assert_eq!(key.sign(verified.object).ok().as_deref(), Some(data));
    }
});
