//! `tether serve` start-up and shutdown: the preamble, `--exit-on-eof`, SIGTERM/SIGINT with
//! and without running builds, and what it leaves in its state dir.

use std::path::PathBuf;
use std::time::Duration;

use integration_tests::DaemonLink;
use integration_tests::{script_spec, signal, subdirs, wait_until, Event, Serve};
use nix::sys::signal::Signal;
use tether_protocol::{ClientMessage, DaemonMessage, EndCause, ExitStatus, OutputStream};

fn no_instances(state: &std::path::Path) -> Vec<PathBuf> {
    subdirs(&state.join("instances"))
}

#[test]
fn exit_on_eof_exits_zero_at_once_and_removes_its_instance_dir() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Serve::with_state_dir(state.path(), &["--exit-on-eof"]);
    d.expect_preamble();
    assert_eq!(
        no_instances(state.path()).len(),
        1,
        "the running daemon has an instance dir"
    );
    d.close_stdin();
    let st = d.wait_timeout(Duration::from_secs(5)).expect("exits promptly at EOF");
    assert_eq!(st.code(), Some(0), "stderr: {}", d.stderr.text());
    assert_eq!(no_instances(state.path()), Vec::<PathBuf>::new());
    // All it ever wrote: that nobody holds its stdin stream.
    assert!(matches!(d.next_event(), Event::Preamble));
    assert!(matches!(d.next_event(), Event::Message(DaemonMessage::Channel(_))));
    assert!(matches!(d.next_event(), Event::Eof));
}

#[test]
fn exit_on_eof_after_a_session() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Serve::with_state_dir(state.path(), &["--exit-on-eof"]);
    d.hello();
    d.close_stdin();
    let st = d.wait_timeout(Duration::from_secs(5)).expect("exits promptly at EOF");
    assert_eq!(st.code(), Some(0));
    assert_eq!(no_instances(state.path()), Vec::<PathBuf>::new());
}

#[test]
fn without_exit_on_eof_it_stays_until_sigterm() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Serve::with_state_dir(state.path(), &[]);
    d.expect_preamble();
    d.close_stdin();
    // The daemon logs that it saw EOF and serves on.
    assert!(
        d.stderr.wait_contains(Duration::from_secs(10), "stdin closed"),
        "stderr: {}",
        d.stderr.text()
    );
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon exited at EOF");
    assert_eq!(no_instances(state.path()).len(), 1);
    signal(d.pid(), Signal::SIGTERM);
    let st = d.wait_timeout(Duration::from_secs(5)).expect("exits on SIGTERM");
    assert_eq!(st.code(), Some(0), "stderr: {}", d.stderr.text());
    assert_eq!(no_instances(state.path()), Vec::<PathBuf>::new());
}

#[test]
fn sigint_stops_the_daemon_like_sigterm() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Serve::with_state_dir(state.path(), &[]);
    d.hello();
    signal(d.pid(), Signal::SIGINT);
    let st = d.wait_timeout(Duration::from_secs(5)).expect("exits on SIGINT");
    assert_eq!(st.code(), Some(0));
    assert_eq!(no_instances(state.path()), Vec::<PathBuf>::new());
}

#[test]
fn sigterm_cancels_running_builds_reports_them_and_cleans_up() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Serve::with_state_dir(state.path(), &[]);
    d.hello();
    d.send(&ClientMessage::Run {
        req: 7,
        spec: Box::new(script_spec("echo ready; sleep 1000")),
        follow: true,
    });
    let (build, pid) = d.wait_message(|m| match m {
        DaemonMessage::Started(s) if s.req == 7 => Some((s.build.clone(), s.pid)),
        DaemonMessage::Error(e) => panic!("Run failed: {e:?}"),
        _ => None,
    });
    d.wait_message(|m| match m {
        DaemonMessage::Output {
            stream: OutputStream::Stdout,
            data,
            ..
        } if data.as_ref() == b"ready\n" => Some(()),
        _ => None,
    });
    let instance = no_instances(state.path());
    assert_eq!(instance.len(), 1);
    assert_eq!(
        subdirs(&instance[0].join("builds")).len(),
        1,
        "one build dir while it runs"
    );

    signal(d.pid(), Signal::SIGTERM);
    // The client is told why first, then its build ends as cancelled by the shutdown.
    let reason = d.wait_message(|m| match m {
        DaemonMessage::ShuttingDown { reason } => Some(reason.clone()),
        DaemonMessage::Exited(e) => panic!("Exited before ShuttingDown: {e:?}"),
        _ => None,
    });
    assert!(reason.contains("SIGTERM"), "{reason}");
    let exited = d.wait_message(|m| match m {
        DaemonMessage::Exited(e) => Some(e.clone()),
        _ => None,
    });
    assert_eq!(exited.build, build);
    assert_eq!(exited.cause, EndCause::Shutdown);
    assert_eq!(
        exited.status,
        ExitStatus::Signal {
            signal: 15,
            core_dumped: false
        }
    );
    // Nothing after Exited but the end of the stream.
    loop {
        match d.next_event() {
            Event::Eof => break,
            Event::Message(DaemonMessage::Exited(e)) => panic!("a second Exited: {e:?}"),
            Event::Message(_) | Event::Preamble => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let st = d.wait_timeout(Duration::from_secs(5)).expect("exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "stderr: {}", d.stderr.text());
    assert!(integration_tests::pid_gone(pid as i32));
    assert_eq!(no_instances(state.path()), Vec::<PathBuf>::new(), "no build dir left");
}

#[test]
fn eof_with_exit_on_eof_cancels_running_builds() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Serve::with_state_dir(state.path(), &["--exit-on-eof", "--grace", "300ms"]);
    d.hello();
    d.send(&ClientMessage::Run {
        req: 1,
        spec: Box::new(script_spec(r#"trap "" TERM; echo ready; sleep 1000"#)),
        follow: true,
    });
    let pid = d.wait_message(|m| match m {
        DaemonMessage::Started(s) => Some(s.pid),
        DaemonMessage::Error(e) => panic!("Run failed: {e:?}"),
        _ => None,
    });
    d.wait_message(|m| matches!(m, DaemonMessage::Output { .. }).then_some(()));
    d.close_stdin();
    // The build ignores SIGTERM: the daemon's --grace applies, then SIGKILL.
    let exited = d.wait_message(|m| match m {
        DaemonMessage::Exited(e) => Some(e.clone()),
        _ => None,
    });
    assert_eq!(exited.cause, EndCause::Shutdown);
    assert_eq!(
        exited.status,
        ExitStatus::Signal {
            signal: 9,
            core_dumped: false
        }
    );
    let st = d.wait_timeout(Duration::from_secs(5)).expect("exits after EOF");
    assert_eq!(st.code(), Some(0));
    assert!(wait_until(Duration::from_secs(2), || integration_tests::pid_gone(
        pid as i32
    )));
    assert_eq!(no_instances(state.path()), Vec::<PathBuf>::new());
}

#[test]
fn a_new_daemon_sweeps_the_state_of_a_killed_one() {
    let state = tempfile::tempdir().unwrap();
    let mut dead = Serve::with_state_dir(state.path(), &[]);
    dead.expect_preamble();
    let old = no_instances(state.path());
    assert_eq!(old.len(), 1);
    signal(dead.pid(), Signal::SIGKILL);
    dead.wait_timeout(Duration::from_secs(5)).expect("SIGKILL ends it");
    assert!(old[0].exists(), "a killed daemon cannot clean up");

    let mut d = Serve::with_state_dir(state.path(), &["--exit-on-eof"]);
    d.expect_preamble();
    assert!(!old[0].exists(), "the dead daemon's instance dir was not swept");
    assert_eq!(no_instances(state.path()).len(), 1);
    d.close_stdin();
    assert_eq!(d.wait_timeout(Duration::from_secs(5)).and_then(|s| s.code()), Some(0));
}

#[test]
fn a_running_daemons_instance_is_not_swept_by_another() {
    let state = tempfile::tempdir().unwrap();
    let mut a = Serve::with_state_dir(state.path(), &["--exit-on-eof"]);
    a.hello();
    let mut b = Serve::with_state_dir(state.path(), &["--exit-on-eof"]);
    b.hello();
    assert_eq!(no_instances(state.path()).len(), 2);
    // The first daemon still runs builds.
    a.send(&ClientMessage::Run {
        req: 1,
        spec: Box::new(script_spec("exit 5")),
        follow: true,
    });
    let exited = a.wait_message(|m| match m {
        DaemonMessage::Exited(e) => Some(e.clone()),
        DaemonMessage::Error(e) => panic!("Run failed: {e:?}"),
        _ => None,
    });
    assert_eq!(exited.status, ExitStatus::Code(5));
    a.close_stdin();
    b.close_stdin();
    assert_eq!(a.wait_timeout(Duration::from_secs(5)).and_then(|s| s.code()), Some(0));
    assert_eq!(b.wait_timeout(Duration::from_secs(5)).and_then(|s| s.code()), Some(0));
    assert_eq!(no_instances(state.path()), Vec::<PathBuf>::new());
}
