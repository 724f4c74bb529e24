//! The Unix socket transport: `tether serve --socket PATH`.
//!
//! In a pod the socket lives on the shared workspace volume, so the `jnlp` container's
//! steps reach the build container without any Kubernetes exec. Every connection is its
//! own stream with its own sessions, served exactly like stdin.
//!
//! Access is decided by the peer's credentials, not by the socket file's mode (which is
//! 0666, so that an allowed uid in another container can connect at all): by default
//! only the daemon's own uid is admitted; `--allow-uid` adds uids (`SO_PEERCRED`), and
//! `--allow-gid` adds the members of a group, whether it is their primary group
//! (`SO_PEERCRED`) or a supplementary one (`SO_PEERGROUPS`): a pod's `fsGroup` is a
//! supplementary group of every container's processes, and the one thing that stays
//! the same when a platform (OpenShift) runs pods under arbitrary uids. A refused peer
//! gets a preamble and an `Error { kind: PermissionDenied }` naming its uid, and the
//! attempt is logged.
//!
//! The socket's missing parent directories are created ([`crate::shared_dirs`]), so a
//! daemon on a fresh, empty workspace volume starts.
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
    /// Whether a peer with these credentials may connect; `groups` (its supplementary
    /// groups) is asked for only when the uid and primary group did not decide.
    fn admits(&self, uid: u32, gid: u32, groups: impl FnOnce() -> Vec<u32>) -> bool {
        uid == self.own_uid
            || self.allow_uids.contains(&uid)
            || self.allow_gids.contains(&gid)
            || (!self.allow_gids.is_empty() && groups().iter().any(|g| self.allow_gids.contains(g)))
    }

    /// Where the socket's directory must be reachable from.
    pub fn reach(&self) -> crate::shared_dirs::Reach {
        crate::shared_dirs::Reach::admitted(self.own_uid, &self.allow_uids, &self.allow_gids)
    }
}

/// `SO_PEERGROUPS` (Linux 4.13): the peer's supplementary groups as they were at
/// `connect`. The libc crate does not export it for glibc targets; this is the
/// asm-generic value (x86, arm, riscv).
const SO_PEERGROUPS: libc::c_int = 59;

/// The supplementary groups of a socket's peer (empty when the kernel cannot say).
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    // NGROUPS_MAX on Linux.
    const MAX: usize = 65536;
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of gid_t the kernel may fill; it writes the
        // size it needs (or used) back into `len`.
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return groups;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() && n <= MAX {
            groups.resize(n, 0);
            continue;
        }
        tracing::debug!(error = %e, "cannot read a socket peer's supplementary groups");
        return Vec::new();
    }
}

/// Binds `path`, replacing a stale socket file, refusing to take over a live one; its
/// missing parent directories are created as `reach` says.
pub fn bind(path: &Path, reach: crate::shared_dirs::Reach) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        let made = crate::shared_dirs::ensure(parent, reach)
            .with_context(|| format!("cannot create the directory of the socket {}", path.display()))?;
        for dir in made {
            tracing::info!(dir = %dir.display(), mode = format!("{:04o}", reach.mode), group = ?reach.group, "created");
        }
    }
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
    if !access.admits(uid, gid, || peer_groups(&stream)) {
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
