//! Writes the seed corpora that are not plain copies of files for the fuzz targets
//! (`fuzz/`): tiny Hugging Face directories (config + safetensors joined as the `hf_dir`
//! target reads them), tokenizer.json files rebuilt from the GGUF fixtures' tokenizers,
//! chat templates with a message, and `binllm serve` request bodies. `tools/fuzz/run.sh` runs this; nothing is committed.
//!
//! Usage: cargo run -p binllm-testing --example fuzz_seeds -- OUT_DIR

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use binllm_format::gguf::{tokenizer::from_metadata, GgufFile, MetaValue};
use binllm_testing::shared::{repo_root, smollm2_gguf};
use binllm_testing::synthetic::write_hf_dir;
use serde_json::json;

/// Two parts as `binllm_fuzz::split_two` reads them: a u16 length, the first, the second.
fn join_two(first: &[u8], second: &[u8]) -> Vec<u8> {
    let mut out = (first.len() as u16).to_le_bytes().to_vec();
    out.extend_from_slice(first);
    out.extend_from_slice(second);
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes).with_context(|| format!("{name}: cannot write"))
}

fn gguf_files() -> Vec<PathBuf> {
    let fixtures = repo_root().join("crates/binllm-format/tests/fixtures/gguf");
    let mut files: Vec<PathBuf> = ["tiny_llama.gguf", "tiny_qwen2.gguf", "tiny_qwen3.gguf"]
        .iter()
        .map(|f| fixtures.join(f))
        .collect();
    files.push(smollm2_gguf());
    files
}

fn main() -> Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: fuzz_seeds OUT_DIR")?,
    );

    let hf = out.join("hf_dir");
    for (i, (architecture, model_type, tied)) in [
        ("LlamaForCausalLM", "llama", false),
        ("LlamaForCausalLM", "llama", true),
        ("Qwen2ForCausalLM", "qwen2", false),
        ("Qwen3ForCausalLM", "qwen3", true),
    ]
    .into_iter()
    .enumerate()
    {
        let config = json!({
            "architectures": [architecture], "model_type": model_type, "vocab_size": 16,
            "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": tied, "head_dim": 4
        });
        let dir = tempfile_dir(&out, i)?;
        write_hf_dir(&config, &dir)?;
        let seed = join_two(
            &std::fs::read(dir.join("config.json"))?,
            &std::fs::read(dir.join("model.safetensors"))?,
        );
        write(&hf, &format!("{model_type}-{i}"), &seed)?;
        std::fs::remove_dir_all(&dir)?;
    }

    let tokenizers = out.join("hf_tokenizer");
    let templates = out.join("chat_template");
    for (i, path) in gguf_files().iter().enumerate() {
        let file = GgufFile::open(path)?;
        if let Some(tokenizer) = from_metadata(&file)?.tokenizer {
            let json = tokenizer.to_json()?;
            // SmolLM2's 1.5 MB tokenizer would make every execution slow: small ones only.
            if json.len() < 64 << 10 {
                write(&tokenizers, &format!("gguf-{i}.json"), json.as_bytes())?;
            }
        }
        if let Some(template) = file
            .get("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
        {
            let seed = join_two(template.as_bytes(), b"What is the capital of France?");
            write(&templates, &format!("gguf-{i}"), &seed)?;
        }
    }
    let simple = "{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}\n{% endfor %}\
                  {% if add_generation_prompt %}<|assistant|>{% endif %}";
    write(
        &templates,
        "simple",
        &join_two(simple.as_bytes(), b"Hi {{ there }}"),
    )?;
    // serve_request: the first byte picks the route (even: completion, odd: chat).
    let requests = out.join("serve_request");
    let bodies = [
        (
            0u8,
            json!({"model": "fuzz", "prompt": "Once upon a time", "max_tokens": 8}),
        ),
        (
            0,
            json!({"model": "fuzz", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0.7,
                   "top_p": 0.9, "seed": 7, "stop": ["\n", "."], "stream": true,
                   "stream_options": {"include_usage": true}}),
        ),
        (
            1,
            json!({"model": "fuzz", "messages": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Hi"}], "max_tokens": 6}),
        ),
        (
            1,
            json!({"model": "fuzz", "messages": [{"role": "user", "content": "Hi"}],
                   "stream": true, "n": 1, "max_tokens": 3}),
        ),
    ];
    for (i, (route, body)) in bodies.iter().enumerate() {
        let mut seed = vec![*route];
        seed.extend(body.to_string().as_bytes());
        write(&requests, &format!("request-{i}"), &seed)?;
    }
    println!("seeds written under {}", out.display());
    Ok(())
}

fn tempfile_dir(out: &Path, i: usize) -> Result<PathBuf> {
    let dir = out.join(format!(".hf-{i}"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
