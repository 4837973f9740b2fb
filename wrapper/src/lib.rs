//! The rustc wrapper of cargo-distbuild, as a library: the binary
//! `distbuild-rustc` is its user, and `cargo distbuild stats` reads the
//! records it leaves (`remote_apis::wrapper_state::Record`).

pub mod args;
pub mod cc;
pub mod compile;
pub mod depinfo;
pub mod hashcache;
pub mod immutable;
pub mod inputs;
pub mod key;
pub mod local;
pub mod negative;
pub mod pipeline;
pub mod remote;
pub mod roots;
pub mod settings;
pub mod slots;
pub mod toolchain;
