//! Rust types for Prometheus remote-write from `proto/remote_write.proto`, by prost.
//! The .proto is compiled by protox (a protobuf compiler in Rust), so building needs no
//! `protoc` on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/remote_write.proto");
    let descriptors = protox::compile(["remote_write.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
