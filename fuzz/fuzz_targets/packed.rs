//! binllm's packed (.b1) reader, then the runtime built from what it read and one forward
//! step: a file that loads must also run (or refuse) without a panic.
#![no_main]

use binllm_format::packed::PackedModel;
use binllm_infer::{KvCache, Model, RuntimeOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = binllm_fuzz::scratch_file("input.b1", data);
    if let Ok((model, _)) = PackedModel::read_parts(&path) {
        let _ = model.tokenizer();
        let options = RuntimeOptions {
            threads: 1,
            ..RuntimeOptions::default()
        };
        if let Ok((runtime, _)) = Model::load(&path, &options) {
            let mut cache = KvCache::new(&runtime.config);
            let _ = runtime.forward(&mut cache, &[0, 1]);
        }
    }
});
