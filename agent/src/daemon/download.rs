//! Downloads: a path of a running or held build's work dir, sent as a tar stream.
//!
//! A thread of the blocking pool packs the path (`tether_executor::transfer::pack_as`:
//! symlinks are sent as symlinks, never followed) straight into `DownloadData` frames of
//! the session's data queue, hashing as it goes, and ends with `DownloadEnd` (byte count
//! and SHA-256, which the client compares with what it received) or an error naming the
//! path. The queue is bounded, so a slow client slows the packing, never the daemon's
//! memory.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tether_executor::transfer::{names_contents, pack_as, relative_inside};
use tether_protocol::{self as wire, BuildId, DaemonMessage, ErrorKind, ErrorReport, RequestId};

use super::outbox::Outbox;
use crate::chunks::Chunker;

/// Sends `path` of the work dir `work` to `out` as download `req`, on a blocking thread.
pub fn start(req: RequestId, build: BuildId, work: PathBuf, path: wire::Bytes, out: Outbox) {
    tokio::task::spawn_blocking(move || {
        let shown = String::from_utf8_lossy(&path).into_owned();
        let result = send(req, &work, Path::new(std::ffi::OsStr::from_bytes(&path)), &out);
        let msg = match result {
            Ok((bytes, sha256)) => {
                tracing::info!(build = %build, path = %shown, bytes, "download sent");
                DaemonMessage::DownloadEnd { req, bytes, sha256 }
            }
            Err(e) => {
                tracing::info!(build = %build, path = %shown, error = %e, "download failed");
                DaemonMessage::Error(ErrorReport {
                    req: Some(req),
                    build: Some(build),
                    kind: ErrorKind::Transfer,
                    message: format!("download of {shown:?} failed: {e}"),
                })
            }
        };
        out.blocking_data(msg);
    });
}

/// The path's name in the archive: its last component (`cp -r PATH dest/`), or none
/// when `raw` names a directory's contents (`.`, empty, `DIR/.`).
pub fn archive_name<'a>(raw: &[u8], rel: &'a Path) -> Option<&'a Path> {
    if names_contents(raw) {
        None
    } else {
        rel.file_name().map(Path::new)
    }
}

fn send(req: RequestId, work: &Path, path: &Path, out: &Outbox) -> Result<(u64, wire::Digest), String> {
    let rel = relative_inside(path)?;
    let real_work = work
        .canonicalize()
        .map_err(|e| format!("the build's work dir is gone ({e})"))?;
    let src = match (rel.parent(), rel.file_name()) {
        // The parent must resolve inside the work dir; the last component is packed as
        // it is (a symlink stays a symlink).
        (Some(parent), Some(name)) => {
            let real_parent = work
                .join(parent)
                .canonicalize()
                .map_err(|e| format!("no such path in the build's work dir ({e})"))?;
            if !real_parent.starts_with(&real_work) {
                return Err("the path leads outside the build's work dir".into());
            }
            real_parent.join(name)
        }
        // `.` or empty: the work dir itself.
        _ => real_work,
    };
    std::fs::symlink_metadata(&src).map_err(|e| format!("no such path in the build's work dir ({e})"))?;
    let mut sink = Chunker::new(|data: Vec<u8>| {
        let msg = DaemonMessage::DownloadData {
            req,
            data: wire::Bytes::from(data),
        };
        if out.blocking_data(msg) {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::BrokenPipe, "the client's session ended"))
        }
    });
    let name = archive_name(path.as_os_str().as_bytes(), &rel);
    pack_as(&src, name, &[], &mut sink).map_err(|e| e.to_string())?;
    sink.finish().map_err(|e| e.to_string())
}
