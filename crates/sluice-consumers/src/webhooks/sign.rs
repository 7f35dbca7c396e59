//! [Standard Webhooks](https://www.standardwebhooks.com) signing and verification.
//!
//! Every delivery carries three headers: `webhook-id` (the message id, stable across
//! retries so receivers can deduplicate), `webhook-timestamp` (Unix seconds) and
//! `webhook-signature`. The signature is
//!
//! ```text
//! v1,<base64(HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}"))>
//! ```
//!
//! where `key` is the base64-decoded part of the secret after its `whsec_` prefix.
//! Signing the id and timestamp together with the body lets receivers reject replays
//! (stale timestamps) without trusting any unsigned header.
//!
//! We follow the format exactly so that receivers can verify deliveries with the
//! official Standard Webhooks libraries (the Python `standardwebhooks` package is used
//! as a cross-check in the tests and in `tests/clients/verify_webhook.py`).
//!
//! The signature header may hold several space-separated signatures (for example while
//! a secret is being rotated); [`verify`] accepts the message if any `v1` entry matches,
//! comparing in constant time.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Prefix of Standard Webhooks secrets.
pub const SECRET_PREFIX: &str = "whsec_";

/// Standard base64 that accepts the secret with or without `=` padding, like the
/// reference libraries do.
const SECRET_ENGINE: GeneralPurpose =
    GeneralPurpose::new(&alphabet::STANDARD, GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent));

/// Errors from [`sign`].
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The secret (after the optional `whsec_` prefix) is not valid base64, or decodes
    /// to an empty key.
    #[error("webhook secret is not valid base64")]
    BadSecret,
}

/// Generates a new secret: `whsec_` followed by the standard base64 of 32 random bytes.
pub fn generate_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// Decodes the HMAC key of a secret; the `whsec_` prefix is optional.
fn decode_key(secret: &str) -> Result<Vec<u8>, SignError> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    let key = SECRET_ENGINE.decode(encoded.trim()).map_err(|_| SignError::BadSecret)?;
    if key.is_empty() {
        // The reference libraries refuse empty secrets too; an empty HMAC key signs nothing.
        return Err(SignError::BadSecret);
    }
    Ok(key)
}

fn mac(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Signs a message; returns the value for the `webhook-signature` header (`v1,<base64>`).
///
/// The signed content is `"{msg_id}.{timestamp}.{body}"`; `body` must be the exact bytes
/// sent on the wire.
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> Result<String, SignError> {
    let key = decode_key(secret)?;
    let tag = mac(&key, msg_id, timestamp, body).finalize().into_bytes();
    Ok(format!("v1,{}", STANDARD.encode(tag)))
}

/// Checks a `webhook-signature` header against the message.
///
/// The header may hold several space-separated signatures; entries that are not `v1`
/// or not valid base64 are skipped. Returns `true` if any `v1` signature matches
/// (constant-time comparison). An invalid secret never verifies.
///
/// This does not check the timestamp's freshness; receivers should reject old
/// timestamps to prevent replays.
pub fn verify(secret: &str, msg_id: &str, timestamp: i64, body: &[u8], signature_header: &str) -> bool {
    let Ok(key) = decode_key(secret) else {
        return false;
    };
    let expected = mac(&key, msg_id, timestamp, body);
    signature_header
        .split_whitespace()
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, sig)| STANDARD.decode(sig).ok())
        .any(|sig| expected.clone().verify_slice(&sig).is_ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Test vector from the Standard Webhooks reference libraries.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: i64 = 1_614_265_330;
    const SPEC_BODY: &str = r#"{"test": 2432232314}"#;
    const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn spec_vector() {
        let sig = sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY.as_bytes()).unwrap();
        assert_eq!(sig, SPEC_SIG);
        assert!(verify(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY.as_bytes(), SPEC_SIG));
    }

    /// Vector computed with the Python `standardwebhooks` 1.1.0 package:
    /// `Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, tz=timezone.utc), body)`.
    /// The body contains non-ASCII text (signed as UTF-8) and the key is 34 bytes.
    #[test]
    fn python_standardwebhooks_vector() {
        let secret = "whsec_c2x1aWNlLXRlc3Qtc2VjcmV0LTMyLWJ5dGVzLWxvbmchIQ==";
        let body = r#"{"type":"order.created","data":{"id":"o_1","amount":4200,"note":"café"}}"#;
        let expected = "v1,lo/SNg5dWGtPMQEHhl+M0apGkxXeIKsbNiLnvNgLLuE=";
        let sig = sign(secret, "msg_2b9Yk1sluice", 1_700_000_000, body.as_bytes()).unwrap();
        assert_eq!(sig, expected);
        assert!(verify(secret, "msg_2b9Yk1sluice", 1_700_000_000, body.as_bytes(), expected));
    }

    #[test]
    fn prefix_and_padding_are_optional() {
        let bare = SPEC_SECRET.strip_prefix(SECRET_PREFIX).unwrap();
        assert_eq!(sign(bare, SPEC_ID, SPEC_TS, SPEC_BODY.as_bytes()).unwrap(), SPEC_SIG);

        let padded = "whsec_c2x1aWNlLXRlc3Qtc2VjcmV0LTMyLWJ5dGVzLWxvbmchIQ==";
        let unpadded = "whsec_c2x1aWNlLXRlc3Qtc2VjcmV0LTMyLWJ5dGVzLWxvbmchIQ";
        assert_eq!(sign(padded, "m", 1, b"x").unwrap(), sign(unpadded, "m", 1, b"x").unwrap());
    }

    #[test]
    fn bad_secrets_are_rejected() {
        for secret in ["whsec_not base64!", "whsec_", "", "@@@@"] {
            assert!(matches!(sign(secret, "m", 1, b"x"), Err(SignError::BadSecret)), "{secret:?}");
            assert!(!verify(secret, "m", 1, b"x", "v1,AAAA"));
        }
        assert_eq!(SignError::BadSecret.to_string(), "webhook secret is not valid base64");
    }

    #[test]
    fn generated_secrets_are_32_random_bytes() {
        let a = generate_secret();
        let b = generate_secret();
        assert_ne!(a, b);
        let key = STANDARD.decode(a.strip_prefix(SECRET_PREFIX).unwrap()).unwrap();
        assert_eq!(key.len(), 32);
        let sig = sign(&a, "msg_1", 42, b"{}").unwrap();
        assert!(verify(&a, "msg_1", 42, b"{}", &sig));
        assert!(!verify(&b, "msg_1", 42, b"{}", &sig));
    }

    #[test]
    fn any_of_several_signatures_may_match() {
        let other = sign(&generate_secret(), SPEC_ID, SPEC_TS, SPEC_BODY.as_bytes()).unwrap();
        let header = format!("v2,abcd {other} garbage v1,!!!notbase64 {SPEC_SIG}");
        assert!(verify(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY.as_bytes(), &header));
        let header = format!("v2,abcd {other}");
        assert!(!verify(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY.as_bytes(), &header));
        // The right MAC under another version tag does not count.
        let v2 = SPEC_SIG.replacen("v1,", "v2,", 1);
        assert!(!verify(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY.as_bytes(), &v2));
        assert!(!verify(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY.as_bytes(), ""));
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let body = SPEC_BODY.as_bytes();
        assert!(!verify(SPEC_SECRET, "msg_other", SPEC_TS, body, SPEC_SIG));
        assert!(!verify(SPEC_SECRET, SPEC_ID, SPEC_TS + 1, body, SPEC_SIG));
        assert!(!verify(SPEC_SECRET, SPEC_ID, SPEC_TS, br#"{"test": 2432232315}"#, SPEC_SIG));
        // A truncated MAC must not verify.
        assert!(!verify(SPEC_SECRET, SPEC_ID, SPEC_TS, body, "v1,g0hM9SsE+OTPJTGt"));
    }
}
