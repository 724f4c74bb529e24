//! A Kubernetes API server for tests: as much of one as the real `kubectl` needs to
//! `attach` to and `exec` into the containers of a pod, with the kubelet's and the CRI
//! runtime's semantics behind it, and containers that are real runc containers.
//!
//! kubectl 1.32 asks, in order: discovery (`/api`, `/apis`, `/api/v1`; the Google Cloud
//! SDK's dispatcher asks `/version` first, to pick a versioned binary), `GET` of the pod
//! (its phase and containers), then `GET .../pods/POD/attach` or `.../exec` with
//! `Upgrade: websocket` and `Sec-WebSocket-Protocol: v5.channel.k8s.io` ([`stream`]).
//! Plain `http://` on loopback, no authentication: a kubeconfig naming the server is
//! all kubectl needs ([`ApiServer::kubectl`]).
//!
//! Each container's stdin, stdout and stderr are served as a CRI runtime serves them
//! ([`cri`]): output broadcast to every attached client and logged, every client's
//! input merged into the one stdin, a detaching client never closing it.
//! [`ApiServer::drop_streams`] cuts every attach and exec stream at once, as an API
//! server restart does. Tests call [`kubectl_usable`] (and
//! [`crate::container::runc_usable`]) first.

pub mod cri;
pub mod stream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::container::Bundle;
use cri::ContainerIo;
use stream::Wants;

/// Longest request head read.
const MAX_HEAD: usize = 64 * 1024;

/// Why kubectl cannot be used here, or `None` when it can (checked once per process).
pub fn kubectl_skip_reason() -> Option<&'static str> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| match Command::new("kubectl").args(["version", "--client"]).stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "`kubectl version --client` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Some(format!(
                "no kubectl on PATH ({e}); it is not in the package registries, so these tests need a machine that has it"
            )),
        })
        .as_deref()
}

/// True when kubectl runs here; otherwise prints `skipped: WHY` (the caller returns).
pub fn kubectl_usable() -> bool {
    match kubectl_skip_reason() {
        None => true,
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// A statically linked kubectl to put into a container image: one of the versioned
/// binaries the Google Cloud SDK keeps beside its `kubectl` dispatcher (which itself only
/// runs where they are), the newest first; `None` when there is none.
pub fn static_kubectl() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let kubectl = std::env::split_paths(&path)
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())?;
    let dir = kubectl.canonicalize().ok()?.parent()?.to_path_buf();
    let mut versioned: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("kubectl.1."))
        })
        .collect();
    versioned.sort_by_key(|p| {
        let minor = p
            .extension()
            .and_then(|e| e.to_str())
            .and_then(|m| m.parse::<u32>().ok());
        std::cmp::Reverse(minor.unwrap_or(0))
    });
    versioned.into_iter().next()
}

/// A container the server serves: its streams, and how to exec into it.
struct Container {
    io: Arc<ContainerIo>,
    runc_root: PathBuf,
    id: String,
    log: PathBuf,
}

struct State {
    pods: Mutex<HashMap<String, HashMap<String, Container>>>,
    /// Live attach and exec streams, to cut them ([`ApiServer::drop_streams`]).
    streams: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// The running server. Dropping it cuts every stream and removes its containers.
pub struct ApiServer {
    // Dropped first: its tasks end before the containers go.
    rt: Option<tokio::runtime::Runtime>,
    state: Arc<State>,
    bundles: Mutex<Vec<(tokio::process::Child, Bundle)>>,
    dir: tempfile::TempDir,
}

impl ApiServer {
    /// Starts a server on a free loopback port.
    pub fn start() -> ApiServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the API server");
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let state = Arc::new(State {
            pods: Mutex::new(HashMap::new()),
            streams: Mutex::new(Vec::new()),
        });
        rt.spawn(accept_loop(listener, Arc::clone(&state)));
        let dir = tempfile::Builder::new()
            .prefix("tether-k8s")
            .tempdir()
            .expect("tempdir");
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{addr}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\n\
             current-context: test\nusers:\n- name: test\n  user: {{}}\n"
        );
        std::fs::write(dir.path().join("kubeconfig"), kubeconfig).expect("kubeconfig");
        ApiServer {
            rt: Some(rt),
            state,
            bundles: Mutex::new(Vec::new()),
            dir,
        }
    }

    /// The kubeconfig file that points kubectl at this server.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// `kubectl --kubeconfig FILE ARGS...`.
    pub fn kubectl<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(self.kubeconfig()).args(args);
        cmd
    }

    /// `kubectl ... ARGS` as one `sh -c` command line (for `--via`).
    pub fn kubectl_line(&self, args: &str) -> String {
        format!(
            "exec kubectl --kubeconfig {} {args}",
            crate::shell_quote(self.kubeconfig().as_os_str())
        )
    }

    /// Starts `bundle` as container `container` of pod `pod`, with `stdin: true` (its
    /// stdin a pipe that stays open), and serves it.
    pub fn run_container(&self, pod: &str, container: &str, bundle: Bundle) {
        let rt = self.rt.as_ref().expect("running");
        let mut cmd = tokio::process::Command::from(bundle.run_command());
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let _guard = rt.enter();
        let mut child = cmd.spawn().expect("runc run");
        let log = self.dir.path().join(format!("{pod}_{container}.log"));
        let io = ContainerIo::start(
            child.stdin.take().expect("stdin"),
            child.stdout.take().expect("stdout"),
            child.stderr.take().expect("stderr"),
            &log,
        );
        self.state
            .pods
            .lock()
            .unwrap()
            .entry(pod.to_owned())
            .or_default()
            .insert(
                container.to_owned(),
                Container {
                    io,
                    runc_root: bundle.runc_root().to_path_buf(),
                    id: bundle.id().to_owned(),
                    log,
                },
            );
        self.bundles.lock().unwrap().push((child, bundle));
    }

    /// The CRI log of a container (what `kubectl logs` shows), and its size so far.
    pub fn log(&self, pod: &str, container: &str) -> (PathBuf, u64) {
        let pods = self.state.pods.lock().unwrap();
        let c = &pods[pod][container];
        (c.log.clone(), c.io.log_bytes())
    }

    /// Cuts every attach and exec stream at once, without a close message, as an API
    /// server that restarts does. Containers go on.
    pub fn drop_streams(&self) -> usize {
        let handles: Vec<_> = std::mem::take(&mut *self.state.streams.lock().unwrap());
        let n = handles.iter().filter(|h| !h.is_finished()).count();
        for h in handles {
            h.abort();
        }
        n
    }

    /// How many attach and exec streams are open.
    pub fn open_streams(&self) -> usize {
        let mut streams = self.state.streams.lock().unwrap();
        streams.retain(|h| !h.is_finished());
        streams.len()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
        // The children (runc run) are killed on drop; each Bundle then deletes its
        // container.
        self.bundles.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    while let Ok((stream, _)) = listener.accept().await {
        // As Go's servers do: no Nagle delay on small WebSocket messages.
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream, Arc::clone(&state)));
    }
}

/// A parsed request head.
struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        self.query.iter().any(|(k, v)| k == name && v == "true")
    }
}

/// Reads a request head; returns it and the bytes read past it.
async fn read_head(stream: &mut TcpStream) -> Option<(Request, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let target = req.path?.to_owned();
                let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                let request = Request {
                    method: req.method?.to_owned(),
                    path: path.to_owned(),
                    query: query
                        .split('&')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
                        .collect(),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                        .collect(),
                };
                return Some((request, buf[len..].to_vec()));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            _ => return None,
        }
    }
}

/// A query value as Go's `url.Values` encodes it (`+` for a space, `%XX` escapes).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

async fn respond(mut stream: TcpStream, status: &str, body: &serde_json::Value) {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn not_found(what: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{what} not found"), "reason": "NotFound", "code": 404,
    })
}

async fn serve(mut stream: TcpStream, state: Arc<State>) {
    let Some((req, rest)) = read_head(&mut stream).await else {
        return;
    };
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["version"] => {
            let body =
                serde_json::json!({"major": "1", "minor": "32", "gitVersion": "v1.32.4", "platform": "linux/amd64"});
            respond(stream, "200 OK", &body).await;
        }
        ["api"] => {
            let body = serde_json::json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]});
            respond(stream, "200 OK", &body).await;
        }
        ["apis"] => {
            let body = serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []});
            respond(stream, "200 OK", &body).await;
        }
        ["api", "v1"] => {
            let resource = |name: &str, kind: &str, verbs: &[&str]| serde_json::json!({"name": name, "singularName": "", "namespaced": true, "kind": kind, "verbs": verbs});
            let body = serde_json::json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                resource("pods", "Pod", &["get", "list"]),
                resource("pods/attach", "PodAttachOptions", &["create", "get"]),
                resource("pods/exec", "PodExecOptions", &["create", "get"]),
                resource("pods/log", "Pod", &["get"]),
            ]});
            respond(stream, "200 OK", &body).await;
        }
        ["api", "v1", "namespaces", ns, "pods", pod] => {
            let containers: Option<Vec<String>> = state
                .pods
                .lock()
                .unwrap()
                .get(*pod)
                .map(|c| c.keys().cloned().collect());
            match containers {
                Some(mut names) => {
                    names.sort();
                    let specs: Vec<_> = names
                        .iter()
                        .map(|n| serde_json::json!({"name": n, "image": "tether", "stdin": true, "tty": false}))
                        .collect();
                    let statuses: Vec<_> = names
                        .iter()
                        .map(|n| serde_json::json!({"name": n, "ready": true, "state": {"running": {}}}))
                        .collect();
                    let body = serde_json::json!({"kind": "Pod", "apiVersion": "v1",
                        "metadata": {"name": pod, "namespace": ns},
                        "spec": {"containers": specs},
                        "status": {"phase": "Running", "containerStatuses": statuses}});
                    respond(stream, "200 OK", &body).await;
                }
                None => respond(stream, "404 Not Found", &not_found(&format!("pods \"{pod}\""))).await,
            }
        }
        ["api", "v1", "namespaces", _, "pods", pod, verb @ ("attach" | "exec")] => {
            let wants = Wants {
                stdin: req.flag("stdin"),
                stdout: req.flag("stdout"),
                stderr: req.flag("stderr"),
            };
            let container = req
                .query
                .iter()
                .find(|(k, _)| k == "container")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let found = state.pods.lock().unwrap().get(*pod).and_then(|c| {
                c.get(&container)
                    .map(|c| (Arc::clone(&c.io), c.runc_root.clone(), c.id.clone()))
            });
            let Some((io, runc_root, id)) = found else {
                let what = format!("container {container:?} of pod {pod:?}");
                return respond(stream, "404 Not Found", &not_found(&what)).await;
            };
            let upgrade = req
                .header("Upgrade")
                .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
            let protocol = req
                .header("Sec-WebSocket-Protocol")
                .and_then(|p| {
                    p.split(',')
                        .map(str::trim)
                        .find(|p| *p == "v5.channel.k8s.io" || *p == "v4.channel.k8s.io")
                })
                .map(str::to_owned);
            let (Some(key), Some(protocol), true, "GET") =
                (req.header("Sec-WebSocket-Key"), protocol, upgrade, req.method.as_str())
            else {
                // SPDY, kubectl's fallback, is not served.
                let body = serde_json::json!({"kind": "Status", "status": "Failure", "code": 400,
                    "message": "only WebSocket (v5.channel.k8s.io) is served here"});
                return respond(stream, "400 Bad Request", &body).await;
            };
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
            );
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let ws = stream::upgrade(stream, rest).await;
            let task = if *verb == "attach" {
                tokio::spawn(stream::attach(ws, io, wants))
            } else {
                let argv: Vec<String> = req
                    .query
                    .iter()
                    .filter(|(k, _)| k == "command")
                    .map(|(_, v)| v.clone())
                    .collect();
                let mut cmd = tokio::process::Command::new("runc");
                cmd.arg("--root").arg(&runc_root).arg("exec").arg(&id).args(argv);
                tokio::spawn(stream::exec(ws, cmd, wants))
            };
            state.streams.lock().unwrap().push(task.abort_handle());
            let _ = task.await;
        }
        _ => respond(stream, "404 Not Found", &not_found(&req.path)).await,
    }
}
