//! Random numbers: suffixes for build ids chosen by tether (the daemon for a `Run`
//! without an id, the client when it must be able to retry a `Run`), a client's session
//! nonce and request ids.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

/// 12 hex digits from the kernel's random source (the clock if that cannot be read).
pub fn random_suffix() -> String {
    random_bytes::<6>().iter().map(|b| format!("{b:02x}")).collect()
}

/// A random 64-bit number (a client's session nonce, its request ids).
pub fn random_u64() -> u64 {
    u64::from_le_bytes(random_bytes::<8>())
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() ^ u128::from(std::process::id()) << 64)
            .unwrap_or(0);
        for (b, n) in bytes.iter_mut().zip(nanos.to_le_bytes().iter().cycle()) {
            *b = *n;
        }
    }
    bytes
}
