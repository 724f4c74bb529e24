//! Command-line interface (clap). Parsing only: every command's behaviour lives in
//! `daemon` or `client`.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{OsStringValueParser, TypedValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tether",
    version,
    about = "Runs builds inside a container through a framed stdin protocol or a Unix socket"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: keep the container alive and serve builds over stdin/stdout.
    Serve(ServeArgs),
    /// Run a build through a daemon and stream its output; exits with its status.
    Run(Box<RunArgs>),
    /// Follow a build's output (from where you say) and exit with its status.
    Attach(AttachArgs),
    /// Print a build's output so far and exit (with its status if it has finished).
    Logs(LogsArgs),
    /// List a daemon's builds: running ones, or with --all the retained finished ones too.
    Ps(PsArgs),
    /// Cancel a running build: SIGTERM to its process group, SIGKILL after its grace.
    Cancel(CancelArgs),
    /// Open a shell (or run ARGV) in a terminal in the daemon's container, or inside a
    /// running or held build with --build; exits with the shell's status.
    Shell(ShellArgs),
    /// End a build's hold (run --hold-on-failure, --hold-before): a held build finishes
    /// with its own status or the one chosen here; one held before its command starts.
    Release(ReleaseArgs),
    /// Relay stdin/stdout to a daemon's Unix socket (for `--via`, e.g.
    /// `--via 'ssh host tether dial-stdio --socket /run/tether.sock'`).
    DialStdio(DialStdioArgs),
    /// Hold one stream to a daemon (`--via 'kubectl attach -i POD -c CTR'`) and serve any
    /// number of local clients through it on a Unix socket (`tether run --socket PATH`).
    Relay(RelayArgs),
    /// Copy this tether binary into DIR (atomically, mode 0755; DIR is created if
    /// missing), e.g. onto a shared volume from an init container.
    Install(InstallArgs),
}

#[derive(Debug, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The Unix socket local clients connect to (`tether run --socket PATH`); only this
    /// user may use it.
    #[arg(long, value_name = "PATH")]
    pub listen: PathBuf,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The directory to put `tether` in.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// One JSON object per build, one per line.
    #[arg(long)]
    pub json: bool,
    /// Finished builds whose records are retained, too.
    #[arg(long, short = 'a')]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The build's id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Start at this output position (bytes of stdout and stderr together, in order);
    /// default: the current end (new output only).
    #[arg(long, value_name = "OFFSET", conflicts_with = "from_start")]
    pub from: Option<u64>,
    /// Replay the whole output first.
    #[arg(long)]
    pub from_start: bool,
    /// Print one JSON event per line instead of raw output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The build's id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Print one JSON event per line instead of raw output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DialStdioArgs {
    /// The daemon's socket.
    #[arg(long, value_name = "PATH", env = "TETHER_SOCKET")]
    pub socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The build's id (from `tether ps` or `--json`'s started event).
    #[arg(value_name = "ID")]
    pub id: String,
    /// SIGKILL at once instead of SIGTERM and the grace period.
    #[arg(long)]
    pub kill: bool,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Run in this build's work dir with its environment: a running build, one held
    /// after a failure (run --hold-on-failure) or before its command (--hold-before).
    #[arg(long, value_name = "ID")]
    pub build: Option<String>,
    /// The shell to run instead of the one found (`sh` on PATH, `/bin/sh`, `/busybox/sh`).
    #[arg(long, value_name = "PATH", conflicts_with = "argv")]
    pub shell: Option<PathBuf>,
    /// Pipes instead of a terminal, even when stdin is a terminal (the default when
    /// it is not).
    #[arg(long, short = 'T')]
    pub no_tty: bool,
    /// The program to run instead of a shell.
    #[arg(last = true, value_name = "ARGV")]
    pub argv: Vec<OsString>,
}

#[derive(Debug, Args)]
#[group(id = "outcome", multiple = false)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The held build's id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Finish the build with exit code 0.
    #[arg(long, group = "outcome")]
    pub success: bool,
    /// Finish the build as failed: its own status when it failed, else exit code 1.
    #[arg(long, group = "outcome")]
    pub failure: bool,
    /// Finish the build with exit code N.
    #[arg(long, value_name = "N", group = "outcome", allow_negative_numbers = true)]
    pub exit_code: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter for tether's own messages on stderr (RUST_LOG syntax; RUST_LOG wins).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log line format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory for build directories (default: a `tether-UID` dir in the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Exit when stdin ends, after cancelling running builds. Without it the daemon
    /// keeps the container alive after EOF (a pod with `stdin: false`).
    #[arg(long)]
    pub exit_on_eof: bool,
    /// Default time between SIGTERM and SIGKILL when a build is cancelled or times out.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Also serve on this Unix socket (e.g. on the pod's shared workspace volume); its
    /// missing parent directories are created, reachable by the admitted peers only.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// At start-up, copy this binary into DIR as `tether` (as `tether install DIR`), so
    /// that other containers sharing DIR's volume can run the client; a missing DIR is
    /// created, reachable by the peers --allow-uid/--allow-gid admit.
    #[arg(long, value_name = "DIR")]
    pub publish_client: Option<PathBuf>,
    /// Admit socket clients with this uid besides the daemon's own, and let it reach the
    /// socket's and --publish-client's directories (repeatable).
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uids: Vec<u32>,
    /// Admit socket clients in this group, as their primary group or a supplementary
    /// one such as a pod's fsGroup, and give it the socket's and --publish-client's
    /// directories (repeatable; the portable choice in a pod).
    #[arg(long = "allow-gid", value_name = "GID")]
    pub allow_gids: Vec<u32>,
    /// How long a finished build's output and status are kept for `attach`, `logs`,
    /// `ps --all` and retried `run --id`.
    #[arg(long, value_name = "DUR", default_value = "1h", value_parser = parse_duration)]
    pub retain: Duration,
    /// Most output kept on disk per build; past it the oldest output is dropped (and
    /// reported to readers as a gap).
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    pub quota_build: u64,
    /// Most output kept on disk for all builds together; finished builds' output goes
    /// first, oldest first.
    #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = parse_size)]
    pub quota_total: u64,
    /// Heartbeat interval: the daemon pings each session this often, and tells clients
    /// to ping it as often.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// A session whose client sent nothing for this long is dropped (its builds go on).
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    pub heartbeat_timeout: Duration,
    /// Hold every build until this answers: an http(s) URL answering 2xx, or
    /// `tcp://host:port` accepting (repeatable; a sidecar such as a registry).
    #[arg(long = "wait-for", value_name = "URL")]
    pub wait_for: Vec<String>,
    /// How long a build waits for the readiness gates before it fails (exit 125).
    #[arg(long, value_name = "DUR", default_value = "5m", value_parser = parse_duration)]
    pub wait_timeout: Duration,
    /// Most builds at once (preparing, running or held); past it a run is refused with
    /// a "busy" error (exit 125). Default: no limit.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_builds: Option<u64>,
    /// Most socket connections served at once; past it a connection is refused with a
    /// "busy" error.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_sessions: u64,
    #[command(flatten)]
    pub archive: ArchiveArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Caps on an archive this side unpacks (uploads and fetched archives on the daemon,
/// downloads on the client): past them it is refused.
#[derive(Debug, Args, Clone, Copy)]
pub struct ArchiveArgs {
    /// Most bytes of file data one archive may hold (and one fetched body may have).
    #[arg(long, value_name = "SIZE", default_value = "8GiB", value_parser = parse_size)]
    pub max_archive_bytes: u64,
    /// Most entries (files, directories, links) one archive may hold.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub max_archive_entries: u64,
}

impl ArchiveArgs {
    pub fn limits(&self) -> tether_executor::transfer::UnpackLimits {
        tether_executor::transfer::UnpackLimits {
            max_bytes: self.max_archive_bytes,
            max_entries: self.max_archive_entries,
        }
    }
}

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Speak to a daemon through this command's stdin/stdout, run with `sh -c`
    /// (e.g. `kubectl attach -i POD -c CTR`, `ssh host tether serve`).
    #[arg(long, value_name = "CMD", conflicts_with = "socket")]
    pub via: Option<String>,
    /// Speak to a daemon on this Unix socket (`tether serve --socket`).
    #[arg(long, value_name = "PATH", env = "TETHER_SOCKET")]
    pub socket: Option<PathBuf>,
    /// More of tether's own messages on stderr (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// When the connection breaks or the daemon stops answering, reconnect and resume
    /// from the last byte printed (the default with --via and --socket).
    #[arg(long, overrides_with = "no_reconnect")]
    pub reconnect: bool,
    /// Fail (exit 125) when the connection breaks instead of reconnecting.
    #[arg(long)]
    pub no_reconnect: bool,
    /// How long to keep trying to reconnect before giving up (exit 125).
    #[arg(long, value_name = "DUR", default_value = "5m", value_parser = parse_duration)]
    pub reconnect_timeout: Duration,
    /// Treat a daemon that sent nothing (not even a heartbeat) for this long as gone.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    pub heartbeat_timeout: Duration,
    /// Through --via, take the daemon's stdin stream even while another client holds it
    /// (for a holder known to be dead; the holder stops and its builds go on).
    #[arg(long)]
    pub takeover: bool,
    /// Through --via, how long to wait for a daemon's stdin stream that another client
    /// holds (exit 125 after it).
    #[arg(long, value_name = "DUR", default_value = "5m", value_parser = parse_duration)]
    pub wait_channel: Duration,
}

impl ConnectArgs {
    /// Whether to reconnect: asked for, or by default when the daemon outlives the
    /// connection (`--via`, `--socket`). A daemon the client spawned dies with it.
    pub fn reconnects(&self) -> bool {
        !self.no_reconnect && (self.reconnect || self.via.is_some() || self.socket.is_some())
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Set a variable in the build's environment: `K=V`, or `NAME` alone to pass this
    /// client's value of NAME (left out when unset), as `docker run -e` does (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V|NAME", value_parser = env_parser())]
    pub env: Vec<EnvArg>,
    /// Read variables from FILE, in docker's env-file format: `K=V` or `NAME` lines,
    /// `#` comments and blank lines skipped, values taken as they are (repeatable).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Pass every variable of this client's environment whose name starts with PREFIX
    /// (e.g. `BUILD_`, `GIT_`; repeatable). `--env-file` and `--env` override them.
    #[arg(long = "env-prefix", value_name = "PREFIX", value_parser = env_prefix_parser())]
    pub env_prefix: Vec<OsString>,
    /// Run in this directory: relative, inside the build's private work dir (created if
    /// missing); or absolute, an existing shared directory such as the Jenkins workspace
    /// (never created or removed by tether; the build keeps its private TMPDIR).
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// Cancel the build after this long (exit status 124); 0 means no timeout.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL on cancel and timeout (default: the daemon's).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub grace: Option<Duration>,
    /// Forward this process's stdin to the build; close it at EOF.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Print one JSON event per line (started, output, exited) instead of raw output.
    #[arg(long)]
    pub json: bool,
    /// A name for the build (part of its id and directory name).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// The build's id. Starting is idempotent: when a build with this id runs or is
    /// retained, this follows it instead of starting it again (safe to retry).
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Start the build, print its id and return at once (needs --via or --socket).
    #[arg(long, short = 'd', conflicts_with_all = ["interactive", "json", "download"])]
    pub detach: bool,
    /// Send a local file or directory into the build's work dir before the command
    /// starts, as `cp -r SRC DEST/` would place it (`DIR/.` sends DIR's contents);
    /// DEST is relative to the work dir, default `.` (repeatable).
    #[arg(long, value_name = "SRC[:DEST]")]
    pub upload: Vec<String>,
    /// Leave out of uploads the paths matching this glob (`*.o`, `target/**`; repeatable).
    #[arg(long, value_name = "GLOB", requires = "upload")]
    pub exclude: Vec<String>,
    /// After the command ends (also when it failed or timed out), fetch PATH of the
    /// work dir into the local directory LOCAL (default: the current one), as
    /// `cp -r PATH LOCAL/` would (`.` fetches the whole work dir's contents; repeatable).
    #[arg(long, value_name = "PATH[:LOCAL]")]
    pub download: Vec<String>,
    /// Have the daemon download URL into the work dir before the command starts (a
    /// `.tar`, `.tar.gz` or `.tgz` is unpacked into DEST), checking its sha256 when
    /// given (repeatable; write a ':' in the URL's path as %3A).
    #[arg(long, value_name = "URL[#sha256=HEX][:DEST]")]
    pub fetch: Vec<String>,
    /// Start the command only once this answers: an http(s) URL answering 2xx, or
    /// `tcp://host:port` accepting (repeatable).
    #[arg(long = "wait-for", value_name = "URL")]
    pub wait_for: Vec<String>,
    /// How long to wait for the readiness gates (default: the daemon's, 5m).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub wait_timeout: Option<Duration>,
    /// A progress bar for uploads and downloads on stderr (default: when it is a terminal).
    #[arg(long, overrides_with = "no_progress")]
    pub progress: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// When the command fails (non-zero, a signal, a timeout), keep the build, its
    /// directory and this client waiting for DUR (default 30m) so a person can look
    /// inside (`tether shell --build ID`); `tether release ID` ends the hold.
    #[arg(long, value_name = "DUR", num_args = 0..=1, require_equals = true, default_missing_value = "30m", value_parser = parse_duration)]
    pub hold_on_failure: Option<Duration>,
    /// Hold the build before its command starts, for DUR at most (default 30m), for
    /// stepping in first (`tether shell --build ID`); `tether release ID` starts it.
    #[arg(long, value_name = "DUR", num_args = 0..=1, require_equals = true, default_missing_value = "30m", value_parser = parse_duration)]
    pub hold_before: Option<Duration>,
    /// Pass the variable NAME of this client's environment to the build as a secret:
    /// set in its environment, masked as `****` in its output (literal, shell-quoted
    /// and base64 forms), never shown by tether. At least 4 bytes (repeatable).
    #[arg(long = "secret-env", value_name = "NAME")]
    pub secret_env: Vec<String>,
    /// Pass the contents of the local file PATH to the build as the secret variable
    /// NAME (a trailing newline is dropped), as --secret-env does (repeatable).
    #[arg(long = "secret-file", value_name = "NAME=PATH")]
    pub secret_file: Vec<String>,
    /// Run the build (and shells opened in it) as this numeric user, and group (default:
    /// the user's primary group in the container's /etc/passwd, or GID = UID). Needs a
    /// daemon running as root; the build's private directory is given to that user.
    #[arg(long, value_name = "UID[:GID]", value_parser = parse_user)]
    pub user: Option<(u32, Option<u32>)>,
    /// Resource limits of the build's processes, as comma-separated KEY=VALUE pairs:
    /// nofile=N (open files), nproc=N (processes of the build's user; needs --user),
    /// cpu=SECONDS, fsize=SIZE (largest file written), as=SIZE (address space); SIZE
    /// takes units (512MiB), any value may be `unlimited` (repeatable).
    #[arg(long = "limit", value_name = "KEY=VALUE,...", value_parser = parse_limits)]
    pub limits: Vec<tether_protocol::ResourceLimits>,
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// Run this script with a shell (`sh` on PATH, `/bin/sh`, `/busybox/sh`).
    #[arg(
        long,
        value_name = "SCRIPT",
        conflicts_with = "argv",
        required_unless_present = "argv"
    )]
    pub sh: Option<OsString>,
    /// The shell for `--sh` instead of the one found.
    #[arg(long, value_name = "PATH", requires = "sh")]
    pub shell: Option<PathBuf>,
    /// The command to run, directly (no shell).
    #[arg(last = true, value_name = "ARGV")]
    pub argv: Vec<OsString>,
}

/// Parses `10s`, `1m30s`, `250ms`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("invalid duration {s:?}"));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Parses `1GiB`, `512MiB`, `64M`, `1000`: a byte count with an optional unit
/// (`K`/`M`/`G`/`T` are powers of 1000 and `KiB`/`MiB`/`GiB`/`TiB` of 1024, as bytesize has them).
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("invalid size {s:?}: {e}"))
}

/// `UID` or `UID:GID`, numeric.
pub fn parse_user(s: &str) -> Result<(u32, Option<u32>), String> {
    let number = |part: &str| {
        part.parse::<u32>()
            .map_err(|_| format!("expected a numeric UID[:GID], got {s:?} (names are not looked up)"))
    };
    match s.split_once(':') {
        Some((uid, gid)) => Ok((number(uid)?, Some(number(gid)?))),
        None => Ok((number(s)?, None)),
    }
}

/// `nofile=N,nproc=N,cpu=SECONDS,fsize=SIZE,as=SIZE` (any subset; `unlimited` allowed).
pub fn parse_limits(s: &str) -> Result<tether_protocol::ResourceLimits, String> {
    let mut limits = tether_protocol::ResourceLimits::default();
    for pair in s.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("expected KEY=VALUE, got {pair:?}"))?;
        let parse = |sized: bool| -> Result<u64, String> {
            match value {
                "unlimited" => Ok(u64::MAX),
                _ if sized => parse_size(value),
                _ => value
                    .parse()
                    .map_err(|_| format!("{key}: expected a number, got {value:?}")),
            }
        };
        let slot = match key {
            "nofile" => (&mut limits.nofile, parse(false)?),
            "nproc" => (&mut limits.nproc, parse(false)?),
            "cpu" => (&mut limits.cpu_s, parse(false)?),
            "fsize" => (&mut limits.fsize, parse(true)?),
            "as" => (&mut limits.address_space, parse(true)?),
            _ => return Err(format!("unknown limit {key:?} (nofile, nproc, cpu, fsize, as)")),
        };
        *slot.0 = Some(slot.1);
    }
    Ok(limits)
}

/// One `--env`: a variable to set, or one whose value this client passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvArg {
    /// `K=V`.
    Set(OsString, OsString),
    /// `NAME`: this client's value of NAME, if it has one.
    Pass(OsString),
}

/// `K=V` or `NAME`, as raw bytes: values need not be UTF-8.
fn parse_env(s: OsString) -> Result<EnvArg, String> {
    let bytes = s.as_bytes();
    match bytes.iter().position(|&b| b == b'=') {
        Some(0) => Err("expected K=V or NAME, got a value without a name".into()),
        Some(i) => Ok(EnvArg::Set(
            OsString::from_vec(bytes[..i].to_vec()),
            OsString::from_vec(bytes[i + 1..].to_vec()),
        )),
        None if bytes.is_empty() => Err("expected K=V or NAME, got nothing".into()),
        None => Ok(EnvArg::Pass(s)),
    }
}

fn env_parser() -> impl TypedValueParser<Value = EnvArg> {
    OsStringValueParser::new().try_map(parse_env)
}

fn env_prefix_parser() -> impl TypedValueParser<Value = OsString> {
    OsStringValueParser::new().try_map(|s: OsString| {
        if s.is_empty() || s.as_bytes().contains(&b'=') {
            Err(format!("{s:?} is not the start of a variable name"))
        } else {
            Ok(s)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_numeric() {
        assert_eq!(parse_user("1000"), Ok((1000, None)));
        assert_eq!(parse_user("1000:50"), Ok((1000, Some(50))));
        assert!(parse_user("jenkins").unwrap_err().contains("numeric"));
        assert!(parse_user("1000:").is_err());
        assert!(parse_user("-1").is_err());
    }

    #[test]
    fn limits_parse_every_key_with_units_and_unlimited() {
        let l = parse_limits("nofile=64,nproc=32,cpu=5,fsize=1MiB,as=unlimited").unwrap();
        assert_eq!(
            l,
            tether_protocol::ResourceLimits {
                nofile: Some(64),
                nproc: Some(32),
                cpu_s: Some(5),
                fsize: Some(1 << 20),
                address_space: Some(u64::MAX),
            }
        );
        assert!(parse_limits("files=3").unwrap_err().contains("unknown limit"));
        assert!(parse_limits("nofile").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_limits("nproc=many").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("2 KB"), Ok(2000));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn env_pairs_and_names() {
        assert_eq!(parse_env("A=b=c".into()), Ok(EnvArg::Set("A".into(), "b=c".into())));
        assert_eq!(parse_env("A=".into()), Ok(EnvArg::Set("A".into(), "".into())));
        let raw = OsString::from_vec(b"V=\xc3\x28".to_vec());
        assert_eq!(
            parse_env(raw),
            Ok(EnvArg::Set("V".into(), OsString::from_vec(b"\xc3\x28".to_vec())))
        );
        assert_eq!(parse_env("NAME".into()), Ok(EnvArg::Pass("NAME".into())));
        assert!(parse_env("=x".into()).is_err());
        assert!(parse_env("".into()).is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
