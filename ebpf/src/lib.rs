//! Library target so the agent can build-depend on this crate (cargo then
//! rebuilds the agent when the kernel programs change). The programs
//! themselves are the `portcullis` binary for `bpfel-unknown-none`.
#![no_std]
