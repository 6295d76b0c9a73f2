//! Signing a notification for a generic webhook receiver, per the Standard Webhooks
//! specification: `webhook-id` (the notification's id: the same on every retry, so the
//! receiver drops a repeat), `webhook-timestamp` (Unix seconds of this attempt) and
//! `webhook-signature` (`v1,` + base64 of HMAC-SHA256 over `id.timestamp.body` with the
//! receiver's secret, given as `whsec_` + base64). Sending is the delivery queue's.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A receiver's signing secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;

    /// `whsec_` followed by the key in base64, 24 to 64 bytes of it.
    fn from_str(s: &str) -> Result<Secret, String> {
        let Some(b64) = s.strip_prefix("whsec_") else {
            return Err("a webhook secret starts with whsec_ (then the key in base64)".into());
        };
        let key = BASE64
            .decode(b64)
            .map_err(|e| format!("the webhook secret after whsec_ is not base64: {e}"))?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!(
                "the webhook secret's key is {} bytes: use 24 to 64 (32 random bytes is usual)",
                key.len()
            ));
        }
        Ok(Secret(key))
    }
}

impl Secret {
    /// The key itself.
    pub(crate) fn key(&self) -> &[u8] {
        &self.0
    }
}

/// The three headers of one attempt to deliver `body` as message `id` at `timestamp`.
pub fn headers(
    secret: &Secret,
    id: &str,
    timestamp: u64,
    body: &[u8],
) -> [(&'static str, String); 3] {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(&secret.0).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let signature = BASE64.encode(mac.finalize().into_bytes());
    [
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", format!("v1,{signature}")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computed with Python's `hmac` and `hashlib` (an implementation independent of
    /// this one) from the specification's recipe.
    #[test]
    fn the_signature_matches_an_independent_implementation() {
        let secret: Secret = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
            .parse()
            .unwrap();
        let h = headers(
            &secret,
            "0f8fad5b-d9cb-469f-a165-70867728950e/disk/3/0",
            1_764_806_400,
            br#"{"kind":"firing"}"#,
        );
        assert_eq!(h[0].1, "0f8fad5b-d9cb-469f-a165-70867728950e/disk/3/0");
        assert_eq!(h[1].1, "1764806400");
        assert_eq!(h[2].1, "v1,6upOt2V7STll+LFKFJC7JRHSNpBqr1Xf34pffOv4ObY=");
        // Any change of id, time or body changes it.
        let other = headers(&secret, "x", 1_764_806_400, br#"{"kind":"firing"}"#);
        assert_ne!(other[2].1, h[2].1);
    }

    #[test]
    fn a_bad_secret_is_refused_with_the_fix() {
        for (bad, says) in [
            (
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
                "starts with whsec_",
            ),
            ("whsec_not base64!", "not base64"),
            ("whsec_AAEC", "use 24 to 64"),
        ] {
            let err = bad.parse::<Secret>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
