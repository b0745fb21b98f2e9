//! Import: turn an image reference into a squashfs `ferry run` can mount, through the
//! cache. OCI layouts are the core path: OCI and docker archives are read the same way,
//! and a registry pull (elsewhere) writes a layout and then calls [`from_oci_layout`].
//!
//! The squashfs is made with `mksquashfs -all-root`: every file is owned by uid/gid 0.
//! Inside a container the user is either themselves (files then show as `nobody`, and
//! the permission bits for others apply, as for any root-owned system file) or, with
//! remap-root, uid 0 (files show as root-owned, which is what the image meant for its
//! system files). Keeping the importing user's uid instead would tie a shared cache's
//! images to whoever imported them first; keeping the layers' uids is not possible for
//! an unprivileged importer that cannot chown, and only root is ever mapped inside anyway.

use std::fs;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::Serialize;

use crate::image::config::ImageConfig;
use crate::image::layers::{LayerError, Unpacker};
use crate::image::oci::{Image, OciError};
use crate::image::reference::{ImageRef, RemoteRef};
use crate::image::squashfs;
use crate::image::squashfs::find_in_path;
use crate::store::cache::{Built, Cache, CacheError, Entry};
use crate::store::import_progress::{Counted, ImportProgress};
use crate::sys::child::{run_tool_watched, ToolError};

/// Largest /etc/environment read from an image to merge the config's Env into.
const ENV_FILE_LIMIT: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Registry(#[from] crate::image::registry::RegistryError),
    #[error("mksquashfs not found: install squashfs-tools (Debian/Ubuntu: apt-get install squashfs-tools)")]
    NoMksquashfs,
    #[error(transparent)]
    Mksquashfs(ToolError),
    #[error("cannot {what} {path}: {error}")]
    Io {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("cannot export {path}: {detail}")]
    Export { path: PathBuf, detail: String },
    #[error("cannot export {path}: {detail}")]
    ExportSif {
        path: PathBuf,
        detail: crate::image::sif::SifError,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImportError + 'a {
    move |error| ImportError::Io {
        what,
        path: path.into(),
        error,
    }
}

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Threads for mksquashfs; default: all available.
    pub processors: Option<usize>,
    /// Say what is happening on stderr (layers, mksquashfs progress).
    pub progress: bool,
    /// mksquashfs program; default: from PATH.
    pub mksquashfs: Option<PathBuf>,
    /// Compression of the squashfs; default [`squashfs::OutputCompression::IMPORT`].
    pub compression: Option<squashfs::OutputCompression>,
    /// How registry images are pulled.
    pub registry: crate::image::registry::ClientOptions,
}

/// What to run, and how.
#[derive(Debug, Clone, Serialize)]
pub struct ImportedImage {
    /// A squashfs (in the cache, or the user's own), a SIF file or a directory.
    pub path: PathBuf,
    /// The cache entry, for imported images; `None` for local images run as they are.
    pub entry: Option<Entry>,
    /// Whether this call built the squashfs (false: found in the cache).
    pub built: bool,
}

impl ImportedImage {
    /// The image's run-time settings (empty for local images, whose settings live in
    /// their own /etc/environment and /etc/rc, as enroot keeps them).
    pub fn config(&self) -> ImageConfig {
        self.entry
            .as_ref()
            .map(|e| e.config.clone())
            .unwrap_or_default()
    }
}

/// Import any reference except a registry one; local images are returned as they are.
pub fn import(
    image: &ImageRef,
    cache: &Cache,
    opts: &ImportOptions,
) -> Result<ImportedImage, ImportError> {
    let name = image.to_string();
    match image {
        ImageRef::Local(path) => {
            // Checked now rather than when a container is made from it.
            let file = fs::File::open(path).map_err(io_err("open", path))?;
            crate::image::detect(path, &file)?;
            Ok(ImportedImage {
                path: path.clone(),
                entry: None,
                built: false,
            })
        }
        ImageRef::Registry(r) => from_registry(r, cache, opts),
        ImageRef::OciLayout { dir, reference } => {
            let img = Image::open_layout(dir, reference.as_deref())?;
            from_local(&img, cache, &name, opts)
        }
        ImageRef::OciArchive { file, reference } => {
            let img = Image::open_oci_archive(file, reference.as_deref())?;
            from_local(&img, cache, &name, opts)
        }
        ImageRef::DockerArchive { file, reference } => {
            let img = Image::open_docker_archive(file, reference.as_deref())?;
            from_local(&img, cache, &name, opts)
        }
    }
}

/// [`from_image`] for an archive or layout the user named, telling them what happens (see
/// [`crate::store::import_progress`]) when it has to be built; a cached one says nothing.
fn from_local(
    img: &Image,
    cache: &Cache,
    name: &str,
    opts: &ImportOptions,
) -> Result<ImportedImage, ImportError> {
    let mode = opts.registry.progress;
    let mut shown = None;
    let (entry, built) = cache.get_or_build(&img.digest, Some(name), |area| {
        let progress = shown.insert(ImportProgress::new(
            mode,
            name,
            img.layers.len(),
            img.layers_size(),
        ));
        build_observed(img, area.path(), opts, Some(progress))
    })?;
    if let (Some(progress), true) = (shown.as_mut(), built) {
        progress.finish(entry.size);
    }
    Ok(ImportedImage {
        path: cache.image_path(&entry.digest)?,
        entry: Some(entry),
        built,
    })
}

/// Import a registry image: the tag is resolved to a manifest digest first (a small
/// request), so an image already in the cache is not downloaded again; otherwise it is
/// pulled into a work area of the cache as an OCI layout and imported from there.
fn from_registry(
    r: &RemoteRef,
    cache: &Cache,
    opts: &ImportOptions,
) -> Result<ImportedImage, ImportError> {
    use crate::image::registry;
    // An image pinned to the digest it is cached under needs no registry at all: nodes
    // that share a cache (or run a job's later steps) start without asking the registry.
    // A digest of a multi-platform index is resolved first, to this machine's platform.
    if let Some(digest) = &r.digest {
        if let Some(entry) = cache.lookup(digest)? {
            tracing::debug!("{r}: cached, not asking the registry");
            let entry = cache.reuse(entry, Some(&r.to_string()))?;
            return Ok(ImportedImage {
                path: cache.image_path(&entry.digest)?,
                entry: Some(entry),
                built: false,
            });
        }
    }
    let client = registry::Client::new(opts.registry.clone())?;
    let resolved = client.resolve(r)?;
    if let Some(entry) = cache.lookup(&resolved.manifest_digest)? {
        tracing::debug!("{r}: {} is cached", resolved.manifest_digest);
        let entry = cache.reuse(entry, Some(&r.to_string()))?;
        return Ok(ImportedImage {
            path: cache.image_path(&entry.digest)?,
            entry: Some(entry),
            built: false,
        });
    }
    // Pull exactly what was resolved, so a tag moved meanwhile cannot mix two images.
    let pinned = RemoteRef {
        digest: Some(resolved.manifest_digest.clone()),
        ..r.clone()
    };
    let speaks = opts.registry.progress.speaks();
    let label = registry::user_label(r);
    let started = std::time::Instant::now();
    // Only a hint for the user: the lock below decides who imports.
    let waits = speaks && cache.import_under_way(&resolved.manifest_digest)?;
    if waits {
        eprintln!(
            "ferry: waiting for another import of {label} ({}) on {}",
            registry::progress::short_digest(&resolved.manifest_digest),
            registry::progress::node_name()
        );
    }
    // The pull happens under the digest's lock: concurrent imports of one image (steps
    // starting together, nodes sharing the cache) download each blob once, the others
    // wait and find the result.
    let (entry, built) = cache.get_or_build(
        &resolved.manifest_digest,
        Some(&r.to_string()),
        |area| -> Result<Built, ImportError> {
            let layout = area.path().join("layout");
            client.pull(&pinned, &layout)?;
            if speaks {
                eprintln!("ferry: building the squashfs of {label}");
            }
            let img = Image::open_layout(&layout, None)?;
            build(&img, area.path(), opts)
        },
    )?;
    if speaks && built {
        eprintln!(
            "ferry: imported {label} in {} ({} squashfs)",
            registry::progress::human_duration(started.elapsed().as_secs_f64()),
            registry::progress::human_bytes(entry.size)
        );
    } else if waits {
        eprintln!("ferry: {label} was imported meanwhile (by another step or node); using it");
    }
    Ok(ImportedImage {
        path: cache.image_path(&entry.digest)?,
        entry: Some(entry),
        built,
    })
}

/// A registry reference by tag, pinned to the digest the tag names now: the same text
/// with `@sha256:…` added (the multi-platform index's digest when there is one, so that
/// each node still picks its own platform). A job resolves its tag once this way, and all
/// its nodes and steps run the same image even when the tag moves meanwhile. `None` for
/// references that are pinned already and for everything that is not a registry image.
pub fn pin_reference(
    image: &ImageRef,
    opts: &crate::image::registry::ClientOptions,
) -> Result<Option<String>, ImportError> {
    let ImageRef::Registry(r) = image else {
        return Ok(None);
    };
    if r.digest.is_some() || r.user.is_some() {
        return Ok(None);
    }
    let client = crate::image::registry::Client::new(opts.clone())?;
    let resolved = client.resolve(r)?;
    let digest = resolved.index_digest.unwrap_or(resolved.manifest_digest);
    let pinned = RemoteRef {
        digest: Some(digest),
        ..r.clone()
    };
    Ok(Some(pinned.to_string()))
}

/// Import the image of an OCI layout directory. `tag_or_digest` picks one when the
/// layout holds several; `record_as` is the reference the cache lists it under (the
/// registry client passes the `docker://` reference it pulled).
pub fn from_oci_layout(
    dir: &Path,
    tag_or_digest: Option<&str>,
    cache: &Cache,
    record_as: Option<&str>,
    opts: &ImportOptions,
) -> Result<ImportedImage, ImportError> {
    let img = Image::open_layout(dir, tag_or_digest)?;
    from_image(&img, cache, record_as, opts)
}

/// Import an opened image: found in the cache by digest, or built once.
pub fn from_image(
    img: &Image,
    cache: &Cache,
    record_as: Option<&str>,
    opts: &ImportOptions,
) -> Result<ImportedImage, ImportError> {
    let (entry, built) =
        cache.get_or_build(&img.digest, record_as, |area| build(img, area.path(), opts))?;
    Ok(ImportedImage {
        path: cache.image_path(&entry.digest)?,
        entry: Some(entry),
        built,
    })
}

fn build(img: &Image, area: &Path, opts: &ImportOptions) -> Result<Built, ImportError> {
    build_observed(img, area, opts, None)
}

/// [`build`], counting what it reads into `progress`.
fn build_observed(
    img: &Image,
    area: &Path,
    opts: &ImportOptions,
    mut progress: Option<&mut ImportProgress>,
) -> Result<Built, ImportError> {
    let rootfs = area.join("rootfs");
    fs::create_dir(&rootfs).map_err(io_err("create", &rootfs))?;
    let mut unpacker = Unpacker::new(&rootfs)?;
    let n = img.layers.len();
    for (i, layer) in img.layers.iter().enumerate() {
        if let Some(p) = progress.as_deref_mut() {
            p.layer(i, n);
        } else if opts.progress {
            eprintln!(
                "ferry: layer {}/{n} {} ({})",
                i + 1,
                layer.digest.as_deref().unwrap_or("(legacy, unchecked)"),
                crate::store::cache::format_size(layer.size)
            );
        }
        let mut reader = img.layer(i)?;
        match progress.as_deref_mut() {
            Some(progress) => unpacker.apply_layer(Counted {
                inner: &mut reader,
                progress,
            })?,
            None => unpacker.apply_layer(&mut reader)?,
        }
        reader.finish()?;
    }
    if !img.config.config.env.is_empty() {
        // Today's runtime reads the image environment from /etc/environment (enroot's
        // convention), so an imported image runs right with it as well.
        let old = unpacker
            .read_file(Path::new("etc/environment"), ENV_FILE_LIMIT)
            .unwrap_or_default();
        let text = environment_file(&String::from_utf8_lossy(&old), &img.config.config.env);
        unpacker.write_file(Path::new("etc/environment"), text.as_bytes(), 0o644)?;
    }
    // The whole run-time config travels inside the image, so a copy made with
    // `ferry import -o` (or moved to another cluster) still starts as its author meant.
    let config_json =
        serde_json::to_vec_pretty(&img.config.config).expect("image configs serialise");
    unpacker.write_file(
        Path::new(crate::spec::entrypoint::CONFIG_PATH.trim_start_matches('/')),
        &config_json,
        0o644,
    )?;
    let unpacked = unpacker.finish()?;
    let out = area.join("image.sqsh");
    let pseudo = area.join("modes.pseudo");
    fs::write(&pseudo, pseudo_definitions(&unpacked.modes)).map_err(io_err("write", &pseudo))?;
    match progress {
        Some(progress) => {
            progress.layers_done();
            let mut tick =
                |_pid: u32| progress.squashing(fs::metadata(&out).map_or(0, |m| m.len()));
            mksquashfs_watched(&rootfs, &out, Some(&pseudo), opts, &mut tick)?;
        }
        None => mksquashfs(&rootfs, &out, Some(&pseudo), opts)?,
    }
    Ok(Built {
        squashfs: out,
        config: img.config.config.clone(),
        config_digest: Some(img.config_digest.clone()),
        layers: img.layers.iter().filter_map(|l| l.digest.clone()).collect(),
    })
}

/// The existing /etc/environment text followed by the config's `Env`, which wins.
pub(crate) fn environment_file(existing: &str, env: &[String]) -> String {
    let mut text = existing.to_string();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    for e in env {
        let Some((name, value)) = e.split_once('=') else {
            continue;
        };
        if !crate::spec::env::is_valid_name(name) || value.contains('\n') {
            continue; // not representable in the file
        }
        let plain = value.trim() == value
            && !value.starts_with(['"', '\''])
            && !value.ends_with(['"', '\'']);
        if plain {
            text.push_str(&format!("{name}={value}\n"));
        } else {
            text.push_str(&format!("{name}=\"{value}\"\n"));
        }
    }
    text
}

/// mksquashfs pseudo definitions (`"path" m MODE UID GID`) giving entries the modes the
/// image asked for while the files on disk stay readable for mksquashfs.
fn pseudo_definitions(modes: &[(PathBuf, u32)]) -> String {
    let mut out = String::new();
    for (path, mode) in modes {
        let Some(p) = path.to_str() else {
            tracing::debug!(
                "keeping the unpacked mode of {}: name is not UTF-8",
                path.display()
            );
            continue;
        };
        if p.contains(['\n', '"', '\\']) {
            tracing::debug!("keeping the unpacked mode of {p}: name needs escaping");
            continue;
        }
        out.push_str(&format!("\"{p}\" m {mode:o} 0 0\n"));
    }
    out
}

/// Run mksquashfs on `dir`, writing `out`.
pub fn mksquashfs(
    dir: &Path,
    out: &Path,
    pseudo: Option<&Path>,
    opts: &ImportOptions,
) -> Result<(), ImportError> {
    mksquashfs_watched(dir, out, pseudo, opts, &mut |_| {})
}

/// [`mksquashfs`], calling `on_tick` with its pid about every
/// [`crate::sys::child::TOOL_TICK`] while it runs.
fn mksquashfs_watched(
    dir: &Path,
    out: &Path,
    pseudo: Option<&Path>,
    opts: &ImportOptions,
    on_tick: &mut dyn FnMut(u32),
) -> Result<(), ImportError> {
    let program = match &opts.mksquashfs {
        Some(p) => p.clone(),
        None => find_in_path("mksquashfs").ok_or(ImportError::NoMksquashfs)?,
    };
    let processors = opts
        .processors
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    let compression = opts
        .compression
        .unwrap_or(squashfs::OutputCompression::IMPORT);
    let mut cmd = crate::image::squashfs::mksquashfs_command(&program, dir, out, compression);
    cmd.arg("-processors").arg(processors.to_string());
    if let Some(p) = pseudo {
        cmd.arg("-pf").arg(p);
    }
    let show = opts.progress && io::stderr().is_terminal();
    if !show {
        cmd.args(["-quiet", "-no-progress"]);
    }
    cmd.stdout(if show {
        Stdio::inherit()
    } else {
        Stdio::null()
    });
    let output = run_tool_watched("mksquashfs", &mut cmd, None, on_tick).map_err(|e| match e {
        ToolError::Start { error, .. } if error.kind() == io::ErrorKind::NotFound => {
            ImportError::NoMksquashfs
        }
        e => ImportError::Mksquashfs(e),
    })?;
    if show {
        let _ = io::stderr().write_all(&output.stderr);
    }
    Ok(())
}

/// Write `image` as a squashfs file at `out`: a squashfs (cached or local) or a SIF's
/// partition is copied, a directory is squashed.
pub fn export(image: &ImportedImage, out: &Path, opts: &ImportOptions) -> Result<(), ImportError> {
    let src = &image.path;
    let export_err = |detail: String| ImportError::Export {
        path: src.clone(),
        detail,
    };
    let meta = fs::metadata(src).map_err(io_err("read", src))?;
    if meta.is_dir() {
        return mksquashfs(src, out, None, opts);
    }
    let file = fs::File::open(src).map_err(io_err("open", src))?;
    let kind = crate::image::detect(src, &file).map_err(|e| export_err(e.to_string()))?;
    let crate::image::ImageKind::Squashfs { offset, .. } = kind else {
        return Err(export_err("not a squashfs image".into()));
    };
    if offset == 0 {
        // A copy, not a hard link: the user may change their file (mksquashfs appends
        // in place by default), and the cached image must not change with it.
        fs::copy(src, out).map_err(io_err("copy to", out))?;
        return Ok(());
    }
    // A SIF's partition: copy just its bytes.
    let part = crate::image::sif::primary_partition(&file, meta.len()).map_err(|detail| {
        ImportError::ExportSif {
            path: src.clone(),
            detail,
        }
    })?;
    let mut reader = io::Read::take(io::BufReader::new(&file), part.offset + part.size);
    io::copy(
        &mut io::Read::take(&mut reader, part.offset),
        &mut io::sink(),
    )
    .map_err(io_err("read", src))?;
    let mut dst = fs::File::create(out).map_err(io_err("create", out))?;
    io::copy(&mut reader, &mut dst).map_err(io_err("write", out))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::oci::test_images::{make_docker_archive, make_layout};
    use std::process::Command;

    fn unsquash_cat(sqsh: &Path, file: &str) -> String {
        let out = Command::new("unsquashfs")
            .args(["-cat"])
            .arg(sqsh)
            .arg(file)
            .output()
            .expect("unsquashfs is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn unsquash_list(sqsh: &Path) -> String {
        let out = Command::new("unsquashfs")
            .args(["-lln"])
            .arg(sqsh)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    fn opts() -> ImportOptions {
        ImportOptions {
            processors: Some(1),
            ..ImportOptions::default()
        }
    }

    #[test]
    fn imports_a_layout_once_and_records_it() {
        let l = make_layout(
            &[
                ("hello", b"hi\n"),
                ("etc/shadow", b"secret\n"),
                ("etc/environment", b"LANG=C\n"),
            ],
            "v1",
        );
        let t = tempfile::tempdir().unwrap();
        let cache = Cache::open(&t.path().join("cache")).unwrap();
        let r = ImageRef::parse(
            &format!("oci:{}:v1", l.dir.path().display()),
            Path::new("/"),
        )
        .unwrap();
        let first = import(&r, &cache, &opts()).unwrap();
        assert!(first.built);
        assert_eq!(first.entry.as_ref().unwrap().digest, l.manifest_digest);
        assert_eq!(unsquash_cat(&first.path, "hello"), "hi\n");
        let env = unsquash_cat(&first.path, "etc/environment");
        assert_eq!(env, "LANG=C\nPATH=/bin\nFOO=bar\n");
        let listing = unsquash_list(&first.path);
        assert!(listing.contains("0/0"), "{listing}");
        assert_eq!(first.config().working_dir.as_deref(), Some("/srv"));
        let again = import(&r, &cache, &opts()).unwrap();
        assert!(!again.built);
        assert_eq!(again.path, first.path);
        assert_eq!(
            cache.resolve_ref(&r.to_string()).unwrap().as_deref(),
            Some(l.manifest_digest.as_str())
        );
        // Exported as a file of its own.
        let out = t.path().join("copy.sqsh");
        export(&again, &out, &opts()).unwrap();
        assert_eq!(unsquash_cat(&out, "hello"), "hi\n");
    }

    #[test]
    fn modes_the_image_asked_for_are_kept() {
        let mut layer = tar::Builder::new(Vec::new());
        for (name, mode) in [("shadow", 0o000), ("tool", 0o4755)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(mode);
            layer.append_data(&mut h, name, &b"x"[..]).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o555);
        h.set_size(0);
        layer.append_data(&mut h, "ro/", &[][..]).unwrap();
        let layer = layer.into_inner().unwrap();
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        let mut u = Unpacker::new(&root).unwrap();
        u.apply_layer(&layer[..]).unwrap();
        let unpacked = u.finish().unwrap();
        let pseudo = t.path().join("p");
        fs::write(&pseudo, pseudo_definitions(&unpacked.modes)).unwrap();
        let out = t.path().join("o.sqsh");
        mksquashfs(&root, &out, Some(&pseudo), &opts()).unwrap();
        let listing = unsquash_list(&out);
        assert!(listing.contains("---------- 0/0"), "{listing}");
        assert!(listing.contains("-rwsr-xr-x 0/0"), "{listing}");
        assert!(listing.contains("dr-xr-xr-x 0/0"), "{listing}");
    }

    #[test]
    fn imports_a_docker_archive() {
        let t = tempfile::tempdir().unwrap();
        let archive = t.path().join("save.tar");
        make_docker_archive(&archive, &[("bin/hello", b"hello\n")]);
        let cache = Cache::open(&t.path().join("cache")).unwrap();
        let r = ImageRef::parse(archive.to_str().unwrap(), Path::new("/")).unwrap();
        assert!(matches!(r, ImageRef::DockerArchive { .. }));
        let img = import(&r, &cache, &opts()).unwrap();
        assert_eq!(unsquash_cat(&img.path, "bin/hello"), "hello\n");
        assert_eq!(unsquash_cat(&img.path, "etc/environment"), "A=1\n");
    }

    #[test]
    fn environment_file_merging() {
        let text = environment_file(
            "PATH=/usr/bin",
            &[
                "PATH=/opt/bin".into(),
                "SPACE= x ".into(),
                "Q=\"q\"".into(),
                "bad name=1".into(),
                "NL=a\nb".into(),
            ],
        );
        assert_eq!(
            text,
            "PATH=/usr/bin\nPATH=/opt/bin\nSPACE=\" x \"\nQ=\"\"q\"\"\n"
        );
        let parsed = crate::spec::env::parse_environment_file(&text);
        assert_eq!(
            parsed,
            vec![
                ("PATH".to_string(), "/opt/bin".to_string()),
                ("SPACE".to_string(), " x ".to_string()),
                ("Q".to_string(), "\"q\"".to_string())
            ]
        );
    }

    #[test]
    fn sif_partitions_export_as_squashfs() {
        let sif = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sif/one-group.sif");
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("x.sqsh");
        let img = ImportedImage {
            path: sif,
            entry: None,
            built: false,
        };
        export(&img, &out, &opts()).unwrap();
        assert_eq!(unsquash_cat(&out, "hello.txt"), "Hello from Sylabs!\n");
    }
}
