//! The workloads file, as the file source reads it: never a panic, an
//! accepted inventory is consistent, and an error message never carries an
//! unbounded piece of the input.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portcullis_agent::{policy::parse::parse_inventory, source::file::error_chain};

/// Longest message a bad file may produce (values are abbreviated).
const MAX_MESSAGE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_inventory(Path::new("workloads.yaml"), text) {
        Ok(inventory) => {
            // What was accepted passes the same checks again.
            assert_eq!(inventory.check(), Ok(()));
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
