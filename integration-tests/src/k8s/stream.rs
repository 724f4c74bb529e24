//! `pods/attach` and `pods/exec` over WebSocket, as the API server and kubelet serve
//! them to kubectl 1.30+: subprotocol `v5.channel.k8s.io` (or `v4`), binary messages
//! whose first byte is the channel: 0 stdin, 1 stdout, 2 stderr, 3 error (a JSON
//! `Status` that ends the stream), 4 resize, and in v5 255 "close" (its payload names the
//! channel the client closed: 0 is its stdin).

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::cri::{Chunk, ContainerIo, Stream};

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const CLOSE: u8 = 255;

/// What the client asked for in the query string.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wants {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

type Ws = WebSocketStream<TcpStream>;

/// Upgrades an accepted connection whose request was read (`rest`: bytes read past it).
pub async fn upgrade(stream: TcpStream, rest: Vec<u8>) -> Ws {
    WebSocketStream::from_partially_read(stream, rest, Role::Server, None).await
}

fn data(channel: u8, bytes: &[u8]) -> Message {
    let mut v = Vec::with_capacity(bytes.len() + 1);
    v.push(channel);
    v.extend_from_slice(bytes);
    Message::Binary(v.into())
}

/// The close message the API server ends a stream with (kubectl treats any other as an
/// error reading the error channel).
fn normal() -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
    tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "".into(),
    }
}

fn success() -> Message {
    data(ERROR, br#"{"metadata":{},"status":"Success"}"#)
}

fn exit_status(code: i32) -> Message {
    if code == 0 {
        return success();
    }
    let status = serde_json::json!({
        "metadata": {},
        "status": "Failure",
        "message": format!("command terminated with non-zero exit code: exit status {code}"),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    });
    data(ERROR, status.to_string().as_bytes())
}

/// A client message: its channel and payload (`None` when the stream ended).
enum Incoming {
    Data(u8, Vec<u8>),
    Other,
    End,
}

async fn next(ws: &mut Ws) -> Incoming {
    match ws.next().await {
        Some(Ok(Message::Binary(b))) if !b.is_empty() => Incoming::Data(b[0], b[1..].to_vec()),
        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Incoming::End,
        // Pings are answered by tungstenite; flushed with our next write.
        Some(Ok(_)) => Incoming::Other,
    }
}

/// Attach: the client shares the container's streams with every other attached client.
pub async fn attach(mut ws: Ws, io: Arc<ContainerIo>, wants: Wants) {
    let mut output = (wants.stdout || wants.stderr).then(|| io.subscribe());
    loop {
        tokio::select! {
            msg = next(&mut ws) => match msg {
                Incoming::Data(STDIN, bytes) if wants.stdin => {
                    // The container may be gone: its input is dropped, as a dead pipe's.
                    let _ = io.write_stdin(&bytes).await;
                }
                Incoming::Data(CLOSE, bytes) if bytes.first() == Some(&STDIN) => {
                    // containerd: the end of a client's stdin ends its share of the output.
                    drop(output.take());
                    let _ = ws.send(success()).await;
                    let _ = ws.close(Some(normal())).await;
                    return;
                }
                Incoming::Data(..) | Incoming::Other => {
                    let _ = ws.flush().await;
                }
                Incoming::End => return,
            },
            chunk = recv(&mut output) => match chunk {
                Some((stream, bytes)) => {
                    let wanted = match stream {
                        Stream::Stdout => wants.stdout,
                        Stream::Stderr => wants.stderr,
                    };
                    if wanted {
                        let channel = if stream == Stream::Stdout { STDOUT } else { STDERR };
                        if ws.send(data(channel, &bytes)).await.is_err() {
                            return;
                        }
                    }
                }
                None => {
                    // The container's output ended: it exited.
                    let _ = ws.send(success()).await;
                    let _ = ws.close(Some(normal())).await;
                    return;
                }
            },
        }
    }
}

async fn recv(rx: &mut Option<mpsc::Receiver<Chunk>>) -> Option<Chunk> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Exec: `command` runs as its own process; its streams are this client's alone, and its
/// exit status ends the stream.
pub async fn exec(mut ws: Ws, mut command: tokio::process::Command, wants: Wants) {
    command
        .stdin(if wants.stdin {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = ws.send(data(STDERR, format!("cannot exec: {e}\n").as_bytes())).await;
            let _ = ws.send(exit_status(126)).await;
            let _ = ws.close(Some(normal())).await;
            return;
        }
    };
    let mut stdin = child.stdin.take();
    let (tx, mut out) = mpsc::channel::<(u8, Vec<u8>)>(64);
    let readers = [
        (
            STDOUT,
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ),
        (
            STDERR,
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ),
    ]
    .map(|(channel, src)| {
        let tx = tx.clone();
        tokio::spawn(async move {
            let Some(mut src) = src else { return };
            let mut buf = vec![0u8; 32 * 1024];
            while let Ok(n) = src.read(&mut buf).await {
                if n == 0 || tx.send((channel, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        })
    });
    drop(tx);
    let mut output_open = true;
    loop {
        tokio::select! {
            msg = next(&mut ws) => match msg {
                Incoming::Data(STDIN, bytes) => {
                    if let Some(w) = &mut stdin {
                        if w.write_all(&bytes).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Incoming::Data(CLOSE, bytes) if bytes.first() == Some(&STDIN) => stdin = None,
                Incoming::Data(..) | Incoming::Other => {
                    let _ = ws.flush().await;
                }
                // The client went away: its process goes too (kill on drop).
                Incoming::End => return,
            },
            item = out.recv(), if output_open => match item {
                Some((channel, bytes)) => {
                    let wanted = if channel == STDOUT { wants.stdout } else { wants.stderr };
                    if wanted && ws.send(data(channel, &bytes)).await.is_err() {
                        return;
                    }
                }
                None => output_open = false,
            },
            status = child.wait(), if !output_open => {
                for r in readers {
                    let _ = r.await;
                }
                let code = match status {
                    Ok(s) => s.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(0)),
                    Err(_) => 126,
                };
                let _ = ws.send(exit_status(code)).await;
                let _ = ws.close(Some(normal())).await;
                return;
            }
        }
    }
}
