//! `ferry build --format oci-archive|docker-archive`: the built tree as a one-layer image
//! archive that other tools load (`skopeo`, `docker load`, `podman load`), next to the
//! squashfs. The layer is an uncompressed tar of the tree with everything owned by root,
//! as in the squashfs; the config carries Env, WorkingDir, Entrypoint, Cmd, User and Labels.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    ConfigBuilder, Descriptor, ImageConfigurationBuilder, ImageIndexBuilder, ImageManifestBuilder,
    MediaType, OciLayoutBuilder, Os, Platform, RootFsBuilder, ANNOTATION_REF_NAME,
};
use sha2::{Digest as _, Sha256};

use crate::image::config::ImageConfig;
use crate::image::digest::{hex, parse_digest, sha256_digest};
use crate::image::platform::PlatformExt;

/// Which archive `--format` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// A tar of an OCI image layout (`skopeo … oci-archive:FILE`).
    Oci,
    /// What `docker save` writes (`docker load`, `skopeo … docker-archive:FILE`).
    Docker,
}

impl ArchiveFormat {
    /// The file an archive goes to when only the squashfs was named: `out.sqsh` ->
    /// `out.oci.tar` / `out.docker.tar`.
    pub fn default_path(self, squashfs: &Path) -> PathBuf {
        let stem = squashfs
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let suffix = match self {
            ArchiveFormat::Oci => "oci.tar",
            ArchiveFormat::Docker => "docker.tar",
        };
        squashfs.with_file_name(format!("{stem}.{suffix}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot describe the image: {0}")]
    Model(#[from] oci_spec::OciSpecError),
    #[error(transparent)]
    Digest(#[from] crate::image::digest::DigestError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// What goes into the archive besides the tree.
pub struct ArchiveImage<'a> {
    pub config: &'a ImageConfig,
    pub labels: &'a BTreeMap<String, String>,
    /// `NAME:TAG` the archive calls the image (docker's RepoTags, OCI's ref.name).
    pub name: &'a str,
}

/// The name an archive gives the image built into `squashfs`: its file stem, lowercased,
/// with what a repository name may not hold replaced, tagged `latest`.
pub fn image_name(squashfs: &Path) -> String {
    let stem = squashfs
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut name: String = stem
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '.' | '_' | '-' => c,
            _ => '-',
        })
        .collect();
    name = name
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    if name.is_empty() {
        name = "image".into();
    }
    format!("{name}:latest")
}

/// Write `rootfs` as an image archive at `output` (appearing complete or not at all);
/// `scratch` is a private directory for the layer while it is made.
pub fn write(
    rootfs: &Path,
    image: &ArchiveImage,
    format: ArchiveFormat,
    output: &Path,
    scratch: &Path,
) -> Result<(), ArchiveError> {
    let layer_path = scratch.join("layer.tar");
    let layer = write_layer(rootfs, &layer_path)?;
    let result = (|| {
        let config = config_blob(image, &layer.digest)?;
        let mut partial = output.as_os_str().to_owned();
        partial.push(format!(".ferry-{}.partial", std::process::id()));
        let partial = PathBuf::from(partial);
        let written = match format {
            ArchiveFormat::Oci => write_oci(&partial, image, &config, &layer, &layer_path),
            ArchiveFormat::Docker => write_docker(&partial, image, &config, &layer, &layer_path),
        }
        .and_then(|()| fs::rename(&partial, output).map_err(io_err("write", output)));
        if written.is_err() {
            let _ = fs::remove_file(&partial);
        }
        written
    })();
    let _ = fs::remove_file(&layer_path);
    result
}

struct Layer {
    digest: String,
    size: u64,
}

/// Counts and hashes what passes through to the file.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_layer(rootfs: &Path, path: &Path) -> Result<Layer, ArchiveError> {
    let file = File::create(path).map_err(io_err("create", path))?;
    let mut tar = tar::Builder::new(Hashing {
        inner: BufWriter::new(file),
        hash: Sha256::new(),
        size: 0,
    });
    tar.follow_symlinks(false);
    let mut links = HashMap::new();
    add_tree(&mut tar, rootfs, Path::new(""), &mut links)?;
    let mut out = tar.into_inner().map_err(io_err("write", path))?;
    out.flush().map_err(io_err("write", path))?;
    out.inner
        .into_inner()
        .map_err(|e| io_err("write", path)(e.into_error()))?
        .sync_all()
        .map_err(io_err("write", path))?;
    Ok(Layer {
        digest: format!("sha256:{}", hex(&out.hash.finalize())),
        size: out.size,
    })
}

/// The entries under `rootfs/rel`, sorted so that equal trees give equal layers; files
/// seen before under another name (hard links) are written as links to the first.
fn add_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    rootfs: &Path,
    rel: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), ArchiveError> {
    let dir = rootfs.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .map_err(io_err("read", &dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_err("read", &dir))?;
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let path = rootfs.join(&rel);
        let meta = fs::symlink_metadata(&path).map_err(io_err("read", &path))?;
        let kind = meta.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        // Permission bits only, as tar writes them (the kind is the entry type).
        header.set_mode(meta.mode() & 0o7777);
        // Only the user's uid is mapped while building: everything is root's in the
        // image, as in the squashfs.
        header.set_uid(0);
        header.set_gid(0);
        let _ = header.set_username("root");
        let _ = header.set_groupname("root");
        // The tree is a throwaway copy owned by the user: what its owner may not read
        // (a mode 000 file, a 0311 directory) is opened up; the header keeps the mode.
        let needed = if kind.is_dir() { 0o500 } else { 0o400 };
        if (kind.is_dir() || kind.is_file()) && meta.mode() & needed != needed {
            fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode() | needed))
                .map_err(io_err("read", &path))?;
        }
        let added = if kind.is_dir() {
            header.set_size(0);
            tar.append_data(&mut header, &rel, io::empty())
                .map(|()| add_tree(tar, rootfs, &rel, links))
        } else if kind.is_symlink() {
            let target = fs::read_link(&path).map_err(io_err("read", &path))?;
            header.set_size(0);
            tar.append_link(&mut header, &rel, &target).map(|()| Ok(()))
        } else if kind.is_file() {
            let id = (meta.dev(), meta.ino());
            match links.get(&id) {
                Some(first) if meta.nlink() > 1 => {
                    header.set_entry_type(tar::EntryType::Link);
                    header.set_size(0);
                    tar.append_link(&mut header, &rel, first).map(|()| Ok(()))
                }
                _ => {
                    if meta.nlink() > 1 {
                        links.insert(id, rel.clone());
                    }
                    let file = File::open(&path).map_err(io_err("read", &path))?;
                    tar.append_data(&mut header, &rel, file).map(|()| Ok(()))
                }
            }
        } else {
            // Sockets, fifos and devices: an unprivileged build makes none worth keeping.
            continue;
        };
        added.map_err(io_err("write the layer with", &path))??;
    }
    Ok(())
}

fn config_blob(image: &ArchiveImage, diff_id: &str) -> Result<Vec<u8>, ArchiveError> {
    let c = image.config;
    let mut config = ConfigBuilder::default().env(c.env.clone());
    if let Some(w) = &c.working_dir {
        config = config.working_dir(w.clone());
    }
    if let Some(e) = &c.entrypoint {
        config = config.entrypoint(e.clone());
    }
    if let Some(cmd) = &c.cmd {
        config = config.cmd(cmd.clone());
    }
    if let Some(u) = &c.user {
        config = config.user(u.clone());
    }
    if !image.labels.is_empty() {
        config = config.labels(
            image
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>(),
        );
    }
    let host = Platform::host();
    let mut configuration = ImageConfigurationBuilder::default()
        .created(rfc3339(crate::store::cache::now()))
        .architecture(host.architecture().clone())
        .os(Os::Linux)
        .config(config.build()?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id.to_string()])
                .build()?,
        );
    if let Some(v) = host.variant() {
        configuration = configuration.variant(v.clone());
    }
    let configuration = configuration.build()?;
    Ok(serde_json::to_vec(&configuration).expect("image configs serialise"))
}

/// `2023-11-14T22:13:20Z` for seconds since the epoch (UTC; days to a civil date as in
/// the proleptic Gregorian calendar).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rest = secs % 86_400;
    // Days since 0000-03-01, so that leap days fall at the end of a year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// The archive's own tar, its members owned by root and dated like the build.
struct ArchiveTar {
    tar: tar::Builder<BufWriter<File>>,
    path: PathBuf,
    mtime: u64,
}

impl ArchiveTar {
    fn create(path: &Path) -> Result<ArchiveTar, ArchiveError> {
        let file = File::create(path).map_err(io_err("create", path))?;
        Ok(ArchiveTar {
            tar: tar::Builder::new(BufWriter::new(file)),
            path: path.into(),
            mtime: crate::store::cache::now(),
        })
    }

    fn header(&self, size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(self.mtime);
        h
    }

    fn dir(&mut self, name: &str) -> Result<(), ArchiveError> {
        let mut h = self.header(0, 0o755, tar::EntryType::Directory);
        self.tar
            .append_data(&mut h, name, io::empty())
            .map_err(io_err("write", &self.path))
    }

    fn bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), ArchiveError> {
        let mut h = self.header(bytes.len() as u64, 0o644, tar::EntryType::Regular);
        self.tar
            .append_data(&mut h, name, bytes)
            .map_err(io_err("write", &self.path))
    }

    fn file(&mut self, name: &str, from: &Path, size: u64) -> Result<(), ArchiveError> {
        let f = File::open(from).map_err(io_err("read", from))?;
        let mut h = self.header(size, 0o644, tar::EntryType::Regular);
        self.tar
            .append_data(&mut h, name, f)
            .map_err(io_err("write", &self.path))
    }

    fn finish(self) -> Result<(), ArchiveError> {
        let path = self.path;
        let file = self
            .tar
            .into_inner()
            .map_err(io_err("write", &path))?
            .into_inner()
            .map_err(|e| io_err("write", &path)(e.into_error()))?;
        file.sync_all().map_err(io_err("write", &path))
    }
}

fn write_oci(
    path: &Path,
    image: &ArchiveImage,
    config: &[u8],
    layer: &Layer,
    layer_path: &Path,
) -> Result<(), ArchiveError> {
    let config_digest = sha256_digest(config);
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(
            MediaType::ImageConfig,
            config.len() as u64,
            parse_digest(&config_digest)?,
        ))
        .layers(vec![Descriptor::new(
            MediaType::ImageLayer,
            layer.size,
            parse_digest(&layer.digest)?,
        )])
        .build()?;
    let manifest = serde_json::to_vec(&manifest).expect("manifests serialise");
    let manifest_digest = sha256_digest(&manifest);
    let mut listed = Descriptor::new(
        MediaType::ImageManifest,
        manifest.len() as u64,
        parse_digest(&manifest_digest)?,
    );
    listed.set_annotations(Some(HashMap::from([(
        ANNOTATION_REF_NAME.to_string(),
        image.name.to_string(),
    )])));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![listed])
        .build()?;
    let layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()?;
    let blob = |digest: &str| format!("blobs/sha256/{}", &digest["sha256:".len()..]);
    let mut tar = ArchiveTar::create(path)?;
    tar.bytes(
        "oci-layout",
        &serde_json::to_vec(&layout).expect("layouts serialise"),
    )?;
    tar.bytes(
        "index.json",
        &serde_json::to_vec(&index).expect("indexes serialise"),
    )?;
    tar.dir("blobs")?;
    tar.dir("blobs/sha256")?;
    tar.bytes(&blob(&config_digest), config)?;
    tar.bytes(&blob(&manifest_digest), &manifest)?;
    tar.file(&blob(&layer.digest), layer_path, layer.size)?;
    tar.finish()
}

fn write_docker(
    path: &Path,
    image: &ArchiveImage,
    config: &[u8],
    layer: &Layer,
    layer_path: &Path,
) -> Result<(), ArchiveError> {
    let config_name = format!("{}.json", &sha256_digest(config)["sha256:".len()..]);
    let layer_dir = &layer.digest["sha256:".len()..];
    let layer_name = format!("{layer_dir}/layer.tar");
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": [image.name],
        "Layers": [layer_name],
    }]);
    let mut tar = ArchiveTar::create(path)?;
    tar.bytes(&config_name, config)?;
    tar.dir(layer_dir)?;
    tar.file(&layer_name, layer_path, layer.size)?;
    tar.bytes(
        "manifest.json",
        &serde_json::to_vec(&manifest).expect("manifests serialise"),
    )?;
    tar.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::oci::Image;
    use std::io::Read;

    fn tree(root: &Path) {
        fs::create_dir_all(root.join("srv/app")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("srv/app/data.txt"), "hello\n").unwrap();
        fs::hard_link(root.join("srv/app/data.txt"), root.join("etc/same.txt")).unwrap();
        std::os::unix::fs::symlink("../srv/app/data.txt", root.join("etc/link")).unwrap();
        fs::create_dir(root.join("locked")).unwrap();
        fs::write(root.join("locked/secret"), "s").unwrap();
        fs::set_permissions(
            root.join("locked/secret"),
            fs::Permissions::from_mode(0o000),
        )
        .unwrap();
        fs::set_permissions(root.join("locked"), fs::Permissions::from_mode(0o311)).unwrap();
    }

    type Members = BTreeMap<String, (tar::EntryType, u32, String)>;

    /// Each member's kind, owner and content (a link's target), and its mode.
    fn layer_members(image: &Image) -> (Members, BTreeMap<String, u32>) {
        let mut bytes = Vec::new();
        image.layer(0).unwrap().read_to_end(&mut bytes).unwrap();
        let mut out = BTreeMap::new();
        let mut modes = BTreeMap::new();
        let mut archive = tar::Archive::new(&bytes[..]);
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            let kind = e.header().entry_type();
            let uid = e.header().uid().unwrap() as u32;
            let mut body = String::new();
            e.read_to_string(&mut body).unwrap();
            let link = e
                .link_name()
                .unwrap()
                .map(|l| l.display().to_string())
                .unwrap_or_default();
            modes.insert(name.clone(), e.header().mode().unwrap());
            out.insert(name, (kind, uid, body + &link));
        }
        (out, modes)
    }

    #[test]
    fn dates_in_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn both_archives_read_back_with_the_config_and_the_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let config = ImageConfig {
            env: vec!["PATH=/usr/bin:/bin".into(), "APP_MODE=production".into()],
            working_dir: Some("/srv/app".into()),
            entrypoint: Some(vec!["cat".into()]),
            cmd: Some(vec!["data.txt".into()]),
            user: None,
        };
        let labels = BTreeMap::from([("org.example.kind".to_string(), "test".to_string())]);
        let image = ArchiveImage {
            config: &config,
            labels: &labels,
            name: &image_name(Path::new("/x/My App.sqsh")),
        };
        assert_eq!(image.name, "my-app:latest");
        for format in [ArchiveFormat::Oci, ArchiveFormat::Docker] {
            // A tree of its own each time: writing opens up what its owner could not read.
            let root = tmp.path().join(format!("rootfs-{format:?}"));
            tree(&root);
            let out = format.default_path(&tmp.path().join("out.sqsh"));
            write(&root, &image, format, &out, tmp.path()).unwrap();
            let read = match format {
                ArchiveFormat::Oci => Image::open_oci_archive(&out, None),
                ArchiveFormat::Docker => Image::open_docker_archive(&out, None),
            }
            .unwrap();
            assert_eq!(read.config.config, config);
            let raw: serde_json::Value = serde_json::from_slice(&read.config_bytes).unwrap();
            assert_eq!(raw["config"]["Labels"]["org.example.kind"], "test");
            let (members, modes) = layer_members(&read);
            // Sorted: etc/ comes first, so the second name is the hard link.
            assert_eq!(
                members["etc/same.txt"],
                (tar::EntryType::Regular, 0, "hello\n".into())
            );
            assert_eq!(
                members["srv/app/data.txt"],
                (tar::EntryType::Link, 0, "etc/same.txt".into())
            );
            assert_eq!(
                members["etc/link"],
                (tar::EntryType::Symlink, 0, "../srv/app/data.txt".into())
            );
            assert_eq!(members["srv"].0, tar::EntryType::Directory);
            assert_eq!(members["locked/secret"].2, "s");
            assert_eq!(modes["locked"], 0o311);
            assert_eq!(modes["locked/secret"], 0);
            // Nothing of the work is left beside the archive or in the scratch directory.
            let mut names: Vec<String> = fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("partial") || n == "layer.tar")
                .collect();
            names.sort();
            assert!(names.is_empty(), "{names:?}");
        }
    }
}
