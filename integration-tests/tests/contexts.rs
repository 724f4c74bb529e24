//! What a build gets before its command starts, end to end: `tether run --fetch` (files
//! and archives downloaded by the daemon into the work dir) and readiness gates
//! (`tether run --wait-for`, `tether serve --wait-for`).
//!
//! Real daemons, loopback only: a std HTTP server ([`HttpServer`]), the real Debian
//! docker-registry coming up late, and TCP listeners bound by the test. Checked:
//! fetched files (with or without a digest) and unpacked `.tar`, `.tar.gz` and `.tgz`
//! archives are where the command expects them; every failed preparation (a wrong
//! digest, HTTP 404, 5xx after its retries, a body over the daemon's cap, a gate still
//! closed at the timeout) exits 125 naming the URL, and the command never runs (it
//! would leave a marker file); a build held by a gate shows as `preparing` in
//! `tether ps` and runs once the gate opens; no build dir is left afterwards.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::http::{stream_sha256, HttpServer, Reply};
use integration_tests::registry::Registry;
use integration_tests::{
    pseudo_random, serve_socket, shell_quote, subdirs, tether, via_serve, wait_until, Finished, Proc, Serve, TIMEOUT,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Proxy settings a machine may have: a proxy cannot reach the test's loopback servers.
const PROXY_VARS: [&str; 6] = [
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
];

/// `tether ARGS` with stdin from /dev/null and without proxy variables (a `--via`
/// daemon inherits the client's environment).
fn tether_cmd(args: &[&str]) -> Command {
    let mut cmd = tether(args);
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Starts `tether run ARGS` in the background.
fn spawn_run(args: &[&str]) -> Proc {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    Proc::spawn(&mut tether_cmd(&all))
}

/// Runs `tether run ARGS` and waits for it.
fn run(args: &[&str]) -> Finished {
    spawn_run(args).finish(TIMEOUT)
}

/// The `--via` command of a daemon on `state` with extra `tether serve` flags.
fn via_with(state: &Path, serve_flags: &str) -> String {
    format!("{} {serve_flags}", via_serve(state))
}

/// The build directories (`instances/*/builds/*`) under a daemon's state dir.
fn build_dirs(state: &Path) -> Vec<PathBuf> {
    subdirs(&state.join("instances"))
        .iter()
        .flat_map(|instance| subdirs(&instance.join("builds")))
        .collect()
}

/// Waits until no build directory is left under `state` (a socket daemon removes it
/// as the build ends, not necessarily before its client exits).
fn assert_build_dirs_removed(state: &Path) {
    assert!(
        wait_until(TIMEOUT, || build_dirs(state).is_empty()),
        "build dirs left behind: {:?}",
        build_dirs(state)
    );
}

/// A script that creates `marker`: the proof that the command ran.
fn touch(marker: &Path) -> String {
    format!("touch {}", shell_quote(marker.as_os_str()))
}

/// Asserts that a run failed in preparation: exit 125, stderr naming `url` and holding
/// each of `needles`, and no `marker` (the command never ran).
fn assert_prep_failed(r: &Finished, url: &str, needles: &[&str], marker: &Path) {
    let err = r.stderr_text();
    assert_eq!(
        r.code(),
        125,
        "expected a failed preparation (exit 125); marker {}: {}\nstdout: {}\nstderr: {err}",
        marker.display(),
        if marker.exists() { "the command ran" } else { "absent" },
        r.stdout_text()
    );
    assert!(err.contains(url), "stderr does not name {url}: {err}");
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    }
    assert!(
        !marker.exists(),
        "the command ran although its preparation failed: {err}"
    );
}

/// The lowercase hex SHA-256 of `data`.
fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A `.tar` (ustar) of regular files: `(path, content, mode)`.
fn tar_of(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for &(path, content, mode) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(content.len() as u64);
        header.set_mode(mode);
        header.set_mtime(1_700_000_000);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, content).unwrap();
    }
    builder.into_inner().unwrap()
}

/// Runs a system command (`tar`, `gzip`) and checks that it succeeded.
fn system(cmd: &mut Command) {
    let st = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(st.success(), "{cmd:?} failed: {st}");
}

/// `tether ps --json --socket SOCK`: one JSON object per build.
fn ps(sock: &Path) -> Vec<Value> {
    let r = Proc::spawn(&mut tether_cmd(&["ps", "--json", "--socket", sock.to_str().unwrap()])).finish(TIMEOUT);
    assert_eq!(r.code(), 0, "tether ps failed: {}", r.stderr_text());
    r.stdout_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("ps --json line {l:?}: {e}")))
        .collect()
}

/// Waits until `tether ps` on `sock` lists exactly one build, `preparing`, and returns
/// it; a test failure if `job` (the run's client) ends first.
fn wait_preparing(sock: &Path, job: &mut Proc) -> Value {
    let mut builds = Vec::new();
    let mut ended = None;
    let seen = wait_until(TIMEOUT, || {
        builds = ps(sock);
        ended = job.child.try_wait().expect("try_wait");
        ended.is_some() || (builds.len() == 1 && builds[0]["state"] == "preparing")
    });
    assert!(
        seen && ended.is_none(),
        "the build never showed as preparing (client ended: {ended:?}); ps: {builds:?}\nclient stdout: {:?}\nclient stderr: {}",
        job.stdout.text(),
        job.stderr.text()
    );
    builds.remove(0)
}

// ---------------------------------------------------------------------------------------
// --fetch
// ---------------------------------------------------------------------------------------

#[test]
fn fetched_files_with_a_digest_land_in_the_work_dir_or_at_their_path() {
    // Several 64 KiB pieces, the last one short.
    let len = 300_000;
    let server = HttpServer::start(vec![(
        "/files/blob.bin",
        Reply::Stream {
            len,
            content_length: true,
        },
    )]);
    let url = server.url("/files/blob.bin");
    let sum = stream_sha256(len);
    let state = tempfile::tempdir().unwrap();
    let r = run(&[
        "--via",
        &via_serve(state.path()),
        // `.`: the work dir, the file named after the URL.
        "--fetch",
        &format!("{url}#sha256={sum}:."),
        // A path that does not exist: the file's own path, its parents created.
        "--fetch",
        &format!("{url}#sha256={sum}:inputs/renamed.bin"),
        // A trailing `/`: a directory, created.
        "--fetch",
        &format!("{url}#sha256={sum}:deps/"),
        "--sh",
        "sha256sum blob.bin inputs/renamed.bin deps/blob.bin; wc -c < blob.bin; ls -A",
    ]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    // `ls -A`: no temporary file of the downloads is left next to them.
    assert_eq!(
        r.stdout_text(),
        format!("{sum}  blob.bin\n{sum}  inputs/renamed.bin\n{sum}  deps/blob.bin\n{len}\nblob.bin\ndeps\ninputs\n")
    );
    assert_eq!(server.hits("/files/blob.bin"), 3);
    assert_eq!(subdirs(&state.path().join("instances")), Vec::<PathBuf>::new());
}

#[test]
fn a_fetch_without_a_digest_is_taken_as_it_comes() {
    let unsized_len = 100_000;
    let server = HttpServer::start(vec![
        ("/notes.txt", Reply::Body(b"hello from the server\n".to_vec())),
        // No Content-Length: the body ends with the connection.
        (
            "/unsized.bin",
            Reply::Stream {
                len: unsized_len,
                content_length: false,
            },
        ),
    ]);
    let state = tempfile::tempdir().unwrap();
    let r = run(&[
        "--via",
        &via_serve(state.path()),
        "--fetch",
        &server.url("/notes.txt"),
        "--fetch",
        &format!("{}:data/unsized.bin", server.url("/unsized.bin")),
        "--sh",
        "cat notes.txt; sha256sum data/unsized.bin",
    ]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert_eq!(
        r.stdout_text(),
        format!(
            "hello from the server\n{}  data/unsized.bin\n",
            stream_sha256(unsized_len)
        )
    );
    assert_eq!(subdirs(&state.path().join("instances")), Vec::<PathBuf>::new());
}

#[test]
fn archives_are_unpacked_into_their_destination() {
    let dir = tempfile::tempdir().unwrap();
    // A .tar.gz made by the system's tar, with a `./` root entry and an executable.
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("src")).unwrap();
    fs::create_dir_all(tree.join("bin")).unwrap();
    fs::write(tree.join("README"), "read me\n").unwrap();
    fs::write(tree.join("src/main.c"), "int main(void) { return 0; }\n").unwrap();
    fs::write(tree.join("bin/run.sh"), "#!/bin/sh\necho script ran\n").unwrap();
    fs::set_permissions(tree.join("bin/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    let tar_gz = dir.path().join("ctx.tar.gz");
    system(
        Command::new("tar")
            .arg("czf")
            .arg(&tar_gz)
            .arg("-C")
            .arg(&tree)
            .arg("."),
    );
    // A plain .tar made by the tar crate, and a .tgz: another one, gzipped.
    let plain = tar_of(&[("plain/a.txt", b"a\n", 0o644), ("plain/nested/b.txt", b"b\n", 0o600)]);
    let inner = dir.path().join("inner.tar");
    fs::write(&inner, tar_of(&[("tgz/c.txt", b"c\n", 0o644)])).unwrap();
    let tgz = dir.path().join("inner.tgz");
    system(
        Command::new("gzip")
            .arg("-c")
            .arg(&inner)
            .stdout(fs::File::create(&tgz).unwrap()),
    );
    let tar_gz_sum = sha256_hex(&fs::read(&tar_gz).unwrap());
    let server = HttpServer::start(vec![
        ("/ctx.tar.gz", Reply::File(tar_gz)),
        ("/plain.tar", Reply::Body(plain)),
        ("/inner.tgz", Reply::File(tgz)),
    ]);

    let state = tempfile::tempdir().unwrap();
    let r = run(&[
        "--via",
        &via_serve(state.path()),
        "--fetch",
        &format!("{}#sha256={tar_gz_sum}:ctx", server.url("/ctx.tar.gz")),
        // No DEST: unpacked into the work dir itself.
        "--fetch",
        // A query string does not hide the archive's suffix.
        &format!("{}?v=1", server.url("/plain.tar")),
        "--fetch",
        &format!("{}:deep/er/", server.url("/inner.tgz")),
        "--sh",
        "find . | LC_ALL=C sort; cat ctx/README ctx/src/main.c plain/nested/b.txt deep/er/tgz/c.txt; ./ctx/bin/run.sh",
    ]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    let mut paths = vec![
        ".",
        "./ctx",
        "./ctx/README",
        "./ctx/bin",
        "./ctx/bin/run.sh",
        "./ctx/src",
        "./ctx/src/main.c",
        "./deep",
        "./deep/er",
        "./deep/er/tgz",
        "./deep/er/tgz/c.txt",
        "./plain",
        "./plain/a.txt",
        "./plain/nested",
        "./plain/nested/b.txt",
    ];
    paths.sort_unstable();
    let expected = paths.join("\n") + "\nread me\nint main(void) { return 0; }\nb\nc\nscript ran\n";
    assert_eq!(r.stdout_text(), expected);
    assert_eq!(subdirs(&state.path().join("instances")), Vec::<PathBuf>::new());
}

#[test]
fn a_wrong_digest_fails_the_run_before_its_command() {
    let blob = pseudo_random(10_000, 5);
    let archive = tar_of(&[("ctx/file.txt", b"unpacked before the digest was known\n", 0o644)]);
    let sums = [sha256_hex(&blob), sha256_hex(&archive)];
    let server = HttpServer::start(vec![
        ("/blob.bin", Reply::Body(blob)),
        ("/ctx.tar", Reply::Body(archive)),
    ]);
    let wrong = "ab".repeat(32);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // A plain file (checked before it is put in place) and an archive (checked after
    // its entries were unpacked: the whole build dir must go).
    for ((path, dest), real) in [("/blob.bin", "."), ("/ctx.tar", "ctx")].into_iter().zip(sums) {
        let url = server.url(path);
        let marker = dir.path().join("ran");
        let r = run(&[
            "--via",
            &via_serve(&state),
            "--fetch",
            &format!("{url}#sha256={wrong}:{dest}"),
            "--sh",
            &touch(&marker),
        ]);
        assert_prep_failed(&r, &url, &["sha256 mismatch", &wrong, &real], &marker);
        assert_eq!(server.hits(path), 1, "a digest mismatch is not retried");
        assert_eq!(subdirs(&state.join("instances")), Vec::<PathBuf>::new());
    }
}

#[test]
fn http_errors_fail_the_run_and_only_server_errors_are_retried() {
    let server = HttpServer::start(vec![
        ("/down.bin", Reply::Status(503)),
        ("/flaky.txt", Reply::Sequence(vec![503, 502, 200])),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let via = via_serve(&state);

    // 404 (no route): one request, no retry.
    let url = server.url("/missing.bin");
    let marker = dir.path().join("ran-404");
    let r = run(&["--via", &via, "--fetch", &url, "--sh", &touch(&marker)]);
    assert_prep_failed(&r, &url, &["404"], &marker);
    assert_eq!(server.hits("/missing.bin"), 1, "a 404 is not retried");

    // 503 every time: three attempts, then the run fails.
    let url = server.url("/down.bin");
    let marker = dir.path().join("ran-503");
    let r = run(&["--via", &via, "--fetch", &url, "--sh", &touch(&marker)]);
    assert_prep_failed(&r, &url, &["503"], &marker);
    assert_eq!(server.hits("/down.bin"), 3, "a 5xx is retried, 3 attempts in all");

    // 503, 502, then 200: the third attempt gets the file.
    let r = run(&[
        "--via",
        &via,
        "--fetch",
        &server.url("/flaky.txt"),
        "--sh",
        "cat flaky.txt",
    ]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert_eq!(r.stdout_text(), "200 OK\n");
    assert_eq!(server.hits("/flaky.txt"), 3);
    assert_eq!(subdirs(&state.join("instances")), Vec::<PathBuf>::new());
}

#[test]
fn a_body_over_the_daemons_cap_fails_the_run() {
    const MIB: u64 = 1 << 20;
    let stream = |len, content_length| Reply::Stream { len, content_length };
    let server = HttpServer::start(vec![
        ("/sized.bin", stream(2 * MIB, true)),
        ("/unsized.bin", stream(2 * MIB, false)),
        ("/small.bin", stream(MIB / 2, false)),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let via = via_with(&state, "--max-archive-bytes 1MiB");
    // Refused on its Content-Length, or counted past the cap while it streams.
    for path in ["/sized.bin", "/unsized.bin"] {
        let url = server.url(path);
        let marker = dir.path().join("ran");
        let r = run(&["--via", &via, "--fetch", &url, "--sh", &touch(&marker)]);
        assert_prep_failed(&r, &url, &["larger than"], &marker);
        assert_eq!(server.hits(path), 1, "a body over the cap is not retried");
        assert_eq!(subdirs(&state.join("instances")), Vec::<PathBuf>::new());
    }
    // The same daemon takes a body under its cap.
    let r = run(&[
        "--via",
        &via,
        "--fetch",
        &server.url("/small.bin"),
        "--sh",
        "wc -c < small.bin",
    ]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert_eq!(r.stdout_text().trim(), (MIB / 2).to_string());
}

// ---------------------------------------------------------------------------------------
// Readiness gates
// ---------------------------------------------------------------------------------------

#[test]
fn a_run_waits_for_a_registry_that_comes_up_late() {
    if !Registry::available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "docker-registry is not installed, and CI is set: CI must install it (apt-get install docker-registry)"
        );
        eprintln!("skipped: docker-registry is not installed (apt-get install docker-registry)");
        return;
    }
    let port = Registry::free_port();
    let url = format!("http://127.0.0.1:{port}/v2/");
    let dir = tempfile::tempdir().unwrap();
    let (_serve, sock) = serve_socket(dir.path(), &["--log-level", "warn"]);
    let s = sock.to_str().unwrap();
    let mut job = spawn_run(&[
        "--socket",
        s,
        "--wait-for",
        &url,
        "--wait-timeout",
        "60s",
        "--sh",
        "echo ran",
    ]);

    let build = wait_preparing(&sock, &mut job);
    assert!(
        build["command"].as_str().is_some_and(|c| c.contains("echo ran")),
        "{build}"
    );
    assert_eq!(job.stdout.text(), "", "the command started before its gate opened");

    // Only now does the registry start.
    let registry = Registry::start(port);
    let r = job.finish(Duration::from_secs(60));
    assert_eq!(
        r.code(),
        0,
        "stderr: {}\nregistry log: {}",
        r.stderr_text(),
        registry.log()
    );
    assert_eq!(r.stdout_text(), "ran\n");
    assert_build_dirs_removed(&dir.path().join("state"));
}

#[test]
fn a_gate_that_never_opens_fails_the_run_at_its_timeout() {
    // Nothing listens on the port: HTTP and TCP gates both stay closed.
    let port = Registry::free_port();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let gates = [
        format!("http://127.0.0.1:{port}/v2/"),
        format!("tcp://127.0.0.1:{port}"),
    ];
    let started = Instant::now();
    let jobs: Vec<(&String, PathBuf, Proc)> = gates
        .iter()
        .enumerate()
        .map(|(i, gate)| {
            let marker = dir.path().join(format!("ran-{i}"));
            let job = spawn_run(&[
                "--via",
                &via_serve(&state),
                "--wait-for",
                gate,
                "--wait-timeout",
                "2s",
                "--sh",
                &touch(&marker),
            ]);
            (gate, marker, job)
        })
        .collect();
    for (gate, marker, job) in jobs {
        let r = job.finish(TIMEOUT);
        assert_prep_failed(&r, gate, &["not ready"], &marker);
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "failed before the wait timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(subdirs(&state.join("instances")), Vec::<PathBuf>::new());
}

/// Starts a socket daemon gated by `serve --wait-for tcp://127.0.0.1:PORT` (nothing
/// listens there yet), submits `tether run --socket S RUN_ARGS --sh SCRIPT`, waits until
/// `tether ps` shows it preparing, calls `while_held`, then opens the gate by listening
/// on the port. Returns what the run printed, and the socket for more runs (with the
/// daemon and its temp dir, which must outlive them).
fn held_by_daemon_gate(
    run_args: &[&str],
    script: &str,
    while_held: impl FnOnce(),
) -> (Finished, PathBuf, Serve, tempfile::TempDir) {
    let port = Registry::free_port();
    let gate = format!("tcp://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let (serve, sock) = serve_socket(dir.path(), &["--log-level", "warn", "--wait-for", &gate]);
    let mut args = vec!["--socket", sock.to_str().unwrap()];
    args.extend_from_slice(run_args);
    args.extend_from_slice(&["--sh", script]);
    let mut job = spawn_run(&args);
    wait_preparing(&sock, &mut job);
    assert_eq!(
        job.stdout.text(),
        "",
        "the command started before the daemon's gate opened"
    );
    while_held();

    // The test opens the gate: a listener accepts connections (the kernel completes
    // the handshake; nothing needs to call accept).
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let r = job.finish(TIMEOUT);
    drop(listener);
    (r, sock, serve, dir)
}

#[test]
fn a_daemon_gate_holds_a_build_that_fetches_until_it_opens() {
    let server = HttpServer::start(vec![("/input.txt", Reply::Body(b"fetched after the gate\n".to_vec()))]);
    let url = server.url("/input.txt");
    let (r, _sock, _serve, dir) = held_by_daemon_gate(&["--fetch", &url], "cat input.txt", || {
        assert_eq!(server.hits("/input.txt"), 0, "fetched before the daemon's gate opened")
    });
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert_eq!(r.stdout_text(), "fetched after the gate\n");
    assert_eq!(server.hits("/input.txt"), 1);
    assert_build_dirs_removed(&dir.path().join("state"));
}

#[test]
fn a_daemon_gate_holds_a_build_with_nothing_to_prepare_of_its_own() {
    // `serve --wait-for` holds every build, also one without gates, fetches or uploads.
    let (r, sock, _serve, dir) = held_by_daemon_gate(&[], "echo held build ran", || {});
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert_eq!(r.stdout_text(), "held build ran\n");

    // A gate that opened stays open: later builds start at once, listener or not.
    let r = run(&["--socket", sock.to_str().unwrap(), "--sh", "echo later build ran"]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert_eq!(r.stdout_text(), "later build ran\n");
    assert_build_dirs_removed(&dir.path().join("state"));
}

#[test]
fn a_daemon_gate_that_never_opens_fails_builds_at_the_serve_timeout() {
    let port = Registry::free_port();
    let gate = format!("tcp://127.0.0.1:{port}");
    let server = HttpServer::start(vec![("/input.txt", Reply::Body(b"never fetched\n".to_vec()))]);
    let url = server.url("/input.txt");
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--log-level", "warn", "--wait-for", &gate, "--wait-timeout", "2s"];
    let (_serve, sock) = serve_socket(dir.path(), &flags);
    let s = sock.to_str().unwrap();
    // A build that fetches, and one with nothing to prepare of its own, side by side.
    let fetch_marker = dir.path().join("ran-fetching");
    let fetching = spawn_run(&["--socket", s, "--fetch", &url, "--sh", &touch(&fetch_marker)]);
    let plain_marker = dir.path().join("ran-plain");
    let plain = spawn_run(&["--socket", s, "--sh", &touch(&plain_marker)]);

    let r = fetching.finish(TIMEOUT);
    assert_prep_failed(&r, &gate, &["not ready", "serve --wait-for"], &fetch_marker);
    assert_eq!(
        server.hits("/input.txt"),
        0,
        "fetched although the daemon's gate never opened"
    );
    let r = plain.finish(TIMEOUT);
    assert_prep_failed(&r, &gate, &["not ready", "serve --wait-for"], &plain_marker);
    assert_build_dirs_removed(&dir.path().join("state"));
}
