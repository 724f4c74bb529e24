//! A loopback HTTP/1.1 server for end-to-end tests of `tether run --fetch URL` and
//! `--wait-for URL`: std only, one thread per connection, every answer closes its
//! connection (`Connection: close`), so a client never has to deal with keep-alive.
//!
//! Routes map a path (the request target without its query string) to a [`Reply`];
//! unknown paths get 404. [`HttpServer::hits`] counts the requests seen per path, known
//! or not. A client that goes away in the middle of a body is not an error: the
//! connection's thread stops writing and ends.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Size of the pieces bodies are written in.
pub const PIECE: usize = 64 * 1024;

/// Longest request head (request line and headers) the server reads.
const MAX_HEAD: usize = 64 * 1024;

/// What the server answers on one path.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with this body and its Content-Length.
    Body(Vec<u8>),
    /// This status, with a short text body (`"404 Not Found\n"`) and its Content-Length.
    Status(u16),
    /// 200 with a body of `len` bytes ([`stream_content`]) written in 64 KiB pieces,
    /// announced by a Content-Length or (without) delimited by the end of the connection.
    Stream { len: u64, content_length: bool },
    /// Statuses served in order to successive requests for the path, the last one
    /// repeating (each as [`Reply::Status`]).
    Sequence(Vec<u16>),
    /// 200 with the contents of this file, streamed from disk in 64 KiB pieces with its
    /// Content-Length (404 when it cannot be opened).
    File(PathBuf),
}

struct Shared {
    routes: HashMap<String, Reply>,
    hits: Mutex<HashMap<String, usize>>,
    shutdown: AtomicBool,
    /// Open connections (a clone of each socket, to cut them off on drop) and their threads.
    conns: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
}

/// A running server on `127.0.0.1:PORT`. Dropping it stops accepting, cuts off the
/// connections still open and joins every thread.
pub struct HttpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Starts a server with these routes (`("/path", reply)`) on a free loopback port.
    pub fn start(routes: Vec<(&str, Reply)>) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr of the listener");
        let shared = Arc::new(Shared {
            routes: routes.into_iter().map(|(p, r)| (p.to_owned(), r)).collect(),
            hits: Mutex::new(HashMap::new()),
            shutdown: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("http-accept".into())
                .spawn(move || accept_loop(listener, shared))
                .expect("spawning the accept thread")
        };
        HttpServer {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT/path` (`path` with or without its leading `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Requests seen so far for `path` (without query string), whether routed or not.
    pub fn hits(&self, path: &str) -> usize {
        self.shared.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        // Unblock accept(): the loop sees the flag on this connection and ends.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap());
        for (sock, thread) in conns {
            let _ = sock.shutdown(Shutdown::Both);
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else { continue };
        let Ok(clone) = stream.try_clone() else { continue };
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("http-conn".into())
                .spawn(move || serve_connection(stream, &shared))
        };
        let Ok(thread) = thread else { continue };
        let mut conns = shared.conns.lock().unwrap();
        // Forget finished connections so a long test does not pile up sockets.
        let (done, open): (Vec<_>, Vec<_>) = std::mem::take(&mut *conns)
            .into_iter()
            .partition(|(_, t)| t.is_finished());
        *conns = open;
        conns.push((clone, thread));
        drop(conns);
        for (_, t) in done {
            let _ = t.join();
        }
    }
}

/// The request line's method and path (without query string), or `None` for a request
/// that is not HTTP or was cut off before its head ended.
fn read_head(stream: &mut TcpStream) -> Option<(String, String)> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return None;
        }
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next()?;
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let method = parts.next()?.to_owned();
    let target = parts.next()?;
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    // An absolute-form target (`http://host/path`) names the same path.
    let target = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let path = target.split(['?', '#']).next().unwrap_or("/").to_owned();
    Some((method, path))
}

fn serve_connection(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Some((method, path)) = read_head(&mut stream) else {
        return;
    };
    let seen_before = {
        let mut hits = shared.hits.lock().unwrap();
        let n = hits.entry(path.clone()).or_insert(0);
        *n += 1;
        *n - 1
    };
    let head_only = method == "HEAD";
    // Write errors mean the client went away: nothing to do but stop.
    let _ = match shared.routes.get(&path) {
        None => write_status(&mut stream, 404, head_only),
        Some(Reply::Body(body)) => write_body(&mut stream, 200, body, head_only),
        Some(Reply::Status(code)) => write_status(&mut stream, *code, head_only),
        Some(Reply::Sequence(codes)) => {
            let code = codes.get(seen_before).or(codes.last()).copied().unwrap_or(200);
            write_status(&mut stream, code, head_only)
        }
        Some(Reply::Stream { len, content_length }) => write_stream(&mut stream, *len, *content_length, head_only),
        Some(Reply::File(file)) => write_file(&mut stream, file, head_only),
    };
    // Close politely: our side first, then drain what the client still sends (briefly),
    // so that unread request bytes do not turn the close into a reset that could destroy
    // the end of the response in the client's receive buffer.
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = [0u8; 4096];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn write_head(stream: &mut TcpStream, code: u16, content_length: Option<u64>) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {code} {}\r\nConnection: close\r\n", reason(code));
    if let Some(n) = content_length {
        head.push_str(&format!("Content-Length: {n}\r\n"));
    }
    head.push_str("Content-Type: application/octet-stream\r\n\r\n");
    stream.write_all(head.as_bytes())
}

fn write_body(stream: &mut TcpStream, code: u16, body: &[u8], head_only: bool) -> std::io::Result<()> {
    write_head(stream, code, Some(body.len() as u64))?;
    if head_only || code == 204 || code == 304 {
        return Ok(());
    }
    stream.write_all(body)
}

fn write_status(stream: &mut TcpStream, code: u16, head_only: bool) -> std::io::Result<()> {
    if code == 204 || code == 304 {
        return write_body(stream, code, b"", head_only);
    }
    write_body(stream, code, format!("{code} {}\n", reason(code)).as_bytes(), head_only)
}

fn write_stream(stream: &mut TcpStream, len: u64, content_length: bool, head_only: bool) -> std::io::Result<()> {
    write_head(stream, 200, content_length.then_some(len))?;
    if head_only {
        return Ok(());
    }
    let mut offset = 0;
    while offset < len {
        let piece = stream_piece(offset / PIECE as u64, len);
        stream.write_all(&piece)?;
        offset += piece.len() as u64;
    }
    Ok(())
}

fn write_file(stream: &mut TcpStream, path: &std::path::Path, head_only: bool) -> std::io::Result<()> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return write_status(stream, 404, head_only);
    };
    let len = file.metadata()?.len();
    write_head(stream, 200, Some(len))?;
    if head_only {
        return Ok(());
    }
    let mut buf = vec![0u8; PIECE];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

/// Piece `index` (64 KiB, the last one shorter) of a [`Reply::Stream`] body of `len`
/// bytes: pseudo-random bytes seeded by the piece's index.
fn stream_piece(index: u64, len: u64) -> Vec<u8> {
    let start = index * PIECE as u64;
    let n = (len.saturating_sub(start)).min(PIECE as u64) as usize;
    crate::pseudo_random(n, index + 1)
}

/// The whole body a [`Reply::Stream`] of `len` bytes serves (for small `len`s).
pub fn stream_content(len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut index = 0;
    while (out.len() as u64) < len {
        out.extend_from_slice(&stream_piece(index, len));
        index += 1;
    }
    out
}

/// The lowercase hex SHA-256 of the body a [`Reply::Stream`] of `len` bytes serves,
/// computed piece by piece (any `len`).
pub fn stream_sha256(len: u64) -> String {
    let mut h = Sha256::new();
    let mut offset = 0;
    while offset < len {
        let piece = stream_piece(offset / PIECE as u64, len);
        h.update(&piece);
        offset += piece.len() as u64;
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One request with a plain TcpStream: (status, headers lowercased, body).
    fn request(server: &HttpServer, method: &str, target: &str) -> (u16, String, Vec<u8>) {
        let mut s = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n"
        )
        .unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let end = all.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
        let head = String::from_utf8(all[..end].to_vec()).unwrap();
        let code = head.split(' ').nth(1).unwrap().parse().unwrap();
        (code, head.to_ascii_lowercase(), all[end..].to_vec())
    }

    #[test]
    fn bodies_statuses_and_404() {
        let server = HttpServer::start(vec![
            ("/hello", Reply::Body(b"hello world\n".to_vec())),
            ("/gone", Reply::Status(410)),
        ]);
        let (code, head, body) = request(&server, "GET", "/hello?x=1");
        assert_eq!(code, 200);
        assert!(head.contains("content-length: 12\r\n"), "{head}");
        assert!(head.contains("connection: close\r\n"), "{head}");
        assert_eq!(body, b"hello world\n");

        let (code, _, body) = request(&server, "HEAD", "/hello");
        assert_eq!(code, 200);
        assert!(body.is_empty());

        assert_eq!(request(&server, "GET", "/gone").0, 410);
        assert_eq!(request(&server, "GET", "/nope").0, 404);
        assert_eq!(server.hits("/hello"), 2);
        assert_eq!(server.hits("/gone"), 1);
        assert_eq!(server.hits("/nope"), 1);
        assert_eq!(server.hits("/never"), 0);
        assert_eq!(
            server.url("/hello"),
            format!("http://127.0.0.1:{}/hello", server.port())
        );
    }

    #[test]
    fn sequences_repeat_their_last_status() {
        let server = HttpServer::start(vec![("/ready", Reply::Sequence(vec![503, 503, 200]))]);
        let codes: Vec<u16> = (0..5).map(|_| request(&server, "GET", "/ready").0).collect();
        assert_eq!(codes, [503, 503, 200, 200, 200]);
        assert_eq!(server.hits("/ready"), 5);
    }

    #[test]
    fn streams_with_and_without_length() {
        let len = 3 * PIECE as u64 + 17;
        let server = HttpServer::start(vec![
            (
                "/sized",
                Reply::Stream {
                    len,
                    content_length: true,
                },
            ),
            (
                "/unsized",
                Reply::Stream {
                    len,
                    content_length: false,
                },
            ),
        ]);
        let (code, head, body) = request(&server, "GET", "/sized");
        assert_eq!(code, 200);
        assert!(head.contains(&format!("content-length: {len}\r\n")), "{head}");
        assert_eq!(body, stream_content(len));
        let (code, head, body) = request(&server, "GET", "/unsized");
        assert_eq!(code, 200);
        assert!(!head.contains("content-length"), "{head}");
        assert_eq!(body.len() as u64, len);
        let digest: String = Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(digest, stream_sha256(len));
    }

    #[test]
    fn files_and_clients_that_leave_mid_body() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data = crate::pseudo_random(200_000, 7);
        std::fs::write(&path, &data).unwrap();
        let server = HttpServer::start(vec![
            ("/blob", Reply::File(path)),
            ("/missing", Reply::File(dir.path().join("missing"))),
            (
                "/huge",
                Reply::Stream {
                    len: 1 << 40,
                    content_length: true,
                },
            ),
        ]);
        assert_eq!(request(&server, "GET", "/blob").2, data);
        assert_eq!(request(&server, "GET", "/missing").0, 404);

        // Read a little of an endless body and hang up; the server must carry on.
        let mut s = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        s.write_all(b"GET /huge HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut some = [0u8; 1000];
        s.read_exact(&mut some).unwrap();
        drop(s);
        assert_eq!(request(&server, "GET", "/blob").0, 200);
        assert_eq!(server.hits("/huge"), 1);
        // A client still connected (mid-body, not reading) does not block the drop.
        let mut stalled = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        stalled.write_all(b"GET /huge HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        stalled.read_exact(&mut some).unwrap();
        drop(server);
    }
}
