//! What the authority keeps beside its anchor to decide who may join and who no longer
//! belongs, in its directory (files only its owner may read):
//!
//! - `join-tokens.json`: join tokens minted with a name, an expiry and a number of
//!   uses (`etlmesh token join`), kept as SHA-256 digests of their secrets; a join
//!   spends one use;
//! - `revoked.json`: serial numbers of certificates revoked (`etlmesh token revoke`):
//!   the control plane refuses them on its mesh listener and they cannot be renewed,
//!   and workers refuse them as clients.
//!
//! Both are read again when they change, so the command line can write them while the
//! control plane runs. Files are replaced atomically, through a temporary file of the
//! writer's own; in one process, changes (read, change, write) go one at a time, so
//! that workers started together each get a token that the file keeps.

use parking_lot::Mutex;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::TlsError;
use crate::token::{JoinToken, hex, sha256};

/// A join token minted for a purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MintedToken {
    /// What it is for (shown in logs when it is used).
    pub name: String,
    /// SHA-256 of its secret, hex.
    pub sha256: String,
    /// When it stops being accepted (seconds since the epoch).
    pub expires: u64,
    /// Joins it still allows; none: any number until it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u32>,
}

/// Why a join token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token of this authority has this secret.
    Unknown,
    /// It expired (its name).
    Expired(String),
    /// Its uses are spent (its name).
    UsedUp(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unknown => f.write_str("the join token is not this control plane's"),
            Refusal::Expired(n) => write!(f, "join token `{n}` has expired"),
            Refusal::UsedUp(n) => write!(f, "join token `{n}` has been used as often as it may"),
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Writes `value` as JSON to `path`, atomically, readable by its owner only.
/// Held while a file of grants is read, changed and written back.
static CHANGES: Mutex<()> = Mutex::new(());

fn changing() -> parking_lot::MutexGuard<'static, ()> {
    CHANGES.lock()
}

fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "json.{}-{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let json = serde_json::to_vec_pretty(value).map_err(|e| file_error(path, e))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| file_error(&tmp, e))?;
    f.write_all(&json)
        .and_then(|()| f.sync_all())
        .map_err(|e| file_error(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_error(path, e))
}

fn load<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T, TlsError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| file_error(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(file_error(path, e)),
    }
}

/// The minted join tokens of an authority's directory.
#[derive(Debug)]
pub struct JoinTokens {
    path: PathBuf,
}

impl JoinTokens {
    /// The tokens kept in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join("join-tokens.json"),
        }
    }

    /// Mints a token for the anchor `anchor_der`, valid for `ttl` and `uses` joins.
    pub fn mint(
        &self,
        anchor_der: &[u8],
        name: &str,
        ttl: std::time::Duration,
        uses: Option<u32>,
    ) -> Result<JoinToken, TlsError> {
        let token = JoinToken::generate(anchor_der)?;
        let _one_at_a_time = changing();
        let mut all: Vec<MintedToken> = load(&self.path)?;
        let t = now();
        all.retain(|m| m.expires > t && m.uses_left != Some(0));
        all.push(MintedToken {
            name: name.to_string(),
            sha256: hex(&sha256(&token.secret_bytes())),
            expires: t.saturating_add(ttl.as_secs()),
            uses_left: uses,
        });
        save(&self.path, &all)?;
        Ok(token)
    }

    /// Spends one use of the token whose secret is `presented` (hex); its name.
    pub fn spend(&self, presented: &str) -> Result<String, Refusal> {
        let Some(secret) = JoinToken::secret_from_hex(presented) else {
            return Err(Refusal::Unknown);
        };
        let digest = hex(&sha256(&secret));
        let _one_at_a_time = changing();
        let mut all: Vec<MintedToken> = load(&self.path).map_err(|_| Refusal::Unknown)?;
        let Some(m) = all.iter_mut().find(|m| m.sha256 == digest) else {
            return Err(Refusal::Unknown);
        };
        if m.expires <= now() {
            return Err(Refusal::Expired(m.name.clone()));
        }
        match &mut m.uses_left {
            Some(0) => return Err(Refusal::UsedUp(m.name.clone())),
            Some(n) => *n -= 1,
            None => {}
        }
        let name = m.name.clone();
        save(&self.path, &all).map_err(|_| Refusal::Unknown)?;
        Ok(name)
    }
}

/// The revoked certificates of an authority's directory.
#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
}

impl Revocations {
    /// The list kept in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join("revoked.json"),
        }
    }

    /// The revoked serial numbers (hex, lower case).
    pub fn serials(&self) -> Result<HashSet<String>, TlsError> {
        let v: Vec<String> = load(&self.path)?;
        Ok(v.into_iter().map(|s| s.to_ascii_lowercase()).collect())
    }

    /// Revokes `serial` (hex).
    pub fn revoke(&self, serial: &str) -> Result<(), TlsError> {
        let serial = serial.trim().to_ascii_lowercase();
        if serial.is_empty() || !serial.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(TlsError::Certificate(format!(
                "`{serial}` is not a serial number: give the hex the control plane logs when it issues a certificate"
            )));
        }
        let _one_at_a_time = changing();
        let mut all: Vec<String> = load(&self.path)?;
        if !all.contains(&serial) {
            all.push(serial);
        }
        save(&self.path, &all)
    }

    /// When the list last changed.
    pub fn modified(&self) -> Option<std::time::SystemTime> {
        std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn minted_tokens_expire_and_run_out_of_uses() {
        let dir = tempfile::tempdir().expect("tmp");
        let tokens = JoinTokens::in_dir(dir.path());
        let once = tokens
            .mint(b"anchor", "ci-runner", Duration::from_secs(600), Some(1))
            .expect("mint");
        assert_eq!(tokens.spend(&once.secret_hex()), Ok("ci-runner".into()));
        assert_eq!(
            tokens.spend(&once.secret_hex()),
            Err(Refusal::UsedUp("ci-runner".into()))
        );
        let gone = tokens
            .mint(b"anchor", "old", Duration::from_secs(0), None)
            .expect("mint");
        assert_eq!(
            tokens.spend(&gone.secret_hex()),
            Err(Refusal::Expired("old".into()))
        );
        assert_eq!(tokens.spend("00"), Err(Refusal::Unknown));
        let text = std::fs::read_to_string(dir.path().join("join-tokens.json")).expect("file");
        assert!(!text.contains(&once.secret_hex()), "only digests are kept");
    }

    #[test]
    fn tokens_minted_at_once_are_all_kept() {
        // Workers started together each get a token minted for them: none may be lost
        // to another's write (it was: two writers shared one temporary file).
        let dir = tempfile::tempdir().expect("tmp");
        let minted: Vec<JoinToken> = std::thread::scope(|s| {
            let all: Vec<_> = (0..8)
                .map(|i| {
                    let tokens = JoinTokens::in_dir(dir.path());
                    s.spawn(move || {
                        tokens
                            .mint(
                                b"anchor",
                                &format!("w{i}"),
                                Duration::from_secs(600),
                                Some(1),
                            )
                            .expect("mint")
                    })
                })
                .collect();
            all.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        let tokens = JoinTokens::in_dir(dir.path());
        for t in &minted {
            assert!(tokens.spend(&t.secret_hex()).is_ok(), "every token kept");
        }
    }

    #[test]
    fn revocations_are_kept_as_lower_case_hex() {
        let dir = tempfile::tempdir().expect("tmp");
        let r = Revocations::in_dir(dir.path());
        assert!(r.serials().expect("empty").is_empty());
        r.revoke("0A1B").expect("revoke");
        r.revoke("0a1b").expect("again");
        assert_eq!(r.serials().expect("list").len(), 1);
        assert!(r.revoke("not hex").is_err());
    }
}
