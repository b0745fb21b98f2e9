//! The `ferry` command line.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use ferry::env::parse_assignment;
use ferry::holder::PrepareOptions;
use ferry::image::registry::{self, RemoteRef};
use ferry::mounts::MountSpec;
use ferry::run::{run, EXIT_SETUP_FAILED};
use ferry::spec::ContainerSpec;
use ferry::user::UserInfo;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Rootless containers for HPC: run a command in a squashfs or directory image, no root and no daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in a container made from IMAGE.
    Run(RunArgs),
    /// (internal) Hold a container's namespaces; started by `ferry run` and the Slurm plugin.
    #[command(hide = true)]
    Hold,
    /// (testing) Pull a registry image into an OCI image layout directory; `ferry import`
    /// will do this and convert the result.
    #[command(hide = true)]
    Pull(PullArgs),
    /// Check this node for what ferry needs (namespaces, FUSE, squashfuse, Slurm setup).
    Doctor(ferry::doctor::DoctorArgs),
}

#[derive(Args)]
struct PullArgs {
    /// `docker://[USER@][REGISTRY#]IMAGE[:TAG|@DIGEST]` or `REGISTRY/IMAGE[:TAG|@DIGEST]`.
    image: String,
    /// The OCI image layout directory to write (created if missing; a pull into it resumes).
    dir: PathBuf,
    /// Talk plain http to this image's registry.
    #[arg(long)]
    insecure: bool,
    /// OS/ARCH[/VARIANT] to pick from a multi-platform image (default: this machine's).
    #[arg(long)]
    platform: Option<String>,
    /// Extra PEM CA certificates to trust.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Blobs fetched at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
}

#[derive(Args)]
#[command(trailing_var_arg = true)]
struct RunArgs {
    /// Make the root filesystem writable; writes go to memory and vanish at exit.
    #[arg(short = 'w', long)]
    writable: bool,
    /// Appear as root (uid 0) inside; files you create on the host are still yours.
    #[arg(long)]
    remap_root: bool,
    /// Do not mount your home directory inside.
    #[arg(long)]
    no_mount_home: bool,
    /// Bind mount SRC[:DST[:ro|rw]]; repeatable, and a comma-separated list is accepted.
    #[arg(short = 'm', long = "mount", value_name = "SRC[:DST[:FLAGS]]")]
    mounts: Vec<String>,
    /// Working directory inside (default: the current directory if it exists inside, else home, else /).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Set NAME=VALUE inside (a bare NAME passes the current value); repeatable.
    #[arg(short = 'e', long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Image: a squashfs file (.sqsh) or a directory holding a root filesystem.
    image: PathBuf,
    /// Command and its arguments (default: /bin/sh).
    #[arg(allow_hyphen_values = true)]
    command: Vec<OsString>,
}

fn main() {
    init_logging();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Hold => ferry::holder::hold(),
        Command::Run(args) => match run_command(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("ferry: error: {e:#}");
                EXIT_SETUP_FAILED
            }
        },
        Command::Doctor(args) => ferry::doctor::main(&args),
        Command::Pull(args) => match pull_command(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("ferry: error: {e:#}");
                1
            }
        },
    };
    std::process::exit(code);
}

fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn run_command(args: RunArgs) -> anyhow::Result<i32> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let user = UserInfo::current()?;
    let mut spec = ContainerSpec::new(cwd.join(&args.image), user);
    spec.writable = args.writable;
    spec.remap_root = args.remap_root;
    spec.mount_home = !args.no_mount_home;
    spec.workdir = args.workdir;
    spec.cwd = Some(cwd.clone());
    for m in &args.mounts {
        spec.mounts.extend(MountSpec::parse_list(m, &cwd)?);
    }
    for e in &args.env {
        spec.env
            .push(parse_assignment(e, |n| std::env::var(n).ok()).map_err(anyhow::Error::msg)?);
    }
    let command = if args.command.is_empty() {
        vec![OsString::from("/bin/sh")]
    } else {
        args.command
    };
    let program = std::env::current_exe().context("cannot find the ferry binary itself")?;
    Ok(run(&spec, &command, &PrepareOptions::for_cli(program))?)
}

fn pull_command(args: PullArgs) -> anyhow::Result<()> {
    let reference = parse_remote_ref(&args.image)?;
    let mut options = registry::ClientOptions {
        parallel: args.parallel.max(1),
        ca_file: args.ca_file,
        ..Default::default()
    };
    if args.insecure {
        options.insecure_registries.push(reference.registry.clone());
    }
    if let Some(p) = &args.platform {
        options.platform = registry::Platform::parse(p).with_context(|| {
            format!("--platform {p}: expected OS/ARCH[/VARIANT], e.g. linux/arm64")
        })?;
    }
    let start = std::time::Instant::now();
    let client = registry::Client::new(options)?;
    let pulled = client.pull(&reference, &args.dir)?;
    println!(
        "{} {} ({} layers, {} bytes fetched, {} blobs reused) in {:.2} s",
        reference,
        pulled.manifest_digest,
        pulled.layers.len(),
        pulled.fetched_bytes,
        pulled.reused_blobs,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A stop-gap reference parser for `ferry pull` until `image::reference` lands: enroot's
/// `docker://[USER@][REGISTRY#]IMAGE[:TAG]` and Docker's `[REGISTRY/]IMAGE[:TAG][@DIGEST]`.
fn parse_remote_ref(text: &str) -> anyhow::Result<RemoteRef> {
    let rest = text.strip_prefix("docker://").unwrap_or(text);
    let (user, rest) = match rest.split_once('@') {
        Some((u, r)) if !u.contains('/') && !u.contains('#') && !r.starts_with("sha256:") => {
            (Some(u.to_string()), r)
        }
        _ => (None, rest),
    };
    let (name, digest) = match rest.split_once('@') {
        Some((n, d)) => (n, Some(d.to_string())),
        None => (rest, None),
    };
    let (registry, path) = if let Some((r, p)) = name.split_once('#') {
        (r.to_string(), p.to_string())
    } else {
        match name.split_once('/') {
            Some((first, p)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), p.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        }
    };
    let (repository, tag) = match path.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r.to_string(), Some(t.to_string())),
        _ => (path.clone(), None),
    };
    let repository = if registry == "docker.io" && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository
    };
    if registry.is_empty() || repository.is_empty() {
        anyhow::bail!("bad image reference `{text}`: expected [REGISTRY/]IMAGE[:TAG][@DIGEST]");
    }
    Ok(RemoteRef {
        registry,
        repository,
        tag,
        digest,
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(
        text: &str,
    ) -> (
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
    ) {
        let r = parse_remote_ref(text).unwrap();
        (r.registry, r.repository, r.tag, r.digest, r.user)
    }

    #[test]
    fn pull_references() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            parsed("docker://alice@nvcr.io#nvidia/pytorch:24.05-py3"),
            (
                "nvcr.io".into(),
                "nvidia/pytorch".into(),
                s("24.05-py3"),
                None,
                s("alice")
            )
        );
        assert_eq!(
            parsed("busybox"),
            (
                "docker.io".into(),
                "library/busybox".into(),
                None,
                None,
                None
            )
        );
        assert_eq!(
            parsed("127.0.0.1:15000/ferry/busybox:latest"),
            (
                "127.0.0.1:15000".into(),
                "ferry/busybox".into(),
                s("latest"),
                None,
                None
            )
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            parsed(&format!("ghcr.io/o/i@{d}")),
            ("ghcr.io".into(), "o/i".into(), None, Some(d.clone()), None)
        );
        assert!(parse_remote_ref("docker://#x").is_err());
    }
}
