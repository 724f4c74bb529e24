//! `tether run`: start one build, stream its output, exit with its status.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

use anyhow::{bail, Context};
use tether_protocol::{self as wire, RunSpec};

use super::follow::{follow, Goal, Transfers};
use super::output::Output;
use super::transfer::{self, Download, Upload};
use crate::cli::RunArgs;

/// How long the daemon keeps a finished build's directory for the client's downloads.
const DOWNLOAD_HOLD: std::time::Duration = std::time::Duration::from_secs(30 * 60);

fn bytes(b: &[u8]) -> wire::Bytes {
    wire::Bytes::from(b.to_vec())
}

fn spec(args: &RunArgs, uploads: &[Upload], downloads: &[Download]) -> anyhow::Result<RunSpec> {
    let command = match &args.sh {
        Some(script) => wire::CommandSpec::Script {
            script: bytes(script.as_bytes()),
            shell: args.shell.as_ref().map(|s| bytes(s.as_os_str().as_bytes())),
        },
        None => wire::CommandSpec::Argv(args.argv.iter().map(|a: &OsString| bytes(a.as_bytes())).collect()),
    };
    let fetches = args
        .fetch
        .iter()
        .map(|f| {
            let r = tether_executor::fetch::parse_fetch_arg(f).map_err(|e| anyhow::anyhow!("--fetch {f:?}: {e}"))?;
            Ok(wire::FetchSpec {
                url: r.url,
                sha256: r.sha256,
                dest: bytes(r.dest.as_os_str().as_bytes()),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for g in &args.wait_for {
        tether_executor::gate::Gate::parse(g).map_err(|e| anyhow::anyhow!("--wait-for: {e}"))?;
    }
    Ok(RunSpec {
        command,
        env: super::env::collect(
            &args.env_prefix,
            &args.env_file,
            &args.env,
            &std::env::vars_os().collect::<Vec<_>>(),
        )?
        .iter()
        .map(|(k, v)| wire::EnvVar {
            name: bytes(k.as_bytes()),
            value: bytes(v.as_bytes()),
        })
        .collect(),
        workdir: args.workdir.as_ref().map(|w| bytes(w.as_os_str().as_bytes())),
        // As with timeout(1), a zero duration disables the timeout.
        timeout_ms: args.timeout.filter(|t| !t.is_zero()).map(|t| t.as_millis() as u64),
        grace_ms: args.grace.map(|t| t.as_millis() as u64),
        stdin: args.interactive,
        name: args.name.clone(),
        id: args.id.clone(),
        uploads: uploads
            .iter()
            .map(|u| wire::UploadSpec {
                dest: bytes(u.dest.as_bytes()),
            })
            .collect(),
        fetches,
        wait_for: args.wait_for.clone(),
        wait_timeout_ms: args.wait_timeout.map(|t| t.as_millis() as u64),
        hold_after_ms: (!downloads.is_empty()).then(|| DOWNLOAD_HOLD.as_millis() as u64),
        hold_on_failure_ms: args.hold_on_failure.map(|d| d.as_millis() as u64),
        hold_before_ms: args.hold_before.map(|d| d.as_millis() as u64),
        secrets: secrets(args)?,
        user: args.user.map(|(uid, gid)| wire::RunAs { uid, gid }),
        // Later --limit flags override earlier ones, key by key.
        limits: args
            .limits
            .iter()
            .fold(wire::ResourceLimits::default(), |acc, l| wire::ResourceLimits {
                nofile: l.nofile.or(acc.nofile),
                nproc: l.nproc.or(acc.nproc),
                cpu_s: l.cpu_s.or(acc.cpu_s),
                fsize: l.fsize.or(acc.fsize),
                address_space: l.address_space.or(acc.address_space),
            }),
    })
}

/// The run's `--secret-env` and `--secret-file` secrets. Errors name the secret, never
/// show its value.
fn secrets(args: &RunArgs) -> anyhow::Result<Vec<wire::SecretVar>> {
    let mut out = Vec::new();
    for name in &args.secret_env {
        let value = std::env::var_os(name)
            .ok_or_else(|| anyhow::anyhow!("--secret-env {name}: not set in this environment"))?;
        out.push((name.clone(), std::os::unix::ffi::OsStringExt::into_vec(value)));
    }
    for arg in &args.secret_file {
        let (name, path) = arg
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--secret-file {arg:?}: expected NAME=PATH"))?;
        let mut value = std::fs::read(path).with_context(|| format!("--secret-file {name}: cannot read {path}"))?;
        if value.last() == Some(&b'\n') {
            value.pop();
        }
        out.push((name.to_owned(), value));
    }
    out.into_iter()
        .map(|(name, value)| {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                bail!("secret name {name:?}: not a valid environment variable name");
            }
            if value.len() < tether_executor::mask::MIN_SECRET_LEN {
                bail!(
                    "secret {name}: {} bytes long; secrets must be at least {} bytes to be masked",
                    value.len(),
                    tether_executor::mask::MIN_SECRET_LEN
                );
            }
            Ok(wire::SecretVar {
                name: bytes(name.as_bytes()),
                value: bytes(&value),
            })
        })
        .collect()
}

/// A fresh id for a build whose client reconnects: a retried `Run` must name the same
/// build, so the client chooses the id when the user did not.
fn generated_id(name: Option<&str>) -> String {
    wire::build_id_from(name, &crate::ids::random_suffix())
}

/// Runs the build; returns the exit code. Errors are tether's own failures (125).
pub async fn run(args: RunArgs) -> anyhow::Result<i32> {
    if args.detach && args.connect.via.is_none() && args.connect.socket.is_none() {
        bail!("--detach needs a daemon that outlives this client: say --via CMD or --socket PATH");
    }
    let uploads = args
        .upload
        .iter()
        .map(|u| transfer::parse_upload(u))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    for u in &uploads {
        std::fs::symlink_metadata(&u.src).with_context(|| format!("--upload {}", u.src.display()))?;
    }
    let downloads = args
        .download
        .iter()
        .map(|d| transfer::parse_download(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    if args.workdir.as_ref().is_some_and(|w| w.is_absolute())
        && !(uploads.is_empty() && downloads.is_empty() && args.fetch.is_empty())
    {
        bail!(
            "--upload, --download and --fetch move files in and out of the build's private work dir, \
             and an absolute --workdir runs the build in a shared directory instead: \
             put the files there, or give a --workdir relative to the private work dir"
        );
    }
    let mut spec = spec(&args, &uploads, &downloads)?;
    if spec.id.is_none() && (args.connect.reconnects() || args.detach) && !args.interactive {
        spec.id = Some(generated_id(args.name.as_deref()));
    }
    let mut out = Output::new(args.json).context("cannot set up output")?;
    let progress = !args.no_progress && (args.progress || std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let goal = Goal::Run {
        spec,
        detach: args.detach,
        stdin: args.interactive,
        transfers: Transfers {
            uploads,
            excludes: args.exclude.clone(),
            downloads,
            limits: args.archive.limits(),
            progress,
        },
    };
    let result = follow(goal, &args.connect, &mut out).await;
    let close = out.close().await;
    let code = result?;
    if let Err(e) = close {
        // Our own stdout went away (e.g. `| head`): the build's status still stands.
        tracing::debug!(error = %e, "writing output failed");
    }
    Ok(code)
}
