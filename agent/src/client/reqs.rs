//! Request ids. Each client process picks its own at random (a random base, plus a
//! small offset per kind of request), so that on a stream shared with other clients (a
//! daemon's stdin under `kubectl attach`) a reply meant for another client's request
//! never matches one of ours, even when its bytes arrive in our session.

use std::sync::OnceLock;

use tether_protocol::RequestId;

/// The request id `offset` of this process (offsets below 2^32).
pub fn req(offset: u32) -> RequestId {
    static BASE: OnceLock<u64> = OnceLock::new();
    *BASE.get_or_init(|| crate::ids::random_u64() & !0xFFFF_FFFF) + u64::from(offset)
}
