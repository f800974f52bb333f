//! Generates the example inference API.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/inference.proto");
    tonic_prost_build::configure().compile_protos(&["proto/inference.proto"], &["proto"])?;
    Ok(())
}
