//! Version negotiation. The rule is strict equality of [`crate::PROTOCOL_VERSION`]: a
//! mismatch is answered with an error naming both versions, never with a guess.

use crate::{Hello, Welcome, PROTOCOL_VERSION};

/// The peers' protocol versions differ.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol version mismatch: {peer_role} {peer_program} speaks protocol {peer}, this side ({own_program}) speaks protocol {own}")]
pub struct VersionMismatch {
    pub own: u32,
    pub own_program: String,
    pub peer: u32,
    pub peer_role: &'static str,
    pub peer_program: String,
}

/// Daemon side: may this client's session proceed?
pub fn check_hello(hello: &Hello, daemon_version: &str) -> Result<(), VersionMismatch> {
    if hello.protocol == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(VersionMismatch {
        own: PROTOCOL_VERSION,
        own_program: format!("tether {daemon_version}"),
        peer: hello.protocol,
        peer_role: "client",
        peer_program: format!("tether {}", hello.client_version),
    })
}

/// Client side: is this daemon one we can talk to?
pub fn check_welcome(welcome: &Welcome, client_version: &str) -> Result<(), VersionMismatch> {
    if welcome.protocol == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(VersionMismatch {
        own: PROTOCOL_VERSION,
        own_program: format!("tether {client_version}"),
        peer: welcome.protocol,
        peer_role: "daemon",
        peer_program: format!("tether {}", welcome.daemon_version),
    })
}
