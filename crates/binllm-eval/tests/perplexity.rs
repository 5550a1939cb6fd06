//! Windowing and perplexity: the windows and scored positions on a small token list, and
//! perplexity equal to an independent float64 loop over the bigram model's logit table.

mod common;

use binllm_eval::perplexity::{perplexity_of_tokens, PerplexitySet};
use binllm_eval::{perplexity_windows, run_perplexity, LanguageModel, PerplexityOptions, Window};
use binllm_testing::language_model::{BigramModel, BOS};

fn w(start: usize, end: usize, score_from: usize) -> Window {
    Window {
        start,
        end,
        score_from,
    }
}

/// Scored absolute positions of a window list.
fn scored(windows: &[Window]) -> Vec<usize> {
    windows
        .iter()
        .flat_map(|w| w.start + w.score_from..w.end)
        .collect()
}

#[test]
fn non_overlapping_windows_drop_the_partial_tail() {
    // 10 tokens, ctx 4: [0,4) [4,8), tokens 8 and 9 dropped (GPTQ).
    let windows = perplexity_windows(10, 4, None).unwrap();
    assert_eq!(windows, [w(0, 4, 1), w(4, 8, 1)]);
    assert_eq!(scored(&windows), [1, 2, 3, 5, 6, 7]);
    // stride == ctx is the same protocol.
    assert_eq!(perplexity_windows(10, 4, Some(4)).unwrap(), windows);
    assert_eq!(perplexity_windows(8, 4, None).unwrap().len(), 2);
    assert!(perplexity_windows(3, 4, None).unwrap().is_empty());
}

#[test]
fn sliding_windows_score_every_token_once() {
    // HF guide, ctx 4, stride 2 over 10 tokens.
    let windows = perplexity_windows(10, 4, Some(2)).unwrap();
    assert_eq!(windows, [w(0, 4, 1), w(2, 6, 2), w(4, 8, 2), w(6, 10, 2)]);
    assert_eq!(scored(&windows), (1..10).collect::<Vec<_>>());
    // A stream that ends inside a stride: the last window is short, scores the rest.
    let windows = perplexity_windows(9, 4, Some(3)).unwrap();
    assert_eq!(windows, [w(0, 4, 1), w(3, 7, 1), w(6, 9, 1)]);
    assert_eq!(scored(&windows), (1..9).collect::<Vec<_>>());
    // stride 1: each window scores its last token only.
    let windows = perplexity_windows(6, 3, Some(1)).unwrap();
    assert_eq!(windows, [w(0, 3, 1), w(1, 4, 2), w(2, 5, 2), w(3, 6, 2)]);
    assert_eq!(scored(&windows), [1, 2, 3, 4, 5]);
}

/// NLL of tokens[i] after tokens[i - 1] from the logit table, in f64 from scratch.
fn f64_nll(model: &BigramModel, tokens: &[u32], positions: &[usize]) -> f64 {
    let mut total = 0.0f64;
    for &i in positions {
        let row: Vec<f64> = model.row(tokens[i - 1]).iter().map(|&x| x as f64).collect();
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let log_z = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        total += log_z - row[tokens[i] as usize];
    }
    total
}

const TEXT: &str = "It was the best of times, it was the worst of times, it was the age of \
wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch of \
incredulity, it was the season of Light, it was the season of Darkness.";

#[test]
fn perplexity_equals_a_float64_loop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("text.txt");
    std::fs::write(&path, TEXT).unwrap();
    let set: PerplexitySet = format!("file:{}", path.display()).parse().unwrap();

    for (ctx, stride, batch) in [
        (32, None, 1),
        (32, None, 3),
        (50, Some(16), 2),
        (20, Some(7), 4),
    ] {
        let mut model = BigramModel::new(7, 64, batch);
        let tokens = model.tokenizer().encode(TEXT, true).unwrap();
        assert_eq!(
            tokens[0], BOS,
            "with special tokens the text starts with BOS"
        );
        assert_eq!(tokens.len(), TEXT.len() + 1, "one token per character");

        let result = run_perplexity(
            &mut model,
            &set,
            dir.path(),
            &PerplexityOptions {
                ctx: Some(ctx),
                stride,
                limit: None,
                llama_cpp: false,
                show_progress: false,
            },
        )
        .unwrap();

        let windows = perplexity_windows(tokens.len(), ctx, stride).unwrap();
        let positions = scored(&windows);
        let expected = f64_nll(&model, &tokens, &positions);
        assert_eq!(result.tokens, tokens.len());
        assert_eq!(result.windows, windows.len());
        assert_eq!(result.scored_tokens, positions.len());
        let rel = (result.nll_sum - expected).abs() / expected;
        assert!(
            rel < 1e-6,
            "ctx {ctx} stride {stride:?}: {} vs {expected}",
            result.nll_sum
        );
        let ppl = (expected / positions.len() as f64).exp();
        assert!((result.ppl - ppl).abs() / ppl < 1e-6);
        if stride.is_none() {
            assert_eq!(result.windows, tokens.len() / ctx);
            assert_eq!(result.unused_tokens, tokens.len() % ctx);
            assert!(
                result.notes.iter().any(|n| n.contains("dropped")),
                "{:?}",
                result.notes
            );
        } else {
            assert_eq!(result.scored_tokens, tokens.len() - 1);
        }
        // Windows went to the engine at most `batch` at a time.
        assert!(model.calls.iter().all(|&(n, _)| n <= batch));
    }
}

/// The scored positions are the ones the windows name, not shifted: a model whose only
/// wrong answer is at one position changes the NLL by exactly that position's amount.
#[test]
fn perplexity_of_tokens_sums_only_scored_positions() {
    let mut model = BigramModel::new(3, 16, 2);
    let tokens: Vec<u32> = (0..40).map(|i| 3 + (i * 7 % 90) as u32).collect();
    let windows = perplexity_windows(tokens.len(), 16, Some(5)).unwrap();
    let (nll, n) = perplexity_of_tokens(&mut model, &tokens, &windows, false, "t").unwrap();
    assert_eq!(n, tokens.len() - 1);
    let expected = f64_nll(&model, &tokens, &(1..tokens.len()).collect::<Vec<_>>());
    assert!((nll - expected).abs() / expected < 1e-6);
}

/// The shared perplexity texts are assembled as the HF data-set scripts and GPTQ do.
#[test]
fn shared_texts_follow_gptq() {
    let dir = common::data_dir();
    let (wiki, how) = PerplexitySet::WikiText2.text(&dir).unwrap();
    assert!(how.contains("4358 HF rows"), "{how}");
    // Rows are the file's lines with their newline; blank lines are "" (the first line of
    // wiki.test.raw is " \n").
    assert!(wiki.starts_with("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is"));
    let (ptb, _) = PerplexitySet::Ptb.text(&dir).unwrap();
    assert!(ptb.starts_with("no it was n't black monday but while the new york"));
    let (ptb_valid, _) = PerplexitySet::PtbValid.text(&dir).unwrap();
    assert!(ptb_valid.contains("\n\n"));
    let (c4, how) = PerplexitySet::C4.text(&dir).unwrap();
    assert!(how.contains("first 1100 documents"), "{how}");
    assert!(c4.starts_with("We offer valet parking"));
}

#[test]
fn limit_scores_only_the_first_windows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("text.txt");
    std::fs::write(&path, TEXT).unwrap();
    let set: PerplexitySet = format!("file:{}", path.display()).parse().unwrap();
    let mut model = BigramModel::new(7, 64, 2);
    let tokens = model.tokenizer().encode(TEXT, true).unwrap();
    let result = run_perplexity(
        &mut model,
        &set,
        dir.path(),
        &PerplexityOptions {
            ctx: Some(16),
            stride: None,
            limit: Some(2),
            llama_cpp: false,
            show_progress: false,
        },
    )
    .unwrap();
    let windows = perplexity_windows(tokens.len(), 16, None).unwrap();
    assert!(windows.len() > 2);
    let positions = scored(&windows[..2]);
    let expected = f64_nll(&model, &tokens, &positions);
    assert_eq!(result.windows, 2);
    assert_eq!(result.scored_tokens, positions.len());
    assert!((result.nll_sum - expected).abs() / expected < 1e-6);
    assert!(
        result.notes.iter().any(|n| n.contains("--limit")),
        "{:?}",
        result.notes
    );
}

#[test]
fn llama_cpp_windows_score_the_second_half_of_each() {
    use binllm_eval::perplexity::llama_cpp_windows;
    // 10 tokens, windows of 4: two windows (the last 2 tokens unused), each scoring targets
    // 3..4 of the window, as llama-perplexity scores the logits of positions 2..3.
    let windows = llama_cpp_windows(10, 4).unwrap();
    assert_eq!(windows.len(), 2);
    assert_eq!((windows[1].start, windows[1].end), (4, 8));
    assert!(windows.iter().all(|w| w.score_from == 3));
    let scored: usize = windows.iter().map(|w| w.end - w.start - w.score_from).sum();
    assert_eq!(scored, 2);
    assert!(llama_cpp_windows(10, 2).is_err());
}
