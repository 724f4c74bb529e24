//! Secrets (`--secret-env`, `--secret-file`) through the real binary: the build gets
//! them, its output shows only masks, and tether itself never shows a value: not in the
//! daemon's trace log, `tether ps --json`, `--json` events, or the spool on disk.

use std::path::Path;
use std::process::Stdio;

use integration_tests::{tether, Proc, TIMEOUT};

const SECRET: &str = "kaniko-T0ken/4reg+istry";
const FILE_SECRET: &str = "p4ss word from 'file'";

fn run_on(sock: &Path, args: &[&str], env: &[(&str, &str)]) -> integration_tests::Finished {
    let mut cmd = tether(["run", "--socket", sock.to_str().unwrap()]);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::spawn(&mut cmd).finish(TIMEOUT)
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Every file under `dir`, read whole, that holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                if let Ok(data) = std::fs::read(&p) {
                    if data.windows(needle.len()).any(|w| w == needle) {
                        found.push(p);
                    }
                }
            }
        }
    }
    found
}

#[test]
fn secrets_reach_the_build_and_only_masks_leave_it() {
    let dir = tempfile::tempdir().unwrap();
    let (serve, sock) = integration_tests::serve_socket(dir.path(), &["--log-level", "trace"]);
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{FILE_SECRET}\n")).unwrap();
    let file_arg = format!("PASS={}", secret_file.display());
    let script = r#"
        printf '%s' "$TOKEN" | od -An -tx1 | tr -d ' \n'; echo
        printf '%s' "$PASS" | od -An -tx1 | tr -d ' \n'; echo
        echo "token=$TOKEN"
        printf 'auth:%s' "$TOKEN" | base64
        echo "pass=$PASS" >&2
    "#;
    for json in [false, true] {
        let mut args = vec![
            "--secret-env",
            "TOKEN",
            "--secret-file",
            &file_arg,
            "--name",
            "with-secrets",
        ];
        if json {
            args.push("--json");
        }
        args.extend(["--sh", script]);
        let r = run_on(&sock, &args, &[("TOKEN", SECRET)]);
        assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
        let (out, err) = (r.stdout_text(), r.stderr_text());
        if !json {
            // The values arrived whole (shown in hex, which is not masked; the script
            // does not hold them, or the daemon's log of the request would).
            let expected = format!("{}\n{}\ntoken=****\n", hex(SECRET), hex(FILE_SECRET));
            assert!(out.starts_with(&expected), "{out}");
            // base64 of `auth:` + the token: the secret's own characters are masked.
            assert!(out.contains("YXV0aDp****"), "{out}");
            assert!(err.contains("pass=****"), "{err}");
        }
        for text in [&out, &err] {
            assert!(!text.contains(SECRET) && !text.contains(FILE_SECRET), "{text}");
        }
    }
    let ps = Proc::spawn(tether(["ps", "--json", "--all", "--socket", sock.to_str().unwrap()]).stdin(Stdio::null()))
        .finish(TIMEOUT);
    assert!(
        ps.stdout_text().contains("with-secrets"),
        "ps: {} {}",
        ps.stdout_text(),
        ps.stderr_text()
    );
    for needle in [SECRET, FILE_SECRET] {
        assert!(!ps.stdout_text().contains(needle), "ps: {}", ps.stdout_text());
        assert!(!serve.stderr.text().contains(needle), "the daemon's log holds a secret");
        let on_disk = files_holding(&dir.path().join("state"), needle.as_bytes());
        assert!(on_disk.is_empty(), "secret on disk in {on_disk:?}");
    }
    // The requests were logged whole, secrets included (as names and masks).
    assert!(
        serve.stderr.text().contains("SecretVar"),
        "the daemon logged requests at trace level"
    );
}

#[test]
fn short_or_missing_secrets_are_refused_without_showing_them() {
    let dir = tempfile::tempdir().unwrap();
    let (_serve, sock) = integration_tests::serve_socket(dir.path(), &["--log-level", "warn"]);
    let r = run_on(
        &sock,
        &["--secret-env", "TOKEN", "--sh", "echo ran"],
        &[("TOKEN", "x7q")],
    );
    assert_eq!(r.code(), 125);
    assert!(!r.stdout_text().contains("ran"));
    let err = r.stderr_text();
    assert!(
        err.contains("TOKEN") && err.contains("at least 4 bytes") && !err.contains("x7q"),
        "{err}"
    );

    let r = run_on(&sock, &["--secret-env", "NOT_SET_HERE", "--sh", "echo ran"], &[]);
    assert_eq!(r.code(), 125);
    assert!(r.stderr_text().contains("NOT_SET_HERE"), "{}", r.stderr_text());
}
