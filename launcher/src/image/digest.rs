//! Content digests: the one check every digest from a user, a registry, a layout or the
//! cache goes through, and the sha256 helpers that compute them.

use sha2::{Digest as _, Sha256};

/// Why a digest was refused; the message names the digest (shortened) and the problem.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("digest '{0}' is not supported: only sha256:<64 hex digits> is")]
    Unsupported(String),
    #[error("digest '{0}' must be sha256: followed by 64 lowercase hex digits")]
    BadHex(String),
    #[error("digest '{digest}': {error}")]
    Model {
        digest: String,
        error: oci_spec::OciSpecError,
    },
}

/// `sha256:` and 64 lowercase hex digits: the only algorithm registries and layouts use.
/// The hex part names a blob's file, so nothing else may pass.
pub fn check_digest(d: &str) -> Result<(), DigestError> {
    let Some(hex) = d.strip_prefix("sha256:") else {
        return Err(DigestError::Unsupported(shorten(d)));
    };
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(DigestError::BadHex(shorten(d)));
    }
    Ok(())
}

/// A checked digest as the OCI model holds it.
pub fn parse_digest(d: &str) -> Result<oci_spec::image::Digest, DigestError> {
    check_digest(d)?;
    oci_spec::image::Digest::try_from(d).map_err(|error| DigestError::Model {
        digest: shorten(d),
        error,
    })
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// Hostile text in a message: at most 80 characters, no control characters.
pub(crate) fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(80).filter(|c| !c.is_control()).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sha256_with_64_lowercase_hex_digits() {
        assert!(check_digest(&format!("sha256:{}", "ab".repeat(32))).is_ok());
        let refused = |d: &str| check_digest(d).unwrap_err().to_string();
        assert!(refused(&format!("sha256:{}", "AB".repeat(32))).contains("64 lowercase hex"));
        assert_eq!(
            refused("sha512:abcd"),
            "digest 'sha512:abcd' is not supported: only sha256:<64 hex digits> is"
        );
        assert!(refused("md5:abc").contains("only sha256"));
        assert_eq!(
            refused("sha256:../../etc/passwd"),
            "digest 'sha256:../../etc/passwd' must be sha256: followed by 64 lowercase hex digits"
        );
        let long = format!("sha256:{}", "x".repeat(500));
        assert!(refused(&long).len() < 200);
        let d = parse_digest(&format!("sha256:{}", "0".repeat(64))).unwrap();
        assert_eq!(d.digest(), "0".repeat(64));
    }

    #[test]
    fn digests() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
