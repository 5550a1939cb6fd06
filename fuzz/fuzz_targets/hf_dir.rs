//! A Hugging Face directory: config.json (the input's first part) and model.safetensors
//! (the rest).
#![no_main]

use binllm_format::{LoadOptions, PretrainedModel};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (config, safetensors) = binllm_fuzz::split_two(data);
    binllm_fuzz::scratch_file("config.json", config);
    binllm_fuzz::scratch_file("model.safetensors", safetensors);
    let _ = PretrainedModel::load(binllm_fuzz::scratch_dir(), &LoadOptions::default());
});
