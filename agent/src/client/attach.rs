//! `tether attach ID` and `tether logs ID`: a build's output, live or so far.

use anyhow::Context;
use tether_protocol::BuildId;

use super::connect::connect_existing_args;
use super::follow::{follow, Goal};
use super::output::Output;
use crate::cli::{AttachArgs, LogsArgs};

/// Follows the build from where the arguments say until it ends; exits with its status.
pub async fn attach(args: AttachArgs) -> anyhow::Result<i32> {
    connect_existing_args(&args.connect)?;
    let from = if args.from_start { Some(0) } else { args.from };
    let mut out = Output::new(args.json).context("cannot set up output")?;
    let goal = Goal::Attach {
        build: BuildId(args.id.clone()),
        from,
    };
    finish(follow(goal, &args.connect, &mut out).await, out).await
}

/// Prints the build's output so far; exits with its status if it has finished, else 0.
pub async fn logs(args: LogsArgs) -> anyhow::Result<i32> {
    connect_existing_args(&args.connect)?;
    let mut out = Output::new(args.json).context("cannot set up output")?;
    let goal = Goal::Logs {
        build: BuildId(args.id.clone()),
    };
    finish(follow(goal, &args.connect, &mut out).await, out).await
}

async fn finish(result: anyhow::Result<i32>, out: Output) -> anyhow::Result<i32> {
    let close = out.close().await;
    let code = result?;
    if let Err(e) = close {
        tracing::debug!(error = %e, "writing output failed");
    }
    Ok(code)
}
