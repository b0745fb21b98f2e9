//! Platforms (`linux/arm64/v8`) and the one choice of an image for a platform out of an
//! index, variants included, for the registry client and the importer alike.

use oci_spec::image::{Arch, Descriptor, Os, Platform};

/// Names and choices on the OCI model's `Platform`.
pub trait PlatformExt: Sized {
    /// This machine, in the names images use (Go's GOARCH names).
    fn host() -> Self;
    /// `OS/ARCH[/VARIANT]`, e.g. `linux/arm64` or `linux/arm/v7`.
    fn parse(text: &str) -> Option<Self>;
    /// `OS/ARCH[/VARIANT]`.
    fn name(&self) -> String;
}

/// A platform from the strings a document holds: the architecture in Go's names, an empty
/// variant as none.
pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
    let mut p = Platform::default();
    p.set_os(Os::from(os));
    p.set_architecture(Arch::from(normalize_arch(architecture)));
    p.set_variant(variant.filter(|v| !v.is_empty()).map(str::to_string));
    p
}

impl PlatformExt for Platform {
    fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", None),
            // Whether this CPU does v6 or v7 is not known at compile time; v7 is what every
            // 32-bit ARM server distribution targets.
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        new(std::env::consts::OS, architecture, variant)
    }

    fn parse(text: &str) -> Option<Platform> {
        let parts: Vec<&str> = text.split('/').collect();
        let ok =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Some(new(os, arch, None)),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => {
                Some(new(os, arch, Some(variant)))
            }
            _ => None,
        }
    }

    fn name(&self) -> String {
        let mut s = format!("{}/{}", self.os(), self.architecture());
        if let Some(v) = self.variant() {
            s.push('/');
            s.push_str(v);
        }
        s
    }
}

/// Some indexes use the kernel's names rather than Go's.
fn normalize_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "armhf" | "armel" => "arm",
        other => other,
    }
}

/// Variants acceptable for `want`, best first; `None` stands for "not given". An empty list
/// means any variant goes (architectures without meaningful variants).
fn variant_preference(want: &Platform) -> Vec<Option<&str>> {
    match (want.architecture(), want.variant().as_deref()) {
        // arm64 images carry `v8` or nothing; both run on any arm64 machine.
        (Arch::ARM64, None | Some("v8")) => vec![Some("v8"), None],
        (Arch::ARM64, Some(v)) => vec![Some(v), Some("v8"), None],
        // 32-bit ARM is backwards compatible: a v7 CPU runs v6 and v5 code.
        (Arch::ARM, None | Some("v7")) => vec![Some("v7"), Some("v6"), Some("v5"), None],
        (Arch::ARM, Some("v6")) => vec![Some("v6"), Some("v5"), None],
        (Arch::ARM, Some("v8")) => vec![Some("v8"), Some("v7"), Some("v6"), Some("v5"), None],
        (Arch::ARM, Some(v)) => vec![Some(v), None],
        _ => Vec::new(),
    }
}

/// How well an image of platform `p` suits `want`: lower is better, `None` is unusable.
/// An entry that names no platform suits any, after every one that names `want`.
pub fn rank(p: Option<&Platform>, want: &Platform) -> Option<usize> {
    const UNNAMED: usize = usize::MAX;
    let Some(p) = p else { return Some(UNNAMED) };
    if p.os() != want.os() || p.architecture() != want.architecture() {
        return None;
    }
    let preference = variant_preference(want);
    if preference.is_empty() {
        // Architectures without variants in practice: the same variant as asked, else
        // none, else whatever is there.
        return Some(if p.variant() == want.variant() {
            0
        } else if p.variant().is_none() {
            1
        } else {
            2
        });
    }
    preference.iter().position(|v| *v == p.variant().as_deref())
}

/// buildx puts provenance attestations into an index as entries of platform
/// `unknown/unknown`; they are never an image to run.
pub fn is_attestation(d: &Descriptor) -> bool {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get("vnd.docker.reference.type"))
        .is_some_and(|t| t == "attestation-manifest")
}

/// No entry of an index runs on the wanted platform.
#[derive(Debug, thiserror::Error)]
#[error("no image for {wanted} (platforms: {})", available.join(", "))]
pub struct NoPlatform {
    pub wanted: String,
    /// The platforms the index offers, in its order.
    pub available: Vec<String>,
}

/// The index entry to run on `want`, or the platforms the index offers.
pub fn select<'a>(
    entries: &'a [Descriptor],
    want: &Platform,
) -> Result<&'a Descriptor, NoPlatform> {
    let mut best: Option<(usize, &Descriptor)> = None;
    for entry in entries.iter().filter(|e| !is_attestation(e)) {
        let Some(r) = rank(entry.platform().as_ref(), want) else {
            continue;
        };
        if best.is_none_or(|(b, _)| r < b) {
            best = Some((r, entry));
        }
    }
    best.map(|(_, e)| e).ok_or_else(|| {
        let mut available: Vec<String> = entries
            .iter()
            .filter(|e| !is_attestation(e))
            .map(|e| match e.platform() {
                Some(p) => p.name(),
                None => "(no platform)".to_string(),
            })
            .collect();
        available.dedup();
        NoPlatform {
            wanted: want.name(),
            available,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::MediaType;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn entry(platform: &str) -> Descriptor {
        let mut d = Descriptor::new(
            MediaType::ImageManifest,
            1,
            crate::image::digest::parse_digest(D1).unwrap(),
        );
        d.set_platform(Platform::parse(platform));
        d
    }

    fn pick(entries: &[Descriptor], p: &str) -> Result<String, NoPlatform> {
        select(entries, &Platform::parse(p).unwrap()).map(|e| e.platform().clone().unwrap().name())
    }

    #[test]
    fn platform_selection() {
        let entries = vec![
            entry("linux/amd64"),
            entry("linux/arm/v6"),
            entry("linux/arm/v7"),
            entry("linux/arm64/v8"),
            entry("windows/amd64"),
        ];
        assert_eq!(pick(&entries, "linux/amd64").unwrap(), "linux/amd64");
        assert_eq!(pick(&entries, "linux/x86_64").unwrap(), "linux/amd64");
        assert_eq!(pick(&entries, "linux/arm64").unwrap(), "linux/arm64/v8");
        assert_eq!(pick(&entries, "linux/arm64/v8").unwrap(), "linux/arm64/v8");
        assert_eq!(pick(&entries, "linux/arm/v7").unwrap(), "linux/arm/v7");
        assert_eq!(pick(&entries, "linux/arm/v6").unwrap(), "linux/arm/v6");
        let missing = pick(&entries, "linux/s390x").unwrap_err();
        assert_eq!(
            missing.to_string(),
            "no image for linux/s390x (platforms: linux/amd64, linux/arm/v6, linux/arm/v7, \
             linux/arm64/v8, windows/amd64)"
        );
        assert_eq!(
            missing.available,
            [
                "linux/amd64",
                "linux/arm/v6",
                "linux/arm/v7",
                "linux/arm64/v8",
                "windows/amd64"
            ]
        );
        // A v5-only index still runs on a v7 machine, and arm64 without a variant is fine.
        let old = vec![entry("linux/arm/v5"), entry("linux/arm64")];
        assert!(pick(&old, "linux/arm/v7").is_ok());
        assert_eq!(pick(&old, "linux/arm64/v8").unwrap(), "linux/arm64");
        assert!(pick(&old, "linux/arm/v5").is_ok());
        assert!(pick(&[entry("linux/arm/v7")], "linux/arm/v6").is_err());
        // A v7 machine prefers v7 over v6 whatever the order.
        let arm = vec![
            entry("linux/arm/v6"),
            entry("linux/arm/v7"),
            entry("linux/arm"),
        ];
        assert_eq!(pick(&arm, "linux/arm/v7").unwrap(), "linux/arm/v7");
    }

    #[test]
    fn entries_without_a_platform_and_attestations() {
        let mut unnamed = entry("linux/amd64");
        unnamed.set_platform(None);
        // A named match wins; an unnamed entry is the fallback.
        let entries = vec![unnamed.clone(), entry("linux/amd64")];
        assert_eq!(pick(&entries, "linux/amd64").unwrap(), "linux/amd64");
        let only = vec![entry("linux/mips"), unnamed];
        let chosen = select(&only, &Platform::parse("linux/amd64").unwrap()).unwrap();
        assert!(chosen.platform().is_none());
        let mut attestation = entry("unknown/unknown");
        attestation.set_annotations(Some(
            [(
                "vnd.docker.reference.type".to_string(),
                "attestation-manifest".to_string(),
            )]
            .into(),
        ));
        assert!(is_attestation(&attestation));
        let e = pick(&[entry("linux/arm64"), attestation], "linux/amd64").unwrap_err();
        assert_eq!(e.available, ["linux/arm64"]);
    }

    #[test]
    fn host_platform_and_names() {
        let h = Platform::host();
        assert_eq!(h.os(), &Os::Linux);
        if cfg!(target_arch = "x86_64") {
            assert_eq!(h.name(), "linux/amd64");
        }
        assert_eq!(
            Platform::parse("linux/arm/v7").unwrap().name(),
            "linux/arm/v7"
        );
        assert_eq!(
            Platform::parse("linux/aarch64").unwrap().name(),
            "linux/arm64"
        );
        assert!(Platform::parse("linux").is_none());
        assert!(Platform::parse("linux/amd64/v2/x").is_none());
        assert!(Platform::parse("linux/am d64").is_none());
    }
}
