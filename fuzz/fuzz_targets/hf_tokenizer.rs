//! A tokenizer.json (HF `tokenizers`, as binllm wraps it), then encoding and decoding.
#![no_main]

use binllm_format::TextTokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tokenizer) = TextTokenizer::from_json_bytes(data) {
        if let Ok(ids) = tokenizer.encode("Hello, world! 123 <|im_start|>\n\t", true) {
            let _ = tokenizer.decode(&ids, false);
        }
        let _ = tokenizer.decode(&[0, 1, 2, u32::MAX], true);
    }
});
