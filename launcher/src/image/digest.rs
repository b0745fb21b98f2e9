//! Content digests: the one check every digest from a user, a registry, a layout or the
//! cache goes through, and the sha256 helpers that compute them.

use sha2::{Digest as _, Sha256};

/// `sha256:` and 64 lowercase hex digits: the only algorithm registries and layouts use.
/// The hex part names a blob's file, so nothing else may pass.
pub fn check_digest(d: &str) -> Result<(), String> {
    let Some(hex) = d.strip_prefix("sha256:") else {
        return Err(format!(
            "digest '{}' is not supported: only sha256:<64 hex digits> is",
            shorten(d)
        ));
    };
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!(
            "digest '{}' must be sha256: followed by 64 lowercase hex digits",
            shorten(d)
        ));
    }
    Ok(())
}

/// A checked digest as the OCI model holds it.
pub fn parse_digest(d: &str) -> Result<oci_spec::image::Digest, String> {
    check_digest(d)?;
    oci_spec::image::Digest::try_from(d).map_err(|e| format!("digest '{}': {e}", shorten(d)))
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
        assert!(check_digest(&format!("sha256:{}", "AB".repeat(32)))
            .unwrap_err()
            .contains("64 lowercase hex"));
        assert!(check_digest("sha512:abcd").unwrap_err().contains("sha512"));
        assert!(check_digest("md5:abc").unwrap_err().contains("only sha256"));
        assert!(check_digest("sha256:../../etc/passwd")
            .unwrap_err()
            .contains("64 lowercase hex"));
        let long = format!("sha256:{}", "x".repeat(500));
        assert!(check_digest(&long).unwrap_err().len() < 200);
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
