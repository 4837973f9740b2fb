//! Compiles the project's own protos (proto/) without a system protoc:
//! protox parses them in Rust, tonic-prost-build generates the code. Also
//! builds the container runner's init (src/worker/runner/container/init.rs)
//! as a static executable that runs in any image.

use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/admin.proto", "proto/worker.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    container_init()?;
    Ok(())
}

/// `$OUT_DIR/container-init`: the init source compiled alone by the same
/// rustc, statically linked (glibc's static libc comes with libc6-dev, which
/// linking anything already needs), optimized for size. On other systems
/// than Linux the file is empty and the container runner refuses to start.
fn container_init() -> Result<(), Box<dyn std::error::Error>> {
    let source = "src/worker/runner/container/init.rs";
    println!("cargo:rerun-if-changed={source}");
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("container-init");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        std::fs::write(&out, b"")?;
        return Ok(());
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = std::env::var("TARGET")?;
    let status = Command::new(rustc)
        .args(["--edition=2024", "--crate-type=bin", "--crate-name=distbuild_container_init", "--target"])
        .arg(&target)
        .args(["-C", "opt-level=s", "-C", "panic=abort", "-C", "strip=symbols", "-C", "target-feature=+crt-static"])
        .arg("-o")
        .arg(&out)
        .arg(source)
        // The outer build's flags (e.g. cargo-fuzz's sanitizers) are not for this.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .status()?;
    if !status.success() {
        return Err(format!("compiling {source} as a static executable failed ({status})").into());
    }
    Ok(())
}
