//! Apptainer/Singularity definition files, translated into the steps a Dockerfile makes,
//! so the build, its cache and its progress lines are the same for both.
//!
//! Header: `Bootstrap: docker` (`From:` a registry name), `localimage` (`From:` a path,
//! relative to the build context) or `scratch`. Sections, applied in this order whatever
//! their order in the file: `%files` (each `SRC [DST]` line a COPY from the context; no
//! DST: the same path, absolute), `%post` (one RUN with `/bin/sh -e`, or the shell of
//! `%post -c SHELL`), `%environment` (its `NAME=VALUE` and `export NAME=VALUE` lines
//! become the image's environment), `%runscript` (the image's Cmd: `/bin/sh -c SCRIPT`),
//! `%labels` (`KEY VALUE` lines, LABEL), `%help` (the label `help`).

use std::path::Path;

use super::dockerfile::{self, err, Command, Instruction, Step, SyntaxError};

/// The label `%help` is kept in.
pub const HELP_LABEL: &str = "help";

/// Whether the file is a definition file: a `.def` name or a `Bootstrap:` header first.
pub fn is_definition(path: &Path, text: &str) -> bool {
    if path.extension().is_some_and(|e| e == "def") {
        return true;
    }
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .is_some_and(|l| l.to_ascii_lowercase().starts_with("bootstrap:"))
}

struct Section {
    name: String,
    args: String,
    line: usize,
    /// The lines after the header, each with its number.
    body: Vec<(usize, String)>,
}

impl Section {
    fn script(&self) -> String {
        let lines: Vec<&str> = self.body.iter().map(|(_, l)| l.as_str()).collect();
        lines.join("\n").trim().to_string()
    }

    /// Its lines that are not blank or comments, trimmed.
    fn entries(&self) -> impl Iterator<Item = (usize, &str)> {
        self.body
            .iter()
            .map(|(n, l)| (*n, l.trim()))
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
    }
}

/// Parse a whole definition file into build steps.
pub fn parse(text: &str) -> Result<Vec<Step>, SyntaxError> {
    let mut bootstrap: Option<(usize, String)> = None;
    let mut from: Option<(usize, String)> = None;
    let mut sections: Vec<Section> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if let Some(header) = raw.strip_prefix('%') {
            let header = header.trim();
            let (name, args) = header
                .split_once(char::is_whitespace)
                .map_or((header, ""), |(n, a)| (n, a.trim()));
            sections.push(Section {
                name: name.to_ascii_lowercase(),
                args: args.to_string(),
                line,
                body: Vec::new(),
            });
            continue;
        }
        if let Some(section) = sections.last_mut() {
            section.body.push((line, raw.to_string()));
            continue;
        }
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (key, value) = trimmed.split_once(':').ok_or_else(|| {
            err(
                line,
                format!("`{trimmed}` is not a `Key: value` header line"),
            )
        })?;
        let value = value.trim().to_string();
        match key.trim().to_ascii_lowercase().as_str() {
            "bootstrap" => bootstrap = Some((line, value)),
            "from" => from = Some((line, value)),
            other => {
                return Err(err(
                    line,
                    format!(
                        "the header `{other}` is not supported; ferry reads Bootstrap and From"
                    ),
                ))
            }
        }
    }
    let (line, agent) = bootstrap.ok_or_else(|| err(1, "no `Bootstrap:` header"))?;
    let from_value = || {
        from.clone()
            .filter(|(_, v)| !v.is_empty())
            .ok_or_else(|| err(line, format!("Bootstrap: {agent} needs a `From:` header")))
    };
    let (from_line, image) = match agent.to_ascii_lowercase().as_str() {
        "docker" => {
            let (l, v) = from_value()?;
            let name = if v.starts_with("docker://") {
                v
            } else {
                format!("docker://{v}")
            };
            (l, name)
        }
        "localimage" => from_value()?,
        "scratch" => (line, "scratch".to_string()),
        other => {
            return Err(err(
                line,
                format!(
                    "Bootstrap: {other} is not supported; use docker, localimage or scratch \
                     (e.g. build the base with apptainer and name it with localimage)"
                ),
            ))
        }
    };
    let mut steps = vec![Step {
        line: from_line,
        text: format!("Bootstrap: {agent} From: {image}"),
        instruction: Instruction::From { image, stage: None },
    }];
    let known = [
        "files",
        "post",
        "environment",
        "runscript",
        "labels",
        "help",
    ];
    for s in &sections {
        if !known.contains(&s.name.as_str()) {
            return Err(err(
                s.line,
                format!(
                    "the section %{} is not supported; ferry builds %files, %post, \
                     %environment, %runscript, %labels and %help",
                    s.name
                ),
            ));
        }
        if !s.args.is_empty() && s.name != "post" {
            return Err(err(
                s.line,
                format!("%{} takes no arguments (`{}`)", s.name, s.args),
            ));
        }
    }
    let of = |name: &'static str| sections.iter().filter(move |s| s.name == name);
    for s in of("files") {
        for (line, entry) in s.entries() {
            let words = dockerfile::split_words(entry).map_err(|m| err(line, m))?;
            let (source, dest) = match words.as_slice() {
                [src] => (src.clone(), format!("/{}", src.trim_start_matches("./"))),
                [src, dst] => (src.clone(), dst.clone()),
                _ => {
                    return Err(err(
                        line,
                        format!("%files: `{entry}` is not `SOURCE [DESTINATION]`"),
                    ))
                }
            };
            steps.push(Step {
                line,
                text: format!("%files {entry}"),
                instruction: Instruction::Copy {
                    add: false,
                    from: None,
                    sources: vec![source],
                    dest,
                },
            });
        }
    }
    for s in of("post") {
        let shell = match dockerfile::split_words(&s.args)
            .map_err(|m| err(s.line, m))?
            .as_slice()
        {
            [] => vec!["/bin/sh".to_string(), "-e".to_string()],
            [flag, shell] if flag == "-c" => vec![shell.clone()],
            _ => {
                return Err(err(
                    s.line,
                    format!("%post takes only `-c SHELL` (`{}`)", s.args),
                ))
            }
        };
        let script = s.script();
        if script.is_empty() {
            continue;
        }
        let argv = shell
            .into_iter()
            .chain(["-c".to_string(), script.clone()])
            .collect();
        steps.push(Step {
            line: s.line,
            text: format!("%post {script}"),
            instruction: Instruction::Run(Command::Exec(argv)),
        });
    }
    for s in of("environment") {
        let mut pairs = Vec::new();
        for (line, entry) in s.entries() {
            let assignment = entry.strip_prefix("export ").map_or(entry, str::trim);
            if !assignment.contains('=') {
                // `export NAME` of a name set before: nothing to record.
                if dockerfile::split_words(assignment)
                    .map_err(|m| err(line, m))?
                    .iter()
                    .all(|n| crate::spec::env::is_valid_name(n))
                {
                    continue;
                }
            }
            let found = dockerfile::pairs(line, "ENV", assignment).map_err(|e| {
                err(
                    e.line,
                    format!(
                        "%environment: {}; only `NAME=VALUE` and `export NAME=VALUE` lines \
                         are supported",
                        e.message
                    ),
                )
            })?;
            if !assignment
                .split_whitespace()
                .next()
                .is_some_and(|w| w.contains('='))
            {
                return Err(err(
                    line,
                    format!(
                        "%environment: `{entry}` is not an assignment; only `NAME=VALUE` and \
                         `export NAME=VALUE` lines are supported"
                    ),
                ));
            }
            pairs.extend(found);
        }
        if !pairs.is_empty() {
            steps.push(Step {
                line: s.line,
                text: format!("%environment {}", s.script()),
                instruction: Instruction::Env(pairs),
            });
        }
    }
    for s in of("runscript") {
        let script = s.script();
        if script.is_empty() {
            continue;
        }
        steps.push(Step {
            line: s.line,
            text: format!("%runscript {script}"),
            instruction: Instruction::Cmd(Command::Exec(vec![
                "/bin/sh".into(),
                "-c".into(),
                script,
            ])),
        });
    }
    for s in of("labels") {
        let mut labels = Vec::new();
        for (line, entry) in s.entries() {
            let (key, value) = entry
                .split_once(char::is_whitespace)
                .map_or((entry, ""), |(k, v)| (k, v.trim()));
            if key.is_empty() {
                return Err(err(line, "%labels: a line needs `KEY VALUE`"));
            }
            labels.push((key.to_string(), value.to_string()));
        }
        if !labels.is_empty() {
            steps.push(Step {
                line: s.line,
                text: format!("%labels {}", s.script()),
                instruction: Instruction::Label(labels),
            });
        }
    }
    for s in of("help") {
        let help = s.script();
        if help.is_empty() {
            continue;
        }
        steps.push(Step {
            line: s.line,
            text: format!("%help {help}"),
            instruction: Instruction::Label(vec![(HELP_LABEL.to_string(), help)]),
        });
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEF: &str = "\
# a comment
Bootstrap: localimage
From: ../base.sqsh

%help
    Says hello.

%post
    echo built > /built.txt
    mkdir -p /opt/app

%environment
    export APP_MODE=production
    GREETING=\"hello there\"
    export PATH=/opt/app:$PATH
    export APP_MODE

%files
    data.txt /opt/app/data.txt
    ./conf.ini

%runscript
    echo \"$GREETING\"
    cat /opt/app/data.txt

%labels
    Author someone@example.org
    Version 1.2
";

    #[test]
    fn detects_definition_files() {
        assert!(is_definition(Path::new("x/app.def"), ""));
        assert!(is_definition(
            Path::new("Singularity"),
            "\n# c\nBootStrap: docker\nFrom: x\n"
        ));
        assert!(!is_definition(Path::new("Dockerfile"), "FROM debian\n"));
    }

    #[test]
    fn translates_sections_into_steps_in_apptainer_order() {
        let steps = parse(DEF).unwrap();
        let instructions: Vec<&Instruction> = steps.iter().map(|s| &s.instruction).collect();
        assert_eq!(
            instructions[0],
            &Instruction::From {
                image: "../base.sqsh".into(),
                stage: None
            }
        );
        assert_eq!(steps[0].line, 3);
        assert_eq!(
            instructions[1],
            &Instruction::Copy {
                add: false,
                from: None,
                sources: vec!["data.txt".into()],
                dest: "/opt/app/data.txt".into()
            }
        );
        assert_eq!(steps[1].line, 19);
        assert_eq!(
            instructions[2],
            &Instruction::Copy {
                add: false,
                from: None,
                sources: vec!["./conf.ini".into()],
                dest: "/conf.ini".into()
            }
        );
        assert_eq!(
            instructions[3],
            &Instruction::Run(Command::Exec(vec![
                "/bin/sh".into(),
                "-e".into(),
                "-c".into(),
                "echo built > /built.txt\n    mkdir -p /opt/app".into()
            ]))
        );
        assert_eq!(
            instructions[4],
            &Instruction::Env(vec![
                ("APP_MODE".into(), "production".into()),
                ("GREETING".into(), "hello there".into()),
                ("PATH".into(), "/opt/app:$PATH".into()),
            ])
        );
        assert_eq!(
            instructions[5],
            &Instruction::Cmd(Command::Exec(vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo \"$GREETING\"\n    cat /opt/app/data.txt".into()
            ]))
        );
        assert_eq!(
            instructions[6],
            &Instruction::Label(vec![
                ("Author".into(), "someone@example.org".into()),
                ("Version".into(), "1.2".into()),
            ])
        );
        assert_eq!(
            instructions[7],
            &Instruction::Label(vec![(HELP_LABEL.into(), "Says hello.".into())])
        );
        assert_eq!(steps.len(), 8);
    }

    #[test]
    fn docker_bootstrap_names_a_registry_image() {
        let steps =
            parse("Bootstrap: docker\nFrom: debian:12\n%post -c /bin/bash\n  true\n").unwrap();
        assert_eq!(
            steps[0].instruction,
            Instruction::From {
                image: "docker://debian:12".into(),
                stage: None
            }
        );
        assert_eq!(
            steps[1].instruction,
            Instruction::Run(Command::Exec(vec![
                "/bin/bash".into(),
                "-c".into(),
                "true".into()
            ]))
        );
    }

    #[test]
    fn rejects_what_it_cannot_build_with_the_line() {
        let e = parse("Bootstrap: library\nFrom: alpine\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("Bootstrap: library is not supported"));
        let e = parse("Bootstrap: docker\n").unwrap_err();
        assert!(e.message.contains("needs a `From:`"), "{}", e.message);
        let e = parse("Bootstrap: docker\nFrom: x\n%setup\n  touch a\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("%setup is not supported"));
        let e = parse("Bootstrap: docker\nFrom: x\n%environment\n  source /x\n").unwrap_err();
        assert_eq!(e.line, 4);
        assert!(e.message.contains("%environment"), "{}", e.message);
        let e = parse("Bootstrap: docker\nFrom: x\n%files\n  a b c\n").unwrap_err();
        assert_eq!(e.line, 4);
        let e = parse("From: x\n").unwrap_err();
        assert!(e.message.contains("no `Bootstrap:`"));
        let e = parse("Bootstrap: docker\nStage: one\n").unwrap_err();
        assert!(e.message.contains("`stage` is not supported"));
    }
}
