//! A policy file, as the file source reads it: never a panic, and an error
//! message never carries an unbounded piece of the input.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portcullis_agent::{
    policy::{model::names, parse::parse_policies},
    source::file::error_chain,
};

/// Longest message a bad file may produce (values are abbreviated).
const MAX_MESSAGE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // The file source reads text; other bytes never reach the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_policies(Path::new("fuzz.yaml"), text) {
        Ok(policies) => {
            for p in &policies {
                let name = &p.reference.name;
                assert!(names::dns1123_subdomain(name).is_ok(), "accepted {name:?}");
                let namespace = &p.reference.namespace;
                assert!(
                    namespace.is_empty() || names::dns1123_label(namespace).is_ok(),
                    "accepted namespace {namespace:?}"
                );
            }
        }
        Err(e) => {
            let message = error_chain(&e);
            assert!(
                message.len() <= MAX_MESSAGE,
                "a {} byte message: {}",
                message.len(),
                message.chars().take(300).collect::<String>()
            );
        }
    }
});
