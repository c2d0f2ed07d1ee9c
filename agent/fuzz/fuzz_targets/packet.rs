//! The packet parser the kernel programs share with the host (checks in
//! `portcullis_agent::fuzzing::packet`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis_agent::fuzzing::packet(data));
