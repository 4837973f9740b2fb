//! cargo-distbuild: a Remote Execution API v2 server (CAS, ByteStream,
//! ActionCache, Capabilities) with a filesystem or memory store, and the
//! command line around it. See ARCHITECTURE.md for the map.

pub mod ac;
pub mod admin;
pub mod allocator;
pub mod asset;
pub mod auth;
pub mod capabilities;
pub mod cas;
pub mod cli;
pub mod config;
pub mod error;
pub mod execution;
pub mod fsutil;
pub mod http;
pub mod metrics;
pub mod server;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod upkeep;
pub mod worker;
