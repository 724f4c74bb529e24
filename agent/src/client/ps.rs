//! `tether ps [--all]`: a daemon's builds, running ones or all it retains.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::bail;
use serde_json::{json, Value};
use tether_protocol::{BuildState, BuildSummary, ClientMessage, DaemonMessage, EndCause, ExitStatus};

use super::connect::connect_existing;
use super::exit;
use crate::cli::PsArgs;

pub async fn ps(args: PsArgs) -> anyhow::Result<i32> {
    let mut conn = connect_existing(&args.connect).await?;
    let reply = conn
        .request(
            &ClientMessage::List {
                req: super::reqs::req(1),
                all: args.all,
            },
            super::reqs::req(1),
        )
        .await;
    conn.close().await;
    let DaemonMessage::Builds { builds, .. } = reply? else {
        bail!("the daemon answered List with something else");
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if args.json {
        for b in &builds {
            println!("{}", as_json(b, now_ms));
        }
        return Ok(0);
    }
    println!(
        "{:<28} {:<10} {:>8} {:>9} {:>10} {:>5} {:>12}  COMMAND",
        "ID", "STATE", "PID", "STARTED", "DURATION", "EXIT", "OUTPUT"
    );
    for b in &builds {
        let (state, duration_ms, code) = match &b.state {
            BuildState::Running => ("running", now_ms.saturating_sub(b.started_at_ms), String::new()),
            BuildState::Preparing => ("preparing", now_ms.saturating_sub(b.started_at_ms), String::new()),
            BuildState::HeldBefore { .. } => ("held", now_ms.saturating_sub(b.started_at_ms), String::new()),
            BuildState::Held { status, cause, .. } => (
                "held",
                now_ms.saturating_sub(b.started_at_ms),
                exit_code(status, *cause).to_string(),
            ),
            BuildState::Finished {
                status,
                cause,
                duration_ms,
                ..
            } => (cause_name(*cause), *duration_ms, exit_code(status, *cause).to_string()),
        };
        let secs = duration_ms / 1000;
        let duration = format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
        let started = age(now_ms.saturating_sub(b.started_at_ms) / 1000);
        println!(
            "{:<28} {:<10} {:>8} {:>9} {:>10} {:>5} {:>12}  {}",
            b.build.0, state, b.pid, started, duration, code, b.output_end, b.command
        );
    }
    Ok(0)
}

/// How long ago, roughly: `42s ago`, `5m ago`, `3h ago`, `2d ago`.
fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

fn cause_name(cause: EndCause) -> &'static str {
    match cause {
        EndCause::Completed => "exited",
        EndCause::Cancelled => "cancelled",
        EndCause::TimedOut => "timed-out",
        EndCause::Released => "released",
        EndCause::Shutdown => "shutdown",
    }
}

fn as_json(b: &BuildSummary, now_ms: u64) -> Value {
    let mut v = json!({
        "build": b.build.0, "pid": b.pid, "command": b.command,
        "started_at_ms": b.started_at_ms, "output_bytes": b.output_end,
    });
    match &b.state {
        BuildState::Running => {
            v["state"] = json!("running");
            v["duration_ms"] = json!(now_ms.saturating_sub(b.started_at_ms));
        }
        BuildState::Preparing => {
            v["state"] = json!("preparing");
            v["duration_ms"] = json!(now_ms.saturating_sub(b.started_at_ms));
        }
        BuildState::HeldBefore { until_ms } => {
            v["state"] = json!("held");
            v["held_before_command"] = json!(true);
            v["duration_ms"] = json!(now_ms.saturating_sub(b.started_at_ms));
            v["held_until_ms"] = json!(until_ms);
        }
        BuildState::Held {
            status,
            cause,
            until_ms,
        } => {
            v["state"] = json!("held");
            v["duration_ms"] = json!(now_ms.saturating_sub(b.started_at_ms));
            v["exit_code"] = json!(exit_code(status, *cause));
            v["status"] = status_json(status);
            v["held_until_ms"] = json!(until_ms);
        }
        BuildState::Finished {
            status,
            cause,
            duration_ms,
            finished_at_ms,
            expires_at_ms,
        } => {
            v["state"] = json!(cause_name(*cause));
            v["duration_ms"] = json!(duration_ms);
            v["exit_code"] = json!(exit_code(status, *cause));
            v["status"] = status_json(status);
            v["finished_at_ms"] = json!(finished_at_ms);
            v["expires_at_ms"] = json!(expires_at_ms);
        }
    }
    v
}

fn status_json(status: &ExitStatus) -> Value {
    match status {
        ExitStatus::Code(c) => json!({"code": c}),
        ExitStatus::Signal { signal, core_dumped } => json!({"signal": signal, "core_dumped": core_dumped}),
    }
}

/// The exit code `tether run` gave (or would give) for this build.
fn exit_code(status: &ExitStatus, cause: EndCause) -> i32 {
    exit::for_end(status, cause)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_short() {
        assert_eq!(age(0), "0s ago");
        assert_eq!(age(59), "59s ago");
        assert_eq!(age(60), "1m ago");
        assert_eq!(age(7199), "1h ago");
        assert_eq!(age(86400 * 3), "3d ago");
    }

    #[test]
    fn timed_out_builds_report_124() {
        assert_eq!(exit_code(&ExitStatus::Code(0), EndCause::TimedOut), exit::TIMED_OUT);
        let term = ExitStatus::Signal {
            signal: 15,
            core_dumped: false,
        };
        assert_eq!(exit_code(&term, EndCause::Cancelled), 143);
    }
}
