//! Streaming: large output arrives whole and in order, output arrives promptly, and `-i`
//! forwards stdin exactly.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{pseudo_random, signal, tether, Collector, Proc, TIMEOUT};
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};

/// Reads until `buf` is full or EOF; returns the number of bytes read.
fn read_full(src: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    n
}

/// Compares two streams chunk by chunk, never holding more than a chunk of each;
/// returns the common length or fails at the first differing offset.
fn compare_streams(mut a: impl Read, mut b: impl Read) -> u64 {
    const CHUNK: usize = 1 << 20;
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut a, &mut ba);
        let nb = read_full(&mut b, &mut bb);
        if ba[..na.min(nb)] != bb[..na.min(nb)] {
            let i = ba.iter().zip(&bb).position(|(x, y)| x != y).unwrap();
            panic!("streams differ at offset {}", offset + i as u64);
        }
        assert_eq!(na, nb, "one stream ended at offset {}", offset + na.min(nb) as u64);
        offset += na as u64;
        if na < CHUNK {
            return offset;
        }
    }
}

#[test]
fn quarter_gigabyte_of_output_arrives_whole_and_in_order() {
    const LEN: u64 = 256 << 20;
    // seq's output makes any reordering, loss or duplication show at its offset.
    let script = format!("seq 1 40000000 | head -c {LEN}");
    let start = Instant::now();
    let mut client = tether(["run", "--sh", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client_err = Collector::spawn(client.stderr.take().unwrap());
    let mut reference = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let len = compare_streams(client.stdout.take().unwrap(), reference.stdout.take().unwrap());
    assert_eq!(len, LEN);
    assert!(reference.wait().unwrap().success());
    let st = client.wait().unwrap();
    assert_eq!(st.code(), Some(0), "stderr: {}", client_err.text());
    client_err.wait_eof(Duration::from_secs(5));
    assert!(client_err.bytes().is_empty(), "stderr: {}", client_err.text());
    eprintln!("256 MiB streamed and compared in {:?}", start.elapsed());
}

#[test]
fn large_output_with_a_slow_reader_is_not_lost() {
    // The client's stdout is read in small pieces: backpressure, not loss or bloat.
    const LEN: usize = 8 << 20;
    let mut client = tether(["run", "--sh", &format!("seq 1 2000000 | head -c {LEN}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reference = Command::new("sh")
        .args(["-c", &format!("seq 1 2000000 | head -c {LEN}")])
        .output()
        .unwrap()
        .stdout;
    let mut out = client.stdout.take().unwrap();
    let mut got = Vec::with_capacity(LEN);
    let mut buf = [0u8; 4096];
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(client.wait().unwrap().code(), Some(0));
    assert!(
        got == reference,
        "got {} bytes, expected {}",
        got.len(),
        reference.len()
    );
}

#[test]
fn a_line_shows_up_promptly() {
    let start = Instant::now();
    let mut cmd = tether(["run", "--sh", "echo first; sleep 1000"]);
    cmd.stdin(Stdio::null());
    let mut p = Proc::spawn(&mut cmd);
    assert!(
        p.stdout.wait_contains(Duration::from_secs(2), "first\n"),
        "\"first\" not on stdout within 2 s (stdout {:?}, stderr {})",
        p.stdout.text(),
        p.stderr.text()
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    signal(p.pid(), Signal::SIGINT);
    let st = p
        .wait_timeout(Duration::from_secs(5))
        .expect("client exits after SIGINT");
    assert_eq!(st.code(), Some(143));
    assert_eq!(p.stdout.text(), "first\n");
}

#[test]
fn partial_lines_show_up_promptly_on_both_streams() {
    let mut cmd = tether(["run", "--sh", "printf 'no newline'; printf 'err part' >&2; sleep 1000"]);
    cmd.stdin(Stdio::null());
    let mut p = Proc::spawn(&mut cmd);
    assert!(p.stdout.wait_contains(Duration::from_secs(2), "no newline"));
    assert!(p.stderr.wait_contains(Duration::from_secs(2), "err part"));
    signal(p.pid(), Signal::SIGINT);
    assert!(p.wait_timeout(Duration::from_secs(5)).is_some());
}

/// Feeds `data` to `tether run -i ARGS` from a thread; returns the finished client.
fn run_with_stdin(args: &[&str], data: Vec<u8>) -> integration_tests::Finished {
    let mut cmd = tether(["run", "-i"]);
    cmd.args(args).stdin(Stdio::piped());
    let mut p = Proc::spawn(&mut cmd);
    let mut stdin = p.stdin();
    let writer = std::thread::spawn(move || {
        // The build may stop reading early; that is its business.
        let _ = stdin.write_all(&data);
    });
    let r = p.finish(TIMEOUT);
    writer.join().unwrap();
    r
}

#[test]
fn interactive_stdin_is_forwarded_exactly_through_cat() {
    let data = pseudo_random(5 << 20, 42);
    let r = run_with_stdin(&["--", "cat"], data.clone());
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert!(
        r.stdout == data,
        "got {} bytes back, sent {}",
        r.stdout.len(),
        data.len()
    );
}

#[test]
fn interactive_stdin_reaches_eof_and_hashes_the_same() {
    let data = pseudo_random(5 << 20, 43);
    let want = format!("{:x}", Sha256::digest(&data));
    let r = run_with_stdin(&["--", "sha256sum"], data);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert_eq!(r.stdout_text(), format!("{want}  -\n"));
}

#[test]
fn interactive_empty_stdin_is_eof_at_once() {
    let r = run_with_stdin(&["--sh", "wc -c"], Vec::new());
    assert_eq!(r.code(), 0);
    assert_eq!(r.stdout_text().trim(), "0");
}

#[test]
fn interactive_stdin_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(1 << 20, 44);
    let file = dir.path().join("in");
    std::fs::write(&file, &data).unwrap();
    let mut cmd = tether(["run", "-i", "--", "cat"]);
    cmd.stdin(std::fs::File::open(&file).unwrap());
    let r = Proc::spawn(&mut cmd).finish(TIMEOUT);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert!(r.stdout == data);
}

#[test]
fn interactive_build_that_stops_reading_early_still_finishes() {
    // `head -c 10` exits after 10 bytes; the rest of stdin has nowhere to go and must
    // neither hang the client nor change the build's status.
    let data = pseudo_random(4 << 20, 45);
    let r = run_with_stdin(&["--", "head", "-c", "10"], data.clone());
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert_eq!(r.stdout, data[..10]);
}

#[test]
fn interactive_line_by_line_conversation() {
    // The build answers each line as it comes: stdin is forwarded without waiting for EOF.
    let mut cmd = tether([
        "run",
        "-i",
        "--sh",
        r#"echo ready; while read -r line; do echo "got $line"; done; echo bye"#,
    ]);
    cmd.stdin(Stdio::piped());
    let mut p = Proc::spawn(&mut cmd);
    let mut stdin = p.stdin();
    assert!(p.stdout.wait_contains(TIMEOUT, "ready\n"));
    stdin.write_all(b"one\n").unwrap();
    assert!(
        p.stdout.wait_contains(TIMEOUT, "got one\n"),
        "stdout: {}",
        p.stdout.text()
    );
    stdin.write_all(b"two\n").unwrap();
    assert!(
        p.stdout.wait_contains(TIMEOUT, "got two\n"),
        "stdout: {}",
        p.stdout.text()
    );
    drop(stdin);
    let r = p.finish(TIMEOUT);
    assert_eq!(r.code(), 0);
    assert_eq!(r.stdout_text(), "ready\ngot one\ngot two\nbye\n");
}

#[test]
fn interactive_stdin_waits_for_a_slow_reader() {
    // The build reads nothing for a while: flow control holds the data back, none is lost.
    let data = pseudo_random(3 << 20, 46);
    let r = run_with_stdin(&["--sh", "sleep 0.5; exec cat"], data.clone());
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert!(
        r.stdout == data,
        "got {} bytes back, sent {}",
        r.stdout.len(),
        data.len()
    );
}

#[test]
fn interactive_build_that_ignores_stdin_ends_while_stdin_stays_open() {
    let mut cmd = tether(["run", "-i", "--sh", "echo bye; exit 3"]);
    cmd.stdin(Stdio::piped());
    let mut p = Proc::spawn(&mut cmd);
    let _open = p.stdin(); // never written to, never closed
    let st = p
        .wait_timeout(Duration::from_secs(10))
        .expect("the client exits with its build");
    assert_eq!(st.code(), Some(3));
    assert_eq!(p.stdout.text(), "bye\n");
}
