//! HTTP against one registry: authentication, redirects, and retries with backoff.
//!
//! Redirects are followed here rather than by the HTTP client, because where a request may
//! carry the registry's `Authorization` header is a security decision: only to the
//! registry's own origin (scheme, host and port), never to the blob storage a registry
//! redirects to (an S3 or CDN URL carries its own signature, and a token sent there leaks).

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::Duration;

use ureq::http::Response;
use ureq::Body;

use super::auth::{parse_challenges, Challenge, Credentials};
use super::{ClientOptions, RegistryError, RemoteRef};

/// What one try came to when it did not succeed.
#[derive(Debug)]
pub(super) enum Attempt {
    /// Worth another try after a pause: connection trouble, 429, 5xx, a cut-off body.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// No point trying again.
    Fatal(RegistryError),
}

impl From<RegistryError> for Attempt {
    fn from(e: RegistryError) -> Attempt {
        Attempt::Fatal(e)
    }
}

pub(super) fn retry(reason: impl Into<String>) -> Attempt {
    Attempt::Retry {
        reason: reason.into(),
        after: None,
    }
}

/// The registry and repository a request is about.
pub(super) struct Target<'a> {
    pub reference: &'a RemoteRef,
    /// `https://host[:port]` (or `http://` for an insecure registry), lower case.
    pub origin: String,
    pub insecure: bool,
    /// The reference as the user wrote it, for messages.
    pub image: String,
    /// Further tries of a manifest request, where not the client's (a mirror's: passed
    /// over quickly).
    pub manifest_retries: Option<u32>,
}

impl<'a> Target<'a> {
    pub fn new(reference: &'a RemoteRef, insecure: bool) -> Target<'a> {
        let scheme = if insecure { "http" } else { "https" };
        Target {
            reference,
            origin: format!("{scheme}://{}", api_host(&reference.registry)).to_ascii_lowercase(),
            insecure,
            image: if reference.tag.is_none() && reference.digest.is_none() {
                format!("{}:latest", reference.short_name())
            } else {
                reference.short_name()
            },
            manifest_retries: None,
        }
    }

    /// Tokens are per repository, and per login: another user may see other things.
    fn auth_key(&self) -> String {
        format!(
            "{}/{} {}",
            self.origin,
            self.reference.repository,
            self.reference.user.as_deref().unwrap_or("")
        )
    }
}

/// Docker Hub's API lives on another name than the one in image references.
pub(super) fn api_host(registry: &str) -> &str {
    match registry {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    }
}

/// What a request fetches, for messages and for what a 404 means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fetch<'a> {
    Manifest(&'a str),
    Blob(&'a str),
}

#[derive(Clone)]
struct AuthState {
    header: String,
    /// Which login made this header, so that a later refusal can name it.
    login: Option<(String, std::path::PathBuf)>,
}

pub(super) struct Transport {
    /// For plain-http URLs; never verifies a certificate, so it is built without any.
    plain: ureq::Agent,
    /// For https URLs, made on first use: reading the system's CA store costs tens of
    /// milliseconds that a pull from an insecure site registry need not pay.
    tls: std::sync::OnceLock<ureq::Agent>,
    options: ClientOptions,
    /// `Authorization` values per registry and repository: registry tokens are scoped to
    /// one repository, and fetching one per request would double the requests.
    auth: Mutex<HashMap<String, AuthState>>,
}

const MAX_REDIRECTS: usize = 5;
/// Error bodies are read only this far: they are for a message, not for storing.
const MAX_ERROR_BODY: u64 = 16 * 1024;
const MAX_TOKEN_BODY: u64 = 1024 * 1024;
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

impl Transport {
    pub fn new(options: &ClientOptions) -> Result<Transport, RegistryError> {
        // A bad CA file should fail now, not at the first https request of some later pull.
        if let Some(path) = &options.ca_file {
            super::tls::read_ca_file(path)?;
        }
        Ok(Transport {
            plain: agent(options, ureq::tls::TlsConfig::default()),
            tls: std::sync::OnceLock::new(),
            options: options.clone(),
            auth: Mutex::new(HashMap::new()),
        })
    }

    /// Further tries after a failed one, as the client's options say.
    pub fn retries(&self) -> u32 {
        self.options.retries
    }

    fn agent(&self, url: &str) -> Result<&ureq::Agent, Attempt> {
        if url.starts_with("http://") {
            return Ok(&self.plain);
        }
        if let Some(a) = self.tls.get() {
            return Ok(a);
        }
        let tls = super::tls::config(self.options.ca_file.as_deref()).map_err(Attempt::Fatal)?;
        Ok(self.tls.get_or_init(|| agent(&self.options, tls)))
    }

    /// Runs `attempt` until it succeeds, fails for good, or the tries are used up; waits
    /// between tries, doubling the pause each time (or what the server's `Retry-After` says).
    pub fn with_retries<T>(
        &self,
        target: &Target,
        what: &str,
        retries: u32,
        mut attempt: impl FnMut() -> Result<T, Attempt>,
    ) -> Result<T, RegistryError> {
        let tries = retries.saturating_add(1);
        let mut delay = self.options.retry_delay;
        for n in 1..=tries {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry { reason, after }) => {
                    if n == tries {
                        return Err(RegistryError::GaveUp {
                            registry: target.reference.registry.clone(),
                            what: what.to_string(),
                            reason,
                            tries,
                        });
                    }
                    let pause = after.map_or(delay, |a| a.min(MAX_RETRY_AFTER));
                    tracing::warn!(
                        "registry {}: {what}: {reason}; trying again in {:.1} s ({n} of {tries} tries done)",
                        target.reference.registry,
                        pause.as_secs_f64()
                    );
                    std::thread::sleep(pause);
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
        unreachable!("the loop returns on its last try")
    }

    /// One GET of `path` (below `/v2/<repository>/`), authenticating when the registry asks
    /// and following redirects. Returns any 2xx response, and 416 when a range was asked
    /// for (the caller then starts over).
    pub fn get(
        &self,
        target: &Target,
        path: &str,
        accept: Option<&str>,
        range_from: u64,
        fetch: Fetch,
    ) -> Result<Response<Body>, Attempt> {
        let mut url = format!(
            "{}/v2/{}/{path}",
            target.origin, target.reference.repository
        );
        let mut authenticated = false;
        let mut hops = 0;
        loop {
            let own_origin = origin_of(&url).is_some_and(|o| o == target.origin);
            let mut request = self.agent(&url)?.get(&url);
            if own_origin {
                if let Some(state) = self.auth_state(target) {
                    request = request.header("Authorization", state.header);
                }
            }
            if let Some(a) = accept {
                request = request.header("Accept", a);
            }
            if range_from > 0 {
                request = request.header("Range", format!("bytes={range_from}-"));
            }
            let response = request.call().map_err(|e| classify(e, &url))?;
            let status = response.status().as_u16();
            match status {
                200..=299 => return Ok(response),
                416 if range_from > 0 => return Ok(response),
                301 | 302 | 303 | 307 | 308 => {
                    hops += 1;
                    if hops > MAX_REDIRECTS {
                        return Err(Attempt::Fatal(RegistryError::Http {
                            registry: target.reference.registry.clone(),
                            what: describe(fetch, target),
                            detail: format!("more than {MAX_REDIRECTS} redirects"),
                        }));
                    }
                    let location = header(&response, "location").ok_or_else(|| {
                        Attempt::Fatal(RegistryError::Http {
                            registry: target.reference.registry.clone(),
                            what: describe(fetch, target),
                            detail: format!("redirect ({status}) without a Location"),
                        })
                    })?;
                    let next = join_url(&url, &location).ok_or_else(|| {
                        Attempt::Fatal(RegistryError::Http {
                            registry: target.reference.registry.clone(),
                            what: describe(fetch, target),
                            detail: format!(
                                "redirect to a bad URL `{}`",
                                printable(&location, 100)
                            ),
                        })
                    })?;
                    if next.starts_with("http://") && !target.insecure {
                        return Err(Attempt::Fatal(RegistryError::Http {
                            registry: target.reference.registry.clone(),
                            what: describe(fetch, target),
                            detail: "redirect from https to plain http refused".into(),
                        }));
                    }
                    tracing::debug!("redirected to {}", origin_of(&next).unwrap_or_default());
                    url = next;
                }
                401 if own_origin && !authenticated => {
                    authenticated = true;
                    let challenges: Vec<String> = response
                        .headers()
                        .get_all("www-authenticate")
                        .iter()
                        .filter_map(|v| v.to_str().ok().map(str::to_string))
                        .collect();
                    self.authenticate(target, &challenges.join(", "))?;
                }
                401 | 403 if own_origin => return Err(Attempt::Fatal(self.refused(target))),
                // Blob storage refusing a signed URL usually means the signature expired
                // while we waited: asking the registry again gives a fresh one.
                401 | 403 => return Err(retry(format!("blob storage answered {status}"))),
                404 => {
                    let detail = error_detail(response);
                    return Err(Attempt::Fatal(match fetch {
                        Fetch::Manifest(_) => RegistryError::NotFound {
                            image: target.image.clone(),
                            detail,
                        },
                        Fetch::Blob(digest) => RegistryError::BlobNotFound {
                            registry: target.reference.registry.clone(),
                            image: target.image.clone(),
                            digest: digest.to_string(),
                        },
                    }));
                }
                408 | 429 | 500 | 502 | 503 | 504 => {
                    let after = header(&response, "retry-after")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let detail = error_detail(response);
                    return Err(Attempt::Retry {
                        reason: format!("server answered {status} {detail}")
                            .trim_end()
                            .to_string(),
                        after,
                    });
                }
                _ => {
                    let detail = error_detail(response);
                    return Err(Attempt::Fatal(RegistryError::Http {
                        registry: target.reference.registry.clone(),
                        what: describe(fetch, target),
                        detail: format!("answered {status} {detail}").trim_end().to_string(),
                    }));
                }
            }
        }
    }

    #[cfg(test)]
    pub fn authenticate_for_test(
        &self,
        target: &Target,
        challenge: &str,
    ) -> Result<(), RegistryError> {
        self.authenticate(target, challenge).map_err(|a| match a {
            Attempt::Fatal(e) => e,
            Attempt::Retry { reason, .. } => RegistryError::Http {
                registry: target.reference.registry.clone(),
                what: "authentication".into(),
                detail: reason,
            },
        })
    }

    fn auth_state(&self, target: &Target) -> Option<AuthState> {
        let map = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&target.auth_key()).cloned()
    }

    fn refused(&self, target: &Target) -> RegistryError {
        match self.auth_state(target).and_then(|s| s.login) {
            Some((login, source)) => RegistryError::CredentialsRejected {
                registry: target.reference.registry.clone(),
                repository: target.reference.repository.clone(),
                login,
                file: source,
            },
            None => RegistryError::LoginNeeded {
                registry: target.reference.registry.clone(),
                repository: target.reference.repository.clone(),
                hint: self.options.credentials.hint(),
            },
        }
    }

    fn credentials(&self, host: &str, user: Option<&str>) -> Result<Option<Credentials>, Attempt> {
        self.options
            .credentials
            .lookup(host, user)
            .map_err(|e| Attempt::Fatal(RegistryError::Credentials(e)))
    }

    /// Answer a 401: fetch a bearer token, or use Basic auth, as the challenge asks.
    fn authenticate(&self, target: &Target, challenge_header: &str) -> Result<(), Attempt> {
        let registry = &target.reference.registry;
        let user = target.reference.user.as_deref();
        let challenges = parse_challenges(challenge_header);
        let mut creds = self.credentials(registry, user)?;
        if creds.is_none() && user.is_some() {
            tracing::warn!(
                "no credentials for user {} on {registry} in {}",
                user.unwrap_or_default(),
                self.options.credentials.hint()
            );
        }
        let bearer = challenges.iter().find_map(|c| match c {
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => Some((realm, service, scope)),
            Challenge::Basic => None,
        });
        let state = if let Some((realm, service, scope)) = bearer {
            let realm_origin = origin_of(realm).ok_or_else(|| {
                Attempt::Fatal(RegistryError::Http {
                    registry: registry.clone(),
                    what: "authentication".into(),
                    detail: format!("token server `{}` is not a URL", printable(realm, 100)),
                })
            })?;
            if realm_origin.starts_with("http://") && !target.insecure {
                return Err(Attempt::Fatal(RegistryError::InsecureRealm {
                    registry: registry.clone(),
                    realm: realm_origin,
                }));
            }
            if creds.is_none() {
                // enroot's credentials name the token server for Docker Hub (auth.docker.io).
                let realm_host = realm_origin
                    .split("://")
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                creds = self.credentials(&realm_host, user)?;
            }
            let scope = scope
                .clone()
                .unwrap_or_else(|| format!("repository:{}:pull", target.reference.repository));
            let token =
                self.fetch_token(target, realm, service.as_deref(), &scope, creds.as_ref())?;
            AuthState {
                header: format!("Bearer {token}"),
                login: creds.map(|c| (c.login, c.source)),
            }
        } else if challenges.contains(&Challenge::Basic) {
            match creds {
                Some(c) => AuthState {
                    header: c.basic_header(),
                    login: Some((c.login, c.source)),
                },
                None => return Err(Attempt::Fatal(self.refused(target))),
            }
        } else {
            return Err(Attempt::Fatal(self.refused(target)));
        };
        let mut map = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(target.auth_key(), state);
        Ok(())
    }

    fn fetch_token(
        &self,
        target: &Target,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        creds: Option<&Credentials>,
    ) -> Result<String, Attempt> {
        let registry = &target.reference.registry;
        let mut request = self.agent(realm)?.get(realm).query("scope", scope);
        if let Some(s) = service {
            request = request.query("service", s);
        }
        if let Some(c) = creds {
            request = request
                .query("account", &c.login)
                .header("Authorization", c.basic_header());
        }
        let response = request.call().map_err(|e| classify(e, realm))?;
        let status = response.status().as_u16();
        match status {
            200 => {}
            401 | 403 => {
                return Err(Attempt::Fatal(match creds {
                    Some(c) => RegistryError::CredentialsRejected {
                        registry: registry.clone(),
                        repository: target.reference.repository.clone(),
                        login: c.login.clone(),
                        file: c.source.clone(),
                    },
                    None => RegistryError::LoginNeeded {
                        registry: registry.clone(),
                        repository: target.reference.repository.clone(),
                        hint: self.options.credentials.hint(),
                    },
                }))
            }
            408 | 429 | 500..=599 => return Err(retry(format!("token server answered {status}"))),
            _ => {
                return Err(Attempt::Fatal(RegistryError::Http {
                    registry: registry.clone(),
                    what: "a token".into(),
                    detail: format!("token server answered {status} {}", error_detail(response))
                        .trim_end()
                        .to_string(),
                }))
            }
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = response
            .into_body()
            .into_with_config()
            .limit(MAX_TOKEN_BODY)
            .read_to_vec()
            .map_err(|e| retry(format!("reading the token: {e}")))?;
        let parsed: Token = serde_json::from_slice(&body).map_err(|_| {
            Attempt::Fatal(RegistryError::Http {
                registry: registry.clone(),
                what: "a token".into(),
                detail: "the token server's answer is not JSON".into(),
            })
        })?;
        parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| {
                Attempt::Fatal(RegistryError::Http {
                    registry: registry.clone(),
                    what: "a token".into(),
                    detail: "the token server sent no usable token".into(),
                })
            })
    }
}

fn agent(options: &ClientOptions, tls: ureq::tls::TlsConfig) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent(options.user_agent.as_str())
        // Blobs must arrive byte for byte as the digest says: no transfer decoding.
        .accept_encoding("")
        .timeout_connect(Some(options.connect_timeout))
        .timeout_per_read(Some(options.read_timeout))
        .tls_config(tls)
        .max_idle_connections_per_host(options.parallel.max(1) + 1)
        .build()
        .new_agent()
}

pub(super) fn describe(fetch: Fetch, target: &Target) -> String {
    match fetch {
        Fetch::Manifest(r) => format!("manifest {r} of {}", target.reference.repository),
        Fetch::Blob(d) => format!("blob {d} of {}", target.reference.repository),
    }
}

pub(super) fn header(response: &Response<Body>, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Sort a client error into "try again" and "give up".
fn classify(e: ureq::Error, url: &str) -> Attempt {
    let host = origin_of(url)
        .and_then(|o| o.split("://").nth(1).map(str::to_string))
        .unwrap_or_else(|| printable(url, 80));
    match e {
        ureq::Error::HostNotFound => Attempt::Fatal(RegistryError::UnknownHost { host }),
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_) => {
            Attempt::Fatal(RegistryError::Tls {
                host,
                reason: e.to_string(),
            })
        }
        ureq::Error::Io(io) => classify_io(io, host),
        ureq::Error::BadUri(_) | ureq::Error::Http(_) => Attempt::Fatal(RegistryError::Http {
            registry: host,
            what: "a request".into(),
            detail: e.to_string(),
        }),
        ureq::Error::Timeout(which) => retry(format!(
            "{host}: timed out ({which}; FERRY_REGISTRY_TIMEOUT=SECONDS allows longer)"
        )),
        // Refused or reset connections, garbled responses: all can pass.
        other => retry(format!("{host}: {other}")),
    }
}

/// The client reports name lookups and TLS failures as I/O errors too; tell them apart
/// from a connection that merely broke.
fn classify_io(io: std::io::Error, host: String) -> Attempt {
    if let Some(tls) = io
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return Attempt::Fatal(RegistryError::Tls {
            host,
            reason: tls.to_string(),
        });
    }
    let text = io.to_string();
    // The C library's words (getaddrinfo), as the standard library passes them on: a name
    // that does not exist is final, a resolver that did not answer is not.
    if text.contains("failed to lookup address information") && !text.contains("Temporary failure")
    {
        return Attempt::Fatal(RegistryError::UnknownHost { host });
    }
    retry(format!("{host}: {text}"))
}

/// `scheme://host[:port]` of an absolute http(s) URL, lower case.
pub(super) fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    Some(format!("{scheme}://{}", authority.to_ascii_lowercase()))
}

/// Resolve a `Location` against the URL that answered with it.
fn join_url(base: &str, location: &str) -> Option<String> {
    let location = location.trim();
    if location.contains("://") {
        origin_of(location)?;
        return Some(location.to_string());
    }
    let origin = origin_of(base)?;
    if let Some(rest) = location.strip_prefix("//") {
        let scheme = origin.split("://").next()?;
        let joined = format!("{scheme}://{rest}");
        origin_of(&joined)?;
        return Some(joined);
    }
    if location.starts_with('/') {
        return Some(format!("{origin}{location}"));
    }
    let path = &base[origin.len()..];
    let path = path.split(['?', '#']).next().unwrap_or("");
    let dir = path.rfind('/').map_or("/", |i| &path[..=i]);
    Some(format!("{origin}{dir}{location}"))
}

/// The registry's explanation from an error body: `CODE: message` of the distribution
/// spec's `{"errors":[…]}`, else the start of the text, on one line.
fn error_detail(response: Response<Body>) -> String {
    let mut bytes = Vec::new();
    let _ = response
        .into_body()
        .into_reader()
        .take(MAX_ERROR_BODY)
        .read_to_end(&mut bytes);
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    let text = match serde_json::from_slice::<Errors>(&bytes) {
        Ok(e) => e
            .errors
            .iter()
            .map(|e| match (&e.code, &e.message) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.clone(),
                (None, Some(m)) => m.clone(),
                (None, None) => String::new(),
            })
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    };
    let text = printable(text.trim(), 200);
    if text.is_empty() {
        text
    } else {
        format!("({text})")
    }
}

/// Text from the network, safe for a one-line message: no control characters, bounded.
pub(super) fn printable(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_joins() {
        assert_eq!(
            origin_of("https://Reg.io:5000/v2/x").as_deref(),
            Some("https://reg.io:5000")
        );
        assert_eq!(origin_of("ftp://x/y"), None);
        assert_eq!(origin_of("https://user@evil/"), None);
        assert_eq!(origin_of("https:///x"), None);
        let base = "https://r.io/v2/a/blobs/sha256:1?x=1";
        assert_eq!(join_url(base, "/b/c").as_deref(), Some("https://r.io/b/c"));
        assert_eq!(
            join_url(base, "c?d").as_deref(),
            Some("https://r.io/v2/a/blobs/c?d")
        );
        assert_eq!(
            join_url(base, "https://s3.x/o?sig=1").as_deref(),
            Some("https://s3.x/o?sig=1")
        );
        assert_eq!(
            join_url(base, "//cdn.x/o").as_deref(),
            Some("https://cdn.x/o")
        );
        assert_eq!(join_url(base, "javascript://x"), None);
        assert_eq!(api_host("docker.io"), "registry-1.docker.io");
        assert_eq!(api_host("nvcr.io"), "nvcr.io");
    }

    #[test]
    fn printable_strips_controls() {
        assert_eq!(printable("a\nb\x1b[31m", 100), "a b [31m");
        assert_eq!(printable("abcdef", 3), "abc…");
    }
}
