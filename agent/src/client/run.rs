//! `tether run`: start one build, stream its output, exit with its status.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

use anyhow::{bail, Context};
use tether_protocol::{self as wire, RunSpec};

use super::follow::{follow, Goal};
use super::output::Output;
use crate::cli::RunArgs;

fn bytes(b: &[u8]) -> wire::Bytes {
    wire::Bytes::from(b.to_vec())
}

fn spec(args: &RunArgs) -> RunSpec {
    let command = match &args.sh {
        Some(script) => wire::CommandSpec::Script {
            script: bytes(script.as_bytes()),
            shell: args.shell.as_ref().map(|s| bytes(s.as_os_str().as_bytes())),
        },
        None => wire::CommandSpec::Argv(args.argv.iter().map(|a: &OsString| bytes(a.as_bytes())).collect()),
    };
    RunSpec {
        command,
        env: args
            .env
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
    }
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
    let mut spec = spec(&args);
    if spec.id.is_none() && (args.connect.reconnects() || args.detach) && !args.interactive {
        spec.id = Some(generated_id(args.name.as_deref()));
    }
    let mut out = Output::new(args.json).context("cannot set up output")?;
    let goal = Goal::Run {
        spec,
        detach: args.detach,
        stdin: args.interactive,
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
