//! A policy file, as the file source reads it (checks in
//! `portcullis_agent::fuzzing::policy_file`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis_agent::fuzzing::policy_file(data));
