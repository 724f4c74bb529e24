//! A container's standard streams as a CRI runtime (containerd, CRI-O) serves them to
//! `kubectl attach`, with their semantics:
//!
//! - everything the container writes to stdout and stderr is *broadcast* to every
//!   attached client, and appended to the container's log in the CRI format
//!   (`TIMESTAMP STREAM F|P LINE`, what `kubectl logs` reads; a line longer than 16 KiB
//!   is cut into partial `P` records);
//! - every attached client's stdin is copied into the container's one stdin pipe as it
//!   arrives, in pieces of at most 32 KiB (containerd's copy buffer), so concurrent
//!   clients' bytes interleave at that granularity;
//! - a client that goes away never closes the container's stdin (`stdinOnce: false`),
//!   and a client whose stdin stream ends is removed from the broadcast, as containerd's
//!   `ContainerIO.Attach` does.
//!
//! A client that does not read holds the container's output back (the broadcast waits
//! for every subscriber), as a blocked attach stream does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// containerd's stdin copy buffer: the largest piece of one client's input written to
/// the container's stdin at once.
pub const STDIN_PIECE: usize = 32 * 1024;

/// Longest log record before it is cut into partial ones (containerd's line limit).
const LOG_LINE_MAX: usize = 16 * 1024;

/// Output queued per attached client before the broadcast waits for it.
const SUBSCRIBER_QUEUE: usize = 64;

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One piece of the container's output, as the broadcast hands it out.
pub type Chunk = (Stream, Arc<Vec<u8>>);

/// The standard streams of one running container.
pub struct ContainerIo {
    stdin: tokio::sync::Mutex<Option<Box<dyn AsyncWrite + Send + Unpin>>>,
    subscribers: Mutex<Vec<mpsc::Sender<Chunk>>>,
    log: Mutex<CriLog>,
    /// Set once the container's output ended (it exited).
    ended: tokio::sync::watch::Sender<bool>,
}

impl ContainerIo {
    /// Serves a container whose stdin, stdout and stderr are these; its log goes to
    /// `log_path`. Spawns the readers on the current runtime.
    pub fn start(
        stdin: impl AsyncWrite + Send + Unpin + 'static,
        stdout: impl AsyncRead + Send + Unpin + 'static,
        stderr: impl AsyncRead + Send + Unpin + 'static,
        log_path: &Path,
    ) -> Arc<ContainerIo> {
        let io = Arc::new(ContainerIo {
            stdin: tokio::sync::Mutex::new(Some(Box::new(stdin))),
            subscribers: Mutex::new(Vec::new()),
            log: Mutex::new(CriLog::create(log_path)),
            ended: tokio::sync::watch::Sender::new(false),
        });
        let readers = [
            tokio::spawn(pump(Arc::clone(&io), Stream::Stdout, Box::new(stdout))),
            tokio::spawn(pump(Arc::clone(&io), Stream::Stderr, Box::new(stderr))),
        ];
        let done = Arc::clone(&io);
        tokio::spawn(async move {
            for r in readers {
                let _ = r.await;
            }
            done.log.lock().unwrap_or_else(|e| e.into_inner()).flush_partial();
            done.subscribers.lock().unwrap_or_else(|e| e.into_inner()).clear();
            done.ended.send_replace(true);
        });
        io
    }

    /// A new attached client's share of the output (only what comes from now on).
    pub fn subscribe(&self) -> mpsc::Receiver<Chunk> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        rx
    }

    /// Copies one client's input into the container's stdin, a piece at a time.
    pub async fn write_stdin(&self, data: &[u8]) -> std::io::Result<()> {
        for piece in data.chunks(STDIN_PIECE) {
            let mut stdin = self.stdin.lock().await;
            match stdin.as_mut() {
                Some(w) => {
                    w.write_all(piece).await?;
                    w.flush().await?;
                }
                None => return Err(std::io::ErrorKind::BrokenPipe.into()),
            }
        }
        Ok(())
    }

    /// Resolves once the container's output ended.
    pub async fn wait_ended(&self) {
        let mut rx = self.ended.subscribe();
        let _ = rx.wait_for(|ended| *ended).await;
    }

    /// Bytes in the container's log so far.
    pub fn log_bytes(&self) -> u64 {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }
}

/// Reads one output stream of the container: to the log, then to every subscriber.
async fn pump(io: Arc<ContainerIo>, stream: Stream, mut src: Box<dyn AsyncRead + Send + Unpin>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match src.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let data = Arc::new(buf[..n].to_vec());
        io.log.lock().unwrap_or_else(|e| e.into_inner()).append(stream, &data);
        let subscribers: Vec<mpsc::Sender<Chunk>> = io.subscribers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut gone = false;
        for s in &subscribers {
            if s.send((stream, Arc::clone(&data))).await.is_err() {
                gone = true;
            }
        }
        if gone {
            io.subscribers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|s| !s.is_closed());
        }
    }
}

/// A container log in the CRI format.
struct CriLog {
    file: Option<std::fs::File>,
    path: PathBuf,
    /// A line not ended yet, per stream.
    partial: [Vec<u8>; 2],
    bytes: u64,
}

impl CriLog {
    fn create(path: &Path) -> CriLog {
        CriLog {
            file: std::fs::File::create(path).ok(),
            path: path.to_path_buf(),
            partial: [Vec::new(), Vec::new()],
            bytes: 0,
        }
    }

    fn append(&mut self, stream: Stream, data: &[u8]) {
        let i = stream as usize;
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(&mut self.partial[i]);
            line.extend_from_slice(&rest[..nl]);
            self.record(stream, "F", &line);
            rest = &rest[nl + 1..];
        }
        self.partial[i].extend_from_slice(rest);
        while self.partial[i].len() >= LOG_LINE_MAX {
            let head: Vec<u8> = self.partial[i].drain(..LOG_LINE_MAX).collect();
            self.record(stream, "P", &head);
        }
    }

    fn flush_partial(&mut self) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let line = std::mem::take(&mut self.partial[stream as usize]);
            if !line.is_empty() {
                self.record(stream, "F", &line);
            }
        }
    }

    fn record(&mut self, stream: Stream, tag: &str, line: &[u8]) {
        use std::io::Write;
        let ts = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let mut rec = format!("{}.{:09}Z {} {tag} ", ts.as_secs(), ts.subsec_nanos(), stream.name()).into_bytes();
        rec.extend_from_slice(line);
        rec.push(b'\n');
        self.bytes += rec.len() as u64;
        if let Some(f) = &mut self.file {
            if f.write_all(&rec).is_err() {
                eprintln!("cannot write the container log {}", self.path.display());
                self.file = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_records_are_lines_and_long_ones_are_cut() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("log");
        let mut log = CriLog::create(&path);
        log.append(Stream::Stdout, b"one\ntw");
        log.append(Stream::Stderr, b"err\n");
        log.append(Stream::Stdout, b"o\n");
        log.append(Stream::Stdout, &vec![b'x'; LOG_LINE_MAX + 10]);
        log.flush_partial();
        let text = std::fs::read_to_string(&path).unwrap();
        let records: Vec<(&str, &str, usize)> = text
            .lines()
            .map(|l| {
                let mut f = l.splitn(4, ' ');
                let (_, s, t, rest) = (f.next(), f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
                (s, t, rest.len())
            })
            .collect();
        assert_eq!(
            records,
            vec![
                ("stdout", "F", 3),
                ("stderr", "F", 3),
                ("stdout", "F", 3),
                ("stdout", "P", LOG_LINE_MAX),
                ("stdout", "F", 10)
            ]
        );
        assert_eq!(log.bytes, text.len() as u64);
    }
}
