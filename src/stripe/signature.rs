//! Stripe webhook signatures: decides whether a `Stripe-Signature` header proves that Stripe
//! sent this exact body recently.
//!
//! The header is `t=<unix seconds>,v1=<hex>[,v1=<hex>…]` (other schemes such as `v0` are
//! ignored); each `v1` is the hex HMAC-SHA256, keyed with the endpoint's signing secret, of
//! `"<t>.<raw body>"`. Several `v1` appear while Stripe rolls a secret: one match is enough.
//! Comparison is constant-time (`Mac::verify_slice`), and the timestamp must lie within
//! [`TOLERANCE_S`] of now in either direction, so a captured request cannot be replayed later.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How far the signed timestamp may be from now (Stripe's libraries use 5 minutes).
pub const TOLERANCE_S: i64 = 300;

/// Why a signature was refused. The message never echoes the secret or a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing")]
    Missing,
    #[error("the Stripe-Signature header is malformed")]
    Malformed,
    #[error("no webhook signing secret is configured")]
    NoSecret,
    #[error("the Stripe-Signature timestamp is outside the tolerance")]
    Stale,
    #[error("no Stripe-Signature v1 signature matches the body")]
    Mismatch,
}

/// Checks `header` against `body`; answers the signed timestamp (unix seconds).
pub fn verify(
    secret: &str,
    header: Option<&str>,
    body: &[u8],
    now_s: i64,
) -> Result<i64, SignatureError> {
    if secret.is_empty() {
        return Err(SignatureError::NoSecret);
    }
    let header = header
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .ok_or(SignatureError::Missing)?;
    let mut timestamp: Option<i64> = None;
    let mut signatures: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            continue;
        };
        match key.trim() {
            "t" => {
                if timestamp.is_some() {
                    return Err(SignatureError::Malformed);
                }
                let t = value
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| SignatureError::Malformed)?;
                timestamp = Some(t);
            }
            "v1" => {
                // A v1 that is not hex cannot match; skip it rather than refuse the others.
                if let Ok(bytes) = hex::decode(value.trim()) {
                    signatures.push(bytes);
                }
            }
            _ => {}
        }
    }
    let t = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if now_s.saturating_sub(t).unsigned_abs() > TOLERANCE_S.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    let mac = signed_payload_mac(secret, t, body)?;
    for candidate in &signatures {
        if mac.clone().verify_slice(candidate).is_ok() {
            return Ok(t);
        }
    }
    Err(SignatureError::Mismatch)
}

/// The `Stripe-Signature` header Stripe would send for `body` at `t` (for tests and tools).
pub fn sign_header(secret: &str, t: i64, body: &[u8]) -> Result<String, SignatureError> {
    let mac = signed_payload_mac(secret, t, body)?;
    Ok(format!(
        "t={t},v1={}",
        hex::encode(mac.finalize().into_bytes())
    ))
}

fn signed_payload_mac(secret: &str, t: i64, body: &[u8]) -> Result<HmacSha256, SignatureError> {
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).map_err(|_| SignatureError::NoSecret)?;
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret";
    const BODY: &[u8] = br#"{"id":"evt_1","type":"invoice.paid"}"#;
    const NOW: i64 = 1_777_000_000;

    fn header_at(t: i64) -> String {
        sign_header(SECRET, t, BODY).unwrap()
    }

    #[test]
    fn a_valid_signature_is_accepted() {
        assert_eq!(verify(SECRET, Some(&header_at(NOW)), BODY, NOW), Ok(NOW));
        // Within the tolerance on both sides.
        let early = NOW - TOLERANCE_S;
        assert_eq!(
            verify(SECRET, Some(&header_at(early)), BODY, NOW),
            Ok(early)
        );
        let late = NOW + TOLERANCE_S;
        assert_eq!(verify(SECRET, Some(&header_at(late)), BODY, NOW), Ok(late));
    }

    #[test]
    fn known_vector_matches_stripe_scheme() {
        // HMAC-SHA256("secret", "1.{}") computed independently.
        let header = sign_header("secret", 1, b"{}").unwrap();
        let mut mac = HmacSha256::new_from_slice(b"secret").unwrap();
        mac.update(b"1.{}");
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(header, format!("t=1,v1={expected}"));
    }

    #[test]
    fn any_of_several_v1_signatures_may_match() {
        let good = header_at(NOW);
        let v1 = good.split_once(",v1=").unwrap().1;
        let header = format!("t={NOW},v0=abcd,v1={},v1={v1},v1=not-hex", "00".repeat(32));
        assert_eq!(verify(SECRET, Some(&header), BODY, NOW), Ok(NOW));
        // Spaces after commas are tolerated.
        let spaced = format!("t={NOW}, v1={v1}");
        assert_eq!(verify(SECRET, Some(&spaced), BODY, NOW), Ok(NOW));
    }

    #[test]
    fn a_bad_signature_is_refused() {
        let header = header_at(NOW);
        // Another secret.
        assert_eq!(
            verify("whsec_other", Some(&header), BODY, NOW),
            Err(SignatureError::Mismatch)
        );
        // Another body.
        assert_eq!(
            verify(SECRET, Some(&header), br#"{"id":"evt_2"}"#, NOW),
            Err(SignatureError::Mismatch)
        );
        // The signature of another timestamp under this one.
        let v1 = header.split_once(",v1=").unwrap().1;
        let moved = format!("t={},v1={v1}", NOW - 1);
        assert_eq!(
            verify(SECRET, Some(&moved), BODY, NOW),
            Err(SignatureError::Mismatch)
        );
        // A truncated signature.
        let short = format!("t={NOW},v1={}", &v1[..32]);
        assert_eq!(
            verify(SECRET, Some(&short), BODY, NOW),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn a_stale_or_future_signature_is_refused() {
        let old = header_at(NOW - TOLERANCE_S - 1);
        assert_eq!(
            verify(SECRET, Some(&old), BODY, NOW),
            Err(SignatureError::Stale)
        );
        let future = header_at(NOW + TOLERANCE_S + 1);
        assert_eq!(
            verify(SECRET, Some(&future), BODY, NOW),
            Err(SignatureError::Stale)
        );
        let absurd = header_at(i64::MIN);
        assert_eq!(
            verify(SECRET, Some(&absurd), BODY, NOW),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn a_missing_or_malformed_header_is_refused() {
        assert_eq!(
            verify(SECRET, None, BODY, NOW),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify(SECRET, Some("  "), BODY, NOW),
            Err(SignatureError::Missing)
        );
        for bad in [
            "garbage",
            "v1=abcd",
            "t=abc,v1=abcd",
            &format!("t={NOW}"),
            &format!("t={NOW},v0=abcd"),
            &format!("t={NOW},t={NOW},v1=abcd"),
        ] {
            assert_eq!(
                verify(SECRET, Some(bad), BODY, NOW),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn no_secret_verifies_nothing() {
        assert_eq!(
            verify("", Some(&header_at(NOW)), BODY, NOW),
            Err(SignatureError::NoSecret)
        );
    }
}
