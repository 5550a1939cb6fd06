//! llama2.c's tokenizer.bin reader (and a round trip through what it builds).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = binllm_fuzz::scratch_file("tokenizer.bin", data);
    if let Ok(tokenizer) = binllm_format::llama2c::read_tokenizer(&path, 512) {
        if let Ok(ids) = tokenizer.encode("Once upon a time, 42 foxes.", true) {
            let _ = tokenizer.decode(&ids, false);
        }
    }
});
