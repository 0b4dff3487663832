//! The authority, identities and handshakes, in memory.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Authority, ClientAuth, Identity, Role};

fn authority(dir: &std::path::Path, lifetime: Duration) -> Authority {
    Authority::open(dir, None, lifetime).expect("authority")
}

/// A handshake and one byte each way between `client` (or a client without a
/// certificate) and a server of `server`.
async fn handshake(
    server: &Arc<Identity>,
    clients: ClientAuth,
    client: Option<&Arc<Identity>>,
) -> Result<(), String> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config(clients).expect("server"));
    let config = match client {
        Some(c) => c.client_config(),
        None => Arc::new(
            rustls::ClientConfig::builder_with_provider(crate::provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(
                    crate::verify::MeshServerVerifier::new(Arc::new({
                        let mut r = rustls::RootCertStore::empty();
                        r.add(server.anchor().clone()).expect("anchor");
                        r
                    }))
                    .expect("verifier"),
                ))
                .with_no_client_auth(),
        ),
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    let serve = tokio::spawn(async move {
        let mut s = acceptor.accept(a).await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        s.write_all(&byte).await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    });
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let talk = async {
        let mut c = connector
            .connect(name, b)
            .await
            .map_err(|e| e.to_string())?;
        c.write_all(b"x").await.map_err(|e| e.to_string())?;
        c.flush().await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        c.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let talked = talk.await;
    let served = serve.await.map_err(|e| e.to_string())?;
    talked.and(served)
}

#[test]
fn the_anchor_is_made_once_and_kept_with_its_token() {
    let dir = tempfile::tempdir().expect("dir");
    let a = authority(dir.path(), Duration::from_secs(3600));
    let key = dir.path().join("ca.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key).expect("key").permissions(),
    );
    assert_eq!(mode & 0o077, 0, "the CA key is private: {mode:o}");
    let b = authority(dir.path(), Duration::from_secs(3600));
    assert_eq!(a.anchor_pem(), b.anchor_pem());
    assert_eq!(a.token(), b.token());
    let written = std::fs::read_to_string(dir.path().join("join-token")).expect("token");
    assert_eq!(written.trim(), a.token().to_string());
}

#[test]
fn a_given_anchor_is_used_and_a_bad_one_is_named() {
    let made = tempfile::tempdir().expect("dir");
    let a = authority(made.path(), Duration::from_secs(60));
    let other = tempfile::tempdir().expect("dir");
    let files = crate::AuthorityFiles {
        cert: made.path().join("ca.pem"),
        key: made.path().join("ca.key"),
    };
    let b = Authority::open(other.path(), Some(&files), Duration::from_secs(60)).expect("given");
    assert_eq!(a.anchor_pem(), b.anchor_pem());
    assert!(!other.path().join("ca.pem").exists());
    std::fs::write(other.path().join("bad.pem"), "not a certificate").expect("write");
    let bad = crate::AuthorityFiles {
        cert: other.path().join("bad.pem"),
        key: made.path().join("ca.key"),
    };
    let e = Authority::open(other.path(), Some(&bad), Duration::from_secs(60))
        .expect_err("bad anchor")
        .to_string();
    assert!(e.contains("bad.pem"), "{e}");
}

#[tokio::test]
async fn members_shake_hands_and_strangers_do_not() {
    let dir = tempfile::tempdir().expect("dir");
    let mesh = authority(dir.path(), Duration::from_secs(3600));
    let worker = mesh
        .local_identity("clean-1", Role::Worker, &["127.0.0.1".into()])
        .expect("worker");
    let gateway = mesh
        .local_identity("gw", Role::Gateway, &[])
        .expect("gateway");
    handshake(&worker, ClientAuth::Required, Some(&gateway))
        .await
        .expect("gateway → worker");

    // Another control plane's certificates: refused both ways.
    let elsewhere = tempfile::tempdir().expect("dir");
    let foreign = authority(elsewhere.path(), Duration::from_secs(3600))
        .local_identity("intruder", Role::Worker, &[])
        .expect("foreign");
    let e = handshake(&worker, ClientAuth::Required, Some(&foreign))
        .await
        .expect_err("a foreign client");
    assert!(!e.is_empty());
    handshake(&foreign, ClientAuth::Required, Some(&gateway))
        .await
        .expect_err("a foreign server");
    // No certificate at all: refused where one is required, let in where optional.
    handshake(&worker, ClientAuth::Required, None)
        .await
        .expect_err("no client certificate");
    handshake(&worker, ClientAuth::Optional, None)
        .await
        .expect("optional");
}

#[tokio::test]
async fn a_renewed_certificate_is_used_by_the_next_handshake() {
    let dir = tempfile::tempdir().expect("dir");
    let mesh = authority(dir.path(), Duration::from_secs(10));
    let worker = mesh.local_identity("w", Role::Worker, &[]).expect("worker");
    let gateway = mesh
        .local_identity("gw", Role::Gateway, &[])
        .expect("gateway");
    let renew_in = worker.until_renewal();
    assert!(
        renew_in > Duration::from_secs(6) && renew_in <= Duration::from_secs(7),
        "renewal at 70 % of 10 s: in {renew_in:?}"
    );
    let before = worker.not_after();
    std::thread::sleep(Duration::from_millis(1100));
    mesh.renew_local(&worker).expect("renew");
    assert!(worker.not_after() > before);
    handshake(&worker, ClientAuth::Required, Some(&gateway))
        .await
        .expect("after renewal");
    assert_eq!(mesh.issued(), 3);
}

#[test]
fn names_and_requests_are_checked() {
    let dir = tempfile::tempdir().expect("dir");
    let mesh = authority(dir.path(), Duration::from_secs(60));
    for bad in ["", "a b", "ünï", &"x".repeat(65)] {
        let e = mesh
            .local_identity(bad, Role::Worker, &[])
            .expect_err(bad)
            .to_string();
        assert!(e.contains("not a valid name"), "{e}");
    }
    let e = mesh
        .issue(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "w",
            Role::Worker,
            &[],
        )
        .expect_err("bad csr")
        .to_string();
    assert!(e.contains("signing request"), "{e}");
}

#[test]
fn hosts_are_addresses_or_names_under_a_suffix_never_wildcards() {
    let dir = tempfile::tempdir().expect("dir");
    let mesh = authority(dir.path(), Duration::from_secs(60));
    for ok in ["127.0.0.1", "::1", "localhost"] {
        mesh.local_identity("w", Role::Worker, &[ok.into()])
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in [
        "*.etlmesh",
        "*",
        "evil.example.com",
        "w.ns.svc.cluster.local",
    ] {
        let e = mesh
            .local_identity("w", Role::Worker, &[bad.into()])
            .expect_err(bad)
            .to_string();
        assert!(e.contains("may not be in a mesh certificate"), "{e}");
    }
    let k8s = authority(dir.path(), Duration::from_secs(60))
        .with_host_suffixes(vec![".svc.cluster.local".into()]);
    k8s.local_identity("w", Role::Worker, &["w.ns.svc.cluster.local".into()])
        .expect("under the suffix");
    for bad in ["*.svc.cluster.local", "evilsvc.cluster.local"] {
        k8s.local_identity("w", Role::Worker, &[bad.into()])
            .expect_err(bad);
    }
}

#[test]
fn a_certificate_says_who_it_is_and_its_serial_is_the_one_issued() {
    let dir = tempfile::tempdir().expect("dir");
    let mesh = authority(dir.path(), Duration::from_secs(60));
    let (key, csr) = crate::client::key_and_request().expect("csr");
    let _ = key;
    let issued = mesh
        .issue(&csr, "clean-2", Role::Worker, &["10.0.0.5".into()])
        .expect("issue");
    let der = rustls::pki_types::CertificateDer::from_pem_slice(issued.chain_pem.as_bytes())
        .expect("leaf");
    let who = crate::listener::PeerIdentity::of(&der).expect("identity");
    assert_eq!(
        (who.name.as_str(), who.role, who.hosts.clone()),
        ("clean-2", Role::Worker, vec!["10.0.0.5".to_string()])
    );
    assert_eq!(who.serial, issued.serial);
    assert!(!issued.serial.is_empty());
}

#[test]
fn the_own_token_joins_and_minted_ones_run_out() {
    let dir = tempfile::tempdir().expect("dir");
    let mesh = authority(dir.path(), Duration::from_secs(60));
    assert!(mesh.accept_join(&mesh.token().secret_hex()).is_ok());
    let once = mesh
        .mint("ci", Duration::from_secs(60), Some(1))
        .expect("mint");
    assert_eq!(once.anchor(), mesh.token().anchor());
    assert_eq!(mesh.accept_join(&once.secret_hex()), Ok("ci".into()));
    assert!(mesh.accept_join(&once.secret_hex()).is_err());
    // Minted from another process, into the same directory.
    let cli = Authority::mint_in(dir.path(), None, "cli", Duration::from_secs(60), Some(2))
        .expect("mint_in");
    assert!(mesh.accept_join(&cli.secret_hex()).is_ok());
    assert!(mesh.accept_join(&cli.secret_hex()).is_ok());
    assert!(mesh.accept_join(&cli.secret_hex()).is_err());
    assert!(
        mesh.accept_join("00112233445566778899aabbccddeeff")
            .is_err()
    );
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_in_the_handshake() {
    let dir = tempfile::tempdir().expect("dir");
    let mesh = authority(dir.path(), Duration::from_secs(3600));
    let worker = mesh
        .local_identity("w-revoke", Role::Worker, &[])
        .expect("worker");
    let gateway = mesh
        .local_identity("gw-revoke", Role::Gateway, &[])
        .expect("gateway");
    handshake(&worker, ClientAuth::Required, Some(&gateway))
        .await
        .expect("before");
    let serial = crate::revoked::serial_of(&gateway.certificate()).expect("serial");
    crate::grants::Revocations::in_dir(dir.path())
        .revoke(&serial)
        .expect("revoke");
    assert!(mesh.revoked().contains(&serial));
    crate::set_revoked(mesh.revoked().iter().cloned());
    let e = handshake(&worker, ClientAuth::Required, Some(&gateway))
        .await
        .expect_err("a revoked client");
    assert!(!e.is_empty());
    crate::set_revoked(Vec::new());
}
