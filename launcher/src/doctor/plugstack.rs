//! plugstack.conf as Slurm reads it (plugin lines, includes) and the lines loading ferry.

use std::fs;
use std::path::{Path, PathBuf};

/// One plugin line of plugstack.conf (or a file it includes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginLine {
    pub file: PathBuf,
    pub line: usize,
    pub required: bool,
    pub plugin: PathBuf,
    pub args: Vec<String>,
}

impl PluginLine {
    pub(super) fn place(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PlugstackError {
    #[error("{file}:{line}: cannot read it: {reason}")]
    Unreadable {
        file: PathBuf,
        line: usize,
        reason: String,
    },
    #[error(
        "{file}:{line}: `{text}` is not `required|optional PLUGIN [ARGS]` or `include PATTERN`"
    )]
    Syntax {
        file: PathBuf,
        line: usize,
        text: String,
    },
    #[error("{0}: includes nest too deeply (a loop?)")]
    TooDeep(PathBuf),
}

/// Every plugin line of `file` and the files it includes, in Slurm's order. A relative
/// plugin path is looked up in `plugin_dirs`, as Slurm does.
pub fn read_plugstack(
    file: &Path,
    plugin_dirs: &[PathBuf],
) -> Result<Vec<PluginLine>, PlugstackError> {
    let mut out = Vec::new();
    read_plugstack_into(file, plugin_dirs, 0, (file, 0), &mut out)?;
    Ok(out)
}

fn read_plugstack_into(
    file: &Path,
    plugin_dirs: &[PathBuf],
    depth: usize,
    from: (&Path, usize),
    out: &mut Vec<PluginLine>,
) -> Result<(), PlugstackError> {
    if depth > 16 {
        return Err(PlugstackError::TooDeep(file.to_path_buf()));
    }
    let text = fs::read_to_string(file).map_err(|e| PlugstackError::Unreadable {
        file: from.0.to_path_buf(),
        line: from.1,
        reason: format!("{}: {e}", file.display()),
    })?;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("");
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(first) = words.first() else { continue };
        let syntax = || PlugstackError::Syntax {
            file: file.to_path_buf(),
            line: n + 1,
            text: raw.trim().to_string(),
        };
        match first.to_ascii_lowercase().as_str() {
            "include" => {
                let pattern = words.get(1).ok_or_else(syntax)?;
                let base = file.parent().unwrap_or(Path::new("/"));
                for included in expand_include(&base.join(pattern)) {
                    read_plugstack_into(&included, plugin_dirs, depth + 1, (file, n + 1), out)?;
                }
            }
            kind @ ("required" | "optional") => {
                let plugin = Path::new(words.get(1).ok_or_else(syntax)?);
                let plugin = if plugin.is_absolute() {
                    plugin.to_path_buf()
                } else {
                    plugin_dirs
                        .iter()
                        .map(|d| d.join(plugin))
                        .find(|p| p.exists())
                        .unwrap_or_else(|| plugin.to_path_buf())
                };
                out.push(PluginLine {
                    file: file.to_path_buf(),
                    line: n + 1,
                    required: kind == "required",
                    plugin,
                    args: words[2..].iter().map(|s| s.to_string()).collect(),
                });
            }
            _ => return Err(syntax()),
        }
    }
    Ok(())
}

/// The files an `include` names: wildcards (`*`, `?`) are honoured in the last path
/// component (`plugstack.conf.d/*.conf`, as distributions ship it), in sorted order. A
/// pattern matching nothing includes nothing, as with Slurm's glob.
fn expand_include(pattern: &Path) -> Vec<PathBuf> {
    let name = pattern
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return if pattern.is_file() {
            vec![pattern.to_path_buf()]
        } else {
            Vec::new()
        };
    }
    let dir = pattern.parent().unwrap_or(Path::new("/"));
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    !n.starts_with('.') && wildcard_match(name.as_bytes(), n.as_bytes())
                })
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// Shell-style matching of `*` and `?` (no character classes).
pub fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            wildcard_match(&pattern[1..], name)
                || (!name.is_empty() && wildcard_match(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => wildcard_match(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => wildcard_match(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// The lines loading ferry's plugin.
pub fn ferry_lines(lines: &[PluginLine]) -> Vec<&PluginLine> {
    lines
        .iter()
        .filter(|l| {
            l.plugin
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains("spank_ferry"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugstack_with_includes_and_relative_plugins() {
        let tmp = tempfile::tempdir().unwrap();
        let etc = tmp.path();
        fs::create_dir(etc.join("plugstack.conf.d")).unwrap();
        fs::create_dir(etc.join("lib")).unwrap();
        fs::write(etc.join("lib/spank_ferry.so"), b"").unwrap();
        fs::write(
            etc.join("plugstack.conf"),
            "# site plugins\noptional /usr/lib/other.so a=b\n\ninclude plugstack.conf.d/*.conf\nInclude /nonexistent/*.conf\n",
        )
        .unwrap();
        fs::write(
            etc.join("plugstack.conf.d/ferry.conf"),
            "required spank_ferry.so  ferry_bin=/usr/bin/ferry log_level=info # comment\n",
        )
        .unwrap();
        fs::write(
            etc.join("plugstack.conf.d/ferry.conf.dpkg-old"),
            "required /old/spank_ferry.so\n",
        )
        .unwrap();
        let lines = read_plugstack(&etc.join("plugstack.conf"), &[etc.join("lib")]).unwrap();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(!lines[0].required);
        let ferry = ferry_lines(&lines);
        assert_eq!(ferry.len(), 1);
        assert_eq!(ferry[0].plugin, etc.join("lib/spank_ferry.so"));
        assert_eq!(
            ferry[0].args,
            ["ferry_bin=/usr/bin/ferry", "log_level=info"]
        );
        assert_eq!(ferry[0].line, 1);
        assert!(ferry[0].required);

        fs::write(etc.join("plugstack.conf"), "required\n").unwrap();
        let err = read_plugstack(&etc.join("plugstack.conf"), &[]).unwrap_err();
        assert!(
            matches!(err, PlugstackError::Syntax { line: 1, .. }),
            "{err}"
        );
        fs::write(etc.join("plugstack.conf"), "include plugstack.conf\n").unwrap();
        assert!(matches!(
            read_plugstack(&etc.join("plugstack.conf"), &[]),
            Err(PlugstackError::TooDeep(_))
        ));
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match(b"*.conf", b"ferry.conf"));
        assert!(!wildcard_match(b"*.conf", b"ferry.conf.dpkg-old"));
        assert!(wildcard_match(b"a?c*", b"abcdef"));
        assert!(!wildcard_match(b"a?c", b"ac"));
    }
}
