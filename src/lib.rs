//! trainrelay: a store-and-forward MQTT relay for the onboard unit of a train.
//!
//! Data flows one way per direction:
//! local broker -> routes -> store -> uplink (to the central broker), and
//! uplink -> routes -> local broker (to the cab iPads).
//!
//! Public are the modules the `trainrelay` command, the benches and the tests use; the rest
//! are the daemon's insides.

pub mod broker;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod logging;
pub mod message;
pub mod password;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod topic;

mod auth;
mod downlink;
mod freshness;
mod heartbeat;
mod mqtt;
mod relay;
mod reload;
mod route;
mod uplink;
mod watchdog;
mod ws_stream;
