//! The caller's locale variables (LANG, LC_*) against the locales an image has. A host
//! locale the image lacks makes perl, python and bash print warnings at every start; such a
//! variable is replaced by the C locale (UTF-8 where the image has it), as pyxis does.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The variables that name a locale.
pub const VARIABLES: [&str; 14] = [
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "LC_NUMERIC",
    "LC_TIME",
    "LC_COLLATE",
    "LC_MONETARY",
    "LC_MESSAGES",
    "LC_PAPER",
    "LC_NAME",
    "LC_ADDRESS",
    "LC_TELEPHONE",
    "LC_MEASUREMENT",
    "LC_IDENTIFICATION",
];

/// glibc's compiled locales: one directory per locale, and the archive of many.
const LOCALE_DIR: &str = "usr/lib/locale";
const ARCHIVE: &str = "usr/lib/locale/locale-archive";
/// The first word of a locale archive, in the byte order of the machine that wrote it.
const ARCHIVE_MAGIC: u32 = 0xde02_0109;
/// The archive's name table is read up to this size; real ones hold a few KB.
const NAMES_LIMIT: u32 = 4 << 20;

/// The locales an image's C library can load.
#[derive(Debug, Default)]
pub struct ImageLocales {
    /// Whether the image has glibc's locale directory at all: without it (busybox, musl
    /// images) nothing complains about a missing locale, and nothing is changed.
    present: bool,
    root: std::path::PathBuf,
    archive_names: Vec<String>,
}

impl ImageLocales {
    /// The locales of the image whose root is `root`.
    pub fn read(root: &Path) -> ImageLocales {
        let present = root.join(LOCALE_DIR).is_dir();
        let archive_names = if present {
            archive_names(&root.join(ARCHIVE)).unwrap_or_default()
        } else {
            Vec::new()
        };
        ImageLocales {
            present,
            root: root.to_path_buf(),
            archive_names,
        }
    }

    /// Whether `value` (as in `LANG=value`) names a locale the image can load.
    pub fn honours(&self, value: &str) -> bool {
        if !self.present || matches!(value, "" | "C" | "POSIX") {
            return true;
        }
        names_to_try(value).iter().any(|name| {
            !name.contains('/')
                && (self.archive_names.iter().any(|n| n == name)
                    || self.root.join(LOCALE_DIR).join(name).is_dir())
        })
    }

    /// For each of `caller`'s locale variables the image cannot honour, the value to use
    /// instead: `C.UTF-8` for a UTF-8 locale where the image has it, else `C`.
    pub fn replacements(&self, caller: &[(String, String)]) -> Vec<(String, String)> {
        let utf8 = self.honours("C.UTF-8");
        caller
            .iter()
            .filter(|(name, value)| VARIABLES.contains(&name.as_str()) && !self.honours(value))
            .map(|(name, value)| {
                let fallback = match codeset(value) {
                    Some(c) if utf8 && normalize_codeset(c) == "utf8" => "C.UTF-8",
                    _ => "C",
                };
                (name.clone(), fallback.to_string())
            })
            .collect()
    }
}

/// The codeset of `lang_TERRITORY.codeset@modifier`.
fn codeset(value: &str) -> Option<&str> {
    let (_, rest) = value.split_once('.')?;
    Some(rest.split('@').next().unwrap_or(rest))
}

/// glibc's spelling of a codeset in locale names: lower case letters and digits only, and
/// `iso` before a codeset of digits alone (`UTF-8` is `utf8`, `8859-1` is `iso88591`).
fn normalize_codeset(codeset: &str) -> String {
    let kept: String = codeset
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if kept.chars().all(|c| c.is_ascii_digit()) {
        format!("iso{kept}")
    } else {
        kept
    }
}

/// The names glibc looks a locale up by: as written, and with its codeset normalized.
fn names_to_try(value: &str) -> Vec<String> {
    let mut names = vec![value.to_string()];
    if let Some(c) = codeset(value) {
        let normalized = value.replacen(&format!(".{c}"), &format!(".{}", normalize_codeset(c)), 1);
        if normalized != value {
            names.push(normalized);
        }
    }
    names
}

/// The locale names in a glibc locale archive: its string table, read from the header's
/// offsets (the archive itself can be hundreds of MB; only this table is read).
fn archive_names(path: &Path) -> std::io::Result<Vec<String>> {
    let mut file = File::open(path)?;
    let mut header = [0u8; 32];
    file.read_exact(&mut header)?;
    let word = |i: usize| u32::from_ne_bytes(header[i * 4..i * 4 + 4].try_into().unwrap());
    if word(0) != ARCHIVE_MAGIC {
        return Ok(Vec::new());
    }
    let (offset, used) = (word(5), word(6).min(NAMES_LIMIT));
    file.seek(SeekFrom::Start(offset.into()))?;
    let mut table = vec![0u8; used as usize];
    file.read_exact(&mut table)?;
    Ok(table
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dirs: &[&str], archive: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let locale = root.path().join(LOCALE_DIR);
        std::fs::create_dir_all(&locale).unwrap();
        for d in dirs {
            std::fs::create_dir(locale.join(d)).unwrap();
        }
        if !archive.is_empty() {
            let names: Vec<u8> = archive
                .iter()
                .flat_map(|n| [n.as_bytes(), b"\0"].concat())
                .collect();
            let mut bytes = Vec::new();
            for word in [
                ARCHIVE_MAGIC,
                0,
                0,
                0,
                0,
                32,
                names.len() as u32,
                names.len() as u32,
            ] {
                bytes.extend_from_slice(&word.to_ne_bytes());
            }
            bytes.extend_from_slice(&names);
            std::fs::write(root.path().join(ARCHIVE), bytes).unwrap();
        }
        root
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn debian_minbase_has_only_c_utf8() {
        let root = image(&["C.utf8"], &[]);
        let locales = ImageLocales::read(root.path());
        assert!(locales.honours("C.UTF-8") && locales.honours("C") && locales.honours(""));
        assert!(!locales.honours("en_US.UTF-8"));
        let caller = vars(&[
            ("LANG", "en_US.UTF-8"),
            ("LC_TIME", "de_DE.ISO-8859-1"),
            ("LC_ALL", "C"),
            ("HOME", "/nowhere"),
        ]);
        assert_eq!(
            locales.replacements(&caller),
            vars(&[("LANG", "C.UTF-8"), ("LC_TIME", "C")])
        );
    }

    #[test]
    fn archived_locales_are_found_by_their_normalized_names() {
        let root = image(&[], &["en_US.utf8", "de_DE", "de_DE.iso88591"]);
        let locales = ImageLocales::read(root.path());
        assert!(locales.honours("en_US.UTF-8"));
        assert!(locales.honours("de_DE.ISO-8859-1"));
        assert!(locales.honours("de_DE"));
        assert!(!locales.honours("fr_FR.UTF-8"));
        assert!(!locales.honours("../../etc"));
        // No C.utf8 in this image: a UTF-8 locale falls back to plain C.
        assert_eq!(
            locales.replacements(&vars(&[("LANG", "fr_FR.UTF-8")])),
            vars(&[("LANG", "C")])
        );
    }

    #[test]
    fn images_without_glibc_locales_are_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let locales = ImageLocales::read(root.path());
        assert!(locales
            .replacements(&vars(&[("LANG", "en_US.UTF-8")]))
            .is_empty());
    }

    #[test]
    fn codesets_normalize_as_glibc_does() {
        assert_eq!(normalize_codeset("UTF-8"), "utf8");
        assert_eq!(normalize_codeset("8859-1"), "iso88591");
        assert_eq!(
            names_to_try("en_US.UTF-8@euro"),
            ["en_US.UTF-8@euro", "en_US.utf8@euro"]
        );
    }
}
