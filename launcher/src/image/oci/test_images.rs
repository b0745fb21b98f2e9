//! Small images written by the tests themselves: an OCI layout with one gzip layer, and a
//! `docker save` archive; shared by the reader's tests and the importer's.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use oci_spec::image::Platform;

use super::{Image, OciError};
use crate::image::digest::sha256_digest;
use crate::image::media_type::{OCI_CONFIG, OCI_MANIFEST};
use crate::image::platform::PlatformExt;

pub(crate) use oci_spec::image::ANNOTATION_REF_NAME as REF_NAME;

/// This machine's architecture as image configs name it.
pub(crate) fn host_arch() -> String {
    Platform::host().architecture().to_string()
}

/// A small OCI layout written by the tests themselves: one gzip layer holding
/// `/hello` (and whatever else `files` adds).
pub(crate) struct TestLayout {
    pub dir: tempfile::TempDir,
    pub manifest_digest: String,
    pub layer_digest: String,
}

pub(crate) fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, name, *body).unwrap();
    }
    b.into_inner().unwrap()
}

pub(crate) fn write_blob(dir: &Path, bytes: &[u8]) -> String {
    let d = sha256_digest(bytes);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(&d[7..]), bytes).unwrap();
    d
}

pub(crate) fn make_layout(files: &[(&str, &[u8])], tag: &str) -> TestLayout {
    let dir = tempfile::tempdir().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer_tar(files)).unwrap();
    let layer = gz.finish().unwrap();
    let layer_digest = write_blob(dir.path(), &layer);
    let config = format!(
        r#"{{"architecture":"{}","os":"linux","config":{{"Env":["PATH=/bin","FOO=bar"],"Cmd":["/bin/sh"],"WorkingDir":"/srv"}},"rootfs":{{"type":"layers","diff_ids":["sha256:{}"]}}}}"#,
        host_arch(),
        "0".repeat(64)
    );
    let config_digest = write_blob(dir.path(), config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let manifest_digest = write_blob(dir.path(), manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{manifest_digest}","size":{},"annotations":{{"{REF_NAME}":"{tag}"}}}}]}}"#,
        manifest.len()
    );
    std::fs::write(dir.path().join("index.json"), index).unwrap();
    std::fs::write(
        dir.path().join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    TestLayout {
        dir,
        manifest_digest,
        layer_digest,
    }
}

pub(crate) fn read_all_layers(img: &Image) -> Result<(), OciError> {
    for i in 0..img.layers.len() {
        let mut r = img.layer(i)?;
        io::copy(&mut r, &mut io::sink()).unwrap();
        r.finish()?;
    }
    Ok(())
}

pub(crate) fn tar_of_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

/// `docker save` output, written by hand: manifest.json, <id>.json, <dir>/layer.tar,
/// and a symlinked duplicate layer as docker writes it.
pub(crate) fn make_docker_archive(out: &Path, files: &[(&str, &[u8])]) -> String {
    let layer = layer_tar(files);
    let diff = sha256_digest(&layer);
    let config = format!(
        r#"{{"architecture":"{}","os":"linux","config":{{"Env":["A=1"]}},"rootfs":{{"type":"layers","diff_ids":["{diff}","{diff}"]}}}}"#,
        host_arch()
    );
    let cid = sha256_digest(config.as_bytes());
    let manifest = format!(
        r#"[{{"Config":"{}.json","RepoTags":["busybox:1.36"],"Layers":["aaa/layer.tar","bbb/layer.tar"]}}]"#,
        &cid[7..]
    );
    let mut b = tar::Builder::new(File::create(out).unwrap());
    let mut add = |name: &str, body: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, body).unwrap();
    };
    add("manifest.json", manifest.as_bytes());
    add(&format!("{}.json", &cid[7..]), config.as_bytes());
    add("aaa/layer.tar", &layer);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "bbb/layer.tar", "../aaa/layer.tar")
        .unwrap();
    b.finish().unwrap();
    cid
}
