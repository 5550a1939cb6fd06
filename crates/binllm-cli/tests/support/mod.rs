//! What the CLI tests share: running the binary under test, its printed text, and the
//! stories260K PTQ export most of them start from.

#![allow(dead_code)] // each test file uses its own part

use std::path::Path;
use std::process::{Command, Output};

/// Runs `binllm` (the binary under test) with `args`, output captured.
pub fn binllm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_binllm"))
        .args(args)
        .output()
        .expect("binllm runs")
}

/// What a run printed, stdout then stderr.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `binllm export --ptq` of stories260K (with its tok512 tokenizer) to `out`, `extra` flags
/// appended; panics with the output if it fails, else returns what it printed.
pub fn export_stories_ptq(out: &Path, extra: &[&str]) -> String {
    let s = binllm_testing::shared::stories260k_dir();
    let (model, tokenizer) = (s.join("stories260K.bin"), s.join("tok512.bin"));
    let mut args = vec![
        "export",
        "--ptq",
        model.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let result = binllm(&args);
    let printed = text(&result);
    assert!(result.status.success(), "export failed: {printed}");
    printed
}
