//! Teacher chat data (`--chat-tokens N`): the full-precision model answers user messages
//! rendered in its own chat template, and the transcripts (template tokens, prompt, answer,
//! end-of-turn) become a second pool of training windows beside the plain corpus.
//!
//! Why: distilling an instruct model on plain text alone teaches the student the text, not
//! the turn-taking. Its converted model no longer answers after `<|im_start|>assistant`
//! and never emits the end-of-turn token. Transcripts in the teacher's own template and
//! words let the distillation cover exactly those positions.
//!
//! The user messages come from the corpus the run already has: questions about a
//! document's title ("What is X?") and tasks on a passage of it (summarise, explain, list
//! facts, continue a story). The documents at the end of the corpus, where the held-out
//! validation windows lie, are never used, and neither is any message of the held-out chat
//! evaluation set ([`binllm_eval::chat::held_out_prompts`]). Answers that do not end within
//! the limit, or that fall into a repetition loop, are dropped.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use binllm_format::chat::ChatMessage;
use binllm_format::{PretrainedModel, TextTokenizer};
use binllm_infer::sampling::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::generate::{generate_batch, Pick};
use crate::model::Llama;

/// Longest prompt kept, in tokens (longer ones are skipped, not cut mid-template; a model
/// with a short context keeps fewer).
const MAX_PROMPT_TOKENS: usize = 384;
/// The most words of a passage quoted in a prompt.
const PASSAGE_WORDS: usize = 90;

/// User messages about a document's title.
const TITLE_PROMPTS: [&str; 6] = [
    "What is {}?",
    "Tell me about {}.",
    "Give me a short overview of {}.",
    "What should I know about {}?",
    "Explain {} in simple terms.",
    "Write two sentences about {}.",
];

/// User messages about a passage of a document.
const PASSAGE_PROMPTS: [&str; 7] = [
    "Summarize this text in one or two sentences:\n\n{}",
    "What is the main idea of the following passage?\n\n{}",
    "{}\n\nWrite one question about the text above, then answer it.",
    "Explain the following text to a ten-year-old:\n\n{}",
    "List three key facts from this text:\n\n{}",
    "Give this text a short title:\n\n{}",
    "{}\n\nWhat happens in this passage?",
];

/// User messages about a passage of a book (no title line).
const STORY_PROMPTS: [&str; 2] = [
    "Continue this story in a few sentences:\n\n{}",
    "Rewrite this passage in plain modern English:\n\n{}",
];

/// How the teacher writes its answers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChatSampling {
    pub temperature: f64,
    pub top_p: f64,
    /// The most tokens of one answer; longer answers are dropped.
    pub max_answer_tokens: usize,
    /// Prompts answered at once.
    pub batch: usize,
}

impl Default for ChatSampling {
    fn default() -> Self {
        ChatSampling {
            temperature: 0.7,
            top_p: 0.9,
            max_answer_tokens: 256,
            batch: 2048,
        }
    }
}

/// What a chat-data generation produced (`RUN/teacher-chat.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatDataReport {
    /// What was asked for: a run reuses the transcripts in its directory only when the
    /// request is the same.
    #[serde(default)]
    pub requested_tokens: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub teacher: String,
    pub tokens: usize,
    pub transcripts: usize,
    pub prompts_tried: usize,
    pub dropped_unended: usize,
    pub dropped_loops: usize,
    pub mean_answer_tokens: f64,
    pub seconds: f64,
    pub sampling: ChatSampling,
    /// The first transcripts as text, to read what the student is taught.
    pub examples: Vec<String>,
}

/// The title line of a Wikipedia-style document ("Title", blank line, body), if it has one.
fn split_title(document: &str) -> (Option<&str>, &str) {
    let mut lines = document.splitn(3, '\n');
    let first = lines.next().unwrap_or_default().trim();
    let second = lines.next();
    let body = lines.next().unwrap_or_default();
    let looks_like_title = !first.is_empty()
        && first.len() <= 100
        && !first.ends_with('.')
        && second.is_some_and(|l| l.trim().is_empty())
        && body.len() >= 200;
    if looks_like_title {
        (Some(first), body)
    } else {
        (None, document)
    }
}

/// Paragraphs of at least 150 characters, their hard line breaks joined.
fn paragraphs(body: &str) -> Vec<String> {
    body.split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| p.len() >= 150)
        .collect()
}

/// At most [`PASSAGE_WORDS`] words of `paragraph`, ending at a sentence end when one falls in
/// the second half of that span.
fn passage(paragraph: &str) -> String {
    let words: Vec<&str> = paragraph.split_whitespace().collect();
    if words.len() <= PASSAGE_WORDS {
        return words.join(" ");
    }
    let cut = (PASSAGE_WORDS / 2..PASSAGE_WORDS)
        .rev()
        .find(|&i| words[i].ends_with(['.', '!', '?']))
        .map_or(PASSAGE_WORDS, |i| i + 1);
    words[..cut].join(" ")
}

/// `count` user messages from `documents` (in a seeded order, cycling when needed), none of
/// them equal to one in `exclude` (compared case-insensitively).
pub fn prompts_from_documents(
    documents: &[String],
    count: usize,
    seed: u64,
    exclude: &[&str],
) -> Vec<String> {
    let excluded: std::collections::HashSet<String> =
        exclude.iter().map(|e| e.trim().to_lowercase()).collect();
    let mut order: Vec<usize> = (0..documents.len()).collect();
    let mut rng = SplitMix64::new(seed);
    rng.shuffle(&mut order);
    let mut out = Vec::with_capacity(count);
    // Each pass over the documents draws new templates and passages; a corpus too small to
    // give `count` distinct messages stops after a few passes rather than loop forever.
    for _pass in 0..8 {
        for &d in &order {
            if out.len() == count {
                return out;
            }
            let (title, body) = split_title(&documents[d]);
            let paras = paragraphs(body);
            let pick = |rng: &mut SplitMix64, n: usize| rng.below(n);
            let prompt = match (title, paras.is_empty()) {
                (Some(t), _) if paras.is_empty() || rng.next_u64().is_multiple_of(2) => {
                    TITLE_PROMPTS[pick(&mut rng, TITLE_PROMPTS.len())].replace("{}", t)
                }
                (_, true) => continue,
                (title, false) => {
                    // Wikipedia's lead paragraph says what the article is about; in a book,
                    // any paragraph will do.
                    let para = if title.is_some() {
                        &paras[0]
                    } else {
                        &paras[pick(&mut rng, paras.len())]
                    };
                    let templates: Vec<&str> = if title.is_some() {
                        PASSAGE_PROMPTS.to_vec()
                    } else {
                        PASSAGE_PROMPTS
                            .iter()
                            .chain(&STORY_PROMPTS)
                            .copied()
                            .collect()
                    };
                    templates[pick(&mut rng, templates.len())].replace("{}", &passage(para))
                }
            };
            if !excluded.contains(&prompt.trim().to_lowercase()) {
                out.push(prompt);
            }
        }
    }
    out
}

/// The model's chat template applied to one user message, with the generation prompt,
/// tokenized as `binllm run --chat` does (the template writes its own special tokens).
pub fn render_prompt(
    pretrained: &PretrainedModel,
    tokenizer: &TextTokenizer,
    user: &str,
) -> Result<Vec<u32>> {
    let text = pretrained.render_chat(&[ChatMessage::new("user", user)])?;
    tokenizer.encode(&text, false)
}

/// What the template writes after an end-of-turn token (ChatML: a newline), so that
/// transcripts follow one another as the turns of a conversation do.
pub fn after_turn_ids(pretrained: &PretrainedModel, tokenizer: &TextTokenizer) -> Result<Vec<u32>> {
    const PROBE: &str = "binllm-probe-7f3a";
    let rendered = pretrained.render_chat(&[ChatMessage::new("user", PROBE)])?;
    let after = rendered.split_once(PROBE).and_then(|(_, rest)| {
        let end = tokenizer.id_to_token(*tokenizer.eos_ids.first()?)?;
        let (_, tail) = rest.split_once(end.as_str())?;
        Some(
            tail.chars()
                .take_while(|c| c.is_whitespace())
                .collect::<String>(),
        )
    });
    tokenizer.encode(&after.unwrap_or_default(), false)
}

/// One training transcript: the rendered prompt, the answer (ending with its end-of-turn
/// id) and what the template writes after the turn.
pub fn transcript(prompt: &[u32], answer: &[u32], after_turn: &[u32]) -> Vec<u32> {
    [prompt, answer, after_turn].concat()
}

/// About `tokens` tokens of transcripts: prompts from `documents` answered by `teacher`,
/// each transcript the rendered prompt, the answer with its end-of-turn id, and the
/// template's newline after it.
pub fn generate_chat_data(
    teacher: &Llama,
    pretrained: &PretrainedModel,
    documents: &[String],
    tokens: usize,
    sampling: ChatSampling,
    seed: u64,
) -> Result<(Vec<u32>, ChatDataReport)> {
    let started = Instant::now();
    let tokenizer = pretrained.tokenizer()?;
    let stop = tokenizer.eos_ids.clone();
    ensure!(
        !stop.is_empty(),
        "chat data needs an end-of-turn token, and the tokenizer has no EOS"
    );
    let after_turn = after_turn_ids(pretrained, tokenizer)?;
    let held_out = binllm_eval::chat::held_out_prompts();
    torch_seed(seed);
    let per_round = sampling.batch.max(1);
    // A model with a short context gets half of it for the answer, half for the prompt.
    let context = teacher.config.max_position_embeddings;
    let sampling = ChatSampling {
        max_answer_tokens: sampling.max_answer_tokens.min(context / 2),
        ..sampling
    };
    let max_prompt = MAX_PROMPT_TOKENS.min(context - sampling.max_answer_tokens);
    // A generous first guess at the prompts needed; more are drawn if answers run short.
    let mut wanted = (tokens / 250).max(per_round);
    let mut prompts = prompts_from_documents(documents, wanted, seed, &held_out);
    ensure!(
        !prompts.is_empty(),
        "the corpus gave no prompts for chat data (documents need a title line or paragraphs of 150+ characters)"
    );
    let progress = binllm_progress::Progress::new(tokens as u64, "teacher chat data");
    let mut stream = Vec::with_capacity(tokens + 4096);
    let mut report = ChatDataReport {
        requested_tokens: tokens,
        seed,
        teacher: pretrained.path.display().to_string(),
        tokens: 0,
        transcripts: 0,
        prompts_tried: 0,
        dropped_unended: 0,
        dropped_loops: 0,
        mean_answer_tokens: 0.0,
        seconds: 0.0,
        sampling,
        examples: Vec::new(),
    };
    let mut answer_tokens = 0usize;
    let mut next = 0;
    while stream.len() < tokens {
        if next >= prompts.len() {
            ensure!(
                prompts.len() == wanted,
                "the corpus ran out of prompts after {} transcripts ({} tokens of {tokens})",
                report.transcripts,
                stream.len()
            );
            wanted *= 2;
            prompts = prompts_from_documents(documents, wanted, seed, &held_out);
        }
        let round: Vec<Vec<u32>> = prompts[next..(next + per_round).min(prompts.len())]
            .iter()
            .map(|p| render_prompt(pretrained, tokenizer, p))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|ids| ids.len() <= max_prompt)
            .collect();
        next += per_round;
        report.prompts_tried += round.len();
        if round.is_empty() {
            continue;
        }
        let pad = stop[0];
        let answers = generate_batch(
            teacher,
            &round,
            sampling.max_answer_tokens,
            Pick::Sample {
                temperature: sampling.temperature,
                top_p: sampling.top_p,
            },
            &stop,
            pad,
        )
        .context("generating the teacher's answers")?;
        for (prompt, answer) in round.iter().zip(answers) {
            if !answer.ended {
                report.dropped_unended += 1;
                continue;
            }
            if binllm_eval::chat::has_repetition_loop(&answer.ids) {
                report.dropped_loops += 1;
                continue;
            }
            let start = stream.len();
            stream.extend(transcript(prompt, &answer.ids, &after_turn));
            answer_tokens += answer.ids.len();
            report.transcripts += 1;
            if report.examples.len() < 24 {
                report
                    .examples
                    .push(tokenizer.decode(&stream[start..], false)?);
            }
        }
        progress.set_position(stream.len().min(tokens) as u64);
    }
    progress.finish_and_clear();
    report.tokens = stream.len();
    report.mean_answer_tokens = answer_tokens as f64 / report.transcripts.max(1) as f64;
    report.seconds = started.elapsed().as_secs_f64();
    Ok((stream, report))
}

fn torch_seed(seed: u64) {
    tch::manual_seed(seed as i64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wiki(title: &str, lead: &str) -> String {
        format!(
            "{title}\n\n{lead}\n\nSecond paragraph that is long enough to count as one, {}.",
            "with filler words ".repeat(10)
        )
    }

    #[test]
    fn titles_and_passages_become_user_messages() {
        let lead = "Alpha Centauri is the closest star system to the Solar System. ".repeat(4);
        let docs = vec![
            wiki("Alpha Centauri", &lead),
            // A book passage: no title line, hard-wrapped paragraph.
            format!(
                "{}\n\n{}",
                "It was a dark and stormy night;\nthe rain fell in torrents. ".repeat(5),
                "zzqx"
            ),
        ];
        // Two documents give at most one message each per pass, for eight passes.
        assert_eq!(prompts_from_documents(&docs, 40, 7, &[]).len(), 16);
        let prompts = prompts_from_documents(&docs, 16, 7, &[]);
        assert_eq!(prompts.len(), 16);
        assert!(prompts
            .iter()
            .any(|p| p.contains("Alpha Centauri") && !p.contains("closest")));
        assert!(prompts
            .iter()
            .any(|p| p.contains("Alpha Centauri is the closest star")));
        // Book paragraphs are joined into one line of running text.
        assert!(prompts.iter().any(|p| p.contains("night; the rain")));
        assert!(
            prompts.iter().all(|p| !p.contains("zzqx")),
            "paragraphs under 150 characters are skipped"
        );
        // Deterministic for a seed, different for another.
        assert_eq!(prompts, prompts_from_documents(&docs, 16, 7, &[]));
        assert_ne!(prompts, prompts_from_documents(&docs, 16, 8, &[]));
    }

    #[test]
    fn held_out_messages_are_never_drawn() {
        let docs = vec![wiki(
            "Photosynthesis",
            &"Plants turn light into sugar. ".repeat(8),
        )];
        let all = prompts_from_documents(&docs, 200, 1, &[]);
        assert!(all.iter().any(|p| p == "What is Photosynthesis?"));
        let kept = prompts_from_documents(&docs, 200, 1, &["what is photosynthesis?"]);
        assert!(!kept.iter().any(|p| p == "What is Photosynthesis?"));
    }

    #[test]
    fn passages_stop_at_a_sentence_end_within_the_word_limit() {
        let sentence = "one two three four five six seven eight nine ten. ";
        let text = sentence.repeat(20);
        let cut = passage(&text);
        let words = cut.split_whitespace().count();
        assert!(
            (PASSAGE_WORDS / 2..=PASSAGE_WORDS).contains(&words),
            "{words}"
        );
        assert!(cut.ends_with("ten."));
        assert_eq!(passage("short text here"), "short text here");
    }
}
