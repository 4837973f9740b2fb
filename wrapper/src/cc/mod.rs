//! The C/C++ compiler wrapper (`distbuild-cc`): build scripts compile C
//! through the `cc` crate (or cmake) with `CC` = a shim running `distbuild-cc cc`, and each
//! compile-only invocation becomes a cached, remotely executable Action, as
//! each rustc invocation does. It reuses the rustc wrapper's settings,
//! `Remote`, hash caches, roots and local runs.
//!
//! - `args`: is it one compile (`-c`, one source, `-o`), or local, and why;
//! - `toolchain`: the compiler's own files, laid out to relocate;
//! - `deps`: the headers it reads (a remembered `-M` pre-pass) and `.d` files;
//! - `prepare`: mapped arguments and inputs; `action`: the key;
//! - `run`: hit, execute or run here.

pub mod action;
pub mod args;
pub mod deps;
pub mod prepare;
pub mod run;
pub mod toolchain;
