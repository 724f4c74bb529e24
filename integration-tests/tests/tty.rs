//! `tether serve` with a terminal as stdin (pod templates with `tty: true`): frames must
//! pass the line discipline unchanged, and the terminal is restored at exit.

use std::io::Write;
use std::os::fd::AsFd;
use std::process::Stdio;

use integration_tests::{decode_events, frame, hello_message, script_spec, signal, tether, Collector, Event, TIMEOUT};
use nix::sys::signal::Signal;
use nix::sys::termios::{tcgetattr, LocalFlags};
use tether_protocol::{ClientMessage, DaemonMessage, ExitStatus, PREAMBLE};

#[test]
fn frames_survive_a_terminal_on_stdin_and_the_terminal_is_restored() {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let original = tcgetattr(&pty.slave).unwrap();
    assert!(
        original.local_flags.contains(LocalFlags::ICANON),
        "a fresh pty is canonical"
    );
    let dir = tempfile::tempdir().unwrap();

    let mut cmd = tether(["serve", "--log-level", "info", "--state-dir"]);
    cmd.arg(dir.path())
        .stdin(Stdio::from(pty.slave.as_fd().try_clone_to_owned().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = Collector::spawn(child.stderr.take().unwrap());
    let rx = decode_events(child.stdout.take().unwrap());
    // The daemon's first preamble comes after it switched the terminal to raw mode.
    assert!(
        matches!(rx.recv_timeout(TIMEOUT).unwrap(), Event::Preamble),
        "preamble first"
    );

    // Bytes a line discipline would eat or rewrite: ^C (SIGINT), ^D (EOF), ^Z, ^\,
    // XON/XOFF, CR, DEL, and a line longer than the canonical buffer.
    let nasty: Vec<u8> = vec![0x03, 0x04, 0x1a, 0x1c, 0x11, 0x13, b'\r', 0x7f, b'\n', 0x15, 0x17];
    let long_line = "x".repeat(5000);
    let mut script = b"printf '%s' '".to_vec();
    script.extend_from_slice(&nasty);
    script.extend_from_slice(format!("{long_line}'").as_bytes());
    let mut spec = script_spec("");
    spec.command = tether_protocol::CommandSpec::script(&script);
    let mut master = std::fs::File::from(pty.master.as_fd().try_clone_to_owned().unwrap());
    let mut bytes = PREAMBLE.to_vec();
    bytes.extend(frame(&hello_message()));
    bytes.extend(frame(&ClientMessage::Run {
        req: 1,
        spec: Box::new(spec),
        follow: true,
    }));
    master.write_all(&bytes).unwrap();

    let mut output = Vec::new();
    let exited = loop {
        // Preambles come again for the new session; only messages matter here.
        match rx.recv_timeout(TIMEOUT).expect("a reply") {
            Event::Message(DaemonMessage::Output { data, .. }) => output.extend_from_slice(&data),
            Event::Message(DaemonMessage::Exited(e)) => break e,
            Event::Message(DaemonMessage::Error(e)) => {
                panic!("error from the daemon: {e:?}; stderr: {}", stderr.text())
            }
            _ => {}
        }
    };
    assert_eq!(exited.status, ExitStatus::Code(0));
    let mut expected = nasty.clone();
    expected.extend_from_slice(long_line.as_bytes());
    assert_eq!(output, expected, "every byte reached the build and came back unchanged");
    assert!(
        stderr.text().contains("tty: false"),
        "the recommendation is logged: {}",
        stderr.text()
    );

    signal(child.id(), Signal::SIGTERM);
    let st = integration_tests::wait_child(&mut child, TIMEOUT).expect("the daemon exits on SIGTERM");
    assert_eq!(st.code(), Some(0));
    assert_eq!(tcgetattr(&pty.slave).unwrap(), original, "terminal settings restored");
}
