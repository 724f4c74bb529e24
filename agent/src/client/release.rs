//! `tether release ID [--success | --failure | --exit-code N]`: end a build's hold.
//!
//! A build held after its command (`run --hold-on-failure`, or for downloads) then
//! finishes with the status chosen here, or its own; its directory is removed and the
//! `tether run` waiting for it exits with that status. A build held before its command
//! (`run --hold-before`) starts; it cannot be given a status (cancel it instead).
//! `--failure` keeps a failed build's own status, so only a build that succeeded needs
//! one made up (exit code 1); that takes a look at the build's state first.

use anyhow::bail;
use tether_protocol::{BuildId, BuildState, ClientMessage, DaemonMessage, ExitStatus};

use super::connect::{connect_existing, Connection};
use crate::cli::ReleaseArgs;

pub async fn release(args: ReleaseArgs) -> anyhow::Result<i32> {
    let mut conn = connect_existing(&args.connect).await?;
    let result = send(&mut conn, &args).await;
    conn.close().await;
    result.map(|()| 0)
}

async fn send(conn: &mut Connection, args: &ReleaseArgs) -> anyhow::Result<()> {
    let build = BuildId(args.id.clone());
    let status = if args.success {
        Some(ExitStatus::Code(0))
    } else if let Some(code) = args.exit_code {
        Some(ExitStatus::Code(code))
    } else if args.failure {
        failure_status(conn, &build).await?
    } else {
        None
    };
    let msg = ClientMessage::Release {
        req: super::reqs::req(2),
        build,
        status,
    };
    conn.request(&msg, super::reqs::req(2)).await?;
    Ok(())
}

/// `None` (its own) for a build held with a failure, exit code 1 for one that succeeded.
async fn failure_status(conn: &mut Connection, build: &BuildId) -> anyhow::Result<Option<ExitStatus>> {
    let reply = conn
        .request(
            &ClientMessage::List {
                req: super::reqs::req(1),
                all: false,
            },
            super::reqs::req(1),
        )
        .await?;
    let DaemonMessage::Builds { builds, .. } = reply else {
        bail!("the daemon answered List with something else");
    };
    let held = builds.iter().find(|b| &b.build == build).map(|b| &b.state);
    Ok(match held {
        Some(BuildState::Held { status, .. }) if *status != ExitStatus::Code(0) => None,
        _ => Some(ExitStatus::Code(1)),
    })
}
