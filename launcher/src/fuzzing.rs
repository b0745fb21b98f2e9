//! Entry points for fuzzing every parser that sees user or image data.
//!
//! Each function takes arbitrary bytes, feeds them to one parser and checks what must hold
//! whatever the input: no panic, and for layer application nothing written outside the
//! target directory. `fuzz/` (cargo-fuzz, run by `integration/fuzz`) drives them with
//! libFuzzer; `launcher/tests/fuzz_corpus.rs` replays the committed corpus and a few
//! thousand mutations of it on every test run, so a regression shows up in CI without a
//! nightly toolchain.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::image::config::ConfigFile;
use crate::image::layers::Unpacker;
use crate::image::manifest::{self, Document, SchemaVersion};
use crate::image::media_type::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use crate::image::oci::Image;
use crate::image::platform::{self, PlatformExt};
use crate::image::reference::{ImageRef, RemoteRef};
use crate::image::{sif, squashfs};
use crate::spec::mounts::MountSpec;

/// One fuzz target: its name (the corpus directory) and the function.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, in the order `integration/fuzz` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "reference",
        run: reference,
    },
    Target {
        name: "mount_specs",
        run: mount_specs,
    },
    Target {
        name: "options",
        run: options,
    },
    Target {
        name: "manifest",
        run: manifest_and_config,
    },
    Target {
        name: "layer",
        run: layer,
    },
    Target {
        name: "sif",
        run: sif_and_squashfs,
    },
    Target {
        name: "archive",
        run: archive,
    },
];

fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// Image references as `--container`, `ferry run` and `ferry import` take them.
pub fn reference(data: &[u8]) {
    let input = text(data);
    let cwd = Path::new("/nonexistent/ferry-fuzz");
    if let Ok(ImageRef::Registry(remote)) = ImageRef::parse(&input, cwd) {
        // What was parsed prints as a reference that parses to the same thing.
        match ImageRef::parse(&remote.to_string(), cwd) {
            Ok(ImageRef::Registry(again)) => {
                assert_eq!(again.to_string(), remote.to_string(), "from {input:?}")
            }
            other => panic!("{remote} (from {input:?}) parses again as {other:?}"),
        }
    }
    let _ = RemoteRef::parse_docker(&input);
}

/// `--container-mounts` lists.
pub fn mount_specs(data: &[u8]) {
    let input = text(data);
    if let Ok(specs) = MountSpec::parse_list(&input, Path::new("/work")) {
        for spec in specs {
            // A destination is always absolute and has no `..`: the container's root is
            // the only place it can name.
            assert!(spec.target.is_absolute(), "{input:?}: {spec:?}");
            assert!(
                !spec
                    .target
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir)),
                "{input:?}: {spec:?}"
            );
        }
    }
}

/// Option values and settings: plugstack arguments, `--container-gpus`, sizes, enroot's
/// /etc/environment, and srun's command line as read from /proc. The first byte picks
/// the parser, so one corpus covers them all.
pub fn options(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let input = text(rest);
    match which % 6 {
        0 => {
            let args: Vec<&str> = input.split_whitespace().collect();
            if let Ok(settings) = crate::slurm::site::PluginSettings::parse(&args) {
                let _ = settings.site_settings();
            }
        }
        1 => {
            let _ = crate::spec::gpus::GpuRequest::parse(&input);
        }
        2 => {
            let _ = crate::store::cache::parse_size(&input);
        }
        3 => {
            for (name, _) in crate::spec::env::parse_environment_file(&input) {
                assert!(
                    crate::spec::env::is_valid_name(&name),
                    "{name:?} from {input:?}"
                );
            }
        }
        4 => {
            let args = crate::slurm::srun_args::split_cmdline(rest);
            let parsed = crate::slurm::srun_args::parse(&args, 0x16_05_00, &[]);
            let _ = parsed.last_value("container");
        }
        _ => {
            let _ = oci_spec::image::Platform::parse(&input);
            let _ = crate::doctor::parse_slurm_version(&input);
            let _ = crate::doctor::parse_version_header(&input);
        }
    }
}

/// Registry and layout documents: manifests, indexes, image configs.
pub fn manifest_and_config(data: &[u8]) {
    let host = oci_spec::image::Platform::host();
    for content_type in [
        None,
        Some(OCI_MANIFEST),
        Some(OCI_INDEX),
        Some(DOCKER_MANIFEST),
        Some(DOCKER_MANIFEST_LIST),
    ] {
        for schema_version in [SchemaVersion::Required, SchemaVersion::Optional] {
            match manifest::parse(data, content_type, schema_version) {
                Ok(Document::Index { index, .. }) => {
                    let _ = platform::select(index.manifests(), &host);
                }
                Ok(Document::Manifest { manifest: m, .. }) => {
                    let _ = crate::image::registry::manifest::check_pullable(&m);
                }
                Err(_) => {}
            }
        }
    }
    let _ = ConfigFile::parse(data);
}

/// A scratch directory with the layer's target inside and a sibling that must stay empty.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("ferry-fuzz-")
            .tempdir()
            .expect("a scratch directory in $TMPDIR");
        std::fs::create_dir(dir.path().join("root")).expect("root");
        std::fs::create_dir(dir.path().join("outside")).expect("outside");
        Scratch { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn file(&self, name: &str, data: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        File::create(&path)
            .and_then(|mut f| f.write_all(data))
            .expect("scratch file");
        path
    }

    /// Nothing appeared beside the target, or in the sibling a `../outside` would reach.
    fn assert_nothing_escaped(&self, extra: &[&str], input: &[u8]) {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .expect("scratch")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut expected: Vec<String> = ["outside", "root"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        expected.sort();
        assert_eq!(
            names, expected,
            "a layer wrote beside its target: {input:?}"
        );
        let outside = std::fs::read_dir(self.dir.path().join("outside"))
            .expect("outside")
            .count();
        assert_eq!(outside, 0, "a layer wrote outside its target: {input:?}");
    }
}

/// Layer application (gzip, zstd or plain tar, with whiteouts) into a scratch directory.
pub fn layer(data: &[u8]) {
    let scratch = Scratch::new();
    // A symlink to the sibling in place before the layer, as a lower layer could leave it.
    let root = scratch.root();
    let _ = std::os::unix::fs::symlink("../outside", root.join("up"));
    let _ = std::os::unix::fs::symlink(scratch.dir.path().join("outside"), root.join("abs"));
    let mut unpacker = Unpacker::new(&root).expect("unpacker");
    let applied = unpacker.apply_layer(data);
    if applied.is_ok() {
        // A second application sees the first one's files as a lower layer.
        let _ = unpacker.apply_layer(data);
    }
    if let Ok(done) = unpacker.finish() {
        let _ = done.restore_modes(&root);
    }
    scratch.assert_nothing_escaped(&[], data);
    make_removable(&root);
}

/// Give the owner rwx on every directory so the scratch directory can be removed.
fn make_removable(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(entry.path());
                }
            }
        }
    }
}

/// The SIF global header and descriptors, the squashfs superblock, and ld.so.cache.
pub fn sif_and_squashfs(data: &[u8]) {
    let scratch = Scratch::new();
    let path = scratch.file("image.sif", data);
    let file = File::open(&path).expect("scratch file");
    if let Ok(part) = sif::primary_partition(&file, data.len() as u64) {
        assert!(
            part.offset
                .checked_add(part.size)
                .is_some_and(|end| end <= data.len() as u64),
            "a partition past the end of the file: {part:?}"
        );
    }
    let _ = squashfs::Superblock::parse(data, data.len() as u64, 0);
    let _ = crate::rootfs::ldcache::parse(data);
}

/// `docker save` archives and OCI archives, and the layers they point to.
pub fn archive(data: &[u8]) {
    let scratch = Scratch::new();
    let path = scratch.file("image.tar", data);
    for open in [Image::open_docker_archive, Image::open_oci_archive] {
        if let Ok(image) = open(&path, None) {
            for i in 0..image.layers.len().min(4) {
                if let Ok(mut blob) = image.layer(i) {
                    let mut sink = Vec::new();
                    let _ = (&mut blob).take(1 << 20).read_to_end(&mut sink);
                }
            }
        }
    }
    scratch.assert_nothing_escaped(&["image.tar"], data);
}
