//! The TLS listener's certificate, key and optional client CA (mTLS), and the identity a
//! client certificate carries.
//!
//! rustls with the `ring` provider only (aws-lc-rs does not cross-build for the ARM units).
//! The files are read at start and again by [`TlsFiles::reload`] (the daemon's reload), so a
//! renewed certificate is served to new connections without a restart; a reload that fails
//! keeps the old certificate and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Where the TLS listener's files are.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub listen: std::net::SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA whose client certificates are accepted; their subject CN is the device identity.
    /// Clients without a certificate are still let in to authenticate with a password.
    pub client_ca: Option<PathBuf>,
}

/// A TLS problem, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("TLS {what} {file}: {message}")]
pub struct TlsError {
    what: &'static str,
    file: PathBuf,
    message: String,
}

fn err(what: &'static str, file: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError {
        what,
        file: file.to_path_buf(),
        message: message.to_string(),
    }
}

fn read_certs(what: &'static str, file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(file).map_err(|e| err(what, file, e))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| err(what, file, e))?;
    if certs.is_empty() {
        return Err(err(what, file, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn read_key(file: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(file).map_err(|e| err("key", file, e))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| err("key", file, e))?
        .ok_or_else(|| err("key", file, "no PEM private key in it"))
}

/// Builds the acceptor from the files.
pub fn acceptor(s: &TlsSettings) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("certificate", &s.cert)?;
    let key = read_key(&s.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("certificate", &s.cert, e))?;
    let builder = match &s.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs("client CA", ca)? {
                roots.add(c).map_err(|e| err("client CA", ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| err("client CA", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| err("key", &s.key, e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The current acceptor, replaceable while connections are being served.
pub struct TlsFiles {
    settings: TlsSettings,
    current: RwLock<TlsAcceptor>,
}

impl TlsFiles {
    pub fn load(settings: TlsSettings) -> Result<TlsFiles, TlsError> {
        let current = RwLock::new(acceptor(&settings)?);
        Ok(TlsFiles { settings, current })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the files again; on error the previous certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = acceptor(&self.settings)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}

/// The subject CN of a DER certificate, if it has one that is UTF-8 (or printable) text.
///
/// A small DER walk instead of an X.509 crate: the certificate was already verified by
/// rustls against the client CA, only its subject name is read here.
pub fn subject_cn(cert: &[u8]) -> Option<String> {
    let (_, cert_body, _) = tlv(cert)?; // Certificate SEQUENCE
    let (_, tbs, _) = tlv(cert_body)?; // TBSCertificate SEQUENCE
    let mut rest = tbs;
    // [0] version, optional
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2;
    }
    // serial, signature algorithm, issuer, validity
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (tag, subject, _) = tlv(rest)?;
    if tag != 0x30 {
        return None;
    }
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (_, set, next) = tlv(rdns)?;
        rdns = next;
        let mut atvs = set;
        while !atvs.is_empty() {
            let (_, atv, next) = tlv(atvs)?;
            atvs = next;
            let (otag, oid, after) = tlv(atv)?;
            if otag == 0x06 && oid == [0x55, 0x04, 0x03] {
                let (_, value, _) = tlv(after)?;
                return String::from_utf8(value.to_vec()).ok();
            }
        }
    }
    None
}

/// One DER TLV: (tag, contents, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, head) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    if end > b.len() {
        return None;
    }
    Some((tag, &b[head..end], &b[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_der_gives_none() {
        assert_eq!(subject_cn(&[]), None);
        assert_eq!(subject_cn(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(subject_cn(&[0x30, 0x02, 0x30, 0x00]), None);
    }
}
