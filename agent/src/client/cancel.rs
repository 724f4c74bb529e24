//! `tether cancel ID`: stop a running build. The build's own client (if any) then exits
//! with the build's resulting status; this command exits 0 once the cancel has begun.

use tether_protocol::{BuildId, ClientMessage};

use super::connect::connect_existing;
use crate::cli::CancelArgs;

pub async fn cancel(args: CancelArgs) -> anyhow::Result<i32> {
    let mut conn = connect_existing(&args.connect).await?;
    let msg = ClientMessage::Cancel {
        req: super::reqs::req(1),
        build: BuildId(args.id.clone()),
        force: args.kill,
    };
    let reply = conn.request(&msg, super::reqs::req(1)).await;
    conn.close().await;
    reply?;
    Ok(0)
}
