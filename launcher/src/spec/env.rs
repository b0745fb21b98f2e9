//! Container environments: the image's variables, and how they combine with the caller's.

/// Parse an `/etc/environment`-style file (enroot keeps an image's environment there):
/// `NAME=VALUE` lines, optionally prefixed with `export`, values optionally quoted.
/// Comments, blank lines and lines that are not assignments are skipped.
pub fn parse_environment_file(text: &str) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line
            .strip_prefix("export ")
            .map(str::trim_start)
            .unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        if !is_valid_name(name) {
            continue;
        }
        set(&mut vars, name, unquote(value));
    }
    vars
}

fn unquote(value: &str) -> String {
    let v = value.trim();
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return v[1..v.len() - 1].to_string();
        }
    }
    v.to_string()
}

/// A portable environment variable name: letters, digits and `_`, not starting with a digit.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Set `name` in `vars`, replacing an earlier value in place.
pub fn set(vars: &mut Vec<(String, String)>, name: &str, value: String) {
    match vars.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = value,
        None => vars.push((name.to_string(), value)),
    }
}

/// The environment a command starts with: the caller's, then the image's values over it
/// (PATH included, so the image's programs are found), then the ones asked for explicitly.
pub fn compose(
    caller: impl IntoIterator<Item = (String, String)>,
    image: &[(String, String)],
    explicit: &[(String, String)],
) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = caller.into_iter().collect();
    for (name, value) in image.iter().chain(explicit) {
        set(&mut vars, name, value.clone());
    }
    vars
}

/// An `--env` argument that sets nothing.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("invalid environment variable name `{name}` in `{arg}`: use NAME=VALUE")]
    InvalidName { name: String, arg: String },
    #[error("`--env {0}` names a variable that is not set: use NAME=VALUE")]
    NotSet(String),
}

/// Parse `NAME=VALUE` as given to `--env`; a bare `NAME` takes the caller's value.
pub fn parse_assignment(
    arg: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(String, String), EnvError> {
    let (name, value) = match arg.split_once('=') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (arg, None),
    };
    if !is_valid_name(name) {
        return Err(EnvError::InvalidName {
            name: name.to_string(),
            arg: arg.to_string(),
        });
    }
    let value = match value {
        Some(v) => v,
        None => lookup(name).ok_or_else(|| EnvError::NotSet(name.to_string()))?,
    };
    Ok((name.to_string(), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn environment_file_forms() {
        let text = "# comment\nPATH=/bin:/usr/bin\nexport A=\"x y\"\nB='z'\n\nnot an assignment\n1BAD=x\nA=again\n";
        assert_eq!(
            parse_environment_file(text),
            pairs(&[("PATH", "/bin:/usr/bin"), ("A", "again"), ("B", "z")])
        );
    }

    #[test]
    fn compose_order() {
        let caller = pairs(&[("PATH", "/host"), ("HOME", "/home/a"), ("X", "caller")]);
        let image = pairs(&[("PATH", "/image"), ("X", "image")]);
        let explicit = pairs(&[("X", "explicit")]);
        let env = compose(caller, &image, &explicit);
        assert_eq!(
            env,
            pairs(&[("PATH", "/image"), ("HOME", "/home/a"), ("X", "explicit")])
        );
    }

    #[test]
    fn assignments() {
        assert_eq!(
            parse_assignment("A=1", |_| None),
            Ok(("A".into(), "1".into()))
        );
        assert_eq!(
            parse_assignment("A=", |_| None),
            Ok(("A".into(), "".into()))
        );
        assert_eq!(
            parse_assignment("A", |_| Some("h".into())),
            Ok(("A".into(), "h".into()))
        );
        assert_eq!(
            parse_assignment("A", |_| None).unwrap_err().to_string(),
            "`--env A` names a variable that is not set: use NAME=VALUE"
        );
        assert_eq!(
            parse_assignment("1A=2", |_| None).unwrap_err().to_string(),
            "invalid environment variable name `1A` in `1A=2`: use NAME=VALUE"
        );
    }
}
