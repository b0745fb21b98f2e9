//! Image references: the one grammar `ferry run`, `ferry import` and the plugin's
//! `--container` share.
//!
//! ```text
//! PATH                                   an existing squashfs (.sqsh, by magic), SIF file,
//!                                        root filesystem directory, OCI layout directory,
//!                                        or OCI / docker-save tar archive
//! docker://[REGISTRY/]REPO[:TAG][@sha256:HEX]    registry image, Docker Hub by default
//! docker://[USER@][REGISTRY#]REPO[:TAG]          enroot's spelling of the same
//! oci:DIR[:TAG|@sha256:HEX]              OCI image layout directory
//! oci-archive:FILE[:TAG|@sha256:HEX]     tar of an OCI image layout
//! docker-archive:FILE[:NAME:TAG]         `docker save` output
//! REPO[:TAG]                             bare name, as pyxis accepts it: a registry image
//! ```
//!
//! A path that exists always wins, so a local file is never sent to a registry; a string
//! that only looks like a path (`./x`, `/x`, `x.sqsh`) and does not exist is reported as a
//! missing file rather than tried as a registry name.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::archive::{archive_kind, ArchiveKind};
use super::digest::{check_digest, DigestError};

pub const DOCKER_HUB: &str = "registry-1.docker.io";
const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];
const DEFAULT_TAG: &str = "latest";
/// The distribution spec bounds a repository name (registry excluded) to 255 characters.
const MAX_REPOSITORY_LEN: usize = 255;

/// An image named by the user, not yet opened or imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// A file or directory that can be run as it is: squashfs, SIF or a root filesystem.
    Local(PathBuf),
    Registry(RemoteRef),
    /// An OCI image layout directory; `reference` picks a tag (its `ref.name`
    /// annotation) or a manifest digest among several.
    OciLayout {
        dir: PathBuf,
        reference: Option<String>,
    },
    /// A tar archive of an OCI image layout.
    OciArchive {
        file: PathBuf,
        reference: Option<String>,
    },
    /// A `docker save` archive; `reference` picks one of its `RepoTags` when it holds several.
    DockerArchive {
        file: PathBuf,
        reference: Option<String>,
    },
}

/// An image in a registry (OCI distribution v2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RemoteRef {
    /// Host (and port) to talk to, e.g. `registry-1.docker.io`, `nvcr.io`, `localhost:5000`.
    pub registry: String,
    /// e.g. `library/ubuntu`, `nvidia/pytorch`.
    pub repository: String,
    /// Tag; `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    /// `sha256:<64 hex>`; when set it decides which manifest is pulled.
    pub digest: Option<String>,
    /// enroot's `USER@`: whose credentials to look up for this registry.
    pub user: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid image reference '{input}': {problem} (example: {example})")]
    Invalid {
        input: String,
        problem: String,
        example: &'static str,
    },
    #[error("image not found: {0} (check the path; relative paths are taken from the current directory)")]
    NotFound(PathBuf),
    #[error("cannot read image {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// What is wrong with a registry image name or one of its parts: the problem only, which
/// [`ReferenceError::Invalid`] and the registry client put into context.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("no image name")]
    Empty,
    #[error("it holds white space or control characters")]
    WhiteSpace,
    #[error("empty registry before '#'")]
    EmptyRegistry,
    #[error("user name '{0}' before '@' is not valid")]
    User(String),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("tag '{0}' is not valid: up to 128 letters, digits, '_', '.', '-', not starting with '.' or '-'")]
    Tag(String),
    #[error("no repository name")]
    NoRepository,
    #[error("repository name is {0} characters long; at most {MAX_REPOSITORY_LEN} are allowed")]
    RepositoryTooLong(usize),
    #[error("repository '{repository}' is not valid: component '{component}' {why}")]
    Repository {
        repository: String,
        component: String,
        why: &'static str,
    },
    #[error("registry '{0}' is not a valid host name")]
    Host(String),
    #[error("registry '{0}' has an invalid port")]
    Port(String),
}

const DOCKER_EXAMPLE: &str = "docker://ubuntu:22.04 or docker://nvcr.io#nvidia/pytorch:24.05-py3";
const OCI_EXAMPLE: &str = "oci:./layout:latest";

fn invalid(input: &str, problem: impl fmt::Display, example: &'static str) -> ReferenceError {
    ReferenceError::Invalid {
        input: input.into(),
        problem: problem.to_string(),
        example,
    }
}

impl ImageRef {
    /// Parse what the user wrote; relative paths are taken from `cwd`. Looks at the file
    /// system (existence, and the first bytes of a local file), nothing else.
    pub fn parse(input: &str, cwd: &Path) -> Result<ImageRef, ReferenceError> {
        if input.is_empty() {
            return Err(invalid(input, "the reference is empty", DOCKER_EXAMPLE));
        }
        if let Some(rest) = input.strip_prefix("docker://") {
            return RemoteRef::parse_docker(rest)
                .map(ImageRef::Registry)
                .map_err(|problem| invalid(input, problem, DOCKER_EXAMPLE));
        }
        // `a/./b` -> `a/b`, for messages; `..` stays (it may cross a symlink).
        let path: PathBuf = cwd.join(input).components().collect();
        if path.symlink_metadata().is_ok() {
            return classify_local(&path);
        }
        if let Some(rest) = input.strip_prefix("oci:") {
            let (dir, reference) = split_reference(rest, cwd, input, OCI_EXAMPLE)?;
            return Ok(ImageRef::OciLayout { dir, reference });
        }
        if let Some(rest) = input.strip_prefix("oci-archive:") {
            let (file, reference) =
                split_reference(rest, cwd, input, "oci-archive:./image.tar:latest")?;
            return Ok(ImageRef::OciArchive { file, reference });
        }
        if let Some(rest) = input.strip_prefix("docker-archive:") {
            let (file, reference) = split_archive_name(rest, cwd, input)?;
            return Ok(ImageRef::DockerArchive { file, reference });
        }
        if looks_like_path(input) {
            return Err(ReferenceError::NotFound(path));
        }
        if let Some((file, _)) = input.rsplit_once(':') {
            if !file.is_empty() && cwd.join(file).exists() {
                return Err(invalid(
                    input,
                    format!("{file} exists, but FILE:TAG needs a scheme to say what the file is"),
                    "oci:DIR:TAG, oci-archive:FILE:TAG or docker-archive:FILE:NAME:TAG",
                ));
            }
        }
        // pyxis and enroot users write bare names (`ubuntu:22.04`, `nvcr.io#nvidia/x`).
        RemoteRef::parse_docker(input)
            .map(ImageRef::Registry)
            .map_err(|problem| {
                invalid(
                    input,
                    format!("not an existing file, and not a registry image name: {problem}"),
                    DOCKER_EXAMPLE,
                )
            })
    }

    /// True when the image can be run without importing it first.
    pub fn is_local(&self) -> bool {
        matches!(self, ImageRef::Local(_))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with_ref = |f: &mut fmt::Formatter<'_>, scheme: &str, p: &Path, r: &Option<String>| {
            write!(f, "{scheme}:{}", p.display())?;
            match r {
                Some(r) if is_digest_syntax(r) => write!(f, "@{r}"),
                Some(r) => write!(f, ":{r}"),
                None => Ok(()),
            }
        };
        match self {
            ImageRef::Local(p) => write!(f, "{}", p.display()),
            ImageRef::Registry(r) => r.fmt(f),
            ImageRef::OciLayout { dir, reference } => with_ref(f, "oci", dir, reference),
            ImageRef::OciArchive { file, reference } => with_ref(f, "oci-archive", file, reference),
            ImageRef::DockerArchive { file, reference } => {
                write!(f, "docker-archive:{}", file.display())?;
                match reference {
                    Some(r) => write!(f, ":{r}"),
                    None => Ok(()),
                }
            }
        }
    }
}

fn looks_like_path(input: &str) -> bool {
    const IMAGE_EXTENSIONS: [&str; 7] = [
        ".sqsh",
        ".squashfs",
        ".sqfs",
        ".sif",
        ".tar",
        ".img",
        ".simg",
    ];
    input.starts_with('/')
        || input.starts_with("./")
        || input.starts_with("../")
        || input.starts_with('~')
        || input == "."
        || input == ".."
        || IMAGE_EXTENSIONS.iter().any(|e| input.ends_with(e))
}

/// `PATH[:REF]` or `PATH@sha256:HEX` after `oci:` or `oci-archive:`. A path that exists
/// as written keeps any colon it holds.
fn split_reference(
    rest: &str,
    cwd: &Path,
    input: &str,
    example: &'static str,
) -> Result<(PathBuf, Option<String>), ReferenceError> {
    if rest.is_empty() {
        return Err(invalid(input, "no path after the scheme", example));
    }
    if cwd.join(rest).exists() {
        return Ok((cwd.join(rest), None));
    }
    if let Some(at) = rest.rfind("@sha256:") {
        let digest = &rest[at + 1..];
        check_digest(digest).map_err(|p| invalid(input, p, example))?;
        return Ok((cwd.join(&rest[..at]), Some(digest.to_string())));
    }
    match rest.rsplit_once(':') {
        Some((path, reference)) if !path.is_empty() && !reference.contains('/') => {
            check_tag(reference).map_err(|p| invalid(input, p, example))?;
            Ok((cwd.join(path), Some(reference.to_string())))
        }
        _ => Ok((cwd.join(rest), None)),
    }
}

/// `FILE[:NAME[:TAG]]` after `docker-archive:`: the image name is checked by the archive
/// reader against its `RepoTags`, here it only has to be separated from the file name.
fn split_archive_name(
    rest: &str,
    cwd: &Path,
    input: &str,
) -> Result<(PathBuf, Option<String>), ReferenceError> {
    if rest.is_empty() {
        return Err(invalid(
            input,
            "no path after the scheme",
            "docker-archive:./image.tar",
        ));
    }
    if cwd.join(rest).exists() {
        return Ok((cwd.join(rest), None));
    }
    match rest.split_once(':') {
        Some((file, name)) if !file.is_empty() && !name.is_empty() => {
            Ok((cwd.join(file), Some(name.to_string())))
        }
        _ => Ok((cwd.join(rest), None)),
    }
}

/// What an existing path holds, from its type and first bytes.
fn classify_local(path: &Path) -> Result<ImageRef, ReferenceError> {
    let read_err = |error: std::io::Error| ReferenceError::Read {
        path: path.into(),
        error,
    };
    let meta = match path.metadata() {
        Ok(meta) => meta,
        // A path through a directory the user may not enter (a link into another user's
        // private directory): as below, the runtime names the missing permission.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Ok(ImageRef::Local(path.into()))
        }
        Err(e) => return Err(read_err(e)),
    };
    if meta.is_dir() {
        if path.join("oci-layout").is_file() {
            return Ok(ImageRef::OciLayout {
                dir: path.into(),
                reference: None,
            });
        }
        return Ok(ImageRef::Local(path.into()));
    }
    if meta.is_file() {
        let mut head = [0u8; 512];
        let mut file = match File::open(path) {
            Ok(f) => f,
            // The runtime opens it again as the user and says whose permission is missing.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Ok(ImageRef::Local(path.into()))
            }
            Err(e) => return Err(read_err(e)),
        };
        let mut n = 0;
        while n < head.len() {
            match file.read(&mut head[n..]).map_err(read_err)? {
                0 => break,
                k => n += k,
            }
        }
        if n == 512 && &head[257..262] == b"ustar" {
            return Ok(match archive_kind(path) {
                Some(ArchiveKind::Docker) => ImageRef::DockerArchive {
                    file: path.into(),
                    reference: None,
                },
                _ => ImageRef::OciArchive {
                    file: path.into(),
                    reference: None,
                },
            });
        }
    }
    // squashfs, SIF, or something `image::detect` will refuse with a precise reason.
    Ok(ImageRef::Local(path.into()))
}

impl RemoteRef {
    /// Parse the part after `docker://` (or a bare name); the error is the problem only.
    pub fn parse_docker(text: &str) -> Result<RemoteRef, NameError> {
        if text.is_empty() {
            return Err(NameError::Empty);
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(NameError::WhiteSpace);
        }
        let mut rest = text;
        let mut user = None;
        if let Some((before, after)) = rest.split_once('@') {
            // `NAME@sha256:…` is a digest; an `@` before anything else is enroot's user.
            if !before.contains('/') && !before.contains('#') && !is_digest_like(after) {
                check_user(before)?;
                user = Some(before.to_string());
                rest = after;
            }
        }
        let (registry, path) = match rest.split_once('#') {
            Some((registry, path)) => {
                if registry.is_empty() {
                    return Err(NameError::EmptyRegistry);
                }
                (Some(registry), path)
            }
            None => match rest.split_once('/') {
                Some((first, remainder))
                    if first.contains('.') || first.contains(':') || first == "localhost" =>
                {
                    (Some(first), remainder)
                }
                _ => (None, rest),
            },
        };
        let (path, digest) = match path.split_once('@') {
            Some((p, d)) => {
                check_digest(d)?;
                (p, Some(d.to_string()))
            }
            None => (path, None),
        };
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => {
                check_tag(tag)?;
                (repo, Some(tag.to_string()))
            }
            _ => (path, None),
        };
        let registry = match registry {
            None => DOCKER_HUB.to_string(),
            Some(r) => {
                check_registry(r)?;
                if DOCKER_HUB_ALIASES.contains(&r) {
                    DOCKER_HUB.to_string()
                } else {
                    r.to_string()
                }
            }
        };
        check_repository(repository)?;
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            // Checked again as the registry sees it (found by fuzzing: a 250-character
            // name passed, then its printed form did not parse).
            let full = format!("library/{repository}");
            check_repository(&full)?;
            full
        } else {
            repository.to_string()
        };
        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            _ => tag,
        };
        Ok(RemoteRef {
            registry,
            repository,
            tag,
            digest,
            user,
        })
    }

    /// What the registry is asked for: the digest when known, else the tag.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }

    /// Check every part as [`RemoteRef::parse_docker`] does, for references built field by
    /// field (the registry client checks each one before it sends a request, so nothing
    /// odd ends up in a URL). The error is the problem only.
    pub fn validate(&self) -> Result<(), NameError> {
        check_registry(&self.registry)?;
        check_repository(&self.repository)?;
        if let Some(tag) = &self.tag {
            check_tag(tag)?;
        }
        if let Some(digest) = &self.digest {
            check_digest(digest)?;
        }
        if let Some(user) = &self.user {
            check_user(user)?;
        }
        Ok(())
    }

    /// `registry/repository[:tag][@digest]`, as registry messages name the image.
    pub fn short_name(&self) -> String {
        let mut s = format!("{}/{}", self.registry, self.repository);
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }
}

/// enroot's `USER@`: a login name, nothing that could reach a URL or a file name.
fn check_user(user: &str) -> Result<(), NameError> {
    if user.is_empty()
        || !user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-$".contains(c))
    {
        return Err(NameError::User(user.to_string()));
    }
    Ok(())
}

impl fmt::Display for RemoteRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "docker://")?;
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        // A registry named without a dot, a port or `localhost` (which enroot's `#` form
        // allows) would read back as part of a Docker Hub repository after a `/`.
        let r = &self.registry;
        let separator = if r.contains('.') || r.contains(':') || r == "localhost" {
            '/'
        } else {
            '#'
        };
        write!(f, "{r}{separator}{}", self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// `ALG:HEX`: after an `@`, a digest (checked later) rather than enroot's user name.
fn is_digest_like(s: &str) -> bool {
    s.split_once(':').is_some_and(|(alg, hex)| {
        !alg.is_empty()
            && alg.chars().all(|c| c.is_ascii_alphanumeric())
            && !hex.is_empty()
            && hex.chars().all(|c| c.is_ascii_hexdigit())
    })
}

fn is_digest_syntax(s: &str) -> bool {
    check_digest(s).is_ok()
}

/// Tags: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}` (distribution spec).
pub fn check_tag(t: &str) -> Result<(), NameError> {
    let mut chars = t.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok || t.len() > 128 || !chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(NameError::Tag(t.to_string()));
    }
    Ok(())
}

/// Repository: `/`-separated components of `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn check_repository(r: &str) -> Result<(), NameError> {
    if r.is_empty() {
        return Err(NameError::NoRepository);
    }
    if r.len() > MAX_REPOSITORY_LEN {
        return Err(NameError::RepositoryTooLong(r.len()));
    }
    for component in r.split('/') {
        if !valid_component(component) {
            let why = if component.chars().any(|c| c.is_ascii_uppercase()) {
                "must be lowercase"
            } else {
                "may hold only a-z, 0-9 and single '.', '_', '__' or '-' runs between them"
            };
            return Err(NameError::Repository {
                repository: r.to_string(),
                component: component.to_string(),
                why,
            });
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Registry host: letters, digits, '.', '-', an optional `:port`, or a bracketed IPv6.
fn check_registry(r: &str) -> Result<(), NameError> {
    let bad_host = || NameError::Host(r.to_string());
    let (host_ok, port) = if let Some(v6) = r.strip_prefix('[') {
        let (addr, rest) = v6.split_once(']').ok_or_else(bad_host)?;
        let ok = !addr.is_empty() && addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':');
        let port = match rest {
            "" => None,
            _ => Some(rest.strip_prefix(':').ok_or_else(bad_host)?),
        };
        (ok, port)
    } else {
        match r.rsplit_once(':') {
            Some((h, p)) => (valid_host_name(h), Some(p)),
            None => (valid_host_name(r), None),
        }
    };
    if !host_ok {
        return Err(bad_host());
    }
    if let Some(p) = port {
        if !p.bytes().all(|b| b.is_ascii_digit()) || p.parse::<u16>().map_or(true, |n| n == 0) {
            return Err(NameError::Port(r.to_string()));
        }
    }
    Ok(())
}

fn valid_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(s: &str) -> RemoteRef {
        match ImageRef::parse(s, Path::new("/nonexistent-cwd")).unwrap() {
            ImageRef::Registry(r) => r,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn every_reference_prints_as_one_that_parses_back_to_it() {
        // Found by fuzzing: enroot's `REGISTRY#IMAGE` allows a registry without a dot or
        // port, which a `/` would turn into part of a Docker Hub repository.
        for text in [
            "docker://io#nvidia/pytorch:24.01",
            "docker://user@nvcr.io#nvidia/pytorch:24.01",
            "docker://localhost/x",
            "ubuntu",
        ] {
            let r = remote(text);
            assert_eq!(remote(&r.to_string()), r, "{text} printed as {r}");
        }
        assert_eq!(
            remote("docker://io#a/b").to_string(),
            "docker://io#a/b:latest"
        );
        // Docker Hub's `library/` counts towards the 255 characters.
        let name = "a".repeat(250);
        assert!(ImageRef::parse(&format!("docker://{name}"), Path::new("/")).is_err());
    }

    fn err(s: &str) -> String {
        ImageRef::parse(s, Path::new("/nonexistent-cwd"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn docker_hub_defaults() {
        let r = remote("docker://ubuntu");
        assert_eq!(r.registry, DOCKER_HUB);
        assert_eq!(r.repository, "library/ubuntu");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.digest, None);
        assert_eq!(
            r.to_string(),
            "docker://registry-1.docker.io/library/ubuntu:latest"
        );
        let r = remote("docker://someone/tool:1.2");
        assert_eq!(r.repository, "someone/tool");
        assert_eq!(r.tag.as_deref(), Some("1.2"));
        let r = remote("docker://docker.io/ubuntu:22.04");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            (DOCKER_HUB, "library/ubuntu")
        );
    }

    #[test]
    fn registries_ports_and_digests() {
        let r = remote("docker://localhost:5000/a/b:c");
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag.as_deref(), Some("c"));
        let r = remote("docker://localhost/x");
        assert_eq!(r.registry, "localhost");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = remote(&format!("docker://ghcr.io/o/r@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.reference(), d);
        let r = remote(&format!("docker://ghcr.io/o/r:v1@{d}"));
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.to_string(), format!("docker://ghcr.io/o/r:v1@{d}"));
    }

    #[test]
    fn enroot_spelling() {
        let r = remote("docker://nvcr.io#nvidia/pytorch:24.05-py3");
        assert_eq!(r.registry, "nvcr.io");
        assert_eq!(r.repository, "nvidia/pytorch");
        assert_eq!(r.tag.as_deref(), Some("24.05-py3"));
        let r = remote("docker://jdoe@registry.example.com:8443#team/img");
        assert_eq!(r.user.as_deref(), Some("jdoe"));
        assert_eq!(r.registry, "registry.example.com:8443");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        // The canonical form parses back to the same reference.
        assert_eq!(remote(&r.to_string()), r);
        let r = remote("docker://jdoe@alpine");
        assert_eq!(
            (r.user.as_deref(), r.repository.as_str()),
            (Some("jdoe"), "library/alpine")
        );
    }

    #[test]
    fn bare_names_are_registry_images() {
        assert_eq!(remote("ubuntu:22.04").repository, "library/ubuntu");
        assert_eq!(remote("nvcr.io#nvidia/cuda:12.4").registry, "nvcr.io");
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        let e = err("docker://Ubuntu");
        assert!(
            e.contains("must be lowercase") && e.contains("example: docker://"),
            "{e}"
        );
        assert!(err("docker://ubuntu:-bad").contains("tag '-bad'"));
        assert!(err("docker://ubuntu@sha256:abc").contains("64 lowercase hex"));
        assert!(err("docker://ubuntu@md5:abcdef").contains("not supported"));
        assert!(err("docker://a//b").contains("component ''"));
        assert!(err("docker://a__-b").contains("component"));
        assert!(err("docker://host:99999/x").contains("invalid port"));
        assert!(err("docker://bad_host:5000/x").contains("not a valid host"));
        assert!(err("docker://ex ample").contains("white space"));
        assert!(err("docker://").contains("no image name"));
        assert!(err("docker://#x").contains("empty registry"));
        let long = format!("docker://{}", "a".repeat(300));
        assert!(err(&long).contains("at most 255"));
        assert!(err("").contains("empty"));
    }

    /// References built field by field (the registry client's callers) get the parser's
    /// checks, not looser ones.
    #[test]
    fn validate_is_the_parsers_check() {
        let good = remote("docker://localhost:5000/a/b:c");
        assert!(good.validate().is_ok());
        assert_eq!(good.short_name(), "localhost:5000/a/b:c");
        for (registry, repository, tag) in [
            ("evil/host", "a", "v1"),
            ("bad_host", "a", "v1"),
            ("h:99999", "a", "v1"),
            ("h", "a__-b", "v1"),
            ("h", "ferry/../x", "v1"),
            ("h", "Ferry/x", "v1"),
            ("h", "", "v1"),
            ("h", "a", "a/b"),
            ("h", "a", "-x"),
        ] {
            let r = RemoteRef {
                registry: registry.into(),
                repository: repository.into(),
                tag: Some(tag.into()),
                ..good.clone()
            };
            assert!(r.validate().is_err(), "{registry} {repository} {tag}");
        }
        let r = RemoteRef {
            digest: Some("md5:abc".into()),
            ..good.clone()
        };
        assert!(r
            .validate()
            .unwrap_err()
            .to_string()
            .contains("only sha256"));
        let r = RemoteRef {
            user: Some("a/b".into()),
            ..good
        };
        assert!(r.validate().is_err());
    }

    #[test]
    fn missing_paths_are_not_registry_names() {
        for p in ["./x", "/nope/img.sqsh", "img.sif", "../up", "~/a"] {
            assert!(err(p).starts_with("image not found"), "{p}: {}", err(p));
        }
    }

    #[test]
    fn repository_components() {
        for ok in ["a", "a.b", "a_b", "a__b", "a---b", "a0/b1/c2"] {
            assert!(check_repository(ok).is_ok(), "{ok}");
        }
        for bad in ["_a", "a_", "a..b", "a___b", "a.-b", "A", "a/", "/a"] {
            assert!(check_repository(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn existing_paths_win() {
        let dir = tempfile::tempdir().unwrap();
        // A directory named like a registry image is still a directory.
        std::fs::create_dir(dir.path().join("ubuntu:22.04")).unwrap();
        assert_eq!(
            ImageRef::parse("ubuntu:22.04", dir.path()).unwrap(),
            ImageRef::Local(dir.path().join("ubuntu:22.04"))
        );
        std::fs::create_dir(dir.path().join("layout")).unwrap();
        std::fs::write(dir.path().join("layout/oci-layout"), "{}").unwrap();
        assert_eq!(
            ImageRef::parse("layout", dir.path()).unwrap(),
            ImageRef::OciLayout {
                dir: dir.path().join("layout"),
                reference: None
            }
        );
        let e = ImageRef::parse("layout:v1", dir.path()).unwrap_err();
        assert!(e.to_string().contains("oci:DIR:TAG"), "{e}");
        std::fs::write(dir.path().join("img.sqsh"), b"hsqs").unwrap();
        assert!(ImageRef::parse("img.sqsh", dir.path()).unwrap().is_local());
    }

    #[test]
    fn schemes_with_references() {
        let cwd = Path::new("/w");
        assert_eq!(
            ImageRef::parse("oci:lay:v1", cwd).unwrap(),
            ImageRef::OciLayout {
                dir: "/w/lay".into(),
                reference: Some("v1".into())
            }
        );
        let d = format!("sha256:{}", "0".repeat(64));
        let parsed = ImageRef::parse(&format!("oci:/abs/lay@{d}"), cwd).unwrap();
        assert_eq!(
            parsed,
            ImageRef::OciLayout {
                dir: "/abs/lay".into(),
                reference: Some(d.clone())
            }
        );
        assert_eq!(parsed.to_string(), format!("oci:/abs/lay@{d}"));
        assert_eq!(
            ImageRef::parse("oci-archive:a.tar", cwd).unwrap(),
            ImageRef::OciArchive {
                file: "/w/a.tar".into(),
                reference: None
            }
        );
        assert_eq!(
            ImageRef::parse("docker-archive:a.tar:busybox:1.36", cwd).unwrap(),
            ImageRef::DockerArchive {
                file: "/w/a.tar".into(),
                reference: Some("busybox:1.36".into())
            }
        );
        assert!(ImageRef::parse("oci:", cwd)
            .unwrap_err()
            .to_string()
            .contains("no path"));
        assert!(ImageRef::parse("oci:x:bad tag", cwd).is_err());
    }
}
