//! Readiness gates: a build's command starts only once every gate opened
//! (`tether run --wait-for URL`, and the daemon's own gates).
//!
//! Why this exists: in a pod, a build container often starts next to a
//! service it needs (a registry sidecar, a database), and starting the build
//! before that service listens turns into a flaky failure. A gate is checked
//! from the daemon, next to the build, before its command is spawned, so the
//! build script needs no retry loop of its own.
//!
//! A [`Gate`] is
//! - `http://...` or `https://...`: open when a GET is answered with a 2xx
//!   status (redirects followed); any other status keeps it closed
//!   (`HTTP 503 Service Unavailable`);
//! - `tcp://host:port` (`tcp://[::1]:port` for IPv6): open when a TCP
//!   connection is accepted (and closed again at once).
//!
//! [`probe`] makes one attempt, bounded by [`PROBE_TIMEOUT`]. [`wait_all`]
//! probes every gate that is still closed, then waits (100 ms, doubling up to
//! 2 s) and probes again, until each gate was found open once (a gate that
//! opened stays open: a service that answered once is up, and a later blip is
//! the build's business) or the deadline passes. Its [`GateError`] names the
//! first gate still closed, its last error and how long it waited:
//! `http://localhost:5000/v2/ not ready after 2m: connection refused`.
//!
//! HTTP gates use the client shared with [`crate::fetch`] (see
//! [`crate::fetch::http_client`]: rustls with the system roots, hickory-dns).
//! TCP gates resolve host names with hickory-dns too (`/etc/hosts`, then the
//! name servers of `/etc/resolv.conf` with its search domains; `localhost` is
//! 127.0.0.1 and ::1, also without `/etc/hosts`), never through glibc's NSS,
//! and try each address in turn, IPv4 first.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::ResolverConfig;
use hickory_resolver::TokioResolver;
use reqwest::Url;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::fetch::{cause, error_chain, io_reason};

/// How long one probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait between the first rounds of probes; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two rounds of probes.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One readiness gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// An `http://` or `https://` URL that must answer 2xx.
    Http(String),
    /// A TCP port that must accept a connection; `spec` is the text parsed.
    Tcp { host: String, port: u16, spec: String },
}

impl Gate {
    /// Parses `http://...`, `https://...` or `tcp://host:port`.
    pub fn parse(s: &str) -> Result<Gate, String> {
        let scheme_end = s.find("://").ok_or_else(|| gate_syntax(s))?;
        match s[..scheme_end].to_ascii_lowercase().as_str() {
            "http" | "https" => {
                let url = Url::parse(s).map_err(|e| format!("bad readiness gate {s:?}: {e}"))?;
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(format!("bad readiness gate {s:?}: no host"));
                }
                Ok(Gate::Http(s.to_owned()))
            }
            "tcp" => {
                let rest = &s[scheme_end + 3..];
                let rest = rest.strip_suffix('/').unwrap_or(rest);
                let bad = |why: &str| format!("bad readiness gate {s:?}: {why} (expected tcp://host:port)");
                let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
                let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
                if port == 0 {
                    return Err(bad("port 0"));
                }
                let host = match host.strip_prefix('[') {
                    Some(v6) => {
                        let v6 = v6.strip_suffix(']').ok_or_else(|| bad("unclosed '['"))?;
                        v6.parse::<Ipv6Addr>().map_err(|_| bad("bad IPv6 address"))?;
                        v6
                    }
                    None if host.is_empty() => return Err(bad("no host")),
                    None if host.contains(|c: char| c.is_whitespace() || "/@[]:?#".contains(c)) => {
                        return Err(bad("bad host"))
                    }
                    None => host,
                };
                Ok(Gate::Tcp {
                    host: host.to_owned(),
                    port,
                    spec: s.to_owned(),
                })
            }
            _ => Err(gate_syntax(s)),
        }
    }

    /// The text the gate was parsed from.
    pub fn describe(&self) -> &str {
        match self {
            Gate::Http(url) => url,
            Gate::Tcp { spec, .. } => spec,
        }
    }
}

fn gate_syntax(s: &str) -> String {
    format!("bad readiness gate {s:?}: expected http://..., https://... or tcp://host:port")
}

/// A gate did not open before the deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{url} not ready after {}: {last_error}", humantime::format_duration(rounded(*waited)))]
pub struct GateError {
    /// The first gate still closed, as given.
    pub url: String,
    /// Why its last probe failed.
    pub last_error: String,
    /// How long [`wait_all`] waited.
    pub waited: Duration,
}

/// Whole seconds from one second on, whole milliseconds below.
fn rounded(d: Duration) -> Duration {
    if d >= Duration::from_secs(1) {
        Duration::from_secs(d.as_secs() + u64::from(d.subsec_millis() >= 500))
    } else {
        Duration::from_millis(d.as_millis() as u64)
    }
}

/// One attempt at `gate`, bounded by [`PROBE_TIMEOUT`]: `Ok` when it is open,
/// otherwise why not (`HTTP 503 Service Unavailable`, `connection refused`,
/// `timed out`, ...).
pub async fn probe(client: &reqwest::Client, gate: &Gate) -> Result<(), String> {
    match gate {
        Gate::Http(url) => {
            let response = client
                .get(url.as_str())
                .timeout(PROBE_TIMEOUT)
                .send()
                .await
                .map_err(|e| reqwest_reason(&e))?;
            let status = response.status();
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("HTTP {status}"))
            }
        }
        Gate::Tcp { host, port, .. } => match tokio::time::timeout(PROBE_TIMEOUT, connect(host, *port)).await {
            Ok(result) => result,
            Err(_) => Err("timed out".into()),
        },
    }
}

/// Probes every closed gate, again and again with backoff, until each one
/// was found open once, or `deadline` passes (a probe running then is cut
/// short). `on_wait(gate, reason)` is called the first time each gate is
/// found closed (for a log line).
pub async fn wait_all(
    client: &reqwest::Client,
    gates: &[Gate],
    deadline: Instant,
    mut on_wait: impl FnMut(&Gate, &str),
) -> Result<(), GateError> {
    let start = Instant::now();
    let mut open = vec![false; gates.len()];
    let mut last_error: Vec<Option<String>> = vec![None; gates.len()];
    let mut backoff = FIRST_BACKOFF;
    loop {
        for (i, gate) in gates.iter().enumerate() {
            if open[i] {
                continue;
            }
            match tokio::time::timeout_at(deadline, probe(client, gate)).await {
                Ok(Ok(())) => open[i] = true,
                Ok(Err(reason)) => {
                    if last_error[i].is_none() {
                        on_wait(gate, &reason);
                    }
                    last_error[i] = Some(reason);
                }
                Err(_) => break,
            }
        }
        let Some(closed) = open.iter().position(|o| !o) else {
            return Ok(());
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(GateError {
                url: gates[closed].describe().to_owned(),
                last_error: last_error[closed]
                    .take()
                    .unwrap_or_else(|| "no answer before the deadline".into()),
                waited: now - start,
            });
        }
        tokio::time::sleep_until((now + backoff).min(deadline)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Why a request failed, short: `timed out`, or the innermost cause
/// (`connection refused`).
fn reqwest_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else {
        cause(e)
    }
}

/// Connects to `host:port`, trying each address; the error of the last.
async fn connect(host: &str, port: u16) -> Result<(), String> {
    let mut last = String::from("no address");
    for ip in resolve(host).await? {
        match TcpStream::connect(SocketAddr::new(ip, port)).await {
            Ok(_) => return Ok(()),
            Err(e) => last = io_reason(&e),
        }
    }
    Err(last)
}

/// The addresses of `host` (an IP address, `localhost`, or a name looked up
/// by hickory-dns), IPv4 first.
async fn resolve(host: &str) -> Result<Vec<IpAddr>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let bare = host.strip_suffix('.').unwrap_or(host);
    if bare.eq_ignore_ascii_case("localhost") {
        return Ok(vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]);
    }
    // A resolver per lookup: it reads /etc/resolv.conf and /etc/hosts again
    // (cheap, and picks up changes), and holds no task on any runtime after.
    // Without a readable /etc/resolv.conf, names in /etc/hosts still resolve.
    let builder = TokioResolver::builder_tokio().unwrap_or_else(|_| {
        TokioResolver::builder_with_config(ResolverConfig::from_name_servers(Vec::new()), Default::default())
    });
    let resolver = builder
        .build()
        .map_err(|e| format!("cannot resolve {host}: {}", error_chain(&e)))?;
    let lookup = resolver
        .lookup_ip(host)
        .await
        .map_err(|e| format!("cannot resolve {host}: {}", error_chain(&e)))?;
    let mut ips: Vec<IpAddr> = lookup.iter().collect();
    ips.sort_by_key(|ip| ip.is_ipv6());
    if ips.is_empty() {
        return Err(format!("cannot resolve {host}: no address"));
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::http_client;
    use crate::fetch::test_server::{Reply, TestServer};
    use std::net::TcpListener;

    fn client() -> reqwest::Client {
        http_client(Duration::from_secs(2), Duration::from_secs(5)).unwrap()
    }

    /// A port on 127.0.0.1 nothing listens on (bound, then released).
    fn closed_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn deadline_in(d: Duration) -> Instant {
        Instant::now() + d
    }

    #[test]
    fn parses_gates() {
        let http = Gate::parse("http://localhost:5000/v2/").unwrap();
        assert_eq!(http, Gate::Http("http://localhost:5000/v2/".into()));
        assert_eq!(http.describe(), "http://localhost:5000/v2/");
        assert!(matches!(
            Gate::parse("HTTPS://registry.example/health?x=1"),
            Ok(Gate::Http(_))
        ));
        let tcp = Gate::parse("tcp://db:5432").unwrap();
        assert_eq!(
            tcp,
            Gate::Tcp {
                host: "db".into(),
                port: 5432,
                spec: "tcp://db:5432".into()
            }
        );
        assert_eq!(tcp.describe(), "tcp://db:5432");
        assert!(matches!(Gate::parse("tcp://[::1]:80/"), Ok(Gate::Tcp { ref host, port: 80, .. }) if host == "::1"));
        assert!(matches!(Gate::parse("tcp://10.0.0.1:1"), Ok(Gate::Tcp { ref host, .. }) if host == "10.0.0.1"));
        for (bad, why) in [
            ("localhost:5000", "expected http"),
            ("ftp://h/", "expected http"),
            ("http://", "bad readiness gate"),
            ("tcp://db", "no port"),
            ("tcp://db:", "bad port"),
            ("tcp://db:70000", "bad port"),
            ("tcp://db:0", "port 0"),
            ("tcp://:80", "no host"),
            ("tcp://[::1:80", "unclosed"),
            ("tcp://[nope]:80", "bad IPv6"),
            ("tcp://a/b:80", "bad host"),
            ("tcp://u@h:80", "bad host"),
            ("tcp://::1:80", "bad host"),
        ] {
            let err = Gate::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn tcp_gate_opens_when_a_listener_appears() {
        let port = closed_port();
        let gate = Gate::parse(&format!("tcp://127.0.0.1:{port}")).unwrap();
        assert_eq!(probe(&client(), &gate).await, Err("connection refused".into()));
        let mut listener = None;
        let mut waits = Vec::new();
        wait_all(
            &client(),
            std::slice::from_ref(&gate),
            deadline_in(Duration::from_secs(10)),
            |g, why| {
                waits.push((g.describe().to_owned(), why.to_owned()));
                // Open the port only once the gate was found closed.
                listener = Some(TcpListener::bind(("127.0.0.1", port)).unwrap());
            },
        )
        .await
        .unwrap();
        assert_eq!(waits, [(gate.describe().to_owned(), "connection refused".to_owned())]);
        assert!(listener.is_some());
    }

    #[tokio::test]
    async fn tcp_gate_resolves_localhost() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let gate = Gate::parse(&format!("tcp://localhost:{}", listener.local_addr().unwrap().port())).unwrap();
        assert_eq!(probe(&client(), &gate).await, Ok(()));
    }

    #[tokio::test]
    async fn http_gate_waits_for_2xx() {
        let server = TestServer::start(vec![(
            "/ready",
            vec![Reply::status(503), Reply::status(404), Reply::ok(b"ok")],
        )]);
        // By name: resolved by hickory-dns.
        let gate = Gate::parse(&format!("http://localhost:{}/ready", server.port())).unwrap();
        let mut waits = Vec::new();
        wait_all(&client(), &[gate], deadline_in(Duration::from_secs(10)), |_, why| {
            waits.push(why.to_owned())
        })
        .await
        .unwrap();
        assert_eq!(waits, ["HTTP 503 Service Unavailable"]);
        assert_eq!(server.hits("/ready"), 3);
    }

    #[tokio::test]
    async fn open_gates_stay_open() {
        let server = TestServer::start(vec![
            ("/once", vec![Reply::ok(b"ok"), Reply::status(500)]),
            ("/later", vec![Reply::status(503), Reply::status(503), Reply::ok(b"ok")]),
        ]);
        let gates = [
            Gate::parse(&server.url("/once")).unwrap(),
            Gate::parse(&server.url("/later")).unwrap(),
        ];
        let mut waits = 0;
        wait_all(&client(), &gates, deadline_in(Duration::from_secs(10)), |_, _| {
            waits += 1
        })
        .await
        .unwrap();
        assert_eq!(waits, 1);
        assert_eq!((server.hits("/once"), server.hits("/later")), (1, 3));
    }

    #[tokio::test]
    async fn deadline_names_the_first_closed_gate() {
        let server = TestServer::start(vec![("/up", vec![Reply::ok(b"ok")])]);
        let port = closed_port();
        let gates = [
            Gate::parse(&server.url("/up")).unwrap(),
            Gate::parse(&format!("http://127.0.0.1:{port}/v2/")).unwrap(),
            Gate::parse(&format!("tcp://127.0.0.1:{port}")).unwrap(),
        ];
        let start = Instant::now();
        let err = wait_all(&client(), &gates, deadline_in(Duration::from_millis(400)), |_, _| {})
            .await
            .unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(400));
        assert_eq!(err.url, format!("http://127.0.0.1:{port}/v2/"));
        assert_eq!(err.last_error, "connection refused");
        assert!(err.waited >= Duration::from_millis(400) && err.waited < Duration::from_secs(3));
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("http://127.0.0.1:{port}/v2/ not ready after ")),
            "{text}"
        );
        assert!(text.ends_with(": connection refused"), "{text}");
    }

    #[test]
    fn gate_error_display() {
        let err = GateError {
            url: "http://localhost:5000/v2/".into(),
            last_error: "connection refused".into(),
            waited: Duration::from_millis(120_300),
        };
        assert_eq!(
            err.to_string(),
            "http://localhost:5000/v2/ not ready after 2m: connection refused"
        );
        let err = GateError {
            waited: Duration::from_micros(1_500_900),
            ..err
        };
        assert_eq!(
            err.to_string(),
            "http://localhost:5000/v2/ not ready after 2s: connection refused"
        );
        let err = GateError {
            waited: Duration::from_micros(250_900),
            ..err
        };
        assert_eq!(
            err.to_string(),
            "http://localhost:5000/v2/ not ready after 250ms: connection refused"
        );
    }
}
