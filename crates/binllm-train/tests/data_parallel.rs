//! A whole conversion on several ranks (threads of this process, through the in-process
//! collective) against the same conversion on one: the same data and steps, so the loss
//! and gradient norm of every step agree up to f32 summation order, and rank 0 alone
//! writes the run directory.

mod common;

use std::path::Path;

use binllm_train::convert::{self, ConvertConfig, Preset};
use binllm_train::loss::Distill;
use binllm_train::method::Method;
use binllm_train::parallel::local::LocalGroup;
use common::shared;

fn config(cache: &Path) -> ConvertConfig {
    let data = shared("data/corpus/tinystories/tinystories.txt.gz");
    let mut c = ConvertConfig::preset(
        Preset::Smoke,
        shared("models/stories260K/stories260K.bin"),
        vec![data.display().to_string()],
        Method::Binaryllm,
    );
    c.device = "cpu".into();
    c.seq_len = 32;
    // 6 windows a step in micro-batches of 2: 4 ranks get 1, 2, 1, 2 windows.
    c.batch_tokens = 6 * 32;
    c.micro_batch = 2;
    c.steps = Some(8);
    c.stage1_steps = 2;
    c.phases = 2;
    c.val_windows = 4;
    // Distillation: the teacher's forward pass runs on each rank's shard too.
    c.distill = Distill::Mix;
    c.chat_eval_prompts = 0;
    c.cache_dir = Some(cache.to_path_buf());
    c
}

/// (loss, gradient norm) of every training step in `RUN/metrics.jsonl`.
fn steps(run: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| {
            (
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Runs `config` on `world` in-process ranks in `run`; each rank's result, by rank.
fn run_ranks(
    world: usize,
    config: impl Fn() -> ConvertConfig + Sync,
    run: &Path,
    resume: bool,
) -> Vec<Option<binllm_train::summary::Summary>> {
    let groups = LocalGroup::new(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter()
            .map(|g| {
                let c = config();
                s.spawn(move || convert::run_rank(c, run, resume, g).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assert_steps_agree(got: &[(f64, f64)], want: &[(f64, f64)], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: one record a step");
    for (k, ((loss, norm), (want_loss, want_norm))) in got.iter().zip(want).enumerate() {
        assert!(
            (loss - want_loss).abs() <= 1e-3 * want_loss.abs(),
            "{what} step {}: loss {loss} against {want_loss}",
            k + 1
        );
        assert!(
            (norm - want_norm).abs() <= 1e-3 * want_norm.abs(),
            "{what} step {}: gradient norm {norm} against {want_norm}",
            k + 1
        );
    }
}

#[test]
fn a_one_gpu_checkpoint_resumes_on_four_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = || {
        let mut c = config(&cache);
        c.checkpoint_every = 2;
        c.keep_checkpoints = 20;
        c.keep_final_checkpoints = true;
        c
    };
    let single = dir.path().join("single");
    convert::run(config(), &single, false).unwrap();
    let reference = steps(&single);
    // The run as if stopped after global step 6 (Stage 1's 2 steps and 4 of Stage 2).
    let resumed = dir.path().join("resumed");
    let status = std::process::Command::new("cp")
        .args(["-r", single.to_str().unwrap(), resumed.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut kept = 0;
    for entry in std::fs::read_dir(resumed.join("checkpoints")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let step: usize = name["step-".len()..name.len() - ".safetensors".len()]
            .parse()
            .unwrap();
        if step > 6 {
            std::fs::remove_file(&path).unwrap();
        } else {
            kept += 1;
        }
    }
    assert_eq!(kept, 3, "checkpoints at steps 2, 4 and 6");
    std::fs::remove_file(resumed.join("sign-model.safetensors")).unwrap();
    let summaries = run_ranks(4, config, &resumed, true);
    assert!(summaries[0].is_some());
    assert!(resumed.join("sign-model.safetensors").exists());
    assert_steps_agree(&steps(&resumed), &reference, "resumed on 4 ranks");
}

#[test]
fn several_ranks_train_like_one() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let single_dir = dir.path().join("single");
    let single = convert::run(config(&cache), &single_dir, false).unwrap();
    let reference = steps(&single_dir);
    assert_eq!(reference.len(), 2 + 8);
    for world in [2usize, 4] {
        let run = dir.path().join(format!("ranks-{world}"));
        let summaries = run_ranks(world, || config(&cache), &run, false);
        assert!(summaries[0].is_some(), "rank 0 returns the summary");
        assert!(summaries[1..].iter().all(Option::is_none));
        assert_steps_agree(&steps(&run), &reference, &format!("world {world}"));
        let summary = summaries[0].as_ref().unwrap();
        let v = (&summary.validation, &single.validation);
        assert!(
            (v.0.final_sign_form - v.1.final_sign_form).abs() <= 1e-3 * v.1.final_sign_form,
            "world {world}: held-out sign loss {} against {}",
            v.0.final_sign_form,
            v.1.final_sign_form
        );
        assert!(run.join("sign-model.safetensors").exists());
    }
}
