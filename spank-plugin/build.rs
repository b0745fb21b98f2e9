//! Reads the Slurm version the plugin is built for from the installed `slurm/slurm_version.h`.
//!
//! Why: slurmd/slurmstepd/srun load a SPANK plugin only when its exported `plugin_version`
//! has the same major.minor as their own (`plugin.c`: `(version & 0xffff00) ==
//! (SLURM_VERSION_NUMBER & 0xffff00)` for type "spank"; otherwise "Incompatible Slurm plugin
//! version"). The `slurm-spank` crate's `SLURM_VERSION_NUMBER` comes from its bundled 23.11
//! bindings when built with `SKIP_SLURM_BINDINGS=1` (see `.cargo/config.toml`), which would
//! make Slurm 22.05 refuse the plugin. So the version comes from the headers of the Slurm the
//! plugin will run under, never from the crate.
//!
//! `FERRY_SLURM_VERSION_H` overrides the header path (default
//! `/usr/include/slurm/slurm_version.h`). A missing or unreadable header fails the build:
//! a plugin with a guessed version either does not load or loads into a Slurm whose ABI it
//! was not checked against.

use std::env;
use std::fs;
use std::path::PathBuf;

const DEFAULT_HEADER: &str = "/usr/include/slurm/slurm_version.h";

fn main() {
    println!("cargo:rerun-if-env-changed=FERRY_SLURM_VERSION_H");
    let header = env::var_os("FERRY_SLURM_VERSION_H")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_HEADER));
    println!("cargo:rerun-if-changed={}", header.display());

    let text = match fs::read_to_string(&header) {
        Ok(text) => text,
        // One line, because cargo shows it among the build output: what is missing and
        // the two ways to provide it.
        Err(e) => fail(&format!(
            "cannot read {} ({e}): spank-ferry must be built against the headers of the Slurm \
             that will load it; install them (Debian/Ubuntu: apt-get install libslurm-dev; \
             RPM: slurm-devel) or set FERRY_SLURM_VERSION_H to that Slurm's slurm_version.h",
            header.display()
        )),
    };
    let version = match parse_version_number(&text) {
        Some(v) => v,
        None => fail(&format!(
            "{} has no `#define SLURM_VERSION_NUMBER 0x...` line; is it Slurm's slurm_version.h?",
            header.display()
        )),
    };
    let (major, minor, micro) = (
        (version >> 16) & 0xff,
        (version >> 8) & 0xff,
        version & 0xff,
    );
    if major < 21 {
        fail(&format!(
            "{} says Slurm {major}.{minor:02}.{micro}; spank-ferry needs Slurm 21.08 or newer",
            header.display()
        ));
    }

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let code = format!(
        "/// `SLURM_VERSION_NUMBER` of the Slurm headers this plugin was built against ({major}.{minor:02}.{micro}, from `{}`).\n\
         pub const SLURM_VERSION_NUMBER: u32 = {version:#08x};\n",
        header.display()
    );
    fs::write(out.join("slurm_version.rs"), code).expect("write slurm_version.rs");
}

/// The value of `#define SLURM_VERSION_NUMBER 0x......` in `text`.
fn parse_version_number(text: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != "#define" || words.next()? != "SLURM_VERSION_NUMBER" {
            return None;
        }
        let value = words.next()?;
        let hex = value
            .strip_prefix("0x")
            .or_else(|| value.strip_prefix("0X"))?;
        u32::from_str_radix(hex, 16).ok()
    })
}

fn fail(msg: &str) -> ! {
    // `cargo:warning` lines show even when the build script's stderr is hidden.
    for line in msg.lines() {
        println!("cargo:warning={line}");
    }
    eprintln!("error: {msg}");
    std::process::exit(1);
}
