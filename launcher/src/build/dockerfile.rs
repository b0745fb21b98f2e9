//! Dockerfile syntax: instructions with their line numbers, and the shell-like word rules
//! (quotes, `$VAR` substitution) the instructions other than `RUN` use.

use std::collections::BTreeMap;

/// A command as written: shell form (run by `SHELL`) or exec form (a JSON array).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Shell(String),
    Exec(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    From {
        image: String,
        stage: Option<String>,
    },
    Run(Command),
    Copy {
        /// `ADD`: local tar archives are unpacked.
        add: bool,
        /// `--from=STAGE`.
        from: Option<String>,
        sources: Vec<String>,
        dest: String,
    },
    Env(Vec<(String, String)>),
    Arg {
        name: String,
        default: Option<String>,
    },
    Workdir(String),
    Label(Vec<(String, String)>),
    Entrypoint(Command),
    Cmd(Command),
    User(String),
    Shell(Vec<String>),
    /// Accepted and not applied (EXPOSE, VOLUME, HEALTHCHECK, STOPSIGNAL, MAINTAINER).
    Ignored(String),
}

/// One instruction with where it stands and how it was written (for messages and the
/// cache key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub line: usize,
    pub text: String,
    pub instruction: Instruction,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct SyntaxError {
    pub line: usize,
    pub message: String,
}

pub(super) fn err(line: usize, message: impl Into<String>) -> SyntaxError {
    SyntaxError {
        line,
        message: message.into(),
    }
}

/// The logical lines of a Dockerfile: comments dropped, continuations joined, each with the
/// number of its first physical line.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        // Comment lines are dropped even inside a continued instruction, as docker does.
        if trimmed.starts_with('#') {
            continue;
        }
        if current.is_none() && trimmed.is_empty() {
            continue;
        }
        let body = raw.trim_end();
        let (piece, continues) = match body.strip_suffix('\\') {
            Some(p) => (p, true),
            None => (body, false),
        };
        let entry = current.get_or_insert_with(|| (i + 1, String::new()));
        if !entry.1.is_empty() && !piece.trim().is_empty() {
            entry.1.push(' ');
        }
        entry.1.push_str(piece.trim());
        if !continues {
            out.extend(current.take().filter(|(_, l)| !l.is_empty()));
        }
    }
    out.extend(current.filter(|(_, l)| !l.is_empty()));
    out
}

/// Parse a whole Dockerfile.
pub fn parse(text: &str) -> Result<Vec<Step>, SyntaxError> {
    let mut steps = Vec::new();
    for (line, logical) in logical_lines(text) {
        let (keyword, rest) = match logical.split_once(char::is_whitespace) {
            Some((k, r)) => (k, r.trim()),
            None => (logical.as_str(), ""),
        };
        let instruction = parse_instruction(line, &keyword.to_ascii_uppercase(), rest)?;
        steps.push(Step {
            line,
            text: logical.clone(),
            instruction,
        });
    }
    match steps
        .iter()
        .find(|s| !matches!(s.instruction, Instruction::Arg { .. }))
    {
        None => Err(err(1, "no FROM instruction")),
        Some(s) if !matches!(s.instruction, Instruction::From { .. }) => Err(err(
            s.line,
            "the first instruction must be FROM (only ARG may come before it)",
        )),
        Some(_) => Ok(steps),
    }
}

/// `--name=value` flags at the start of `rest`, and what follows them.
fn flags(rest: &str) -> (Vec<(String, String)>, &str) {
    let mut found = Vec::new();
    let mut rest = rest.trim_start();
    while let Some(after) = rest.strip_prefix("--") {
        let end = after.find(char::is_whitespace).unwrap_or(after.len());
        let flag = &after[..end];
        let (name, value) = flag.split_once('=').unwrap_or((flag, ""));
        found.push((name.to_string(), value.to_string()));
        rest = after[end..].trim_start();
    }
    (found, rest)
}

fn command(rest: &str) -> Command {
    if rest.starts_with('[') {
        if let Ok(argv) = serde_json::from_str::<Vec<String>>(rest) {
            return Command::Exec(argv);
        }
    }
    // Not valid JSON: docker runs it as a shell command too.
    Command::Shell(rest.to_string())
}

fn parse_instruction(line: usize, keyword: &str, rest: &str) -> Result<Instruction, SyntaxError> {
    let needs_argument = |what: &str| {
        if rest.is_empty() {
            Err(err(line, format!("{keyword} needs {what}")))
        } else {
            Ok(())
        }
    };
    Ok(match keyword {
        "FROM" => {
            let (flags, rest) = flags(rest);
            if let Some((name, _)) = flags.first() {
                return Err(err(line, format!("FROM --{name} is not supported yet")));
            }
            let words: Vec<&str> = rest.split_whitespace().collect();
            match words.as_slice() {
                [image] => Instruction::From {
                    image: image.to_string(),
                    stage: None,
                },
                [image, as_, stage] if as_.eq_ignore_ascii_case("as") => Instruction::From {
                    image: image.to_string(),
                    stage: Some(stage.to_ascii_lowercase()),
                },
                _ => return Err(err(line, "FROM takes IMAGE [AS NAME]")),
            }
        }
        "RUN" => {
            needs_argument("a command")?;
            let (flags, rest) = flags(rest);
            if let Some((name, _)) = flags.first() {
                return Err(err(line, format!("RUN --{name} is not supported yet")));
            }
            Instruction::Run(command(rest))
        }
        "COPY" | "ADD" => {
            let (flags, rest) = flags(rest);
            let mut from = None;
            for (name, value) in flags {
                match name.as_str() {
                    "from" if keyword == "COPY" => from = Some(value.to_ascii_lowercase()),
                    // One uid is mapped: everything is root's in the image anyway.
                    "chown" => {}
                    _ => {
                        return Err(err(
                            line,
                            format!("{keyword} --{name} is not supported yet"),
                        ))
                    }
                }
            }
            let mut words = if rest.starts_with('[') {
                serde_json::from_str::<Vec<String>>(rest)
                    .map_err(|e| err(line, format!("{keyword}: bad JSON array: {e}")))?
            } else {
                split_words(rest).map_err(|m| err(line, m))?
            };
            if words.len() < 2 {
                return Err(err(line, format!("{keyword} takes SOURCE... DEST")));
            }
            let dest = words.pop().unwrap_or_default();
            Instruction::Copy {
                add: keyword == "ADD",
                from,
                sources: words,
                dest,
            }
        }
        "ENV" => {
            needs_argument("NAME=VALUE")?;
            Instruction::Env(pairs(line, keyword, rest)?)
        }
        "LABEL" => {
            needs_argument("KEY=VALUE")?;
            Instruction::Label(pairs(line, keyword, rest)?)
        }
        "ARG" => {
            needs_argument("a name")?;
            let (name, default) = match rest.split_once('=') {
                Some((n, d)) => (n, Some(unquote(d).map_err(|m| err(line, m))?)),
                None => (rest, None),
            };
            if !crate::spec::env::is_valid_name(name) {
                return Err(err(line, format!("ARG: invalid name `{name}`")));
            }
            Instruction::Arg {
                name: name.to_string(),
                default,
            }
        }
        "WORKDIR" => {
            needs_argument("a directory")?;
            Instruction::Workdir(rest.to_string())
        }
        "ENTRYPOINT" => {
            needs_argument("a command")?;
            Instruction::Entrypoint(command(rest))
        }
        "CMD" => {
            needs_argument("a command")?;
            Instruction::Cmd(command(rest))
        }
        "USER" => {
            needs_argument("a user")?;
            Instruction::User(rest.to_string())
        }
        "SHELL" => match serde_json::from_str::<Vec<String>>(rest) {
            Ok(argv) if !argv.is_empty() => Instruction::Shell(argv),
            _ => {
                return Err(err(
                    line,
                    "SHELL takes a JSON array: SHELL [\"/bin/bash\", \"-c\"]",
                ))
            }
        },
        "EXPOSE" | "VOLUME" | "HEALTHCHECK" | "STOPSIGNAL" | "MAINTAINER" => {
            Instruction::Ignored(keyword.to_string())
        }
        "ONBUILD" => return Err(err(line, "ONBUILD is not supported yet")),
        _ => return Err(err(line, format!("unknown instruction `{keyword}`"))),
    })
}

/// `K=V K2="v 2"` (or the old `K V...` form with one pair).
pub(super) fn pairs(
    line: usize,
    keyword: &str,
    rest: &str,
) -> Result<Vec<(String, String)>, SyntaxError> {
    let words = split_words_raw(rest).map_err(|m| err(line, m))?;
    if !words.first().is_some_and(|w| w.contains('=')) {
        // Legacy `ENV NAME value with spaces`.
        let (name, value) = rest
            .split_once(char::is_whitespace)
            .ok_or_else(|| err(line, format!("{keyword} takes NAME=VALUE")))?;
        return Ok(vec![(name.to_string(), value.trim().to_string())]);
    }
    words
        .iter()
        .map(|w| {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| err(line, format!("{keyword}: `{w}` is not NAME=VALUE")))?;
            let key = unquote(k).map_err(|m| err(line, m))?;
            let value = unquote(v).map_err(|m| err(line, m))?;
            if keyword == "ENV" && !crate::spec::env::is_valid_name(&key) {
                return Err(err(line, format!("ENV: invalid name `{key}`")));
            }
            Ok((key, value))
        })
        .collect()
}

/// A word whose quote is never closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unterminated quote in `{0}`")]
pub struct UnterminatedQuote(pub String);

impl From<UnterminatedQuote> for String {
    fn from(e: UnterminatedQuote) -> String {
        e.to_string()
    }
}

/// Words separated by unquoted blanks, quotes still in them.
fn split_words_raw(text: &str) -> Result<Vec<String>, UnterminatedQuote> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut chars = text.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                continue;
            }
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (Some('\''), _) => {}
            (_, '\\') => {
                word.push('\\');
                if let Some(next) = chars.next() {
                    word.push(next);
                }
                in_word = true;
                continue;
            }
            _ => {}
        }
        word.push(c);
        in_word = true;
    }
    if quote.is_some() {
        return Err(UnterminatedQuote(text.to_string()));
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// One word with its quotes and backslashes taken out.
pub fn unquote(word: &str) -> Result<String, UnterminatedQuote> {
    let mut out = String::new();
    let mut quote = None;
    let mut chars = word.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => out.push(c),
            (_, '\\') => {
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            }
            (_, c) => out.push(c),
        }
    }
    if quote.is_some() {
        return Err(UnterminatedQuote(word.to_string()));
    }
    Ok(out)
}

/// Words separated by blanks, unquoted.
pub fn split_words(text: &str) -> Result<Vec<String>, UnterminatedQuote> {
    split_words_raw(text)?.iter().map(|w| unquote(w)).collect()
}

/// `$NAME`, `${NAME}`, `${NAME:-default}` and `${NAME:+alternative}` replaced from `vars`
/// (unset: empty), except inside single quotes; `\$` stays a `$`.
pub fn substitute(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let mut single = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            single = !single;
        }
        if c == '\\' && !single && chars.get(i + 1) == Some(&'$') {
            out.push_str("\\$");
            i += 2;
            continue;
        }
        if c != '$' || single {
            out.push(c);
            i += 1;
            continue;
        }
        if chars.get(i + 1) == Some(&'{') {
            let Some(close) = chars[i + 2..].iter().position(|&c| c == '}') else {
                out.push(c);
                i += 1;
                continue;
            };
            let inner: String = chars[i + 2..i + 2 + close].iter().collect();
            let value = match inner.split_once(":-") {
                Some((name, default)) => vars
                    .get(name)
                    .filter(|v| !v.is_empty())
                    .cloned()
                    .unwrap_or_else(|| default.to_string()),
                None => match inner.split_once(":+") {
                    Some((name, alt)) => {
                        if vars.get(name).is_some_and(|v| !v.is_empty()) {
                            alt.to_string()
                        } else {
                            String::new()
                        }
                    }
                    None => vars.get(&inner).cloned().unwrap_or_default(),
                },
            };
            out.push_str(&value);
            i += close + 3;
            continue;
        }
        let name: String = chars[i + 1..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
            .collect();
        if name.is_empty() {
            out.push(c);
            i += 1;
            continue;
        }
        out.push_str(vars.get(&name).map(String::as_str).unwrap_or(""));
        i += 1 + name.chars().count();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuations_and_comments_keep_first_line_numbers() {
        let text = "# syntax comment\nFROM debian\n\nRUN apt-get update && \\\n  # a comment inside\n    apt-get install -y file\nCMD [\"file\", \"--version\"]\n";
        let steps = parse(text).unwrap();
        assert_eq!(steps.len(), 3);
        assert_eq!(steps[1].line, 4);
        assert_eq!(
            steps[1].instruction,
            Instruction::Run(Command::Shell(
                "apt-get update && apt-get install -y file".into()
            ))
        );
        assert_eq!(
            steps[2].instruction,
            Instruction::Cmd(Command::Exec(vec!["file".into(), "--version".into()]))
        );
        assert_eq!(steps[2].line, 7);
    }

    #[test]
    fn from_with_stage_and_args_before() {
        let steps = parse("ARG V=1\nfrom busybox:${V} AS Build\n").unwrap();
        assert_eq!(
            steps[0].instruction,
            Instruction::Arg {
                name: "V".into(),
                default: Some("1".into())
            }
        );
        assert_eq!(
            steps[1].instruction,
            Instruction::From {
                image: "busybox:${V}".into(),
                stage: Some("build".into())
            }
        );
    }

    #[test]
    fn the_first_instruction_must_be_from() {
        let e = parse("RUN true\nFROM x\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("FROM"), "{e}");
        assert!(parse("# nothing\n").is_err());
    }

    #[test]
    fn env_forms() {
        let steps =
            parse("FROM x\nENV A=1 B=\"two words\" C=a\\ b\nENV OLD value with spaces\n").unwrap();
        assert_eq!(
            steps[1].instruction,
            Instruction::Env(vec![
                ("A".into(), "1".into()),
                ("B".into(), "two words".into()),
                ("C".into(), "a b".into()),
            ])
        );
        assert_eq!(
            steps[2].instruction,
            Instruction::Env(vec![("OLD".into(), "value with spaces".into())])
        );
    }

    #[test]
    fn copy_forms() {
        let steps =
            parse("FROM x\nCOPY --from=Build --chown=1:1 a b /dst/\nADD [\"x y\", \"/z\"]\n")
                .unwrap();
        assert_eq!(
            steps[1].instruction,
            Instruction::Copy {
                add: false,
                from: Some("build".into()),
                sources: vec!["a".into(), "b".into()],
                dest: "/dst/".into()
            }
        );
        assert_eq!(
            steps[2].instruction,
            Instruction::Copy {
                add: true,
                from: None,
                sources: vec!["x y".into()],
                dest: "/z".into()
            }
        );
        let e = parse("FROM x\nCOPY only\n").unwrap_err();
        assert_eq!(e.line, 2);
    }

    #[test]
    fn unknown_and_unsupported_instructions_name_their_line() {
        let e = parse("FROM x\n\nFROB y\n").unwrap_err();
        assert_eq!(e.to_string(), "line 3: unknown instruction `FROB`");
        let e = parse("FROM x\nRUN --mount=type=cache,target=/x true\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("not supported"), "{e}");
    }

    #[test]
    fn shell_and_ignored() {
        let steps = parse("FROM x\nSHELL [\"/bin/bash\", \"-c\"]\nEXPOSE 80\nRUN [\"a\", \"b\"]\n")
            .unwrap();
        assert_eq!(
            steps[1].instruction,
            Instruction::Shell(vec!["/bin/bash".into(), "-c".into()])
        );
        assert_eq!(steps[2].instruction, Instruction::Ignored("EXPOSE".into()));
        assert_eq!(
            steps[3].instruction,
            Instruction::Run(Command::Exec(vec!["a".into(), "b".into()]))
        );
        assert!(parse("FROM x\nSHELL /bin/bash\n").is_err());
    }

    #[test]
    fn substitution() {
        let vars: BTreeMap<String, String> =
            [("A".to_string(), "1".to_string()), ("E".into(), "".into())].into();
        assert_eq!(
            substitute("$A-${A}-${B:-d}-${A:+x}-${E:-e}", &vars),
            "1-1-d-x-e"
        );
        assert_eq!(substitute("'$A' \\$A $", &vars), "'$A' \\$A $");
    }
}
