//! The llama2.c checkpoint reader.
#![no_main]

use binllm_format::{LoadOptions, PretrainedModel};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = binllm_fuzz::scratch_file("input.bin", data);
    let _ = PretrainedModel::load(&path, &LoadOptions::default());
});
