//! Mount specs: `SRC[:DST[:FLAGS]]` binds and `tmpfs:DST[:OPTIONS]`, alone or as pyxis'
//! comma-separated list.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountSpec {
    /// Host path (absolute); `tmpfs` for a tmpfs.
    pub source: PathBuf,
    /// Path inside the container (absolute).
    pub target: PathBuf,
    pub read_only: bool,
    /// Programs on it cannot be run (`noexec`).
    #[serde(default)]
    pub no_exec: bool,
    /// It cannot be bound elsewhere (`unbindable`, `runbindable`), as pyxis allows.
    #[serde(default)]
    pub unbindable: bool,
    /// A new tmpfs with these options (`size=1G,mode=1777`) instead of a host path.
    #[serde(default)]
    pub tmpfs: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MountSpecError {
    #[error("empty mount spec: write SRC[:DST[:FLAGS]]")]
    Empty,
    #[error("mount spec `{spec}` has too many `:` fields: write SRC[:DST[:FLAGS]]")]
    TooManyFields { spec: String },
    #[error("mount spec `{spec}`: unknown flag `{flag}` (known: ro, rw, noexec, unbindable, runbindable, bind, rbind, private, rprivate, slave, rslave, nosuid, nodev; for tmpfs also size=, mode=, nr_inodes=, huge=)")]
    UnknownFlag { spec: String, flag: String },
    #[error("mount spec `{spec}`: the container path `{target}` must be absolute")]
    RelativeTarget { spec: String, target: String },
    #[error("mount spec `{spec}`: the container path must not contain `..`")]
    DotDotTarget { spec: String },
    #[error(
        "mount spec `{spec}`: a tmpfs needs a place in the container: write tmpfs:/DST[:size=1G]"
    )]
    TmpfsWithoutTarget { spec: String },
    #[error("mount spec `{spec}`: the source path must not be empty")]
    EmptySource { spec: String },
    #[error("mount spec `{spec}`: the container path after `:` is empty: write SRC:DST, or SRC alone for the same path")]
    EmptyTarget { spec: String },
}

impl MountSpec {
    /// A plain bind of `source` at `target`.
    pub fn bind(source: PathBuf, target: PathBuf, read_only: bool) -> MountSpec {
        MountSpec {
            source,
            target,
            read_only,
            no_exec: false,
            unbindable: false,
            tmpfs: None,
        }
    }

    /// Parse one `SRC[:DST[:FLAGS]]`; a relative SRC is taken relative to `cwd`.
    /// FLAGS are joined with `+` (pyxis): `ro`/`rw`, plus propagation words that ferry
    /// accepts and ignores because its mounts are always private to the container.
    pub fn parse(spec: &str, cwd: &Path) -> Result<MountSpec, MountSpecError> {
        let trimmed = spec.trim();
        if trimmed.is_empty() {
            return Err(MountSpecError::Empty);
        }
        let fields: Vec<&str> = trimmed.split(':').collect();
        if fields.len() > 3 {
            return Err(MountSpecError::TooManyFields {
                spec: spec.to_string(),
            });
        }
        let source = fields[0];
        if source.is_empty() {
            return Err(MountSpecError::EmptySource {
                spec: spec.to_string(),
            });
        }
        let target = match fields.get(1) {
            None => source,
            Some(&"") => {
                return Err(MountSpecError::EmptyTarget {
                    spec: spec.to_string(),
                })
            }
            Some(t) => t,
        };
        let is_tmpfs = source == "tmpfs";
        if is_tmpfs && fields.len() < 2 {
            return Err(MountSpecError::TmpfsWithoutTarget {
                spec: spec.to_string(),
            });
        }
        let (mut read_only, mut no_exec, mut unbindable) = (false, false, false);
        let mut tmpfs_options = vec!["mode=0755".to_string()];
        if let Some(flags) = fields.get(2) {
            for flag in flags.split('+').filter(|f| !f.is_empty()) {
                let (word, value) = flag.split_once('=').unwrap_or((flag, ""));
                match word {
                    "ro" => read_only = true,
                    "rw" => read_only = false,
                    "noexec" => no_exec = true,
                    "unbindable" | "runbindable" => unbindable = true,
                    "bind" | "rbind" | "private" | "rprivate" | "slave" | "rslave" | "nosuid"
                    | "nodev"
                        if value.is_empty() => {}
                    "size" | "mode" | "nr_inodes" | "huge" if is_tmpfs && !value.is_empty() => {
                        tmpfs_options.retain(|o| !o.starts_with(&format!("{word}=")));
                        tmpfs_options.push(flag.to_string());
                    }
                    other => {
                        return Err(MountSpecError::UnknownFlag {
                            spec: spec.to_string(),
                            flag: if value.is_empty() {
                                other.to_string()
                            } else {
                                flag.to_string()
                            },
                        })
                    }
                }
            }
        }
        let target = PathBuf::from(target);
        if !target.is_absolute() {
            return Err(MountSpecError::RelativeTarget {
                spec: spec.to_string(),
                target: target.display().to_string(),
            });
        }
        if target.components().any(|c| c == Component::ParentDir) {
            return Err(MountSpecError::DotDotTarget {
                spec: spec.to_string(),
            });
        }
        Ok(MountSpec {
            source: if is_tmpfs {
                PathBuf::from("tmpfs")
            } else {
                cwd.join(source)
            },
            target,
            read_only,
            no_exec,
            unbindable,
            tmpfs: is_tmpfs.then(|| tmpfs_options.join(",")),
        })
    }

    /// Parse a comma-separated list of specs (pyxis' `--container-mounts`).
    pub fn parse_list(list: &str, cwd: &Path) -> Result<Vec<MountSpec>, MountSpecError> {
        list.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| MountSpec::parse(s, cwd))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cwd() -> PathBuf {
        PathBuf::from("/work")
    }

    #[test]
    fn source_only_mounts_at_same_path() {
        let m = MountSpec::parse("/data", &cwd()).unwrap();
        assert_eq!(m.source, PathBuf::from("/data"));
        assert_eq!(m.target, PathBuf::from("/data"));
        assert!(!m.read_only);
    }

    #[test]
    fn source_target_and_flags() {
        let m = MountSpec::parse("/scratch/x:/x:ro", &cwd()).unwrap();
        assert_eq!(
            (m.source.as_path(), m.target.as_path()),
            (Path::new("/scratch/x"), Path::new("/x"))
        );
        assert!(m.read_only);
        assert!(!MountSpec::parse("/a:/b:rw", &cwd()).unwrap().read_only);
        assert!(
            MountSpec::parse("/a:/b:rbind+ro", &cwd())
                .unwrap()
                .read_only
        );
    }

    #[test]
    fn pyxis_flags_and_tmpfs() {
        let m = MountSpec::parse("/tmp:/mnt:unbindable+ro+noexec", &cwd()).unwrap();
        assert!(m.read_only && m.unbindable && m.no_exec && m.tmpfs.is_none());
        let t = MountSpec::parse("tmpfs:/scratch:size=64m+mode=1777", &cwd()).unwrap();
        assert_eq!(t.tmpfs.as_deref(), Some("size=64m,mode=1777"));
        assert_eq!(t.target, PathBuf::from("/scratch"));
        assert_eq!(
            MountSpec::parse("tmpfs:/s", &cwd())
                .unwrap()
                .tmpfs
                .as_deref(),
            Some("mode=0755")
        );
        assert!(matches!(
            MountSpec::parse("tmpfs", &cwd()),
            Err(MountSpecError::TmpfsWithoutTarget { .. })
        ));
        assert!(matches!(
            MountSpec::parse("/a:/b:size=1g", &cwd()),
            Err(MountSpecError::UnknownFlag { flag, .. }) if flag == "size=1g"
        ));
        assert!(matches!(
            MountSpec::parse("/home:../home", &cwd()),
            Err(MountSpecError::RelativeTarget { .. })
        ));
    }

    #[test]
    fn relative_source_resolves_against_cwd() {
        let m = MountSpec::parse("data:/data", &cwd()).unwrap();
        assert_eq!(m.source, PathBuf::from("/work/data"));
    }

    #[test]
    fn comma_list() {
        let v = MountSpec::parse_list("/a:/b,/c:/d:ro,", &cwd()).unwrap();
        assert_eq!(v.len(), 2);
        assert!(v[1].read_only);
    }

    #[test]
    fn bad_specs_are_refused() {
        assert_eq!(MountSpec::parse("", &cwd()), Err(MountSpecError::Empty));
        assert!(matches!(
            MountSpec::parse("/a:/b:ro:x", &cwd()),
            Err(MountSpecError::TooManyFields { .. })
        ));
        assert!(matches!(
            MountSpec::parse("/a:/b:rx", &cwd()),
            Err(MountSpecError::UnknownFlag { .. })
        ));
        assert!(matches!(
            MountSpec::parse("/a:b", &cwd()),
            Err(MountSpecError::RelativeTarget { .. })
        ));
        assert!(matches!(
            MountSpec::parse("/a:/b/../c", &cwd()),
            Err(MountSpecError::DotDotTarget { .. })
        ));
        assert_eq!(
            MountSpec::parse("/a:", &cwd()),
            Err(MountSpecError::EmptyTarget { spec: "/a:".into() })
        );
        assert!(matches!(
            MountSpec::parse(":/b", &cwd()),
            Err(MountSpecError::EmptySource { .. })
        ));
    }

    #[test]
    fn error_text_names_the_spec() {
        let e = MountSpec::parse("/a:/b:bogus", &cwd())
            .unwrap_err()
            .to_string();
        assert!(e.contains("/a:/b:bogus") && e.contains("bogus"), "{e}");
    }
}
