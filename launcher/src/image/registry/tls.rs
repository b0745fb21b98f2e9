//! Which certificate authorities the client trusts: the system's (so a site whose proxy or
//! registry uses a CA installed system-wide just works), plus the site's extra CA file.

use std::path::Path;
use std::sync::Arc;

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

use super::RegistryError;

pub(super) fn config(ca_file: Option<&Path>) -> Result<TlsConfig, RegistryError> {
    let mut roots: Vec<Certificate<'static>> = Vec::new();
    let system = rustls_native_certs::load_native_certs();
    for e in &system.errors {
        tracing::debug!("system CA store: {e}");
    }
    roots.extend(
        system
            .certs
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned()),
    );
    let system_count = roots.len();
    if let Some(path) = ca_file {
        roots.extend(read_ca_file(path)?);
    }
    if system_count == 0 {
        if roots.is_empty() {
            // No system store at all (a minimal container): Mozilla's list built into the
            // client is the only sensible fallback.
            tracing::debug!("no system CA certificates found; using the built-in list");
            return Ok(TlsConfig::builder().root_certs(RootCerts::WebPki).build());
        }
        tracing::warn!("no system CA certificates found; trusting only the site CA file");
    }
    Ok(TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .build())
}

pub(super) fn read_ca_file(path: &Path) -> Result<Vec<Certificate<'static>>, RegistryError> {
    let bad = |reason: String| RegistryError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        // A key next to the CA in the same file is the admin's business, not ours.
        if let PemItem::Certificate(c) = item.map_err(|e| bad(e.to_string()))? {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = config(Some(&missing)).unwrap_err().to_string();
        assert!(e.contains("nope.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = config(Some(&empty)).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        assert!(config(None).is_ok());
        let system = Path::new("/etc/ssl/certs/ca-certificates.crt");
        if system.exists() {
            assert!(config(Some(system)).is_ok());
        }
    }
}
