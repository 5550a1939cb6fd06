//! Against the Python reference (tools/reference/eval_reference.py: lm-eval 0.4.13's own
//! task code, transformers on SmolLM2-135M-Instruct Q4_1), committed as a fixture:
//!
//! - our prompts for the first 200 examples of every task give the same number of choices,
//!   the same (context, continuation) strings (by hash), the same gold index and the same
//!   acc_norm lengths;
//! - our perplexity texts are the same strings (by hash and length);
//! - with `BINLLM_EVAL_TOKENIZER_JSON=<SmolLM2 tokenizer.json>`, our `encode_pair` gives the
//!   same token ids and the perplexity texts the same token counts;
//! - `compare_with_reference` accepts the reference's own numbers and rejects perturbed ones.

mod common;

use binllm_eval::metrics::{multiple_choice_metrics, ExampleScore};
use binllm_eval::reference::{prompt_mismatches, sha16, token_mismatches, tokens_sha16};
use binllm_eval::{
    compare_with_reference, EvalReport, PerplexityResult, PerplexitySet, ReferenceFile, RunInfo,
    Task, TaskResult,
};

const FIXTURE: &str = "smollm2-135m-instruct-q4_1.reference.json";

fn reference() -> ReferenceFile {
    ReferenceFile::load(&common::fixture(FIXTURE)).unwrap()
}

#[test]
fn prompts_match_the_reference_for_200_examples_of_every_task() {
    let reference = reference();
    assert_eq!(reference.limit, 200);
    for task in Task::ALL {
        let theirs = &reference.tasks[task.name()];
        let ours = binllm_eval::tasks::load_examples(task, &common::data_dir(), Some(200)).unwrap();
        assert_eq!(ours.len(), 200);
        assert_eq!(
            theirs.num_docs,
            task.load(&common::data_dir()).unwrap().len()
        );
        let problems = prompt_mismatches(&ours, theirs);
        assert!(
            problems.is_empty(),
            "{}: {} mismatches, first: {:?}",
            task.name(),
            problems.len(),
            &problems[..problems.len().min(5)]
        );
    }
}

/// The comparison itself notices a changed prompt.
#[test]
fn prompt_comparison_can_fail() {
    let reference = reference();
    let mut ours =
        binllm_eval::tasks::load_examples(Task::Piqa, &common::data_dir(), Some(200)).unwrap();
    ours[7].requests[1].1.push(' ');
    ours[9].gold ^= 1;
    let problems = prompt_mismatches(&ours, &reference.tasks["piqa"]);
    assert_eq!(problems.len(), 2, "{problems:?}");
}

#[test]
fn perplexity_texts_match_the_reference() {
    let reference = reference();
    for (name, theirs) in &reference.perplexity {
        let set: PerplexitySet = name.parse().unwrap();
        let (text, _) = set.text(&common::data_dir()).unwrap();
        assert_eq!(sha16(&text), theirs.text_sha16, "{name}");
        assert_eq!(Some(text.chars().count()), theirs.text_chars, "{name}");
    }
}

#[test]
fn hashes_are_those_python_writes() {
    // hashlib.sha256("Answer:".encode()).hexdigest()[:16] and json.dumps([[1, 2], [3]]).
    assert_eq!(sha16("Answer:"), "64f89cf423ee1a16");
    assert_eq!(tokens_sha16(&[1, 2], &[3]), sha16("[[1, 2], [3]]"));
}

/// Token-level agreement with lm-eval's requests, with the SmolLM2 tokenizer read from the
/// default GGUF (installed by `scripts/setup.sh`, which `scripts/test.sh` runs first).
#[test]
fn tokens_match_the_reference() {
    let path = binllm_testing::shared::smollm2_gguf();
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup.sh",
        path.display()
    );
    let gguf = binllm_format::gguf::GgufFile::open(&path).unwrap();
    let tokenizer = binllm_format::gguf::tokenizer::from_metadata(&gguf)
        .unwrap()
        .tokenizer
        .expect("the GGUF carries a tokenizer");
    let reference = reference();
    // The reference tokenized with transformers' reading of the GGUF, which ignores
    // `tokenizer.ggml.pre`: it does not isolate digits first, as SmolLM2's own tokenizer,
    // llama.cpp and binllm do. SmolLM2's vocabulary has no token joining a space and a
    // digit, so the two agree everywhere except a run of several spaces before a digit
    // ("a    1": "    " + "1" isolated, "   " + " " + "1" not). Those examples are set aside.
    let spaces_before_digit = |requests: &[(String, String)]| {
        requests.iter().any(|(ctx, cont)| {
            let chars: Vec<char> = ctx.chars().chain(cont.chars()).collect();
            chars
                .windows(3)
                .any(|w| w[0].is_whitespace() && w[1].is_whitespace() && w[2].is_numeric())
        })
    };
    for task in Task::ALL {
        let ours = binllm_eval::tasks::load_examples(task, &common::data_dir(), Some(200)).unwrap();
        let theirs = &reference.tasks[task.name()];
        let (ours, their_examples): (Vec<_>, Vec<_>) = ours
            .into_iter()
            .zip(theirs.examples.iter().cloned())
            .filter(|(example, _)| !spaces_before_digit(&example.requests))
            .unzip();
        assert!(
            ours.len() * 10 >= theirs.examples.len() * 9,
            "{}: only {} of {} examples without spaces before a digit",
            task.name(),
            ours.len(),
            theirs.examples.len()
        );
        let theirs = binllm_eval::reference::ReferenceTask {
            examples: their_examples,
            ..theirs.clone()
        };
        let problems = token_mismatches(&tokenizer, &ours, &theirs).unwrap();
        assert!(
            problems.is_empty(),
            "{}: {} token mismatches, first: {:?}",
            task.name(),
            problems.len(),
            &problems[..problems.len().min(5)]
        );
    }
    for (name, theirs) in &reference.perplexity {
        let set: PerplexitySet = name.parse().unwrap();
        let (text, _) = set.text(&common::data_dir()).unwrap();
        // Each site where the two tokenizers may differ saves binllm at most one token.
        let chars: Vec<char> = text.chars().collect();
        let sites = chars
            .windows(3)
            .filter(|w| w[0].is_whitespace() && w[1].is_whitespace() && w[2].is_numeric())
            .count();
        let ours = tokenizer.encode(&text, true).unwrap().len();
        assert!(
            ours <= theirs.tokens && theirs.tokens - ours <= sites,
            "{name}: {ours} tokens, reference {}, {sites} runs of spaces before a digit",
            theirs.tokens
        );
        eprintln!(
            "{name}: {ours} tokens, reference {}, {sites} runs of spaces before a digit",
            theirs.tokens
        );
    }
}

/// A report carrying the reference's own numbers, with `ll_shift` added to every
/// log-likelihood of the first `shifted` examples and `ppl_scale` applied to perplexity.
fn report_from_reference(
    reference: &ReferenceFile,
    ll_shift: f64,
    shifted: usize,
    ppl_scale: f64,
) -> EvalReport {
    let mut report = EvalReport::new(RunInfo::new("m", "e", 8192, Some(200), "d".as_ref()));
    for (name, r) in &reference.perplexity {
        report.perplexity.push(PerplexityResult {
            dataset: name.clone(),
            file: "f".into(),
            text: String::new(),
            protocol: String::new(),
            ctx: reference.ctx,
            stride: None,
            tokens: r.tokens,
            windows: r.windows,
            scored_tokens: r.predicted_tokens,
            unused_tokens: 0,
            nll_sum: r.nll_sum,
            mean_nll: r.ppl.ln(),
            ppl: r.ppl * ppl_scale,
            seconds: 0.0,
            notes: vec![],
        });
    }
    for (name, t) in &reference.tasks {
        let examples: Vec<ExampleScore> = t
            .examples
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let lls = e
                    .loglikelihoods
                    .iter()
                    .enumerate()
                    // Shift only the chosen answer: a large negative shift changes it.
                    .map(|(k, ll)| {
                        if i < shifted && k == e.pred {
                            ll + ll_shift
                        } else {
                            *ll
                        }
                    })
                    .collect();
                ExampleScore::new(e.doc_id, e.gold, lls, e.is_greedy.clone(), &e.choice_chars)
            })
            .collect();
        let task: Task = name.parse().unwrap();
        report.tasks.push(TaskResult {
            task: name.clone(),
            split: task.split().into(),
            files: vec![],
            num_docs: t.num_docs,
            n: examples.len(),
            metrics: multiple_choice_metrics(&examples),
            reports_acc_norm: task.reports_acc_norm(),
            requests: 0,
            scored_tokens: 0,
            seconds: 0.0,
            notes: vec![],
            examples,
        });
    }
    report
}

#[test]
fn reference_metrics_are_recomputed_by_our_arithmetic() {
    let reference = reference();
    let report = report_from_reference(&reference, 0.0, 0, 1.0);
    for t in &report.tasks {
        let theirs = &reference.tasks[&t.task].metrics;
        assert!(
            (t.metrics.acc.value - theirs["acc"]).abs() < 1e-12,
            "{}",
            t.task
        );
        assert!(
            (t.metrics.acc.stderr - theirs["acc_stderr"]).abs() < 1e-12,
            "{}",
            t.task
        );
        if let Some(norm) = theirs.get("acc_norm") {
            assert!(
                (t.metrics.acc_norm.value - norm).abs() < 1e-12,
                "{}",
                t.task
            );
        }
        // Our argmax of ll / chars picks what Python's did, example by example.
        for (e, r) in t.examples.iter().zip(&reference.tasks[&t.task].examples) {
            assert_eq!(
                (e.pred, e.pred_norm),
                (r.pred, r.pred_norm),
                "{} {}",
                t.task,
                e.doc_id
            );
        }
    }
}

#[test]
fn agreement_passes_on_the_reference_and_fails_on_perturbations() {
    let reference = reference();
    let same = compare_with_reference(&report_from_reference(&reference, 0.0, 0, 1.0), &reference);
    assert!(same.passes(), "{}", same.render());
    assert_eq!(same.perplexity.len(), 4);
    assert_eq!(same.tasks.len(), 7);

    // 0.4 % off in perplexity and 5e-3 in log-likelihoods: still within tolerance.
    let close = compare_with_reference(
        &report_from_reference(&reference, 5e-3, 200, 1.004),
        &reference,
    );
    assert!(close.passes(), "{}", close.render());

    let ppl_off = compare_with_reference(
        &report_from_reference(&reference, 0.0, 0, 1.006),
        &reference,
    );
    assert!(!ppl_off.passes());
    assert!(ppl_off.tasks.iter().all(|t| t.ok));

    let ll_off =
        compare_with_reference(&report_from_reference(&reference, 2e-2, 1, 1.0), &reference);
    assert!(!ll_off.passes());
    assert!(ll_off
        .tasks
        .iter()
        .all(|t| t.choices_within_tolerance + 1 == t.choices));

    // Large shifts on 3 examples flip at least 2 % of the answers.
    let answers_off = compare_with_reference(
        &report_from_reference(&reference, -50.0, 3, 1.0),
        &reference,
    );
    assert!(
        answers_off
            .tasks
            .iter()
            .all(|t| !t.ok && t.same_pred <= 197),
        "{}",
        answers_off.render()
    );
}
