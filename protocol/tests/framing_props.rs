//! Property tests of framing: any messages, any split points, junk between frames, any
//! single-byte corruption.

use std::fmt::Debug;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use serde::{de::DeserializeOwned, Serialize};
use tether_protocol::*;

// ---------------------------------------------------------------------------------------
// Strategies

/// Integers of every varint width.
fn int() -> impl Strategy<Value = u64> {
    prop_oneof![0..=250u64, 251..=0xFFFFu64, 0x1_0000..=u32::MAX as u64, any::<u64>(),]
}

fn int32() -> impl Strategy<Value = u32> {
    prop_oneof![0..=250u32, 251..=0xFFFFu32, any::<u32>()]
}

fn bytes() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        30 => vec(any::<u8>(), 0..300),
        // Traps: magics, preambles and whole frame headers inside data.
        3 => vec(
            prop_oneof![
                Just(MAGIC.to_vec()),
                Just(PREAMBLE.to_vec()),
                Just([&MAGIC[..], &(MAX_PAYLOAD as u32).to_le_bytes(), &[0; 4]].concat()),
                vec(any::<u8>(), 0..8),
            ],
            0..8
        )
        .prop_map(|parts| parts.concat()),
        1 => (0..=MAX_CHUNK, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
    ]
    .prop_map(Bytes::from)
}

fn opt_bytes() -> impl Strategy<Value = Option<Bytes>> {
    proptest::option::of(bytes())
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._-]{0,12}",
        any::<String>(),
        (251..400usize).prop_map(|n| "x".repeat(n)),
    ]
}

fn build_id() -> impl Strategy<Value = BuildId> {
    text().prop_map(BuildId)
}

fn command() -> impl Strategy<Value = CommandSpec> {
    prop_oneof![
        vec(bytes(), 0..4).prop_map(CommandSpec::Argv),
        (bytes(), opt_bytes()).prop_map(|(script, shell)| CommandSpec::Script { script, shell }),
    ]
}

fn run_spec() -> impl Strategy<Value = RunSpec> {
    (
        command(),
        vec(
            (bytes(), bytes()).prop_map(|(name, value)| EnvVar { name, value }),
            0..4,
        ),
        opt_bytes(),
        proptest::option::of(int()),
        proptest::option::of(int()),
        any::<bool>(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        prepare(),
        confine(),
    )
        .prop_map(
            |(command, env, workdir, timeout_ms, grace_ms, stdin, name, id, prepare, confine)| RunSpec {
                command,
                env,
                workdir,
                timeout_ms,
                grace_ms,
                stdin,
                name,
                id,
                uploads: prepare.0,
                fetches: prepare.1,
                wait_for: prepare.2,
                wait_timeout_ms: prepare.3,
                hold_after_ms: prepare.4,
                hold_on_failure_ms: prepare.5,
                hold_before_ms: prepare.6,
                secrets: Vec::new(),
                user: confine.0,
                limits: confine.1,
            },
        )
}

/// `RunSpec::user` and `RunSpec::limits`.
fn confine() -> impl Strategy<Value = (Option<RunAs>, ResourceLimits)> {
    let limit = || proptest::option::of(int());
    (
        proptest::option::of((int32(), proptest::option::of(int32())).prop_map(|(uid, gid)| RunAs { uid, gid })),
        (limit(), limit(), limit(), limit(), limit()).prop_map(|(nofile, nproc, cpu_s, fsize, address_space)| {
            ResourceLimits {
                nofile,
                nproc,
                cpu_s,
                fsize,
                address_space,
            }
        }),
    )
}

type Prepare = (
    Vec<UploadSpec>,
    Vec<FetchSpec>,
    Vec<String>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
);

fn prepare() -> impl Strategy<Value = Prepare> {
    (
        vec(bytes().prop_map(|dest| UploadSpec { dest }), 0..3),
        vec(
            (text(), proptest::option::of(any::<[u8; 32]>()), bytes()).prop_map(|(url, sha256, dest)| FetchSpec {
                url,
                sha256,
                dest,
            }),
            0..3,
        ),
        vec(text(), 0..3),
        proptest::option::of(int()),
        proptest::option::of(int()),
        proptest::option::of(int()),
        proptest::option::of(int()),
    )
}

fn window_size() -> impl Strategy<Value = WindowSize> {
    let dim = || prop_oneof![0..=250u16, any::<u16>()];
    (dim(), dim()).prop_map(|(rows, cols)| WindowSize { rows, cols })
}

fn shell_spec() -> impl Strategy<Value = ShellSpec> {
    (
        proptest::option::of(build_id()),
        proptest::option::of(vec(bytes(), 0..4)),
        opt_bytes(),
        vec(
            (bytes(), bytes()).prop_map(|(name, value)| EnvVar { name, value }),
            0..4,
        ),
        proptest::option::of(window_size()),
    )
        .prop_map(|(build, argv, shell, env, tty)| ShellSpec {
            build,
            argv,
            shell,
            env,
            tty,
        })
}

fn output_stream() -> impl Strategy<Value = OutputStream> {
    prop_oneof![Just(OutputStream::Stdout), Just(OutputStream::Stderr)]
}

/// Messages are generated freely; several large fields together can exceed a frame,
/// and such a message cannot be sent at all (its encoding fails with `TooLarge`).
fn fits<T: Serialize>(msg: &T) -> bool {
    encode_frame(msg, &mut Vec::new()).is_ok()
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        (int32(), text(), vec(text(), 0..3)).prop_map(|(protocol, client_version, capabilities)| {
            ClientMessage::Hello(Hello {
                protocol,
                client_version,
                capabilities,
            })
        }),
        int().prop_map(|nonce| ClientMessage::Ping { nonce }),
        int().prop_map(|nonce| ClientMessage::Pong { nonce }),
        (int(), run_spec(), any::<bool>()).prop_map(|(req, spec, follow)| ClientMessage::Run {
            req,
            spec: Box::new(spec),
            follow
        }),
        (int(), any::<bool>()).prop_map(|(req, all)| ClientMessage::List { req, all }),
        (int(), build_id(), int(), any::<bool>()).prop_map(|(req, build, from, follow)| ClientMessage::Attach {
            req,
            build,
            from,
            follow
        }),
        (build_id(), int(), bytes()).prop_map(|(build, offset, data)| ClientMessage::Stdin { build, offset, data }),
        build_id().prop_map(|build| ClientMessage::CloseStdin { build }),
        (int(), build_id(), any::<bool>()).prop_map(|(req, build, force)| ClientMessage::Cancel { req, build, force }),
        (int(), int32(), bytes()).prop_map(|(req, index, data)| ClientMessage::Upload { req, index, data }),
        (int(), int32(), int(), any::<[u8; 32]>()).prop_map(|(req, index, bytes, sha256)| ClientMessage::UploadEnd {
            req,
            index,
            bytes,
            sha256
        }),
        (int(), build_id(), bytes()).prop_map(|(req, build, path)| ClientMessage::Download { req, build, path }),
        (int(), build_id(), proptest::option::of(exit_status()))
            .prop_map(|(req, build, status)| { ClientMessage::Release { req, build, status } }),
        (build_id(), any::<bool>()).prop_map(|(build, err)| ClientMessage::CloseOutput {
            build,
            stream: if err {
                OutputStream::Stderr
            } else {
                OutputStream::Stdout
            },
        }),
        (int(), shell_spec()).prop_map(|(req, spec)| ClientMessage::OpenShell { req, spec }),
        (int(), int(), bytes()).prop_map(|(shell, offset, data)| ClientMessage::ShellInput { shell, offset, data }),
        int().prop_map(|shell| ClientMessage::ShellInputEnd { shell }),
        (int(), window_size()).prop_map(|(shell, size)| ClientMessage::ShellResize { shell, size }),
        int().prop_map(|shell| ClientMessage::ShellHangUp { shell }),
        Just(ClientMessage::Goodbye),
        (any::<u32>(), bytes()).prop_map(|(sub, message)| ClientMessage::Sub { sub, message }),
        any::<u32>().prop_map(|sub| ClientMessage::SubEnd { sub }),
        (int(), any::<bool>()).prop_map(|(nonce, takeover)| ClientMessage::Hello(Hello::new("0.1.0", nonce, takeover))),
    ]
    .prop_filter("fits in a frame", fits)
}

fn error_kind() -> impl Strategy<Value = ErrorKind> {
    prop_oneof![
        Just(ErrorKind::VersionMismatch),
        Just(ErrorKind::Protocol),
        Just(ErrorKind::BadRequest),
        Just(ErrorKind::UnknownBuild),
        Just(ErrorKind::CommandNotFound),
        Just(ErrorKind::NotExecutable),
        Just(ErrorKind::Internal),
        Just(ErrorKind::NoSession),
        Just(ErrorKind::PermissionDenied),
        Just(ErrorKind::Transfer),
        Just(ErrorKind::NotReady),
        Just(ErrorKind::Cancelled),
        Just(ErrorKind::Busy),
    ]
}

fn exit_status() -> impl Strategy<Value = ExitStatus> {
    prop_oneof![
        any::<i32>().prop_map(ExitStatus::Code),
        (-300..300i32).prop_map(ExitStatus::Code),
        (any::<i32>(), any::<bool>()).prop_map(|(signal, core_dumped)| ExitStatus::Signal { signal, core_dumped }),
    ]
}

fn daemon_message() -> impl Strategy<Value = DaemonMessage> {
    let limits = (int32(), int32(), int32(), int32(), int32()).prop_map(
        |(max_payload, max_chunk, stdin_window, heartbeat_ms, upload_window)| Limits {
            max_payload,
            max_chunk,
            stdin_window,
            heartbeat_ms,
            upload_window,
        },
    );
    let state = || {
        prop_oneof![
            Just(BuildState::Running),
            Just(BuildState::Preparing),
            int().prop_map(|until_ms| BuildState::HeldBefore { until_ms }),
            (exit_status(), int()).prop_map(|(status, until_ms)| BuildState::Held {
                status,
                cause: EndCause::TimedOut,
                until_ms
            }),
            (exit_status(), int(), int(), int()).prop_map(|(status, duration_ms, finished_at_ms, expires_at_ms)| {
                BuildState::Finished {
                    status,
                    cause: EndCause::Completed,
                    duration_ms,
                    finished_at_ms,
                    expires_at_ms,
                }
            }),
        ]
    };
    let summary = move || {
        (build_id(), text(), int32(), int(), int(), state()).prop_map(
            |(build, command, pid, started_at_ms, output_end, state)| BuildSummary {
                build,
                command,
                pid,
                started_at_ms,
                output_end,
                state,
            },
        )
    };
    prop_oneof![
        (int32(), text(), vec(text(), 0..3), limits, vec(summary(), 0..4)).prop_map(
            |(protocol, daemon_version, capabilities, limits, builds)| {
                DaemonMessage::Welcome(Welcome {
                    protocol,
                    daemon_version,
                    capabilities,
                    limits,
                    builds,
                    session: 0,
                })
            }
        ),
        (
            proptest::option::of(int()),
            proptest::option::of(build_id()),
            error_kind(),
            text()
        )
            .prop_map(|(req, build, kind, message)| DaemonMessage::Error(ErrorReport {
                req,
                build,
                kind,
                message
            })),
        int().prop_map(|nonce| DaemonMessage::Ping { nonce }),
        int().prop_map(|nonce| DaemonMessage::Pong { nonce }),
        (int(), build_id(), int32(), opt_bytes(), any::<bool>()).prop_map(|(req, build, pid, shell, existing)| {
            DaemonMessage::Started(Started {
                req,
                build,
                pid,
                shell,
                existing,
            })
        }),
        (int(), summary()).prop_map(|(req, build)| DaemonMessage::Attached { req, build }),
        (build_id(), int(), int(), any::<bool>()).prop_map(|(build, from, to, quota)| DaemonMessage::Gap {
            build,
            from,
            to,
            reason: if quota {
                GapReason::Quota
            } else {
                GapReason::WriteFailed
            },
        }),
        (int(), build_id(), int()).prop_map(|(req, build, position)| DaemonMessage::LogEnd { req, build, position }),
        (build_id(), output_stream(), int(), bytes()).prop_map(|(build, stream, offset, data)| DaemonMessage::Output {
            build,
            stream,
            offset,
            data
        }),
        (
            build_id(),
            exit_status(),
            prop_oneof![
                Just(EndCause::Completed),
                Just(EndCause::Cancelled),
                Just(EndCause::TimedOut),
                Just(EndCause::Released),
                Just(EndCause::Shutdown)
            ],
            int(),
            int(),
            int()
        )
            .prop_map(|(build, status, cause, duration_ms, stdout_bytes, stderr_bytes)| {
                DaemonMessage::Exited(Exited {
                    build,
                    status,
                    cause,
                    duration_ms,
                    stdout_bytes,
                    stderr_bytes,
                })
            }),
        (build_id(), int()).prop_map(|(build, consumed)| DaemonMessage::StdinAck { build, consumed }),
        int().prop_map(|req| DaemonMessage::Ack { req }),
        (int(), int()).prop_map(|(req, consumed)| DaemonMessage::UploadAck { req, consumed }),
        (build_id(), exit_status(), int()).prop_map(|(build, status, until_ms)| DaemonMessage::Held {
            build,
            status,
            cause: EndCause::Completed,
            until_ms
        }),
        (int(), bytes()).prop_map(|(req, data)| DaemonMessage::DownloadData { req, data }),
        (int(), int(), any::<[u8; 32]>()).prop_map(|(req, bytes, sha256)| DaemonMessage::DownloadEnd {
            req,
            bytes,
            sha256
        }),
        (int(), build_id()).prop_map(|(req, build)| DaemonMessage::Preparing { req, build }),
        (int(), int32(), bytes(), proptest::option::of(build_id())).prop_map(|(req, pid, program, build)| {
            DaemonMessage::ShellOpened {
                req,
                pid,
                program,
                build,
            }
        }),
        (int(), output_stream(), bytes()).prop_map(|(shell, stream, data)| DaemonMessage::ShellOutput {
            shell,
            stream,
            data
        }),
        (int(), int()).prop_map(|(shell, consumed)| DaemonMessage::ShellInputAck { shell, consumed }),
        (int(), exit_status()).prop_map(|(shell, status)| DaemonMessage::ShellExited { shell, status }),
        (build_id(), int()).prop_map(|(build, until_ms)| DaemonMessage::HeldBefore { build, until_ms }),
        ".{0,200}".prop_map(|reason| DaemonMessage::ShuttingDown { reason }),
        (
            proptest::option::of((int(), text(), int())),
            proptest::option::of(int())
        )
            .prop_map(|(holder, refused)| DaemonMessage::Channel(ChannelState {
                holder: holder.map(|(session, client, since_ms)| Holder {
                    session,
                    client,
                    since_ms
                }),
                refused,
            })),
        (any::<u32>(), bytes()).prop_map(|(sub, message)| DaemonMessage::Sub { sub, message }),
        any::<u32>().prop_map(|sub| DaemonMessage::SubEnd { sub }),
    ]
    .prop_filter("fits in a frame", fits)
}

/// Junk that contains neither the first byte of a frame nor of a preamble.
fn junk() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => Just(Vec::new()),
        2 => vec(any::<u8>(), 1..200),
        1 => Just(b"If you don't see a command prompt, try pressing enter.\r\n".to_vec()),
        1 => Just(b"\x1b]0;root@runner: ~\x07root@runner:~# ".to_vec()),
        1 => Just(vec![0; 1000]),
    ]
    .prop_map(|v| {
        v.into_iter()
            .map(|b| if b == MAGIC[0] || b == PREAMBLE[0] { b'#' } else { b })
            .collect()
    })
}

// ---------------------------------------------------------------------------------------
// Helpers

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Preamble,
    Frame(Vec<u8>),
    Corrupt(Corruption),
}

/// Feeds `stream` in pieces whose sizes cycle through `sizes` (all at least 1) and
/// collects what comes out; checks that the decoder never holds more than a frame.
fn run_decoder(stream: &[u8], sizes: &[usize]) -> (Vec<Ev>, FrameDecoder) {
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let want = sizes[i % sizes.len()].clamp(1, rest.len());
        i += 1;
        let mut piece = &rest[..want];
        rest = &rest[want..];
        while !piece.is_empty() {
            let n = dec.feed(piece);
            assert!(n > 0);
            piece = &piece[n..];
            while let Some(item) = dec.decode() {
                out.push(match item {
                    Decoded::Preamble => Ev::Preamble,
                    Decoded::Frame(p) => Ev::Frame(p.to_vec()),
                    Decoded::Corrupt(c) => Ev::Corrupt(c),
                });
            }
            assert!(dec.buffered() < FRAME_HEADER_LEN + MAX_PAYLOAD);
        }
    }
    (out, dec)
}

fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut f = Vec::new();
    encode_frame(msg, &mut f).unwrap();
    f
}

fn frames_of(evs: &[Ev]) -> Vec<Vec<u8>> {
    evs.iter()
        .filter_map(|e| match e {
            Ev::Frame(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn count_corrupt(evs: &[Ev]) -> usize {
    evs.iter().filter(|e| matches!(e, Ev::Corrupt(_))).count()
}

fn is_subsequence(small: &[Vec<u8>], big: &[Vec<u8>]) -> bool {
    let mut it = big.iter();
    small.iter().all(|s| it.any(|b| b == s))
}

/// Whole pipe: all messages come out, in order, from any split of the stream.
fn check_round_trip<T>(msgs: &[T], sizes: &[usize]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut stream = PREAMBLE.to_vec();
    for m in msgs {
        let f = frame(m);
        prop_assert_eq!(
            u32::from_le_bytes(f[4..8].try_into().unwrap()) as usize,
            f.len() - FRAME_HEADER_LEN
        );
        stream.extend_from_slice(&f);
    }
    let (out, dec) = run_decoder(&stream, sizes);
    prop_assert_eq!(out.first(), Some(&Ev::Preamble));
    prop_assert_eq!(count_corrupt(&out), 0);
    let got: Vec<T> = frames_of(&out).iter().map(|p| decode(p).unwrap()).collect();
    prop_assert_eq!(&got[..], msgs);
    prop_assert_eq!(dec.end_of_stream(), EndOfStream::Clean);
    prop_assert_eq!(dec.skipped(), 0);
    Ok(())
}

/// Junk before the preamble is skipped silently; junk between frames costs one damage
/// report per block and no message.
fn check_junk<T>(msgs: &[T], junks: &[Vec<u8>], sizes: &[usize]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut stream = junks[0].clone();
    stream.extend_from_slice(PREAMBLE);
    let mut blocks = 0;
    let mut junk_len = junks[0].len();
    for (i, m) in msgs.iter().enumerate() {
        let j = &junks[(i + 1) % junks.len()];
        if i > 0 && !j.is_empty() {
            blocks += 1;
        }
        if i > 0 {
            stream.extend_from_slice(j);
            junk_len += j.len();
        }
        stream.extend_from_slice(&frame(m));
    }
    let (out, dec) = run_decoder(&stream, sizes);
    prop_assert_eq!(out.first(), Some(&Ev::Preamble));
    prop_assert_eq!(count_corrupt(&out), blocks);
    // No damage report before the preamble.
    prop_assert!(!matches!(out.first(), Some(Ev::Corrupt(_))));
    let got: Vec<T> = frames_of(&out).iter().map(|p| decode(p).unwrap()).collect();
    prop_assert_eq!(&got[..], msgs);
    prop_assert_eq!(dec.skipped(), junk_len as u64);
    prop_assert_eq!(dec.end_of_stream(), EndOfStream::Clean);
    Ok(())
}

/// One byte of one frame is changed: that frame is lost, reported as damage, and every
/// other frame is recovered in order. The stream goes on afterwards (here with a
/// takeover's zero pad), as a live stream does: a damaged length may claim bytes that
/// only later traffic provides.
fn check_corruption<T>(msgs: &[T], at: Index, xor: u8, sizes: &[usize]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let frames: Vec<Vec<u8>> = msgs.iter().map(frame).collect();
    let sent: Vec<Vec<u8>> = frames.iter().map(|f| f[FRAME_HEADER_LEN..].to_vec()).collect();
    let total: usize = frames.iter().map(Vec::len).sum();
    let pos = at.index(total);
    let mut victim = 0;
    let mut acc = 0;
    for (i, f) in frames.iter().enumerate() {
        if pos < acc + f.len() {
            victim = i;
            break;
        }
        acc += f.len();
    }
    let mut stream = PREAMBLE.to_vec();
    for f in &frames {
        stream.extend_from_slice(f);
    }
    stream[PREAMBLE.len() + pos] ^= xor;
    stream.extend(std::iter::repeat_n(0u8, SYNC_PAD_LEN));

    let (out, _) = run_decoder(&stream, sizes);
    let got = frames_of(&out);
    let n = msgs.len();
    // What the brief demands...
    prop_assert!(is_subsequence(&got, &sent), "decoded a frame nobody sent");
    prop_assert!(got.len() + 2 >= n, "only {} of {} frames recovered", got.len(), n);
    // ...and what the design delivers: exactly the damaged frame is lost, once reported.
    let mut want = sent.clone();
    want.remove(victim);
    prop_assert_eq!(got, want);
    let first_report = out.iter().position(|e| matches!(e, Ev::Corrupt(_)));
    prop_assert_eq!(first_report, Some(1 + victim));
    for p in frames_of(&out) {
        decode::<T>(&p).unwrap();
    }
    Ok(())
}

fn sizes() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(vec![usize::MAX]),
        Just(vec![1]),
        vec(1..64usize, 1..8),
        vec(1..200_000usize, 1..4),
    ]
}

// ---------------------------------------------------------------------------------------
// Properties

proptest! {
    #[test]
    fn client_messages_round_trip(msgs in vec(client_message(), 0..12), sizes in sizes()) {
        check_round_trip(&msgs, &sizes)?;
    }

    #[test]
    fn daemon_messages_round_trip(msgs in vec(daemon_message(), 0..12), sizes in sizes()) {
        check_round_trip(&msgs, &sizes)?;
    }

    #[test]
    fn payload_round_trip(c in client_message(), d in daemon_message()) {
        let pc = frame(&c);
        prop_assert_eq!(decode::<ClientMessage>(&pc[FRAME_HEADER_LEN..]).unwrap(), c);
        let pd = frame(&d);
        prop_assert_eq!(decode::<DaemonMessage>(&pd[FRAME_HEADER_LEN..]).unwrap(), d);
    }

    #[test]
    fn junk_between_client_frames(
        msgs in vec(client_message(), 1..10),
        junks in vec(junk(), 1..12),
        sizes in sizes(),
    ) {
        check_junk(&msgs, &junks, &sizes)?;
    }

    #[test]
    fn junk_between_daemon_frames(
        msgs in vec(daemon_message(), 1..10),
        junks in vec(junk(), 1..12),
        sizes in sizes(),
    ) {
        check_junk(&msgs, &junks, &sizes)?;
    }

    #[test]
    fn single_byte_corruption_of_client_frames(
        msgs in vec(client_message(), 1..8),
        at in any::<Index>(),
        xor in 1..=255u8,
        sizes in sizes(),
    ) {
        check_corruption(&msgs, at, xor, &sizes)?;
    }

    #[test]
    fn single_byte_corruption_of_daemon_frames(
        msgs in vec(daemon_message(), 1..8),
        at in any::<Index>(),
        xor in 1..=255u8,
        sizes in sizes(),
    ) {
        check_corruption(&msgs, at, xor, &sizes)?;
    }

    #[test]
    fn arbitrary_input_never_breaks_the_decoder(
        parts in vec(
            prop_oneof![
                vec(any::<u8>(), 0..64),
                Just(PREAMBLE.to_vec()),
                Just(MAGIC.to_vec()),
                (0..=u32::MAX).prop_map(|n| [&MAGIC[..], &n.to_le_bytes()].concat()),
                Just(frame(&ClientMessage::Ping { nonce: 1 })),
            ],
            0..40,
        ),
        sizes in sizes(),
    ) {
        let stream = parts.concat();
        let (out, dec) = run_decoder(&stream, &sizes);
        // Whatever comes out is a real frame of the stream, and the same items come out
        // however the stream is split.
        let (again, _) = run_decoder(&stream, &[usize::MAX]);
        prop_assert_eq!(&out, &again);
        for p in frames_of(&out) {
            prop_assert!(p.len() <= MAX_PAYLOAD);
        }
        prop_assert!(dec.buffered() < FRAME_HEADER_LEN + MAX_PAYLOAD);
    }

    #[test]
    fn ids_tether_makes_are_ids_a_client_may_choose(name in proptest::option::of(".{0,80}"), suffix in "[0-9a-f]{1,12}") {
        let id = tether_protocol::build_id_from(name.as_deref(), &suffix);
        prop_assert!(tether_protocol::valid_build_id(&id), "{:?} from {:?}", id, name);
        prop_assert!(id.ends_with(&suffix));
    }
}
