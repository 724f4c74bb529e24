//! One client session: the handshake, then one handler per request (as pueue does).
//!
//! A session begins with the client's preamble and ends at EOF, on a new preamble on
//! the same stream (takeover), or when the connection fails. Ending a session never
//! touches builds: they outlive their clients.
//!
//! A session may carry *sub-sessions*: a relay (`tether relay`) holds one session on
//! the daemon's stdin stream and serves many local clients through it, each as a
//! sub-session whose messages travel wrapped in `Sub` (PROTOCOL.md, "Relays"). A
//! sub-session is a session like any other, with its own queues; a forwarder wraps what
//! is queued for it into this session's queues, control into control and data into data,
//! so a sub-session's client that falls behind moves its build followers to the spool
//! like any other. Sub-sessions end with their `SubEnd`, or with this session.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::JoinHandle;

use tether_protocol::{
    self as wire, check_hello, BuildId, ClientMessage, DaemonMessage, ErrorKind, ErrorReport, Hello, RequestId,
};

use super::outbox::{outbox, Outbox, OutboxRx};
use super::shells::Shells;
use super::upload::{RouteError, UploadRoute};
use super::Daemon;

pub struct Session {
    pub id: u64,
    daemon: Arc<Daemon>,
    out: Outbox,
    /// Who the client is, once its Hello was accepted.
    greeted: Option<wire::Holder>,
    /// Uploads of this session's preparing runs, by the run's request id. Dropped with
    /// the session, which ends those uploads (and fails their runs).
    uploads: HashMap<RequestId, UploadRoute>,
    /// This session's shells, hung up when it ends.
    shells: Shells,
    /// The sub-sessions a relay serves through this session, by their number.
    subs: HashMap<u32, SubSession>,
}

/// A sub-session and the task that wraps its messages into its parent's queues.
struct SubSession {
    session: Box<Session>,
    forwarder: JoinHandle<()>,
}

impl Drop for SubSession {
    fn drop(&mut self) {
        // Its queues go with it: followers of its builds see the session gone.
        self.forwarder.abort();
    }
}

impl Session {
    pub fn new(id: u64, daemon: Arc<Daemon>, out: Outbox) -> Session {
        Session {
            id,
            daemon,
            out,
            greeted: None,
            uploads: HashMap::new(),
            shells: Shells::default(),
            subs: HashMap::new(),
        }
    }

    /// The client, once its Hello was accepted: who holds a stdin stream.
    pub fn holder(&self) -> Option<&wire::Holder> {
        self.greeted.as_ref()
    }

    /// Sends a heartbeat (dropped when the client is that far behind).
    pub fn ping(&self, nonce: u64) {
        self.out.try_control(DaemonMessage::Ping { nonce });
        for sub in self.subs.values() {
            sub.session.ping(nonce);
        }
    }

    /// Tells the client that the daemon is stopping (dropped when the client is so far
    /// behind that its control queue is full: its builds' ends still tell it).
    pub fn shutting_down(&self, reason: String) {
        self.out.try_control(DaemonMessage::ShuttingDown { reason });
    }

    /// Reports an error to the client.
    pub async fn error(&self, req: Option<RequestId>, build: Option<BuildId>, kind: ErrorKind, message: String) {
        self.out
            .control(DaemonMessage::Error(ErrorReport {
                req,
                build,
                kind,
                message,
            }))
            .await;
    }

    /// Handles one message.
    pub async fn handle(&mut self, msg: ClientMessage) {
        // Secrets show as `****` here: their wire type's Debug never holds a value.
        tracing::trace!(message = ?msg, "received");
        if self.greeted.is_none() && !matches!(msg, ClientMessage::Hello(_) | ClientMessage::Ping { .. }) {
            let message = "a message arrived before Hello; start the session with a preamble and Hello".to_owned();
            self.error(None, None, ErrorKind::NoSession, message).await;
            return;
        }
        match msg {
            ClientMessage::Hello(hello) => self.on_hello(hello).await,
            ClientMessage::Ping { nonce } => {
                self.out.control(DaemonMessage::Pong { nonce }).await;
            }
            ClientMessage::Pong { .. } => {}
            // The connection ends the session (see `super::connection`).
            ClientMessage::Goodbye => {}
            ClientMessage::Sub { sub, message } => Box::pin(self.on_sub(sub, &message)).await,
            ClientMessage::SubEnd { sub } => {
                if self.subs.remove(&sub).is_some() {
                    tracing::debug!(session = self.id, sub, "sub-session ended");
                }
            }
            ClientMessage::Run { req, spec, follow } => self.on_run(req, *spec, follow).await,
            ClientMessage::Attach {
                req,
                build,
                from,
                follow,
            } => {
                let out = self.out.clone();
                if let Err(e) = self.daemon.builds.attach(req, &build, from, follow, out).await {
                    self.out.control(DaemonMessage::Error(e)).await;
                }
            }
            ClientMessage::Stdin { build, offset, data } => {
                if let Err(e) = self.daemon.builds.stdin(&build, offset, data.into_vec()) {
                    self.out.control(DaemonMessage::Error(e)).await;
                }
            }
            ClientMessage::CloseStdin { build } => {
                if let Err(e) = self.daemon.builds.close_stdin(&build) {
                    self.out.control(DaemonMessage::Error(e)).await;
                }
            }
            ClientMessage::CloseOutput { build, stream } => {
                if let Err(e) = self.daemon.builds.close_output(self.id, &build, stream) {
                    self.out.control(DaemonMessage::Error(e)).await;
                }
            }
            ClientMessage::List { req, all } => {
                let builds = self.daemon.builds.summaries(all);
                self.out.control(DaemonMessage::Builds { req, builds }).await;
            }
            ClientMessage::Upload { req, index, data } => {
                let result = match self.uploads.get_mut(&req) {
                    Some(route) => route.data(index, data.into_vec()),
                    None => Err(RouteError::Closed),
                };
                self.on_route(req, result.map(|()| false)).await;
            }
            ClientMessage::UploadEnd {
                req,
                index,
                bytes,
                sha256,
            } => {
                let result = match self.uploads.get_mut(&req) {
                    Some(route) => route.end(index, bytes, sha256),
                    None => Err(RouteError::Closed),
                };
                self.on_route(req, result).await;
            }
            ClientMessage::Download { req, build, path } => {
                if let Err(e) = self.daemon.builds.download(req, &build, path, self.out.clone()) {
                    self.out.control(DaemonMessage::Error(e)).await;
                }
            }
            ClientMessage::Release { req, build, status } => match self.daemon.builds.release(req, &build, status) {
                Ok(()) => {
                    self.out.control(DaemonMessage::Ack { req }).await;
                }
                Err(e) => {
                    self.out.control(DaemonMessage::Error(e)).await;
                }
            },
            ClientMessage::OpenShell { req, spec } => {
                let out = self.out.clone();
                if let Err(e) = self.shells.open(&self.daemon.builds, req, spec, out).await {
                    tracing::info!(session = self.id, shell = req, error = %e.message, "shell not opened");
                    self.out.control(DaemonMessage::Error(e)).await;
                }
            }
            ClientMessage::ShellInput { shell, offset, data } => {
                let window = u64::from(self.daemon.limits.stdin_window);
                let result = self.shells.input(shell, offset, data.into_vec(), window);
                self.report(result).await;
            }
            ClientMessage::ShellInputEnd { shell } => {
                let result = self.shells.input_end(shell);
                self.report(result).await;
            }
            ClientMessage::ShellResize { shell, size } => {
                let result = self.shells.resize(shell, size);
                self.report(result).await;
            }
            ClientMessage::ShellHangUp { shell } => {
                let result = self.shells.hang_up(shell);
                self.report(result).await;
            }
            ClientMessage::Cancel { req, build, force } => match self.daemon.builds.cancel(req, &build, force) {
                Ok(()) => {
                    self.out.control(DaemonMessage::Ack { req }).await;
                }
                Err(e) => {
                    self.out.control(DaemonMessage::Error(e)).await;
                }
            },
        }
    }

    /// A message of sub-session `sub`, started by its first message.
    async fn on_sub(&mut self, sub: u32, message: &[u8]) {
        let msg = match wire::decode::<ClientMessage>(message) {
            Ok(ClientMessage::Sub { .. } | ClientMessage::SubEnd { .. }) => {
                let text = format!("sub-session {sub}: a sub-session cannot carry sub-sessions");
                self.error(None, None, ErrorKind::BadRequest, text).await;
                return;
            }
            Ok(msg) => msg,
            Err(e) => {
                let text = format!("sub-session {sub}: undecodable message skipped: {e}");
                self.error(None, None, ErrorKind::Protocol, text).await;
                return;
            }
        };
        // A message for a sub-session that just ended (`Goodbye`) starts none.
        if matches!(msg, ClientMessage::Goodbye) {
            self.subs.remove(&sub);
            self.out.control(DaemonMessage::SubEnd { sub }).await;
            return;
        }
        if !self.subs.contains_key(&sub) {
            let (out, rx) = outbox();
            let id = super::connection::next_session_id();
            tracing::debug!(session = self.id, sub, id, "sub-session started");
            let forwarder = tokio::spawn(forward_sub(sub, rx, self.out.clone()));
            let session = Box::new(Session::new(id, Arc::clone(&self.daemon), out));
            self.subs.insert(sub, SubSession { session, forwarder });
        }
        if let Some(s) = self.subs.get_mut(&sub) {
            s.session.handle(msg).await;
        }
    }

    async fn report(&self, result: Result<(), ErrorReport>) {
        if let Err(e) = result {
            self.out.control(DaemonMessage::Error(e)).await;
        }
    }

    async fn on_hello(&mut self, hello: Hello) {
        if let Err(mismatch) = check_hello(&hello, &self.daemon.version) {
            tracing::warn!(session = self.id, %mismatch, "refusing client");
            self.error(None, None, ErrorKind::VersionMismatch, mismatch.to_string())
                .await;
            return;
        }
        let nonce = hello.session().unwrap_or(0);
        tracing::debug!(session = self.id, client = %hello.client_version, nonce = format!("{nonce:016x}"), "session opened");
        self.greeted = Some(wire::Holder {
            session: nonce,
            client: format!("tether {}", hello.client_version.chars().take(40).collect::<String>()),
            since_ms: super::builds::now_ms(),
        });
        let welcome = wire::Welcome {
            protocol: wire::PROTOCOL_VERSION,
            daemon_version: self.daemon.version.clone(),
            capabilities: Vec::new(),
            limits: self.daemon.limits,
            builds: self.daemon.builds.summaries(false),
            session: nonce,
        };
        self.out.control(DaemonMessage::Welcome(welcome)).await;
    }

    /// After an upload piece: `Ok(true)` when the run's uploads are all in.
    async fn on_route(&mut self, req: RequestId, result: Result<bool, RouteError>) {
        match result {
            Ok(false) => {}
            Ok(true) => {
                self.uploads.remove(&req);
            }
            // The preparation already failed and said so; the rest of the upload is moot.
            Err(RouteError::Closed) => {
                self.uploads.remove(&req);
            }
            Err(e) => {
                // The upload is over: its run's preparation fails on the closed feed.
                self.uploads.remove(&req);
                tracing::warn!(session = self.id, req, error = %e, "upload refused");
                self.error(Some(req), None, ErrorKind::Protocol, e.to_string()).await;
            }
        }
    }

    async fn on_run(&mut self, req: RequestId, spec: wire::RunSpec, follow: bool) {
        match self
            .daemon
            .builds
            .start(self.id, req, &spec, follow, self.out.clone())
            .await
        {
            Ok(Some(route)) => {
                self.uploads.insert(req, route);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::info!(session = self.id, error = %e.message, "build not started");
                self.out.control(DaemonMessage::Error(e)).await;
            }
        }
    }
}

/// Wraps what is queued for sub-session `sub` into its parent's queues, control before
/// data, until the sub-session's queues are gone; then says the sub-session ended.
async fn forward_sub(sub: u32, mut rx: OutboxRx, parent: Outbox) {
    let wrap = |msg: &DaemonMessage| -> Option<DaemonMessage> {
        let mut frame = Vec::new();
        match crate::wire::push_frame(&mut frame, msg) {
            Ok(()) if frame.len() - wire::FRAME_HEADER_LEN <= wire::MAX_SUB_PAYLOAD => Some(DaemonMessage::Sub {
                sub,
                message: wire::Bytes::from(frame.split_off(wire::FRAME_HEADER_LEN)),
            }),
            _ => {
                tracing::warn!(sub, "a message too large for a sub-session was dropped");
                None
            }
        }
    };
    let mut data_open = true;
    loop {
        tokio::select! {
            biased;
            Some(msg) = rx.control.recv() => {
                if let Some(m) = wrap(&msg) {
                    if !parent.control(m).await {
                        return;
                    }
                }
            }
            msg = rx.data.recv(), if data_open => match msg {
                Some(msg) => {
                    if let Some(m) = wrap(&msg) {
                        if !parent.data(m).await {
                            return;
                        }
                    }
                }
                None => data_open = false,
            },
            else => break,
        }
    }
    parent.control(DaemonMessage::SubEnd { sub }).await;
}
