#![allow(dead_code)]
use std::path::PathBuf;

/// `<repo root>/../shared/data/eval`: the shared data sets beside the clone (CI has them).
pub use binllm_testing::shared::eval_data_dir as data_dir;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}
