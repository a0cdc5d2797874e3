//! The fuzz targets' corpus (`fuzz/corpus/`, minimised, and `fuzz/regressions/`, inputs that
//! once failed) replayed on every `make test`, through the same functions `cargo fuzz` runs.
//! Fuzzing itself needs a nightly toolchain: `cargo +nightly fuzz run request` (see the README).

use std::path::Path;

use semcache::fuzzing;
use semcache::store::Record;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in [
        root.join("corpus").join(target),
        root.join("regressions").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&bytes));
            assert!(outcome.is_ok(), "{} fails {target}", path.display());
            replayed += 1;
        }
    }
    replayed
}

#[test]
fn the_fuzz_corpus_replays_cleanly() {
    assert!(replay("request", fuzzing::request) >= 2);
    assert!(replay("stream", fuzzing::stream) >= 2);
    replay("record", fuzzing::record);
}

#[test]
fn a_real_record_round_trips() {
    let record = Record {
        id: 7,
        tenant: [1; 32],
        fingerprint: [2; 32],
        prompt: "How do I reset my password?".to_owned(),
        embedding: Some(vec![0.25; 384]),
        completion: br#"{"object":"chat.completion"}"#.to_vec(),
        model: "gpt-4o-mini".to_owned(),
        prompt_tokens: 20,
        completion_tokens: 12,
        upstream_latency_us: 1_000,
        created_ms: 1_790_000_000_000,
        expires_ms: Some(1_790_000_600_000),
        hits: 3,
        last_hit_ms: 1_790_000_100_000,
        own_threshold: 0.9,
        wrong_reports: 1,
        context: None,
        verdicts: Default::default(),
    };
    fuzzing::record(&record.encode());
    let mut truncated = record.encode();
    truncated.truncate(40);
    fuzzing::record(&truncated);
}
