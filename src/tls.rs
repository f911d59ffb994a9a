//! TLS certificates for HTTPS/WSS and TURN over TLS: PEM files from an operator, or a
//! self-signed certificate made at start-up for a LAN test. rustls with the `ring` provider, the
//! same stack the rest of the server uses.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Pem {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(String),
    #[error("making a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Certificate {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Certificate {
    /// Reads a PEM certificate chain (leaf first) and a PEM private key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let pem_error = |path: &Path| {
            let path = path.display().to_string();
            move |source| TlsError::Pem { path, source }
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(pem_error(cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_error(cert))?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate(cert.display().to_string()));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(pem_error(key))?;
        Ok(Certificate { chain, key })
    }

    /// A fresh self-signed certificate for `localhost`, `127.0.0.1` and the given names and
    /// addresses. Browsers warn about it once; it still makes the page a secure context, which
    /// the camera needs on any host but localhost.
    pub fn self_signed(names: &[String], addrs: &[IpAddr]) -> Result<Self, TlsError> {
        let mut subject_alt_names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        for name in names.iter().cloned().chain(
            addrs
                .iter()
                .filter(|a| !a.is_unspecified())
                .map(|a| a.to_string()),
        ) {
            if !subject_alt_names.contains(&name) {
                subject_alt_names.push(name);
            }
        }
        let made = rcgen::generate_simple_self_signed(subject_alt_names)?;
        Ok(Certificate {
            chain: vec![made.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der())),
        })
    }

    /// A server configuration that offers `alpn` (in order of preference).
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// The leaf certificate (for a client that pins it).
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }
}

/// The SHA-256 fingerprint of a certificate as browsers show it (`AB:CD:…`), so a self-signed
/// one can be checked before it is trusted.
pub fn fingerprint(certificate: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, certificate.as_ref());
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_certificate_covers_the_given_names_and_makes_a_config() {
        let cert =
            Certificate::self_signed(&["meet.lan".into()], &[IpAddr::from([10, 0, 0, 7])]).unwrap();
        let fingerprint = fingerprint(cert.leaf());
        assert_eq!(fingerprint.len(), 32 * 3 - 1, "{fingerprint}");
        cert.server_config(&[b"http/1.1"]).unwrap();
    }

    #[test]
    fn missing_and_empty_files_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("switchboard-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let missing = dir.join("missing.pem");
        let error = Certificate::load(&missing, &missing).unwrap_err();
        assert!(error.to_string().contains("missing.pem"), "{error}");
        let error = Certificate::load(&empty, &empty).unwrap_err();
        assert!(matches!(error, TlsError::NoCertificate(_)), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
