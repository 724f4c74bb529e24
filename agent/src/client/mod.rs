//! The client commands: connect to a daemon, speak the protocol, map results to exit
//! codes (the `docker run` / `timeout` conventions, see [`exit`]).

pub mod attach;
pub mod backoff;
pub mod cancel;
pub mod connect;
pub mod dial;
pub mod env;
pub mod exit;
pub mod follow;
pub mod output;
pub mod ps;
pub mod relay;
pub mod release;
pub mod reqs;
pub mod run;
pub mod shell;
pub mod signals;
pub mod terminal;
pub mod transfer;
