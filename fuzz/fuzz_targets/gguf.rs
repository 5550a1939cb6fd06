//! The GGUF reader: header, metadata, tensor infos, every tensor type's dequantisation,
//! the mapping to a model and the embedded tokenizer.
#![no_main]

use binllm_format::gguf::GgufFile;
use binllm_format::{LoadOptions, PretrainedModel};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = binllm_fuzz::scratch_file("input.gguf", data);
    if let Ok(file) = GgufFile::open(&path) {
        for info in &file.tensors {
            let _ = file.read_tensor(info);
        }
    }
    let _ = PretrainedModel::load(&path, &LoadOptions::default());
});
