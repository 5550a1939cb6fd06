//! `binllm convert` end to end on the real stories260K model and TinyStories text (CPU):
//! the smoke preset against PTQ (and its result on the packed engine against libtorch),
//! kill -9 and --resume, bad input, and the NaN stop.
#![cfg(feature = "torch")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use binllm_testing::shared::{repo_root as repo, shared};

fn stories() -> PathBuf {
    shared("models/stories260K/stories260K.bin")
}

/// Conversions are CPU-bound and libtorch's threads spin when they share cores: run them
/// one at a time (the test harness runs tests in parallel).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn binllm(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_binllm"));
    cmd.args(args);
    cmd
}

fn run_ok(args: &[&str]) -> Output {
    let out = binllm(args).output().expect("binllm runs");
    assert!(
        out.status.success(),
        "binllm {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_err(args: &[&str]) -> String {
    let out = binllm(args).output().expect("binllm runs");
    assert!(!out.status.success(), "binllm {args:?} should have failed");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !err.contains("panicked"),
        "a clear error, not a panic: {err}"
    );
    err
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

/// The first `bytes` of tinystories_val as a text file (the whole set takes minutes to score
/// in a debug build).
fn val_slice(dir: &Path, bytes: usize) -> PathBuf {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(shared("data/corpus/tinystories/tinystories_val.txt.gz")).unwrap(),
    )
    .read_to_string(&mut text)
    .unwrap();
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let path = dir.join("tinystories_val_head.txt");
    std::fs::write(&path, &text[..end]).unwrap();
    path
}

fn perplexity(model: &Path, engine: &str, text: &Path) -> f64 {
    let report = model.with_extension(format!("{engine}.eval.json"));
    run_ok(&[
        "eval",
        "--engine",
        engine,
        "--model",
        model.to_str().unwrap(),
        "--tasks",
        &format!("file:{}", text.display()),
        "--ctx",
        "256",
        "--device",
        "cpu",
        "--data-dir",
        shared("data/eval").to_str().unwrap(),
        "--out",
        report.to_str().unwrap(),
    ]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    report["perplexity"][0]["ppl"].as_f64().unwrap()
}

#[test]
fn smoke_preset_converts_stories260k_far_better_than_ptq() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = shared("data/corpus/tinystories/tinystories.txt.gz");
    let run = dir.path().join("smoke");
    let ptq = dir.path().join("ptq");
    let started = std::time::Instant::now();
    run_ok(&[
        "convert",
        "--model",
        stories().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--preset",
        "smoke",
        "--device",
        "cpu",
    ]);
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    run_ok(&[
        "convert",
        "--model",
        stories().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        ptq.to_str().unwrap(),
        "--method",
        "ptq",
        "--preset",
        "smoke",
        "--device",
        "cpu",
    ]);

    let s = summary(&run);
    assert_eq!(s["phases"].as_array().unwrap().len(), 20, "20 phases");
    assert!(
        s["stage1"]["final_loss"].as_f64().unwrap() < s["stage1"]["initial_loss"].as_f64().unwrap(),
        "Stage 1 lowers the loss"
    );
    for file in [
        "config.toml",
        "metrics.jsonl",
        "summary.md",
        "training.png",
        "sign-model.safetensors",
    ] {
        assert!(
            run.join(file).exists(),
            "{file} missing from the run directory"
        );
    }

    let text = val_slice(dir.path(), 120_000);
    let trained = perplexity(&run.join("sign-model.safetensors"), "torch", &text);
    let baseline = perplexity(&ptq.join("sign-model.safetensors"), "torch", &text);
    println!("smoke conversion: {minutes:.1} min; tinystories_val (first 120 kB) perplexity: binaryllm sign form {trained:.2}, PTQ {baseline:.2}");
    println!(
        "gap F-form vs sign form on held-out windows: {:+.4} nats/token",
        s["validation"]["sign_gap"].as_f64().unwrap()
    );
    assert!(
        trained * 10.0 < baseline,
        "sign-form perplexity {trained} should be far below PTQ's {baseline}"
    );

    // The converted model on the pure-Rust packed engine: the sign model as written, and the
    // exported file (input scales folded, f16), against libtorch's sign form.
    let sign_path = run.join("sign-model.safetensors");
    let sign = binllm_format::packed::PackedModel::read(&sign_path).unwrap();
    common::compare(&sign, &Default::default(), "smoke-converted sign model");
    let exported = dir.path().join("smoke.b1");
    run_ok(&[
        "export",
        run.to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
    ]);
    let (file, q8) = binllm_format::packed::PackedModel::read_parts(&exported).unwrap();
    common::compare(&file, &q8, "smoke-converted, exported");
    let on_packed = perplexity(&sign_path, "packed", &text);
    let exported_ppl = perplexity(&exported, "packed", &text);
    println!(
        "packed engine: sign model {on_packed:.4} (libtorch {trained:.4}), exported file {exported_ppl:.4}"
    );
    assert!(
        (on_packed / trained - 1.0).abs() < 1e-4,
        "the engines disagree on the same weights: {on_packed} vs {trained}"
    );
    assert!(
        (exported_ppl / trained - 1.0).abs() < 1e-2,
        "export changed the model: {exported_ppl} vs {trained}"
    );
}

/// A tiny but complete run (Stage 1 + 20 phases of 4 steps); `overrides` replace options.
fn small_run_args<'a>(
    out: &'a str,
    data: &'a str,
    overrides: &[(&'a str, &'a str)],
) -> Vec<&'a str> {
    let mut options = vec![
        ("--model", stories_str()),
        ("--data", data),
        ("--out", out),
        ("--preset", "smoke"),
        ("--device", "cpu"),
        ("--seq-len", "64"),
        ("--batch-tokens", "256"),
        ("--micro-batch", "2"),
        ("--steps", "80"),
        ("--stage1-steps", "4"),
        ("--val-windows", "4"),
        ("--checkpoint-every", "3"),
        ("--keep-checkpoints", "3"),
    ];
    for (key, value) in overrides {
        match options.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => options.push((key, value)),
        }
    }
    // An empty value stands for a flag without one.
    std::iter::once("convert")
        .chain(options.into_iter().flat_map(
            |(k, v)| {
                if v.is_empty() {
                    vec![k]
                } else {
                    vec![k, v]
                }
            },
        ))
        .collect()
}

fn stories_str() -> &'static str {
    Box::leak(stories().to_str().unwrap().to_string().into_boxed_str())
}

fn last_training_loss(run: &Path) -> f64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|v| v["stage"] == 2)
        .and_then(|v| v["loss"].as_f64())
        .unwrap()
}

/// `convert --resume` of the run in `run` (its settings come from its config.toml).
fn resume_args(run: &Path) -> [&str; 6] {
    let out = run.to_str().unwrap();
    ["convert", "--out", out, "--resume", "--device", "cpu"]
}

/// An interrupted and resumed run ends exactly where the uninterrupted one does.
fn assert_same_end(uninterrupted: &Path, resumed: &Path) {
    assert_eq!(
        last_training_loss(uninterrupted),
        last_training_loss(resumed),
        "the final training loss must match the uninterrupted run's exactly"
    );
    assert_eq!(
        summary(uninterrupted)["validation"]["final_sign_form"],
        summary(resumed)["validation"]["final_sign_form"]
    );
}

#[test]
fn kill_minus_nine_then_resume_reproduces_the_uninterrupted_run() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = shared("data/corpus/tinystories/tinystories.txt.gz");
    let data = data.to_str().unwrap();
    let straight = dir.path().join("straight");
    run_ok(&small_run_args(straight.to_str().unwrap(), data, &[]));

    let killed = dir.path().join("killed");
    let mut child = binllm(&small_run_args(killed.to_str().unwrap(), data, &[]))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill in the middle of a phase (4 steps each), after some checkpoints exist.
    let metrics = killed.join("metrics.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let steps = std::fs::read_to_string(&metrics)
            .map(|t| t.lines().filter(|l| l.contains("\"stage\":2")).count())
            .unwrap_or(0);
        if steps >= 42 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run made no progress"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("summary.json").exists());

    let resume_started = std::time::Instant::now();
    let resumed = run_ok(&resume_args(&killed));
    let resume_seconds = resume_started.elapsed().as_secs_f64();
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(log.contains("resuming from step"), "{log}");
    // The summary's wall-clock sums both segments: more than the resumed one alone.
    let wall = summary(&killed)["wall_seconds"].as_f64().unwrap();
    assert!(
        wall > resume_seconds,
        "wall_seconds {wall} counts only the last segment ({resume_seconds} s)"
    );
    let (a, b) = (summary(&straight), summary(&killed));
    println!(
        "final training loss: uninterrupted {} / resumed {}; held-out sign form {} / {}",
        last_training_loss(&straight),
        last_training_loss(&killed),
        a["validation"]["final_sign_form"],
        b["validation"]["final_sign_form"]
    );
    assert_same_end(&straight, &killed);
    assert_eq!(a["phases"], b["phases"], "per-phase reports must match");
}

/// A disk that fills while a checkpoint is written (RLIMIT_FSIZE stands in for it: any write
/// past 1 MiB fails with EFBIG, as ENOSPC would): the run stops with an error naming the
/// checkpoint, leaves no partial file, and a resume then ends exactly where an
/// uninterrupted run does.
#[test]
fn a_full_disk_during_a_checkpoint_loses_nothing() {
    use std::os::unix::process::CommandExt;
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = shared("data/corpus/tinystories/tinystories.txt.gz");
    let data = data.to_str().unwrap();
    let straight = dir.path().join("straight");
    // Half the usual steps: the failure comes at the first checkpoint anyway.
    let shorter = [("--steps", "40")];
    run_ok(&small_run_args(straight.to_str().unwrap(), data, &shorter));

    let full = dir.path().join("full");
    let mut cmd = binllm(&small_run_args(full.to_str().unwrap(), data, &shorter));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1 << 20,
                rlim_max: 1 << 20,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Without this the kernel kills the writer with SIGXFSZ instead of failing the write.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let failed = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("checkpoint") && stderr.contains("disk full?"),
        "{stderr}"
    );
    let leftovers: Vec<String> = std::fs::read_dir(&full)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|name| name.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");

    let resumed = run_ok(&resume_args(&full));
    assert!(resumed.status.success());
    assert_same_end(&straight, &full);
}

#[test]
fn bad_input_gives_clear_errors() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();

    let err = run_err(&[
        "convert",
        "--model",
        stories_str(),
        "--data",
        "/nonexistent/corpus.txt",
        "--out",
        out,
        "--device",
        "cpu",
    ]);
    assert!(
        err.contains("/nonexistent/corpus.txt") && err.contains("no such"),
        "{err}"
    );

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n<|endoftext|>\n   \n").unwrap();
    let err = run_err(&[
        "convert",
        "--model",
        stories_str(),
        "--data",
        empty.to_str().unwrap(),
        "--out",
        out,
        "--device",
        "cpu",
    ]);
    assert!(err.contains("empty.txt") && err.contains("empty"), "{err}");

    // A tokenizer that does not belong to the model.
    let foreign = dir.path().join("tok.bin");
    let mut bytes = std::fs::read(shared("models/stories260K/tok512.bin")).unwrap();
    bytes.extend_from_slice(&0f32.to_le_bytes());
    bytes.extend_from_slice(&3i32.to_le_bytes());
    bytes.extend_from_slice(b"xyz");
    std::fs::write(&foreign, bytes).unwrap();
    let data = shared("data/corpus/tinystories/tinystories.txt.gz");
    let err = run_err(&[
        "convert",
        "--model",
        stories_str(),
        "--tokenizer",
        foreign.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out,
        "--device",
        "cpu",
    ]);
    assert!(err.contains("tok.bin") && err.contains("mismatch"), "{err}");

    // A corrupt checkpoint on resume.
    let run = dir.path().join("resumable");
    run_ok(&small_run_args(
        run.to_str().unwrap(),
        data.to_str().unwrap(),
        &[
            ("--steps", "20"),
            ("--phases", "2"),
            ("--keep-final-checkpoints", ""),
        ],
    ));
    let ckpts: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let newest = ckpts.iter().max().unwrap();
    let bytes = std::fs::read(newest).unwrap();
    std::fs::write(newest, &bytes[..bytes.len() / 2]).unwrap();
    let err = run_err(&resume_args(&run));
    assert!(
        err.contains(newest.file_name().unwrap().to_str().unwrap()) && err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("nan");
    let data = shared("data/corpus/tinystories/tinystories.txt.gz");
    let err = run_err(&small_run_args(
        run.to_str().unwrap(),
        data.to_str().unwrap(),
        &[("--lr", "1e30"), ("--checkpoint-every", "1")],
    ));
    assert!(err.contains("non-finite"), "{err}");
    assert!(err.contains("checkpoint"), "{err}");
    let ckpt_dir = run.join("checkpoints");
    if ckpt_dir.exists() {
        for entry in std::fs::read_dir(&ckpt_dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            assert!(
                !name.contains(".tmp"),
                "no half-written checkpoint may remain: {}",
                path.display()
            );
        }
    }
    assert!(!run.join("sign-model.safetensors").exists());
}

/// A small corpus of titled documents (Wikipedia's layout) whose title prompts fit the tiny
/// chat model's 128-token context.
fn titled_corpus(dir: &Path) -> PathBuf {
    let path = dir.join("titled.txt");
    let docs: Vec<String> = (0..60)
        .map(|i| {
            format!(
                "Topic {i}\n\nTopic {i} is a subject with a long lead paragraph that says what it is about, {}.\n<|endoftext|>\n",
                "and then some more words about it ".repeat(6)
            )
        })
        .collect();
    std::fs::write(&path, docs.concat()).unwrap();
    path
}

#[test]
fn recipe_switches_chat_data_and_the_sign_stage_run_end_to_end() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let model = repo().join("crates/binllm-format/tests/fixtures/gguf/tiny_llama.gguf");
    let data = titled_corpus(dir.path());
    let run = dir.path().join("recipe");
    run_ok(&[
        "convert",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--preset",
        "smoke",
        "--device",
        "cpu",
        "--seq-len",
        "64",
        "--batch-tokens",
        "256",
        "--micro-batch",
        "4",
        "--steps",
        "40",
        "--stage1-steps",
        "2",
        "--val-windows",
        "2",
        "--distill",
        "kd",
        "--chat-tokens",
        "3k",
        "--chat-share",
        "0.25",
        "--sign-fraction",
        "0.1",
        "--sign-lr",
        "5e-4",
        "--lr-schedule",
        "wsd",
        "--decay-fraction",
        "0.5",
        "--scale-lr-mult",
        "2",
        "--no-decay-latent",
        "--t-max",
        "50",
    ]);
    let config: toml::Value =
        toml::from_str(&std::fs::read_to_string(run.join("config.toml")).unwrap()).unwrap();
    assert_eq!(config["chat_tokens"].as_integer(), Some(3000));
    assert_eq!(config["chat_share"].as_float(), Some(0.25));
    assert_eq!(config["sign_fraction"].as_float(), Some(0.1));
    assert_eq!(config["sign_lr"].as_float(), Some(5e-4));
    assert_eq!(config["lr_schedule"].as_str(), Some("wsd"));
    assert_eq!(config["decay_latent"].as_bool(), Some(false));
    assert_eq!(config["t_max"].as_float(), Some(50.0));
    assert_eq!(config["scale_lr_mult"].as_float(), Some(2.0));

    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("plan.json")).unwrap()).unwrap();
    assert_eq!(plan["sign_steps"].as_u64(), Some(4));
    assert!(plan["chat_windows"].as_u64().unwrap() > 0);

    // The sign stage trains exactly the exported form: the last training form and the
    // shipped form give the same held-out loss, bit for bit.
    let s = summary(&run);
    assert_eq!(s["validation"]["sign_gap"].as_f64(), Some(0.0));
    assert!(s["chat_data"]["transcripts"].as_u64().unwrap() > 0);
    for who in ["student", "teacher"] {
        let score = &s["chat"][who];
        assert!(score["answer_perplexity"].as_f64().unwrap() >= 1.0, "{who}");
        assert_eq!(
            score["prompts"].as_u64(),
            Some(binllm_eval::chat::held_out_prompts().len() as u64),
            "{who}"
        );
    }
    assert!(run.join("chat-reference.json").exists());
    assert!(run.join("teacher-chat.tok").exists());

    // The learning rate follows warm-up-free WSD over the 36 steps before the sign stage:
    // the peak for half of them, then a linear decay to the floor. The sign stage's 4 steps
    // restart at --sign-lr and decay by a cosine. t ends at 50.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let stage2: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["stage"] == 2)
        .collect();
    assert_eq!(stage2.len(), 40);
    let lr: Vec<f64> = stage2.iter().map(|v| v["lr"].as_f64().unwrap()).collect();
    assert!(lr[..18].iter().all(|&x| x == lr[0]), "{lr:?}");
    assert!(lr[18..36].windows(2).all(|w| w[1] < w[0]), "{lr:?}");
    assert!(
        (lr[35] - 1e-4).abs() < 1e-12,
        "the smoke preset's floor before the sign stage: {}",
        lr[35]
    );
    assert_eq!(lr[36], 5e-4, "the sign stage restarts at --sign-lr");
    assert!(lr[36..].windows(2).all(|w| w[1] < w[0]), "{lr:?}");
    assert!(lr[39] > 1e-4 && lr[39] < 2e-4, "{}", lr[39]);
    let t_last = stage2[39]["t"].as_f64().unwrap();
    assert!((t_last - 50.0).abs() < 1e-9, "t at the last step: {t_last}");

    // Transcripts left in a run directory are reused only for the same request.
    let chat_run = |name: &str, tokens: &str| {
        let other = dir.path().join(name);
        std::fs::create_dir_all(&other).unwrap();
        for file in ["teacher-chat.tok", "teacher-chat.json"] {
            std::fs::copy(run.join(file), other.join(file)).unwrap();
        }
        let out = run_ok(&[
            "convert",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            other.to_str().unwrap(),
            "--preset",
            "smoke",
            "--device",
            "cpu",
            "--seq-len",
            "64",
            "--batch-tokens",
            "256",
            "--micro-batch",
            "4",
            "--steps",
            "20",
            "--stage1-steps",
            "0",
            "--val-windows",
            "2",
            "--chat-eval-prompts",
            "0",
            "--chat-tokens",
            tokens,
            "--chat-share",
            "0.25",
        ]);
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(other.join("teacher-chat.json")).unwrap(),
        )
        .unwrap();
        (String::from_utf8_lossy(&out.stderr).to_string(), report)
    };
    let (log, report) = chat_run("same-request", "3k");
    assert!(
        log.contains("teacher chat data: ") && log.contains(" tokens from "),
        "{log}"
    );
    assert_eq!(report["requested_tokens"].as_u64(), Some(3000));
    let (log, report) = chat_run("other-request", "2k");
    assert!(
        !log.contains(" tokens from "),
        "a different request regenerates: {log}"
    );
    assert_eq!(report["requested_tokens"].as_u64(), Some(2000));
}

/// The Stage-2 losses of a run, step by step.
fn stage2_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["stage"] == 2)
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn chunked_loss_trains_like_whole_logits() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let model = repo().join("crates/binllm-format/tests/fixtures/gguf/tiny_llama.gguf");
    let data = titled_corpus(dir.path());
    for distill in ["ce", "kd"] {
        let mut runs = Vec::new();
        for chunk in ["0", "100"] {
            let run = dir.path().join(format!("{distill}-{chunk}"));
            run_ok(&[
                "convert",
                "--model",
                model.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--out",
                run.to_str().unwrap(),
                "--preset",
                "smoke",
                "--device",
                "cpu",
                "--seq-len",
                "64",
                "--batch-tokens",
                "256",
                "--micro-batch",
                "2",
                "--steps",
                "20",
                "--stage1-steps",
                "2",
                "--val-windows",
                "2",
                "--chat-eval-prompts",
                "0",
                "--distill",
                distill,
                "--loss-chunk-tokens",
                chunk,
            ]);
            runs.push(run);
        }
        let (whole, chunked) = (stage2_losses(&runs[0]), stage2_losses(&runs[1]));
        assert_eq!(whole.len(), 20);
        // f32 sums in another order: the first steps agree to rounding. Later, Adam turns
        // rounding-sized differences of near-zero gradients into whole steps, so the runs
        // drift apart as two seeds' runs would not: well within 0.02 nats (the bound the
        // training-speed issue sets for GPU runs).
        println!("{distill}: whole {whole:?}\nchunked {chunked:?}");
        for (step, (a, b)) in whole.iter().zip(&chunked).enumerate() {
            let bound = if step < 5 {
                1e-5 * a.abs().max(1.0)
            } else {
                0.02
            };
            assert!((a - b).abs() < bound, "{distill} step {step}: {a} vs {b}");
        }
        let held_out = |run: &Path| {
            summary(run)["validation"]["final_sign_form"]
                .as_f64()
                .unwrap()
        };
        let (a, b) = (held_out(&runs[0]), held_out(&runs[1]));
        assert!((a - b).abs() < 0.02, "{distill}: held-out {a} vs {b}");
    }
}

#[test]
fn an_impossible_budget_fails_at_once_and_leaves_nothing_to_resume() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = shared("data/corpus/tinystories/tinystories.txt.gz");
    let run = dir.path().join("budget");
    let (out, data) = (run.to_str().unwrap(), data.to_str().unwrap());
    let started = std::time::Instant::now();
    let err = run_err(&small_run_args(out, data, &[("--steps", "5")]));
    assert!(
        err.contains("--steps 5") && err.contains("use --steps 20"),
        "{err}"
    );
    let mut by_tokens = small_run_args(out, data, &[("--tokens", "1000")]);
    let at = by_tokens.iter().position(|a| *a == "--steps").unwrap();
    by_tokens.drain(at..at + 2);
    let err = run_err(&by_tokens);
    assert!(
        err.contains("--tokens 1000") && err.contains("use --tokens 5120"),
        "{err}"
    );
    let err = run_err(&small_run_args(
        out,
        data,
        &[("--steps", "99999999999999999999")],
    ));
    assert!(err.contains("--steps"), "{err}");
    let mut huge = small_run_args(out, data, &[("--tokens", "99999999999999999999")]);
    let at = huge.iter().position(|a| *a == "--steps").unwrap();
    huge.drain(at..at + 2);
    let err = run_err(&huge);
    assert!(err.contains("too large"), "{err}");
    let unusable = dir.path().join("a-file");
    std::fs::write(&unusable, b"").unwrap();
    let cache = unusable.join("cache");
    let err = run_err(&small_run_args(
        out,
        data,
        &[("--cache-dir", cache.to_str().unwrap())],
    ));
    assert!(
        err.contains("a-file/cache") && err.contains("token cache"),
        "{err}"
    );
    assert!(
        started.elapsed().as_secs_f64() < 10.0,
        "refused before any work"
    );
    assert!(!run.join("config.toml").exists(), "nothing to resume");
    // The next run in the same directory starts afresh, finishes, and keeps no checkpoint.
    run_ok(&small_run_args(out, data, &[("--steps", "20")]));
    assert!(run.join("sign-model.safetensors").exists());
    assert!(
        !run.join("checkpoints").exists(),
        "a finished run deletes its checkpoints"
    );
}

#[test]
fn resuming_before_the_first_checkpoint_says_so_and_logs_each_step_once() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = shared("data/corpus/tinystories/tinystories.txt.gz");
    let run = dir.path().join("early");
    let args = small_run_args(
        run.to_str().unwrap(),
        data.to_str().unwrap(),
        &[("--steps", "20"), ("--keep-final-checkpoints", "")],
    );
    run_ok(&args);
    // As if killed during Stage 1: settings and log lines exist, no checkpoint yet.
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    std::fs::remove_file(run.join("summary.json")).unwrap();
    let out = run_ok(&resume_args(&run));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("no checkpoint yet") && log.contains("starting again from step 1"),
        "{log}"
    );
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["global_step"].as_u64())
        .collect();
    let stage_lines = metrics.lines().filter(|l| l.contains("\"stage\"")).count();
    assert_eq!(
        stage_lines,
        4 + 20,
        "4 Stage-1 and 20 Stage-2 steps, each logged once"
    );
    assert!(
        steps.windows(2).all(|w| w[0] <= w[1]),
        "the log runs forward: {steps:?}"
    );
}

#[test]
fn gpus_flag_and_rank_environment_are_checked_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = |gpus: &'static str, device: &'static str| {
        vec![
            "convert",
            "--model",
            stories_str(),
            "--data",
            "/nonexistent/corpus.txt",
            "--out",
            out.to_str().unwrap(),
            "--device",
            device,
            "--gpus",
            gpus,
        ]
    };
    assert!(run_err(&args("0", "cpu")).contains("--gpus must be at least 1"));
    assert!(run_err(&args("2", "cpu")).contains("needs --device cuda"));
    assert!(run_err(&args("2", "cuda:1")).contains("needs --device cuda"));
    // 64 GPUs: more than this machine (none on CPU CI) has.
    let err = run_err(&args("64", "cuda"));
    assert!(err.contains("--gpus 64: only"), "{err}");
    assert!(!out.exists(), "nothing was written");

    // A child process with an incomplete rank environment stops with the variable named.
    let child = binllm(&args("2", "cuda"))
        .env("BINLLM_RANK", "1")
        .env_remove("BINLLM_WORLD_SIZE")
        .output()
        .unwrap();
    assert!(!child.status.success());
    let err = String::from_utf8_lossy(&child.stderr);
    assert!(err.contains("BINLLM_WORLD_SIZE"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
