//! `tether serve` on a damaged or misused stream: errors are reported with the right
//! kind and the session goes on.

use integration_tests::DaemonLink;
use integration_tests::{frame, hello_message, script_spec, Event, Serve};
use tether_protocol::{
    encode_frame, BuildId, ClientMessage, DaemonMessage, ErrorKind, ErrorReport, Hello, FRAME_HEADER_LEN, MAGIC,
    PREAMBLE,
};

fn serve() -> (tempfile::TempDir, Serve) {
    let state = tempfile::tempdir().unwrap();
    let d = Serve::with_state_dir(state.path(), &["--exit-on-eof"]);
    (state, d)
}

fn expect_error(d: &mut Serve) -> ErrorReport {
    match d.next_message() {
        DaemonMessage::Error(e) => e,
        other => panic!("expected an Error, got {other:?}"),
    }
}

fn ping_pong(d: &mut Serve, nonce: u64) {
    d.send(&ClientMessage::Ping { nonce });
    match d.next_message() {
        DaemonMessage::Pong { nonce: n } => assert_eq!(n, nonce),
        other => panic!("expected Pong {nonce}, got {other:?}"),
    }
}

#[test]
fn garbage_after_the_preamble_is_a_protocol_error_and_the_session_survives() {
    let (_state, mut d) = serve();
    d.hello();
    d.send_raw(b"this is not a frame\n");
    let e = expect_error(&mut d);
    assert_eq!(e.kind, ErrorKind::Protocol, "{e:?}");
    assert_eq!(e.req, None);
    ping_pong(&mut d, 1);
}

#[test]
fn a_frame_with_a_bad_checksum_is_a_protocol_error_and_the_session_survives() {
    let (_state, mut d) = serve();
    d.hello();
    let mut bad = frame(&ClientMessage::Ping { nonce: 2 });
    bad[8] ^= 0x01; // the checksum's first byte
    d.send_raw(&bad);
    let e = expect_error(&mut d);
    assert_eq!(e.kind, ErrorKind::Protocol, "{e:?}");
    // The damaged Ping was not answered; the next one is.
    ping_pong(&mut d, 3);
}

#[test]
fn a_damaged_payload_is_caught_by_the_checksum() {
    let (_state, mut d) = serve();
    d.hello();
    let mut bad = frame(&ClientMessage::Ping { nonce: 4 });
    let last = bad.len() - 1;
    bad[last] ^= 0x40;
    // The damaged frame and a good one in a single write.
    bad.extend_from_slice(&frame(&ClientMessage::Ping { nonce: 5 }));
    d.send_raw(&bad);
    let e = expect_error(&mut d);
    assert_eq!(e.kind, ErrorKind::Protocol, "{e:?}");
    match d.next_message() {
        DaemonMessage::Pong { nonce } => assert_eq!(nonce, 5),
        other => panic!("expected Pong 5, got {other:?}"),
    }
}

#[test]
fn an_impossible_length_is_a_protocol_error_and_the_session_survives() {
    let (_state, mut d) = serve();
    d.hello();
    let mut bad = MAGIC.to_vec();
    bad.extend_from_slice(&u32::MAX.to_le_bytes());
    bad.extend_from_slice(&[0; 4]);
    d.send_raw(&bad);
    let e = expect_error(&mut d);
    assert_eq!(e.kind, ErrorKind::Protocol, "{e:?}");
    ping_pong(&mut d, 6);
}

#[test]
fn an_intact_frame_holding_no_known_message_is_a_protocol_error() {
    let (_state, mut d) = serve();
    d.hello();
    // A correctly framed payload with an unknown variant tag.
    d.send_raw(&tether_protocol::frame::frame_bytes(&[200, 1, 2, 3]));
    let e = expect_error(&mut d);
    assert_eq!(e.kind, ErrorKind::Protocol, "{e:?}");
    // A correctly framed empty payload holds no message either.
    d.send_raw(&tether_protocol::frame::frame_bytes(&[]));
    let e = expect_error(&mut d);
    assert_eq!(e.kind, ErrorKind::Protocol, "{e:?}");
    ping_pong(&mut d, 7);
}

#[test]
fn damage_is_reported_once_per_episode() {
    let (_state, mut d) = serve();
    d.hello();
    // Several damaged pieces in a row, then a good frame: one error, then the Pong.
    let mut junk = b"junk".to_vec();
    let mut bad = frame(&ClientMessage::Ping { nonce: 8 });
    bad[9] ^= 0xFF;
    junk.extend_from_slice(&bad);
    junk.extend_from_slice(b"more junk");
    junk.extend_from_slice(&frame(&ClientMessage::Ping { nonce: 9 }));
    d.send_raw(&junk);
    let e = expect_error(&mut d);
    assert_eq!(e.kind, ErrorKind::Protocol, "{e:?}");
    match d.next_message() {
        DaemonMessage::Pong { nonce } => assert_eq!(nonce, 9),
        other => panic!("expected Pong 9 after a single error, got {other:?}"),
    }
}

#[test]
fn junk_before_the_preamble_is_skipped_silently() {
    let (_state, mut d) = serve();
    let mut bytes =
        b"Welcome!\r\nIf you don't see a command prompt, try pressing enter.\n\xF4THR<===[TE\x00\xff".to_vec();
    bytes.extend_from_slice(PREAMBLE);
    encode_frame(&hello_message(), &mut bytes).unwrap();
    encode_frame(&ClientMessage::Ping { nonce: 10 }, &mut bytes).unwrap();
    d.send_raw(&bytes);
    match d.next_message() {
        DaemonMessage::Welcome(_) => {}
        other => panic!("expected Welcome first, got {other:?}"),
    }
    match d.next_message() {
        DaemonMessage::Pong { nonce } => assert_eq!(nonce, 10),
        other => panic!("expected Pong, got {other:?}"),
    }
}

#[test]
fn requests_before_hello_get_no_session() {
    let (_state, mut d) = serve();
    let mut bytes = PREAMBLE.to_vec();
    encode_frame(
        &ClientMessage::Run {
            req: 1,
            spec: Box::new(script_spec("echo should-not-run")),
            follow: true,
        },
        &mut bytes,
    )
    .unwrap();
    d.send_raw(&bytes);
    let e = expect_error(&mut d);
    assert_eq!(e.kind, ErrorKind::NoSession, "{e:?}");
    // Ping is allowed before Hello; then Hello opens the session.
    ping_pong(&mut d, 11);
    d.send(&hello_message());
    match d.next_message() {
        DaemonMessage::Welcome(w) => assert!(w.builds.is_empty()),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

#[test]
fn a_wrong_protocol_version_is_refused_by_name() {
    let (_state, mut d) = serve();
    let mut bytes = PREAMBLE.to_vec();
    encode_frame(
        &ClientMessage::Hello(tether_protocol::Hello {
            protocol: 999,
            client_version: "from-the-future".into(),
            capabilities: Vec::new(),
        }),
        &mut bytes,
    )
    .unwrap();
    d.send_raw(&bytes);
    let e = expect_error(&mut d);
    assert_eq!(e.kind, ErrorKind::VersionMismatch, "{e:?}");
    assert!(e.message.contains("999"), "{}", e.message);
}

#[test]
fn unknown_builds_and_bad_requests_are_answered_with_their_kinds() {
    let (_state, mut d) = serve();
    d.hello();
    let nobody = BuildId("no-such-build".into());
    d.send(&ClientMessage::Cancel {
        req: 5,
        build: nobody.clone(),
        force: false,
    });
    let e = expect_error(&mut d);
    assert_eq!((e.kind, e.req), (ErrorKind::UnknownBuild, Some(5)), "{e:?}");
    d.send(&ClientMessage::Stdin {
        build: nobody,
        offset: 0,
        data: b"x".as_slice().into(),
    });
    let e = expect_error(&mut d);
    assert_eq!(e.kind, ErrorKind::UnknownBuild, "{e:?}");
    d.send(&ClientMessage::Run {
        req: 6,
        spec: Box::new(tether_protocol::RunSpec {
            command: tether_protocol::CommandSpec::Argv(Vec::new()),
            ..script_spec("")
        }),
        follow: true,
    });
    let e = expect_error(&mut d);
    assert_eq!((e.kind, e.req), (ErrorKind::BadRequest, Some(6)), "{e:?}");
    ping_pong(&mut d, 12);
}

#[test]
fn a_new_preamble_starts_a_new_session_on_the_same_stream() {
    // Takeover: a second client writes zero padding and its own preamble mid-stream,
    // even in the middle of a frame the first client left unfinished.
    let (_state, mut d) = serve();
    d.hello();
    let half = frame(&ClientMessage::Ping { nonce: 13 });
    d.send_raw(&half[..FRAME_HEADER_LEN + 1]);
    let w = d.take_over(0x0123_4567_89ab_cdef);
    assert!(w.builds.is_empty());
    ping_pong(&mut d, 14);
}

#[test]
fn a_hello_while_another_session_holds_the_stream_is_refused_and_the_holder_goes_on() {
    let (_state, mut d) = serve();
    let mut first = PREAMBLE.to_vec();
    encode_frame(&ClientMessage::Hello(Hello::new("0.1.0", 1, false)), &mut first).unwrap();
    d.send_raw(&first);
    let w = d.wait_message(|m| match m {
        DaemonMessage::Welcome(w) => Some(w.clone()),
        _ => None,
    });
    assert_eq!(w.session, 1);
    // A second client that did not wait for the stream: refused by name, in the open.
    let mut second = PREAMBLE.to_vec();
    encode_frame(&ClientMessage::Hello(Hello::new("0.1.0", 2, false)), &mut second).unwrap();
    d.send_raw(&second);
    let refusal = loop {
        match d.next_event() {
            Event::Message(DaemonMessage::Channel(state)) if state.refused.is_some() => break state,
            Event::Message(DaemonMessage::Welcome(w)) => panic!("a second session started: {w:?}"),
            _ => {}
        }
    };
    assert_eq!(refusal.refused, Some(2));
    assert_eq!(refusal.holder.map(|h| h.session), Some(1));
    // The holder's session goes on; when it says goodbye, the stream is free.
    ping_pong(&mut d, 15);
    d.send(&ClientMessage::Goodbye);
    loop {
        match d.next_event() {
            Event::Message(DaemonMessage::Channel(state)) if state.holder.is_none() => break,
            Event::Message(DaemonMessage::Channel(_)) | Event::Preamble => {}
            other => panic!("expected the stream announced free, got {other:?}"),
        }
    }
    let mut third = PREAMBLE.to_vec();
    encode_frame(&ClientMessage::Hello(Hello::new("0.1.0", 3, false)), &mut third).unwrap();
    d.send_raw(&third);
    let w = d.wait_message(|m| match m {
        DaemonMessage::Welcome(w) => Some(w.clone()),
        _ => None,
    });
    assert_eq!(w.session, 3);
}
