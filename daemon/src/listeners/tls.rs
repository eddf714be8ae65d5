//! TLS for the TCP listeners (rustls: through tonic for gRPC, through tokio-rustls for the HTTP
//! bridges): the server's certificate and key, and optionally a CA whose client certificates
//! are required (mTLS), the same on every TCP listener. A client without a valid certificate is
//! refused during the handshake, before any request.

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

pub use crate::config::TlsFiles;

/// The config names the files; what they become is the listeners' business.
impl TlsFiles {
    /// The certificate and key, `None` when TLS is off; half a configuration is an error.
    fn pair(&self) -> anyhow::Result<Option<(&Path, &Path)>> {
        match (&self.cert, &self.key) {
            (None, None) => {
                if self.client_ca.is_some() {
                    anyhow::bail!("tls_client_ca: client certificates need TLS; set tls_cert and tls_key too");
                }
                Ok(None)
            }
            (Some(cert), Some(key)) => Ok(Some((cert, key))),
            (Some(_), None) => anyhow::bail!("tls_cert is set but tls_key is not; TLS needs both"),
            (None, Some(_)) => anyhow::bail!("tls_key is set but tls_cert is not; TLS needs both"),
        }
    }

    /// Whether a listener under this configuration requires client certificates.
    pub fn requires_client_certificates(&self) -> bool {
        self.cert.is_some() && self.key.is_some() && self.client_ca.is_some()
    }

    /// The HTTP bridges' TLS: the same certificate, key and client CA as gRPC, as a rustls
    /// configuration for tokio-rustls (HTTP/2 and HTTP/1.1 offered by ALPN); `None` when TLS
    /// is off.
    pub fn rustls_config(&self) -> anyhow::Result<Option<std::sync::Arc<rustls::ServerConfig>>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::sync::Arc;
        let Some((cert, key)) = self.pair()? else { return Ok(None) };
        let chain = CertificateDer::pem_slice_iter(&read_pem("tls_cert", cert, "CERTIFICATE")?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| anyhow::anyhow!("tls_cert: {}: {err}", cert.display()))?;
        let private = PrivateKeyDer::from_pem_slice(&read_pem("tls_key", key, "PRIVATE KEY")?)
            .map_err(|err| anyhow::anyhow!("tls_key: {}: {err}", key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|err| anyhow::anyhow!("TLS: {err}"))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(client_ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for ca in CertificateDer::pem_slice_iter(&read_pem("tls_client_ca", client_ca, "CERTIFICATE")?) {
                    let ca = ca.map_err(|err| anyhow::anyhow!("tls_client_ca: {}: {err}", client_ca.display()))?;
                    roots.add(ca).map_err(|err| anyhow::anyhow!("tls_client_ca: {}: {err}", client_ca.display()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|err| anyhow::anyhow!("tls_client_ca: {}: {err}", client_ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, private)
            .map_err(|err| anyhow::anyhow!("tls_cert / tls_key: {err}"))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(Arc::new(config)))
    }

    /// tonic's TLS settings, `None` when TLS is off; errors name the key and the file.
    pub fn server_config(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let Some((cert, key)) = self.pair()? else { return Ok(None) };
        let cert_pem = read_pem("tls_cert", cert, "CERTIFICATE")?;
        let key_pem = read_pem("tls_key", key, "PRIVATE KEY")?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
        if let Some(client_ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_pem("tls_client_ca", client_ca, "CERTIFICATE")?));
        }
        Ok(Some(config))
    }
}

/// Reads a PEM file, checking that it holds what `key` should name (tonic only says "invalid
/// data" much later, without saying which file).
fn read_pem(key: &str, path: &Path, label: &str) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).map_err(|err| anyhow::anyhow!("{key}: cannot read {}: {err}", path.display()))?;
    let text = String::from_utf8_lossy(&pem);
    let holds = text.lines().any(|line| line.starts_with("-----BEGIN ") && line.contains(label));
    if !holds {
        anyhow::bail!("{key}: {} is not a PEM file with a {label} block", path.display());
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_a_configuration_is_refused_by_name() {
        let only_cert = TlsFiles { cert: Some("/c.pem".into()), ..TlsFiles::default() };
        assert!(only_cert.server_config().unwrap_err().to_string().starts_with("tls_cert is set but tls_key"));
        let only_ca = TlsFiles { client_ca: Some("/ca.pem".into()), ..TlsFiles::default() };
        assert!(only_ca.server_config().unwrap_err().to_string().starts_with("tls_client_ca:"));
        assert!(TlsFiles::default().server_config().unwrap().is_none());
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("key.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let files = TlsFiles { cert: Some(not_pem.clone()), key: Some(not_pem), client_ca: None };
        let err = files.server_config().unwrap_err().to_string();
        assert!(err.starts_with("tls_cert:") && err.contains("CERTIFICATE"), "{err}");
    }
}
