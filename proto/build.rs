//! Compiles `proto/*.proto` with protox (a pure-Rust protobuf compiler), so a fresh
//! machine builds Tern with cargo alone: no system `protoc`, no cmake.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["tern.proto", "e2e.proto"], ["proto"])?;
    prost_build::Config::new()
        // `bytes::Bytes` for every bytes field: payloads are sliced out of the
        // received frame without a copy.
        .bytes(["."])
        .compile_fds(fds)?;
    Ok(())
}
