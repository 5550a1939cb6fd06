//! The official `openai` Python client (pinned in scripts/setup.sh, installed into
//! `.deps/openai-venv`) against `binllm serve` on stories260K: completions and chat, whole and
//! streamed, and the refusals it maps to its exception classes. Without the venv this test
//! fails, saying how to install it.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

#[test]
fn the_official_openai_client_gets_completions_and_chats() {
    let python = binllm_testing::shared::repo_root().join(".deps/openai-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `bash scripts/setup.sh`, which installs the openai client there",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let model = stories_packed(dir.path(), false);
    let server = start(&model, |o| o.api_key = Some("sesame".into()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let base_url = format!("http://{}/v1", server.addr());
    let run = Command::new(&python)
        .args([script, &base_url, server.model_id(), "sesame"])
        .output()
        .expect("the venv's python runs");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "the client failed:\n{stderr}");
    let out: Value = serde_json::from_slice(&run.stdout).unwrap();
    eprintln!("{out:#}");

    assert_eq!(out["openai_version"], "3.51.0");
    let whole = &out["completion"];
    assert!(!whole["text"].as_str().unwrap().is_empty());
    assert_eq!(out["completion_stream"]["text"], whole["text"]);
    assert_eq!(
        out["completion_stream"]["finish_reason"],
        whole["finish_reason"]
    );
    assert!(out["completion_stream"]["chunks"].as_u64().unwrap() > 2);
    let usage = &whole["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );

    let chat = &out["chat"];
    assert_eq!(chat["role"], "assistant");
    assert!(!chat["text"].as_str().unwrap().is_empty());
    assert_eq!(out["chat_stream"]["role"], "assistant");
    assert_eq!(out["chat_stream"]["text"], chat["text"]);
    assert_eq!(out["chat_stream"]["finish_reason"], chat["finish_reason"]);
    assert_eq!(out["chat_stream"]["usage"], chat["usage"]);

    assert_eq!(
        out["errors"],
        json!({"unknown_model": [404, "model_not_found"], "n2": [400, "n"], "wrong_key": [401, "invalid_api_key"]})
    );
    assert_eq!(out["models"], json!([server.model_id()]));
    server.stop().unwrap();
}
