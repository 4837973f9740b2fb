//! Integration tests: the real server, in-process on an ephemeral port,
//! driven by generated gRPC clients, the command line and real clients.

mod ac;
mod asset;
mod asset_names;
mod auth;
mod bazel;
mod bazel_asset;
mod bazel_tls;
mod browser;
mod buck2;
mod bytestream;
mod cas;
mod chroot;
mod cli;
mod common;
mod container;
mod drain;
mod execution;
mod hardening_cas;
mod hardening_exec;
mod hardening_net;
mod hardening_worker;
mod http;
mod instances;
mod legacy;
mod logs;
mod metrics;
mod pages;
mod replicas;
mod sandbox;
mod sandbox_files;
mod server;
mod stores;
mod tls;
mod workers;
mod wrapper;
