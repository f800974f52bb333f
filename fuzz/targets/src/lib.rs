//! The bodies of weft's fuzz targets. `fuzz/fuzz_targets/*.rs` hand them
//! libFuzzer's input (`make fuzz`, nightly); `tests/properties.rs` runs them
//! on stable over the seed corpora, the regressions of past crashes and
//! mutations of both (`make test`). None may panic on any input.
#![forbid(unsafe_code)]

/// The names of the targets, as `fuzz/fuzz_targets/<name>.rs` and
/// `fuzz/corpus/<name>/`.
pub const TARGETS: &[&str] = &["policy", "request_head", "service_config", "update"];

/// Runs target `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "policy" => policy(data),
        "request_head" => weft_proxy::fuzzing::request_head(data),
        "service_config" => weft_proxy::fuzzing::service_config(data),
        "update" => weft_proxy::fuzzing::update(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// A policy file: the parser and validator never panic, what they accept
/// survives its round trips (see `weft_control::fuzzing`), and a sidecar
/// takes what the control plane accepted without a NACK: the two must agree
/// on what is valid.
pub fn policy(data: &[u8]) {
    for cfg in weft_control::fuzzing::policy_documents(data) {
        if let Err(problems) = weft_proxy::fuzzing::accepts(&cfg) {
            panic!("the control plane accepted what a sidecar NACKs: {problems} in {cfg:?}");
        }
    }
}
