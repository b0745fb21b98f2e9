//! The `ferry` command line.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use ferry::env::parse_assignment;
use ferry::holder::PrepareOptions;
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
