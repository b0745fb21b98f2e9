//! Registry mirrors and pull-through caches: `registries.conf` files in the spirit of
//! containers-registries.conf(5) v2, e.g.
//!
//! ```toml
//! [[registry]]
//! prefix = "docker.io"                # images whose name starts with this
//! [[registry.mirror]]
//! location = "mirror.site:5000/hub"   # tried first: mirror.site:5000/hub/library/ubuntu
//! [[registry.mirror]]
//! location = "10.0.0.5:5000"
//! insecure = true                     # plain http
//! ```
//!
//! An image's sources are tried in order: the mirrors of the site's file, those of the
//! user's file, then the registry itself (at `location` when the entry gives one). Within
//! one file the entry with the longest matching prefix counts. A mirror that cannot be
//! reached or does not have the image is passed over; what it sends is checked against its
//! digests like anything else, and a mirror whose content does not match stops the pull.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::RemoteRef;

/// Where a user keeps their own file, below their home directory.
pub const USER_FILE: &str = ".config/ferry/registries.conf";

#[derive(Debug, thiserror::Error)]
pub enum MirrorsError {
    #[error("cannot read registries file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("registries file {}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

/// The mirror entries of the site's and the user's files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mirrors {
    /// One list per file, the site's first.
    files: Vec<Vec<Entry>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// `host[:port][/path]`, Docker Hub's names as `docker.io`.
    prefix: String,
    /// Where the registry itself is, when not at `prefix`.
    location: Option<Place>,
    mirrors: Vec<Place>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    location: String,
    insecure: bool,
}

/// One place to pull an image from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub reference: RemoteRef,
    /// Plain http (the file's `insecure = true`).
    pub insecure: bool,
    pub mirror: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    registry: Vec<RegistryTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryTable {
    prefix: Option<String>,
    location: Option<String>,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    mirror: Vec<MirrorTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorTable {
    location: String,
    #[serde(default)]
    insecure: bool,
}

/// Docker Hub goes by several names; prefixes and references are compared by this one.
fn canonical_host(host: &str) -> &str {
    match host.to_ascii_lowercase().as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "docker.io",
        _ => host,
    }
}

/// `host[:port][/path]` with Docker Hub's host as `docker.io`.
fn canonical(name: &str) -> String {
    let (host, path) = name.split_once('/').unwrap_or((name, ""));
    let host = canonical_host(host).to_ascii_lowercase();
    match path {
        "" => host,
        p => format!("{host}/{p}"),
    }
}

/// Why a prefix or location is not `host[:port][/path]`.
#[derive(Debug, thiserror::Error)]
enum PlaceError {
    #[error("`{0}`: write host[:port][/path], without a scheme")]
    Scheme(String),
    #[error("`{0}`: wildcard prefixes are not supported")]
    Wildcard(String),
    #[error("`{text}` is not host[:port][/path]: {error}")]
    Name {
        text: String,
        error: crate::image::reference::NameError,
    },
}

/// Whether `text` is `host[:port][/path]` as an image name starts (no scheme, tag or
/// digest); the reason when not.
fn check_place(text: &str) -> Result<(), PlaceError> {
    if text.contains("://") {
        return Err(PlaceError::Scheme(text.to_string()));
    }
    if text.starts_with("*.") {
        return Err(PlaceError::Wildcard(text.to_string()));
    }
    let (host, path) = text.split_once('/').unwrap_or((text, ""));
    let probe = RemoteRef {
        registry: host.to_string(),
        repository: if path.is_empty() {
            "x".into()
        } else {
            format!("{path}/x")
        },
        tag: None,
        digest: None,
        user: None,
    };
    probe.validate().map_err(|error| PlaceError::Name {
        text: text.to_string(),
        error,
    })
}

impl Mirrors {
    /// The site's file (`None`: none) and the user's file below `home` (a missing one is
    /// none).
    pub fn load(site: Option<&Path>, home: Option<&Path>) -> Result<Mirrors, MirrorsError> {
        let mut mirrors = Mirrors::default();
        if let Some(path) = site {
            let text = std::fs::read_to_string(path).map_err(|source| MirrorsError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            mirrors.files.push(Self::parse(&text, path)?);
        }
        if let Some(path) = home.map(|h| h.join(USER_FILE)) {
            match std::fs::read_to_string(&path) {
                Ok(text) => mirrors.files.push(Self::parse(&text, &path)?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(MirrorsError::Read { path, source }),
            }
        }
        Ok(mirrors)
    }

    /// The entries of one file's text; `path` is for messages.
    fn parse(text: &str, path: &Path) -> Result<Vec<Entry>, MirrorsError> {
        let invalid = |reason: String| MirrorsError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let file: File = toml::from_str(text).map_err(|e| {
            // toml's own text spans several lines with a drawing of the spot.
            let line = e.span().map(|s| {
                1 + text.as_bytes()[..s.start.min(text.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
            });
            let message = e.message().trim().replace('\n', " ");
            invalid(match line {
                Some(n) => format!("line {n}: {message}"),
                None => message,
            })
        })?;
        let mut entries = Vec::new();
        for (i, table) in file.registry.into_iter().enumerate() {
            let which = format!("[[registry]] number {}", i + 1);
            let prefix = match (&table.prefix, &table.location) {
                (Some(p), _) => p.clone(),
                (None, Some(l)) => l.clone(),
                (None, None) => {
                    return Err(invalid(format!("{which} has neither prefix nor location")))
                }
            };
            check_place(&prefix).map_err(|r| invalid(format!("{which}: {r}")))?;
            if let Some(l) = &table.location {
                check_place(l).map_err(|r| invalid(format!("{which}: {r}")))?;
            }
            let mut mirrors = Vec::new();
            for m in table.mirror {
                check_place(&m.location).map_err(|r| invalid(format!("{which}, mirror: {r}")))?;
                mirrors.push(Place {
                    location: m.location,
                    insecure: m.insecure,
                });
            }
            let location = table.location.map(|l| Place {
                location: l,
                insecure: table.insecure,
            });
            // `insecure` alone (no location) is about the registry at its prefix.
            let location = location.or_else(|| {
                table.insecure.then(|| Place {
                    location: prefix.clone(),
                    insecure: true,
                })
            });
            entries.push(Entry {
                prefix: canonical(&prefix),
                location,
                mirrors,
            });
        }
        Ok(entries)
    }

    pub fn is_empty(&self) -> bool {
        self.files.iter().all(|f| f.is_empty())
    }

    /// Where to pull `r` from, in order: mirrors first, the registry itself last. Just `r`
    /// when no entry matches.
    pub fn sources(&self, r: &RemoteRef) -> Vec<Source> {
        let name = canonical(&format!("{}/{}", r.registry, r.repository));
        let matching: Vec<&Entry> = self
            .files
            .iter()
            .filter_map(|entries| {
                entries
                    .iter()
                    .filter(|e| {
                        name == e.prefix
                            || name
                                .strip_prefix(&e.prefix)
                                .is_some_and(|rest| rest.starts_with('/'))
                    })
                    .max_by_key(|e| e.prefix.len())
            })
            .collect();
        let mut sources = Vec::new();
        for entry in &matching {
            for m in &entry.mirrors {
                match rewrite(r, &name, &entry.prefix, &m.location) {
                    Some(reference) => sources.push(Source {
                        reference,
                        insecure: m.insecure,
                        mirror: true,
                    }),
                    None => tracing::warn!(
                        "mirror {} of {} gives no image name for {name}; passed over",
                        m.location,
                        entry.prefix
                    ),
                }
            }
        }
        let original = matching
            .iter()
            .find_map(|e| e.location.as_ref().map(|l| (e, l)))
            .and_then(|(e, l)| {
                rewrite(r, &name, &e.prefix, &l.location).map(|reference| Source {
                    reference,
                    insecure: l.insecure,
                    mirror: false,
                })
            });
        sources.push(original.unwrap_or_else(|| Source {
            reference: r.clone(),
            insecure: false,
            mirror: false,
        }));
        sources
    }
}

/// `r` with the `prefix` of its canonical `name` replaced by `location`; `None` when no
/// repository is left.
fn rewrite(r: &RemoteRef, name: &str, prefix: &str, location: &str) -> Option<RemoteRef> {
    let rest = &name[prefix.len()..];
    let full = format!("{location}{rest}");
    let (registry, repository) = full.split_once('/')?;
    if repository.is_empty() {
        return None;
    }
    Some(RemoteRef {
        registry: registry.to_string(),
        repository: repository.to_string(),
        ..r.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Mirrors, String> {
        Mirrors::parse(text, Path::new("/etc/reg.conf"))
            .map(|e| Mirrors { files: vec![e] })
            .map_err(|e| e.to_string())
    }

    fn docker(name: &str) -> RemoteRef {
        RemoteRef::parse_docker(name).unwrap()
    }

    fn names(sources: &[Source]) -> Vec<String> {
        sources
            .iter()
            .map(|s| {
                format!(
                    "{}{}/{}",
                    if s.insecure { "http:" } else { "" },
                    s.reference.registry,
                    s.reference.repository
                )
            })
            .collect()
    }

    const HUB: &str = r#"
# Docker Hub through two caches
[[registry]]
prefix = "docker.io"
[[registry.mirror]]
location = "cache.site:5000/hub"
[[registry.mirror]]
location = "127.0.0.1:15000"
insecure = true

[[registry]]
prefix = "docker.io/nvidia"
location = "internal.site/nv"

[[registry]]
location = "nvcr.io"
[[registry.mirror]]
location = "nvcr-cache.site"
"#;

    #[test]
    fn mirrors_come_first_and_the_longest_prefix_wins() {
        let m = parse(HUB).unwrap();
        let ubuntu = docker("ubuntu:24.04");
        let sources = m.sources(&ubuntu);
        assert_eq!(
            names(&sources),
            [
                "cache.site:5000/hub/library/ubuntu",
                "http:127.0.0.1:15000/library/ubuntu",
                "registry-1.docker.io/library/ubuntu"
            ]
        );
        assert_eq!(sources[0].reference.tag.as_deref(), Some("24.04"));
        assert!(sources[0].mirror && !sources[2].mirror);
        assert_eq!(sources[2].reference, ubuntu);
        // A longer prefix of the same file replaces the shorter one: no mirrors, another place.
        assert_eq!(
            names(&m.sources(&docker("docker.io/nvidia/cuda:12"))),
            ["internal.site/nv/cuda"]
        );
        // A prefix matches whole path components only.
        assert_eq!(
            names(&m.sources(&docker("nvcr.io/nvidia/pytorch:24.05-py3"))),
            ["nvcr-cache.site/nvidia/pytorch", "nvcr.io/nvidia/pytorch"]
        );
        assert_eq!(names(&m.sources(&docker("nvcr.iox/a:1"))), ["nvcr.iox/a"]);
        assert_eq!(names(&m.sources(&docker("quay.io/a/b:1"))), ["quay.io/a/b"]);
    }

    #[test]
    fn the_sites_mirrors_come_before_the_users() {
        let site = Mirrors::parse(
            "[[registry]]\nprefix='docker.io'\n[[registry.mirror]]\nlocation='site.cache'\n",
            Path::new("/site"),
        )
        .unwrap();
        let user = Mirrors::parse(
            "[[registry]]\nprefix='docker.io/library'\n[[registry.mirror]]\nlocation='my.cache/lib'\n",
            Path::new("/user"),
        )
        .unwrap();
        let m = Mirrors {
            files: vec![site, user],
        };
        assert_eq!(
            names(&m.sources(&docker("busybox"))),
            [
                "site.cache/library/busybox",
                "my.cache/lib/busybox",
                "registry-1.docker.io/library/busybox"
            ]
        );
    }

    #[test]
    fn files_are_read_from_the_site_path_and_the_users_home() {
        let home = tempfile::tempdir().unwrap();
        // No user file, no site file: nothing.
        assert!(Mirrors::load(None, Some(home.path())).unwrap().is_empty());
        std::fs::create_dir_all(home.path().join(".config/ferry")).unwrap();
        std::fs::write(home.path().join(USER_FILE), HUB).unwrap();
        let m = Mirrors::load(None, Some(home.path())).unwrap();
        assert_eq!(m.sources(&docker("ubuntu")).len(), 3);
        let missing = home.path().join("nope.conf");
        let e = Mirrors::load(Some(&missing), None).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "cannot read registries file {}: ",
                missing.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn bad_files_are_one_line_naming_the_file_and_the_spot() {
        let cases = [
            (
                "[[registry]]\nprefix = \"docker.io\"\nmirrors = []\n",
                "/etc/reg.conf: line 3: unknown field `mirrors`",
            ),
            (
                "[[registry]]\n[[registry.mirror]]\nlocation = 'x.io'\n",
                "[[registry]] number 1 has neither prefix nor location",
            ),
            (
                "[[registry]]\nprefix = 'https://docker.io'\n",
                "`https://docker.io`: write host[:port][/path], without a scheme",
            ),
            (
                "[[registry]]\nprefix = '*.docker.io'\n",
                "wildcard prefixes are not supported",
            ),
            (
                "[[registry]]\nprefix = 'docker.io'\n[[registry.mirror]]\nlocation = 'Bad Host'\n",
                "[[registry]] number 1, mirror: `Bad Host` is not host[:port][/path]",
            ),
            ("[[registry]\n", "/etc/reg.conf: line 1: "),
        ];
        for (text, expected) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(expected), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
