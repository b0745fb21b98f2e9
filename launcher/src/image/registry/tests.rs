//! The client against hand-written registries on 127.0.0.1 (see `test_server`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

use super::test_server::{Reply, Request, Server};
use super::*;
use crate::image::digest::sha256_digest;
use crate::image::media_type::{DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};

const REPO: &str = "ferry/test";

/// Bytes that do not repeat, so a resumed download that splices wrongly shows.
fn noise(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

/// What a fake registry serves: manifests by tag or digest, blobs by digest.
#[derive(Default, Clone)]
struct Content {
    manifests: HashMap<String, (String, Vec<u8>)>,
    blobs: HashMap<String, Vec<u8>>,
}

struct Image {
    digest: String,
    bytes: Vec<u8>,
    config: String,
    layers: Vec<String>,
}

impl Content {
    /// An image with a config and layers of the given sizes, tagged `tag`.
    fn add_image(
        &mut self,
        tag: &str,
        seed: u32,
        layer_sizes: &[usize],
        media_type: &str,
    ) -> Image {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["SEED={seed}"]}}}}"#
        )
        .into_bytes();
        let config_digest = sha256_digest(&config);
        let mut layers = Vec::new();
        let mut layer_json = Vec::new();
        for (i, size) in layer_sizes.iter().enumerate() {
            let data = noise(seed * 100 + i as u32, *size);
            let d = sha256_digest(&data);
            layer_json.push(format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{size}}}"#
            ));
            self.blobs.insert(d.clone(), data);
            layers.push(d);
        }
        let config_type = if media_type == DOCKER_MANIFEST {
            "application/vnd.docker.container.image.v1+json"
        } else {
            "application/vnd.oci.image.config.v1+json"
        };
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{media_type}","config":{{"mediaType":"{config_type}","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
            config.len(),
            layer_json.join(",")
        )
        .into_bytes();
        self.blobs.insert(config_digest.clone(), config);
        let digest = sha256_digest(&manifest);
        self.manifests
            .insert(digest.clone(), (media_type.to_string(), manifest.clone()));
        self.manifests
            .insert(tag.to_string(), (media_type.to_string(), manifest.clone()));
        Image {
            digest,
            bytes: manifest,
            config: config_digest,
            layers,
        }
    }

    /// Registry behaviour shared by the tests: manifests, and blobs with range support.
    fn serve(&self, req: &Request) -> Reply {
        let route = req.route();
        let prefix = format!("/v2/{REPO}/");
        let Some(rest) = route.strip_prefix(&prefix) else {
            return not_found("NAME_UNKNOWN");
        };
        if let Some(reference) = rest.strip_prefix("manifests/") {
            return match self.manifests.get(reference) {
                Some((ct, bytes)) => Reply::new(200)
                    .header("Content-Type", ct)
                    .header("Docker-Content-Digest", &sha256_digest(bytes))
                    .body(bytes.clone()),
                None => not_found("MANIFEST_UNKNOWN"),
            };
        }
        if let Some(digest) = rest.strip_prefix("blobs/") {
            let Some(data) = self.blobs.get(digest) else {
                return not_found("BLOB_UNKNOWN");
            };
            return range_reply(req, data);
        }
        not_found("UNSUPPORTED")
    }
}

fn range_reply(req: &Request, data: &[u8]) -> Reply {
    if let Some(from) = req
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
    {
        if from >= data.len() {
            return Reply::new(416);
        }
        return Reply::new(206)
            .header(
                "Content-Range",
                &format!("bytes {from}-{}/{}", data.len() - 1, data.len()),
            )
            .body(data[from..].to_vec());
    }
    Reply::new(200)
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec())
}

fn not_found(code: &str) -> Reply {
    Reply::new(404)
        .header("Content-Type", "application/json")
        .body(format!(
            r#"{{"errors":[{{"code":"{code}","message":"not here"}}]}}"#
        ))
}

fn options(servers: &[&Server]) -> ClientOptions {
    ClientOptions {
        insecure_registries: servers.iter().map(|s| s.host()).collect(),
        mirrors: Default::default(),
        credentials: CredentialSources::default(),
        parallel: 2,
        retries: 3,
        retry_delay: Duration::from_millis(1),
        progress: Progress::Quiet,
        ca_file: None,
        user_agent: "ferry-test".into(),
        platform: Platform::parse("linux/amd64").unwrap(),
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
    }
}

fn reference(server: &Server, tag: &str) -> RemoteRef {
    RemoteRef {
        registry: server.host(),
        repository: REPO.into(),
        tag: Some(tag.into()),
        digest: None,
        user: None,
    }
}

fn with_credentials(opts: &mut ClientOptions, dir: &std::path::Path, text: &str) {
    let path = dir.join("credentials");
    std::fs::write(&path, text).unwrap();
    opts.credentials.netrc = Some(path);
}

fn blob_file(dest: &std::path::Path, digest: &str) -> std::path::PathBuf {
    dest.join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

/// The layout holds exactly what the contract says.
fn check_layout(dest: &std::path::Path, content: &Content, image: &Image, tag: Option<&str>) {
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["digest"], image.digest.as_str());
    assert_eq!(entries[0]["size"], image.bytes.len());
    match tag {
        Some(t) => assert_eq!(entries[0]["annotations"][REF_NAME_ANNOTATION], t),
        None => assert!(entries[0].get("annotations").is_none()),
    }
    assert_eq!(
        std::fs::read(blob_file(dest, &image.digest)).unwrap(),
        image.bytes
    );
    for d in std::iter::once(&image.config).chain(&image.layers) {
        assert_eq!(
            &std::fs::read(blob_file(dest, d)).unwrap(),
            &content.blobs[d],
            "{d}"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(dest.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn anonymous_pull_writes_an_oci_layout() {
    let mut content = Content::default();
    let image = content.add_image("v1", 1, &[300_000, 1000, 0], OCI_MANIFEST);
    let c = content.clone();
    let server = Server::start(move |r| c.serve(r));
    let client = Client::new(options(&[&server])).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let pulled = client.pull(&reference(&server, "v1"), dest.path()).unwrap();
    assert_eq!(pulled.manifest_digest, image.digest);
    assert_eq!(pulled.manifest_media_type, OCI_MANIFEST);
    assert_eq!(pulled.config_digest, image.config);
    assert_eq!(
        pulled
            .layers
            .iter()
            .map(|l| l.digest().to_string())
            .collect::<Vec<_>>(),
        image.layers
    );
    assert_eq!(
        pulled.fetched_bytes,
        301_000 + content.blobs[&image.config].len() as u64
    );
    check_layout(dest.path(), &content, &image, Some("v1"));
    // Asked for by digest, it resolves to itself and the index has no tag.
    let mut by_digest = reference(&server, "v1");
    by_digest.tag = None;
    by_digest.digest = Some(image.digest.clone());
    let dest2 = tempfile::tempdir().unwrap();
    client.pull(&by_digest, dest2.path()).unwrap();
    check_layout(dest2.path(), &content, &image, None);
    let resolved = client.resolve(&reference(&server, "v1")).unwrap();
    assert_eq!(resolved.manifest_digest, image.digest);
    assert_eq!(resolved.size, image.bytes.len() as u64);
    assert_eq!(resolved.index_digest, None);
}

#[test]
fn docker_schema2_is_stored_with_its_own_media_type() {
    let mut content = Content::default();
    let image = content.add_image("latest", 2, &[5000], DOCKER_MANIFEST);
    let c = content.clone();
    let server = Server::start(move |r| c.serve(r));
    let client = Client::new(options(&[&server])).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let mut r = reference(&server, "latest");
    r.tag = None;
    let pulled = client.pull(&r, dest.path()).unwrap();
    assert_eq!(pulled.manifest_media_type, DOCKER_MANIFEST);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.path().join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["mediaType"], DOCKER_MANIFEST);
    assert!(blob_file(dest.path(), &image.layers[0]).exists());
}

/// A registry behind a token server, like Docker Hub and most others.
fn token_registry(content: Content, expect: Option<String>, tokens: Arc<AtomicUsize>) -> Server {
    Server::start(move |r| {
        if r.route() == "/token" {
            tokens.fetch_add(1, Ordering::SeqCst);
            assert_eq!(r.query("service").as_deref(), Some("test-registry"));
            assert_eq!(r.query("scope"), Some(format!("repository:{REPO}:pull")));
            if r.header("authorization").map(str::to_string) != expect {
                return Reply::new(401).body(r#"{"details":"bad login"}"#);
            }
            return Reply::new(200).body(r#"{"token":"tok-123","expires_in":300}"#);
        }
        if r.header("authorization") != Some("Bearer tok-123") {
            let host = r.header("host").unwrap_or_default().to_string();
            return Reply::new(401)
                .header(
                    "WWW-Authenticate",
                    &format!(
                        r#"Bearer realm="http://{host}/token",service="test-registry",scope="repository:{REPO}:pull""#
                    ),
                )
                .body(r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#);
        }
        content.serve(r)
    })
}

#[test]
fn token_auth_anonymous_and_with_credentials() {
    let mut content = Content::default();
    let image = content.add_image("v1", 3, &[2000, 3000], OCI_MANIFEST);

    // Anonymous token: one token for the whole pull (manifest and three blobs).
    let tokens = Arc::new(AtomicUsize::new(0));
    let server = token_registry(content.clone(), None, tokens.clone());
    let client = Client::new(options(&[&server])).unwrap();
    let dest = tempfile::tempdir().unwrap();
    client.pull(&reference(&server, "v1"), dest.path()).unwrap();
    check_layout(dest.path(), &content, &image, Some("v1"));
    assert_eq!(tokens.load(Ordering::SeqCst), 1);

    // With a login: the token request carries it as Basic auth, the picked user's.
    let login = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("bob:s3cret")
    );
    let tokens = Arc::new(AtomicUsize::new(0));
    let server = token_registry(content.clone(), Some(login), tokens.clone());
    let creds_dir = tempfile::tempdir().unwrap();
    let mut opts = options(&[&server]);
    with_credentials(
        &mut opts,
        creds_dir.path(),
        &format!(
            "machine {h} login alice password wrong\nmachine {h} login bob password s3cret\n",
            h = server.host()
        ),
    );
    let client = Client::new(opts).unwrap();
    let mut r = reference(&server, "v1");
    r.user = Some("bob".into());
    let dest = tempfile::tempdir().unwrap();
    client.pull(&r, dest.path()).unwrap();
    check_layout(dest.path(), &content, &image, Some("v1"));
    assert_eq!(tokens.load(Ordering::SeqCst), 1);

    // Alice's password is wrong: the error names her login and the file, not the password.
    r.user = Some("alice".into());
    let e = client
        .pull(&r, tempfile::tempdir().unwrap().path())
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::CredentialsRejected { .. }),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("`alice`") && msg.contains("credentials"),
        "{msg}"
    );
    assert!(!msg.contains("wrong"), "{msg}");

    // No credentials at all where the token server wants them: "log in".
    let client = Client::new(options(&[&server])).unwrap();
    let e = client
        .pull(
            &reference(&server, "v1"),
            tempfile::tempdir().unwrap().path(),
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, RegistryError::LoginNeeded { .. }), "{msg}");
    assert!(msg.contains("log in: put credentials in"), "{msg}");
    assert!(!msg.contains('\n'));
}

#[test]
fn basic_auth() {
    let mut content = Content::default();
    let image = content.add_image("v1", 4, &[100], OCI_MANIFEST);
    let c = content.clone();
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("$oauthtoken:key:with:colons")
    );
    let server = Server::start(move |r| {
        if r.header("authorization") != Some(want.as_str()) {
            return Reply::new(401).header("WWW-Authenticate", r#"Basic realm="test""#);
        }
        c.serve(r)
    });
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&[&server]);
    with_credentials(
        &mut opts,
        dir.path(),
        &format!(
            "machine {} login $oauthtoken password key:with:colons\n",
            server.host()
        ),
    );
    let client = Client::new(opts).unwrap();
    let dest = tempfile::tempdir().unwrap();
    client.pull(&reference(&server, "v1"), dest.path()).unwrap();
    check_layout(dest.path(), &content, &image, Some("v1"));

    let anonymous = Client::new(options(&[&server])).unwrap();
    let e = anonymous
        .resolve(&reference(&server, "v1"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("refused anonymous access to ferry/test: log in: put credentials in"),
        "{e}"
    );
}

#[test]
fn index_picks_this_platform_and_lists_the_others() {
    let mut content = Content::default();
    let amd = content.add_image("amd", 5, &[1000], OCI_MANIFEST);
    let arm = content.add_image("arm", 6, &[1500], OCI_MANIFEST);
    let entry = |img: &Image, arch: &str, variant: &str| {
        format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{},"platform":{{"os":"linux","architecture":"{arch}"{variant}}}}}"#,
            img.digest,
            img.bytes.len()
        )
    };
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{},{}]}}"#,
        entry(&amd, "amd64", ""),
        entry(&arm, "arm64", r#","variant":"v8""#)
    );
    let index_digest = sha256_digest(index.as_bytes());
    content
        .manifests
        .insert("multi".into(), (OCI_INDEX.into(), index.into_bytes()));
    let c = content.clone();
    let server = Server::start(move |r| c.serve(r));

    let mut opts = options(&[&server]);
    opts.platform = Platform::parse("linux/arm64").unwrap();
    let client = Client::new(opts).unwrap();
    let resolved = client.resolve(&reference(&server, "multi")).unwrap();
    assert_eq!(resolved.manifest_digest, arm.digest);
    assert_eq!(
        resolved.index_digest.as_deref(),
        Some(index_digest.as_str())
    );
    assert_eq!(resolved.platform.unwrap().name(), "linux/arm64/v8");
    // resolve reads the index only, not the platform manifest.
    assert_eq!(server.count(&format!("/v2/{REPO}/manifests/sha256:")), 0);
    let dest = tempfile::tempdir().unwrap();
    let pulled = client
        .pull(&reference(&server, "multi"), dest.path())
        .unwrap();
    assert_eq!(pulled.manifest_digest, arm.digest);
    check_layout(dest.path(), &content, &arm, Some("multi"));
    assert!(!blob_file(dest.path(), &amd.layers[0]).exists());

    let client = Client::new(options(&[&server])).unwrap();
    assert_eq!(
        client
            .resolve(&reference(&server, "multi"))
            .unwrap()
            .manifest_digest,
        amd.digest
    );

    let mut opts = options(&[&server]);
    opts.platform = Platform::parse("linux/ppc64le").unwrap();
    let e = Client::new(opts)
        .unwrap()
        .resolve(&reference(&server, "multi"))
        .unwrap_err();
    assert!(matches!(e, RegistryError::NoPlatform { .. }));
    let msg = e.to_string();
    assert!(
        msg.ends_with("has no image for linux/ppc64le; it has: linux/amd64, linux/arm64/v8"),
        "{msg}"
    );
}

#[test]
fn corrupt_blobs_and_manifests_are_refused() {
    let mut content = Content::default();
    let image = content.add_image("v1", 7, &[4096], OCI_MANIFEST);
    let layer = image.layers[0].clone();
    let mut bad = content.clone();
    // Same length, one byte flipped.
    bad.blobs.get_mut(&layer).unwrap()[100] ^= 1;
    let server = Server::start(move |r| bad.serve(r));
    let client = Client::new(options(&[&server])).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let e = client
        .pull(&reference(&server, "v1"), dest.path())
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{msg}");
    assert!(
        msg.contains(&layer) && msg.contains("corrupt") && msg.contains(&server.host()),
        "{msg}"
    );
    assert!(!blob_file(dest.path(), &layer).exists());
    assert!(!dest.path().join("index.json").exists());
    // Nothing half-written is kept under a final name.
    let names: Vec<_> = std::fs::read_dir(dest.path().join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names.iter().all(|n| !n
            .to_string_lossy()
            .contains(layer.strip_prefix("sha256:").unwrap())),
        "{names:?}"
    );

    // Longer than its descriptor: stopped at the declared size.
    let mut long = content.clone();
    long.blobs
        .get_mut(&layer)
        .unwrap()
        .extend_from_slice(b"more");
    let server = Server::start(move |r| long.serve(r));
    let client = Client::new(options(&[&server])).unwrap();
    let e = client
        .pull(
            &reference(&server, "v1"),
            tempfile::tempdir().unwrap().path(),
        )
        .unwrap_err();
    assert!(matches!(e, RegistryError::SizeMismatch { .. }), "{e}");

    // A manifest asked for by digest must have that digest.
    let mut r = reference(&server, "v1");
    r.digest = Some(format!("sha256:{}", "ab".repeat(32)));
    let mut swapped = content.clone();
    swapped
        .manifests
        .insert(r.digest.clone().unwrap(), content.manifests["v1"].clone());
    let server = Server::start(move |r| swapped.serve(r));
    r.registry = server.host();
    let e = Client::new(options(&[&server]))
        .unwrap()
        .resolve(&r)
        .unwrap_err();
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");
}

#[test]
fn server_errors_are_retried_then_reported() {
    let mut content = Content::default();
    let image = content.add_image("v1", 8, &[10_000], OCI_MANIFEST);
    let c = content.clone();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let server = Server::start(move |r| {
        if r.route().contains("/blobs/") {
            match h.fetch_add(1, Ordering::SeqCst) {
                0 => return Reply::new(500).body("oops"),
                1 => return Reply::new(429).header("Retry-After", "0"),
                _ => {}
            }
        }
        c.serve(r)
    });
    let mut opts = options(&[&server]);
    opts.parallel = 1;
    let client = Client::new(opts).unwrap();
    let dest = tempfile::tempdir().unwrap();
    client.pull(&reference(&server, "v1"), dest.path()).unwrap();
    check_layout(dest.path(), &content, &image, Some("v1"));

    let c = content.clone();
    let server = Server::start(move |r| {
        if r.route().contains("/blobs/") {
            return Reply::new(503)
                .body(r#"{"errors":[{"code":"UNAVAILABLE","message":"maintenance"}]}"#);
        }
        c.serve(r)
    });
    let client = Client::new(options(&[&server])).unwrap();
    let e = client
        .pull(
            &reference(&server, "v1"),
            tempfile::tempdir().unwrap().path(),
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, RegistryError::GaveUp { tries: 4, .. }), "{msg}");
    assert!(
        msg.contains(&server.host()) && msg.contains("blob sha256:") && msg.contains("503"),
        "{msg}"
    );
    assert!(msg.contains("UNAVAILABLE: maintenance"), "{msg}");
}

#[test]
fn truncated_download_continues_with_range() {
    let mut content = Content::default();
    let image = content.add_image("v1", 9, &[700_000], OCI_MANIFEST);
    let layer = image.layers[0].clone();
    let c = content.clone();
    let first = Arc::new(AtomicUsize::new(0));
    let f = first.clone();
    let server = Server::start(move |r| {
        let reply = c.serve(r);
        if r.route().ends_with(&layer) && f.fetch_add(1, Ordering::SeqCst) == 0 {
            return reply.cut_after(300_000);
        }
        reply
    });
    let client = Client::new(options(&[&server])).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let pulled = client.pull(&reference(&server, "v1"), dest.path()).unwrap();
    check_layout(dest.path(), &content, &image, Some("v1"));
    let ranges: Vec<_> = server
        .requests()
        .iter()
        .filter_map(|r| r.header("range").map(str::to_string))
        .collect();
    assert_eq!(ranges, ["bytes=300000-"]);
    // The cut-off part was not fetched twice.
    assert_eq!(
        pulled.fetched_bytes,
        700_000 + content.blobs[&image.config].len() as u64
    );
}

#[test]
fn truncated_download_restarts_without_range_support() {
    let mut content = Content::default();
    let image = content.add_image("v1", 10, &[500_000], OCI_MANIFEST);
    let layer = image.layers[0].clone();
    let c = content.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let server = Server::start(move |r| {
        if r.route().ends_with(&layer) {
            // Ignores Range, as some servers do.
            let reply = Reply::new(200).body(c.blobs[&layer].clone());
            return if n2.fetch_add(1, Ordering::SeqCst) == 0 {
                reply.cut_after(123_456)
            } else {
                reply
            };
        }
        c.serve(r)
    });
    let client = Client::new(options(&[&server])).unwrap();
    let dest = tempfile::tempdir().unwrap();
    client.pull(&reference(&server, "v1"), dest.path()).unwrap();
    check_layout(dest.path(), &content, &image, Some("v1"));
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

#[test]
fn cross_host_redirect_drops_authorization() {
    let mut content = Content::default();
    let image = content.add_image("v1", 11, &[20_000], OCI_MANIFEST);
    let blobs = content.blobs.clone();
    let storage = Server::start(move |r| {
        let digest = r.route().trim_start_matches("/storage/");
        match blobs.get(digest) {
            Some(data) if r.query("sig").as_deref() == Some("ok") => range_reply(r, data),
            _ => Reply::new(403),
        }
    });
    let storage_host = storage.host();
    let c = content.clone();
    let server = Server::start(move |r| {
        if r.route() == "/token" {
            return Reply::new(200).body(r#"{"access_token":"tok-9"}"#);
        }
        if r.header("authorization") != Some("Bearer tok-9") {
            let host = r.header("host").unwrap_or_default().to_string();
            return Reply::new(401).header(
                "WWW-Authenticate",
                &format!(r#"Bearer realm="http://{host}/token",service="s""#),
            );
        }
        if let Some(digest) = r.route().strip_prefix(&format!("/v2/{REPO}/blobs/")) {
            return Reply::new(307).header(
                "Location",
                &format!("http://{storage_host}/storage/{digest}?sig=ok"),
            );
        }
        c.serve(r)
    });
    let client = Client::new(options(&[&server, &storage])).unwrap();
    let dest = tempfile::tempdir().unwrap();
    client.pull(&reference(&server, "v1"), dest.path()).unwrap();
    check_layout(dest.path(), &content, &image, Some("v1"));
    let at_storage = storage.requests();
    assert_eq!(at_storage.len(), 2, "config and layer");
    assert!(
        at_storage
            .iter()
            .all(|r| r.header("authorization").is_none()),
        "{at_storage:?}"
    );
    assert!(server
        .requests()
        .iter()
        .filter(|r| r.route().contains("/blobs/"))
        .all(|r| r.header("authorization") == Some("Bearer tok-9")));
}

#[test]
fn clear_errors_for_missing_images_schema1_and_bad_references() {
    let server = Server::start(|r| {
        if r.route().ends_with("/manifests/old") {
            return Reply::new(200)
                .header(
                    "Content-Type",
                    "application/vnd.docker.distribution.manifest.v1+prettyjws",
                )
                .body(r#"{"schemaVersion":1,"name":"ferry/test","tag":"old","fsLayers":[]}"#);
        }
        if r.route().ends_with("/manifests/helm") {
            return Reply::new(200).header("Content-Type", OCI_MANIFEST).body(format!(
                r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"sha256:{}","size":1}},"layers":[]}}"#,
                "0".repeat(64)
            ));
        }
        not_found("MANIFEST_UNKNOWN")
    });
    let client = Client::new(options(&[&server])).unwrap();
    let e = client
        .resolve(&reference(&server, "nope"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "no such image or tag: {}/ferry/test:nope (MANIFEST_UNKNOWN: not here)",
            server.host()
        )
    );
    let e = client.resolve(&reference(&server, "old")).unwrap_err();
    assert!(matches!(e, RegistryError::Schema1 { .. }));
    assert!(e.to_string().contains("schema 1"), "{e}");
    let e = client
        .resolve(&reference(&server, "helm"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unsupported config of type application/vnd.cncf.helm.config.v1+json"),
        "{e}"
    );

    for (repo, tag) in [
        ("ferry/../x", "v1"),
        ("Ferry/x", "v1"),
        ("ferry/x", "a/b"),
        ("ferry/x?y", "v1"),
        ("", "v1"),
    ] {
        let mut r = reference(&server, tag);
        r.repository = repo.into();
        let e = client.resolve(&r).unwrap_err();
        assert!(
            matches!(e, RegistryError::BadReference { .. }),
            "{repo} {tag}: {e}"
        );
    }
    let mut r = reference(&server, "v1");
    r.registry = "evil/host".into();
    assert!(matches!(
        client.resolve(&r),
        Err(RegistryError::BadReference { .. })
    ));
    let before = server.requests().len();
    let mut r = reference(&server, "v1");
    r.digest = Some("md5:abc".into());
    let e = client.resolve(&r).unwrap_err().to_string();
    assert!(e.contains("only sha256"), "{e}");
    assert_eq!(server.requests().len(), before, "nothing was sent");
}

#[test]
fn an_interrupted_pull_resumes_without_refetching() {
    let mut content = Content::default();
    let image = content.add_image("v1", 12, &[50_000, 60_000, 400_000], OCI_MANIFEST);
    let broken = image.layers[2].clone();
    let c = content.clone();
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (f, b) = (fail.clone(), broken.clone());
    let server = Server::start(move |r| {
        let reply = c.serve(r);
        if f.load(Ordering::SeqCst) && r.route().ends_with(&b) {
            // The connection keeps breaking after 100 000 bytes; Range is ignored while
            // the outage lasts, so the client keeps a partial file and then gives up.
            return Reply::new(200).body(c.blobs[&b].clone()).cut_after(100_000);
        }
        reply
    });
    let mut opts = options(&[&server]);
    opts.parallel = 1;
    opts.retries = 1;
    let client = Client::new(opts).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let e = client
        .pull(&reference(&server, "v1"), dest.path())
        .unwrap_err();
    assert!(matches!(e, RegistryError::GaveUp { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("broke off after 100000 of 400000 bytes")
            || e.to_string().contains("ended after"),
        "{e}"
    );
    assert!(!dest.path().join("index.json").exists());
    let partial = dest.path().join("blobs/sha256").join(format!(
        ".{}.partial",
        broken.strip_prefix("sha256:").unwrap()
    ));
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), 100_000);

    fail.store(false, Ordering::SeqCst);
    let before = server.requests().len();
    let pulled = client.pull(&reference(&server, "v1"), dest.path()).unwrap();
    check_layout(dest.path(), &content, &image, Some("v1"));
    let again: Vec<_> = server.requests()[before..]
        .iter()
        .map(|r| r.route().to_string())
        .collect();
    let blob_requests: Vec<_> = again.iter().filter(|p| p.contains("/blobs/")).collect();
    // The config and the finished layers were already there: only the broken one is asked
    // for, from where the partial file ends.
    assert_eq!(
        blob_requests,
        [&format!("/v2/{REPO}/blobs/{broken}")],
        "{again:?}"
    );
    assert_eq!(pulled.fetched_bytes, 300_000);
    assert_eq!(pulled.reused_blobs, 3);
    let last = server.requests().last().unwrap().clone();
    assert_eq!(last.header("range"), Some("bytes=100000-"));

    // A third pull is only the manifest.
    let before = server.requests().len();
    let pulled = client.pull(&reference(&server, "v1"), dest.path()).unwrap();
    assert_eq!(pulled.fetched_bytes, 0);
    assert_eq!(pulled.reused_blobs, 4);
    assert_eq!(server.requests().len() - before, 1);
}

#[test]
fn a_damaged_partial_file_is_downloaded_again() {
    let mut content = Content::default();
    let image = content.add_image("v1", 13, &[80_000], OCI_MANIFEST);
    let layer = image.layers[0].clone();
    let c = content.clone();
    let server = Server::start(move |r| c.serve(r));
    let dest = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dest.path().join("blobs/sha256")).unwrap();
    let partial = dest.path().join("blobs/sha256").join(format!(
        ".{}.partial",
        layer.strip_prefix("sha256:").unwrap()
    ));
    std::fs::write(&partial, vec![0u8; 1000]).unwrap();
    let client = Client::new(options(&[&server])).unwrap();
    client.pull(&reference(&server, "v1"), dest.path()).unwrap();
    check_layout(dest.path(), &content, &image, Some("v1"));
    let ranges: Vec<_> = server
        .requests()
        .iter()
        .filter_map(|r| r.header("range").map(str::to_string))
        .collect();
    assert_eq!(ranges, ["bytes=1000-"]);
}

#[test]
fn plain_http_needs_the_registry_marked_insecure() {
    // What a plain-http server says to a TLS handshake.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let _ = std::io::Write::write_all(
                &mut conn,
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
            );
        }
    });
    let client = Client::new(options(&[])).unwrap();
    let r = RemoteRef {
        registry: host,
        repository: REPO.into(),
        tag: None,
        digest: None,
        user: None,
    };
    let e = client.resolve(&r).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, RegistryError::Tls { .. }), "{msg}");
    assert!(msg.contains("must be marked insecure"), "{msg}");
}

#[test]
fn unknown_hosts_are_named() {
    let client = Client::new(options(&[])).unwrap();
    let r = RemoteRef {
        registry: "no-such-registry.invalid".into(),
        repository: REPO.into(),
        tag: None,
        digest: None,
        user: None,
    };
    let e = client.resolve(&r).unwrap_err().to_string();
    assert_eq!(
        e,
        "unknown registry host no-such-registry.invalid: the name does not resolve (check the image reference)"
    );
}

#[test]
fn token_server_over_plain_http_is_refused_for_an_https_registry() {
    // Exercised through the transport directly: a real https registry is not at hand.
    let r = RemoteRef {
        registry: "registry.example".into(),
        repository: "a/b".into(),
        tag: None,
        digest: None,
        user: None,
    };
    let client = Client::new(options(&[])).unwrap();
    let target = transport::Target::new(&r, client.insecure(&r));
    assert!(!target.insecure);
    assert_eq!(target.origin, "https://registry.example");
    let e = client
        .transport
        .authenticate_for_test(&target, r#"Bearer realm="http://auth.example/token""#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("over plain http; refused"), "{e}");
}
