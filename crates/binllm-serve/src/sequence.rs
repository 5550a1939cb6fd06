//! One request being generated: its KV cache, its sampler, the tokens so far, and the text
//! sent to its client. The scheduler gives it logits; it picks the next token, sends the text
//! that token completes, and says when it is finished. Token choice and the stopping rules are
//! those of `binllm_infer::generate::decode` (what `binllm run` does), so a greedy request
//! gets exactly the tokens a lone `binllm run` gets; on top, OpenAI's `stop` strings end the
//! text where one first appears (without it).

use anyhow::Result;
use binllm_format::tokenizer::StreamDecoder;
use binllm_format::TextTokenizer;
use binllm_infer::sampling::{Sampler, SamplingParams};
use binllm_infer::KvCache;
use tokio::sync::mpsc::UnboundedSender;

use crate::api::Usage;

/// What a request asks the scheduler to generate.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// OpenAI's `stop`: text that ends the completion (not included).
    pub stop: Vec<String>,
    /// Where the text goes; a dropped receiver (the client went away) ends the sequence.
    pub events: UnboundedSender<Event>,
}

/// What the scheduler tells the request's handler.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next piece of the completion.
    Text(String),
    Done {
        finish: Finish,
        usage: Usage,
    },
    /// The engine failed on this request (the message says why); nothing more follows.
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens`, or the model's context is full.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// A sequence the scheduler is running.
pub struct Sequence<'t> {
    pub cache: KvCache,
    /// The token to feed at the next step (the last one chosen).
    pub pending: u32,
    sampler: Sampler,
    /// Prompt and generated tokens (the sampler's repetition history).
    history: Vec<u32>,
    prompt_tokens: usize,
    generated: usize,
    max_tokens: usize,
    /// The model's context length.
    context: usize,
    eos: &'t [u32],
    decoder: StreamDecoder<'t>,
    text: StopText,
    events: UnboundedSender<Event>,
    finished: bool,
}

impl<'t> Sequence<'t> {
    /// A sequence whose prompt is already in `cache`.
    pub fn new(job: Job, cache: KvCache, tokenizer: &'t TextTokenizer, context: usize) -> Self {
        Sequence {
            cache,
            pending: 0,
            sampler: Sampler::new(job.sampling),
            prompt_tokens: job.prompt.len(),
            history: job.prompt,
            generated: 0,
            max_tokens: job.max_tokens,
            context,
            eos: &tokenizer.eos_ids,
            decoder: StreamDecoder::new(tokenizer),
            text: StopText::new(job.stop),
            events: job.events,
            finished: false,
        }
    }

    /// Whether it needs no more steps: done, failed, or its client went away.
    pub fn is_finished(&self) -> bool {
        self.finished || self.events.is_closed()
    }

    /// Picks the next token from the logits after `pending`, sends the text it completes, and
    /// finishes the sequence when a stopping rule says so.
    pub fn advance(&mut self, mut logits: Vec<f32>) {
        if let Err(err) = self.try_advance(&mut logits) {
            self.fail(format!("{err:#}"));
        }
    }

    fn try_advance(&mut self, logits: &mut [f32]) -> Result<()> {
        if let Some(bad) = logits.iter().position(|l| !l.is_finite()) {
            anyhow::bail!(
                "the model produced a non-finite logit ({} for token {bad}) after {} generated tokens",
                logits[bad],
                self.generated
            );
        }
        let next = self.sampler.sample(logits, &self.history);
        if self.eos.contains(&next) {
            return self.finish(Finish::Stop);
        }
        self.generated += 1;
        self.history.push(next);
        self.pending = next;
        if let Some(piece) = self.decoder.push(next)? {
            let (ready, stopped) = self.text.push(&piece);
            self.send_text(ready);
            if stopped {
                return self.finish(Finish::Stop);
            }
        }
        // The token just chosen takes a position; the logits after it need another.
        if self.generated == self.max_tokens || self.history.len() + 1 > self.context {
            return self.finish(Finish::Length);
        }
        Ok(())
    }

    fn send_text(&mut self, text: String) {
        if !text.is_empty() {
            // A closed channel is noticed by `is_finished`.
            let _ = self.events.send(Event::Text(text));
        }
    }

    fn finish(&mut self, finish: Finish) -> Result<()> {
        let rest = self.text.flush();
        self.send_text(rest);
        let usage = Usage::new(self.prompt_tokens, self.generated);
        let _ = self.events.send(Event::Done { finish, usage });
        self.finished = true;
        Ok(())
    }

    /// Ends the sequence with an error for its client.
    pub fn fail(&mut self, message: String) {
        let _ = self.events.send(Event::Failed(message));
        self.finished = true;
    }
}

/// The completion's text, held back where it might be the start of a stop string, cut where
/// one appears.
struct StopText {
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
}

impl StopText {
    fn new(stops: Vec<String>) -> Self {
        StopText {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            sent: 0,
        }
    }

    /// Adds `piece`; returns the text now safe to send, and whether a stop string ended it.
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        // Text before `sent` held no start of a stop string, so a match starts at `sent` or
        // later.
        let unsent = &self.text[self.sent..];
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| unsent.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let ready = unsent[..at].to_string();
            self.text.truncate(self.sent + at);
            self.sent = self.text.len();
            return (ready, true);
        }
        // Hold back the longest tail that some stop string begins with.
        let held = self
            .stops
            .iter()
            .map(|stop| {
                (1..stop.len().min(unsent.len() + 1))
                    .rev()
                    .filter(|&k| stop.is_char_boundary(k))
                    .find(|&k| unsent.ends_with(&stop[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let safe = self.text.len() - held;
        let ready = self.text[self.sent..safe].to_string();
        self.sent = safe;
        (ready, false)
    }

    /// Whatever was held back (the completion ended without a stop string).
    fn flush(&mut self) -> String {
        let rest = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut text = StopText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            let (ready, stopped) = text.push(piece);
            out.push_str(&ready);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&text.flush());
        (out, false)
    }

    #[test]
    fn text_without_stops_passes_through() {
        assert_eq!(run(&[], &["a", "bc"]), ("abc".into(), false));
    }

    #[test]
    fn a_stop_string_split_over_pieces_is_cut_and_never_sent() {
        let mut text = StopText::new(vec!["END".into()]);
        assert_eq!(text.push("hello E"), ("hello ".into(), false));
        assert_eq!(text.push("N"), (String::new(), false));
        assert_eq!(text.push("D and more"), (String::new(), true));
    }

    #[test]
    fn a_false_start_is_sent_once_it_cannot_be_a_stop() {
        assert_eq!(run(&["END"], &["a E", "ND"]), ("a ".into(), true));
        assert_eq!(run(&["END"], &["a E", "x"]), ("a Ex".into(), false));
        assert_eq!(
            run(&["\n\n", "ab"], &["x\n", "a", "\n"]),
            ("x\na\n".into(), false)
        );
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["c", "b"], &["abcd"]), ("a".into(), true));
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
        assert_eq!(run(&["éa"], &["café", "b"]), ("caféb".into(), false));
    }
}
