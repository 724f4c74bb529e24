//! A build's preparation: what must happen between its `Run` and its command's start.
//!
//! In order: the readiness gates open (the daemon's `serve --wait-for` ones and the
//! run's own, within the wait timeout), then the run's `--fetch` URLs are downloaded
//! into the work dir; the client's uploads stream in meanwhile. The command starts only
//! when all of it succeeded; anything failing fails the run with an error that names
//! the URL, the upload or the path, and the build's directory is thrown away whole.
//!
//! The daemon's own gates are polled by one task from start-up until each answered once
//! (they stay open after that); builds wait on its published state.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tether_executor::fetch::{FetchLimits, FetchRequest, Fetcher};
use tether_executor::gate::{self, Gate};
use tether_executor::transfer::UnpackLimits;
use tether_executor::Prepared;
use tether_protocol::{self as wire, ErrorKind, ErrorReport, RequestId};
use tokio::sync::watch;
use tokio::time::Instant;

use super::outbox::Outbox;
use super::upload::{self, Aborter, UploadFeed};

/// The state of the daemon's own gates.
#[derive(Debug, Clone, Default)]
pub struct GateStatus {
    /// Every gate answered once.
    pub open: bool,
    /// The first gate still closed and why, while not open.
    pub waiting: Option<(String, String)>,
}

/// Shared by every preparation.
pub struct PrepContext {
    /// Built on first use: loading the CA certificates costs start-up time and memory
    /// that a daemon whose builds never fetch should not pay (nor warn about an image
    /// without certificates).
    fetcher: std::sync::OnceLock<Result<Fetcher, String>>,
    fetch_limits: FetchLimits,
    pub daemon_gates: watch::Receiver<GateStatus>,
    /// How long a build waits for gates when its run names no timeout.
    pub wait_timeout: Duration,
    pub unpack: UnpackLimits,
}

impl PrepContext {
    /// The context, and the task polling `gates` (the daemon's own) until they open.
    pub fn new(
        fetch_limits: FetchLimits,
        gates: Vec<Gate>,
        wait_timeout: Duration,
        unpack: UnpackLimits,
    ) -> anyhow::Result<Arc<PrepContext>> {
        let (tx, rx) = watch::channel(GateStatus {
            open: gates.is_empty(),
            waiting: None,
        });
        let ctx = Arc::new(PrepContext {
            fetcher: std::sync::OnceLock::new(),
            fetch_limits,
            daemon_gates: rx,
            wait_timeout,
            unpack,
        });
        if !gates.is_empty() {
            let client = ctx.fetcher().map_err(anyhow::Error::msg)?.client().clone();
            tokio::spawn(poll_daemon_gates(client, gates, tx));
        }
        Ok(ctx)
    }

    /// The HTTP client and fetcher, built the first time one is needed.
    pub fn fetcher(&self) -> Result<&Fetcher, String> {
        self.fetcher
            .get_or_init(|| Fetcher::new(self.fetch_limits).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(Clone::clone)
    }
}

async fn poll_daemon_gates(client: reqwest::Client, gates: Vec<Gate>, tx: watch::Sender<GateStatus>) {
    let mut open = vec![false; gates.len()];
    let mut pause = Duration::from_millis(100);
    loop {
        let mut waiting = None;
        for (i, g) in gates.iter().enumerate() {
            if open[i] {
                continue;
            }
            match gate::probe(&client, g).await {
                Ok(()) => {
                    tracing::info!(gate = g.describe(), "readiness gate open");
                    open[i] = true;
                }
                Err(reason) => {
                    if waiting.is_none() {
                        waiting = Some((g.describe().to_owned(), reason));
                    }
                }
            }
        }
        let done = waiting.is_none();
        tx.send_replace(GateStatus { open: done, waiting });
        if done {
            tracing::info!("every readiness gate of the daemon is open");
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(gate::MAX_BACKOFF);
    }
}

/// What one run asks to be done before its command starts.
pub struct Plan {
    pub gates: Vec<Gate>,
    pub wait_timeout: Option<Duration>,
    pub fetches: Vec<FetchRequest>,
    /// The upload feed and the destinations, one per upload.
    pub uploads: Option<(UploadFeed, Aborter, Vec<PathBuf>)>,
}

impl Plan {
    /// The plan of `spec`; a request error when a gate or a fetch is malformed.
    pub fn of(spec: &wire::RunSpec, req: RequestId) -> Result<Plan, ErrorReport> {
        let bad = |message: String| ErrorReport {
            req: Some(req),
            build: None,
            kind: ErrorKind::BadRequest,
            message,
        };
        let gates = spec
            .wait_for
            .iter()
            .map(|g| Gate::parse(g))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        let fetches = spec
            .fetches
            .iter()
            .map(|f| FetchRequest {
                url: f.url.clone(),
                sha256: f.sha256,
                dest: super::convert::path(&f.dest),
            })
            .collect();
        Ok(Plan {
            gates,
            wait_timeout: spec.wait_timeout_ms.map(Duration::from_millis),
            fetches,
            uploads: None,
        })
    }
}

/// Stops the upload thread when the preparation ends early (dropped or failed).
struct AbortOnDrop(Option<Aborter>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(a) = self.0.take() {
            a.abort();
        }
    }
}

fn failure(req: RequestId, kind: ErrorKind, message: String) -> ErrorReport {
    ErrorReport {
        req: Some(req),
        build: None,
        kind,
        message,
    }
}

/// Carries out `plan` for `prepared`; the command may start when this returns `Ok`.
pub async fn run(
    ctx: &PrepContext,
    prepared: &Prepared,
    plan: Plan,
    req: RequestId,
    out: &Outbox,
) -> Result<(), ErrorReport> {
    let work = prepared.work_dir().to_path_buf();
    let id = prepared.id().to_owned();
    let mut guard = AbortOnDrop(None);
    let uploads = plan.uploads.map(|(feed, aborter, dests)| {
        guard.0 = Some(aborter);
        let out = out.clone();
        let work = work.clone();
        let limits = ctx.unpack;
        tokio::task::spawn_blocking(move || upload::receive_all(feed, &work, &dests, limits, req, &out))
    });
    let deadline = Instant::now() + plan.wait_timeout.unwrap_or(ctx.wait_timeout);
    let before_command = async {
        wait_for_daemon_gates(ctx, deadline, req).await?;
        if plan.gates.is_empty() && plan.fetches.is_empty() {
            return Ok(());
        }
        let fetcher = ctx
            .fetcher()
            .map_err(|e| failure(req, ErrorKind::Internal, format!("HTTP is not available: {e}")))?;
        if !plan.gates.is_empty() {
            gate::wait_all(fetcher.client(), &plan.gates, deadline, |g, reason| {
                tracing::info!(build = %id, gate = g.describe(), reason, "waiting for a readiness gate");
            })
            .await
            .map_err(|e| failure(req, ErrorKind::NotReady, e.to_string()))?;
        }
        for f in &plan.fetches {
            let report = fetcher
                .fetch(f, &work)
                .await
                .map_err(|e| failure(req, ErrorKind::Transfer, format!("fetch failed: {e}")))?;
            tracing::info!(build = %id, url = %f.url, bytes = report.bytes, path = %report.path.display(), "fetched");
        }
        Ok::<(), ErrorReport>(())
    };
    let uploaded = async {
        match uploads {
            None => Ok(()),
            Some(handle) => match handle.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(failure(req, ErrorKind::Transfer, e.to_string())),
                Err(e) => Err(failure(
                    req,
                    ErrorKind::Internal,
                    format!("the upload task failed: {e}"),
                )),
            },
        }
    };
    // The first failure wins; the other side is dropped (the upload thread is aborted).
    tokio::try_join!(before_command, uploaded)?;
    guard.0 = None;
    Ok(())
}

async fn wait_for_daemon_gates(ctx: &PrepContext, deadline: Instant, req: RequestId) -> Result<(), ErrorReport> {
    let mut rx = ctx.daemon_gates.clone();
    let waited = Instant::now();
    let opened = tokio::time::timeout_at(deadline, rx.wait_for(|s| s.open)).await;
    match opened {
        Ok(Ok(_)) => Ok(()),
        // The polling task ended without opening: cannot happen (it only returns open).
        Ok(Err(_)) => Err(failure(req, ErrorKind::Internal, "the readiness gates stopped".into())),
        Err(_) => {
            let (url, reason) = ctx
                .daemon_gates
                .borrow()
                .waiting
                .clone()
                .unwrap_or_else(|| ("a readiness gate".into(), "no answer yet".into()));
            Err(failure(
                req,
                ErrorKind::NotReady,
                format!(
                    "{url} not ready after {}: {reason} (a readiness gate of the daemon, serve --wait-for)",
                    humantime::format_duration(Duration::from_secs(waited.elapsed().as_secs()))
                ),
            ))
        }
    }
}
