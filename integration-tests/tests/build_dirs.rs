//! Builds run in private directories: cwd is `<state>/instances/<inst>/builds/<id>/work`,
//! TMPDIR its sibling `tmp`, both 0700; concurrent builds never share them; they are gone
//! once the build is over.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use integration_tests::DaemonLink;
use integration_tests::{run, script_spec, subdirs, tether, via_serve, Proc, Serve, TIMEOUT};
use tether_protocol::{ClientMessage, DaemonMessage, EnvVar};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Prints cwd, TMPDIR and TETHER_BUILD_ID, then waits for its stdin to end.
const REPORT_AND_WAIT: &str = r#"pwd -P; printf '%s\n%s\n' "$TMPDIR" "$TETHER_BUILD_ID"; read x; echo done"#;

/// What a build reported about its directories.
#[derive(Debug)]
struct Dirs {
    work: PathBuf,
    tmp: PathBuf,
    id: String,
}

impl Dirs {
    fn parse(text: &str) -> Dirs {
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() >= 3, "build output: {text:?}");
        Dirs {
            work: PathBuf::from(lines[0]),
            tmp: PathBuf::from(lines[1]),
            id: lines[2].to_owned(),
        }
    }

    /// `<build dir>`, the parent of both work and tmp.
    fn root(&self) -> &Path {
        self.work.parent().unwrap()
    }

    /// Checks the layout under `state` and the modes, while the build runs.
    fn check_layout(&self, state: &Path) {
        let state = state.canonicalize().unwrap();
        let root = self.root();
        assert_eq!(self.work.file_name().unwrap(), "work", "{self:?}");
        assert_eq!(self.tmp, root.join("tmp"), "{self:?}");
        let dir_name = root.file_name().unwrap().to_str().unwrap();
        assert!(
            dir_name.starts_with(&format!("{}.", self.id)),
            "the dir is named for TETHER_BUILD_ID: {dir_name} for {}",
            self.id
        );
        let builds = root.parent().unwrap();
        assert_eq!(builds.file_name().unwrap(), "builds");
        let instance = builds.parent().unwrap();
        assert_eq!(instance.parent().unwrap(), state.join("instances"), "{self:?}");
        for dir in [
            &state,
            &state.join("instances"),
            &instance.to_path_buf(),
            &builds.to_path_buf(),
        ] {
            // Searchable (a build running as another user reaches its own dir), listable
            // by the daemon's user alone.
            assert_eq!(mode(dir), 0o711, "mode of {}", dir.display());
        }
        for dir in [root, &self.work, &self.tmp] {
            assert_eq!(mode(dir), 0o700, "mode of {}", dir.display());
        }
    }
}

/// Starts `tether run -i ARGS` through a daemon on `state`; waits until it reported its dirs.
fn start_reporting(state: &Path, extra: &[&str]) -> (Proc, Dirs) {
    let mut cmd = tether(["run", "-i", "--via", &via_serve(state)]);
    cmd.args(extra).args(["--sh", REPORT_AND_WAIT]).stdin(Stdio::piped());
    let p = Proc::spawn(&mut cmd);
    assert!(
        p.stdout
            .wait_for(TIMEOUT, |d| d.iter().filter(|&&b| b == b'\n').count() >= 3),
        "no report from the build; stdout {:?} stderr {}",
        p.stdout.text(),
        p.stderr.text()
    );
    let dirs = Dirs::parse(&p.stdout.text());
    (p, dirs)
}

#[test]
fn concurrent_builds_get_private_dirs_that_are_removed_afterwards() {
    let state = tempfile::tempdir().unwrap();
    let (mut a, da) = start_reporting(state.path(), &["--name", "same"]);
    let (mut b, db) = start_reporting(state.path(), &["--name", "same"]);
    da.check_layout(state.path());
    db.check_layout(state.path());
    assert_ne!(da.root(), db.root());
    assert_ne!(da.id, db.id);
    assert!(da.id.starts_with("same"), "{}", da.id);
    // Each build sees only its own dirs.
    assert!(!db.work.starts_with(da.root()) && !da.work.starts_with(db.root()));

    drop(a.stdin());
    drop(b.stdin());
    for (p, d) in [(a, da), (b, db)] {
        let r = p.finish(TIMEOUT);
        assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
        assert!(r.stdout_text().ends_with("done\n"));
        assert!(!d.root().exists(), "{} left behind", d.root().display());
    }
    assert_eq!(subdirs(&state.path().join("instances")), Vec::<PathBuf>::new());
}

#[test]
fn default_state_dir_is_private_to_the_user_in_the_temp_dir() {
    let r = run(&["--sh", r#"pwd -P; echo "$TMPDIR""#]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    let text = r.stdout_text();
    let dirs: Vec<&str> = text.lines().collect();
    let root = std::env::temp_dir()
        .join(format!("tether-{}", nix::unistd::geteuid()))
        .canonicalize()
        .unwrap();
    let work = Path::new(dirs[0]);
    assert!(
        work.starts_with(root.join("instances")),
        "cwd {work:?} not under {root:?}"
    );
    assert_eq!(Path::new(dirs[1]), work.parent().unwrap().join("tmp"));
    assert_eq!(mode(&root), 0o711);
    assert!(!work.parent().unwrap().exists(), "the build dir outlived the build");
}

#[test]
fn everything_a_build_leaves_in_its_dirs_is_removed() {
    let state = tempfile::tempdir().unwrap();
    let script = r#"
        pwd -P
        mkdir -p deep/a/b/c && echo x > deep/a/b/c/file
        ln -s / root-link; ln -s /nonexistent dangling
        mkfifo fifo
        echo t > "$TMPDIR/t"
        mkdir ro && touch ro/f && chmod 0500 ro && chmod 0400 ro/f
        chmod 0000 deep/a
    "#;
    let r = run(&["--via", &via_serve(state.path()), "--sh", script]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    let work = PathBuf::from(r.stdout_text().lines().next().unwrap());
    assert!(!work.parent().unwrap().exists(), "{} left behind", work.display());
    // The symlink to / was not followed.
    assert!(Path::new("/bin").exists() || Path::new("/usr").exists());
    assert_eq!(subdirs(&state.path().join("instances")), Vec::<PathBuf>::new());
}

#[test]
fn one_daemon_gives_concurrent_builds_different_dirs_and_removes_each_at_its_end() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Serve::with_state_dir(state.path(), &["--exit-on-eof"]);
    d.hello();
    let script = r#"pwd -P; printf '%s\n%s\n' "$TMPDIR" "$TETHER_BUILD_ID"; read x; exit $CODE"#;
    for (req, code) in [(1u64, "1"), (2, "2")] {
        let mut spec = script_spec(script);
        spec.stdin = true;
        spec.env = vec![EnvVar {
            name: b"CODE".as_slice().into(),
            value: code.as_bytes().into(),
        }];
        d.send(&ClientMessage::Run {
            req,
            spec: Box::new(spec),
            follow: true,
        });
    }
    // Collect both builds' reports.
    let mut builds = Vec::new(); // (req, build id)
    let mut out: std::collections::HashMap<String, Vec<u8>> = Default::default();
    while builds.len() < 2
        || out
            .values()
            .filter(|o| o.iter().filter(|&&b| b == b'\n').count() >= 3)
            .count()
            < 2
    {
        match d.next_message() {
            DaemonMessage::Started(s) => builds.push((s.req, s.build.clone())),
            DaemonMessage::Output { build, data, .. } => out.entry(build.0).or_default().extend_from_slice(&data),
            DaemonMessage::Error(e) => panic!("{e:?}"),
            _ => {}
        }
    }
    builds.sort();
    let dirs: Vec<Dirs> = builds
        .iter()
        .map(|(_, b)| Dirs::parse(std::str::from_utf8(&out[&b.0]).unwrap()))
        .collect();
    for (dirs, (_, b)) in dirs.iter().zip(&builds) {
        dirs.check_layout(state.path());
        assert_eq!(dirs.id, b.0, "TETHER_BUILD_ID is the build's id");
    }
    assert_ne!(dirs[0].root(), dirs[1].root());
    // Same instance: one daemon.
    assert_eq!(dirs[0].root().parent(), dirs[1].root().parent());

    // End the first build only: its dir is gone when Exited arrives, the other's is not.
    d.send(&ClientMessage::CloseStdin {
        build: builds[0].1.clone(),
    });
    let e = d.wait_message(|m| match m {
        DaemonMessage::Exited(e) => Some(e.clone()),
        _ => None,
    });
    assert_eq!(e.build, builds[0].1);
    assert_eq!(e.status, tether_protocol::ExitStatus::Code(1));
    assert!(!dirs[0].root().exists(), "the first build's dir outlived its Exited");
    assert!(dirs[1].work.is_dir(), "the second build's dir went away while it ran");

    d.send(&ClientMessage::CloseStdin {
        build: builds[1].1.clone(),
    });
    let e = d.wait_message(|m| match m {
        DaemonMessage::Exited(e) => Some(e.clone()),
        _ => None,
    });
    assert_eq!(e.build, builds[1].1);
    assert_eq!(e.status, tether_protocol::ExitStatus::Code(2));
    assert!(!dirs[1].root().exists());
    d.close_stdin();
    assert_eq!(d.wait_timeout(Duration::from_secs(5)).and_then(|s| s.code()), Some(0));
}

#[test]
fn build_names_cannot_escape_the_builds_dir() {
    let state = tempfile::tempdir().unwrap();
    for name in ["../../escape", "/abs", "..", "a b/c", ""] {
        let r = run(&[
            "--via",
            &via_serve(state.path()),
            "--name",
            name,
            "--sh",
            r#"pwd -P; echo "$TETHER_BUILD_ID""#,
        ]);
        assert_eq!(r.code(), 0, "--name {name:?}: stderr: {}", r.stderr_text());
        let text = r.stdout_text();
        let lines: Vec<&str> = text.lines().collect();
        assert!(!lines[1].contains('/'), "--name {name:?}: id {:?}", lines[1]);
        let work = Path::new(lines[0]);
        let builds = work.parent().unwrap().parent().unwrap();
        assert_eq!(builds.file_name().unwrap(), "builds", "--name {name:?}: {work:?}");
        assert!(work.starts_with(state.path().canonicalize().unwrap()), "{work:?}");
    }
    assert!(!state.path().parent().unwrap().join("escape").exists());
}
