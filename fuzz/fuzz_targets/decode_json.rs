//! The json decoder on arbitrary bytes.
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::decode(data, etlmesh_config::Format::Json));
