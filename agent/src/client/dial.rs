//! `tether dial-stdio --socket PATH`: relays this process's stdin and stdout to a
//! daemon's socket, so that anything that can run a command with pipes (`ssh host`,
//! `kubectl exec -i`) reaches a long-lived daemon: `tether run --via 'ssh host tether
//! dial-stdio --socket /ws/tether.sock'`. The bytes are relayed untouched; the daemon
//! sees an ordinary socket client (with this process's credentials).

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::cli::DialStdioArgs;

pub async fn dial_stdio(args: DialStdioArgs) -> anyhow::Result<i32> {
    let stream = UnixStream::connect(&args.socket)
        .await
        .with_context(|| format!("cannot connect to {}", args.socket.display()))?;
    let (mut read, mut write) = stream.into_split();
    let upstream = async {
        let mut stdin = tokio::io::stdin();
        let r = tokio::io::copy(&mut stdin, &mut write).await;
        // Our stdin ended: the daemon sees EOF, finishes the session and closes.
        let _ = write.shutdown().await;
        r
    };
    let downstream = async {
        let mut stdout = tokio::io::stdout();
        let r = tokio::io::copy(&mut read, &mut stdout).await;
        let _ = stdout.flush().await;
        r
    };
    tokio::pin!(upstream);
    tokio::pin!(downstream);
    // The relay ends when the daemon closes its side; a finished upstream alone keeps
    // relaying what the daemon still sends.
    let mut up_done = false;
    loop {
        tokio::select! {
            r = &mut upstream, if !up_done => {
                up_done = true;
                if let Err(e) = r {
                    tracing::debug!(error = %e, "relaying stdin");
                }
            }
            r = &mut downstream => {
                r.context("relaying the daemon's output")?;
                return Ok(0);
            }
        }
    }
}
