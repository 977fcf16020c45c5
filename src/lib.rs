//! trainrelay: a store-and-forward MQTT relay for the onboard unit of a train.
//!
//! Data flows one way per direction:
//! local broker -> routes -> store -> uplink (to the central broker), and
//! uplink -> routes -> local broker (to the cab iPads).

pub mod auth;
pub mod broker;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod downlink;
pub mod freshness;
pub mod logging;
pub mod message;
pub mod mqtt;
pub mod relay;
pub mod reload;
pub mod route;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod topic;
pub mod uplink;
pub mod watchdog;
pub mod ws_stream;
