//! Every YAML example in docs/policy.md is a valid policy (blocks fenced as
//! ```` ```yaml fragment ```` show part of a spec and must be valid YAML;
//! ```` ```yaml workloads ```` ones are workloads files): the docs cannot
//! drift from what the parser accepts.

use std::path::Path;

use portcullis_agent::policy::parse::{parse_inventory, parse_policies};

#[test]
fn policy_doc_examples_parse() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/policy.md");
    let doc = std::fs::read_to_string(&path).expect("docs/policy.md");
    let mut blocks = Vec::new();
    let mut fragments = 0;
    let mut workloads = 0;
    let mut current: Option<(bool, String)> = None;
    let mut is_workloads = false;
    for line in doc.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```yaml") => {
                is_workloads = l.contains("workloads");
                current = Some((l.contains("fragment"), String::new()))
            }
            (Some((_, block)), l) if l.starts_with("```") && is_workloads => {
                parse_inventory(Path::new("workloads.yaml"), block)
                    .unwrap_or_else(|e| panic!("workloads example is invalid: {e:?}\n{block}"));
                workloads += 1;
                current = None;
            }
            (Some((fragment, block)), l) if l.starts_with("```") => {
                if *fragment {
                    serde_saphyr::from_str::<serde_json::Value>(block)
                        .unwrap_or_else(|e| panic!("fragment is not YAML: {e}\n{block}"));
                    fragments += 1;
                } else {
                    blocks.push(std::mem::take(block));
                }
                current = None;
            }
            (Some((_, block)), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    assert!(
        blocks.len() >= 5 && fragments >= 1 && workloads >= 1,
        "expected examples in {}",
        path.display()
    );
    for (i, block) in blocks.iter().enumerate() {
        let parsed = parse_policies(&path, block)
            .unwrap_or_else(|e| panic!("example {} of docs/policy.md: {e:?}\n{block}", i + 1));
        assert!(
            !parsed.is_empty(),
            "example {} holds no policy:\n{block}",
            i + 1
        );
    }
}
