//! `tether ps`: the builds a daemon is running.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::bail;
use serde_json::json;
use tether_protocol::{ClientMessage, DaemonMessage};

use super::connect::connect_existing;
use crate::cli::PsArgs;

const REQ: u64 = 1;

pub async fn ps(args: PsArgs) -> anyhow::Result<i32> {
    let mut conn = connect_existing(&args.connect).await?;
    let reply = conn.request(&ClientMessage::List { req: REQ }, REQ).await;
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
            let line = json!({
                "build": b.build.0, "state": "running", "pid": b.pid, "command": b.command,
                "started_at_ms": b.started_at_ms, "duration_ms": now_ms.saturating_sub(b.started_at_ms),
            });
            println!("{line}");
        }
        return Ok(0);
    }
    println!("{:<28} {:<8} {:>8} {:>10}  COMMAND", "ID", "STATE", "PID", "DURATION");
    for b in &builds {
        let secs = now_ms.saturating_sub(b.started_at_ms) / 1000;
        let duration = format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
        println!(
            "{:<28} {:<8} {:>8} {:>10}  {}",
            b.build.0, "running", b.pid, duration, b.command
        );
    }
    Ok(0)
}
