//! Downloading a URL into a build's work dir before its command starts:
//! [`Fetcher::fetch`], and [`parse_fetch_arg`] for the CLI syntax
//! (`tether run --fetch URL[#sha256=HEX][:DEST]`).
//!
//! Why this exists: a build often needs an input that lives on an HTTP
//! server (a build context, a toolchain, a cache archive). Fetching it in the
//! daemon, next to the build, saves sending it through the client's stream;
//! doing it before the command starts gives one place for the checks that a
//! `curl | tar` in the build script would leave out (digest, size cap, hostile
//! archives, retries). The URL and the destination come from a client, so both
//! are treated as untrusted.
//!
//! What [`Fetcher::fetch`] guarantees:
//! - **Where things land.** DEST is relative and has no `..` component; every
//!   directory on the way is created (or reused) component by component, and
//!   each one is checked to resolve inside the work dir (the work dir may hold
//!   symlinks planted by an earlier upload: one pointing out of it is refused,
//!   never written through). Nothing is ever written outside the work dir,
//!   provided nothing else changes the work dir during the fetch (the build's
//!   command has not started yet; the checks resolve paths, then write).
//! - **Archives** (a URL whose path ends in `.tar`, `.tar.gz` or `.tgz`, query
//!   string ignored) are unpacked into DEST, a directory, by
//!   [`crate::transfer::unpack`], which treats the archive as hostile (see its
//!   module doc). The body is streamed: it flows chunk by chunk through a
//!   bounded channel into the unpacker on a blocking thread (gunzipped there
//!   for `.tar.gz`/`.tgz`); it is never buffered whole nor written to a
//!   temporary file first.
//! - **Plain files** land under DEST: when DEST is empty, `.`, ends with `/` or
//!   is an existing directory, the file is named after the URL path's last
//!   segment (percent-decoded; an empty, `.`, `..` or `/`-holding name is
//!   refused), otherwise DEST is the file's own path. The body is written to a
//!   temporary file in the target directory, which is renamed into place only
//!   when complete and verified, and removed on every error: a failed fetch
//!   leaves nothing at DEST.
//! - **Digest.** SHA-256 is computed over the bytes as received (before any
//!   gunzip) and reported; when the request names one, a mismatch is an error
//!   naming the URL and both digests. For a plain file nothing stays at DEST.
//!   For an archive the mismatch can only be known at the end, after its
//!   entries were unpacked: the error says so, and the caller is expected to
//!   throw the whole build dir away (the daemon does: a failed preparation
//!   fails the build and removes its directory).
//! - **Size.** A response whose `Content-Length` exceeds
//!   [`FetchLimits::max_bytes`] is refused before its body is read; otherwise
//!   bytes are counted and the download stops with an error past the cap.
//!   Archives are also held to [`FetchLimits::unpack`].
//! - **Retries.** Up to [`FetchLimits::attempts`] attempts, 200 ms apart and
//!   doubling, for connection errors, timeouts and HTTP 5xx and 429 only; never
//!   for any other status, a digest mismatch, a cap, a bad destination or an
//!   unpack error. A retry downloads from the start again (into a fresh
//!   temporary file). An archive is retried only while nothing of its body was
//!   handed to the unpacker yet.
//! - **Timeouts.** A connect timeout and a read timeout (no byte for that
//!   long), both on the shared client ([`http_client`]); no overall timeout, so
//!   a large download that keeps moving is never cut.
//!
//! Every [`FetchError`] names the URL (a password in it shown as `***`).
//! Redirects are followed (at most 10); the digest and caps apply to the final
//! response.
//!
//! Dropping a [`Fetcher::fetch`] future (a build cancelled while preparing)
//! stops the download at once; an unpacker or file writer still running on its
//! blocking thread fails at its next read, so it may finish writing the chunk
//! it holds after the future is gone.
//!
//! # The HTTP client
//!
//! One `reqwest::Client` ([`http_client`], or [`Fetcher::client`]) serves both
//! fetches and readiness gates ([`crate::gate`]). Build clients only through
//! [`http_client`]: reqwest is built without a crypto provider, and
//! [`http_client`] installs rustls's ring provider as the process default
//! (reqwest panics when it finds none). HTTPS goes through rustls, never
//! OpenSSL, and certificates are checked against the system's roots as
//! `rustls-native-certs` finds them (through `rustls-platform-verifier`): when
//! `SSL_CERT_FILE` (a PEM bundle) and/or `SSL_CERT_DIR` (`:`-separated
//! directories, every file in them read as PEM) are set, only those are read;
//! otherwise the usual locations (`/etc/ssl/certs/ca-certificates.crt` and
//! friends). In kaniko's image, whose roots are not at a usual place, point it
//! at its bundle: `SSL_CERT_FILE=/kaniko/ssl/certs/ca-certificates.crt` (the
//! image already sets `SSL_CERT_DIR=/kaniko/ssl/certs`, which works too). The
//! roots are read when the client is built. When no root at all can be found
//! the client is still built (a warning is logged), so that plain `http://`
//! URLs and gates work, and every `https://` URL fails certificate checks.
//!
//! Host names are resolved by hickory-dns (from `/etc/resolv.conf` and
//! `/etc/hosts`, `localhost` answered locally), never through glibc's NSS,
//! which a static binary cannot load in an image without libc files. Proxies
//! are taken from `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY` like
//! curl does (list `localhost` in `NO_PROXY` when a proxy is set and gates or
//! fetches target the pod itself).
//!
//! # The `--fetch` syntax
//!
//! `URL[#sha256=HEX][:DEST]`, see [`parse_fetch_arg`]. A `:` in the URL's path
//! or query must be written `%3A`, since the last `:` after the start of the
//! path separates DEST.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::{StatusCode, Url};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::transfer::{
    self, create_dirs_inside, resolve_inside, InsideError, UnpackError, UnpackLimits, UnpackReport, DEFAULT_MAX_BYTES,
};

/// Default [`FetchLimits::connect_timeout`]: 10 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`FetchLimits::read_timeout`]: 60 s without a byte.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`FetchLimits::attempts`].
pub const DEFAULT_ATTEMPTS: u32 = 3;

/// Wait before the second attempt; doubles for each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Body chunks in flight between the download and the blocking writer.
const CHANNEL_CHUNKS: usize = 16;
/// Writes of a plain download are batched to this size.
const WRITE_BUFFER: usize = 256 * 1024;
/// Prefix of the temporary files plain downloads are written to.
const TEMP_PREFIX: &str = ".tether-fetch.";

/// One URL to download into a build's work dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    /// An `http://` or `https://` URL.
    pub url: String,
    /// The SHA-256 the downloaded bytes must have, when given.
    pub sha256: Option<[u8; 32]>,
    /// Where it lands, relative to the work dir (`""` or `"."`: the work dir).
    /// See the module doc for when it names a directory or a file.
    pub dest: PathBuf,
}

/// Caps and timeouts of a [`Fetcher`].
#[derive(Debug, Clone, Copy)]
pub struct FetchLimits {
    /// Most bytes one response body may have (as received, before gunzip).
    pub max_bytes: u64,
    /// How long connecting (TCP and TLS) may take.
    pub connect_timeout: Duration,
    /// How long the server may send nothing while a response is awaited or read.
    pub read_timeout: Duration,
    /// Attempts per URL for errors worth retrying (at least one is made).
    pub attempts: u32,
    /// Caps on what one archive may unpack.
    pub unpack: UnpackLimits,
}

impl Default for FetchLimits {
    /// 8 GiB ([`DEFAULT_MAX_BYTES`], as uploads), 10 s to connect, 60 s without
    /// a byte, 3 attempts, the default [`UnpackLimits`].
    fn default() -> Self {
        FetchLimits {
            max_bytes: DEFAULT_MAX_BYTES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
            unpack: UnpackLimits::default(),
        }
    }
}

/// What [`Fetcher::fetch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    /// The URL as requested.
    pub url: String,
    /// Bytes received (before gunzip).
    pub bytes: u64,
    /// SHA-256 of the bytes received.
    pub sha256: [u8; 32],
    /// For an archive, what was unpacked.
    pub unpacked: Option<UnpackReport>,
    /// Where it landed: the file, or the directory an archive was unpacked into
    /// (symlinks resolved).
    pub path: PathBuf,
    /// Attempts made, the successful one included.
    pub attempts: u32,
}

/// Why [`Fetcher::fetch`] failed. Every message names the URL.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not an absolute `http://` or `https://` URL with a host.
    #[error("{url}: bad URL: {reason}")]
    BadUrl { url: String, reason: String },
    /// DEST is absolute, has a `..` component, leads outside the work dir
    /// through a symlink or through something that is not a directory, or the
    /// file name taken from the URL is unusable.
    #[error("{url}: bad destination {:?}: {reason}", dest.as_os_str())]
    BadDest { url: String, dest: PathBuf, reason: String },
    /// Connecting, sending or reading failed (including timeouts). `attempts`:
    /// how many were made.
    #[error("GET {url}: {}{}", request_error_text(source), attempts_text(*attempts))]
    Request {
        url: String,
        source: reqwest::Error,
        attempts: u32,
    },
    /// The server answered with a status other than 2xx. `attempts`: how
    /// many were made.
    #[error("GET {url}: HTTP {status}{}", attempts_text(*attempts))]
    Status {
        url: String,
        status: StatusCode,
        attempts: u32,
    },
    /// The body is larger than [`FetchLimits::max_bytes`] (said so by
    /// `Content-Length`, or counted).
    #[error("{url}: body larger than the {} cap", size_text(*limit))]
    TooLarge { url: String, limit: u64 },
    /// The bytes received do not have the requested SHA-256. `unpacked`: the
    /// URL is an archive whose entries were unpacked already.
    #[error(
        "{url}: sha256 mismatch: expected {}, got {}{}",
        hex(expected),
        hex(actual),
        if *unpacked { " (the archive was unpacked already: discard the destination)" } else { "" }
    )]
    DigestMismatch {
        url: String,
        expected: [u8; 32],
        actual: [u8; 32],
        unpacked: bool,
    },
    /// The archive was refused or could not be unpacked (entries before the
    /// failing one stay in DEST).
    #[error("{url}: {source}")]
    Unpack { url: String, source: UnpackError },
    /// Creating a directory or writing the file failed.
    #[error("{url}: cannot write {}: {source}", path.display())]
    Io {
        url: String,
        path: PathBuf,
        source: io::Error,
    },
}

impl FetchError {
    /// The URL the error names (a password in it shown as `***`).
    pub fn url(&self) -> &str {
        match self {
            FetchError::BadUrl { url, .. }
            | FetchError::BadDest { url, .. }
            | FetchError::Request { url, .. }
            | FetchError::Status { url, .. }
            | FetchError::TooLarge { url, .. }
            | FetchError::DigestMismatch { url, .. }
            | FetchError::Unpack { url, .. }
            | FetchError::Io { url, .. } => url,
        }
    }

    fn url_mut(&mut self) -> &mut String {
        match self {
            FetchError::BadUrl { url, .. }
            | FetchError::BadDest { url, .. }
            | FetchError::Request { url, .. }
            | FetchError::Status { url, .. }
            | FetchError::TooLarge { url, .. }
            | FetchError::DigestMismatch { url, .. }
            | FetchError::Unpack { url, .. }
            | FetchError::Io { url, .. } => url,
        }
    }

    fn set_attempts(&mut self, n: u32) {
        if let FetchError::Request { attempts, .. } | FetchError::Status { attempts, .. } = self {
            *attempts = n;
        }
    }
}

/// The shared HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the HTTP client: {}", error_chain(.0))]
pub struct ClientError(#[source] pub reqwest::Error);

/// Builds the HTTP client shared by fetches and readiness gates: rustls (ring,
/// installed here as the process's default provider when none is) with the
/// system's roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` honoured), hickory-dns,
/// proxies from the environment, redirects followed (at most 10), no
/// compression (bodies arrive as the server sends them), the given connect
/// and read timeouts. Build it once: it holds the connection pool and the
/// roots, read when it is built. See the module doc.
pub fn http_client(connect_timeout: Duration, read_timeout: Duration) -> Result<reqwest::Client, ClientError> {
    // reqwest is built without a crypto provider: install ring's as the
    // process default once (an error means one is installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = || {
        reqwest::Client::builder()
            .user_agent(concat!("tether/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .hickory_dns(true)
    };
    match builder().build() {
        Ok(client) => Ok(client),
        Err(e) => {
            // The only failure the settings above allow is the verifier finding
            // no root certificate at all. Keep plain HTTP working.
            let Ok(client) = builder().tls_certs_only(Vec::new()).build() else {
                return Err(ClientError(e));
            };
            tracing::warn!(
                error = %error_chain(&e),
                "no CA certificates found (set SSL_CERT_FILE or SSL_CERT_DIR): https URLs will fail"
            );
            Ok(client)
        }
    }
}

/// Downloads URLs into build dirs. Built once per daemon; cloning is cheap
/// (the client is shared).
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    limits: FetchLimits,
}

impl Fetcher {
    /// A fetcher with its own client ([`http_client`] with the limits'
    /// timeouts).
    pub fn new(limits: FetchLimits) -> Result<Fetcher, ClientError> {
        let client = http_client(limits.connect_timeout, limits.read_timeout)?;
        Ok(Fetcher { client, limits })
    }

    /// A fetcher using `client`, whose own timeouts then apply
    /// ([`FetchLimits::connect_timeout`] and [`FetchLimits::read_timeout`] are
    /// not used).
    pub fn with_client(client: reqwest::Client, limits: FetchLimits) -> Fetcher {
        Fetcher { client, limits }
    }

    /// The HTTP client, to share with [`crate::gate`].
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn limits(&self) -> &FetchLimits {
        &self.limits
    }

    /// Downloads `req.url` into `work_dir` (see the module doc for where it
    /// lands and what is checked).
    pub async fn fetch(&self, req: &FetchRequest, work_dir: &Path) -> Result<FetchReport, FetchError> {
        self.fetch_once_or_more(req, work_dir).await.map_err(|mut e| {
            let url = e.url_mut();
            *url = redacted(url);
            e
        })
    }

    async fn fetch_once_or_more(&self, req: &FetchRequest, work_dir: &Path) -> Result<FetchReport, FetchError> {
        let url_text = req.url.as_str();
        let url = check_url(url_text).map_err(|reason| FetchError::BadUrl {
            url: url_text.to_owned(),
            reason,
        })?;
        let bad_dest = |reason: String| FetchError::BadDest {
            url: url_text.to_owned(),
            dest: req.dest.clone(),
            reason,
        };
        let dest = DestSpec::parse(&req.dest).map_err(bad_dest)?;
        let root = fs::canonicalize(work_dir).map_err(|e| FetchError::Io {
            url: url_text.to_owned(),
            path: work_dir.to_owned(),
            source: e,
        })?;
        let name = url_file_name(&url);
        let archive = name.as_ref().ok().and_then(|n| archive_kind(n));
        let target = match archive {
            Some(kind) => create_dirs_inside(&root, &dest.components)
                .map(|dir| Target::Archive { dir, kind })
                .map_err(DestError::from),
            None => plain_target(&root, &dest, &name),
        }
        .map_err(|e| e.into_fetch(url_text, req))?;

        let attempts = self.limits.attempts.max(1);
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let result = match &target {
                Target::Archive { dir, kind } => self.try_archive(req, &url, dir, *kind).await,
                Target::File { dir, name } => self.try_file(req, &url, dir, name).await,
            };
            match result {
                Ok(mut report) => {
                    report.attempts = attempt;
                    return Ok(report);
                }
                Err(failed) if failed.retry && attempt < attempts => {
                    tracing::warn!(url = %redacted(&req.url), attempt, error = %failed.error, "fetch failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                    attempt += 1;
                }
                Err(mut failed) => {
                    failed.error.set_attempts(attempt);
                    return Err(failed.error);
                }
            }
        }
    }

    /// One attempt at a plain file: into a temporary file in `dir`, renamed to
    /// `dir/name` once complete and verified.
    async fn try_file(&self, req: &FetchRequest, url: &Url, dir: &Path, name: &OsStr) -> Result<FetchReport, Failed> {
        let io_error = |path: &Path, e: io::Error| FetchError::Io {
            url: req.url.clone(),
            path: path.to_owned(),
            source: e,
        };
        let response = self.get(req, url).await?;
        let temp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
            .map_err(|e| Failed::fatal(io_error(dir, e)))?;
        let file = temp
            .as_file()
            .try_clone()
            .map_err(|e| Failed::fatal(io_error(temp.path(), e)))?;
        let streamed = self
            .pump(req, response, move |mut body| {
                let mut out = io::BufWriter::with_capacity(WRITE_BUFFER, file);
                io::copy(&mut body, &mut out)?;
                out.flush()
            })
            .await
            .map_err(|e| e.into_failed(|e| io_error(temp.path(), e), true))?;
        check_digest(req, &streamed, false)?;
        let path = dir.join(name);
        let done = temp
            .as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .and_then(|()| temp.persist(&path).map(drop).map_err(|e| e.error));
        done.map_err(|e| Failed::fatal(io_error(&path, e)))?;
        Ok(FetchReport {
            url: req.url.clone(),
            bytes: streamed.bytes,
            sha256: streamed.sha256,
            unpacked: None,
            path,
            attempts: 0,
        })
    }

    /// One attempt at an archive, unpacked into `dir` as it arrives.
    async fn try_archive(
        &self,
        req: &FetchRequest,
        url: &Url,
        dir: &Path,
        kind: Archive,
    ) -> Result<FetchReport, Failed> {
        let response = self.get(req, url).await?;
        let (target, limits) = (dir.to_owned(), self.limits.unpack);
        let streamed = self
            .pump(req, response, move |body| match kind {
                Archive::Tar => transfer::unpack(body, &target, limits),
                Archive::TarGz => transfer::unpack(flate2::read::GzDecoder::new(body), &target, limits),
            })
            .await
            .map_err(|e| {
                let url = req.url.clone();
                e.into_failed(|source| FetchError::Unpack { url, source }, false)
            })?;
        check_digest(req, &streamed, true)?;
        Ok(FetchReport {
            url: req.url.clone(),
            bytes: streamed.bytes,
            sha256: streamed.sha256,
            unpacked: Some(streamed.output),
            path: dir.to_owned(),
            attempts: 0,
        })
    }

    /// Sends the request and checks the status and the announced length.
    async fn get(&self, req: &FetchRequest, url: &Url) -> Result<reqwest::Response, Failed> {
        let response = self.client.get(url.clone()).send().await.map_err(|e| Failed {
            retry: !e.is_builder() && !e.is_redirect(),
            error: FetchError::Request {
                url: req.url.clone(),
                source: e.without_url(),
                attempts: 1,
            },
        })?;
        let status = response.status();
        if !status.is_success() {
            return Err(Failed {
                retry: status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS,
                error: FetchError::Status {
                    url: req.url.clone(),
                    status,
                    attempts: 1,
                },
            });
        }
        if response.content_length().is_some_and(|n| n > self.limits.max_bytes) {
            return Err(Failed::fatal(FetchError::TooLarge {
                url: req.url.clone(),
                limit: self.limits.max_bytes,
            }));
        }
        Ok(response)
    }

    /// Streams the body of `response` into `consume`, which runs on a
    /// blocking thread and reads it through a bounded channel, while counting
    /// and hashing every byte. When `consume` returns early (a tar stream ends
    /// before the body does) the rest of the body is still read, for the count
    /// and the digest. Always waits for `consume` to end before returning.
    async fn pump<T, E>(
        &self,
        req: &FetchRequest,
        mut response: reqwest::Response,
        consume: impl FnOnce(ChannelReader) -> Result<T, E> + Send + 'static,
    ) -> Result<Streamed<T>, PumpError<E>>
    where
        T: Send + 'static,
        E: Send + 'static,
    {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let aborted = Arc::new(AtomicBool::new(false));
        let reader = ChannelReader {
            rx,
            chunk: Bytes::new(),
            aborted: Arc::clone(&aborted),
        };
        let mut consumer = Some(tokio::task::spawn_blocking(move || consume(reader)));
        let mut tx = Some(tx);
        // Declared after `tx`, so dropped before it when the future is dropped.
        let _abort_on_drop = AbortOnDrop(aborted);
        let mut early: Option<T> = None;
        let mut hasher = Sha256::new();
        let mut bytes: u64 = 0;
        let mut handed_over = false;
        let failure = loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break None,
                Err(e) => {
                    break Some(PumpError::Body {
                        error: FetchError::Request {
                            url: req.url.clone(),
                            source: e.without_url(),
                            attempts: 1,
                        },
                        handed_over,
                    })
                }
            };
            bytes += chunk.len() as u64;
            if bytes > self.limits.max_bytes {
                break Some(PumpError::Fatal(FetchError::TooLarge {
                    url: req.url.clone(),
                    limit: self.limits.max_bytes,
                }));
            }
            hasher.update(&chunk);
            let Some(sender) = &tx else { continue };
            if sender.send(Ok(chunk)).await.is_ok() {
                handed_over = true;
                continue;
            }
            // The consumer stopped reading: it ended, successfully or not.
            tx = None;
            if let Some(handle) = consumer.take() {
                match join(handle).await {
                    Ok(output) => early = Some(output),
                    Err(e) => return Err(PumpError::Consume(e)),
                }
            }
        };
        if let Some(failure) = failure {
            if let Some(sender) = tx.take() {
                // Make the consumer fail instead of seeing a clean end.
                let _ = sender.send(Err(io::Error::other("the download failed"))).await;
            }
            if let Some(handle) = consumer {
                let _ = join(handle).await;
            }
            return Err(failure);
        }
        drop(tx);
        let output = match (early, consumer) {
            (Some(output), _) => output,
            (None, Some(handle)) => join(handle).await.map_err(PumpError::Consume)?,
            (None, None) => unreachable!("the consumer's result is kept when it ends early"),
        };
        Ok(Streamed {
            bytes,
            sha256: hasher.finalize().into(),
            output,
        })
    }
}

/// Waits for a blocking task; a panic in it is resumed here.
async fn join<T>(handle: tokio::task::JoinHandle<T>) -> T {
    match handle.await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Only a runtime shutting down cancels a blocking task that started.
        Err(e) => panic!("blocking fetch task cancelled: {e}"),
    }
}

/// A failed attempt, and whether another may be made.
struct Failed {
    error: FetchError,
    retry: bool,
}

impl Failed {
    fn fatal(error: FetchError) -> Failed {
        Failed { error, retry: false }
    }
}

impl From<FetchError> for Failed {
    fn from(error: FetchError) -> Failed {
        Failed::fatal(error)
    }
}

/// A body streamed into a consumer.
struct Streamed<T> {
    bytes: u64,
    sha256: [u8; 32],
    output: T,
}

enum PumpError<E> {
    /// Reading the body failed; `handed_over`: some of it reached the consumer.
    Body { error: FetchError, handed_over: bool },
    /// The body is over the cap.
    Fatal(FetchError),
    /// The consumer failed.
    Consume(E),
}

impl<E> PumpError<E> {
    /// `restartable`: the consumer's work is thrown away on a retry, so a
    /// body error is worth retrying even after some of it was handed over.
    fn into_failed(self, consume_error: impl FnOnce(E) -> FetchError, restartable: bool) -> Failed {
        match self {
            PumpError::Body { error, handed_over } => Failed {
                error,
                retry: restartable || !handed_over,
            },
            PumpError::Fatal(error) => Failed::fatal(error),
            PumpError::Consume(e) => Failed::fatal(consume_error(e)),
        }
    }
}

fn check_digest<T>(req: &FetchRequest, streamed: &Streamed<T>, unpacked: bool) -> Result<(), FetchError> {
    match req.sha256 {
        Some(expected) if expected != streamed.sha256 => Err(FetchError::DigestMismatch {
            url: req.url.clone(),
            expected,
            actual: streamed.sha256,
            unpacked,
        }),
        _ => Ok(()),
    }
}

/// Sets the shared flag when the pump ends, however it ends: a consumer still
/// reading then fails at its next read instead of waiting or seeing a clean
/// end of stream.
struct AbortOnDrop(Arc<AtomicBool>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The blocking side of the body channel.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
    aborted: Arc<AtomicBool>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(e),
                // The sender is dropped at the end of the body, or when the
                // fetch is abandoned; only the first is an end of stream.
                None if self.aborted.load(Ordering::Acquire) => {
                    return Err(io::Error::other("the download was abandoned"))
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

// ---------------------------------------------------------------------------
// URLs and destinations
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Archive {
    Tar,
    TarGz,
}

/// Parses an absolute `http://` or `https://` URL with a host.
fn check_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| e.to_string())?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!("scheme {:?} is not http or https", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    Ok(url)
}

/// The last segment of the URL's path, percent-decoded: the name a plain file
/// gets when DEST is a directory.
fn url_file_name(url: &Url) -> Result<OsString, String> {
    let segment = url.path().rsplit('/').next().unwrap_or("");
    let name = percent_decode(segment.as_bytes());
    match &name[..] {
        b"" => Err("the URL's path ends without a file name; name the file in DEST".into()),
        b"." | b".." => Err(format!("the URL's file name {:?} is not a file name", lossy(&name))),
        n if n.contains(&b'/') || n.contains(&0) => {
            Err(format!("the URL's file name {:?} holds '/' or NUL", lossy(&name)))
        }
        _ => Ok(OsString::from_vec(name)),
    }
}

fn archive_kind(name: &OsStr) -> Option<Archive> {
    let name = name.as_bytes().to_ascii_lowercase();
    if name.ends_with(b".tar.gz") || name.ends_with(b".tgz") {
        Some(Archive::TarGz)
    } else if name.ends_with(b".tar") {
        Some(Archive::Tar)
    } else {
        None
    }
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex_value = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex_value(s[i + 1]), hex_value(s[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// DEST, checked and split.
struct DestSpec {
    /// Normal components (`.` dropped).
    components: Vec<OsString>,
    /// Spelled as a directory: empty, `.`, or ending in `/` or `/.`.
    dir_form: bool,
}

impl DestSpec {
    fn parse(dest: &Path) -> Result<DestSpec, String> {
        let raw = dest.as_os_str().as_bytes();
        if raw.contains(&0) {
            return Err("holds a NUL byte".into());
        }
        let mut components = Vec::new();
        for c in dest.components() {
            match c {
                Component::Normal(c) => components.push(c.to_owned()),
                Component::CurDir => {}
                Component::ParentDir => return Err("has a '..' component".into()),
                Component::RootDir | Component::Prefix(_) => return Err("is absolute".into()),
            }
        }
        let dir_form = components.is_empty() || raw.ends_with(b"/") || raw.ends_with(b"/.");
        Ok(DestSpec { components, dir_form })
    }
}

/// Where a download goes: a directory to unpack into, or a file.
enum Target {
    Archive { dir: PathBuf, kind: Archive },
    File { dir: PathBuf, name: OsString },
}

/// Why a destination was refused.
enum DestError {
    Bad(String),
    Io(PathBuf, io::Error),
}

impl From<InsideError> for DestError {
    fn from(e: InsideError) -> DestError {
        match e {
            InsideError::Io { path, source } => DestError::Io(path, source),
            other => DestError::Bad(other.to_string()),
        }
    }
}

impl DestError {
    fn into_fetch(self, url: &str, req: &FetchRequest) -> FetchError {
        match self {
            DestError::Bad(reason) => FetchError::BadDest {
                url: url.to_owned(),
                dest: req.dest.clone(),
                reason,
            },
            DestError::Io(path, source) => FetchError::Io {
                url: url.to_owned(),
                path,
                source,
            },
        }
    }
}

/// Where a plain file goes (see the module doc). The directories on the way
/// are created.
fn plain_target(root: &Path, dest: &DestSpec, url_name: &Result<OsString, String>) -> Result<Target, DestError> {
    let in_dir = |dir: PathBuf| match url_name {
        Ok(name) => Ok(Target::File {
            dir,
            name: name.clone(),
        }),
        Err(reason) => Err(DestError::Bad(reason.clone())),
    };
    if dest.dir_form {
        return in_dir(create_dirs_inside(root, &dest.components)?);
    }
    let (last, parents) = dest.components.split_last().expect("a file-form DEST has a component");
    let parent = create_dirs_inside(root, parents)?;
    let candidate = parent.join(last);
    match fs::symlink_metadata(&candidate) {
        Ok(meta) if meta.is_dir() => in_dir(candidate),
        Ok(meta) if meta.file_type().is_symlink() => match fs::metadata(&candidate) {
            // A symlink to a directory is the directory (when inside); any
            // other symlink is replaced by the file (rename replaces the link).
            Ok(target) if target.is_dir() => in_dir(resolve_inside(root, &candidate)?),
            _ => Ok(Target::File {
                dir: parent,
                name: last.clone(),
            }),
        },
        _ => Ok(Target::File {
            dir: parent,
            name: last.clone(),
        }),
    }
}

// ---------------------------------------------------------------------------
// The CLI syntax
// ---------------------------------------------------------------------------

/// Parses `URL[#sha256=HEX][:DEST]` (`tether run --fetch`).
///
/// - With a digest, it follows `#sha256=` (64 hex digits, either case), and
///   DEST, when present, follows the digest after a `:` (DEST may then hold
///   `:`).
/// - Without one, DEST is what follows the last `:` after the start of the
///   URL's path (the first `/` after `scheme://`): `http://h:5000/a.tar` has no
///   DEST, `http://h:5000/a.tar:sub/dir` has DEST `sub/dir`. A `:` in the URL's
///   path or query must therefore be written `%3A`.
///
/// Only `http` and `https` URLs with a host are accepted; DEST must be
/// relative, without `..` (`""` or `.` is the work dir).
pub fn parse_fetch_arg(arg: &str) -> Result<FetchRequest, String> {
    const DIGEST_MARK: &str = "#sha256=";
    let (url, sha256, dest) = match arg.find(DIGEST_MARK) {
        Some(at) => {
            let rest = &arg[at + DIGEST_MARK.len()..];
            let (hex_text, dest) = match rest.split_once(':') {
                Some((h, d)) => (h, Some(d)),
                None => (rest, None),
            };
            let digest = parse_hex_digest(hex_text)
                .ok_or_else(|| format!("{arg:?}: expected 64 hex digits after {DIGEST_MARK}, got {hex_text:?}"))?;
            (&arg[..at], Some(digest), dest)
        }
        None => {
            let path_start = arg
                .find("://")
                .and_then(|s| arg[s + 3..].find('/').map(|p| s + 3 + p))
                .unwrap_or(arg.len());
            match arg[path_start..].rfind(':') {
                Some(colon) => (&arg[..path_start + colon], None, Some(&arg[path_start + colon + 1..])),
                None => (arg, None, None),
            }
        }
    };
    check_url(url).map_err(|reason| format!("{arg:?}: bad URL {url:?}: {reason}"))?;
    let dest = PathBuf::from(dest.unwrap_or(""));
    DestSpec::parse(&dest).map_err(|reason| format!("{arg:?}: destination {dest:?} {reason}"))?;
    Ok(FetchRequest {
        url: url.to_owned(),
        sha256,
        dest,
    })
}

fn parse_hex_digest(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------

/// `url` for messages and logs: a password in it is replaced by `***`.
fn redacted(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `10 MiB`, `8 GiB`, `1500 bytes`: exact, in the largest binary unit that
/// divides it.
fn size_text(n: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n != 0 && n.trailing_zeros() >= shift {
            return format!("{} {unit}", n >> shift);
        }
    }
    format!("{n} bytes")
}

fn attempts_text(attempts: u32) -> String {
    match attempts {
        0 | 1 => String::new(),
        n => format!(" ({n} attempts)"),
    }
}

/// What went wrong with a request, short: `cannot connect: connection
/// refused`, `reading the body: operation timed out`.
fn request_error_text(e: &reqwest::Error) -> String {
    if e.is_connect() {
        format!("cannot connect: {}", cause(e))
    } else if e.is_body() || e.is_decode() {
        format!("reading the body: {}", cause(e))
    } else if e.is_timeout() {
        format!("no answer: {}", cause(e))
    } else {
        error_chain(e)
    }
}

/// The innermost cause of an error, for short messages (`connection
/// refused`, `invalid peer certificate: UnknownIssuer`).
pub(crate) fn cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest = e;
    while let Some(s) = deepest.source() {
        deepest = s;
    }
    match deepest.downcast_ref::<io::Error>() {
        Some(io) => io_reason(io),
        None => deepest.to_string(),
    }
}

/// `connection refused` rather than `Connection refused (os error 111)`.
pub(crate) fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

/// An error and its sources, `: `-separated, skipping a source whose text the
/// message already holds (reqwest's own messages leave the cause out).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// A tiny HTTP/1.1 server on 127.0.0.1 for the tests of this module and of
/// [`crate::gate`]: one thread accepting, one per connection, `Connection:
/// close` on every answer.
#[cfg(test)]
pub(crate) mod test_server {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    /// One answer.
    #[derive(Debug, Clone)]
    pub enum Reply {
        /// A status and a body, with a `Content-Length` or (`length: false`)
        /// delimited by closing the connection.
        Body { status: u16, body: Vec<u8>, length: bool },
        /// Headers announcing `declared` bytes and the first `sent` bytes of
        /// them, then nothing until the client goes away.
        Stall { declared: usize, sent: usize },
    }

    impl Reply {
        pub fn ok(body: &[u8]) -> Reply {
            Reply::Body {
                status: 200,
                body: body.to_vec(),
                length: true,
            }
        }

        pub fn no_length(body: &[u8]) -> Reply {
            Reply::Body {
                status: 200,
                body: body.to_vec(),
                length: false,
            }
        }

        pub fn status(status: u16) -> Reply {
            Reply::Body {
                status,
                body: format!("status {status}\n").into_bytes(),
                length: true,
            }
        }
    }

    type Routes = HashMap<String, Vec<Reply>>;

    pub struct TestServer {
        addr: SocketAddr,
        routes: Arc<Mutex<Routes>>,
        hits: Arc<Mutex<HashMap<String, usize>>>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl TestServer {
        /// Serves `routes`: the n-th request for a path (query included)
        /// gets the n-th reply, the last one repeating; other paths get 404.
        pub fn start(routes: Vec<(&str, Vec<Reply>)>) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let routes: Routes = routes.into_iter().map(|(p, r)| (p.to_owned(), r)).collect();
            let routes = Arc::new(Mutex::new(routes));
            let hits = Arc::new(Mutex::new(HashMap::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let thread = {
                let (routes, hits, stop) = (Arc::clone(&routes), Arc::clone(&hits), Arc::clone(&stop));
                std::thread::spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        let (routes, hits) = (Arc::clone(&routes), Arc::clone(&hits));
                        std::thread::spawn(move || serve(stream, &routes, &hits));
                    }
                })
            };
            TestServer {
                addr,
                routes,
                hits,
                stop,
                thread: Some(thread),
            }
        }

        pub fn port(&self) -> u16 {
            self.addr.port()
        }

        pub fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        /// Requests received for `path` (query included).
        pub fn hits(&self, path: &str) -> usize {
            self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
        }

        pub fn set_route(&self, path: &str, replies: Vec<Reply>) {
            self.routes.lock().unwrap().insert(path.to_owned(), replies);
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            let _ = TcpStream::connect(self.addr);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn serve(mut stream: TcpStream, routes: &Mutex<Routes>, hits: &Mutex<HashMap<String, usize>>) {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            if head.len() > 64 * 1024 {
                return;
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
        let n = {
            let mut hits = hits.lock().unwrap();
            let n = hits.entry(path.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let reply = match routes.lock().unwrap().get(&path) {
            Some(replies) => replies[(n - 1).min(replies.len() - 1)].clone(),
            None => Reply::status(404),
        };
        match reply {
            Reply::Body { status, body, length } => {
                let mut out = format!("HTTP/1.1 {status} {}\r\nConnection: close\r\n", reason(status));
                if length {
                    out.push_str(&format!("Content-Length: {}\r\n", body.len()));
                }
                out.push_str("\r\n");
                let _ = stream.write_all(out.as_bytes());
                let _ = stream.write_all(&body);
            }
            Reply::Stall { declared, sent } => {
                let out = format!("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {declared}\r\n\r\n");
                let _ = stream.write_all(out.as_bytes());
                let _ = stream.write_all(&vec![b'x'; sent]);
                // Until the client gives up and closes.
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }

    fn reason(status: u16) -> &'static str {
        match status {
            200 => "OK",
            404 => "Not Found",
            429 => "Too Many Requests",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "Whatever",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_server::{Reply, TestServer};
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::symlink;

    /// A temp dir with `work/` (the work dir) and `outside/` next to it.
    struct Scene {
        tmp: tempfile::TempDir,
    }

    impl Scene {
        fn new() -> Scene {
            let tmp = tempfile::tempdir().unwrap();
            fs::create_dir(tmp.path().join("work")).unwrap();
            fs::create_dir(tmp.path().join("outside")).unwrap();
            Scene { tmp }
        }

        fn work(&self) -> PathBuf {
            self.tmp.path().join("work")
        }

        fn outside(&self) -> PathBuf {
            self.tmp.path().join("outside")
        }

        /// Names in `rel` (relative to the work dir), sorted.
        fn list(&self, rel: &str) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(self.work().join(rel))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }

        fn read(&self, rel: &str) -> Vec<u8> {
            fs::read(self.work().join(rel)).unwrap()
        }

        /// Nothing was written next to the work dir or outside it.
        fn assert_outside_untouched(&self) {
            let mut top: Vec<String> = fs::read_dir(self.tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            top.sort();
            assert_eq!(top, ["outside", "work"]);
            assert_eq!(fs::read_dir(self.outside()).unwrap().count(), 0);
        }
    }

    fn limits() -> FetchLimits {
        FetchLimits {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            ..FetchLimits::default()
        }
    }

    fn fetcher() -> Fetcher {
        Fetcher::new(limits()).unwrap()
    }

    fn request(url: String, dest: &str) -> FetchRequest {
        FetchRequest {
            url,
            sha256: None,
            dest: PathBuf::from(dest),
        }
    }

    fn sha(data: &[u8]) -> [u8; 32] {
        Sha256::digest(data).into()
    }

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(1_000_000);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    /// A tar whose only entry is `../evil` (the `tar` builder refuses to write one).
    fn hostile_tar() -> Vec<u8> {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..7].copy_from_slice(b"../evil");
        header.set_size(5);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        let mut out = header.as_bytes().to_vec();
        let mut data = b"pwned".to_vec();
        data.resize(512, 0);
        out.extend_from_slice(&data);
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[tokio::test]
    async fn plain_file_into_the_work_dir() {
        let server = TestServer::start(vec![("/files/hello.txt", vec![Reply::ok(b"hello")])]);
        let url = server.url("/files/hello.txt");
        for dest in ["", ".", "./"] {
            let s = Scene::new();
            let report = fetcher().fetch(&request(url.clone(), dest), &s.work()).await.unwrap();
            assert_eq!(s.list("."), ["hello.txt"], "{dest:?}");
            assert_eq!(s.read("hello.txt"), b"hello");
            let meta = fs::metadata(s.work().join("hello.txt")).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o644);
            assert_eq!(
                report,
                FetchReport {
                    url: url.clone(),
                    bytes: 5,
                    sha256: sha(b"hello"),
                    unpacked: None,
                    path: fs::canonicalize(s.work()).unwrap().join("hello.txt"),
                    attempts: 1,
                }
            );
            s.assert_outside_untouched();
        }
        assert_eq!(server.hits("/files/hello.txt"), 3);
    }

    #[tokio::test]
    async fn plain_file_to_a_named_path() {
        let server = TestServer::start(vec![
            ("/files/hello.txt", vec![Reply::ok(b"hello")]),
            ("/files/some%20name.txt", vec![Reply::ok(b"spaced")]),
            ("/files/", vec![Reply::ok(b"index")]),
        ]);
        let s = Scene::new();
        let f = fetcher();
        let url = server.url("/files/hello.txt");

        // A file path: its parents are created.
        let report = f
            .fetch(&request(url.clone(), "sub/dir/renamed.bin"), &s.work())
            .await
            .unwrap();
        assert_eq!(s.read("sub/dir/renamed.bin"), b"hello");
        assert_eq!(s.list("sub/dir"), ["renamed.bin"]);
        assert!(report.path.ends_with("work/sub/dir/renamed.bin"));

        // An existing file is replaced.
        f.fetch(
            &request(server.url("/files/some%20name.txt"), "sub/dir/renamed.bin"),
            &s.work(),
        )
        .await
        .unwrap();
        assert_eq!(s.read("sub/dir/renamed.bin"), b"spaced");

        // An existing directory, or a trailing '/', receives the URL's file name, percent-decoded.
        fs::create_dir(s.work().join("existing")).unwrap();
        f.fetch(&request(url.clone(), "existing"), &s.work()).await.unwrap();
        assert_eq!(s.list("existing"), ["hello.txt"]);
        f.fetch(&request(server.url("/files/some%20name.txt"), "new/dir/"), &s.work())
            .await
            .unwrap();
        assert_eq!(s.read("new/dir/some name.txt"), b"spaced");

        // A URL without a file name needs DEST to name the file.
        let err = f
            .fetch(&request(server.url("/files/"), "."), &s.work())
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::BadDest { .. }), "{err:?}");
        assert!(err.to_string().contains("without a file name"), "{err}");
        assert_eq!(server.hits("/files/"), 0);
        f.fetch(&request(server.url("/files/"), "index.html"), &s.work())
            .await
            .unwrap();
        assert_eq!(s.read("index.html"), b"index");
        s.assert_outside_untouched();
    }

    #[tokio::test]
    async fn archives_are_unpacked_into_dest() {
        let tar = tar_of(&[("a.txt", b"alpha"), ("d/b.txt", b"beta")]);
        let tgz = gzip(&tar);
        let server = TestServer::start(vec![
            ("/ctx.tar", vec![Reply::ok(&tar)]),
            ("/ctx.tar.gz?token=x.zip", vec![Reply::no_length(&tgz)]),
            ("/ctx.TGZ", vec![Reply::ok(&tgz)]),
        ]);
        let f = fetcher();
        for (path, dest, digest) in [
            ("/ctx.tar", "ctx", sha(&tar)),
            ("/ctx.tar.gz?token=x.zip", "deep/ctx/", sha(&tgz)),
            ("/ctx.TGZ", ".", sha(&tgz)),
        ] {
            let s = Scene::new();
            let mut req = request(server.url(path), dest);
            req.sha256 = Some(digest);
            let report = f.fetch(&req, &s.work()).await.unwrap();
            assert_eq!(s.read(&format!("{dest}/a.txt")), b"alpha", "{path}");
            assert_eq!(s.read(&format!("{dest}/d/b.txt")), b"beta", "{path}");
            assert_eq!(report.unpacked, Some(UnpackReport { entries: 2, bytes: 9 }), "{path}");
            assert_eq!(report.sha256, digest);
            assert_eq!(report.path, fs::canonicalize(s.work().join(dest)).unwrap());
            s.assert_outside_untouched();
        }
    }

    #[tokio::test]
    async fn a_large_archive_streams_through() {
        // More than the channel holds, in several tar entries.
        let big: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        let tar = tar_of(&[("one", &big), ("two", &big[..1000])]);
        let tgz = gzip(&tar);
        let server = TestServer::start(vec![("/big.tgz", vec![Reply::no_length(&tgz)])]);
        let s = Scene::new();
        let report = fetcher()
            .fetch(&request(server.url("/big.tgz"), "x"), &s.work())
            .await
            .unwrap();
        assert_eq!(report.bytes, tgz.len() as u64);
        assert_eq!(s.read("x/one"), big);
        assert_eq!(s.read("x/two"), &big[..1000]);
    }

    #[tokio::test]
    async fn digest_is_checked() {
        let tar = tar_of(&[("a.txt", b"alpha")]);
        let server = TestServer::start(vec![
            ("/f.bin", vec![Reply::ok(b"payload")]),
            ("/a.tar", vec![Reply::ok(&tar)]),
        ]);
        let s = Scene::new();
        let f = fetcher();
        let url = server.url("/f.bin");

        let mut req = request(url.clone(), "out/f.bin");
        req.sha256 = Some(sha(b"payload"));
        f.fetch(&req, &s.work()).await.unwrap();
        assert_eq!(s.read("out/f.bin"), b"payload");

        // A wrong digest: nothing at DEST, no temporary file left.
        req.sha256 = Some([0xab; 32]);
        req.dest = PathBuf::from("other/f.bin");
        let err = f.fetch(&req, &s.work()).await.unwrap_err();
        assert!(
            matches!(err, FetchError::DigestMismatch { unpacked: false, actual, .. } if actual == sha(b"payload")),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "{url}: sha256 mismatch: expected {}, got {}",
                "ab".repeat(32),
                hex(&sha(b"payload"))
            )
        );
        assert_eq!(s.list("other"), Vec::<String>::new());
        assert_eq!(server.hits("/f.bin"), 2, "a digest mismatch is not retried");

        // Same when DEST is an existing file: it is left alone.
        req.dest = PathBuf::from("out/f.bin");
        f.fetch(&req, &s.work()).await.unwrap_err();
        assert_eq!(s.read("out/f.bin"), b"payload");
        assert_eq!(s.list("out"), ["f.bin"]);

        // An archive: the error says it was unpacked already.
        let mut req = request(server.url("/a.tar"), "ctx");
        req.sha256 = Some([0x01; 32]);
        let err = f.fetch(&req, &s.work()).await.unwrap_err();
        assert!(
            matches!(err, FetchError::DigestMismatch { unpacked: true, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("unpacked already"), "{err}");
        s.assert_outside_untouched();
    }

    #[tokio::test]
    async fn client_errors_are_not_retried() {
        let server = TestServer::start(vec![("/gone.tar", vec![Reply::status(404)])]);
        let s = Scene::new();
        let url = server.url("/missing.txt");
        let err = fetcher().fetch(&request(url.clone(), ""), &s.work()).await.unwrap_err();
        assert!(
            matches!(err, FetchError::Status { status, .. } if status == StatusCode::NOT_FOUND),
            "{err:?}"
        );
        assert_eq!(err.to_string(), format!("GET {url}: HTTP 404 Not Found"));
        assert_eq!(server.hits("/missing.txt"), 1);
        let err = fetcher()
            .fetch(&request(server.url("/gone.tar"), "x"), &s.work())
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Status { .. }), "{err:?}");
        assert_eq!(server.hits("/gone.tar"), 1);
        assert_eq!(s.list("."), ["x"]);
        assert_eq!(s.list("x"), Vec::<String>::new());
    }

    #[tokio::test]
    async fn server_errors_are_retried() {
        let tar = tar_of(&[("a.txt", b"alpha")]);
        let server = TestServer::start(vec![
            ("/flaky.txt", vec![Reply::status(503), Reply::ok(b"finally")]),
            (
                "/busy.tar",
                vec![Reply::status(429), Reply::status(500), Reply::ok(&tar)],
            ),
            ("/down.txt", vec![Reply::status(503)]),
        ]);
        let s = Scene::new();
        let f = fetcher();
        let report = f
            .fetch(&request(server.url("/flaky.txt"), ""), &s.work())
            .await
            .unwrap();
        assert_eq!((report.attempts, server.hits("/flaky.txt")), (2, 2));
        assert_eq!(s.read("flaky.txt"), b"finally");

        let report = f
            .fetch(&request(server.url("/busy.tar"), "t"), &s.work())
            .await
            .unwrap();
        assert_eq!((report.attempts, server.hits("/busy.tar")), (3, 3));
        assert_eq!(s.read("t/a.txt"), b"alpha");

        let err = f
            .fetch(&request(server.url("/down.txt"), ""), &s.work())
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Status { attempts: 3, .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "GET {}: HTTP 503 Service Unavailable (3 attempts)",
                server.url("/down.txt")
            )
        );
        assert_eq!(server.hits("/down.txt"), 3);
        assert_eq!(s.list("."), ["flaky.txt", "t"]);
    }

    #[tokio::test]
    async fn stalled_bodies_time_out_and_are_retried() {
        let server = TestServer::start(vec![(
            "/slow.bin",
            vec![Reply::Stall {
                declared: 100_000,
                sent: 10,
            }],
        )]);
        let s = Scene::new();
        let f = Fetcher::new(FetchLimits {
            read_timeout: Duration::from_millis(300),
            attempts: 2,
            ..limits()
        })
        .unwrap();
        let err = f
            .fetch(&request(server.url("/slow.bin"), ""), &s.work())
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::Request { ref source, attempts: 2, .. } if source.is_timeout()),
            "{err:?}"
        );
        assert!(err.to_string().contains("timed out (2 attempts)"), "{err}");
        assert_eq!(server.hits("/slow.bin"), 2);
        assert_eq!(s.list("."), Vec::<String>::new());

        // An archive whose body already reached the unpacker is not retried.
        server.set_route(
            "/slow.tar",
            vec![Reply::Stall {
                declared: 100_000,
                sent: 10,
            }],
        );
        let err = f
            .fetch(&request(server.url("/slow.tar"), "x"), &s.work())
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Request { .. }), "{err:?}");
        assert_eq!(server.hits("/slow.tar"), 1);
    }

    #[tokio::test]
    async fn connection_errors_are_retried_and_named() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let s = Scene::new();
        let f = Fetcher::new(FetchLimits {
            attempts: 2,
            ..limits()
        })
        .unwrap();
        let url = format!("http://127.0.0.1:{port}/x.txt");
        let err = f.fetch(&request(url.clone(), ""), &s.work()).await.unwrap_err();
        assert!(
            matches!(err, FetchError::Request { ref source, .. } if source.is_connect()),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.starts_with(&format!("GET {url}: ")), "{text}");
        assert_eq!(
            text,
            format!("GET {url}: cannot connect: connection refused (2 attempts)")
        );
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused() {
        let big = vec![7u8; 5000];
        let big_tar = tar_of(&[("f", &big)]);
        let server = TestServer::start(vec![
            ("/sized.bin", vec![Reply::ok(&big)]),
            ("/unsized.bin", vec![Reply::no_length(&big)]),
            ("/unsized.tar", vec![Reply::no_length(&big_tar)]),
            ("/exact.bin", vec![Reply::no_length(&big[..1024])]),
        ]);
        let s = Scene::new();
        let f = Fetcher::new(FetchLimits {
            max_bytes: 1024,
            ..limits()
        })
        .unwrap();
        for (path, dest) in [("/sized.bin", "d/"), ("/unsized.bin", "d/"), ("/unsized.tar", "t")] {
            let url = server.url(path);
            let err = f.fetch(&request(url.clone(), dest), &s.work()).await.unwrap_err();
            assert!(
                matches!(err, FetchError::TooLarge { limit: 1024, .. }),
                "{path}: {err:?}"
            );
            assert_eq!(err.to_string(), format!("{url}: body larger than the 1 KiB cap"));
            assert_eq!(server.hits(path), 1, "{path}");
        }
        assert_eq!(s.list("d"), Vec::<String>::new());
        // Exactly at the cap is fine.
        f.fetch(&request(server.url("/exact.bin"), "d/"), &s.work())
            .await
            .unwrap();
        assert_eq!(s.list("d"), ["exact.bin"]);
    }

    #[tokio::test]
    async fn hostile_archives_are_refused() {
        let server = TestServer::start(vec![
            ("/evil.tar", vec![Reply::ok(&hostile_tar())]),
            ("/evil.tgz", vec![Reply::ok(&gzip(&hostile_tar()))]),
            ("/notgz.tgz", vec![Reply::ok(b"this is not gzip")]),
        ]);
        for path in ["/evil.tar", "/evil.tgz"] {
            let s = Scene::new();
            let url = server.url(path);
            let err = fetcher().fetch(&request(url.clone(), ""), &s.work()).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    FetchError::Unpack {
                        source: UnpackError::ParentComponent { .. },
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(err.to_string().starts_with(&format!("{url}: ")), "{err}");
            assert_eq!(server.hits(path), 1, "unpack errors are not retried");
            assert_eq!(s.list("."), Vec::<String>::new());
            s.assert_outside_untouched();
        }
        let s = Scene::new();
        let err = fetcher()
            .fetch(&request(server.url("/notgz.tgz"), ""), &s.work())
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Unpack { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn bad_destinations_are_refused() {
        let tar = tar_of(&[("a.txt", b"alpha")]);
        let server = TestServer::start(vec![
            ("/f.txt", vec![Reply::ok(b"data")]),
            ("/a.tar", vec![Reply::ok(&tar)]),
        ]);
        let s = Scene::new();
        let f = fetcher();
        fs::create_dir(s.work().join("real")).unwrap();
        symlink("../outside", s.work().join("out")).unwrap();
        symlink("real", s.work().join("in")).unwrap();
        symlink("missing", s.work().join("dangling")).unwrap();
        fs::write(s.work().join("file"), b"x").unwrap();
        for (path, dest, why) in [
            ("/f.txt", "../x", "'..'"),
            ("/f.txt", "a/../../x", "'..'"),
            ("/f.txt", "/tmp/x", "absolute"),
            ("/a.tar", "..", "'..'"),
            ("/f.txt", "out/x.txt", "outside the work dir"),
            ("/f.txt", "out/", "outside the work dir"),
            ("/f.txt", "out", "outside the work dir"),
            ("/a.tar", "out", "outside the work dir"),
            ("/a.tar", "out/sub", "outside the work dir"),
            ("/f.txt", "dangling/x", "dangling"),
            ("/f.txt", "file/x", "not a directory"),
        ] {
            let url = server.url(path);
            let err = f.fetch(&request(url.clone(), dest), &s.work()).await.unwrap_err();
            assert!(matches!(err, FetchError::BadDest { .. }), "{dest}: {err:?}");
            let text = err.to_string();
            assert!(text.starts_with(&format!("{url}: bad destination")), "{text}");
            assert!(text.contains(why), "{dest}: {text}");
        }
        assert_eq!(server.hits("/f.txt") + server.hits("/a.tar"), 0);
        s.assert_outside_untouched();

        // A symlink that stays inside is fine, as a directory or as the file's own name.
        f.fetch(&request(server.url("/f.txt"), "in/"), &s.work()).await.unwrap();
        f.fetch(&request(server.url("/a.tar"), "in/t"), &s.work())
            .await
            .unwrap();
        assert_eq!(s.list("real"), ["f.txt", "t"]);
        f.fetch(&request(server.url("/f.txt"), "dangling"), &s.work())
            .await
            .unwrap();
        assert!(fs::symlink_metadata(s.work().join("dangling")).unwrap().is_file());
        s.assert_outside_untouched();
    }

    #[tokio::test]
    async fn passwords_are_not_shown() {
        let server = TestServer::start(vec![]);
        let s = Scene::new();
        let url = server.url("/x.txt").replace("http://", "http://user:secret@");
        let err = fetcher().fetch(&request(url, ""), &s.work()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "GET {}: HTTP 404 Not Found",
                server.url("/x.txt").replace("http://", "http://user:***@")
            )
        );
        assert_eq!(err.url(), server.url("/x.txt").replace("http://", "http://user:***@"));
    }

    #[tokio::test]
    async fn bad_urls_are_refused() {
        let s = Scene::new();
        for url in ["ftp://h/x", "file:///etc/passwd", "not a url", "http://"] {
            let err = fetcher().fetch(&request(url.into(), ""), &s.work()).await.unwrap_err();
            assert!(matches!(err, FetchError::BadUrl { .. }), "{url}: {err:?}");
            assert!(err.to_string().starts_with(url), "{err}");
        }
    }

    #[test]
    fn hex_is_lower_case_pairs() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn parses_fetch_args() {
        let digest = "0123456789abcdefABCDEF0123456789abcdef0123456789abcdef0123456789";
        let bytes = parse_hex_digest(&digest.to_lowercase()).unwrap();
        assert_eq!(bytes[0], 0x01);
        assert_eq!(bytes[31], 0x89);
        let ok = |arg: &str, url: &str, sha256: Option<[u8; 32]>, dest: &str| {
            assert_eq!(
                parse_fetch_arg(arg),
                Ok(FetchRequest {
                    url: url.into(),
                    sha256,
                    dest: dest.into()
                }),
                "{arg}"
            );
        };
        ok("http://h/a.tar", "http://h/a.tar", None, "");
        ok("https://h/a.tar:sub/dir", "https://h/a.tar", None, "sub/dir");
        ok("http://h:5000/a.tar", "http://h:5000/a.tar", None, "");
        ok("http://h:5000/a.tar:sub/dir", "http://h:5000/a.tar", None, "sub/dir");
        ok("http://h:5000/a.tar:", "http://h:5000/a.tar", None, "");
        ok("http://h:5000/a.tar:.", "http://h:5000/a.tar", None, ".");
        ok(
            "http://u:p@h:5000/x%3Ay?q=1%3A2:d/",
            "http://u:p@h:5000/x%3Ay?q=1%3A2",
            None,
            "d/",
        );
        ok("http://[::1]:8080/f:out", "http://[::1]:8080/f", None, "out");
        ok("http://h:5000", "http://h:5000", None, "");
        ok("HTTPS://h/f", "HTTPS://h/f", None, "");
        // Without a digest, the last ':' after the path's start separates DEST.
        ok("http://h/a:b:c", "http://h/a:b", None, "c");
        ok(
            &format!("http://h/a.tgz#sha256={digest}"),
            "http://h/a.tgz",
            Some(bytes),
            "",
        );
        ok(
            &format!("http://h:1/a.tgz#sha256={digest}:ctx"),
            "http://h:1/a.tgz",
            Some(bytes),
            "ctx",
        );
        // With a digest, DEST is everything after it and may hold ':'.
        ok(
            &format!("http://h/a#sha256={digest}:x:y"),
            "http://h/a",
            Some(bytes),
            "x:y",
        );
        ok(
            &format!("http://h/a:b#sha256={digest}"),
            "http://h/a:b",
            Some(bytes),
            "",
        );

        let bad = |arg: &str, why: &str| {
            let err = parse_fetch_arg(arg).unwrap_err();
            assert!(err.contains(why), "{arg}: {err}");
        };
        bad("ftp://h/a", "not http or https");
        bad("h/a", "bad URL");
        bad("", "bad URL");
        bad("http://h:5000:dest", "bad URL");
        bad("http://h/a#sha256=abc", "64 hex digits");
        bad(&format!("http://h/a#sha256={digest}0"), "64 hex digits");
        bad(&format!("http://h/a#sha256={}", "g".repeat(64)), "64 hex digits");
        bad(&format!("http://h/a#sha256={}", "é".repeat(32)), "64 hex digits");
        bad(&format!("http://h/a#sha256=+{}", &digest[1..]), "64 hex digits");
        bad("http://h/a:../x", "'..'");
        bad("http://h/a:x/../../y", "'..'");
        bad("http://h/a:/etc", "absolute");
        bad(&format!("http://h/a#sha256={digest}:/abs"), "absolute");
    }

    #[test]
    fn url_names_and_kinds() {
        let name = |u: &str| url_file_name(&Url::parse(u).unwrap());
        assert_eq!(name("http://h/a/b.txt?x=1#f"), Ok("b.txt".into()));
        assert_eq!(name("http://h/a%20b%zz%4"), Ok("a b%zz%4".into()));
        assert_eq!(name("http://h/caf%C3%A9"), Ok("café".into()));
        assert_eq!(name("http://h/%FF"), Ok(OsString::from_vec(vec![0xff])));
        assert!(name("http://h/").is_err());
        assert!(name("http://h").is_err());
        assert!(name("http://h/a%2Fb").is_err());
        assert!(name("http://h/a%00b").is_err());
        // `..` and `%2e%2e` segments are resolved by URL parsing; these remain.
        assert!(name("http://h/a/..").is_err());
        assert!(name("http://h/a/.%2E").is_err());
        let kind = |n: &str| archive_kind(OsStr::new(n));
        assert_eq!(kind("x.tar"), Some(Archive::Tar));
        assert_eq!(kind("x.TAR.GZ"), Some(Archive::TarGz));
        assert_eq!(kind("x.tgz"), Some(Archive::TarGz));
        assert_eq!(kind("x.tar.bz2"), None);
        assert_eq!(kind("x.gz"), None);
        assert_eq!(kind("tar"), None);
        assert_eq!(size_text(10 << 20), "10 MiB");
        assert_eq!(size_text(8 << 30), "8 GiB");
        assert_eq!(size_text(1536), "1536 bytes");
        assert_eq!(size_text(0), "0 bytes");
    }
}
