//! Message decoding of arbitrary payloads: never panics, and whatever decodes encodes
//! back to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_protocol::{decode, encode_frame, ClientMessage, DaemonMessage, FRAME_HEADER_LEN};

fn round_trip<T>(payload: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(msg) = decode::<T>(payload) {
        let mut frame = Vec::new();
        if encode_frame(&msg, &mut frame).is_ok() {
            let again: T = decode(&frame[FRAME_HEADER_LEN..]).expect("an encoded message decodes");
            assert_eq!(again, msg);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<ClientMessage>(data);
    round_trip::<DaemonMessage>(data);
});
