//! The fuzz targets as bounded property tests on stable: each runs on its
//! seed corpus (`fuzz/corpus/<target>/`), on every crash a fuzzer ever found
//! (`fuzz/regressions/<target>/`), and on a fixed number of mutations of
//! those, from a fixed RNG seed so a failure repeats. `make fuzz` explores
//! far more with libFuzzer.
//!
//! `WEFT_WRITE_SEEDS=1` writes the generated protobuf seeds into the corpus
//! directories (for cargo-fuzz).

use std::path::{Path, PathBuf};

use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xds_proto::v1 as pb;

/// Mutated inputs per target.
const MUTATIONS: usize = 20_000;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("fuzz/").to_path_buf()
}

fn files(dir: &Path) -> Vec<Vec<u8>> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect();
    out.sort();
    out.into_iter().map(|(_, b)| b).collect()
}

/// Service configs and updates as a control plane pushes them, made from the
/// policy seeds, plus endpoints.
fn wire_seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let endpoint = |id: &str, port: u16, version: &str, ready: bool| pb::Endpoint {
        proxy_id: id.into(),
        address: format!("127.0.0.1:{port}"),
        labels: [("version".to_string(), version.to_string()), ("region".to_string(), "east".to_string())]
            .into_iter()
            .collect(),
        ready,
        mtls: false,
    };
    let mut configs = Vec::new();
    for seed in files(&fuzz_dir().join("corpus/policy")) {
        for mut cfg in weft_control::fuzzing::policy_documents(&seed) {
            cfg.endpoints =
                vec![endpoint("a", 1, "v1", true), endpoint("b", 2, "v2", true), endpoint("c", 3, "v2", false)];
            cfg.departed = vec!["d".into()];
            configs.push(cfg);
        }
    }
    let service_configs: Vec<Vec<u8>> = configs
        .iter()
        .zip(configs.iter().rev())
        .map(|(a, b)| {
            let (a, b) = (a.encode_to_vec(), b.encode_to_vec());
            // service_config splits its input in half: the first build, then
            // the next.
            if a.len() == b.len() { [a, b].concat() } else { a }
        })
        .collect();
    let updates = vec![
        pb::Update { version: 7, services: configs.clone(), endpoint_hold_ms: 30_000 }.encode_to_vec(),
        pb::Update {
            version: 8,
            services: vec![pb::ServiceConfig { name: "gone".into(), known: false, ..Default::default() }],
            endpoint_hold_ms: 0,
        }
        .encode_to_vec(),
    ];
    (service_configs, updates)
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let mut seeds = files(&fuzz_dir().join("corpus").join(target));
    seeds.extend(files(&fuzz_dir().join("regressions").join(target)));
    let (configs, updates) = wire_seeds();
    let generated = match target {
        "service_config" => configs,
        "update" => updates,
        _ => Vec::new(),
    };
    if std::env::var_os("WEFT_WRITE_SEEDS").is_some() {
        let dir = fuzz_dir().join("corpus").join(target);
        for (i, s) in generated.iter().enumerate() {
            std::fs::write(dir.join(format!("generated-{i}")), s).expect("write seed");
        }
    }
    seeds.extend(generated);
    seeds.push(Vec::new());
    seeds
}

/// Tokens worth inserting: YAML structure, policy field names, header
/// syntax.
const DICTIONARY: &[&[u8]] = &[
    b"\n",
    b"  ",
    b"- ",
    b": ",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b"---\n",
    b"'",
    b"\"",
    b"&a ",
    b"*a",
    b"!!str ",
    b"kind: Route\n",
    b"kind: Resilience\n",
    b"kind: TenantPolicy\n",
    b"service: ",
    b"tenant: ",
    b"rules:",
    b"backends:",
    b"weight: ",
    b"subset:",
    b"timeout: ",
    b"retry:",
    b"attempts: ",
    b"on:",
    b"per_try_timeout: ",
    b"fallback:",
    b"status: ",
    b"fault:",
    b"percent: ",
    b"grpc_status: ",
    b"match:",
    b"method: ",
    b"path_prefix: ",
    b"headers:",
    b"0",
    b"-1",
    b"4294967296",
    b"1e309",
    b"NaN",
    b".inf",
    b"0ms",
    b"25h",
    b"1.5s",
    b"*",
    b"host: ",
    b"x-tenant-id: ",
    b"traceparent: ",
    b"tracestate: ",
    b"weft=",
    b"\xff",
    b"\x00",
    b"%",
];

fn mutate(rng: &mut StdRng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=6) {
        let at = if out.is_empty() { 0 } else { rng.random_range(0..=out.len()) };
        match rng.random_range(0..6) {
            0 if !out.is_empty() => {
                let i = rng.random_range(0..out.len());
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 => out.insert(at, rng.random()),
            2 if !out.is_empty() => {
                let end = (at + rng.random_range(1..=16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            3 => {
                let token = DICTIONARY[rng.random_range(0..DICTIONARY.len())];
                out.splice(at..at, token.iter().copied());
            }
            4 if !out.is_empty() => {
                let start = rng.random_range(0..out.len());
                let end = (start + rng.random_range(1..=64)).min(out.len());
                let copy = out[start..end].to_vec();
                out.splice(at..at, copy);
            }
            _ => {
                let other = &others[rng.random_range(0..others.len())];
                if !other.is_empty() {
                    let start = rng.random_range(0..other.len());
                    let end = (start + rng.random_range(1..=128)).min(other.len());
                    out.splice(at..at, other[start..end].iter().copied());
                }
            }
        }
    }
    out.truncate(64 * 1024);
    out
}

fn check(target: &str) {
    let seeds = seeds(target);
    for s in &seeds {
        weft_fuzz_targets::run(target, s);
    }
    let mut rng = StdRng::seed_from_u64(0x7765_6674);
    for i in 0..MUTATIONS {
        let base = &seeds[rng.random_range(0..seeds.len())];
        let input = mutate(&mut rng, base, &seeds);
        let outcome = std::panic::catch_unwind(|| weft_fuzz_targets::run(target, &input));
        if outcome.is_err() {
            panic!(
                "target {target} failed on mutation {i}; input ({} bytes, escaped): {}",
                input.len(),
                input.escape_ascii()
            );
        }
    }
}

#[test]
fn policy_parser_and_validator() {
    check("policy");
}

#[test]
fn request_head_handling() {
    check("request_head");
}

#[test]
fn service_config_conversion() {
    check("service_config");
}

#[test]
fn update_conversion() {
    check("update");
}
