//! `tether install DIR` and `tether serve --publish-client DIR`.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use integration_tests::DaemonLink;
use integration_tests::{tether, tether_bin, wait_until, Proc, Serve, TIMEOUT};

#[test]
fn install_copies_the_binary_atomically_and_executable() {
    let dir = tempfile::tempdir().unwrap();
    // An older file in the way is replaced, not appended to or left half-written.
    std::fs::write(dir.path().join("tether"), b"old contents").unwrap();
    let r = Proc::spawn(tether(["install"]).arg(dir.path()).stdin(Stdio::null())).finish(TIMEOUT);
    assert_eq!(r.code(), 0, "{}", r.stderr_text());
    let dest = dir.path().join("tether");
    assert_eq!(r.stdout_text().trim(), dest.to_str().unwrap());
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(tether_bin()).unwrap());
    assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o755);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["tether"], "no temporary file left behind");

    // The copy is a working client: it runs a build through its own daemon.
    let out = std::process::Command::new(&dest)
        .args(["run", "--sh", "echo from the copy"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from the copy\n");
}

#[test]
fn install_creates_a_missing_dir_and_names_what_is_in_its_way() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("a/b");
    let r = Proc::spawn(tether(["install"]).arg(&missing).stdin(Stdio::null())).finish(TIMEOUT);
    assert_eq!(r.code(), 0, "{}", r.stderr_text());
    for d in [dir.path().join("a"), missing.clone()] {
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o7777, 0o755, "{}", d.display());
    }
    assert!(missing.join("tether").is_file());
    // A file where the directory must be: a clear failure naming it.
    std::fs::write(dir.path().join("file"), "x").unwrap();
    let blocked = dir.path().join("file/sub");
    let r = Proc::spawn(tether(["install"]).arg(&blocked).stdin(Stdio::null())).finish(TIMEOUT);
    assert_eq!(r.code(), 125);
    assert!(r.stderr_text().contains("file/sub"), "{}", r.stderr_text());
}

#[test]
fn serve_publishes_the_client_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let publish = dir.path().join("shared");
    std::fs::create_dir(&publish).unwrap();
    let mut serve = Serve::with_state_dir(
        &dir.path().join("state"),
        &["--exit-on-eof", "--publish-client", publish.to_str().unwrap()],
    );
    serve.expect_preamble();
    let dest = publish.join("tether");
    assert!(wait_until(TIMEOUT, || dest.exists()), "{}", serve.stderr.text());
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(tether_bin()).unwrap());
    serve.close_stdin();
    assert_eq!(serve.wait_timeout(TIMEOUT).and_then(|s| s.code()), Some(0));
}
