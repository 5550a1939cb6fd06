//! The chat score: the repetition-loop rule against a brute-force reading of its
//! definition, `score_chat` on the bigram model against a direct f64 computation, the
//! shares on hand-made answers, reference files (round trip and errors), and the chat
//! benchmark through `binllm eval`'s pipeline, report and comparison.

use std::path::Path;

use anyhow::{ensure, Result};
use binllm_eval::{
    compare, has_repetition_loop, held_out_prompts, parse_benchmarks, render_markdown,
    run_benchmarks, score_chat, Benchmark, ChatReference, ChatReferenceItem, ChatScore, EvalReport,
    EvalSettings, LanguageModel, ScoreRequest, TokenScore, CHAT_REFERENCE_FORMAT,
};
use binllm_format::TextTokenizer;
use binllm_testing::language_model::{char_tokenizer, BigramModel, EOS};

/// The rule read literally: some start `s`, period `p` in 1..=24 and `k >= 3` copies with
/// `k * p >= 12` such that every copy equals the first.
fn loop_by_definition(tokens: &[u32]) -> bool {
    let n = tokens.len();
    for p in 1..=24 {
        for s in 0..n {
            let block = &tokens[s..(s + p).min(n)];
            if block.len() < p {
                break;
            }
            let mut copies = 1;
            while s + (copies + 1) * p <= n
                && tokens[s + copies * p..s + (copies + 1) * p] == *block
            {
                copies += 1;
            }
            if copies >= 3 && copies * p >= 12 {
                return true;
            }
        }
    }
    false
}

/// `block` `times` times, after `before`.
fn repeated(before: &[u32], block: &[u32], times: usize) -> Vec<u32> {
    let mut out = before.to_vec();
    for _ in 0..times {
        out.extend_from_slice(block);
    }
    out
}

#[test]
fn repetition_loops_are_found() {
    // Period 1: "assistant assistant ..." twelve times.
    assert!(has_repetition_loop(&[7; 12]));
    assert!(has_repetition_loop(&repeated(&[1, 2, 3], &[9], 20)));
    // A 5-token sentence three times (15 tokens).
    assert!(has_repetition_loop(&repeated(
        &[],
        &[10, 11, 12, 13, 14],
        3
    )));
    // A loop after ordinary text, and after a partial copy.
    let text: Vec<u32> = (100..140).collect();
    assert!(has_repetition_loop(&repeated(&text, &[5, 6, 7, 8], 3)));
    assert!(has_repetition_loop(&repeated(
        &[40, 41, 12, 13],
        &[11, 12, 13],
        4
    )));
    // The longest period: 24 tokens three times.
    let block: Vec<u32> = (200..224).collect();
    assert!(has_repetition_loop(&repeated(&[], &block, 3)));
}

#[test]
fn ordinary_text_and_short_repeats_are_not_loops() {
    assert!(!has_repetition_loop(&[]));
    assert!(!has_repetition_loop(&(0..300).collect::<Vec<u32>>()));
    // Varied text with frequent tokens (spaces, "the") in between.
    let tok = char_tokenizer();
    let prose = tok
        .encode(
            "The cat sat on the mat. Then the dog came in, and the cat ran off to the garden.",
            false,
        )
        .unwrap();
    assert!(!has_repetition_loop(&prose));
    // A sentence twice is not a loop.
    assert!(!has_repetition_loop(&repeated(
        &[],
        &(0..10).collect::<Vec<u32>>(),
        2
    )));
    // Three or more copies under 12 tokens: 11 of one token, a pair 5 times, 3 x 3.
    assert!(!has_repetition_loop(&[7; 11]));
    assert!(!has_repetition_loop(&repeated(&[1], &[4, 5], 5)));
    assert!(!has_repetition_loop(&repeated(&[], &[4, 5, 6], 3)));
    // A period over 24 is not looked for.
    let block: Vec<u32> = (200..225).collect();
    assert!(!has_repetition_loop(&repeated(&[], &block, 3)));
}

#[test]
fn the_loop_rule_matches_its_definition_on_random_sequences() {
    // splitmix64, so the sequences are the same everywhere.
    let mut state = 5u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut found = [0usize; 2];
    for case in 0..3000 {
        let len = (next() % 60) as usize;
        // Small alphabets make repeats common; spliced copies make long-period ones.
        let alphabet = 1 + case % 4;
        let mut tokens: Vec<u32> = (0..len)
            .map(|_| (next() % alphabet as u64) as u32)
            .collect();
        if case % 3 == 0 && len > 4 {
            let p = 1 + (next() as usize % 12).min(len - 1);
            let block = tokens[..p].to_vec();
            let times = 2 + (next() % 3) as usize;
            tokens = repeated(&tokens[p..], &block, times);
        }
        let expected = loop_by_definition(&tokens);
        assert_eq!(has_repetition_loop(&tokens), expected, "{tokens:?}");
        found[usize::from(expected)] += 1;
    }
    assert!(found[0] > 300 && found[1] > 300, "{found:?}");
}

#[test]
fn held_out_prompts_are_48_distinct_lines_starting_with_the_plain_questions() {
    let prompts = held_out_prompts();
    assert_eq!(prompts.len(), 48);
    for (i, p) in prompts.iter().enumerate() {
        assert!(!p.is_empty() && p.trim() == *p, "{p:?}");
        assert!(!prompts[..i].contains(p), "{p:?} twice");
    }
    assert_eq!(prompts[0], "What is the capital of France?");
    assert_eq!(prompts[2], "How many legs does a spider have?");
}

/// A reference over the character tokenizer: prompts as "<s>User: ...\nAssistant:", answers
/// as given (`</s>` appended to those that ended).
fn reference(
    tok: &TextTokenizer,
    items: &[(&str, &str, bool)],
    max_new_tokens: usize,
    stop_ids: Vec<u32>,
) -> ChatReference {
    ChatReference {
        format: CHAT_REFERENCE_FORMAT.into(),
        source_model: "teacher".into(),
        max_new_tokens,
        stop_ids,
        items: items
            .iter()
            .map(|&(prompt, answer, ended)| {
                let mut answer_ids = tok.encode(answer, false).unwrap();
                if ended {
                    answer_ids.push(EOS);
                }
                ChatReferenceItem {
                    prompt: prompt.into(),
                    prompt_ids: tok
                        .encode(&format!("User: {prompt}\nAssistant:"), true)
                        .unwrap(),
                    answer_ids,
                    answer: answer.into(),
                    ended,
                }
            })
            .collect(),
        teacher: None,
    }
}

/// log p(next | prev) of the bigram model, log-softmax in f64.
fn bigram_logprob(model: &BigramModel, prev: u32, next: u32) -> f64 {
    let row: Vec<f64> = model.row(prev).iter().map(|&l| f64::from(l)).collect();
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = row.iter().map(|l| (l - max).exp()).sum();
    row[next as usize] - max - sum.ln()
}

/// The bigram model's greedy chain after `last`: the largest logit of the row, the first
/// on ties, until a stop id (kept) or `limit` tokens.
fn bigram_chain(model: &BigramModel, mut last: u32, limit: usize, stop: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    while out.len() < limit {
        let row = model.row(last);
        let best = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .unwrap()
            .0 as u32;
        out.push(best);
        last = best;
        if stop.contains(&best) {
            break;
        }
    }
    out
}

#[test]
fn score_chat_on_the_bigram_model_matches_a_direct_computation() {
    let tok = char_tokenizer();
    let mut model = BigramModel::new(3, 128, 2);
    let prompts = [
        "What is the capital of France?",
        "Why is the sky blue?",
        "How many legs does a spider have?",
        "Give me three tips for sleeping better.",
        "What is photosynthesis?",
        "Hi",
    ];
    let answers = [
        ("Paris.", true),
        ("Light scatters.", true),
        ("Eight", false),
        ("Sleep well", true),
        ("Plants make sugar from light.", false),
        ("Hello!", true),
    ];
    let items: Vec<(&str, &str, bool)> = prompts
        .iter()
        .zip(answers)
        .map(|(p, (a, e))| (*p, a, e))
        .collect();
    let mut reference = reference(&tok, &items, 30, vec![EOS]);
    // A bigram's greedy chain depends only on the last prompt token, which the template
    // makes the same everywhere: end each prompt differently.
    for (i, item) in reference.items.iter_mut().enumerate() {
        item.prompt_ids.push(20 + 9 * i as u32);
    }
    // Stop also on the fourth token of the first chain: that answer ends, and the others
    // end only where their chains meet it.
    let first_last = *reference.items[0].prompt_ids.last().unwrap();
    reference
        .stop_ids
        .push(bigram_chain(&model, first_last, 4, &[])[3]);
    let stop = reference.stop_ids.clone();

    let score = score_chat(&mut model, &reference, false).unwrap();

    let (mut nll, mut count) = (0.0f64, 0usize);
    for item in &reference.items {
        let mut prev = *item.prompt_ids.last().unwrap();
        for &next in &item.answer_ids {
            nll -= bigram_logprob(&model, prev, next);
            prev = next;
            count += 1;
        }
    }
    let nll = nll / count as f64;
    assert!(
        (score.answer_nll - nll).abs() < 1e-5 * nll,
        "{} vs {nll}",
        score.answer_nll
    );
    assert!((score.answer_perplexity - nll.exp()).abs() < 1e-5 * nll.exp());

    let chains: Vec<Vec<u32>> = reference
        .items
        .iter()
        .map(|item| bigram_chain(&model, *item.prompt_ids.last().unwrap(), 30, &stop))
        .collect();
    let ended: Vec<bool> = chains
        .iter()
        .map(|c| stop.contains(c.last().unwrap()))
        .collect();
    let looped: Vec<bool> = chains.iter().map(|c| loop_by_definition(c)).collect();
    // The fixture exercises both outcomes of both checks.
    assert!(ended.contains(&true) && ended.contains(&false), "{ended:?}");
    assert!(
        looped.contains(&true) && looped.contains(&false),
        "{looped:?}"
    );
    let share = |flags: Vec<bool>| flags.iter().filter(|&&f| f).count() as f64 / 6.0;
    assert_eq!(score.prompts, 6);
    assert_eq!(score.ended_share, share(ended.clone()));
    assert_eq!(score.loop_share, share(looped.clone()));
    assert_eq!(
        score.clean_share,
        share(ended.iter().zip(&looped).map(|(e, l)| *e && !l).collect())
    );
    let tokens: usize = chains.iter().map(Vec::len).sum();
    assert_eq!(score.mean_answer_tokens, tokens as f64 / 6.0);
    let texts: Vec<String> = chains
        .iter()
        .map(|c| tok.decode(c, true).unwrap())
        .collect();
    assert_eq!(score.answers, texts);
}

/// Scores as the bigram model does; answers each prompt with a scripted id list, checking
/// that it was asked with the reference's limit and stop ids.
struct Scripted {
    scorer: BigramModel,
    answers: Vec<(Vec<u32>, Vec<u32>)>,
    expected_limit: usize,
    expected_stop: Vec<u32>,
}

impl LanguageModel for Scripted {
    fn max_context(&self) -> usize {
        self.scorer.max_context()
    }
    fn tokenizer(&self) -> &TextTokenizer {
        self.scorer.tokenizer()
    }
    fn score(&mut self, batch: &[ScoreRequest]) -> Result<Vec<Vec<TokenScore>>> {
        self.scorer.score(batch)
    }
    fn generate_greedy(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        stop: &[u32],
    ) -> Result<Vec<u32>> {
        ensure!(max_new_tokens == self.expected_limit && stop == self.expected_stop);
        let (_, answer) = self
            .answers
            .iter()
            .find(|(p, _)| p == prompt)
            .expect("a scripted prompt");
        Ok(answer.clone())
    }
}

#[test]
fn shares_count_ended_looping_and_clean_answers() {
    let tok = char_tokenizer();
    let items = [
        ("one", "a", true),
        ("two", "b", true),
        ("three", "c", true),
        ("four", "d", true),
    ];
    let reference = reference(&tok, &items, 16, vec![EOS, 4]);
    let with_stop = |text: &str, stop: Option<u32>| {
        let mut ids = tok.encode(text, false).unwrap();
        ids.extend(stop);
        ids
    };
    let scripted = [
        // Ends, no loop (on the second stop id).
        with_stop("Paris.", Some(4)),
        // Ends, but loops first: one character 12 times.
        with_stop("zzzzzzzzzzzz", Some(EOS)),
        // Runs out of tokens in a loop: 5 characters 3 times (no stop id).
        with_stop("abcdeabcdeabcde", None),
        // Runs out of tokens without a loop; a stop id inside does not count as ending.
        [with_stop("Hi", Some(EOS)), with_stop("there, friend", None)].concat(),
    ];
    let mut model = Scripted {
        scorer: BigramModel::new(1, 64, 3),
        answers: reference
            .items
            .iter()
            .map(|i| i.prompt_ids.clone())
            .zip(scripted.iter().cloned())
            .collect(),
        expected_limit: 16,
        expected_stop: vec![EOS, 4],
    };
    let score = score_chat(&mut model, &reference, false).unwrap();
    assert_eq!(score.prompts, 4);
    assert_eq!(score.ended_share, 0.5);
    assert_eq!(score.loop_share, 0.5);
    assert_eq!(score.clean_share, 0.25);
    assert_eq!(score.mean_answer_tokens, (7 + 13 + 15 + 16) as f64 / 4.0);
    // Special tokens are skipped in the text; id 4 is the (ordinary) space.
    assert_eq!(score.answers[0], "Paris. ");
    assert_eq!(score.answers[1], "zzzzzzzzzzzz");
    assert_eq!(score.answers[3], "Hithere, friend");
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn reference_files_round_trip() {
    let tok = char_tokenizer();
    let mut original = reference(&tok, &[("Hi", "Hello!", true)], 8, vec![EOS]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.json");
    original.save(&path).unwrap();
    assert_eq!(ChatReference::load(&path).unwrap(), original);
    // The teacher's score is optional in the file and kept when present.
    original.teacher = Some(ChatScore {
        prompts: 1,
        answer_nll: 0.5,
        answer_perplexity: 0.5f64.exp(),
        ended_share: 1.0,
        loop_share: 0.0,
        clean_share: 1.0,
        mean_answer_tokens: 7.0,
        answers: vec!["Hello!".into()],
    });
    original.save(&path).unwrap();
    assert_eq!(ChatReference::load(&path).unwrap(), original);
}

#[test]
fn bad_reference_files_fail_naming_the_file() {
    let tok = char_tokenizer();
    let good = reference(&tok, &[("Hi", "Hello!", true)], 8, vec![EOS]);
    let dir = tempfile::tempdir().unwrap();
    let error = |path: &Path| format!("{:#}", ChatReference::load(path).unwrap_err());
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut value = serde_json::to_value(&good).unwrap();
        edit(&mut value);
        value.to_string()
    };
    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (dir.path().join("missing.json"), "cannot read"),
        (write(dir.path(), "bad.json", "{\"format\": "), "not JSON"),
        (
            write(
                dir.path(),
                "report.json",
                &with(&|v| v["format"] = "binllm-eval/1".into()),
            ),
            "expected \"binllm-chat-reference/1\"",
        ),
        (
            write(dir.path(), "noformat.json", "{\"items\": []}"),
            "no \"format\" field",
        ),
        (
            write(
                dir.path(),
                "shape.json",
                &with(&|v| v["items"] = "none".into()),
            ),
            "not a valid",
        ),
        (
            write(
                dir.path(),
                "empty.json",
                &with(&|v| v["items"] = serde_json::json!([])),
            ),
            "no items",
        ),
        (
            write(
                dir.path(),
                "noprompt.json",
                &with(&|v| v["items"][0]["prompt_ids"] = serde_json::json!([])),
            ),
            "item 0 (\"Hi\"): empty prompt_ids",
        ),
        (
            write(
                dir.path(),
                "noanswer.json",
                &with(&|v| v["items"][0]["answer_ids"] = serde_json::json!([])),
            ),
            "item 0 (\"Hi\"): empty answer_ids",
        ),
        (
            write(
                dir.path(),
                "nostop.json",
                &with(&|v| v["stop_ids"] = serde_json::json!([])),
            ),
            "no stop_ids",
        ),
    ];
    for (path, what) in cases {
        let message = error(&path);
        assert!(
            message.contains(&path.display().to_string()),
            "{path:?} not named in {message:?}"
        );
        assert!(message.contains(what), "expected {what:?} in {message:?}");
    }
}

#[test]
fn chat_benchmarks_parse_and_stay_out_of_all() {
    assert_eq!(
        parse_benchmarks("piqa, chat:refs/smollm2.json").unwrap()[1],
        Benchmark::Chat("refs/smollm2.json".into())
    );
    assert!(!parse_benchmarks("all")
        .unwrap()
        .iter()
        .any(|b| matches!(b, Benchmark::Chat(_))));
    let message = format!("{:#}", parse_benchmarks("chat:").unwrap_err());
    assert!(message.contains("chat:PATH"), "{message}");
}

#[test]
fn the_chat_benchmark_reaches_the_report_markdown_and_comparison() {
    let tok = char_tokenizer();
    let mut reference = reference(
        &tok,
        &[
            ("First question?", "One.", true),
            ("Second question?", "Two.", true),
            ("Third?", "Three.", false),
        ],
        20,
        vec![EOS],
    );
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.json");
    reference.save(&plain).unwrap();
    reference.teacher = Some(ChatScore {
        prompts: 3,
        answer_nll: 0.25,
        answer_perplexity: 0.25f64.exp(),
        ended_share: 2.0 / 3.0,
        loop_share: 0.0,
        clean_share: 2.0 / 3.0,
        mean_answer_tokens: 5.5,
        answers: vec!["One.".into(), "Two.".into(), "Three.".into()],
    });
    let with_teacher = dir.path().join("teacher.json");
    reference.save(&with_teacher).unwrap();

    let settings = EvalSettings {
        data_dir: dir.path().into(),
        model_label: "bigram".into(),
        engine_label: "test".into(),
        ctx: None,
        stride: None,
        limit: None,
        llama_cpp_perplexity: false,
        show_progress: false,
    };
    let mut model = BigramModel::new(2, 128, 4);
    let list = format!("chat:{}", with_teacher.display());
    let report = run_benchmarks(&mut model, &parse_benchmarks(&list).unwrap(), &settings).unwrap();
    assert_eq!(report.chat.len(), 1);
    let chat = &report.chat[0];
    assert_eq!(chat.reference, with_teacher.display().to_string());
    assert_eq!(chat.teacher, reference.teacher);
    assert_eq!(
        chat.score,
        score_chat(&mut model, &reference, false).unwrap()
    );
    assert_eq!(
        chat.prompts,
        ["First question?", "Second question?", "Third?"]
    );

    let md = render_markdown(&report);
    assert!(md.contains("| | this model | teacher |"), "{md}");
    let ppl_row = format!(
        "| answer ppl | {:.3} | {:.3} |",
        chat.score.answer_perplexity,
        0.25f64.exp()
    );
    assert!(md.contains(&ppl_row), "{md}");
    assert!(md.contains("| clean (%) |"), "{md}");
    assert!(md.contains("| 66.7 |"), "the teacher's shares: {md}");
    assert!(md.contains("**Second question?**"), "{md}");
    assert!(md.contains("> *teacher:*\n> Two."), "{md}");

    // Without a teacher in the file: one figure column.
    let list = format!("chat:{}", plain.display());
    let student = run_benchmarks(&mut model, &parse_benchmarks(&list).unwrap(), &settings).unwrap();
    assert!(render_markdown(&student).contains("| | this model |\n"));

    // Saved and loaded, the chat rows reach `binllm eval compare`.
    let path = dir.path().join("report.json");
    report.save(&path).unwrap();
    let loaded = EvalReport::load(&path).unwrap();
    assert_eq!(loaded.chat, report.chat);
    let table = compare(&[loaded, student]);
    let ppl = format!("| chat answer ppl | {:.3} |", chat.score.answer_perplexity);
    assert!(table.contains(&ppl), "{table}");
    let clean = format!(
        "| chat clean share | {:.1} % |",
        100.0 * chat.score.clean_share
    );
    assert!(table.contains(&clean), "{table}");
}

#[test]
fn reports_without_chat_results_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let report = EvalReport::new(binllm_eval::RunInfo::new(
        "m",
        "e",
        64,
        None,
        Path::new("data"),
    ));
    let mut value = serde_json::to_value(&report).unwrap();
    value.as_object_mut().unwrap().remove("chat");
    let path = write(dir.path(), "old.json", &value.to_string());
    assert!(EvalReport::load(&path).unwrap().chat.is_empty());
}
