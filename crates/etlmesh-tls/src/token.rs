//! The join token: a secret shared by the control plane with the processes it lets
//! join, and the SHA-256 of the mesh's trust anchor so that they can check whom they
//! show the secret to. Written `<secret hex>.<anchor sha256 hex>`.

use std::fmt;
use std::str::FromStr;

use crate::TlsError;

/// A join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    secret: [u8; 16],
    anchor: [u8; 32],
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        write!(f, "JoinToken(anchor {})", hex(&self.anchor))
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", hex(&self.secret), hex(&self.anchor))
    }
}

impl FromStr for JoinToken {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, TlsError> {
        let (secret, anchor) = s.trim().split_once('.').ok_or_else(|| {
            TlsError::Token("expected `<secret>.<trust anchor sha256>`, in hex".into())
        })?;
        Ok(Self {
            secret: unhex(secret)
                .ok_or_else(|| TlsError::Token("the secret is not 32 hex digits".into()))?,
            anchor: unhex(anchor).ok_or_else(|| {
                TlsError::Token("the trust anchor's SHA-256 is not 64 hex digits".into())
            })?,
        })
    }
}

impl JoinToken {
    /// A new random secret for the anchor whose DER is `anchor_der`.
    pub fn generate(anchor_der: &[u8]) -> Result<Self, TlsError> {
        let mut secret = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| TlsError::Certificate("no randomness for a join token".into()))?;
        Ok(Self {
            secret,
            anchor: sha256(anchor_der),
        })
    }

    /// The SHA-256 of the trust anchor's DER.
    pub fn anchor(&self) -> [u8; 32] {
        self.anchor
    }

    /// The secret part, as sent in a join request.
    pub fn secret_hex(&self) -> String {
        hex(&self.secret)
    }

    /// The secret's bytes.
    pub(crate) fn secret_bytes(&self) -> [u8; 16] {
        self.secret
    }

    /// A secret as sent in a join request (hex), when it is one.
    pub(crate) fn secret_from_hex(presented: &str) -> Option<[u8; 16]> {
        unhex::<16>(presented)
    }

    /// Whether `presented` (hex) is this token's secret; compares digests, so the time
    /// taken says nothing about the secret.
    pub fn accepts(&self, presented: &str) -> bool {
        match unhex::<16>(presented) {
            Some(p) => sha256(&p) == sha256(&self.secret),
            None => false,
        }
    }

    /// Whether it is for the anchor `anchor_der`.
    pub fn is_for(&self, anchor_der: &[u8]) -> bool {
        sha256(anchor_der) == self.anchor
    }
}

/// The SHA-256 digest of `data` (tokens, passwords and keys are compared by it).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `bytes` in lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_and_accepts_only_its_secret() {
        let t = JoinToken::generate(b"anchor").expect("token");
        let back: JoinToken = t.to_string().parse().expect("parse");
        assert_eq!(back, t);
        assert!(t.accepts(&t.secret_hex()));
        assert!(!t.accepts(&"00".repeat(16)));
        assert!(!t.accepts("short"));
        assert!(t.is_for(b"anchor") && !t.is_for(b"other"));
        assert!(!format!("{t:?}").contains(&t.secret_hex()));
        for bad in [
            "",
            "abc",
            "zz.zz",
            &format!("{}.{}", "0".repeat(32), "1".repeat(63)),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad}");
        }
    }
}
