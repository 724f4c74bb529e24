//! Fairness and bounded memory: a client that stops reading holds no memory in the daemon
//! and does not slow the build; a build flooding output delays neither pings nor another
//! build's output nor a cancel; a session that is taken over loses its subscriptions and
//! nothing else.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration_tests::DaemonLink;
use integration_tests::{
    frame, hello_message, script_spec, signal, tether, wait_child, wait_until, Collector, Proc, Serve, TIMEOUT,
};
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use tether_protocol::{
    decode, BuildId, BuildState, ClientMessage, DaemonMessage, Decoded, ExitStatus, FrameDecoder, RunSpec, PREAMBLE,
};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A pipe whose ends are close-on-exec, so that no other child inherits them (a stray
/// write end elsewhere would keep the reader from ever seeing EOF). Returns (read, write).
fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe2")
}

/// Reads `fd` to its end on a thread, keeping nothing: (bytes read, whether all were 0).
fn count_bytes(fd: OwnedFd) -> JoinHandle<(u64, bool)> {
    std::thread::spawn(move || {
        let mut f = File::from(fd);
        let mut buf = vec![0u8; MIB as usize];
        let zero = vec![0u8; MIB as usize];
        let (mut n, mut zeros) = (0u64, true);
        loop {
            match f.read(&mut buf) {
                Ok(0) => return (n, zeros),
                Ok(k) => {
                    n += k as u64;
                    // A slice comparison is a memcmp, fast even in an unoptimised test
                    // build that reads gigabytes.
                    zeros = zeros && buf[..k] == zero[..k];
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("reading a client's stdout: {e}"),
            }
        }
    })
}

/// Starts `cmd` with its stdout on a new pipe whose read end is returned unread; stderr
/// is collected. (Not [`Proc::spawn`]'s collector: gigabytes must not be kept.)
fn spawn_with_pipe(mut cmd: Command) -> (Proc, OwnedFd) {
    let (r, w) = pipe();
    cmd.stdin(Stdio::null()).stdout(Stdio::from(w));
    let p = Proc::spawn_with(&mut cmd, false);
    // Dropping the command closes our copy of the write end: only the child holds it.
    drop(cmd);
    (p, r)
}

/// A daemon serving on `<dir>/tether.sock` (its stdin kept open by the test).
fn serve_socket(dir: &Path, extra: &[&str]) -> (Serve, String) {
    let mut args = vec!["--log-level", "warn"];
    args.extend_from_slice(extra);
    let (serve, sock) = integration_tests::serve_socket(dir, &args);
    (serve, sock.to_str().unwrap().to_owned())
}

/// The `state` of build `id` in `tether ps --all --json`, if listed.
fn ps_state(sock: &str, id: &str) -> Option<String> {
    let mut cmd = tether(["ps", "--socket", sock, "--all", "--json"]);
    cmd.stdin(Stdio::null());
    let r = Proc::spawn(&mut cmd).finish(TIMEOUT);
    assert_eq!(r.code(), 0, "tether ps failed: {}", r.stderr_text());
    r.stdout_text().lines().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("ps line {l:?}: {e}"));
        (v["build"] == id).then(|| v["state"].as_str().unwrap_or_default().to_owned())
    })
}

/// `(VmHWM, VmRSS)` of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc/PID/status");
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).expect(name);
        line[name.len()..].split_whitespace().next().unwrap().parse().unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

// ---------------------------------------------------------------------------------------
// A stalled reader
// ---------------------------------------------------------------------------------------

#[test]
fn a_stalled_reader_holds_no_memory_and_does_not_block_the_build() {
    const SIZE: u64 = 2 * GIB;
    let dir = tempfile::tempdir().unwrap();
    let (mut serve, sock) = serve_socket(dir.path(), &["--quota-build", "3GiB", "--quota-total", "3GiB"]);
    let script = format!("head -c {SIZE} /dev/zero; echo done >&2");

    // The client's stdout is a pipe nobody reads: it blocks after the pipe's 64 KiB.
    let mut run = tether(["run", "--socket", &sock, "--id", "big", "--sh", &script]);
    run.stdin(Stdio::null());
    let (mut stalled, stalled_out) = spawn_with_pipe(run);

    // The build is paced by the disk, not by its stalled follower: it finishes.
    let t0 = Instant::now();
    let mut state = None;
    let finished = wait_until(Duration::from_secs(120), || {
        state = ps_state(&sock, "big");
        std::thread::sleep(Duration::from_millis(200));
        state.as_deref() == Some("exited")
    });
    let build_time = t0.elapsed();
    assert!(
        finished,
        "the build did not finish while its client stalled (state {state:?}); daemon stderr: {}",
        serve.stderr.text()
    );
    assert!(
        stalled.child.try_wait().unwrap().is_none(),
        "the stalled client ended early; stderr: {}",
        stalled.stderr.text()
    );
    let (hwm, rss) = memory_kib(serve.pid());
    eprintln!(
        "2 GiB build with a stalled follower finished in {:.1} s; daemon VmHWM {hwm} KiB, VmRSS {rss} KiB",
        build_time.as_secs_f64()
    );
    assert!(
        hwm < 64 * 1024,
        "the daemon's peak RSS was {hwm} KiB with a stalled follower (bound 64 MiB)"
    );

    // The whole output was retained, and replays.
    let mut logs = tether(["logs", "--socket", &sock, "big"]);
    logs.stdin(Stdio::null());
    let (logs, logs_out) = spawn_with_pipe(logs);
    let logs_count = count_bytes(logs_out);
    let t1 = Instant::now();
    let logs = logs.finish(Duration::from_secs(180));
    let (n, zeros) = logs_count.join().unwrap();
    eprintln!("logs replayed {n} bytes in {:.1} s", t1.elapsed().as_secs_f64());
    assert_eq!(logs.code(), 0, "tether logs: {}", logs.stderr_text());
    assert_eq!(n, SIZE, "tether logs printed {n} bytes");
    assert!(zeros, "tether logs printed something other than the build's zeros");
    assert_eq!(logs.stderr_text(), "done\n");

    // The stalled client, once read, delivers everything and the build's status.
    let stalled_count = count_bytes(stalled_out);
    let status = stalled
        .wait_timeout(Duration::from_secs(180))
        .expect("the stalled client never finished once drained");
    let (n, zeros) = stalled_count.join().unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {}", stalled.stderr.text());
    assert_eq!(n, SIZE, "the stalled client delivered {n} bytes");
    assert!(zeros, "the stalled client delivered something other than zeros");
    assert!(
        stalled.stderr.wait_contains(Duration::from_secs(5), "done\n"),
        "stderr: {}",
        stalled.stderr.text()
    );
    let (hwm, _) = memory_kib(serve.pid());
    assert!(hwm < 64 * 1024, "the daemon's peak RSS reached {hwm} KiB");

    signal(serve.pid(), Signal::SIGTERM);
    let st = serve.wait_timeout(Duration::from_secs(10)).expect("exits on SIGTERM");
    assert_eq!(st.code(), Some(0), "daemon stderr: {}", serve.stderr.text());
    // `dir` (with the 2 GiB spool) is removed here.
}

// ---------------------------------------------------------------------------------------
// A flooding build
// ---------------------------------------------------------------------------------------

/// What the reader thread saw, stamped when it was decoded.
struct Seen {
    at: Instant,
    wall: SystemTime,
    msg: DaemonMessage,
}

/// A `tether serve` on a pipe with a reader thread that decodes as fast as it can and
/// stamps each message on arrival: output of `flood` is only counted, everything else is
/// passed on. (The `Serve` helper hands every frame to the test thread, which would
/// time messages when the test gets to them rather than when they arrived.)
struct FloodClient {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stderr: Collector,
    seen: mpsc::Receiver<Seen>,
    flood_bytes: Arc<AtomicU64>,
    /// Every Exited that [`FloodClient::wait_for`] went past.
    exits: Vec<(Instant, tether_protocol::Exited)>,
}

impl FloodClient {
    fn spawn(state: &Path, flood: &BuildId) -> FloodClient {
        let mut cmd = tether(["serve", "--exit-on-eof", "--log-level", "warn"]);
        cmd.arg("--state-dir")
            .arg(state)
            // The flood runs for seconds at full speed: keep its disk use small.
            .args(["--quota-build", "128MiB", "--quota-total", "256MiB"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot spawn tether serve");
        let mut out = child.stdout.take().unwrap();
        let stderr = Collector::spawn(child.stderr.take().unwrap());
        let stdin = child.stdin.take();
        let (tx, seen) = mpsc::channel();
        let flood_bytes = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&flood_bytes);
        let flood = flood.clone();
        std::thread::spawn(move || {
            let mut dec = FrameDecoder::new();
            loop {
                let n = match out.read(dec.read_buf()) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                dec.commit(n);
                while let Some(item) = dec.decode() {
                    let payload = match item {
                        Decoded::Preamble => continue,
                        Decoded::Frame(p) => p,
                        Decoded::Corrupt(c) => panic!("damaged stream from the daemon: {c}"),
                    };
                    let msg = decode::<DaemonMessage>(payload).expect("undecodable frame from the daemon");
                    match &msg {
                        DaemonMessage::Output { build, data, .. } if *build == flood => {
                            counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                        DaemonMessage::Gap { build, from, to, .. } if *build == flood => {
                            counter.fetch_add(to - from, Ordering::Relaxed);
                        }
                        _ => {
                            let seen = Seen {
                                at: Instant::now(),
                                wall: SystemTime::now(),
                                msg,
                            };
                            if tx.send(seen).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        FloodClient {
            child,
            stdin,
            stderr,
            seen,
            flood_bytes,
            exits: Vec::new(),
        }
    }

    fn send(&mut self, msg: &ClientMessage) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin.write_all(&frame(msg)).expect("writing to tether serve");
    }

    fn flood_bytes(&self) -> u64 {
        self.flood_bytes.load(Ordering::Relaxed)
    }

    /// The next message that `pick` accepts (others are skipped), with its arrival time.
    fn wait_for<T>(&mut self, timeout: Duration, mut pick: impl FnMut(&Seen) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let seen = self.seen.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "nothing expected from tether serve within {timeout:?}; stderr:\n{}",
                    self.stderr.text()
                )
            });
            if let DaemonMessage::Error(e) = &seen.msg {
                panic!("the daemon reported an error: {e:?}");
            }
            if let DaemonMessage::Exited(e) = &seen.msg {
                self.exits.push((seen.at, e.clone()));
            }
            if let Some(t) = pick(&seen) {
                return t;
            }
        }
    }
}

impl Drop for FloodClient {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn a_flooding_build_does_not_delay_pings_or_a_quiet_build() {
    let state = tempfile::tempdir().unwrap();
    let flood = BuildId("flood".into());
    let quiet = BuildId("quiet".into());
    let mut c = FloodClient::spawn(state.path(), &flood);
    let mut hello = PREAMBLE.to_vec();
    hello.extend_from_slice(&frame(&hello_message()));
    c.stdin.as_mut().unwrap().write_all(&hello).unwrap();
    c.wait_for(TIMEOUT, |s| matches!(s.msg, DaemonMessage::Welcome(_)).then_some(()));

    let with_id = |script: &str, id: &BuildId| RunSpec {
        id: Some(id.0.clone()),
        ..script_spec(script)
    };
    c.send(&ClientMessage::Run {
        req: 1,
        spec: Box::new(with_id("exec cat /dev/zero", &flood)),
        follow: true,
    });
    c.wait_for(TIMEOUT, |s| {
        matches!(&s.msg, DaemonMessage::Started(st) if st.build == flood).then_some(())
    });
    assert!(
        wait_until(TIMEOUT, || c.flood_bytes() >= 16 * MIB),
        "the flood's output does not arrive"
    );

    // Each line: the wall clock (ns since the epoch) when it was printed.
    const LINES: usize = 60;
    let quiet_script = format!("i=0; while [ $i -lt {LINES} ]; do date +%s%N; sleep 0.05; i=$((i+1)); done");
    c.send(&ClientMessage::Run {
        req: 2,
        spec: Box::new(with_id(&quiet_script, &quiet)),
        follow: true,
    });

    let flood_start = (Instant::now(), c.flood_bytes());
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut rtts_ms: Vec<f64> = Vec::new();
    let mut delays_ms: Vec<f64> = Vec::new();
    let mut partial: Vec<u8> = Vec::new();
    let mut quiet_exit = None;
    let mut nonce = 0u64;
    let mut next_ping = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Ping every 20 ms until the quiet build has ended and every ping was answered.
    while quiet_exit.is_none() || !sent.is_empty() {
        let now = Instant::now();
        assert!(
            now < deadline,
            "the quiet build or pongs did not arrive: exit {quiet_exit:?}, {} lines, {} pongs outstanding; stderr:\n{}",
            delays_ms.len(),
            sent.len(),
            c.stderr.text()
        );
        if quiet_exit.is_none() && now >= next_ping {
            nonce += 1;
            sent.insert(nonce, Instant::now());
            c.send(&ClientMessage::Ping { nonce });
            next_ping += Duration::from_millis(20);
            continue;
        }
        let wait = if quiet_exit.is_none() {
            next_ping.saturating_duration_since(now)
        } else {
            Duration::from_millis(100)
        };
        let Ok(seen) = c.seen.recv_timeout(wait) else { continue };
        match seen.msg {
            DaemonMessage::Pong { nonce } => {
                let t = sent.remove(&nonce).expect("a Pong for a Ping that was sent once");
                rtts_ms.push(seen.at.duration_since(t).as_secs_f64() * 1000.0);
            }
            DaemonMessage::Output { build, data, .. } if build == quiet => {
                partial.extend_from_slice(&data);
                let arrived = seen.wall.duration_since(UNIX_EPOCH).unwrap().as_nanos() as i128;
                while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=i).collect();
                    let text = String::from_utf8_lossy(&line[..i]).into_owned();
                    let printed: i128 = text.parse().unwrap_or_else(|_| panic!("not a timestamp: {text:?}"));
                    delays_ms.push((arrived - printed) as f64 / 1e6);
                }
            }
            DaemonMessage::Exited(e) if e.build == quiet => quiet_exit = Some(e),
            DaemonMessage::Error(e) => panic!("the daemon reported an error: {e:?}"),
            _ => {}
        }
    }
    let flood_mib_s = (c.flood_bytes() - flood_start.1) as f64 / MIB as f64 / flood_start.0.elapsed().as_secs_f64();
    let quiet_exit = quiet_exit.unwrap();
    assert_eq!(quiet_exit.status, ExitStatus::Code(0), "{quiet_exit:?}");
    assert_eq!(delays_ms.len(), LINES, "lines of the quiet build");
    assert!(partial.is_empty(), "a partial last line: {partial:?}");
    let p50 = percentile(&rtts_ms, 50.0);
    let p99 = percentile(&rtts_ms, 99.0);
    let max_delay = delays_ms.iter().copied().fold(f64::MIN, f64::max);
    eprintln!(
        "under a flood of {flood_mib_s:.0} MiB/s: {} pings, RTT p50 {p50:.2} ms, p99 {p99:.2} ms, max {:.2} ms; \
         quiet lines: p50 delay {:.2} ms, max {max_delay:.2} ms",
        rtts_ms.len(),
        rtts_ms.iter().copied().fold(0.0, f64::max),
        percentile(&delays_ms, 50.0),
    );
    assert!(rtts_ms.len() >= 100, "only {} pings", rtts_ms.len());
    assert!(p99 < 500.0, "ping RTT p99 {p99:.1} ms under a flood");
    assert!(
        max_delay < 1000.0,
        "a quiet build's line arrived {max_delay:.1} ms late"
    );
    assert!(
        flood_mib_s > 1.0,
        "the flood did not flow while measuring ({flood_mib_s} MiB/s)"
    );

    // A cancel is not queued behind the flood's output.
    let t = Instant::now();
    c.send(&ClientMessage::Cancel {
        req: 3,
        build: flood.clone(),
        force: false,
    });
    let acked = c.wait_for(TIMEOUT, |s| {
        matches!(s.msg, DaemonMessage::Ack { req: 3 }).then(|| s.at.duration_since(t))
    });
    assert!(acked < Duration::from_secs(2), "Cancel acknowledged after {acked:?}");
    // The build ends at once (its exit may still queue behind output the client has
    // yet to read; the build list is a reply, not output).
    let mut req = 10;
    let ended = loop {
        req += 1;
        c.send(&ClientMessage::List { req, all: true });
        let finished = c.wait_for(TIMEOUT, |s| match &s.msg {
            DaemonMessage::Builds { req: r, builds } if *r == req => Some(
                builds
                    .iter()
                    .any(|b| b.build == flood && matches!(b.state, BuildState::Finished { .. })),
            ),
            _ => None,
        });
        if finished {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the flood still runs 5 s after its cancel"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let (at, exited) = match c.exits.iter().find(|(_, e)| e.build == flood) {
        Some(x) => x.clone(),
        None => c.wait_for(Duration::from_secs(120), |s| match &s.msg {
            DaemonMessage::Exited(e) if e.build == flood => Some((s.at, e.clone())),
            _ => None,
        }),
    };
    eprintln!(
        "cancel: Ack after {acked:?}, finished after {ended:?}, Exited after {:?}",
        at.duration_since(t)
    );
    assert_eq!(
        exited.status,
        ExitStatus::Signal {
            signal: 15,
            core_dumped: false
        }
    );
    c.stdin = None;
    let st = wait_child(&mut c.child, TIMEOUT).expect("the daemon exits at EOF");
    assert_eq!(st.code(), Some(0), "stderr: {}", c.stderr.text());
}

// ---------------------------------------------------------------------------------------
// Takeover
// ---------------------------------------------------------------------------------------

#[test]
fn takeover_ends_the_old_sessions_subscriptions_not_its_builds() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Serve::with_state_dir(state.path(), &[]);
    d.hello();
    let ticker = BuildId("ticker".into());
    let lines: String = (1..=20).map(|i| format!("line {i}\n")).collect();
    d.send(&ClientMessage::Run {
        req: 1,
        spec: Box::new(RunSpec {
            id: Some(ticker.0.clone()),
            ..script_spec("i=1; while [ $i -le 20 ]; do echo line $i; sleep 0.1; i=$((i+1)); done; exit 4")
        }),
        follow: true,
    });
    d.wait_message(|m| match m {
        DaemonMessage::Started(s) if s.req == 1 => Some(()),
        DaemonMessage::Error(e) => panic!("Run failed: {e:?}"),
        _ => None,
    });
    // Session A follows the build live.
    d.wait_message(|m| matches!(m, DaemonMessage::Output { build, .. } if *build == ticker).then_some(()));

    // A's client vanishes in the middle of a frame; the next one takes over the stream.
    let ping = frame(&ClientMessage::Ping { nonce: 1 });
    d.send_raw(&ping[..10]);
    // A is silent, not gone, for the daemon: the new client asks to take the stream.
    // Whatever A was sent comes before the new session's Welcome, which names it.
    let welcome = d.take_over(0x7a7a_7a7a_7a7a_7a7a);
    let listed = welcome.builds.iter().find(|b| b.build == ticker);
    assert!(
        listed.is_some_and(|b| b.state == BuildState::Running),
        "the build runs on after the takeover: {:?}",
        welcome.builds
    );

    // The new session was not handed A's subscription: nothing of the build arrives
    // (it prints every 100 ms) before the pong to a ping sent well after.
    std::thread::sleep(Duration::from_millis(600));
    d.send(&ClientMessage::Ping { nonce: 2 });
    d.wait_message(|m| match m {
        DaemonMessage::Pong { nonce: 2 } => Some(()),
        DaemonMessage::Output { .. } | DaemonMessage::Exited(_) | DaemonMessage::Gap { .. } => {
            panic!("the new session got output it did not ask for: {m:?}")
        }
        _ => None,
    });

    // Attaching gives the whole output once, in order, and the exit.
    d.send(&ClientMessage::Attach {
        req: 2,
        build: ticker.clone(),
        from: 0,
        follow: true,
    });
    match d.next_message() {
        DaemonMessage::Attached { req: 2, build } => assert_eq!(build.build, ticker),
        other => panic!("expected Attached, got {other:?}"),
    }
    let mut out = Vec::new();
    let exited = loop {
        match d.next_message() {
            DaemonMessage::Output {
                build, offset, data, ..
            } => {
                assert_eq!(build, ticker);
                assert_eq!(offset, out.len() as u64, "output not contiguous (or repeated)");
                out.extend_from_slice(&data);
            }
            DaemonMessage::Exited(e) => break e,
            DaemonMessage::Ping { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(String::from_utf8_lossy(&out), lines);
    assert_eq!(exited.build, ticker);
    assert_eq!(exited.status, ExitStatus::Code(4));
    assert_eq!(exited.stdout_bytes, lines.len() as u64);

    // Nothing more of the build: no second Exited, no stray output from A's follower.
    d.send(&ClientMessage::Ping { nonce: 3 });
    d.wait_message(|m| match m {
        DaemonMessage::Pong { nonce: 3 } => Some(()),
        DaemonMessage::Output { .. } | DaemonMessage::Exited(_) => panic!("more after Exited: {m:?}"),
        _ => None,
    });
    d.close_stdin();
    signal(d.pid(), Signal::SIGTERM);
    let st = d.wait_timeout(Duration::from_secs(10)).expect("exits on SIGTERM");
    assert_eq!(st.code(), Some(0), "stderr: {}", d.stderr.text());
}
