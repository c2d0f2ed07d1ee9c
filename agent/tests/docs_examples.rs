//! Every YAML example in docs/policy.md is a valid policy (blocks fenced as
//! ```` ```yaml fragment ```` show part of a spec and must be valid YAML):
//! the docs cannot drift from what the parser accepts.

use std::path::Path;

use portcullis_agent::policy::parse::parse_policies;

#[test]
fn policy_doc_examples_parse() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/policy.md");
    let doc = std::fs::read_to_string(&path).expect("docs/policy.md");
    let mut blocks = Vec::new();
    let mut fragments = 0;
    let mut current: Option<(bool, String)> = None;
    for line in doc.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```yaml") => {
                current = Some((l.contains("fragment"), String::new()))
            }
            (Some((fragment, block)), l) if l.starts_with("```") => {
                if *fragment {
                    serde_yaml::from_str::<serde_yaml::Value>(block)
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
        blocks.len() >= 5 && fragments >= 1,
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
