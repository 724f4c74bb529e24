//! `tether`: the daemon (`tether serve`) and its client commands in one static binary.

mod chunks;
mod cli;
mod client;
mod daemon;
mod ids;
mod install;
mod logging;
mod shared_dirs;
mod wire;

use clap::Parser;

use cli::{Cli, Command};
use logging::Role;

fn main() {
    tune_malloc();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => std::process::exit(usage_error(e)),
    };
    let code = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Run(args) => client_main(args.connect.verbose, client::run::run(*args)),
        Command::Attach(args) => client_main(args.connect.verbose, client::attach::attach(args)),
        Command::Logs(args) => client_main(args.connect.verbose, client::attach::logs(args)),
        Command::DialStdio(args) => client_main(0, client::dial::dial_stdio(args)),
        Command::Relay(args) => client_main(args.connect.verbose, client::relay::relay(args)),
        Command::Ps(args) => client_main(args.connect.verbose, client::ps::ps(args)),
        Command::Cancel(args) => client_main(args.connect.verbose, client::cancel::cancel(args)),
        Command::Shell(args) => client_main(args.connect.verbose, client::shell::shell(args)),
        Command::Release(args) => client_main(args.connect.verbose, client::release::release(args)),
        Command::Install(args) => match install::install(&args.dir, shared_dirs::Reach::PUBLIC) {
            Ok(path) => {
                println!("{}", path.display());
                0
            }
            Err(e) => {
                eprintln!("tether: {e:#}");
                client::exit::TETHER_FAILED
            }
        },
    };
    std::process::exit(code);
}

/// Output moves through 64 KiB buffers allocated on one thread and freed on another,
/// at hundreds of MiB/s. With glibc's defaults each free at the top of the heap gives
/// the pages back (trim threshold 128 KiB) and the next allocation faults them in again,
/// zeroed: a measured third of the streaming throughput. Keeping up to 4 MiB of free
/// heap, and serving buffers below 1 MiB from the heap rather than fresh mmaps, removes
/// that churn at a bounded cost in idle memory.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Client commands are quiet unless something fails; `-v`, `-vv` for more.
fn client_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    logging::init(level, Role::Client);
}

fn serve(args: cli::ServeArgs) -> i32 {
    logging::init(
        args.log.log_level.as_deref().unwrap_or("info"),
        Role::Daemon(args.log.log_format),
    );
    if let Some(dir) = &args.publish_client {
        // Keeping the container alive comes first: a failed copy is logged, not fatal.
        let reach = shared_dirs::Reach::admitted(nix::unistd::geteuid().as_raw(), &args.allow_uids, &args.allow_gids);
        match install::install(dir, reach) {
            Ok(path) => tracing::info!(path = %path.display(), "published the client"),
            Err(e) => tracing::error!("cannot publish the client: {e:#}"),
        }
    }
    let opts = daemon::ServeOptions {
        state_dir: args.state_dir,
        exit_on_eof: args.exit_on_eof,
        grace: args.grace,
        socket: args.socket,
        allow_uids: args.allow_uids,
        allow_gids: args.allow_gids,
        retain: args.retain,
        quota_build: args.quota_build,
        quota_total: args.quota_total,
        heartbeat: args.heartbeat,
        heartbeat_timeout: args.heartbeat_timeout,
        wait_for: args.wait_for,
        wait_timeout: args.wait_timeout,
        unpack: args.archive.limits(),
        max_builds: args.max_builds.map(|n| n as usize),
        max_sessions: args.max_sessions as usize,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tether: cannot start the runtime: {e}");
            return 1;
        }
    };
    let result = runtime.block_on(daemon::serve(opts));
    // Blocking-pool threads (spoolers, all done once builds are) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e:#}");
            1
        }
    }
}

/// `--help` and `--version` print and exit 0; any other command-line error is tether's
/// own failure: one line on stderr and exit 125, never a status a build could have.
fn usage_error(e: clap::Error) -> i32 {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return 0;
    }
    eprintln!("tether: {}", usage_line(&e.to_string()));
    client::exit::TETHER_FAILED
}

/// clap's error text as one line: what is wrong, what it suggests ("a similar argument
/// exists"), the missing arguments, and the usage, without the blank lines and the
/// "For more information" footer.
fn usage_line(text: &str) -> String {
    let mut line = String::new();
    let mut usage = None;
    for part in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if part.starts_with("For more information") {
            continue;
        }
        if let Some(u) = part.strip_prefix("Usage: ") {
            usage = Some(u);
            continue;
        }
        let part = part.strip_prefix("error: ").unwrap_or(part);
        let part = part.strip_prefix("tip: ").unwrap_or(part);
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part);
    }
    if line.is_empty() {
        line.push_str("invalid command line");
    }
    match usage {
        Some(u) => format!("{line} (usage: {u})"),
        None => format!("{line} (see tether --help)"),
    }
}

/// Runs a client command with logging at `verbose`; any error is tether's own failure
/// (exit 125) with a one-line reason on stderr.
fn client_main(verbose: u8, fut: impl std::future::Future<Output = anyhow::Result<i32>>) -> i32 {
    client_logging(verbose);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tether: cannot start the runtime: {e}");
            return client::exit::TETHER_FAILED;
        }
    };
    match runtime.block_on(fut) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tether: {e:#}");
            client::exit::TETHER_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::usage_line;

    #[test]
    fn usage_errors_keep_what_helps() {
        let missing = "error: the following required arguments were not provided:\n  <ID>\n\nUsage: tether attach <ID>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_line(missing),
            "the following required arguments were not provided: <ID> (usage: tether attach <ID>)"
        );
        let unknown = "error: unexpected argument '--jsno' found\n\n  tip: a similar argument exists: '--json'\n\nUsage: tether ps --json\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_line(unknown),
            "unexpected argument '--jsno' found; a similar argument exists: '--json' (usage: tether ps --json)"
        );
        assert_eq!(usage_line(""), "invalid command line (see tether --help)");
    }
}
