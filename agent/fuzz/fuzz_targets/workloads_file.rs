//! The workloads file (checks in `portcullis_agent::fuzzing::workloads_file`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis_agent::fuzzing::workloads_file(data));
