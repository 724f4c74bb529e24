//! Uploads and downloads through the real binary: `tether run --upload/--download`.
//!
//! A large mixed tree survives the round trip exactly; downloads happen after failed
//! and timed-out builds too; a byte flipped in transit is caught (by the frame CRC, or
//! with the CRC recomputed by the end-to-end sha256) before the command starts; and
//! hostile archives are refused both by the daemon (uploads, sent raw through the
//! protocol) and by the client (downloads, from a scripted daemon), with a canary
//! directory beside the destination untouched.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use integration_tests::{pseudo_random, run, shell_quote, subdirs, via_serve, DaemonLink, Serve};
use sha2::{Digest, Sha256};
use tether_protocol::{self as wire, ClientMessage, DaemonMessage, ErrorKind};

/// Every path under `root` -> (kind, permission bits, mtime for non-dirs, sha256 of
/// the content or the link target).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (char, u32, i64, [u8; 32])> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel)).unwrap() {
            let rel = rel.join(e.unwrap().file_name());
            let path = root.join(&rel);
            let meta = fs::symlink_metadata(&path).unwrap();
            let (kind, digest) = if meta.is_dir() {
                stack.push(rel.clone());
                ('d', [0; 32])
            } else if meta.file_type().is_symlink() {
                (
                    'l',
                    Sha256::digest(fs::read_link(&path).unwrap().as_os_str().as_bytes()).into(),
                )
            } else {
                ('f', sha256_file(&path))
            };
            let mode = if kind == 'l' { 0 } else { meta.mode() & 0o7777 };
            // A directory's mtime changes whenever something is created in it; files and
            // links keep theirs.
            let mtime = if kind == 'd' { 0 } else { meta.mtime() };
            out.insert(rel, (kind, mode, mtime, digest));
        }
    }
    out
}

fn sha256_file(path: &Path) -> [u8; 32] {
    let mut f = fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    h.finalize().into()
}

/// No build directory is left in the daemon's state dir.
fn assert_no_build_dirs(state: &Path) {
    for instance in subdirs(&state.join("instances")) {
        let builds = subdirs(&instance.join("builds"));
        assert!(builds.is_empty(), "build dirs left: {builds:?}");
    }
}

#[test]
fn a_large_mixed_tree_comes_back_identical() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("tree");
    // 10,000 small files in 100 directories.
    for d in 0..100 {
        let dir = src.join(format!("pkg{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            let data = pseudo_random(100 + (d * 100 + f) % 900, (d * 1000 + f) as u64);
            fs::write(dir.join(format!("f{f:03}.txt")), data).unwrap();
        }
    }
    // A 200 MiB file, written in pieces.
    {
        use std::io::Write;
        let mut big = fs::File::create(src.join("big.bin")).unwrap();
        for i in 0..200 {
            big.write_all(&pseudo_random(1 << 20, 1_000_000 + i)).unwrap();
        }
    }
    fs::create_dir_all(src.join("empty/nested-empty")).unwrap();
    fs::write(src.join("run.sh"), b"#!/bin/sh\necho run\n").unwrap();
    fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(src.join("ro.txt"), b"read only").unwrap();
    fs::set_permissions(src.join("ro.txt"), fs::Permissions::from_mode(0o444)).unwrap();
    std::os::unix::fs::symlink("pkg000/f000.txt", src.join("link-to-file")).unwrap();
    std::os::unix::fs::symlink("pkg001", src.join("link-to-dir")).unwrap();
    for odd in [
        &b"caf\xe9 latin-1"[..],
        b"with space",
        b"new\nline",
        b"-dash",
        b"\xf0\x9f\xa6\x80 crab",
    ] {
        fs::write(src.join(OsStr::from_bytes(odd)), odd).unwrap();
    }
    let before = snapshot(&src);
    assert!(before.len() > 10_000);

    let state = t.path().join("state");
    let back = t.path().join("back");
    let via = via_serve(&state);
    let (src_s, back_s) = (src.to_str().unwrap(), back.to_str().unwrap());
    let f = run(&[
        "--via",
        &via,
        "--upload",
        src_s,
        "--download",
        &format!("tree:{back_s}"),
        "--sh",
        "test -x tree/run.sh && test -L tree/link-to-dir && test -d tree/empty/nested-empty && \
         test $(find tree -type f -printf x | wc -c) -eq 10008 && echo checked",
    ]);
    assert_eq!(f.code(), 0, "stderr: {}", f.stderr_text());
    assert_eq!(f.stdout_text(), "checked\n");
    let after = snapshot(&back.join("tree"));
    assert_eq!(after.len(), before.len());
    for (path, want) in &before {
        assert_eq!(after.get(path), Some(want), "{}", path.display());
    }
    assert_no_build_dirs(&state);
}

#[test]
fn uploads_land_like_cp_and_excludes_are_left_out() {
    let t = tempfile::tempdir().unwrap();
    let ws = t.path().join("ws");
    fs::create_dir_all(ws.join("target/debug")).unwrap();
    fs::create_dir_all(ws.join("src")).unwrap();
    fs::write(ws.join("target/debug/app"), b"binary").unwrap();
    fs::write(ws.join("src/main.rs"), b"fn main() {}").unwrap();
    fs::write(ws.join("src/main.o"), b"object").unwrap();
    fs::write(ws.join("Cargo.toml"), b"[package]").unwrap();
    let state = t.path().join("state");
    let contents = format!("{}/.", ws.display());
    let f = run(&[
        "--via",
        &via_serve(&state),
        "--upload",
        &contents,
        "--upload",
        &format!("{}:vendor/deps", ws.join("src").display()),
        "--exclude",
        "target/**",
        "--exclude",
        "*.o",
        "--sh",
        "find . -type f | sort",
    ]);
    assert_eq!(f.code(), 0, "stderr: {}", f.stderr_text());
    assert_eq!(
        f.stdout_text(),
        "./Cargo.toml\n./src/main.rs\n./vendor/deps/src/main.rs\n",
        "DIR/. sends the contents, DIR:DEST lands as DEST/DIR, excludes apply to both"
    );
}

#[test]
fn downloads_happen_after_a_failing_and_after_a_timed_out_build() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let via = via_serve(&state);
    let out = t.path().join("out");
    let out_s = out.to_str().unwrap();

    let f = run(&[
        "--via",
        &via,
        "--download",
        &format!("reports:{out_s}"),
        "--sh",
        "mkdir reports && echo 'FAILED: 1' > reports/junit.txt && exit 3",
    ]);
    assert_eq!(f.code(), 3, "the build's exit code stays; stderr: {}", f.stderr_text());
    assert_eq!(fs::read(out.join("reports/junit.txt")).unwrap(), b"FAILED: 1\n");

    let f = run(&[
        "--via",
        &via,
        "--timeout",
        "1s",
        "--download",
        &format!("partial.log:{out_s}"),
        "--sh",
        "echo started > partial.log; exec sleep 100",
    ]);
    assert_eq!(f.code(), 124, "timed out; stderr: {}", f.stderr_text());
    assert_eq!(fs::read(out.join("partial.log")).unwrap(), b"started\n");

    // A path the build never made: said clearly, and the status stays the build's.
    let f = run(&[
        "--via",
        &via,
        "--download",
        &format!("missing/thing:{out_s}"),
        "--sh",
        "exit 4",
    ]);
    assert_eq!(f.code(), 4, "stderr: {}", f.stderr_text());
    let err = f.stderr_text();
    assert!(
        err.contains("missing/thing") && err.contains("no such path"),
        "stderr: {err}"
    );
    assert_no_build_dirs(&state);
}

/// `flip` between the client and the daemon: one bit of the first large client frame
/// (an upload piece) flipped, with or without its CRC fixed up.
fn flipped_upload(fix_crc: bool) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("data.bin"), pseudo_random(1 << 20, 42)).unwrap();
    let state = t.path().join("state");
    let marker = t.path().join("command-ran");
    let flip = env!("CARGO_BIN_EXE_flip");
    let log = state.with_extension("flip.log");
    let via = format!(
        "exec {} {}--log {} -- {}",
        shell_quote(OsStr::new(flip)),
        if fix_crc { "--fix-crc " } else { "" },
        shell_quote(log.as_os_str()),
        via_serve(&state).trim_start_matches("exec ")
    );
    let f = run(&[
        "--via",
        &via,
        "--no-reconnect",
        "--upload",
        src.to_str().unwrap(),
        "--sh",
        &format!("touch {}", shell_quote(marker.as_os_str())),
    ]);
    let err = f.stderr_text();
    let said = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        said.contains("flip: flipped byte"),
        "nothing was flipped; stderr: {err}"
    );
    assert_eq!(f.code(), 125, "stderr: {err}");
    assert!(err.contains("sha256 mismatch"), "stderr: {err}");
    assert!(!marker.exists(), "the command ran with a damaged upload");
    assert_no_build_dirs(&state);
}

#[test]
fn a_flipped_byte_with_a_valid_crc_is_caught_by_the_digest() {
    flipped_upload(true);
}

#[test]
fn a_flipped_byte_is_caught_and_the_command_never_starts() {
    flipped_upload(false);
}

// ---------------------------------------------------------------------------------------
// Hostile archives
// ---------------------------------------------------------------------------------------

/// One raw tar entry: a GNU header with `name` and `link` written straight into their
/// fields (so `..` and absolute names get through), `data` padded to a block, and
/// `size` declared.
fn raw_entry(name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8], size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(1_000_000);
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// An extension header (a GNU long name, a PAX record set) holding `data`.
fn extension(kind: tar::EntryType, data: &[u8]) -> Vec<u8> {
    raw_entry(b"././@LongLink", kind, b"", data, data.len() as u64)
}

fn file(name: &[u8], data: &[u8]) -> Vec<u8> {
    raw_entry(name, tar::EntryType::Regular, b"", data, data.len() as u64)
}

fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = entries.concat();
    out.extend_from_slice(&[0; 1024]);
    out
}

/// The hostile archives: (what, archive, a word the refusal must contain). `canary`
/// is an absolute directory outside every destination.
fn hostile_archives(canary: &Path) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let abs = canary.join("abs-evil");
    let canary_b = canary.as_os_str().as_bytes();
    vec![
        (
            "absolute path",
            archive(&[file(abs.as_os_str().as_bytes(), b"x")]),
            "absolute",
        ),
        ("'..' component", archive(&[file(b"a/../../../evil", b"x")]), ".."),
        (
            "symlink out, then a file through it",
            archive(&[
                raw_entry(b"out", tar::EntryType::Symlink, canary_b, b"", 0),
                file(b"out/evil", b"x"),
            ]),
            "out",
        ),
        (
            "symlink up",
            archive(&[raw_entry(b"up", tar::EntryType::Symlink, b"../../..", b"", 0)]),
            "up",
        ),
        (
            "a file through a symlink planted earlier",
            archive(&[
                raw_entry(b"here", tar::EntryType::Symlink, b".", b"", 0),
                raw_entry(b"here/sub", tar::EntryType::Symlink, b"..", b"", 0),
                file(b"here/sub/evil", b"x"),
            ]),
            "here/sub",
        ),
        (
            "hard link to a file outside",
            archive(&[raw_entry(b"hl", tar::EntryType::Link, b"/etc/passwd", b"", 0)]),
            "hl",
        ),
        (
            "device node",
            archive(&[raw_entry(b"dev", tar::EntryType::Char, b"", b"", 0)]),
            "dev",
        ),
        (
            "fifo",
            archive(&[raw_entry(b"fifo", tar::EntryType::Fifo, b"", b"", 0)]),
            "fifo",
        ),
        (
            "declared size larger than the data",
            {
                let mut a = raw_entry(b"liar", tar::EntryType::Regular, b"", b"short", 1 << 20);
                a.truncate(1024);
                a
            },
            "liar",
        ),
        (
            "a GNU long name declaring 256 MiB",
            {
                let mut a = raw_entry(b"././@LongLink", tar::EntryType::GNULongName, b"", b"", 256 << 20);
                a.extend_from_slice(&[b'n'; 64 * 1024]);
                a
            },
            "GNU long name of 268435456 bytes",
        ),
        (
            "a GNU long name of 200 KB",
            archive(&[
                extension(tar::EntryType::GNULongName, &[&[b'n'; 200_000][..], b"\0"].concat()),
                file(b"f", b"x"),
            ]),
            "GNU long name of 200001 bytes",
        ),
        (
            "a PAX header of 2 MiB",
            archive(&[
                extension(tar::EntryType::XHeader, &vec![b'9'; 2 << 20]),
                file(b"f", b"x"),
            ]),
            "PAX header of 2097152 bytes",
        ),
    ]
}

/// Archives over the caps the daemon is started with (`--max-archive-bytes 4096
/// --max-archive-entries 20`).
fn over_caps() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let many: Vec<Vec<u8>> = (0..30).map(|i| file(format!("f{i}").as_bytes(), b"x")).collect();
    vec![
        ("too many entries", archive(&many), "entries"),
        ("too many bytes", archive(&[file(b"big", &[7; 8192])]), "bytes"),
    ]
}

/// Nothing new in `canary` (it holds only `keep`, unchanged) and no `evil` anywhere
/// under `root`.
fn assert_untouched(canary: &Path, root: &Path) {
    let names: Vec<_> = fs::read_dir(canary).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![OsStr::new("keep").to_owned()], "canary dir changed");
    assert_eq!(fs::read(canary.join("keep")).unwrap(), b"sentinel");
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd {
            let e = e.unwrap();
            assert!(
                !e.file_name().as_bytes().ends_with(b"evil"),
                "{} was written",
                e.path().display()
            );
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
}

fn canary(dir: &Path) -> PathBuf {
    let c = dir.join("canary");
    fs::create_dir(&c).unwrap();
    fs::write(c.join("keep"), b"sentinel").unwrap();
    c
}

#[test]
fn the_daemon_refuses_every_hostile_upload_and_never_starts_the_command() {
    let t = tempfile::tempdir().unwrap();
    let canary = canary(t.path());
    let state = t.path().join("state");
    let mut serve = Serve::with_state_dir(
        &state,
        &[
            "--max-archive-bytes",
            "4096",
            "--max-archive-entries",
            "20",
            "--log-level",
            "warn",
        ],
    );
    serve.expect_preamble();
    serve.hello();
    let marker = t.path().join("command-ran");
    let mut cases = hostile_archives(&canary);
    cases.extend(over_caps());
    for (req, (what, bytes, word)) in cases.into_iter().enumerate() {
        let req = req as u64 + 1;
        let mut spec = integration_tests::script_spec(&format!("touch {}", shell_quote(marker.as_os_str())));
        spec.uploads = vec![wire::UploadSpec {
            dest: wire::Bytes::from(b"in".to_vec()),
        }];
        serve.send(&ClientMessage::Run {
            req,
            spec: Box::new(spec),
            follow: true,
        });
        let build = serve.wait_message(|m| match m {
            DaemonMessage::Preparing { req: r, build } if *r == req => Some(build.clone()),
            DaemonMessage::Error(e) if e.req == Some(req) => panic!("{what}: refused early: {e:?}"),
            _ => None,
        });
        for piece in bytes.chunks(wire::MAX_CHUNK) {
            serve.send(&ClientMessage::Upload {
                req,
                index: 0,
                data: wire::Bytes::from(piece.to_vec()),
            });
        }
        serve.send(&ClientMessage::UploadEnd {
            req,
            index: 0,
            bytes: bytes.len() as u64,
            sha256: Sha256::digest(&bytes).into(),
        });
        let err = serve.wait_message(|m| match m {
            DaemonMessage::Error(e) if e.req == Some(req) => Some(e.clone()),
            DaemonMessage::Started(s) if s.req == req => panic!("{what}: the command started"),
            _ => None,
        });
        assert_eq!(err.kind, ErrorKind::Transfer, "{what}: {err:?}");
        assert_eq!(err.build.as_ref(), Some(&build));
        assert!(err.message.contains(word), "{what}: {:?} lacks {word:?}", err.message);
        // Whatever the archive named, the refusal is a short message.
        assert!(
            err.message.len() < 1024,
            "{what}: {} bytes of message",
            err.message.len()
        );
        assert!(!marker.exists(), "{what}: the command ran");
        assert_untouched(&canary, t.path());
        assert_no_build_dirs(&state);
    }
}

/// `tether run --download out:DEST -- make` against `fake-daemon --archive FILE
/// FAKE_ARGS`, which answers the download with `bytes`.
fn download_from_fake(dir: &Path, bytes: &[u8], fake_args: &str, client_args: &[&str]) -> integration_tests::Finished {
    let file = dir.join("archive.tar");
    fs::write(&file, bytes).unwrap();
    let dest = dir.join("dest");
    let via = format!(
        "exec {} --archive {} {fake_args}",
        shell_quote(OsStr::new(env!("CARGO_BIN_EXE_fake-daemon"))),
        shell_quote(file.as_os_str())
    );
    let download = format!("out:{}", dest.display());
    let mut args = vec!["--via", &via, "--no-reconnect", "--download", &download];
    args.extend_from_slice(client_args);
    args.extend_from_slice(&["--", "make"]);
    let f = run(&args);
    fs::remove_dir_all(&dest).ok();
    f
}

#[test]
fn the_client_refuses_every_hostile_download() {
    let t = tempfile::tempdir().unwrap();
    let canary = canary(t.path());
    for (what, bytes, word) in hostile_archives(&canary) {
        let f = download_from_fake(t.path(), &bytes, "", &[]);
        let err = f.stderr_text();
        assert_eq!(f.code(), 125, "{what}: stderr: {err}");
        assert!(err.contains("refused") && err.contains(word), "{what}: stderr: {err}");
        assert_untouched(&canary, t.path());
    }
    // Over the client's own caps.
    let caps = ["--max-archive-bytes", "4096", "--max-archive-entries", "20"];
    for (what, bytes, word) in over_caps() {
        let f = download_from_fake(t.path(), &bytes, "", &caps);
        let err = f.stderr_text();
        assert_eq!(f.code(), 125, "{what}: stderr: {err}");
        assert!(err.contains(word), "{what}: stderr: {err}");
    }
    // A stream whose digest does not match what arrived.
    let f = download_from_fake(
        t.path(),
        &archive(&[file(b"report.txt", b"fine")]),
        "--wrong-sha256",
        &[],
    );
    assert_eq!(f.code(), 125, "stderr: {}", f.stderr_text());
    assert!(
        f.stderr_text().contains("sha256 mismatch"),
        "stderr: {}",
        f.stderr_text()
    );
    // And a good one lands, with the build's own exit code.
    let good = archive(&[file(b"out/report.txt", b"fine")]);
    let file = t.path().join("archive.tar");
    fs::write(&file, &good).unwrap();
    let via = format!(
        "exec {} --archive {} --exit-code 3",
        shell_quote(OsStr::new(env!("CARGO_BIN_EXE_fake-daemon"))),
        shell_quote(file.as_os_str())
    );
    let dest = t.path().join("dest");
    let f = run(&[
        "--via",
        &via,
        "--download",
        &format!("out:{}", dest.display()),
        "--",
        "make",
    ]);
    assert_eq!(f.code(), 3, "stderr: {}", f.stderr_text());
    assert_eq!(fs::read(dest.join("out/report.txt")).unwrap(), b"fine");
}

#[test]
fn a_damaged_stdin_frame_cancels_the_build_instead_of_feeding_it_a_hole() {
    let t = tempfile::tempdir().unwrap();
    let input = t.path().join("input");
    fs::write(&input, pseudo_random(300_000, 9)).unwrap();
    let state = t.path().join("state");
    let log = t.path().join("flip.log");
    let via = format!(
        "exec {} --log {} -- {}",
        shell_quote(OsStr::new(env!("CARGO_BIN_EXE_flip"))),
        shell_quote(log.as_os_str()),
        via_serve(&state).trim_start_matches("exec ")
    );
    let mut cmd = integration_tests::tether(["run", "-i", "--no-reconnect", "--via", &via, "--sh", "wc -c"]);
    cmd.stdin(fs::File::open(&input).unwrap());
    let f = integration_tests::Proc::spawn(&mut cmd).finish(integration_tests::TIMEOUT);
    let err = f.stderr_text();
    let said = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        said.contains("flip: flipped byte"),
        "nothing was flipped; stderr: {err}"
    );
    assert!(err.contains("lost in transit"), "stderr: {err}");
    assert_eq!(f.code(), 125, "stdout: {} stderr: {err}", f.stdout_text());
    assert_ne!(f.stdout_text().trim(), "234464", "the build ran on the damaged input");
}

#[test]
fn a_progress_bar_is_drawn_on_a_terminal_and_nowhere_else() {
    use std::os::fd::AsFd;
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("data.bin"), pseudo_random(32 << 20, 5)).unwrap();
    let state = t.path().join("state");
    let via = via_serve(&state);
    let args = ["run", "--via", &via, "--upload", src.to_str().unwrap(), "--sh", "true"];

    let pty = nix::pty::openpty(None, None).expect("openpty");
    let mut cmd = integration_tests::tether(args);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(
            pty.slave.as_fd().try_clone_to_owned().unwrap(),
        ));
    let mut child = cmd.spawn().unwrap();
    // Only the client (and its daemon) may hold the terminal, or it never reads EOF.
    drop(cmd);
    drop(pty.slave);
    let screen = integration_tests::Collector::spawn(fs::File::from(pty.master));
    let st = integration_tests::wait_child(&mut child, integration_tests::TIMEOUT).expect("the client exits");
    assert_eq!(st.code(), Some(0));
    // The terminal reads EOF once the client and its daemon are gone: all it drew is in.
    assert!(screen.wait_eof(integration_tests::TIMEOUT), "the terminal stayed open");
    let drawn = screen.text();
    assert!(
        drawn.contains("upload") && drawn.contains("ETA") && drawn.contains("/s"),
        "no progress bar on the terminal: {drawn:?}"
    );

    // The same run with stderr a pipe: not a byte of it.
    let f = run(&args[1..]);
    assert_eq!(f.code(), 0);
    assert_eq!(f.stderr_text(), "", "a progress bar went to a pipe");
}

#[test]
fn downloads_of_the_whole_work_dir_and_of_a_directorys_contents() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let all = t.path().join("all");
    let contents = t.path().join("contents");
    let f = run(&[
        "--via",
        &via_serve(&state),
        "--download",
        &format!(".:{}", all.display()),
        "--download",
        &format!("d/.:{}", contents.display()),
        "--sh",
        "mkdir -p d/e && echo 1 > d/e/f && echo 2 > top",
    ]);
    assert_eq!(f.code(), 0, "stderr: {}", f.stderr_text());
    assert_eq!(fs::read(all.join("top")).unwrap(), b"2\n");
    assert_eq!(fs::read(all.join("d/e/f")).unwrap(), b"1\n");
    assert_eq!(fs::read(contents.join("e/f")).unwrap(), b"1\n");
    assert!(!contents.join("d").exists(), "DIR/. sends the contents, not DIR");
}

/// Starts a run with one upload on `serve` and waits for its `Preparing`.
fn start_upload(serve: &mut Serve, req: u64) -> wire::BuildId {
    let mut spec = integration_tests::script_spec("echo should-not-run");
    spec.uploads = vec![wire::UploadSpec {
        dest: wire::Bytes::from(b".".to_vec()),
    }];
    serve.send(&ClientMessage::Run {
        req,
        spec: Box::new(spec),
        follow: true,
    });
    serve.wait_message(|m| match m {
        DaemonMessage::Preparing { req: r, build } if *r == req => Some(build.clone()),
        _ => None,
    })
}

/// The builds the daemon lists (all states), asked on `serve`'s current session.
fn listed(serve: &mut Serve, req: u64) -> Vec<wire::BuildSummary> {
    serve.send(&ClientMessage::List { req, all: true });
    serve.wait_message(|m| match m {
        DaemonMessage::Builds { req: r, builds } if *r == req => Some(builds.clone()),
        _ => None,
    })
}

#[test]
fn an_upload_that_breaks_off_fails_its_run_and_leaves_nothing_behind() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let mut serve = Serve::with_state_dir(&state, &["--log-level", "warn"]);
    serve.expect_preamble();
    serve.hello();

    // A piece out of order: refused, and the run fails instead of waiting forever.
    let build = start_upload(&mut serve, 1);
    serve.send(&ClientMessage::Upload {
        req: 1,
        index: 1,
        data: wire::Bytes::from(vec![0; 512]),
    });
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        serve.wait_message(|m| match m {
            DaemonMessage::Error(e) if e.req == Some(1) => {
                kinds.push(e.kind);
                Some(())
            }
            DaemonMessage::Started(_) => panic!("the command started"),
            _ => None,
        });
    }
    assert_eq!(kinds, [ErrorKind::Protocol, ErrorKind::Transfer]);
    assert!(listed(&mut serve, 2).iter().all(|b| b.build != build));

    // The client goes away mid-upload (another client takes the stream over): the
    // preparation ends with its session, and its directory goes.
    let build = start_upload(&mut serve, 3);
    serve.send(&ClientMessage::Upload {
        req: 3,
        index: 0,
        data: wire::Bytes::from(vec![0; 512]),
    });
    serve.take_over(0x5e55_1000_0000_0002);
    let mut req = 10;
    assert!(
        integration_tests::wait_until(integration_tests::TIMEOUT, || {
            req += 1;
            listed(&mut serve, req).iter().all(|b| b.build != build)
        }),
        "the preparation outlived its session"
    );
    assert_no_build_dirs(&state);
}
