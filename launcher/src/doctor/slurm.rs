//! Slurm: slurm.conf, oci.conf, ferry's plugstack line and the plugin's Slurm version.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::plugstack::{ferry_lines, read_plugstack, PluginLine, PlugstackError};
use super::{read_u32_symbol, Check};
use crate::slurm::site::PluginSettings;

/// Debian's Slurm plugin directory, where sites put spank_ferry.so when slurm.conf does
/// not name a `PluginDir`.
pub const DEBIAN_PLUGIN_DIR: &str = "/usr/lib/x86_64-linux-gnu/slurm-wlm";
const DEFAULT_SLURM_CONF: &str = "/etc/slurm/slurm.conf";
const DEFAULT_VERSION_HEADER: &str = "/usr/include/slurm/slurm_version.h";
/// The Slurm major.minor releases CI runs the plugin and `ferry run` tests against
/// (integration/test: Debian 12's 22.05, Debian 13's 24.11 and Debian unstable's 26.05).
pub const TESTED_SLURM: [u32; 3] = [0x160500, 0x180b00, 0x1a0500];
/// Slurm commands retry a missing configuration for a minute; a doctor must not hang.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The value of `key` in slurm.conf text (keys are case-insensitive; the last one wins).
pub fn slurm_conf_value(text: &str, key: &str) -> Option<String> {
    text.lines().rev().find_map(|l| {
        let l = l.split('#').next().unwrap_or("").trim();
        let (k, v) = l.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(key)
            .then(|| v.trim().to_string())
    })
}

/// `0xMMmmuu` from `srun --version` output (`slurm 23.11.4`, `slurm-wlm 22.05.8`).
pub fn parse_slurm_version(text: &str) -> Option<u32> {
    let word = text.split_whitespace().nth(1)?;
    let mut parts = word.split(['.', '-']);
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    let micro: u32 = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    (major <= 0xff && minor <= 0xff && micro <= 0xff)
        .then_some((major << 16) | (minor << 8) | micro)
}

/// `#define SLURM_VERSION_NUMBER 0x......` in slurm_version.h.
pub fn parse_version_header(text: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut w = line.split_whitespace();
        if w.next()? != "#define" || w.next()? != "SLURM_VERSION_NUMBER" {
            return None;
        }
        let v = w.next()?;
        u32::from_str_radix(v.strip_prefix("0x").or_else(|| v.strip_prefix("0X"))?, 16).ok()
    })
}

pub fn version_text(v: u32) -> String {
    format!("{}.{:02}.{}", (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff)
}

fn major_minor(v: u32) -> String {
    format!("{}.{:02}", (v >> 16) & 0xff, (v >> 8) & 0xff)
}

/// What is known about the node's Slurm.
#[derive(Debug, Clone)]
pub struct SlurmFacts {
    pub conf: PathBuf,
    pub plugstack: PathBuf,
    pub plugin_dirs: Vec<PathBuf>,
    pub oci_conf_present: bool,
    /// The plugin lines, or why plugstack.conf could not be read.
    pub lines: Result<Vec<PluginLine>, PlugstackError>,
    pub ferry_line: Option<PluginLine>,
    /// The running Slurm's version and where it was learnt.
    pub slurm_version: Option<(u32, String)>,
}

impl SlurmFacts {
    /// Find slurm.conf (SLURM_CONF, /etc/slurm/slurm.conf, `scontrol show config`) and
    /// read what the checks need. `Err` is the check to report when there is no Slurm.
    pub(super) fn gather() -> Result<SlurmFacts, Check> {
        let conf = match std::env::var_os("SLURM_CONF").filter(|v| !v.is_empty()) {
            Some(c) => {
                let c = PathBuf::from(c);
                if !c.is_file() {
                    return Err(Check::fail(
                        "slurm",
                        format!("SLURM_CONF={} does not exist", c.display()),
                        "point SLURM_CONF at the cluster's slurm.conf, or unset it",
                    ));
                }
                c
            }
            None if Path::new(DEFAULT_SLURM_CONF).is_file() => PathBuf::from(DEFAULT_SLURM_CONF),
            None => match scontrol_conf_path() {
                Some(c) => c,
                None => {
                    return Err(Check::warn(
                        "slurm",
                        format!("no Slurm configuration found (SLURM_CONF, {DEFAULT_SLURM_CONF}, `scontrol show config`): Slurm checks skipped"),
                        "nothing to do where only `ferry run` is used; on a Slurm node set SLURM_CONF",
                    ))
                }
            },
        };
        let text = fs::read_to_string(&conf).unwrap_or_default();
        let dir = conf.parent().unwrap_or(Path::new("/")).to_path_buf();
        let plugstack = slurm_conf_value(&text, "PlugStackConfig")
            .map(|p| dir.join(p))
            .unwrap_or_else(|| dir.join("plugstack.conf"));
        let plugin_dirs: Vec<PathBuf> = slurm_conf_value(&text, "PluginDir")
            .map(|v| v.split(':').map(PathBuf::from).collect())
            .unwrap_or_else(|| vec![PathBuf::from(DEBIAN_PLUGIN_DIR)]);
        let lines = read_plugstack(&plugstack, &plugin_dirs);
        let ferry_line = lines
            .as_ref()
            .ok()
            .and_then(|l| ferry_lines(l).into_iter().next().cloned());
        Ok(SlurmFacts {
            oci_conf_present: dir.join("oci.conf").exists(),
            conf,
            plugstack,
            plugin_dirs,
            lines,
            ferry_line,
            slurm_version: slurm_version(),
        })
    }
}

fn scontrol_conf_path() -> Option<PathBuf> {
    let out = run_with_timeout(Command::new("scontrol").args(["show", "config"]))?;
    out.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "SLURM_CONF").then(|| PathBuf::from(v.trim()))
        })
        .filter(|p| p.is_file())
}

/// The Slurm version of this node: `srun --version`, else the installed slurm_version.h.
fn slurm_version() -> Option<(u32, String)> {
    if let Some(v) = run_with_timeout(Command::new("srun").arg("--version"))
        .as_deref()
        .and_then(parse_slurm_version)
    {
        return Some((v, "srun --version".into()));
    }
    let header = fs::read_to_string(DEFAULT_VERSION_HEADER).ok()?;
    parse_version_header(&header).map(|v| (v, DEFAULT_VERSION_HEADER.into()))
}

/// stdout of a command that exited 0 within [`COMMAND_TIMEOUT`].
fn run_with_timeout(cmd: &mut Command) -> Option<String> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = crate::sys::child::run_tool(&tool, cmd, Some(COMMAND_TIMEOUT)).ok()?;
    String::from_utf8(out.stdout).ok()
}

/// The Slurm checks: oci.conf, the plugstack line and its arguments, the plugin's version.
pub fn slurm_checks(s: &SlurmFacts) -> Vec<Check> {
    let mut checks = vec![oci_check(s)];
    let lines = match &s.lines {
        Ok(lines) => lines,
        Err(e) => {
            checks.push(Check::fail(
                "plugstack",
                e.to_string(),
                format!(
                    "create {} with the line from /etc/slurm/plugstack.conf.d/ferry.conf (`required {DEBIAN_PLUGIN_DIR}/spank_ferry.so ferry_bin=/usr/local/bin/ferry`)",
                    s.plugstack.display()
                ),
            ));
            return checks;
        }
    };
    let found = ferry_lines(lines);
    let line = match found.as_slice() {
        [] => {
            checks.push(Check::fail(
                "plugstack",
                format!("spank_ferry.so is not in {} or the files it includes", s.plugstack.display()),
                format!("add `required {DEBIAN_PLUGIN_DIR}/spank_ferry.so ferry_bin=/usr/local/bin/ferry` (see conf/plugstack.conf.d/ferry.conf; `make install` puts it in /etc/slurm/plugstack.conf.d/)"),
            ));
            return checks;
        }
        [one] => *one,
        [first, ..] => {
            let places: Vec<String> = found.iter().map(|l| l.place()).collect();
            checks.push(Check::fail(
                "plugstack",
                format!(
                    "spank_ferry.so is loaded {} times ({})",
                    found.len(),
                    places.join(", ")
                ),
                "keep one line: Slurm would load the plugin twice and its options would clash",
            ));
            *first
        }
    };
    checks.push(plugin_line_check(line, PluginSettings::parse(&line.args)));
    let plugin_version = fs::read(&line.plugin)
        .map_err(PluginVersionError::Read)
        .and_then(|bytes| Ok(read_u32_symbol(&bytes, "plugin_version")?));
    checks.push(version_check(
        &line.plugin,
        plugin_version,
        s.slurm_version.clone(),
    ));
    checks
}

fn oci_check(s: &SlurmFacts) -> Check {
    let oci = s.conf.parent().unwrap_or(Path::new("/")).join("oci.conf");
    if s.oci_conf_present {
        Check::fail(
            "oci-conf",
            format!(
                "{} exists: Slurm then runs --container steps through its own OCI runtime hook, and ferry never sees them",
                oci.display()
            ),
            format!("remove (or rename) {} on every node and restart slurmd", oci.display()),
        )
    } else {
        Check::ok(
            "oci-conf",
            format!("no {}: --container reaches ferry", oci.display()),
        )
    }
}

/// The ferry line of plugstack.conf: its plugin file, its arguments, its ferry_bin.
pub fn plugin_line_check(
    line: &PluginLine,
    settings: Result<PluginSettings, crate::slurm::site::SiteError>,
) -> Check {
    const ID: &str = "plugstack";
    let place = line.place();
    if !line.plugin.is_file() {
        return Check::fail(
            ID,
            format!(
                "{place}: the plugin {} does not exist",
                line.plugin.display()
            ),
            "install spank_ferry.so there (`make install`) or fix the path",
        );
    }
    let settings = match settings {
        Ok(s) => s,
        Err(e) => return Check::fail(
            ID,
            format!("{place}: {e}"),
            "fix the arguments (docs/admin-guide.md lists them); until then container steps fail",
        ),
    };
    let bin = &settings.ferry_bin;
    let executable = fs::metadata(bin)
        .map(|m| m.is_file() && m.mode() & 0o111 != 0)
        .unwrap_or(false);
    if !executable {
        return Check::fail(
            ID,
            format!(
                "{place}: ferry_bin {} is missing or not executable",
                bin.display()
            ),
            "install ferry there or set `ferry_bin=` to where it is",
        );
    }
    let text = format!(
        "{place}: {} loaded, arguments parse, ferry_bin {}",
        line.plugin.display(),
        bin.display()
    );
    if line.required {
        Check::ok(ID, text)
    } else {
        Check::warn(
            ID,
            format!("{text}; but the line says `optional`"),
            "use `required`: with `optional`, a plugin that fails to load lets container steps run without their container",
        )
    }
}

/// Why the plugin's `plugin_version` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PluginVersionError {
    #[error("{0}")]
    Read(std::io::Error),
    #[error(transparent)]
    Elf(#[from] super::elf::ElfError),
}

pub fn version_check(
    plugin: &Path,
    plugin_version: Result<u32, PluginVersionError>,
    slurm: Option<(u32, String)>,
) -> Check {
    const ID: &str = "plugin-version";
    let built = match plugin_version {
        Ok(v) => v,
        Err(e) => {
            return Check::fail(
                ID,
                format!("cannot read plugin_version from {}: {e}", plugin.display()),
                "reinstall spank_ferry.so (`make install` or the ferry package)",
            )
        }
    };
    let Some((running, source)) = slurm else {
        return Check::warn(
            ID,
            format!(
                "the plugin is built for Slurm {}; this node's Slurm version is unknown (no srun, no slurm_version.h)",
                version_text(built)
            ),
            "check that slurmd's version has the same major.minor",
        );
    };
    // Slurm loads a SPANK plugin only when major.minor match (plugin.c).
    if built & 0xffff00 == running & 0xffff00 {
        let message = format!(
            "the plugin is built for Slurm {}, this node runs {} ({source})",
            version_text(built),
            version_text(running)
        );
        let tested = TESTED_SLURM.map(major_minor).join(", ");
        let newest = TESTED_SLURM[TESTED_SLURM.len() - 1];
        if TESTED_SLURM.contains(&(running & 0xffff00)) {
            Check::ok(
                ID,
                format!("{message}, a release ferry is tested with ({tested})"),
            )
        } else if running & 0xffff00 > newest {
            Check::warn(
                ID,
                format!("{message}, newer than the releases ferry is tested with ({tested})"),
                "try `srun --container=IMAGE` on one node before all: a new Slurm may change what the plugin relies on",
            )
        } else {
            Check::ok(
                ID,
                format!("{message}, between the releases ferry is tested with ({tested}): expected to work"),
            )
        }
    } else {
        Check::fail(
            ID,
            format!(
                "the plugin is built for Slurm {} but this node runs {} ({source}): Slurm refuses to load it (\"Incompatible Slurm plugin version\")",
                version_text(built),
                version_text(running)
            ),
            format!(
                "rebuild it against Slurm {}'s headers (`make install`, with libslurm-dev of that version or FERRY_SLURM_VERSION_H)",
                major_minor(running)
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::{elf, Status};

    #[test]
    fn slurm_conf_and_versions() {
        let conf = "ClusterName=x\n#PlugStackConfig=/no\nplugstackconfig = /etc/slurm/ps.conf # here\nPluginDir=/a:/b\n";
        assert_eq!(
            slurm_conf_value(conf, "PlugStackConfig").as_deref(),
            Some("/etc/slurm/ps.conf")
        );
        assert_eq!(
            slurm_conf_value(conf, "PluginDir").as_deref(),
            Some("/a:/b")
        );
        assert_eq!(slurm_conf_value(conf, "SlurmdPort"), None);
        assert_eq!(parse_slurm_version("slurm-wlm 22.05.8\n"), Some(0x160508));
        assert_eq!(parse_slurm_version("slurm 24.11.0-0rc1"), Some(0x180b00));
        assert_eq!(parse_slurm_version("srun: error"), None);
        assert_eq!(
            parse_version_header("#define SLURM_VERSION_NUMBER 0x170b04\n"),
            Some(0x170b04)
        );
        assert_eq!(version_text(0x160508), "22.05.8");
    }

    #[test]
    fn version_verdicts() {
        let so = Path::new("/x/spank_ferry.so");
        let c = version_check(so, Ok(0x160508), Some((0x160502, "srun --version".into())));
        assert_eq!(c.status, Status::Ok);
        assert!(
            c.message
                .contains("a release ferry is tested with (22.05, 24.11, 26.05)"),
            "{c:?}"
        );
        let c = version_check(so, Ok(0x170b04), Some((0x170b04, "srun --version".into())));
        assert_eq!(c.status, Status::Ok);
        assert!(c.message.contains("between the releases"), "{c:?}");
        let c = version_check(so, Ok(0x1a0b00), Some((0x1a0b01, "srun --version".into())));
        assert_eq!(c.status, Status::Warn);
        assert!(c.message.contains("newer than the releases"), "{c:?}");
        let c = version_check(so, Ok(0x160508), Some((0x170b04, "srun --version".into())));
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.message.contains("22.05.8") && c.message.contains("23.11.4"),
            "{c:?}"
        );
        assert!(c.fix.unwrap().contains("23.11"));
        assert_eq!(version_check(so, Ok(0x160508), None).status, Status::Warn);
        assert_eq!(
            version_check(so, Err(elf::ElfError::NotElf.into()), None).status,
            Status::Fail
        );
        let elf = elf::tests::tiny_elf(&[("plugin_version", 0x160508)]);
        assert_eq!(read_u32_symbol(&elf, "plugin_version"), Ok(0x160508));
    }

    #[test]
    fn plugin_line_verdicts() {
        let tmp = tempfile::tempdir().unwrap();
        let so = tmp.path().join("spank_ferry.so");
        fs::write(&so, b"").unwrap();
        let line = |required, args: &[&str]| PluginLine {
            file: "/etc/slurm/plugstack.conf".into(),
            line: 3,
            required,
            plugin: so.clone(),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        let good = line(true, &["ferry_bin=/bin/sh"]);
        let c = plugin_line_check(&good, PluginSettings::parse(&good.args));
        assert_eq!(c.status, Status::Ok, "{c:?}");
        let typo = line(true, &["ferrybin=/bin/sh"]);
        let c = plugin_line_check(&typo, PluginSettings::parse(&typo.args));
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.message.starts_with("/etc/slurm/plugstack.conf:3: ")
                && c.message.contains("unknown key"),
            "{c:?}"
        );
        let nobin = line(true, &["ferry_bin=/nonexistent/ferry"]);
        let c = plugin_line_check(&nobin, PluginSettings::parse(&nobin.args));
        assert!(c.message.contains("/nonexistent/ferry"), "{c:?}");
        let optional = line(false, &["ferry_bin=/bin/sh"]);
        assert_eq!(
            plugin_line_check(&optional, PluginSettings::parse(&optional.args)).status,
            Status::Warn
        );
    }
}
