//! What a container runs: the user's command as given, or the image's own start command.
//!
//! Two conventions meet here. OCI/docker images carry `Entrypoint` and `Cmd` in their
//! config, which `ferry import` keeps inside the image at [`CONFIG_PATH`]. enroot images
//! (`.sqsh` made by `enroot import`) carry an `/etc/rc` shell script instead, which enroot
//! runs with the command as its arguments (it execs them, or the image's default command
//! when there are none).
//!
//! HPC users run their own program far more often than the image's, so the command they
//! give is run as it is unless they ask for the entrypoint (`ferry run --entrypoint`,
//! `--container-entrypoint`); with no command at all the image's start command runs, as
//! `docker run IMAGE` does.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::image::config::ImageConfig;

/// Where an imported image keeps its config (Entrypoint, Cmd, WorkingDir, Env, User), so
/// that a copy of the squashfs (`ferry import -o`) still carries it.
pub const CONFIG_PATH: &str = "/etc/ferry/image.json";
/// enroot's start script.
pub const ENROOT_RC: &str = "/etc/rc";
/// What runs when neither the user nor the image says.
pub const DEFAULT_SHELL: &str = "/bin/sh";

/// What the image says about starting it, read inside the container by the holder.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageStart {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub working_dir: Option<PathBuf>,
    /// The image has enroot's `/etc/rc`.
    #[serde(default)]
    pub enroot_rc: bool,
}

impl ImageStart {
    pub fn from_config(config: &ImageConfig, enroot_rc: bool) -> ImageStart {
        ImageStart {
            entrypoint: config.entrypoint.clone().unwrap_or_default(),
            cmd: config.cmd.clone().unwrap_or_default(),
            working_dir: config
                .working_dir
                .as_deref()
                .map(PathBuf::from)
                .filter(|p| p.is_absolute()),
            enroot_rc,
        }
    }

    /// Read from the container's root (the holder calls this after entering it).
    pub fn read(root: &Path, limit: u64) -> ImageStart {
        let rel = |p: &str| root.join(p.trim_start_matches('/'));
        let config = std::fs::File::open(rel(CONFIG_PATH))
            .ok()
            .and_then(|f| crate::image::read_small_text(f, limit).ok())
            .and_then(|text| match serde_json::from_str::<ImageConfig>(&text) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!("ignoring the image's {CONFIG_PATH}: {e}");
                    None
                }
            })
            .unwrap_or_default();
        let rc = rel(ENROOT_RC).is_file();
        ImageStart::from_config(&config, rc)
    }

    fn has_oci_start(&self) -> bool {
        !self.entrypoint.is_empty() || !self.cmd.is_empty()
    }
}

/// The argv to run. `user_args` is what the user typed (may be empty); `entrypoint` is
/// whether they asked for the image's entrypoint.
pub fn command_line(image: &ImageStart, user_args: &[OsString], entrypoint: bool) -> Vec<OsString> {
    let owned = |v: &[String]| v.iter().map(OsString::from).collect::<Vec<_>>();
    let run_image = entrypoint || user_args.is_empty();
    if !run_image {
        return user_args.to_vec();
    }
    if image.has_oci_start() {
        // docker's rule: the user's arguments replace Cmd and follow Entrypoint.
        let mut argv = owned(&image.entrypoint);
        if user_args.is_empty() {
            argv.extend(owned(&image.cmd));
        } else {
            argv.extend(user_args.iter().cloned());
        }
        if !argv.is_empty() {
            return argv;
        }
    }
    if image.enroot_rc {
        let mut argv = vec![OsString::from(DEFAULT_SHELL), OsString::from(ENROOT_RC)];
        argv.extend(user_args.iter().cloned());
        return argv;
    }
    if user_args.is_empty() {
        vec![OsString::from(DEFAULT_SHELL)]
    } else {
        user_args.to_vec()
    }
}

/// Whether [`command_line`] puts the image's start command (its Entrypoint, or enroot's
/// `/etc/rc`) in front of `user_args`, which are not empty.
pub fn runs_through_image_start(image: &ImageStart, entrypoint: bool) -> bool {
    entrypoint && (!image.entrypoint.is_empty() || (image.cmd.is_empty() && image.enroot_rc))
}

/// What goes between the entrypoint and the command so that the entrypoint's own output is
/// discarded and the command's is not (`--container-entrypoint` without
/// `--container-entrypoint-log`): the entrypoint runs with stdout and stderr on /dev/null,
/// the real ones kept on `stdout` and `stderr` (single digits: dash reads no others), and
/// when it runs its arguments as entrypoints do (`exec "$@"`), this shell puts them back,
/// closes the copies and execs the command.
pub fn output_restoring_shim(stdout: u8, stderr: u8) -> Vec<OsString> {
    let script = format!("exec 1>&{stdout} 2>&{stderr} {stdout}>&- {stderr}>&-; exec \"$@\"");
    [DEFAULT_SHELL, "-c", &script, "sh"]
        .into_iter()
        .map(OsString::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn oci(entrypoint: &[&str], cmd: &[&str]) -> ImageStart {
        ImageStart {
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            ..ImageStart::default()
        }
    }

    #[test]
    fn the_users_command_runs_as_given_unless_the_entrypoint_is_asked_for() {
        let img = oci(&["/entry.sh"], &["serve"]);
        assert_eq!(
            command_line(&img, &os(&["id", "-u"]), false),
            os(&["id", "-u"])
        );
        assert_eq!(
            command_line(&img, &os(&["id", "-u"]), true),
            os(&["/entry.sh", "id", "-u"])
        );
    }

    #[test]
    fn no_command_runs_entrypoint_and_cmd() {
        assert_eq!(
            command_line(&oci(&["/entry.sh"], &["serve", "-v"]), &[], false),
            os(&["/entry.sh", "serve", "-v"])
        );
        assert_eq!(
            command_line(&oci(&[], &["python3"]), &[], false),
            os(&["python3"])
        );
        // With --entrypoint and arguments, Cmd is replaced; without an Entrypoint the
        // arguments are the command.
        assert_eq!(
            command_line(&oci(&[], &["python3"]), &os(&["ls"]), true),
            os(&["ls"])
        );
    }

    #[test]
    fn enroot_images_start_through_etc_rc() {
        let img = ImageStart {
            enroot_rc: true,
            ..ImageStart::default()
        };
        assert_eq!(command_line(&img, &[], false), os(&["/bin/sh", "/etc/rc"]));
        assert_eq!(
            command_line(&img, &os(&["hostname"]), true),
            os(&["/bin/sh", "/etc/rc", "hostname"])
        );
        assert_eq!(
            command_line(&img, &os(&["hostname"]), false),
            os(&["hostname"])
        );
        // An OCI config wins over a leftover /etc/rc.
        let both = ImageStart {
            enroot_rc: true,
            ..oci(&["/e"], &[])
        };
        assert_eq!(command_line(&both, &[], false), os(&["/e"]));
    }

    #[test]
    fn only_an_entrypoint_or_etc_rc_runs_in_front_of_the_command() {
        let args = os(&["id"]);
        let rc = ImageStart {
            enroot_rc: true,
            ..ImageStart::default()
        };
        let cases = [
            oci(&["/e"], &[]),
            oci(&["/e"], &["c"]),
            oci(&[], &["c"]),
            rc.clone(),
            ImageStart {
                enroot_rc: true,
                ..oci(&[], &["c"])
            },
            ImageStart::default(),
        ];
        for image in cases {
            for entrypoint in [false, true] {
                let wraps = command_line(&image, &args, entrypoint) != args;
                assert_eq!(
                    runs_through_image_start(&image, entrypoint),
                    wraps,
                    "{image:?} {entrypoint}"
                );
            }
        }
    }

    #[test]
    fn the_shim_restores_the_output_then_runs_its_arguments() {
        let mut argv = os(&["/entry"]);
        argv.extend(output_restoring_shim(5, 6));
        argv.extend(os(&["echo", "hi"]));
        assert_eq!(
            argv,
            os(&[
                "/entry",
                "/bin/sh",
                "-c",
                "exec 1>&5 2>&6 5>&- 6>&-; exec \"$@\"",
                "sh",
                "echo",
                "hi"
            ])
        );
    }

    #[test]
    fn images_that_say_nothing_get_a_shell() {
        assert_eq!(
            command_line(&ImageStart::default(), &[], false),
            os(&["/bin/sh"])
        );
        assert_eq!(
            command_line(&ImageStart::default(), &os(&["x"]), true),
            os(&["x"])
        );
    }

    #[test]
    fn reads_the_config_and_rc_from_a_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc/ferry")).unwrap();
        std::fs::write(
            root.path().join("etc/ferry/image.json"),
            r#"{"env":["A=b"],"working_dir":"/work","entrypoint":["/e"],"cmd":["c"]}"#,
        )
        .unwrap();
        let s = ImageStart::read(root.path(), 1 << 20);
        assert_eq!(s.working_dir, Some(PathBuf::from("/work")));
        assert_eq!(s.entrypoint, vec!["/e".to_string()]);
        assert!(!s.enroot_rc);
        std::fs::write(root.path().join("etc/rc"), "exec \"$@\"\n").unwrap();
        std::fs::write(root.path().join("etc/ferry/image.json"), "not json").unwrap();
        let s = ImageStart::read(root.path(), 1 << 20);
        assert_eq!(
            s,
            ImageStart {
                enroot_rc: true,
                ..ImageStart::default()
            }
        );
    }
}
