//! The gateway's TLS identity: a given certificate and key, or a self-signed pair made on
//! first start and kept in `DATA_DIR/tls/`. Agents trust it by CA or by its SHA-256 pin;
//! `curl --pinnedpubkey` (and so install.sh) by the SHA-256 of its public key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use sha2::{Digest, Sha256};

use crate::settings::Settings;
use crate::util::write_atomic;

pub struct TlsIdentity {
    pub server_config: Arc<ServerConfig>,
    /// Hex SHA-256 of the leaf certificate (DER): what agents put in `pin_sha256`.
    pub pin_sha256: String,
    /// `sha256//BASE64` of the leaf's public key (SPKI): what `curl --pinnedpubkey` takes,
    /// so that `install.sh` can be fetched from a self-signed gateway by pin.
    pub curl_pin: String,
    /// Whether the certificate was generated here (and so needs a pin or the CA file).
    pub self_signed: bool,
}

/// The two pins of a certificate, as the gateway prints them at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pins {
    /// Hex SHA-256 of the certificate (DER).
    pub pin_sha256: String,
    /// `sha256//` and the base64 SHA-256 of its public key (SPKI, DER).
    pub curl_pin: String,
}

/// The certificate file the gateway serves: `--tls-cert`, else the generated one.
pub fn cert_path(settings: &Settings) -> PathBuf {
    match (&settings.tls_cert, &settings.tls_key) {
        (Some(c), Some(_)) => c.clone(),
        _ => settings.data_dir.join("tls").join("cert.pem"),
    }
}

/// The certificates of a PEM file's text, leaf first.
fn parse_certs(pem: &[u8], path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .with_context(|| format!("certificate file {} is not valid PEM", path.display()))?;
    if certs.is_empty() {
        bail!("certificate file {} holds no certificate", path.display());
    }
    Ok(certs)
}

/// The pins of the leaf certificate in `pem` (the text of the file at `path`).
pub fn pins_of_pem(pem: &[u8], path: &Path) -> anyhow::Result<Pins> {
    let certs = parse_certs(pem, path)?;
    pins_of(&certs[0], path)
}

fn pins_of(leaf: &CertificateDer<'_>, path: &Path) -> anyhow::Result<Pins> {
    Ok(Pins {
        pin_sha256: hex::encode(Sha256::digest(leaf.as_ref())),
        curl_pin: curl_pin(leaf).with_context(|| {
            format!(
                "certificate file {} does not parse as X.509",
                path.display()
            )
        })?,
    })
}

impl TlsIdentity {
    pub fn load_or_generate(settings: &Settings) -> anyhow::Result<TlsIdentity> {
        let tls_dir = settings.data_dir.join("tls");
        let cert_path = cert_path(settings);
        let (key_path, self_signed) = match (&settings.tls_cert, &settings.tls_key) {
            (Some(_), Some(k)) => (k.clone(), false),
            _ => {
                let key = tls_dir.join("key.pem");
                if !cert_path.exists() || !key.exists() {
                    generate(&tls_dir, &settings.tls_sans)?;
                }
                (key, true)
            }
        };
        let pem = std::fs::read(&cert_path)
            .with_context(|| format!("cannot read certificate {}", cert_path.display()))?;
        let certs = parse_certs(&pem, &cert_path)?;
        let Pins {
            pin_sha256,
            curl_pin,
        } = pins_of(&certs[0], &cert_path)?;
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .with_context(|| format!("cannot read private key {}", key_path.display()))?;
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .with_context(|| {
                    format!(
                        "certificate {} and key {} do not form a usable pair",
                        cert_path.display(),
                        key_path.display()
                    )
                })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        if self_signed {
            write_atomic(
                &tls_dir.join("cert.sha256"),
                format!("{pin_sha256}\n").as_bytes(),
                0o644,
            )?;
        }
        Ok(TlsIdentity {
            server_config: Arc::new(config),
            pin_sha256,
            curl_pin,
            self_signed,
        })
    }
}

/// `sha256//` and the base64 SHA-256 of the certificate's SubjectPublicKeyInfo (DER).
fn curl_pin(leaf: &CertificateDer<'_>) -> anyhow::Result<String> {
    use base64::Engine;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let spki = cert.tbs_certificate.subject_pki.raw;
    Ok(format!(
        "sha256//{}",
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(spki))
    ))
}

fn generate(tls_dir: &Path, extra_sans: &[String]) -> anyhow::Result<()> {
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            sans.push(h.to_string());
        }
    }
    sans.extend(extra_sans.iter().cloned());
    let certified = rcgen::generate_simple_self_signed(sans)
        .context("cannot generate a self-signed certificate")?;
    write_atomic(
        &tls_dir.join("key.pem"),
        certified.key_pair.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_atomic(
        &tls_dir.join("cert.pem"),
        certified.cert.pem().as_bytes(),
        0o644,
    )?;
    tracing::info!(dir = %tls_dir.display(), "generated a self-signed TLS certificate");
    Ok(())
}
