//! The serial numbers of revoked mesh certificates, as this process knows them: the
//! control plane reads them from its authority's directory; workers and gateways get
//! them with its answers to their heartbeats and load reports. Every handshake of the
//! mesh checks the peer's certificate against them.

use parking_lot::RwLock;
use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::CertificateDer;

fn set() -> &'static RwLock<Arc<HashSet<String>>> {
    static REVOKED: OnceLock<RwLock<Arc<HashSet<String>>>> = OnceLock::new();
    REVOKED.get_or_init(RwLock::default)
}

/// Replaces the revoked serials (hex); true when they changed.
pub fn set_revoked(serials: impl IntoIterator<Item = String>) -> bool {
    let new: HashSet<String> = serials
        .into_iter()
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let mut cur = set().write();
    if **cur == new {
        return false;
    }
    tracing::info!(revoked = new.len(), "revoked mesh certificates updated");
    *cur = Arc::new(new);
    true
}

/// Whether the certificate with this serial (hex) is revoked.
pub fn is_revoked(serial: &str) -> bool {
    let cur = set().read().clone();
    !cur.is_empty() && cur.contains(&serial.to_ascii_lowercase())
}

/// A certificate's serial number, hex (as the authority logs it).
pub fn serial_of(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(crate::token::hex(cert.raw_serial()))
}

/// Refuses a revoked certificate in a handshake.
pub(crate) fn check(der: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    if set().read().is_empty() {
        return Ok(());
    }
    match serial_of(der) {
        Some(s) if is_revoked(&s) => Err(rustls::Error::General(format!(
            "the certificate {s} is revoked"
        ))),
        _ => Ok(()),
    }
}
