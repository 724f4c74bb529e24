//! The client's side of uploads and downloads: tar streams cut into frames, hashed on
//! the way, unpacked with the same hostile-archive rules the daemon uses.
//!
//! Paths land as `cp -r SRC DEST/` would place them, in both directions: a file or a
//! directory arrives under its own name inside the destination directory, and `DIR/.`
//! (or `.`) moves DIR's contents instead. Packing and unpacking run on threads of their
//! own, connected to the session loop by small bounded channels, so a transfer is never
//! held in memory whole and never blocks the loop's heartbeats.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use sha2::{Digest as _, Sha256};
use tether_executor::transfer::{names_contents, pack_as, unpack, UnpackLimits, UnpackReport};
use tether_protocol::{self as wire, Digest};
use tokio::sync::{mpsc, oneshot};

use crate::chunks::Chunker;
use tether_executor::fetch::hex;

/// Pieces of a packed stream queued between the packing thread and the session loop.
const UPLOAD_QUEUE: usize = 8;
/// Pieces of a download queued between the session loop and the unpacking thread.
const DOWNLOAD_QUEUE: usize = 16;

/// One `--upload SRC[:DEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub src: PathBuf,
    /// The name SRC gets in the archive (its file name), or `None` for its contents.
    pub name: Option<PathBuf>,
    /// The directory inside the work dir it lands in.
    pub dest: String,
}

/// One `--download PATH[:LOCAL]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// Relative to the build's work dir.
    pub path: String,
    /// The local directory it lands in.
    pub local: PathBuf,
}

/// `SRC[:DEST]`, split at the last `:`.
pub fn parse_upload(arg: &str) -> Result<Upload, String> {
    let (src, dest) = arg.rsplit_once(':').unwrap_or((arg, "."));
    if src.is_empty() {
        return Err(format!("--upload {arg:?}: no source"));
    }
    let dest = if dest.is_empty() { "." } else { dest };
    if dest.starts_with('/') || dest.split('/').any(|c| c == "..") {
        return Err(format!(
            "--upload {arg:?}: DEST must be relative to the build's work dir, without '..'"
        ));
    }
    let src_path = PathBuf::from(src);
    let name = if names_contents(src.as_bytes()) {
        None
    } else {
        let name = src_path
            .file_name()
            .ok_or_else(|| format!("--upload {arg:?}: cannot tell the name of {src:?}"))?;
        Some(PathBuf::from(name))
    };
    Ok(Upload {
        src: src_path,
        name,
        dest: dest.to_owned(),
    })
}

/// `PATH[:LOCAL]`, split at the last `:`.
pub fn parse_download(arg: &str) -> Result<Download, String> {
    let (path, local) = match arg.rsplit_once(':') {
        Some((path, local)) if !path.is_empty() && !local.is_empty() => (path, local),
        _ => (arg, "."),
    };
    if path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(format!(
            "--download {arg:?}: PATH must be relative to the build's work dir, without '..'"
        ));
    }
    Ok(Download {
        path: path.to_owned(),
        local: PathBuf::from(local),
    })
}

/// A progress bar on stderr, or nothing.
#[derive(Clone)]
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    /// A bar when `show`; `total` bytes when known (then it has an ETA).
    pub fn new(show: bool, what: &str, total: Option<u64>) -> Progress {
        if !show {
            return Progress(None);
        }
        let bar = match total {
            Some(total) => {
                let bar = indicatif::ProgressBar::new(total);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar
            }
            None => {
                let bar = indicatif::ProgressBar::new_spinner();
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{msg} {spinner} {bytes} {binary_bytes_per_sec}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                bar
            }
        };
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar.set_message(what.to_owned());
        Progress(Some(bar))
    }

    pub fn add(&self, n: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(n);
        }
    }

    pub fn done(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// What the packing thread hands the session loop.
#[derive(Debug)]
pub enum UpItem {
    /// A piece of upload `index`.
    Data(u32, Vec<u8>),
    /// Upload `index` is complete.
    End { index: u32, bytes: u64, sha256: Digest },
    /// Packing failed; nothing more comes.
    Failed(String),
}

/// Packs the uploads one after the other on a thread; the receiver yields their pieces.
pub fn start_uploads(uploads: Vec<Upload>, excludes: Vec<String>) -> anyhow::Result<mpsc::Receiver<UpItem>> {
    let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
    std::thread::Builder::new()
        .name("upload".into())
        .spawn(move || {
            for (index, up) in uploads.iter().enumerate() {
                let index = index as u32;
                let mut sink = Chunker::new(|data| {
                    tx.blocking_send(UpItem::Data(index, data))
                        .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the session ended"))
                });
                let packed = pack_as(&up.src, up.name.as_deref(), &excludes, &mut sink)
                    .map_err(|e| e.to_string())
                    .and_then(|_| sink.finish().map_err(|e| e.to_string()));
                let item = match packed {
                    Ok((bytes, sha256)) => UpItem::End { index, bytes, sha256 },
                    // The session loop went away: nobody to tell.
                    Err(_) if tx.is_closed() => return,
                    Err(e) => UpItem::Failed(format!("upload of {} failed: {e}", up.src.display())),
                };
                let failed = matches!(item, UpItem::Failed(_));
                if tx.blocking_send(item).is_err() || failed {
                    return;
                }
            }
        })
        .context("cannot start the upload thread")?;
    Ok(rx)
}

/// The bytes the uploads will roughly take (file sizes plus a header per entry), for
/// the progress bar's ETA.
pub fn estimate(uploads: &[Upload]) -> u64 {
    fn walk(path: &Path) -> u64 {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return 0;
        };
        let own = 512 + meta.len().div_ceil(512) * 512 * u64::from(meta.is_file());
        if !meta.is_dir() {
            return own;
        }
        let children: u64 = std::fs::read_dir(path)
            .map(|rd| rd.filter_map(Result::ok).map(|e| walk(&e.path())).sum())
            .unwrap_or(0);
        own + children
    }
    uploads.iter().map(|u| walk(&u.src) + 1024).sum()
}

/// One download being received: hashed here, unpacked on a thread.
pub struct Receiving {
    pub path: String,
    tx: Option<mpsc::Sender<Vec<u8>>>,
    hasher: Sha256,
    bytes: u64,
    result: oneshot::Receiver<Result<UnpackReport, String>>,
    progress: Progress,
}

impl Receiving {
    /// Starts unpacking into `d.local` (created).
    pub fn start(d: &Download, limits: UnpackLimits, progress: Progress) -> anyhow::Result<Receiving> {
        std::fs::create_dir_all(&d.local).with_context(|| format!("cannot create {}", d.local.display()))?;
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(DOWNLOAD_QUEUE);
        let (done, result) = oneshot::channel();
        let local = d.local.clone();
        std::thread::Builder::new()
            .name("download".into())
            .spawn(move || {
                let reader = ChannelReader {
                    rx: &mut rx,
                    piece: Vec::new(),
                    at: 0,
                };
                let r = unpack(reader, &local, limits).map_err(|e| e.to_string());
                // Whatever follows the archive's end (padding) is read and dropped.
                while rx.blocking_recv().is_some() {}
                let _ = done.send(r);
            })
            .context("cannot start the download thread")?;
        Ok(Receiving {
            path: d.path.clone(),
            tx: Some(tx),
            hasher: Sha256::new(),
            bytes: 0,
            result,
            progress,
        })
    }

    /// Takes a piece (waiting while the unpacking thread is behind).
    pub async fn data(&mut self, data: Vec<u8>) {
        self.hasher.update(&data);
        self.bytes += data.len() as u64;
        self.progress.add(data.len() as u64);
        if let Some(tx) = &self.tx {
            // A closed channel means unpacking stopped with an error, reported at the end.
            let _ = tx.send(data).await;
        }
    }

    /// The stream is complete: checks the daemon's count and digest against what came,
    /// and waits for the unpacking to finish.
    pub async fn end(mut self, bytes: u64, sha256: Digest) -> anyhow::Result<UnpackReport> {
        drop(self.tx.take());
        self.progress.done();
        let unpacked = self.result.await;
        let got: Digest = self.hasher.finalize().into();
        if (bytes, sha256) != (self.bytes, got) {
            bail!(
                "download of {:?}: sha256 mismatch: the daemon sent {bytes} bytes with sha256 {}, {} bytes with sha256 {} arrived",
                self.path,
                hex(&sha256),
                self.bytes,
                hex(&got)
            );
        }
        match unpacked {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(e)) => bail!("download of {:?} refused: {e}", self.path),
            Err(_) => bail!("download of {:?}: the unpacking thread failed", self.path),
        }
    }
}

/// A channel of pieces as a `Read`.
struct ChannelReader<'a> {
    rx: &'a mut mpsc::Receiver<Vec<u8>>,
    piece: Vec<u8>,
    at: usize,
}

impl io::Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at >= self.piece.len() {
            match self.rx.blocking_recv() {
                Some(p) => {
                    self.piece = p;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The bytes of a path, for the wire.
pub fn path_bytes(p: &str) -> wire::Bytes {
    wire::Bytes::from(std::ffi::OsStr::new(p).as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_land_like_cp() {
        let u = parse_upload("src").unwrap();
        assert_eq!((u.name.as_deref(), u.dest.as_str()), (Some(Path::new("src")), "."));
        let u = parse_upload("a/b/out.bin:dist").unwrap();
        assert_eq!(
            (u.name.as_deref(), u.dest.as_str()),
            (Some(Path::new("out.bin")), "dist")
        );
        let u = parse_upload(".").unwrap();
        assert_eq!((u.name, u.dest.as_str()), (None, "."));
        let u = parse_upload("/ws/project/.:app").unwrap();
        assert_eq!((u.name, u.dest.as_str()), (None, "app"));
        assert!(parse_upload("x:/abs").is_err());
        assert!(parse_upload("x:../up").is_err());
        assert!(parse_upload(":d").is_err());
    }

    #[test]
    fn downloads_default_to_the_current_directory() {
        assert_eq!(
            parse_download("target/reports").unwrap(),
            Download {
                path: "target/reports".into(),
                local: ".".into()
            }
        );
        assert_eq!(parse_download("out:/tmp/x").unwrap().local, PathBuf::from("/tmp/x"));
        assert!(parse_download("/etc/passwd").is_err());
        assert!(parse_download("a/../../b").is_err());
    }
}
