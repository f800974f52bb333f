//! Generates the weft.v1 bindings with protoc (Debian package `protobuf-compiler`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/weft/v1/weft.proto");
    tonic_prost_build::configure().compile_protos(&["proto/weft/v1/weft.proto"], &["proto"])?;
    Ok(())
}
