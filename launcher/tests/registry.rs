//! The registry client against a real registry: Debian's docker-registry, started and
//! filled by `integration/registry up` (see that script for the images).
//!
//! Needs `FERRY_TEST_REGISTRY=127.0.0.1:15000` (`eval "$(integration/registry env)"`).
//! Without it these tests print a note and pass, except under CI (`CI=true`), where a
//! missing registry is a failure rather than a silent skip.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry::image::registry::{
    Client, ClientOptions, CredentialSources, Platform, PlatformExt, Progress, RegistryError,
    RemoteRef,
};

fn registry() -> Option<String> {
    match std::env::var("FERRY_TEST_REGISTRY") {
        Ok(r) if !r.is_empty() => Some(r),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "FERRY_TEST_REGISTRY is not set under CI: run `integration/registry up` and \
                     `eval \"$(integration/registry env)\"` before the tests"
                );
            }
            eprintln!(
                "note: registry tests skipped: FERRY_TEST_REGISTRY is not set \
                 (integration/registry up; eval \"$(integration/registry env)\")"
            );
            None
        }
    }
}

fn options(registry: &str) -> ClientOptions {
    ClientOptions {
        insecure_registries: vec![registry.to_string()],
        credentials: CredentialSources::default(),
        progress: Progress::Quiet,
        platform: Platform::parse("linux/amd64").unwrap(),
        retry_delay: Duration::from_millis(100),
        ..ClientOptions::default()
    }
}

fn reference(registry: &str, repository: &str, tag: &str) -> RemoteRef {
    RemoteRef {
        registry: registry.to_string(),
        repository: repository.to_string(),
        tag: Some(tag.to_string()),
        digest: None,
        user: None,
    }
}

fn index_entry(dest: &Path) -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    index["manifests"][0].clone()
}

fn blob(dest: &Path, digest: &str) -> std::path::PathBuf {
    dest.join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

/// The names in a gzip layer, by the system's tar.
fn layer_listing(path: &Path) -> String {
    let out = Command::new("tar").arg("-tzf").arg(path).output().unwrap();
    assert!(out.status.success(), "tar -tzf {}", path.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pull_busybox_and_pull_again() {
    let Some(reg) = registry() else { return };
    let client = Client::new(options(&reg)).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let r = reference(&reg, "ferry/busybox", "latest");

    let start = Instant::now();
    let pulled = client.pull(&r, dest.path()).unwrap();
    let first = start.elapsed();
    assert_eq!(pulled.layers.len(), 1);
    assert_eq!(pulled.reused_blobs, 0);
    let entry = index_entry(dest.path());
    assert_eq!(entry["digest"], pulled.manifest_digest.as_str());
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "latest"
    );
    assert_eq!(
        entry["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let listing = layer_listing(&blob(dest.path(), pulled.layers[0].digest().as_ref()));
    assert!(listing.lines().any(|l| l == "./bin/busybox"), "{listing}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(dest.path(), &pulled.config_digest)).unwrap())
            .unwrap();
    assert_eq!(config["architecture"], "amd64");

    let start = Instant::now();
    let again = client.pull(&r, dest.path()).unwrap();
    let second = start.elapsed();
    assert_eq!(again.manifest_digest, pulled.manifest_digest);
    assert_eq!(again.fetched_bytes, 0);
    assert_eq!(again.reused_blobs, 2);
    eprintln!(
        "measure: pull of {r} ({} bytes): {:.1} ms; again with every blob present: {:.1} ms",
        pulled.fetched_bytes,
        first.as_secs_f64() * 1000.0,
        second.as_secs_f64() * 1000.0
    );

    let resolved = client.resolve(&r).unwrap();
    assert_eq!(resolved.manifest_digest, pulled.manifest_digest);
}

#[test]
fn docker_schema2_and_multi_platform() {
    let Some(reg) = registry() else { return };
    let client = Client::new(options(&reg)).unwrap();
    let oci = client
        .resolve(&reference(&reg, "ferry/busybox", "latest"))
        .unwrap();

    let dest = tempfile::tempdir().unwrap();
    let docker = client
        .pull(&reference(&reg, "ferry/busybox", "docker"), dest.path())
        .unwrap();
    assert_eq!(
        docker.manifest_media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        index_entry(dest.path())["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );

    // The index's amd64 entry is the very image pushed as ferry/busybox:latest.
    let multi = reference(&reg, "ferry/multi", "latest");
    let amd = client.resolve(&multi).unwrap();
    assert_eq!(amd.manifest_digest, oci.manifest_digest);
    assert!(amd.index_digest.is_some());

    let mut arm_opts = options(&reg);
    arm_opts.platform = Platform::parse("linux/arm64").unwrap();
    let arm_client = Client::new(arm_opts).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let arm = arm_client.pull(&multi, dest.path()).unwrap();
    assert_ne!(arm.manifest_digest, amd.manifest_digest);
    let listing = layer_listing(&blob(dest.path(), arm.layers[0].digest().as_ref()));
    assert!(listing.contains("./etc/ferry-marker"), "{listing}");
    assert!(!listing.contains("busybox"), "{listing}");

    let mut s390 = options(&reg);
    s390.platform = Platform::parse("linux/s390x").unwrap();
    let e = Client::new(s390).unwrap().resolve(&multi).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("has no image for linux/s390x; it has: linux/amd64, linux/arm64/v8"),
        "{e}"
    );
}

#[test]
fn errors_from_a_real_registry() {
    let Some(reg) = registry() else { return };
    let client = Client::new(options(&reg)).unwrap();
    let e = client
        .resolve(&reference(&reg, "ferry/busybox", "no-such-tag"))
        .unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
    assert!(e.to_string().starts_with(&format!(
        "no such image or tag: {reg}/ferry/busybox:no-such-tag"
    )));
    let e = client
        .resolve(&reference(&reg, "ferry/no-such-repo", "latest"))
        .unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");

    // Not marked insecure: https to a plain-http registry fails at once, saying why.
    let mut https = options(&reg);
    https.insecure_registries.clear();
    let e = Client::new(https)
        .unwrap()
        .resolve(&reference(&reg, "ferry/busybox", "latest"))
        .unwrap_err();
    assert!(matches!(e, RegistryError::Tls { .. }), "{e}");
}

#[test]
fn the_import_command() {
    let Some(reg) = registry() else { return };
    let cache = tempfile::tempdir().unwrap();
    let import = |args: &[&str], image: String| {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("import")
            .args(args)
            .arg(image)
            .env("FERRY_CACHE", cache.path())
            .env_remove("FERRY_INSECURE_REGISTRIES")
            .output()
            .unwrap()
    };
    // enroot's spelling; the result is a squashfs in the cache, named by its digest.
    let out = import(
        &["--insecure"],
        format!("docker://{reg}#ferry/busybox:latest"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = stdout.trim();
    assert!(
        path.contains("/images/sha256-") && path.ends_with(".sqsh"),
        "{stdout}"
    );
    assert!(std::path::Path::new(path).is_file());

    // The same image by digest is a cache hit, and `ferry images` lists both names.
    let digest = path
        .rsplit("/images/sha256-")
        .next()
        .and_then(|s| s.strip_suffix(".sqsh"))
        .unwrap()
        .to_string();
    let by_digest = format!("docker://{reg}/ferry/busybox@sha256:{digest}");
    let again = import(&["--insecure"], by_digest.clone());
    assert!(again.status.success());
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), path);
    // Pinned to a cached digest, no registry is asked: not even one that does not answer.
    let offline = import(
        &[],
        format!("docker://127.0.0.1:9/ferry/busybox@sha256:{digest}"),
    );
    assert!(
        offline.status.success(),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&offline.stdout).trim(), path);
    let listing = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("images")
        .env("FERRY_CACHE", cache.path())
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains(&format!("{reg}/ferry/busybox:latest"))
            && listing.contains(&format!("@sha256:{digest}")),
        "{listing}"
    );

    // Without --insecure, https to a plain-http registry fails with one line.
    let out = import(&[], format!("docker://{reg}/ferry/busybox:latest"));
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("TLS connection to") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

#[test]
fn concurrent_imports_of_one_cold_image_fetch_each_blob_once() {
    let Some(reg) = registry() else { return };
    let log = std::env::var("FERRY_TEST_REGISTRY_LOG")
        .expect("FERRY_TEST_REGISTRY_LOG is not set: eval \"$(integration/registry env)\"");
    // A repository of this test's own, so other tests' requests do not count.
    let repo = format!("ferry/concurrent-{}", std::process::id());
    let copied = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "-q"])
        .args(["--src-tls-verify=false", "--dest-tls-verify=false"])
        .arg(format!("docker://{reg}/ferry/busybox:latest"))
        .arg(format!("docker://{reg}/{repo}:latest"))
        .status()
        .unwrap();
    assert!(copied.success());
    let cache = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..8)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_ferry"))
                .args(["import", "--insecure"])
                .arg(format!("docker://{reg}/{repo}:latest"))
                .env("FERRY_CACHE", cache.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let paths: std::collections::BTreeSet<String> = outputs
        .iter()
        .map(|o| {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        })
        .collect();
    assert_eq!(paths.len(), 1, "all eight name the same image: {paths:?}");
    // Every blob of the image (config and layer) was downloaded exactly once.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut gets = std::collections::BTreeMap::<String, usize>::new();
    for line in text.lines() {
        let needle = format!("\"GET /v2/{repo}/blobs/");
        if let Some(rest) = line.split(&needle).nth(1) {
            let blob = rest.split_whitespace().next().unwrap().to_string();
            *gets.entry(blob).or_default() += 1;
        }
    }
    assert_eq!(gets.len(), 2, "config and one layer: {gets:?}");
    assert!(gets.values().all(|&n| n == 1), "{gets:?}");
}

/// The second test registry: TLS from a private CA, and a login.
struct AuthRegistry {
    addr: String,
    ca: String,
    login: String,
    password: String,
}

fn auth_registry() -> Option<AuthRegistry> {
    registry()?;
    let var = |n: &str| {
        std::env::var(n)
            .unwrap_or_else(|_| panic!("{n} is not set: eval \"$(integration/registry env)\""))
    };
    Some(AuthRegistry {
        addr: var("FERRY_TEST_AUTH_REGISTRY"),
        ca: var("FERRY_TEST_AUTH_CA"),
        login: var("FERRY_TEST_AUTH_LOGIN"),
        password: var("FERRY_TEST_AUTH_PASSWORD"),
    })
}

#[test]
fn a_registry_with_a_private_ca_and_a_login() {
    let Some(reg) = auth_registry() else { return };
    let home = tempfile::tempdir().unwrap();
    let image = format!("docker://{}/ferry/busybox:latest", reg.addr);
    let import = |env: &[(&str, String)]| {
        let cache = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
        cmd.args(["import", &image])
            .env("FERRY_CACHE", cache.path())
            .env("HOME", home.path())
            .env("DOCKER_CONFIG", home.path().join("docker"))
            .env_remove("FERRY_CREDENTIALS_FILE")
            .env_remove("FERRY_REGISTRY_CA_FILE")
            .env_remove("FERRY_INSECURE_REGISTRIES");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let one_line = |stderr: &str, text: &str| {
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains("WARN")).collect();
        assert!(lines.len() == 1 && lines[0].contains(text), "{stderr}");
    };
    let ca = ("FERRY_REGISTRY_CA_FILE", reg.ca.clone());
    // Without the CA: the TLS handshake fails, with the fix in the line.
    let (ok, _, err) = import(&[]);
    assert!(!ok);
    one_line(&err, "TLS connection to");
    // With the CA but no login.
    let (ok, _, err) = import(std::slice::from_ref(&ca));
    assert!(!ok);
    one_line(&err, "refused anonymous access");
    // A wrong password, from a netrc-style file.
    let creds = home.path().join("creds");
    let write_creds = |password: &str| {
        std::fs::write(
            &creds,
            format!(
                "machine {} login {} password {password}\n",
                reg.addr, reg.login
            ),
        )
        .unwrap();
        std::fs::set_permissions(&creds, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    };
    write_creds("wrong");
    let file = ("FERRY_CREDENTIALS_FILE", creds.display().to_string());
    let (ok, _, err) = import(&[ca.clone(), file.clone()]);
    assert!(!ok);
    one_line(&err, &format!("refused the login `{}`", reg.login));
    // The right one, from that file and from Docker's config.json.
    write_creds(&reg.password);
    let (ok, out, err) = import(&[ca.clone(), file]);
    assert!(ok && out.trim().ends_with(".sqsh"), "{out}{err}");
    std::fs::remove_file(&creds).unwrap();
    let token = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf %s '{}:{}' | base64 -w0",
            reg.login, reg.password
        ))
        .output()
        .unwrap();
    let docker = home.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        format!(
            "{{\"auths\":{{\"{}\":{{\"auth\":\"{}\"}}}}}}",
            reg.addr,
            String::from_utf8_lossy(&token.stdout)
        ),
    )
    .unwrap();
    let (ok, out, err) = import(&[ca]);
    assert!(ok && out.trim().ends_with(".sqsh"), "{out}{err}");
}
