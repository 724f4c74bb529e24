//! Writes seed corpora of real frames for the fuzz targets (see fuzz/README.md):
//! `cargo run -p tether-protocol --example fuzz_seeds -- DIR` fills `DIR/frame_reader`
//! with whole client and daemon streams (preamble, frames, a takeover pad) and
//! `DIR/decode_message` with single payloads.

use std::fs;
use std::path::PathBuf;

use tether_protocol::{
    encode_frame, BuildId, BuildState, BuildSummary, Bytes, ClientMessage, CommandSpec, DaemonMessage, EndCause,
    EnvVar, ExitStatus, Exited, GapReason, Hello, Limits, OutputStream, RunAs, RunSpec, ShellSpec, Started, Welcome,
    WindowSize, DEFAULT_UPLOAD_WINDOW, FRAME_HEADER_LEN, PREAMBLE, PROTOCOL_VERSION,
};

fn client_messages() -> Vec<ClientMessage> {
    let mut spec = RunSpec::new(CommandSpec::script("make -j4 test"));
    spec.id = Some("build-1".into());
    spec.stdin = true;
    spec.hold_on_failure_ms = Some(1_800_000);
    spec.hold_before_ms = Some(60_000);
    spec.user = Some(RunAs { uid: 1000, gid: None });
    spec.limits.nofile = Some(1024);
    spec.limits.address_space = Some(u64::MAX);
    vec![
        ClientMessage::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            client_version: "0.1.0".into(),
            capabilities: vec![],
        }),
        ClientMessage::Ping { nonce: 7 },
        ClientMessage::Run {
            req: 1,
            spec: Box::new(spec),
            follow: true,
        },
        ClientMessage::Stdin {
            build: BuildId("build-1".into()),
            offset: 0,
            data: Bytes::from(b"input\n".to_vec()),
        },
        ClientMessage::CloseStdin {
            build: BuildId("build-1".into()),
        },
        ClientMessage::Attach {
            req: 2,
            build: BuildId("build-1".into()),
            from: 300,
            follow: true,
        },
        ClientMessage::List { req: 3, all: true },
        ClientMessage::Cancel {
            req: 4,
            build: BuildId("build-1".into()),
            force: false,
        },
        ClientMessage::OpenShell {
            req: 5,
            spec: ShellSpec {
                build: Some(BuildId("build-1".into())),
                argv: None,
                shell: None,
                env: vec![EnvVar {
                    name: Bytes::from(b"TERM".to_vec()),
                    value: Bytes::from(b"xterm-256color".to_vec()),
                }],
                tty: Some(WindowSize { rows: 24, cols: 80 }),
            },
        },
        ClientMessage::ShellInput {
            shell: 5,
            offset: 0,
            data: Bytes::from(b"ls -l\r".to_vec()),
        },
        ClientMessage::ShellResize {
            shell: 5,
            size: WindowSize { rows: 50, cols: 300 },
        },
        ClientMessage::ShellHangUp { shell: 5 },
        ClientMessage::Release {
            req: 6,
            build: BuildId("build-2".into()),
            status: None,
        },
    ]
}

fn daemon_messages() -> Vec<DaemonMessage> {
    let build = BuildId("build-1".into());
    let summary = BuildSummary {
        build: build.clone(),
        command: "make".into(),
        pid: 42,
        started_at_ms: 1,
        output_end: 10,
        state: BuildState::Running,
    };
    vec![
        DaemonMessage::Welcome(Welcome {
            protocol: PROTOCOL_VERSION,
            daemon_version: "0.1.0".into(),
            capabilities: vec![],
            limits: Limits {
                max_payload: 131_072,
                max_chunk: 65_536,
                stdin_window: 262_144,
                heartbeat_ms: 10_000,
                upload_window: DEFAULT_UPLOAD_WINDOW,
            },
            builds: vec![summary.clone()],
            session: 0,
        }),
        DaemonMessage::Started(Started {
            req: 1,
            build: build.clone(),
            pid: 42,
            shell: Some(Bytes::from(b"/bin/sh".to_vec())),
            existing: false,
        }),
        DaemonMessage::Output {
            build: build.clone(),
            stream: OutputStream::Stdout,
            offset: 0,
            data: Bytes::from(b"hello\n".to_vec()),
        },
        DaemonMessage::Gap {
            build: build.clone(),
            from: 6,
            to: 8,
            reason: GapReason::Quota,
        },
        DaemonMessage::Attached { req: 2, build: summary },
        DaemonMessage::ShellOpened {
            req: 5,
            pid: 43,
            program: Bytes::from(b"/bin/sh".to_vec()),
            build: Some(build.clone()),
        },
        DaemonMessage::ShellOutput {
            shell: 5,
            stream: OutputStream::Stdout,
            data: Bytes::from(b"ls -l\r\ntotal 0\r\n$ ".to_vec()),
        },
        DaemonMessage::ShellInputAck { shell: 5, consumed: 6 },
        DaemonMessage::ShellExited {
            shell: 5,
            status: ExitStatus::Signal {
                signal: 1,
                core_dumped: false,
            },
        },
        DaemonMessage::HeldBefore {
            build: BuildId("build-2".into()),
            until_ms: 1_700_000_000_000,
        },
        DaemonMessage::Exited(Exited {
            build,
            status: ExitStatus::Code(2),
            cause: EndCause::Completed,
            duration_ms: 5,
            stdout_bytes: 6,
            stderr_bytes: 4,
        }),
    ]
}

fn frames<T: serde::Serialize>(msgs: &[T]) -> Vec<Vec<u8>> {
    msgs.iter()
        .map(|m| {
            let mut f = Vec::new();
            encode_frame(m, &mut f).expect("seed messages fit a frame");
            f
        })
        .collect()
}

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus".into()));
    let reader = dir.join("frame_reader");
    let decoder = dir.join("decode_message");
    fs::create_dir_all(&reader)?;
    fs::create_dir_all(&decoder)?;
    let client = frames(&client_messages());
    let daemon = frames(&daemon_messages());
    for (i, f) in client.iter().chain(daemon.iter()).enumerate() {
        fs::write(decoder.join(format!("payload-{i}")), &f[FRAME_HEADER_LEN..])?;
    }
    // Streams: the split-size prefix (4 bytes) then the stream.
    let prefix = [1u8, 7, 64, 255];
    let session = |fs: &[Vec<u8>]| [prefix.as_slice(), PREAMBLE, &fs.concat()].concat();
    fs::write(reader.join("client-session"), session(&client))?;
    fs::write(reader.join("daemon-session"), session(&daemon))?;
    let mut junk = b"Welcome to a shell banner\r\n$ ".to_vec();
    junk.extend_from_slice(&session(&client)[4..]);
    fs::write(reader.join("banner-then-session"), [prefix.as_slice(), &junk].concat())?;
    let half = &client[2][..client[2].len() / 2];
    let takeover = [
        prefix.as_slice(),
        PREAMBLE,
        half,
        &vec![0u8; 4096],
        PREAMBLE,
        &client[0],
    ]
    .concat();
    fs::write(reader.join("abandoned-frame-then-takeover"), takeover)?;
    println!("seeds written to {}", dir.display());
    Ok(())
}
