//! `binllm export`, `run`, `bench`, `inspect` and `eval` with a chat reference on a packed
//! stories260K, as a user runs them (pure Rust: these pass in the `--no-default-features`
//! build too).

mod support;

use std::path::{Path, PathBuf};

use std::process::Command;

use support::{binllm, export_stories_ptq};

fn stories_dir() -> PathBuf {
    binllm_testing::shared::stories260k_dir()
}

fn exported(dir: &Path, head: &str) -> PathBuf {
    let out = dir.join(format!("stories-{head}.b1"));
    let printed = export_stories_ptq(&out, &["--head", head]);
    assert!(printed.contains("bits/weight    body 1.2"), "{printed}");
    assert!(printed.contains("file size"), "{printed}");
    out
}

#[test]
fn export_then_run_streams_a_completion() {
    let dir = tempfile::tempdir().unwrap();
    for head in ["f16", "q8"] {
        let model = exported(dir.path(), head);
        let result = binllm(&[
            "run",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "20",
            "--threads",
            "1",
            "--stats",
        ]);
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        let stdout = String::from_utf8_lossy(&result.stdout);
        assert!(
            stdout.starts_with("Once upon a time") && stdout.len() > "Once upon a time".len() + 5,
            "{stdout}"
        );
        assert!(String::from_utf8_lossy(&result.stderr).contains("tok/s"));
        // Seeded sampling repeats exactly.
        let sample = |seed: &str| {
            let r = binllm(&[
                "run",
                "--model",
                model.to_str().unwrap(),
                "--prompt",
                "Lily saw",
                "--max-tokens",
                "16",
                "--temperature",
                "0.8",
                "--top-k",
                "40",
                "--top-p",
                "0.9",
                "--seed",
                seed,
            ]);
            assert!(r.status.success());
            String::from_utf8_lossy(&r.stdout).to_string()
        };
        assert_eq!(sample("3"), sample("3"));
    }
}

#[test]
fn chat_needs_a_template() {
    let dir = tempfile::tempdir().unwrap();
    let model = exported(dir.path(), "f16");
    let result = binllm(&["run", "--model", model.to_str().unwrap(), "--chat"]);
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("no chat template"));
}

/// `binllm eval --tasks chat:PATH` on a reference holding the model's own greedy answers
/// (computed here through the packed scorer): the report gives back those answers, their
/// ended share, and a perplexity of the answers; no evaluation data directory is needed.
#[test]
fn eval_scores_a_chat_reference() {
    use binllm_eval::{ChatReference, ChatReferenceItem, LanguageModel, CHAT_REFERENCE_FORMAT};
    let dir = tempfile::tempdir().unwrap();
    let model = exported(dir.path(), "f16");
    let (runtime, file) = binllm_infer::Model::load(&model, &Default::default()).unwrap();
    let tokenizer = file.tokenizer().unwrap().unwrap();
    let stop_ids = tokenizer.eos_ids.clone();
    let mut scorer = binllm_infer::PackedScorer::new(runtime, file.tokenizer().unwrap().unwrap());
    let mut items = Vec::new();
    for prompt in ["Once upon a time", "The cat", "Lily wanted to"] {
        let prompt_ids = tokenizer.encode(prompt, true).unwrap();
        let answer_ids = scorer.generate_greedy(&prompt_ids, 24, &stop_ids).unwrap();
        items.push(ChatReferenceItem {
            prompt: prompt.into(),
            ended: stop_ids.contains(answer_ids.last().unwrap()),
            answer: tokenizer.decode(&answer_ids, true).unwrap(),
            prompt_ids,
            answer_ids,
        });
    }
    let reference = ChatReference {
        format: CHAT_REFERENCE_FORMAT.into(),
        source_model: "stories260K".into(),
        max_new_tokens: 24,
        stop_ids,
        items,
        teacher: None,
    };
    let path = dir.path().join("chat.json");
    reference.save(&path).unwrap();
    let out = dir.path().join("eval.json");
    let result = binllm(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--tasks",
        &format!("chat:{}", path.display()),
        "--data-dir",
        dir.path().join("no-data").to_str().unwrap(),
        "--threads",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "eval failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(stdout.contains("| answer ppl |"), "{stdout}");
    assert!(stdout.contains("**The cat**"), "{stdout}");
    let report = binllm_eval::EvalReport::load(&out).unwrap();
    let score = &report.chat[0].score;
    let answers: Vec<&str> = reference.items.iter().map(|i| i.answer.as_str()).collect();
    assert_eq!(score.answers, answers);
    let ended = reference.items.iter().filter(|i| i.ended).count();
    assert_eq!(score.ended_share, ended as f64 / 3.0);
    // Greedy answers are each token's most likely choice: a low perplexity, above 1.
    assert!(
        score.answer_perplexity > 1.0 && score.answer_perplexity < 20.0,
        "{}",
        score.answer_perplexity
    );
}

#[test]
fn bench_reports_speeds_and_bandwidth() {
    let dir = tempfile::tempdir().unwrap();
    let model = exported(dir.path(), "q8");
    let result = binllm(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--threads",
        "1",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "8",
        "--reps",
        "1",
        "--json",
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(report["threads"], 1);
    assert_eq!(report["head"], "q8_0");
    for key in [
        "pp_tokens_per_second",
        "tg_tokens_per_second",
        "memcpy_gb_per_second",
        "read_gb_per_second",
    ] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key}: {report}");
    }
}

#[test]
fn inspect_reads_a_packed_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = exported(dir.path(), "q8");
    let result = binllm(&["inspect", model.to_str().unwrap(), "--json"]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(report["format"], "binllm packed 1-bit");
    assert_eq!(report["q8_tensors"][0], "model.embed_tokens.weight");
    assert_eq!(report["block_linears"], 35);
}

#[test]
fn a_broken_file_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = exported(dir.path(), "f16");
    let bytes = std::fs::read(&model).unwrap();
    let broken = dir.path().join("broken.b1");
    std::fs::write(&broken, &bytes[..bytes.len() - 100]).unwrap();
    for args in [
        vec!["run", "--model", broken.to_str().unwrap(), "--prompt", "x"],
        vec!["bench", "--model", broken.to_str().unwrap()],
    ] {
        let result = binllm(&args);
        assert!(!result.status.success());
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(
            stderr.contains("broken.b1") && stderr.contains("truncated"),
            "{stderr}"
        );
    }
    let result = binllm(&[
        "export",
        broken.to_str().unwrap(),
        "--out",
        dir.path().join("x.b1").to_str().unwrap(),
    ]);
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("broken.b1"));
}

#[test]
fn chat_keeps_the_conversation_over_stdin_lines() {
    use std::io::Write;
    use std::process::Stdio;
    let s = stories_dir();
    let pretrained = binllm_format::PretrainedModel::load(
        &s.join("stories260K.bin"),
        &binllm_format::LoadOptions {
            tokenizer: Some(s.join("tok512.bin")),
        },
    )
    .unwrap();
    let mut sign =
        binllm_infer::ptq::ptq_sign_model(&pretrained, binllm_infer::ptq::InputScales::None)
            .unwrap();
    // A minimal template: each message on its own line, then the assistant's turn.
    sign.chat_template = Some("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}".into());
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("chat.b1");
    sign.write(&model).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_binllm"))
        .args([
            "run",
            "--model",
            model.to_str().unwrap(),
            "--chat",
            "--max-tokens",
            "6",
            "--threads",
            "1",
            "--stats",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello there\n\nTell me a story\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Two replies (the empty line is skipped), and no "> " prompt: stdin is a pipe, not a
    // person at a terminal.
    assert_eq!(stderr.matches("generated").count(), 2, "{stderr}");
    assert_eq!(stderr.matches("> ").count(), 0, "{stderr}");
    // The second turn runs only what the cache lacks: less than the whole conversation.
    let prompt_tokens: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.split("prompt ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(prompt_tokens.len(), 2, "{stderr}");
    // The whole second prompt is the first one, the reply (up to 6 tokens) and the new turn.
    let new_turn = pretrained
        .tokenizer()
        .unwrap()
        .encode("\nuser: Tell me a story\nassistant:", false)
        .unwrap()
        .len();
    assert!(
        prompt_tokens[1] < prompt_tokens[0] + new_turn,
        "{prompt_tokens:?}"
    );
}

#[test]
fn export_of_a_run_dir_folds_and_reports_what_it_kept() {
    let s = stories_dir();
    let pretrained = binllm_format::PretrainedModel::load(
        &s.join("stories260K.bin"),
        &binllm_format::LoadOptions {
            tokenizer: Some(s.join("tok512.bin")),
        },
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (scales, folded, kept) in [
        (
            binllm_infer::ptq::InputScales::Foldable { seed: 1 },
            "20 folded, 0 kept",
            0,
        ),
        // Independent vectors: q/k/v, gate/up and o_proj (2 query heads per kv head) stay.
        (
            binllm_infer::ptq::InputScales::Independent { seed: 1 },
            "5 folded, 15 kept",
            15,
        ),
    ] {
        let run = dir.path().join(format!("run-{kept}"));
        std::fs::create_dir_all(&run).unwrap();
        binllm_infer::ptq::ptq_sign_model(&pretrained, scales)
            .unwrap()
            .write(&run.join("sign-model.safetensors"))
            .unwrap();
        let out = run.join("model.b1");
        let result = binllm(&[
            "export",
            run.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let stdout = String::from_utf8_lossy(&result.stdout);
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        assert!(stdout.contains(folded), "{stdout}");
        assert_eq!(stdout.matches("  kept: ").count(), kept, "{stdout}");
        let inspect = binllm(&["inspect", out.to_str().unwrap(), "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
        let vectors = report["input_scale_vectors"].as_u64().unwrap();
        assert_eq!(vectors, if kept == 0 { 0 } else { 5 * 6 }, "{report}");
    }
}

#[test]
fn version_says_what_the_build_has_and_a_missing_command_says_where_it_is() {
    let out = binllm(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("binllm ") && text.contains("\nbuild: ") && text.contains("\nthis CPU: "),
        "{text}"
    );
    if cfg!(feature = "torch") {
        assert!(text.contains("libtorch engine"), "{text}");
    } else {
        assert!(text.contains("pure-Rust packed engine only"), "{text}");
        let out = binllm(&["convert", "--model", "m.gguf", "--out", "runs/x"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("pure-Rust build") && err.contains("cargo build --release -p binllm-cli"),
            "{err}"
        );
    }
}
