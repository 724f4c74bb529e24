//! The client commands: connect to a daemon, speak the protocol, map results to exit
//! codes (the `docker run` / `timeout` conventions, see [`exit`]).

pub mod connect;
pub mod exit;
pub mod output;
pub mod run;
