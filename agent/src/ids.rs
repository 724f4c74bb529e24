//! Random suffixes for build ids chosen by tether (the daemon for a `Run` without an id,
//! the client when it must be able to retry a `Run`).

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

/// 12 hex digits from the kernel's random source (the clock if that cannot be read).
pub fn random_suffix() -> String {
    let mut bytes = [0u8; 6];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&nanos.to_le_bytes()[..6]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
