//! `.dockerignore`: which files of the build context `COPY`/`ADD` leave out, by docker's
//! rules. Each line is a pattern relative to the context (a leading `/` is dropped), `#`
//! starts a comment line, `!` makes an exception; the last matching line decides. `*`
//! matches within one path part, `?` one character of it, `**` any number of parts. A
//! pattern matching a directory leaves out everything under it.

use std::fs;
use std::io;
use std::path::Path;

/// The file's name, beside the context's files.
pub const FILE_NAME: &str = ".dockerignore";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    parts: Vec<String>,
    exception: bool,
}

/// The patterns of one `.dockerignore` (none: nothing is left out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ignore {
    patterns: Vec<Pattern>,
}

impl Ignore {
    /// The context's `.dockerignore`, or no patterns when it has none.
    pub fn load(context: &Path) -> io::Result<Ignore> {
        match fs::read_to_string(context.join(FILE_NAME)) {
            Ok(text) => Ok(Ignore::parse(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Ignore::default()),
            Err(e) => Err(e),
        }
    }

    pub fn parse(text: &str) -> Ignore {
        let mut patterns = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let line = line.trim();
            let (exception, body) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            // Cleaned as a path: no empty or `.` parts, `..` takes the part before it.
            let mut parts: Vec<String> = Vec::new();
            for part in body.split('/') {
                match part {
                    "" | "." => {}
                    ".." => {
                        parts.pop();
                    }
                    p => parts.push(p.to_string()),
                }
            }
            if parts.is_empty() {
                continue;
            }
            patterns.push(Pattern { parts, exception });
        }
        Ignore { patterns }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether an exception could bring back something under a left-out directory.
    pub fn has_exceptions(&self) -> bool {
        self.patterns.iter().any(|p| p.exception)
    }

    /// Whether `rel` (a path relative to the context) is left out.
    pub fn excludes(&self, rel: &Path) -> bool {
        let parts: Vec<String> = rel
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        if parts.is_empty() {
            return false;
        }
        let mut excluded = false;
        for p in &self.patterns {
            // The path itself or a directory above it.
            let hit = (1..=parts.len()).any(|n| match_parts(&p.parts, &parts[..n]));
            if hit {
                excluded = !p.exception;
            }
        }
        excluded
    }
}

fn match_parts(pattern: &[String], path: &[String]) -> bool {
    match pattern.first() {
        None => path.is_empty(),
        Some(p) if p == "**" => (0..=path.len()).any(|i| match_parts(&pattern[1..], &path[i..])),
        Some(p) => {
            !path.is_empty() && match_name(p, &path[0]) && match_parts(&pattern[1..], &path[1..])
        }
    }
}

/// One path part against one pattern part: `*`, `?`, `[…]` classes and `\` escapes (also
/// the wildcards of COPY's sources).
pub(super) fn match_name(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    fn at(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| at(&p[1..], &n[i..])),
            Some('?') => !n.is_empty() && at(&p[1..], &n[1..]),
            Some('[') => {
                let Some(close) = p.iter().skip(2).position(|&c| c == ']').map(|i| i + 2) else {
                    return n.first() == Some(&'[') && at(&p[1..], &n[1..]);
                };
                let Some(&c) = n.first() else {
                    return false;
                };
                let mut class = &p[1..close];
                let negate = matches!(class.first(), Some('^' | '!'));
                if negate {
                    class = &class[1..];
                }
                let mut found = false;
                let mut i = 0;
                while i < class.len() {
                    if i + 2 < class.len() && class[i + 1] == '-' {
                        found |= class[i] <= c && c <= class[i + 2];
                        i += 3;
                    } else {
                        found |= class[i] == c;
                        i += 1;
                    }
                }
                found != negate && at(&p[close + 1..], &n[1..])
            }
            Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && at(&p[2..], &n[1..]),
            Some(c) => n.first() == Some(c) && at(&p[1..], &n[1..]),
        }
    }
    at(&p, &n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ignore: &Ignore, path: &str) -> bool {
        ignore.excludes(Path::new(path))
    }

    #[test]
    fn matches_docker_patterns() {
        let i = Ignore::parse(
            "# a comment\n\
             \n\
             *.log\n\
             /build\n\
             docs/**/*.tmp\n\
             **/__pycache__\n\
             te?t.txt\n\
             file[0-9]\n",
        );
        assert!(ex(&i, "app.log"));
        // `*` stays within one part, as docker's patterns do.
        assert!(!ex(&i, "sub/app.log"));
        assert!(ex(&i, "build"));
        assert!(ex(&i, "build/out/x.o"));
        assert!(ex(&i, "docs/a.tmp"));
        assert!(ex(&i, "docs/a/b/c.tmp"));
        assert!(!ex(&i, "docs/a.md"));
        assert!(ex(&i, "__pycache__/m.pyc"));
        assert!(ex(&i, "src/pkg/__pycache__"));
        assert!(ex(&i, "test.txt"));
        assert!(!ex(&i, "teest.txt"));
        assert!(ex(&i, "file3"));
        assert!(!ex(&i, "filex"));
        assert!(!ex(&i, "src/main.rs"));
        assert!(!ex(&i, "# a comment"));
    }

    #[test]
    fn the_last_matching_line_decides() {
        let i = Ignore::parse("*.md\n!README.md\nREADME-secret.md\n");
        assert!(ex(&i, "CHANGES.md"));
        assert!(!ex(&i, "README.md"));
        assert!(ex(&i, "README-secret.md"));
        assert!(i.has_exceptions());
        let all = Ignore::parse("*\n!keep\n");
        assert!(ex(&all, "x"));
        assert!(!ex(&all, "keep"));
        assert!(!Ignore::parse("").has_exceptions());
        assert!(Ignore::parse("# only\n\n").is_empty());
    }

    #[test]
    fn patterns_are_cleaned_paths() {
        let i = Ignore::parse("./a/../b/\n  c  \n");
        assert!(ex(&i, "b"));
        assert!(ex(&i, "c/d"));
        assert!(!ex(&i, "a"));
    }
}
