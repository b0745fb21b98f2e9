//! Reading srun's own options from its command line, the way srun's `getopt_long` does.
//!
//! Why this exists: since Slurm 21.08 srun owns `--container`, so the SPANK plugin cannot
//! register an option of that name and never sees its value through SPANK. Slurm passes
//! it on as `SLURM_CONTAINER`, but only when that variable is not already set — inside a job
//! started with `sbatch --container=A`, `srun --container=B` still shows `A` to the step. The
//! plugin (in srun, local context) therefore reads srun's command line (`/proc/self/cmdline`)
//! itself, with this module.
//!
//! srun parses its options with `getopt_long` and the option string `"+..."`: options end at
//! the first argument that is not an option (the command) or at `--`; short options may be
//! bundled (`-lN2`); a short option's value may be attached (`-n2`) or be the next argument
//! (`-n 2`); a long option's value may follow `=` or be the next argument when the option
//! requires a value (`--mem 100M`); options with an *optional* value take it only after `=`
//! (or attached, for short ones); long options may be abbreviated to any unambiguous prefix.
//! Getting one option's value-taking wrong makes its value look like the command (and every
//! later option is missed) or makes the command look like a value (and the command's own
//! arguments are read as srun options), so the table below is taken from Slurm's
//! `src/common/slurm_opt.c` (the options srun accepts, `common_options[]` with a `set_func`
//! or `set_func_srun`) for every release from 20.11 to 26.05, with the releases that have
//! each option. SPANK plugins add their own options to srun's table; the caller passes the
//! ones it knows (ferry's own). Options of other plugins are unknown here and are taken to
//! have no value: with such an option, write its value with `=`.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

/// Whether an option takes a value, as `getopt_long`'s `has_arg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    /// `no_argument`.
    No,
    /// `optional_argument`: the value only after `=` (`--opt=value`) or attached (`-kvalue`).
    Optional,
    /// `required_argument`: after `=`, attached, or the next argument.
    Required,
}

/// One long option of srun's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongOpt {
    pub name: &'static str,
    pub arg: Arg,
    /// First Slurm release that has it, as `SLURM_VERSION_NUM(major, minor, 0)`.
    pub since: u32,
    /// Last Slurm release (major.minor) that has it; `None` while current.
    pub until: Option<u32>,
}

/// `SLURM_VERSION_NUM(major, minor, 0)`.
pub const fn version(major: u32, minor: u32) -> u32 {
    (major << 16) | (minor << 8)
}

/// Oldest release the table covers; options marked with it exist since at least then.
const OLDEST: u32 = version(20, 11);

const fn all(name: &'static str, arg: Arg) -> LongOpt {
    LongOpt {
        name,
        arg,
        since: OLDEST,
        until: None,
    }
}

const fn since(name: &'static str, arg: Arg, since: u32) -> LongOpt {
    LongOpt {
        name,
        arg,
        since,
        until: None,
    }
}

const fn range(name: &'static str, arg: Arg, since: u32, until: u32) -> LongOpt {
    LongOpt {
        name,
        arg,
        since,
        until: Some(until),
    }
}

use Arg::{No, Optional, Required};

/// srun's long options, Slurm 20.11 to 26.05. (`overlap`, `pty` and `external-launcher`
/// changed from `no_argument` to `optional_argument` on the way; neither ever takes the next
/// argument, so they are listed once as optional.)
pub const SRUN_LONG_OPTIONS: &[LongOpt] = &[
    all("accel-bind", Required),
    all("account", Required),
    all("acctg-freq", Required),
    since("async", No, version(26, 5)),
    since("autocomplete", Required, version(23, 2)),
    all("bb", Required),
    all("bbf", Required),
    all("bcast", Optional),
    since("bcast-exclude", Required, version(21, 8)),
    all("begin", Required),
    all("chdir", Required),
    all("cluster", Required),
    all("cluster-constraint", Required),
    all("clusters", Required),
    all("comment", Required),
    all("compress", Optional),
    since("consolidate-segments", No, version(25, 11)),
    all("constraint", Required),
    since("container", Required, version(21, 8)),
    since("container-id", Required, version(23, 2)),
    since("container-type", Required, version(26, 5)),
    since("context", Required, version(21, 8)),
    all("contiguous", No),
    all("core-spec", Required),
    all("cores-per-socket", Required),
    all("cpu-bind", Required),
    all("cpu-freq", Required),
    all("cpu_bind", Required),
    all("cpus-per-gpu", Required),
    all("cpus-per-task", Required),
    all("deadline", Required),
    all("debugger-test", No),
    all("delay-boot", Required),
    all("dependency", Required),
    all("disable-status", No),
    all("distribution", Required),
    all("epilog", Required),
    all("error", Required),
    all("exact", No),
    all("exclude", Required),
    all("exclusive", Optional),
    all("export", Required),
    since("external-launcher", Optional, version(23, 11)),
    since("extra", Required, version(23, 2)),
    all("extra-node-info", Required),
    range("gid", Required, OLDEST, version(22, 5)),
    all("gpu-bind", Required),
    all("gpu-freq", Required),
    all("gpus", Required),
    all("gpus-per-node", Required),
    all("gpus-per-socket", Required),
    all("gpus-per-task", Required),
    all("gres", Required),
    all("gres-flags", Required),
    all("help", No),
    all("het-group", Required),
    all("hint", Required),
    all("hold", No),
    since("ignore-signals", Required, version(26, 5)),
    all("immediate", Optional),
    all("input", Required),
    all("interactive", No),
    all("job-name", Required),
    all("jobid", Required),
    all("kill-on-bad-exit", Optional),
    all("label", No),
    all("licenses", Required),
    all("mail-type", Required),
    all("mail-user", Required),
    all("mcs-label", Required),
    all("mem", Required),
    all("mem-bind", Required),
    all("mem-per-cpu", Required),
    all("mem-per-gpu", Required),
    since("mem-update", Required, version(26, 5)),
    all("mincpus", Required),
    all("mpi", Required),
    all("msg-timeout", Required),
    all("multi-prog", No),
    all("network", Required),
    all("nice", Optional),
    all("no-allocate", No),
    all("no-kill", Optional),
    all("nodefile", Required),
    all("nodelist", Required),
    all("nodes", Required),
    all("ntasks", Required),
    all("ntasks-per-core", Required),
    all("ntasks-per-gpu", Required),
    all("ntasks-per-node", Required),
    all("ntasks-per-socket", Required),
    all("ntasks-per-tres", Required),
    since("oom-kill-step", Optional, version(24, 11)),
    all("open-mode", Required),
    all("output", Required),
    all("overcommit", No),
    all("overlap", Optional),
    all("oversubscribe", No),
    all("pack-group", Required),
    since("parsable", No, version(26, 5)),
    all("partition", Required),
    range("power", Required, OLDEST, version(23, 11)),
    since("prefer", Required, version(22, 5)),
    all("preserve-env", No),
    all("priority", Required),
    all("profile", Required),
    all("prolog", Required),
    all("propagate", Optional),
    all("pty", Optional),
    all("qos", Required),
    all("quiet", No),
    all("quit-on-interrupt", No),
    all("reboot", No),
    all("relative", Required),
    all("reservation", Required),
    since("resources", Required, version(25, 11)),
    all("resv-ports", Optional),
    since("segment", Required, version(24, 5)),
    since("send-libs", Optional, version(21, 8)),
    all("signal", Required),
    all("slurmd-debug", Required),
    all("sockets-per-node", Required),
    all("spread-job", No),
    since("spread-segments", No, version(25, 11)),
    since("stepmgr", No, version(24, 5)),
    all("switches", Required),
    all("task-epilog", Required),
    all("task-prolog", Required),
    all("tasks-per-node", Required),
    all("test-only", No),
    all("thread-spec", Required),
    all("threads", Required),
    all("threads-per-core", Required),
    all("time", Required),
    all("time-min", Required),
    all("tmp", Required),
    since("treewidth", Required, version(23, 11)),
    since("tres-bind", Required, version(23, 11)),
    since("tres-per-task", Required, version(23, 2)),
    range("uid", Required, OLDEST, version(22, 5)),
    all("unbuffered", No),
    all("usage", No),
    all("use-min-nodes", No),
    all("verbose", No),
    all("version", No),
    all("wait", Required),
    since("wait-for-children", No, version(25, 5)),
    all("wckey", Required),
    all("whole", No),
    all("x11", Optional),
];

/// srun's short options that require a value (`-n 2`, `-n2`); the same in every release.
pub const SRUN_SHORT_REQUIRED: &str = "ABCDFGJLMNSTWbcdeimnopqrtwx";
/// srun's short options whose value is optional and then attached (`-k`, `-kvalue`).
pub const SRUN_SHORT_OPTIONAL: &str = "IKk";
/// srun's short options without a value.
pub const SRUN_SHORT_NO: &str = "EHOQVXZhlsuv";

/// Name of an option as written on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptName {
    /// A long option, by its full name when the (possibly abbreviated) spelling matched one
    /// option, else as written.
    Long(String),
    Short(char),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedOpt {
    pub name: OptName,
    pub value: Option<OsString>,
}

/// srun's options, in order, and where the command starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SrunArgs {
    pub options: Vec<ParsedOpt>,
    /// Index (into the arguments given to [`parse`]) of the command; the length when none.
    pub command: usize,
}

impl SrunArgs {
    /// The value of the last occurrence of long option `name` (srun keeps the last one).
    pub fn last_value(&self, name: &str) -> Option<&OsStr> {
        self.options
            .iter()
            .rev()
            .find(|o| matches!(&o.name, OptName::Long(n) if n == name))
            .and_then(|o| o.value.as_deref())
    }
}

/// How `spelling` (a long option without `--` and `=value`) resolves against the table:
/// the option's full name (None when it matches no option or several unrelated ones) and
/// its [`Arg`] (None when unknown or ambiguous).
fn resolve_long<'a>(
    spelling: &[u8],
    slurm_version: u32,
    extra: &'a [(&'a str, Arg)],
) -> (Option<&'a str>, Option<Arg>) {
    let mm = slurm_version & 0xffff00;
    let srun = SRUN_LONG_OPTIONS
        .iter()
        .filter(|o| o.since <= mm && o.until.is_none_or(|u| mm <= u))
        .map(|o| (o.name, o.arg));
    let candidates = srun.chain(extra.iter().copied());

    let mut prefix_matches: Vec<(&'a str, Arg)> = Vec::new();
    for (name, arg) in candidates {
        if name.as_bytes() == spelling {
            return (Some(name), Some(arg));
        }
        if name.as_bytes().starts_with(spelling) && !spelling.is_empty() {
            prefix_matches.push((name, arg));
        }
    }
    match prefix_matches.as_slice() {
        [] => (None, None),
        [(name, arg)] => (Some(name), Some(*arg)),
        [(_, first), rest @ ..] => {
            // getopt_long rejects an ambiguous abbreviation (srun then exits), except when
            // all candidates are the same option; either way only `Arg` matters here.
            let arg = rest.iter().all(|(_, a)| a == first).then_some(*first);
            (None, arg)
        }
    }
}

/// Parse srun's options from `args` (srun's arguments *without* `argv[0]`), as srun's
/// `getopt_long("+...")` of Slurm `slurm_version` (`SLURM_VERSION_NUMBER`, only major.minor
/// count) would, with the plugin options `extra` added to its table.
///
/// Stops at the first non-option argument (the command), after `--`, or at a required
/// value that is missing. For a heterogeneous step (`srun A : B`) this reads the first
/// component's options only.
pub fn parse<S: AsRef<OsStr>>(args: &[S], slurm_version: u32, extra: &[(&str, Arg)]) -> SrunArgs {
    let mut options = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_ref().as_bytes();
        if arg == b"--" {
            i += 1;
            break;
        }
        if arg.len() < 2 || arg[0] != b'-' {
            break; // the command (a lone "-" is not an option either)
        }
        i += 1;
        if let Some(long) = arg.strip_prefix(b"--") {
            let (spelling, attached) = match long.iter().position(|&b| b == b'=') {
                Some(eq) => (&long[..eq], Some(&long[eq + 1..])),
                None => (long, None),
            };
            let (name, kind) = resolve_long(spelling, slurm_version, extra);
            let name = OptName::Long(match name {
                Some(n) => n.to_string(),
                None => String::from_utf8_lossy(spelling).into_owned(),
            });
            let value = match (attached, kind) {
                (Some(v), _) => Some(OsStr::from_bytes(v).to_os_string()),
                (None, Some(Arg::Required)) => match args.get(i) {
                    Some(v) => {
                        i += 1;
                        Some(v.as_ref().to_os_string())
                    }
                    None => {
                        options.push(ParsedOpt { name, value: None });
                        break; // srun fails: "option requires an argument"
                    }
                },
                (None, _) => None,
            };
            options.push(ParsedOpt { name, value });
            continue;
        }
        // A bundle of short options: "-lN2", "-n", "-kvalue".
        let bundle = &arg[1..];
        let mut j = 0;
        while j < bundle.len() {
            let c = bundle[j] as char;
            let rest = &bundle[j + 1..];
            if SRUN_SHORT_REQUIRED.contains(c) {
                let value = if !rest.is_empty() {
                    Some(OsStr::from_bytes(rest).to_os_string())
                } else if let Some(v) = args.get(i) {
                    i += 1;
                    Some(v.as_ref().to_os_string())
                } else {
                    None
                };
                options.push(ParsedOpt {
                    name: OptName::Short(c),
                    value,
                });
                break;
            } else if SRUN_SHORT_OPTIONAL.contains(c) {
                let value = (!rest.is_empty()).then(|| OsStr::from_bytes(rest).to_os_string());
                options.push(ParsedOpt {
                    name: OptName::Short(c),
                    value,
                });
                break;
            } else {
                // Known flags, and unknown letters (srun rejects those and exits).
                options.push(ParsedOpt {
                    name: OptName::Short(c),
                    value: None,
                });
                j += 1;
            }
        }
    }
    SrunArgs {
        options,
        command: i.min(args.len()),
    }
}

/// The value of srun's `--container` in `args` (srun's arguments without `argv[0]`), if any.
/// See [`parse`] for the meaning of `slurm_version` and `extra`.
pub fn container<S: AsRef<OsStr>>(
    args: &[S],
    slurm_version: u32,
    extra: &[(&str, Arg)],
) -> Option<OsString> {
    parse(args, slurm_version, extra)
        .last_value("container")
        .map(OsStr::to_os_string)
}

/// Split the contents of `/proc/PID/cmdline` (NUL-terminated arguments) into arguments.
pub fn split_cmdline(bytes: &[u8]) -> Vec<OsString> {
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|&b| b == 0)
        .map(|a| OsStr::from_bytes(a).to_os_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2205: u32 = 0x160508;
    const V2411: u32 = 0x180b06;

    /// The options ferry's plugin registers (pyxis' names).
    const FERRY: &[(&str, Arg)] = &[
        ("container-image", Arg::Required),
        ("container-mounts", Arg::Required),
        ("container-workdir", Arg::Required),
        ("container-mount-home", Arg::No),
        ("no-container-mount-home", Arg::No),
        ("container-remap-root", Arg::No),
        ("no-container-remap-root", Arg::No),
        ("container-writable", Arg::No),
        ("container-readonly", Arg::No),
        ("container-env", Arg::Required),
        ("container-entrypoint", Arg::No),
        ("no-container-entrypoint", Arg::No),
    ];

    fn c(line: &str) -> Option<String> {
        let args: Vec<&str> = line.split_whitespace().collect();
        container(&args, V2205, FERRY).map(|v| v.into_string().unwrap())
    }

    fn cmd(line: &str) -> Vec<String> {
        let args: Vec<&str> = line.split_whitespace().collect();
        let parsed = parse(&args, V2205, FERRY);
        args[parsed.command..]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn both_spellings() {
        assert_eq!(c("--container=a.sqsh true").as_deref(), Some("a.sqsh"));
        assert_eq!(c("--container a.sqsh true").as_deref(), Some("a.sqsh"));
        assert_eq!(
            c("-n1 --container /x/y.sqsh hostname -f").as_deref(),
            Some("/x/y.sqsh")
        );
    }

    #[test]
    fn none_and_empty() {
        assert_eq!(c("true"), None);
        assert_eq!(c(""), None);
        assert_eq!(c("-n 2 hostname"), None);
        assert_eq!(c("--container= true").as_deref(), Some(""));
    }

    #[test]
    fn last_one_wins() {
        assert_eq!(c("--container=a --container b true").as_deref(), Some("b"));
    }

    #[test]
    fn stops_at_the_command() {
        assert_eq!(c("hostname --container=x"), None);
        assert_eq!(c("-n1 python train.py --container x"), None);
        assert_eq!(
            cmd("-n1 python train.py --container x"),
            ["python", "train.py", "--container", "x"]
        );
    }

    #[test]
    fn stops_at_double_dash() {
        assert_eq!(c("-n1 -- --container=x"), None);
        assert_eq!(cmd("-n1 -- --container=x"), ["--container=x"]);
        assert_eq!(c("--container=a -- true").as_deref(), Some("a"));
    }

    #[test]
    fn separate_values_of_short_options_are_skipped() {
        for opt in [
            "-n 2",
            "-N 1",
            "-p debug",
            "-J name",
            "-o out.txt",
            "-c 2",
            "-w node1",
            "-t 10",
            "-e err",
            "-i in",
            "-A acct",
            "-q normal",
            "-x node2",
            "-D /tmp",
            "-G 1",
            "-m block",
            "-C feat",
            "-d afterok:1",
            "-L lic",
            "-M c1",
            "-S 1",
            "-T 2",
            "-W 5",
            "-b now",
            "-B 1:1",
            "-F file",
            "-r 0",
        ] {
            let line = format!("{opt} --container=img true");
            assert_eq!(c(&line).as_deref(), Some("img"), "{line}");
            assert_eq!(cmd(&line), ["true"], "{line}");
        }
    }

    #[test]
    fn separate_values_of_long_options_are_skipped() {
        for opt in [
            "--mem 100M",
            "--ntasks 2",
            "--nodes 1",
            "--partition debug",
            "--job-name x",
            "--time 10",
            "--export NONE",
            "--chdir /tmp",
            "--cpu-bind none",
            "--cpu_bind none",
            "--gres gpu:1",
            "--mpi pmix",
            "--nodelist n1",
            "--output o",
            "--mem-per-cpu 1G",
            "--prefer f",
            "--uid 5",
            "--gid 5",
            "--power x",
            "--het-group 0",
            "--jobid 4",
            "--container-image x.sqsh",
            "--container-mounts /a:/b",
            "--container-env A,B",
            "--container-workdir /w",
        ] {
            let line = format!("{opt} --container=img true");
            assert_eq!(c(&line).as_deref(), Some("img"), "{line}");
            assert_eq!(cmd(&line), ["true"], "{line}");
        }
    }

    #[test]
    fn flags_do_not_take_the_next_argument() {
        for opt in [
            "-l",
            "-v",
            "-vvv",
            "-Q",
            "-u",
            "-X",
            "-Z",
            "-E",
            "-O",
            "-H",
            "-s",
            "--label",
            "--exact",
            "--overlap",
            "--pty",
            "--container-writable",
            "--no-container-mount-home",
            "--container-remap-root",
            "--no-container-entrypoint",
            "--whole",
            "--multi-prog",
        ] {
            let line = format!("{opt} true --container=x");
            assert_eq!(c(&line), None, "{line}");
            assert_eq!(cmd(&line)[0], "true", "{line}");
        }
    }

    #[test]
    fn optional_values_are_only_attached() {
        // `-k`, `-K`, `-I`, `--exclusive`, `--immediate`... never take the next argument.
        for opt in [
            "-k",
            "-K",
            "-I",
            "--exclusive",
            "--immediate",
            "--kill-on-bad-exit",
            "--no-kill",
            "--x11",
            "--bcast",
            "--nice",
            "--propagate",
            "--resv-ports",
            "--send-libs",
            "--compress",
        ] {
            let line = format!("{opt} true --container=x");
            assert_eq!(cmd(&line)[0], "true", "{line}");
        }
        assert_eq!(
            c("-I5 --exclusive=user -K1 --container=x true").as_deref(),
            Some("x")
        );
        let parsed = parse(&["-I5", "true"], V2205, FERRY);
        assert_eq!(parsed.options[0].value.as_deref(), Some(OsStr::new("5")));
    }

    #[test]
    fn bundled_and_attached_short_options() {
        assert_eq!(c("-lN2 --container=x true").as_deref(), Some("x"));
        assert_eq!(cmd("-lN2 true"), ["true"]);
        assert_eq!(cmd("-ln 2 true"), ["true"]);
        assert_eq!(cmd("-n2 true"), ["true"]);
        assert_eq!(cmd("-lvk true"), ["true"]);
        // `-lp` takes the next argument as the partition: "debug" is not the command.
        assert_eq!(cmd("-lp debug true"), ["true"]);
        let parsed = parse(&["-lN2", "true"], V2205, FERRY);
        assert_eq!(
            parsed.options,
            vec![
                ParsedOpt {
                    name: OptName::Short('l'),
                    value: None
                },
                ParsedOpt {
                    name: OptName::Short('N'),
                    value: Some("2".into())
                },
            ]
        );
    }

    #[test]
    fn values_that_look_like_options_are_values() {
        // `-J --container=x` names the job "--container=x".
        assert_eq!(c("-J --container=x true"), None);
        assert_eq!(c("--comment --container=x true"), None);
        assert_eq!(c("--comment=--container=x true"), None);
    }

    #[test]
    fn abbreviations() {
        // Unique prefixes: `--mem-per-c` is --mem-per-cpu; `--partit` is --partition.
        assert_eq!(c("--partit debug --container=x true").as_deref(), Some("x"));
        assert_eq!(c("--mem-per-c 1G --container=x true").as_deref(), Some("x"));
        assert_eq!(
            c("--container-im i.sqsh --container=x true").as_deref(),
            Some("x")
        );
        let parsed = parse(&["--partit", "debug", "true"], V2205, FERRY);
        assert_eq!(parsed.options[0].name, OptName::Long("partition".into()));
        // `--containe` is ambiguous (container, container-image, ...): srun refuses it, and
        // it is not taken as --container.
        assert_eq!(c("--containe=x true"), None);
        // An exact name wins over longer ones it prefixes: --mem, --container.
        assert_eq!(parse(&["--mem", "1G", "true"], V2205, FERRY).command, 2);
    }

    #[test]
    fn all_candidates_agreeing_decide_the_value() {
        // `--cpu-b` matches cpu-bind only; `--gpus-per-` matches three value options.
        assert_eq!(cmd("--gpus-per- 1 true"), ["true"]);
        assert_eq!(cmd("--cpu-b none true"), ["true"]);
    }

    #[test]
    fn version_dependent_options() {
        // --uid/--gid exist up to 22.05 only; --tres-per-task since 23.02.
        let a = ["--uid", "5", "true"];
        assert_eq!(parse(&a, V2205, FERRY).command, 2);
        assert_eq!(parse(&a, V2411, FERRY).command, 1);
        let b = ["--tres-per-task", "gres/gpu:1", "true"];
        assert_eq!(parse(&b, V2205, FERRY).command, 1);
        assert_eq!(parse(&b, V2411, FERRY).command, 2);
        // --container only from 21.08 on.
        let old = ["--container", "x", "true"];
        assert_eq!(container(&old, version(20, 11), &[]), None);
        // `--container-i` is unique in 22.05 with ferry's options; ambiguous with 23.02's
        // --container-id.
        let d = ["--container-i", "x.sqsh", "true"];
        assert_eq!(
            parse(&d, V2205, FERRY).options[0].name,
            OptName::Long("container-image".into())
        );
        assert_eq!(
            parse(&d, V2411, FERRY).options[0].name,
            OptName::Long("container-i".into())
        );
        assert_eq!(parse(&d, V2411, FERRY).command, 2); // both take a value
    }

    #[test]
    fn unknown_options_have_no_value() {
        // Another plugin's `--foo VALUE`: VALUE is taken as the command (documented).
        assert_eq!(
            cmd("--foo bar --container=x true"),
            ["bar", "--container=x", "true"]
        );
        assert_eq!(c("--foo=bar --container=x true").as_deref(), Some("x"));
    }

    #[test]
    fn missing_required_value() {
        let parsed = parse(&["--container"], V2205, FERRY);
        assert_eq!(parsed.options.len(), 1);
        assert_eq!(parsed.options[0].value, None);
        assert_eq!(parsed.command, 1);
        assert_eq!(parse(&["-n"], V2205, FERRY).command, 1);
    }

    #[test]
    fn lone_dash_is_the_command() {
        assert_eq!(cmd("-n1 - x"), ["-", "x"]);
    }

    #[test]
    fn heterogeneous_step_reads_the_first_component() {
        assert_eq!(
            c("--container=a true : --container=b false").as_deref(),
            Some("a")
        );
        assert_eq!(c("-n1 true : --container=b false"), None);
    }

    #[test]
    fn non_utf8_values_survive() {
        let args = [
            OsStr::from_bytes(b"--container=\xff.sqsh"),
            OsStr::new("true"),
        ];
        assert_eq!(
            container(&args, V2205, FERRY).unwrap().as_bytes(),
            b"\xff.sqsh"
        );
    }

    #[test]
    fn cmdline_splitting() {
        assert_eq!(split_cmdline(b"srun\0-n1\0true\0"), ["srun", "-n1", "true"]);
        assert_eq!(split_cmdline(b"srun\0\0x\0"), ["srun", "", "x"]);
        assert_eq!(split_cmdline(b""), Vec::<OsString>::new());
    }

    /// Cross-check against the C library's own `getopt_long`, fed srun's 22.05 option table
    /// the way srun builds it (`"+"` option string, long options with their `has_arg`), on
    /// many generated command lines. Cases glibc rejects (srun then exits) are skipped.
    #[test]
    fn agrees_with_glibc_getopt_long() {
        use std::ffi::{c_int, CString};
        let has_arg = |a: Arg| match a {
            Arg::No => 0,
            Arg::Required => 1,
            Arg::Optional => 2,
        };
        let mm = V2205 & 0xffff00;
        let longs: Vec<(&str, Arg)> = SRUN_LONG_OPTIONS
            .iter()
            .filter(|o| o.since <= mm && o.until.is_none_or(|u| mm <= u))
            .map(|o| (o.name, o.arg))
            .chain(FERRY.iter().copied())
            .collect();
        // Options that are one option in srun under two names share a `val`.
        let val_of = |name: &str| -> c_int {
            let canonical = match name {
                "cpu_bind" => "cpu-bind",
                "pack-group" => "het-group",
                "tasks-per-node" => "ntasks-per-node",
                n => n,
            };
            1000 + longs.iter().position(|(n, _)| *n == canonical).unwrap() as c_int
        };
        let table: Vec<(CString, c_int, c_int)> = longs
            .iter()
            .map(|(n, a)| (CString::new(*n).unwrap(), has_arg(*a), val_of(n)))
            .collect();
        let mut optstring = String::from("+");
        for c in SRUN_SHORT_REQUIRED.chars() {
            optstring.push(c);
            optstring.push(':');
        }
        for c in SRUN_SHORT_OPTIONAL.chars() {
            optstring.push(c);
            optstring.push_str("::");
        }
        optstring.push_str(SRUN_SHORT_NO);
        let optstring = CString::new(optstring).unwrap();
        let container_val = val_of("container");

        // Tokens to build command lines from.
        let mut pool: Vec<String> = vec![
            "--".into(),
            "-".into(),
            "true".into(),
            "x".into(),
            "2".into(),
            "-n2".into(),
            "-lN2".into(),
            "-ln".into(),
            "-k".into(),
            "-kx".into(),
            "-I5".into(),
            "-vvl".into(),
            "-p".into(),
            "--container=img".into(),
            "--container".into(),
            "--contain".into(),
            "--mem".into(),
            "--mem-p".into(),
            "--partit".into(),
            "--cpu".into(),
            "--cpu-b".into(),
            "--gpus-per-".into(),
            "--container-i".into(),
            "--no-container-m".into(),
            "--exclusive=user".into(),
            ":".into(),
        ];
        for (n, a) in &longs {
            pool.push(format!("--{n}"));
            if *a != Arg::No {
                pool.push(format!("--{n}=v"));
            }
        }
        for c in SRUN_SHORT_REQUIRED
            .chars()
            .chain(SRUN_SHORT_OPTIONAL.chars())
            .chain(SRUN_SHORT_NO.chars())
        {
            pool.push(format!("-{c}"));
        }

        let mut seed: u64 = 0x9e3779b97f4a7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut compared, mut skipped) = (0, 0);
        for _ in 0..30000 {
            let len = 1 + (next() % 7) as usize;
            let args: Vec<String> = (0..len)
                .map(|_| pool[(next() % pool.len() as u64) as usize].clone())
                .collect();

            // glibc's answer.
            let cargs: Vec<CString> = std::iter::once("srun")
                .chain(args.iter().map(String::as_str))
                .map(|a| CString::new(a).unwrap())
                .collect();
            let Some((end, container)) =
                crate::sys::raw::glibc_getopt_long(&cargs, &optstring, &table, container_val)
            else {
                skipped += 1;
                continue;
            };
            compared += 1;
            let ours = parse(&args, V2205, FERRY);
            assert_eq!(ours.command + 1, end, "command position for {args:?}");
            assert_eq!(
                ours.last_value("container")
                    .map(|v| v.to_string_lossy().into_owned()),
                container,
                "--container for {args:?}"
            );
        }
        assert!(
            compared > 5000 && skipped > 100,
            "compared {compared}, skipped {skipped}"
        );
    }

    #[test]
    fn table_is_sorted_and_unique() {
        for w in SRUN_LONG_OPTIONS.windows(2) {
            assert!(w[0].name < w[1].name, "{} before {}", w[0].name, w[1].name);
        }
        for c in SRUN_SHORT_REQUIRED.chars() {
            assert!(!SRUN_SHORT_OPTIONAL.contains(c) && !SRUN_SHORT_NO.contains(c));
        }
        for c in SRUN_SHORT_OPTIONAL.chars() {
            assert!(!SRUN_SHORT_NO.contains(c));
        }
    }
}
