//! Replays every committed fuzz corpus (agent/fuzz/corpus/<target>/)
//! through the checks its fuzz target runs (`portcullis_agent::fuzzing`),
//! so CI keeps the corpora passing without an instrumented build. The
//! campaigns themselves run with `cargo xtask fuzz`.

use std::{fs, path::Path};

use portcullis_agent::fuzzing;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{} fails its fuzz target", path.display());
        inputs += 1;
    }
    assert!(inputs > 0, "the {target} corpus is empty");
}

#[test]
fn policy_file_corpus_passes() {
    replay("policy_file", fuzzing::policy_file);
}

#[test]
fn workloads_file_corpus_passes() {
    replay("workloads_file", fuzzing::workloads_file);
}

#[test]
fn packet_corpus_passes() {
    replay("packet", fuzzing::packet);
}
