//! tether behind the real `kubectl`, against the Kubernetes API server of
//! `integration_tests::k8s` (attach and exec over WebSocket, the CRI's stream semantics,
//! runc containers with tether as PID 1). Skipped without kubectl, or without root,
//! runc and a static busybox.

use std::path::Path;
use std::process::Stdio;

use integration_tests::container::{runc_usable, Bundle};
use integration_tests::k8s::{kubectl_usable, ApiServer};
use std::time::Duration;

use integration_tests::{tether, Proc, TIMEOUT};

const POD: &str = "agent-1";

fn usable() -> bool {
    kubectl_usable() && runc_usable()
}

/// A pod whose `kaniko` container runs `tether serve` (socket at /kaniko/tether.sock).
fn pod() -> ApiServer {
    let api = ApiServer::start();
    let bundle = Bundle::serve(&["--log-level", "info", "--socket", "/kaniko/tether.sock"]);
    api.run_container(POD, "kaniko", bundle);
    api
}

#[test]
fn kubectl_exec_reports_the_exit_code_and_streams() {
    if !usable() {
        return;
    }
    let api = pod();
    let mut cmd = api.kubectl([
        "exec",
        "-i",
        POD,
        "-c",
        "kaniko",
        "--",
        "/busybox/sh",
        "-c",
        "cat; echo err >&2; exit 3",
    ]);
    cmd.stdin(Stdio::piped());
    let mut p = Proc::spawn(&mut cmd);
    {
        use std::io::Write;
        p.stdin().write_all(b"from stdin\n").unwrap();
    }
    let r = p.finish(TIMEOUT);
    assert_eq!(r.code(), 3, "{}", r.stderr_text());
    assert_eq!(r.stdout_text(), "from stdin\n");
    assert!(r.stderr_text().contains("err\n"), "{}", r.stderr_text());
}

#[test]
fn a_build_through_kubectl_attach() {
    if !usable() {
        return;
    }
    let api = pod();
    let via = api.kubectl_line(&format!("attach -i {POD} -c kaniko"));
    let r = Proc::spawn(tether(["run", "--via", &via, "--sh", "echo over attach; exit 3"]).stdin(Stdio::null()))
        .finish(TIMEOUT);
    assert_eq!(r.code(), 3, "{}", r.stderr_text());
    assert_eq!(r.stdout_text(), "over attach\n");
}

#[test]
fn a_build_through_kubectl_exec_and_dial_stdio() {
    if !usable() {
        return;
    }
    let api = pod();
    let via = api.kubectl_line(&format!(
        "exec -i {POD} -c kaniko -- /kaniko/tether dial-stdio --socket /kaniko/tether.sock"
    ));
    let r = Proc::spawn(tether(["run", "--via", &via, "--sh", "echo over exec; exit 4"]).stdin(Stdio::null()))
        .finish(TIMEOUT);
    assert_eq!(r.code(), 4, "{}", r.stderr_text());
    assert_eq!(r.stdout_text(), "over exec\n");
}

/// A pod whose daemon drops a silent client after 3 s (so that a dead holder of its
/// stdin stream is given up quickly), logging at info (its log lines reach every
/// attached client's kubectl).
fn quick_pod() -> ApiServer {
    let api = ApiServer::start();
    let bundle = Bundle::serve(&[
        "--log-level",
        "info",
        "--heartbeat",
        "1s",
        "--heartbeat-timeout",
        "3s",
        "--socket",
        "/kaniko/tether.sock",
    ]);
    api.run_container(POD, "kaniko", bundle);
    api
}

fn attach_via(api: &ApiServer) -> String {
    api.kubectl_line(&format!("attach -i {POD} -c kaniko"))
}

/// Waits up to `limit` for a client, then collects what it printed.
fn finish_within(p: Proc, limit: Duration) -> integration_tests::Finished {
    p.finish(limit)
}

#[test]
fn concurrent_runs_over_one_attach_stream_each_get_exactly_their_own() {
    if !usable() {
        return;
    }
    let api = quick_pod();
    let via = attach_via(&api);
    let clients: Vec<(usize, Proc)> = (0..8)
        .map(|i| {
            let script = format!("for j in 1 2 3 4 5 6 7 8 9 10; do echo \"build {i} line $j\"; done; exit {i}");
            let mut cmd = tether(["run", "--via", &via, "--sh", &script]);
            cmd.stdin(Stdio::null());
            (i, Proc::spawn(&mut cmd))
        })
        .collect();
    for (i, p) in clients {
        let r = finish_within(p, Duration::from_secs(120));
        let want: String = (1..=10).map(|j| format!("build {i} line {j}\n")).collect();
        assert_eq!(
            r.code(),
            i as i32,
            "client {i}: stdout {}\nstderr {}",
            r.stdout_text(),
            r.stderr_text()
        );
        assert_eq!(r.stdout_text(), want, "client {i}: stderr {}", r.stderr_text());
        // Nothing of the daemon's log (which every attached client's kubectl receives)
        // nor of another session is printed.
        let err = r.stderr_text();
        for line in err.lines() {
            assert!(
                line.starts_with("tether: "),
                "client {i} printed a line not its own: {line:?}\n{err}"
            );
            assert!(
                !line.contains("INFO") && !line.contains(" build "),
                "client {i}: {line:?}"
            );
        }
    }
}

#[test]
fn a_persons_ps_and_shell_over_attach_while_a_pipeline_runs() {
    if !usable() {
        return;
    }
    let api = quick_pod();
    let via = attach_via(&api);
    let script = "i=0; while [ $i -lt 30 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done; exit 6";
    let mut run = tether(["run", "--via", &via, "--id", "pipeline", "--sh", script]);
    run.stdin(Stdio::null());
    let run = Proc::spawn(&mut run);
    assert!(
        integration_tests::wait_until(TIMEOUT, || run.stdout.text().contains("tick 1")),
        "{}",
        run.stderr.text()
    );
    let ps = Proc::spawn(tether(["ps", "--via", &via]).stdin(Stdio::null()));
    let mut shell = tether(["shell", "--via", &via, "-T"]);
    shell.stdin(Stdio::piped());
    let mut shell = Proc::spawn(&mut shell);
    {
        use std::io::Write;
        shell.stdin().write_all(b"echo from the shell; exit 5\n").unwrap();
    }
    let r = finish_within(run, Duration::from_secs(60));
    let want: String = (0..30).map(|i| format!("tick {i}\n")).collect();
    assert_eq!((r.code(), r.stdout_text()), (6, want), "run: {}", r.stderr_text());
    let p = finish_within(ps, Duration::from_secs(60));
    assert_eq!(p.code(), 0, "ps: {}", p.stderr_text());
    assert!(p.stdout_text().starts_with("ID "), "ps: {}", p.stdout_text());
    let s = finish_within(shell, Duration::from_secs(60));
    assert_eq!(
        (s.code(), s.stdout_text()),
        (5, "from the shell\n".to_owned()),
        "shell: {}",
        s.stderr_text()
    );
    // Each waited for the stream, said so, and printed only what was its own.
    for (what, err) in [("ps", p.stderr_text()), ("shell", s.stderr_text())] {
        for line in err.lines() {
            assert!(line.starts_with("tether: "), "{what}: {line:?}");
        }
    }
}

/// `kubectl attach -i` driven by the test as a raw client: writes its opening, waits for
/// its Welcome, then writes half of a large frame and is killed.
fn half_a_frame_then_killed(api: &ApiServer) {
    use std::io::Write;
    use tether_protocol::{encode_frame, ClientMessage, DaemonMessage, Hello, PREAMBLE};
    let mut cmd = api.kubectl(["attach", "-i", POD, "-c", "kaniko"]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let events = integration_tests::decode_events(child.stdout.take().unwrap());
    let nonce = 0x0bad_c0de_0000_0001;
    let mut opening = vec![0u8; tether_protocol::SYNC_PAD_LEN];
    opening.extend_from_slice(PREAMBLE);
    encode_frame(&ClientMessage::Hello(Hello::new("raw", nonce, true)), &mut opening).unwrap();
    stdin.write_all(&opening).unwrap();
    stdin.flush().unwrap();
    loop {
        match events.recv_timeout(TIMEOUT).expect("an answer over kubectl attach") {
            integration_tests::Event::Message(DaemonMessage::Welcome(w)) if w.session == nonce => break,
            integration_tests::Event::Eof => panic!("kubectl attach ended"),
            _ => {}
        }
    }
    let mut big = Vec::new();
    encode_frame(
        &ClientMessage::Stdin {
            build: tether_protocol::BuildId("nobody".into()),
            offset: 0,
            data: tether_protocol::Bytes::from(vec![7u8; 60_000]),
        },
        &mut big,
    )
    .unwrap();
    stdin.write_all(&big[..20_000]).unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_kubectl_killed_mid_frame_and_the_next_client_resumes_without_loss() {
    if !usable() {
        return;
    }
    let api = quick_pod();
    let via = attach_via(&api);
    let script = "i=1; while [ $i -le 200 ]; do echo line $i; i=$((i+1)); sleep 0.01; done; exit 3";
    let started =
        Proc::spawn(tether(["run", "--via", &via, "--id", "long", "--detach", "--sh", script]).stdin(Stdio::null()))
            .finish(TIMEOUT);
    assert_eq!(started.code(), 0, "{}", started.stderr_text());
    half_a_frame_then_killed(&api);
    // The next client: the dead holder is given up (its heartbeats stopped), the half
    // frame is completed by the padding, and the build's whole output comes back.
    let r = Proc::spawn(tether(["attach", "--via", &via, "--from-start", "long"]).stdin(Stdio::null()))
        .finish(Duration::from_secs(60));
    let want: String = (1..=200).map(|i| format!("line {i}\n")).collect();
    assert_eq!((r.code(), r.stdout_text()), (3, want), "{}", r.stderr_text());
}

#[test]
fn sigterm_ends_a_client_that_is_reconnecting_within_a_second() {
    if !usable() {
        return;
    }
    let api = quick_pod();
    let via = attach_via(&api);
    let mut cmd = tether(["run", "--via", &via, "--id", "orphan", "--sh", "echo started; sleep 60"]);
    cmd.stdin(Stdio::null());
    let p = Proc::spawn(&mut cmd);
    assert!(
        integration_tests::wait_until(TIMEOUT, || p.stdout.text().contains("started")),
        "{}",
        p.stderr.text()
    );
    // The API server goes away for good (its streams cut, no new ones): the client
    // keeps trying to reconnect.
    drop(api);
    assert!(
        integration_tests::wait_until(TIMEOUT, || p.stderr.text().contains("reconnecting")),
        "{}",
        p.stderr.text()
    );
    let sent = std::time::Instant::now();
    integration_tests::signal(p.pid(), nix::sys::signal::Signal::SIGTERM);
    let mut p = p;
    let st = p.wait_timeout(Duration::from_secs(5)).expect("the client exits");
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(integration_tests::code(st), 143);
    let r = p.finish(TIMEOUT);
    assert!(
        r.stderr_text().contains("SIGTERM while not connected"),
        "{}",
        r.stderr_text()
    );
    assert!(r.stderr_text().contains("tether cancel orphan"), "{}", r.stderr_text());
}

#[test]
fn a_run_waiting_for_the_stream_says_who_holds_it_and_leaves_at_sigterm() {
    if !usable() {
        return;
    }
    let api = quick_pod();
    let via = attach_via(&api);
    let holder = Proc::spawn(tether(["run", "--via", &via, "--sh", "echo holding; sleep 20"]).stdin(Stdio::null()));
    assert!(
        integration_tests::wait_until(TIMEOUT, || holder.stdout.text().contains("holding")),
        "{}",
        holder.stderr.text()
    );
    let mut waiter = Proc::spawn(tether(["run", "--via", &via, "--", "true"]).stdin(Stdio::null()));
    assert!(
        integration_tests::wait_until(TIMEOUT, || waiter.stderr.text().contains("is held by another client")),
        "{}",
        waiter.stderr.text()
    );
    let sent = std::time::Instant::now();
    integration_tests::signal(waiter.pid(), nix::sys::signal::Signal::SIGTERM);
    let st = waiter
        .wait_timeout(Duration::from_secs(5))
        .expect("the waiting client exits");
    assert!(sent.elapsed() < Duration::from_secs(1), "took {:?}", sent.elapsed());
    assert_eq!(integration_tests::code(st), 143);
    // The holder was not disturbed.
    integration_tests::signal(holder.pid(), nix::sys::signal::Signal::SIGTERM);
    let r = holder.finish(TIMEOUT);
    assert_eq!(r.code(), 143, "{}", r.stderr_text());
}

/// `tether relay --via 'kubectl attach ...' --listen DIR/relay.sock`, running.
fn start_relay(api: &ApiServer, dir: &std::path::Path) -> (Proc, std::path::PathBuf) {
    let sock = dir.join("relay.sock");
    let mut cmd = tether([
        "relay",
        "-v",
        "--via",
        &attach_via(api),
        "--listen",
        sock.to_str().unwrap(),
    ]);
    cmd.stdin(Stdio::null());
    let relay = Proc::spawn(&mut cmd);
    assert!(
        integration_tests::wait_until(TIMEOUT, || relay.stderr.text().contains("relaying")),
        "the relay never connected: {}",
        relay.stderr.text()
    );
    (relay, sock)
}

/// Starts `n` pipeline steps through the relay at `sock`: step `i` prints `lines` lines
/// "step {i} line {j}", 50 ms apart, and exits with status `i`.
fn spawn_steps(sock: &Path, n: usize, lines: usize) -> Vec<(usize, Proc)> {
    (0..n)
        .map(|i| {
            let script = format!(
                "j=1; while [ $j -le {lines} ]; do echo \"step {i} line $j\"; j=$((j+1)); sleep 0.05; done; exit {i}"
            );
            let mut cmd = tether(["run", "--socket", sock.to_str().unwrap(), "--sh", &script]);
            cmd.stdin(Stdio::null());
            (i, Proc::spawn(&mut cmd))
        })
        .collect()
}

/// Asserts that every step of [`spawn_steps`] printed exactly its own lines, all of them,
/// and exited with its own status.
fn finish_steps(steps: Vec<(usize, Proc)>, lines: usize) {
    for (i, p) in steps {
        let r = p.finish(Duration::from_secs(60));
        let want: String = (1..=lines).map(|j| format!("step {i} line {j}\n")).collect();
        assert_eq!(
            (r.code(), r.stdout_text()),
            (i as i32, want),
            "step {i}: {}",
            r.stderr_text()
        );
    }
}

#[test]
fn sixteen_concurrent_steps_through_a_relay_on_one_attach_stream() {
    if !usable() {
        return;
    }
    let api = quick_pod();
    let dir = tempfile::tempdir().unwrap();
    let (relay, sock) = start_relay(&api, dir.path());
    let clients = spawn_steps(&sock, 16, 10);
    finish_steps(clients, 10);
    // One stream carried them all: the relay's.
    assert_eq!(api.open_streams(), 1, "{}", relay.stderr.text());
}

#[test]
fn the_relay_resumes_every_build_when_the_api_server_drops_its_stream() {
    if !usable() {
        return;
    }
    let api = quick_pod();
    let dir = tempfile::tempdir().unwrap();
    let (relay, sock) = start_relay(&api, dir.path());
    let clients = spawn_steps(&sock, 4, 60);
    for (i, p) in &clients {
        assert!(
            integration_tests::wait_until(TIMEOUT, || p.stdout.text().contains(&format!("step {i} line 5\n"))),
            "{}",
            p.stderr.text()
        );
    }
    // An API server restart: every attach stream is cut without a word.
    assert_eq!(api.drop_streams(), 1);
    finish_steps(clients, 60);
    assert!(relay.stderr.text().contains("reconnect"), "{}", relay.stderr.text());
}

#[test]
fn a_private_channel_through_kubectl_exec_needs_no_turn_on_the_stream() {
    if !usable() {
        return;
    }
    let api = quick_pod();
    let holder = Proc::spawn(
        tether([
            "run",
            "--via",
            &attach_via(&api),
            "--sh",
            "echo holding; sleep 15; exit 2",
        ])
        .stdin(Stdio::null()),
    );
    assert!(
        integration_tests::wait_until(TIMEOUT, || holder.stdout.text().contains("holding")),
        "{}",
        holder.stderr.text()
    );
    let private = api.kubectl_line(&format!(
        "exec -i {POD} -c kaniko -- /kaniko/tether dial-stdio --socket /kaniko/tether.sock"
    ));
    let mut shell = tether(["shell", "--via", &private, "-T"]);
    shell.stdin(Stdio::piped());
    let mut shell = Proc::spawn(&mut shell);
    {
        use std::io::Write;
        shell.stdin().write_all(b"echo private; exit 4\n").unwrap();
    }
    let s = shell.finish(TIMEOUT);
    assert_eq!(
        (s.code(), s.stdout_text()),
        (4, "private\n".to_owned()),
        "{}",
        s.stderr_text()
    );
    assert!(
        !s.stderr_text().contains("held by another client"),
        "{}",
        s.stderr_text()
    );
    let mut holder = holder;
    assert!(
        holder.wait_timeout(Duration::from_millis(10)).is_none(),
        "the pipeline's run went on meanwhile"
    );
    let r = holder.finish(Duration::from_secs(30));
    assert_eq!(
        (r.code(), r.stdout_text()),
        (2, "holding\n".to_owned()),
        "{}",
        r.stderr_text()
    );
}
