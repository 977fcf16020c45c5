//! TLS for `mqtts://` and `wss://` endpoints: rustls with the `ring` provider (no C build for
//! cross targets, unlike aws-lc-rs), trusting only what the config names — a CA file, and the
//! system roots if asked for. There is no option to skip verification.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::config::UplinkConfig;

/// A TLS setup problem, naming the config key and the file.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    pub key: &'static str,
    pub message: String,
}

fn err(key: &'static str, message: String) -> TlsError {
    TlsError { key, message }
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = std::fs::File::open(path)
        .map_err(|e| err(key, format!("cannot read {}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            err(
                key,
                format!("{}: not PEM certificates: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(err(
            key,
            format!("{}: holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

fn private_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = std::fs::File::open(path)
        .map_err(|e| err(key, format!("cannot read {}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| {
            err(
                key,
                format!("{}: not a PEM private key: {e}", path.display()),
            )
        })?
        .ok_or_else(|| err(key, format!("{}: holds no PEM private key", path.display())))
}

/// The client configuration for TLS endpoints.
pub fn client_config(c: &UplinkConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    if let Some(path) = &c.ca_file {
        for cert in certs("uplink.ca_file", path)? {
            roots.add(cert).map_err(|e| {
                err(
                    "uplink.ca_file",
                    format!("{}: unusable CA certificate: {e}", path.display()),
                )
            })?;
        }
    }
    if c.system_roots {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            // A broken entry in the system store must not stop the others.
            if let Err(e) = roots.add(cert) {
                log::debug!("uplink: skipping an unusable system root certificate: {e}");
            }
        }
    }
    if roots.is_empty() {
        return Err(err(
            "uplink.ca_file",
            "a TLS endpoint needs a CA to trust: set uplink.ca_file or uplink.system_roots = true"
                .into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err("uplink.ca_file", format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    let config = match (&c.client_cert_file, &c.client_key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                certs("uplink.client_cert_file", cert)?,
                private_key("uplink.client_key_file", key)?,
            )
            .map_err(|e| {
                err(
                    "uplink.client_key_file",
                    format!("does not match uplink.client_cert_file: {e}"),
                )
            })?,
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err(err(
                "uplink.client_key_file",
                "needed with uplink.client_cert_file".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(err(
                "uplink.client_cert_file",
                "needed with uplink.client_key_file".into(),
            ))
        }
    };
    Ok(Arc::new(config))
}
