//! The engine hook and the whole pipeline on the deterministic bigram model: consistency
//! checks, a benchmark run over real task files, request ordering and batching, the report
//! round trip, Markdown and the side-by-side comparison.

mod common;

use binllm_eval::lm::{score_all, ScoreRequest};
use binllm_eval::tasks::{encode_pair, score_request};
use binllm_eval::{
    compare, parse_benchmarks, render_markdown, run_benchmarks, EvalReport, EvalSettings,
    LanguageModel, TokenScore,
};
use binllm_testing::language_model::{char_tokenizer, check_language_model, BigramModel, BOS};

#[test]
fn the_bigram_model_passes_the_engine_check() {
    let mut model = BigramModel::new(1, 64, 3);
    let report = check_language_model(
        &mut model,
        &[
            "Once upon a time there was a cat.",
            "The dog ran home.",
            "Hi there!",
        ],
        1e-6,
    )
    .unwrap();
    assert!(report.positions > 50);
    assert_eq!(report.batch_difference, 0.0);
}

/// An engine whose scores depend on the batch (a padding bug) fails the check.
struct LeakyPadding(BigramModel);

impl LanguageModel for LeakyPadding {
    fn max_context(&self) -> usize {
        self.0.max_context()
    }
    fn tokenizer(&self) -> &binllm_format::TextTokenizer {
        self.0.tokenizer()
    }
    fn score(&mut self, batch: &[ScoreRequest]) -> anyhow::Result<Vec<Vec<TokenScore>>> {
        let n = batch.len() as f32;
        let mut out = self.0.score(batch)?;
        for s in out.iter_mut().flatten() {
            s.logprob -= 0.01 * (n - 1.0);
        }
        Ok(out)
    }
    fn generate_greedy(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        stop: &[u32],
    ) -> anyhow::Result<Vec<u32>> {
        self.0.generate_greedy(prompt, max_new_tokens, stop)
    }
}

#[test]
fn the_engine_check_catches_batch_dependence() {
    let mut model = LeakyPadding(BigramModel::new(1, 64, 3));
    let err = check_language_model(&mut model, &["abcdef", "ghijkl"], 1e-3).unwrap_err();
    assert!(format!("{err}").contains("depend on the batch"), "{err}");
}

#[test]
fn encode_pair_moves_trailing_spaces_and_splits_the_whole_encoding() {
    let tok = char_tokenizer();
    let (ctx, cont) = encode_pair(&tok, "Answer: ", "yes").unwrap();
    assert_eq!(tok.decode(&ctx, false).unwrap(), "Answer:");
    assert_eq!(tok.decode(&cont, false).unwrap(), " yes");
    // No special tokens around prompts.
    assert!(!ctx.contains(&BOS));
    // An empty context conditions on BOS.
    let (ctx, cont) = encode_pair(&tok, "", "hi").unwrap();
    assert_eq!(ctx, [BOS]);
    assert_eq!(cont.len(), 2);
}

#[test]
fn long_requests_are_truncated_from_the_left_as_lm_eval_does() {
    let r = score_request(&[5, 6, 7, 8, 9], &[10, 11], 4).unwrap();
    // (context + continuation)[-(max_length + 1):]
    assert_eq!(r.tokens, [7, 8, 9, 10, 11]);
    assert_eq!(r.score_from, 3);
    assert!(score_request(&[5], &[1, 2, 3, 4, 5], 4).is_err());
}

#[test]
fn requests_go_longest_first_and_come_back_in_order() {
    let mut model = BigramModel::new(2, 64, 2);
    let requests: Vec<ScoreRequest> = [3usize, 9, 5, 7, 4]
        .iter()
        .map(|&n| ScoreRequest {
            tokens: (0..n as u32).map(|i| 3 + i).collect(),
            score_from: 1,
        })
        .collect();
    let scores = score_all(&mut model, &requests, &binllm_progress::Progress::hidden()).unwrap();
    assert_eq!(
        scores.iter().map(Vec::len).collect::<Vec<_>>(),
        [2, 8, 4, 6, 3]
    );
    assert_eq!(model.calls, [(2, 9), (2, 5), (1, 3)]);
}

#[test]
fn a_benchmark_run_reports_every_number_and_renders() {
    let dir = tempfile::tempdir().unwrap();
    let text_path = dir.path().join("story.txt");
    std::fs::write(
        &text_path,
        "Once upon a time, a small fox lived by the river. ".repeat(20),
    )
    .unwrap();
    let mut model = BigramModel::new(5, 4096, 8);
    let benchmarks = parse_benchmarks(&format!(
        "file:{},boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa",
        text_path.display()
    ))
    .unwrap();
    let settings = EvalSettings {
        data_dir: common::data_dir(),
        model_label: "bigram-test".into(),
        engine_label: "test f32".into(),
        ctx: Some(128),
        stride: None,
        limit: Some(6),
        llama_cpp_perplexity: false,
        show_progress: false,
    };
    let report = run_benchmarks(&mut model, &benchmarks, &settings).unwrap();
    assert_eq!(report.perplexity.len(), 1);
    let ppl = &report.perplexity[0];
    // --limit 6 also limits the perplexity windows (the text fills more than six).
    assert!(ppl.tokens / 128 > 6, "{} tokens", ppl.tokens);
    assert_eq!(ppl.windows, 6);
    assert_eq!(ppl.scored_tokens, ppl.windows * 127);
    assert!(ppl.ppl.is_finite() && ppl.ppl > 1.0);
    assert_eq!(report.tasks.len(), 7);
    for t in &report.tasks {
        assert_eq!(t.n, 6);
        assert_eq!(t.examples.len(), 6);
        let hits = t.examples.iter().filter(|e| e.pred == e.gold).count() as f64;
        assert!((t.metrics.acc.value - hits / 6.0).abs() < 1e-12);
    }
    assert!(report.tasks[0].num_docs == 3270);

    // Round trip through the JSON file.
    let out = dir.path().join("results.json");
    report.save(&out).unwrap();
    let back = EvalReport::load(&out).unwrap();
    assert_eq!(back.tasks[2].examples, report.tasks[2].examples);
    assert_eq!(back.perplexity[0].ppl, report.perplexity[0].ppl);

    let md = render_markdown(&report);
    assert!(md.contains("| HellaSwag | validation | 6/10042 |"), "{md}");
    assert!(
        md.contains(&format!("| {} |", ppl.tokens)),
        "token count in the table: {md}"
    );
    assert!(
        md.contains(&format!("only the first 6 of {} windows", ppl.tokens / 128)),
        "{md}"
    );
    assert!(
        md.contains("| BoolQ | validation | 6/3270 |") && md.contains(" | - |"),
        "{md}"
    );

    // Side by side with a second model: one column each, rows the union of metrics.
    let mut other = BigramModel::new(6, 4096, 8);
    let tasks_only = parse_benchmarks("piqa,c4").unwrap();
    let settings_c4 = EvalSettings {
        limit: Some(3),
        model_label: "other".into(),
        ..settings.clone()
    };
    // C4 through the char tokenizer is large; only the tasks go into this second report.
    let second = run_benchmarks(&mut other, &tasks_only[..1], &settings_c4).unwrap();
    let second_path = dir.path().join("second.json");
    second.save(&second_path).unwrap();
    let table = compare(&[report.clone(), second]);
    assert_eq!(
        binllm_eval::compare_files(&[out.clone(), second_path]).unwrap(),
        table
    );
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].contains("bigram-test (test f32)") && lines[0].contains("other (test f32)"));
    let ppl_row = lines.iter().find(|l| l.starts_with("| file:")).unwrap();
    assert!(
        ppl_row.ends_with(" - |"),
        "the second report has no perplexity: {ppl_row}"
    );
    assert!(lines.iter().any(|l| l.starts_with("| PIQA acc_norm |")));
    assert!(
        lines.iter().position(|l| l.starts_with("| file:"))
            < lines.iter().position(|l| l.starts_with("| BoolQ acc |"))
    );

    // Models whose files share a name are told apart by their folders.
    let in_run = |run: &str| {
        let mut r = report.clone();
        r.run.model = format!("/runs/{run}/sign-model.safetensors");
        r
    };
    let header = compare(&[in_run("binaryllm"), in_run("ste")])
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(
        header.contains("binaryllm/sign-model.safetensors (test f32)")
            && header.contains("ste/sign-model.safetensors (test f32)"),
        "{header}"
    );
}
