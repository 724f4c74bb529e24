//! Prints real frames, hex-dumped in `xxd` style, for the "Example" section of
//! PROTOCOL.md: `cargo run -p tether-protocol --example hello_hex`.

use tether_protocol::{encode_frame, ClientMessage, CommandSpec, Hello, RunSpec, FRAME_HEADER_LEN, PREAMBLE};

fn xxd(bytes: &[u8]) {
    for (row, chunk) in bytes.chunks(16).enumerate() {
        let mut hex = String::new();
        for (i, b) in chunk.iter().enumerate() {
            hex.push_str(&format!("{b:02x}"));
            if i % 2 == 1 {
                hex.push(' ');
            }
        }
        let ascii: String = chunk
            .iter()
            .map(|&b| if (0x20..0x7f).contains(&b) { b as char } else { '.' })
            .collect();
        println!("{:08x}: {hex:<40} {ascii}", row * 16);
    }
}

fn show(title: &str, msg: &ClientMessage) {
    let mut frame = Vec::new();
    encode_frame(msg, &mut frame).expect("encodes");
    let len = u32::from_le_bytes(frame[4..8].try_into().unwrap());
    let crc = u32::from_le_bytes(frame[8..12].try_into().unwrap());
    println!("{title}: {msg:?}");
    println!(
        "frame {} bytes, payload {} bytes (length field {len}), CRC32C 0x{crc:08x}",
        frame.len(),
        frame.len() - FRAME_HEADER_LEN
    );
    xxd(&frame);
    println!();
}

fn main() {
    println!("preamble ({} bytes):", PREAMBLE.len());
    xxd(PREAMBLE);
    println!();
    show(
        "Hello",
        &ClientMessage::Hello(Hello::new("0.1.0", 0x0123_4567_89ab_cdef, false)),
    );
    show(
        "Run",
        &ClientMessage::Run {
            req: 1,
            spec: Box::new(RunSpec {
                command: CommandSpec::Argv(vec![b"echo".to_vec().into(), b"hi".to_vec().into()]),
                env: vec![],
                workdir: None,
                timeout_ms: None,
                grace_ms: None,
                stdin: false,
                name: None,
                id: None,
                uploads: vec![],
                fetches: vec![],
                wait_for: vec![],
                wait_timeout_ms: None,
                hold_after_ms: None,
                hold_on_failure_ms: None,
                hold_before_ms: None,
                secrets: Vec::new(),
                user: None,
                limits: Default::default(),
            }),
            follow: true,
        },
    );
}
