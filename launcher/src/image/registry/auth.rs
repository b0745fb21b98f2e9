//! Registry authentication: `WWW-Authenticate` challenges and the user's stored credentials.
//!
//! Credentials come from, in this order:
//! 1. `$FERRY_CREDENTIALS_FILE`, else `~/.config/ferry/credentials`: netrc style, like
//!    enroot's `.credentials`: `machine HOST login USER password PASS`, one or more entries,
//!    whitespace anywhere. Values are taken literally (NGC's login is the literal `$oauthtoken`).
//! 2. Docker's `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`: the `auths` map,
//!    whose `auth` field is base64 of `USER:PASS`. Credential helpers (`credsStore`,
//!    `credHelpers`) are programs ferry does not run.
//!
//! Secrets never reach a log line or an error message: [`Credentials`] prints its password
//! as `***`.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;

/// A login for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub login: String,
    pub password: String,
    /// The file it came from, for messages.
    pub source: PathBuf,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("login", &self.login)
            .field("password", &"***")
            .field("source", &self.source)
            .finish()
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.login, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// Where credentials are looked up; see the module documentation for the order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialSources {
    /// netrc-style file (ferry's and enroot's format).
    pub netrc: Option<PathBuf>,
    /// Docker's config.json.
    pub docker_config: Option<PathBuf>,
}

impl CredentialSources {
    /// The standard places, from `FERRY_CREDENTIALS_FILE`, `DOCKER_CONFIG` and `HOME`.
    pub fn from_env() -> CredentialSources {
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from);
        let netrc = std::env::var_os("FERRY_CREDENTIALS_FILE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".config/ferry/credentials")));
        let docker_config = std::env::var_os("DOCKER_CONFIG")
            .filter(|v| !v.is_empty())
            .map(|d| PathBuf::from(d).join("config.json"))
            .or_else(|| home.as_ref().map(|h| h.join(".docker/config.json")));
        CredentialSources {
            netrc,
            docker_config,
        }
    }

    /// Where a user should put a login, for the "log in" hint.
    pub fn hint(&self) -> String {
        let netrc = self
            .netrc
            .as_ref()
            .map_or("~/.config/ferry/credentials".to_string(), |p| {
                p.display().to_string()
            });
        let docker = self
            .docker_config
            .as_ref()
            .map_or("~/.docker/config.json".to_string(), |p| {
                p.display().to_string()
            });
        format!("{netrc} or {docker}")
    }

    /// The login for `host`, picking `user` when the reference named one (`user@host`).
    /// A file that is missing is no error; one that cannot be parsed is.
    pub fn lookup(
        &self,
        host: &str,
        user: Option<&str>,
    ) -> Result<Option<Credentials>, CredentialError> {
        let names = host_aliases(host);
        if let Some(path) = &self.netrc {
            if let Some(text) = read_if_exists(path)? {
                let entries = parse_netrc(&text).map_err(|reason| CredentialError::Parse {
                    path: path.clone(),
                    reason,
                })?;
                if let Some(c) = pick(entries, &names, user, path) {
                    return Ok(Some(c));
                }
            }
        }
        if let Some(path) = &self.docker_config {
            if let Some(text) = read_if_exists(path)? {
                let entries =
                    parse_docker_config(&text).map_err(|reason| CredentialError::Parse {
                        path: path.clone(),
                        reason,
                    })?;
                if let Some(c) = pick(entries, &names, user, path) {
                    return Ok(Some(c));
                }
            }
        }
        Ok(None)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read credentials file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("bad credentials file {path}: {reason}")]
    Parse {
        path: PathBuf,
        reason: CredentialsFileProblem,
    },
}

/// What is wrong in the text of a netrc or Docker config file. Never holds a password.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsFileProblem {
    #[error("not UTF-8 text")]
    NotUtf8,
    #[error("machine {0}: needs both `login` and `password`")]
    NetrcIncomplete(String),
    #[error("`{0}` without a value")]
    NetrcNoValue(String),
    #[error("`{0}` before any `machine`")]
    NetrcNoMachine(String),
    #[error("unexpected word `{0}` (expected `machine HOST login USER password PASS`)")]
    NetrcUnexpected(String),
    #[error("not JSON ({0})")]
    NotJson(serde_json::Error),
    #[error("auths.{0}.auth is not base64 of USER:PASSWORD")]
    BadAuth(String),
}

fn read_if_exists(path: &Path) -> Result<Option<String>, CredentialError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            warn_if_readable_by_others(path);
            String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| CredentialError::Parse {
                    path: path.into(),
                    reason: CredentialsFileProblem::NotUtf8,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CredentialError::Read {
            path: path.into(),
            reason: e.to_string(),
        }),
    }
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o044 != 0 {
            tracing::warn!(
                "credentials file {} is readable by other users: chmod 600 it",
                path.display()
            );
        }
    }
}

/// Docker Hub answers under several names, and Docker's config keys it by its v1 URL.
fn host_aliases(host: &str) -> Vec<String> {
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => [
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "registry.hub.docker.com",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        _ => vec![host],
    }
}

struct Entry {
    machine: String,
    login: String,
    password: String,
}

fn pick(
    entries: Vec<Entry>,
    names: &[String],
    user: Option<&str>,
    path: &Path,
) -> Option<Credentials> {
    let mut matching = entries.into_iter().filter(|e| names.contains(&e.machine));
    let found = match user {
        Some(u) => matching.find(|e| e.login == u),
        None => matching.next(),
    }?;
    Some(Credentials {
        login: found.login,
        password: found.password,
        source: path.into(),
    })
}

/// netrc: a stream of whitespace-separated words; `machine` starts an entry, `login` and
/// `password` fill it; `default` and `macdef` are not meaningful for registries.
fn parse_netrc(text: &str) -> Result<Vec<Entry>, CredentialsFileProblem> {
    let mut entries = Vec::new();
    let mut words = text.split_whitespace();
    let mut current: Option<(String, Option<String>, Option<String>)> = None;
    let finish = |c: Option<(String, Option<String>, Option<String>)>,
                  entries: &mut Vec<Entry>|
     -> Result<(), CredentialsFileProblem> {
        if let Some((machine, login, password)) = c {
            match (login, password) {
                (Some(login), Some(password)) => entries.push(Entry {
                    machine: normalize_host(&machine),
                    login,
                    password,
                }),
                _ => return Err(CredentialsFileProblem::NetrcIncomplete(machine)),
            }
        }
        Ok(())
    };
    while let Some(word) = words.next() {
        let mut value = |key: &str| {
            words
                .next()
                .map(str::to_string)
                .ok_or_else(|| CredentialsFileProblem::NetrcNoValue(key.to_string()))
        };
        match word {
            "machine" => {
                let m = value("machine")?;
                finish(current.take(), &mut entries)?;
                current = Some((m, None, None));
            }
            "login" | "password" => {
                let v = value(word)?;
                let Some(c) = current.as_mut() else {
                    return Err(CredentialsFileProblem::NetrcNoMachine(word.to_string()));
                };
                if word == "login" {
                    c.1 = Some(v);
                } else {
                    c.2 = Some(v);
                }
            }
            other => {
                let shown: String = other.chars().take(20).collect();
                return Err(CredentialsFileProblem::NetrcUnexpected(shown));
            }
        }
    }
    finish(current, &mut entries)?;
    Ok(entries)
}

/// `https://index.docker.io/v1/` and `nvcr.io` both name a host.
fn normalize_host(key: &str) -> String {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    rest.split('/').next().unwrap_or("").to_ascii_lowercase()
}

fn parse_docker_config(text: &str) -> Result<Vec<Entry>, CredentialsFileProblem> {
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, Auth>,
    }
    #[derive(serde::Deserialize)]
    struct Auth {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let config: Config = serde_json::from_str(text).map_err(CredentialsFileProblem::NotJson)?;
    let mut entries = Vec::new();
    for (key, auth) in config.auths {
        let machine = normalize_host(&key);
        if let Some(encoded) = auth.auth.filter(|a| !a.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| CredentialsFileProblem::BadAuth(machine.clone()))?;
            let (login, password) = decoded
                .split_once(':')
                .ok_or_else(|| CredentialsFileProblem::BadAuth(machine.clone()))?;
            entries.push(Entry {
                machine,
                login: login.to_string(),
                password: password.to_string(),
            });
        } else if let (Some(login), Some(password)) = (auth.username, auth.password) {
            entries.push(Entry {
                machine,
                login,
                password,
            });
        }
    }
    Ok(entries)
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parse `WWW-Authenticate` values (RFC 7235: `scheme k=v, k="v, quoted", scheme2 …`).
/// Unknown schemes and broken parameters are skipped rather than refused: the registry's
/// 401 is reported either way.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out = Vec::new();
    let mut rest = header.trim();
    while !rest.is_empty() {
        let scheme_end = rest
            .find(|c: char| c.is_whitespace() || c == ',')
            .unwrap_or(rest.len());
        let scheme = rest[..scheme_end].to_ascii_lowercase();
        rest = rest[scheme_end..].trim_start_matches(|c: char| c.is_whitespace() || c == ',');
        let mut params: Vec<(String, String)> = Vec::new();
        // Parameters follow as long as the next word is `key=`.
        while let Some(eq) = rest.find('=') {
            let key = &rest[..eq];
            if key.is_empty() || key.contains(|c: char| c.is_whitespace() || c == ',') {
                break;
            }
            let after = &rest[eq + 1..];
            let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let mut end = quoted.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, &quoted[end.min(quoted.len())..])
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim().to_string(), &after[end..])
            };
            params.push((key.to_ascii_lowercase(), value));
            rest = remaining.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
        }
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        match scheme.as_str() {
            "bearer" => {
                if let Some(realm) = get("realm") {
                    out.push(Challenge::Bearer {
                        realm,
                        service: get("service"),
                        scope: get("scope"),
                    });
                }
            }
            "basic" => out.push(Challenge::Basic),
            _ => {}
        }
        if scheme.is_empty() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_with_quoted_commas() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        );
        assert_eq!(
            c,
            [Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull,push".into()),
            }]
        );
    }

    #[test]
    fn several_challenges_and_junk() {
        let c =
            parse_challenges(r#"Basic realm="Registry", Bearer realm=https://x/token, Negotiate"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], Challenge::Basic);
        assert!(
            matches!(&c[1], Challenge::Bearer { realm, service: None, .. } if realm == "https://x/token")
        );
        assert!(parse_challenges("").is_empty());
        assert!(parse_challenges("Bearer").is_empty());
        assert!(parse_challenges(r#"Bearer realm="unterminated"#).len() == 1);
        assert!(parse_challenges("=,=,\"").is_empty());
    }

    fn sources(dir: &Path, netrc: &str, docker: &str) -> CredentialSources {
        std::fs::write(dir.join("creds"), netrc).unwrap();
        std::fs::write(dir.join("config.json"), docker).unwrap();
        CredentialSources {
            netrc: Some(dir.join("creds")),
            docker_config: Some(dir.join("config.json")),
        }
    }

    #[test]
    fn netrc_then_docker_config_and_user_pick() {
        let dir = tempfile::tempdir().unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode("dockeruser:dockerpass");
        let s = sources(
            dir.path(),
            "machine nvcr.io login $oauthtoken password KEY1\nmachine nvcr.io\n  login alice\n  password pw2\n",
            &format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},"nvcr.io":{{"auth":"{auth}"}}}}}}"#),
        );
        let c = s.lookup("nvcr.io", None).unwrap().unwrap();
        assert_eq!(
            (c.login.as_str(), c.password.as_str()),
            ("$oauthtoken", "KEY1")
        );
        let c = s.lookup("NVCR.io", Some("alice")).unwrap().unwrap();
        assert_eq!(c.password, "pw2");
        // No netrc entry for that user: docker's config has one with another login only.
        assert_eq!(s.lookup("nvcr.io", Some("bob")).unwrap(), None);
        let c = s.lookup("registry-1.docker.io", None).unwrap().unwrap();
        assert_eq!(
            (c.login.as_str(), c.password.as_str()),
            ("dockeruser", "dockerpass")
        );
        assert!(c.source.ends_with("config.json"));
        assert_eq!(s.lookup("ghcr.io", None).unwrap(), None);
        assert!(!format!("{c:?}").contains("dockerpass"));
        assert_eq!(c.basic_header(), format!("Basic {auth}"));
    }

    #[test]
    fn missing_files_are_fine_broken_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let none = CredentialSources {
            netrc: Some(dir.path().join("nope")),
            docker_config: Some(dir.path().join("nope.json")),
        };
        assert_eq!(none.lookup("x.io", None).unwrap(), None);
        let s = sources(dir.path(), "machine x.io login a\n", "{}");
        let e = s.lookup("x.io", None).unwrap_err().to_string();
        assert!(e.contains("needs both"), "{e}");
        let s = sources(dir.path(), "host x.io", "{}");
        assert!(s
            .lookup("x.io", None)
            .unwrap_err()
            .to_string()
            .contains("unexpected word `host`"));
        let s = sources(dir.path(), "", r#"{"auths":{"x.io":{"auth":"!!"}}}"#);
        assert!(s.lookup("x.io", None).is_err());
        let s = sources(dir.path(), "", r#"{"credsStore":"desktop"}"#);
        assert_eq!(s.lookup("x.io", None).unwrap(), None);
    }
}
