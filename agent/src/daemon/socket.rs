//! The Unix socket transport: `tether serve --socket PATH`.
//!
//! In a pod the socket lives on the shared workspace volume, so the `jnlp` container's
//! steps reach the build container without any Kubernetes exec. Every connection is its
//! own stream with its own sessions, served exactly like stdin.
//!
//! Access is decided by the peer's credentials (`SO_PEERCRED`), not by the socket file's
//! mode (which is 0666, so that an allowed uid in another container can connect at all):
//! by default only the daemon's own uid is admitted; `--allow-uid` and `--allow-gid` add
//! others (the Jenkins agent runs as uid 1000). A refused peer gets a preamble and an
//! `Error { kind: PermissionDenied }` naming its uid, and the attempt is logged.
//!
//! At most `--max-sessions` connections are served at once: one more gets a preamble and
//! an `Error { kind: Busy }` naming the limit and is closed, so a client that opens
//! connections in a loop cannot exhaust the daemon's descriptors or memory, and the
//! connections already served go on unaffected.
//!
//! A socket file left by a daemon that died is replaced; one a live daemon answers on is
//! never taken over.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tether_protocol::{DaemonMessage, ErrorKind, ErrorReport, PREAMBLE};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use super::connection::{Connection, Transport};
use super::Daemon;
use crate::wire::{push_frame, read_async, Sink};

/// Who may connect.
#[derive(Debug, Clone)]
pub struct Access {
    pub own_uid: u32,
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
}

impl Access {
    fn admits(&self, uid: u32, gid: u32) -> bool {
        uid == self.own_uid || self.allow_uids.contains(&uid) || self.allow_gids.contains(&gid)
    }
}

/// Binds `path`, replacing a stale socket file, refusing to take over a live one.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => bail!("a daemon is already listening on {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing the stale socket of a daemon that died");
                std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot check existing socket {}", path.display())),
        },
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

/// Accepts connections until `shutdown` turns true, then lets every connection write
/// what it has queued (bounded) and removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    daemon: Arc<Daemon>,
    access: Access,
    max_sessions: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let tasks = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(max_sessions));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a socket connection failed");
                    continue;
                }
            },
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(max_sessions, "socket connection refused: at --max-sessions");
            let message = format!(
                "this tether daemon already serves {max_sessions} socket connections (--max-sessions); try again later"
            );
            tasks.spawn(refuse(stream, ErrorKind::Busy, message));
            continue;
        };
        tasks.spawn(serve_one(
            stream,
            Arc::clone(&daemon),
            access.clone(),
            shutdown.clone(),
            slot,
        ));
    }
    drop(listener);
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::debug!(error = %e, "removing the socket file");
    }
    tasks.close();
    tasks.wait().await;
}

/// Serves one connection; `_slot` is its place under `--max-sessions`, freed on return.
async fn serve_one(
    stream: UnixStream,
    daemon: Arc<Daemon>,
    access: Access,
    mut shutdown: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let (uid, gid, pid) = match stream.peer_cred() {
        Ok(c) => (c.uid(), c.gid(), c.pid()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a socket peer's credentials; refused");
            return;
        }
    };
    if !access.admits(uid, gid) {
        tracing::warn!(
            uid,
            gid,
            ?pid,
            "socket connection refused: uid not allowed (see --allow-uid/--allow-gid)"
        );
        let message =
            format!("uid {uid} may not use this tether daemon (it admits its own uid and --allow-uid/--allow-gid)");
        refuse(stream, ErrorKind::PermissionDenied, message).await;
        return;
    }
    tracing::debug!(uid, gid, ?pid, "socket connection");
    let (read, write) = stream.into_split();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(read_async(read, tx));
    let mut conn = Connection::spawn(daemon, rx, Sink::Async(Box::new(write)), Transport::Socket);
    tokio::select! {
        _ = &mut conn.reader => {}
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
    conn.finish(Duration::from_secs(2)).await;
}

/// Sends a preamble and one error, then closes; a peer that does not read gets a
/// second at most, never a task that waits on it forever.
async fn refuse(mut stream: UnixStream, kind: ErrorKind, message: String) {
    let mut buf = PREAMBLE.to_vec();
    let report = ErrorReport {
        req: None,
        build: None,
        kind,
        message,
    };
    if push_frame(&mut buf, &DaemonMessage::Error(report)).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&buf)).await;
    }
    let _ = stream.shutdown().await;
}
