//! Replays the committed fuzz corpora through the fuzz entry points, so `cargo test` exercises
//! every target on the stable toolchain even where cargo-fuzz is not installed.

use std::path::Path;

use keyledger::fuzzing;

/// A fuzz target: its corpus directory name and its entry point.
type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 6] = [
    ("decode_records", fuzzing::decode_records),
    ("parse_key", fuzzing::parse_key),
    ("decode_public_id", fuzzing::decode_public_id),
    ("ops", fuzzing::ops),
    ("allowed_hosts", fuzzing::allowed_hosts),
    ("request", fuzzing::request),
];

#[test]
fn every_corpus_input_runs_without_panicking() {
    for (target, run) in TARGETS {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            // Shown with a failure's panic: which input it was.
            eprintln!("{target}: {}", path.display());
            run(&std::fs::read(&path).unwrap());
            count += 1;
        }
        assert!(count > 0, "{target}: empty corpus");
        for (i, seed) in fuzzing::seeds(target).iter().enumerate() {
            eprintln!("{target}: seeds()[{i}]");
            run(seed);
        }
    }
}

/// Regenerates the seed files: `cargo test --test fuzz_corpus -- --ignored`.
#[test]
#[ignore = "writes the seed corpus"]
fn write_seed_corpus() {
    for (target, _) in TARGETS {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, seed) in fuzzing::seeds(target).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
        }
    }
}
