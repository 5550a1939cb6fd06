//! Aggregate decode speed of an OpenAI-compatible server (`binllm serve`, or llama.cpp's
//! llama-server for comparison) with 1, 4, 16, ... concurrent streams.
//!
//!     cargo run --release -p binllm-serve --example serve_bench -- \
//!         --addr 127.0.0.1:8080 --model smollm2-ptq --streams 1,4,16 --tokens 128 --reps 3
//!
//! Each stream is a client that sends one streamed `/v1/completions` request (greedy,
//! `max_tokens` tokens, `ignore_eos` for servers that take it) and counts the tokens that come
//! back. Per round, all streams start together; the figure is the tokens received between each
//! stream's first token and the round's last token over that time (decode only: the prompts'
//! prefill is left out), and the end-to-end rate (all tokens over the whole round) beside it.
//! The median of `--reps` rounds is printed, with the best in brackets; rounds interleave the
//! stream counts. A std-only HTTP client,
//! so the figures include no client library's cost.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

struct Args {
    addr: String,
    model: String,
    streams: Vec<usize>,
    tokens: usize,
    reps: usize,
    api_key: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        addr: "127.0.0.1:8080".into(),
        model: String::new(),
        streams: vec![1, 4, 16],
        tokens: 128,
        reps: 3,
        api_key: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => args.addr = value()?,
            "--model" => args.model = value()?,
            "--streams" => {
                args.streams = value()?
                    .split(',')
                    .map(|s| s.trim().parse().context("--streams: a list like 1,4,16"))
                    .collect::<Result<_>>()?
            }
            "--tokens" => args.tokens = value()?.parse().context("--tokens")?,
            "--reps" => args.reps = value()?.parse().context("--reps")?,
            "--api-key" => args.api_key = Some(value()?),
            other => bail!("unknown option {other} (see the file's doc)"),
        }
    }
    if args.model.is_empty() {
        bail!("--model NAME is required (GET /v1/models lists it)");
    }
    Ok(args)
}

/// One stream's timeline: when each token's event arrived.
struct StreamRun {
    started: Instant,
    token_times: Vec<Instant>,
}

const PROMPTS: [&str; 4] = [
    "The history of the city begins",
    "In mathematics, a prime number is",
    "Once upon a time, in a small village,",
    "The recipe needs flour, sugar and",
];

fn one_stream(args: &Args, index: usize) -> Result<StreamRun> {
    let body = serde_json::json!({
        "model": args.model,
        "prompt": PROMPTS[index % PROMPTS.len()],
        "max_tokens": args.tokens,
        "temperature": 0,
        "stream": true,
        // llama-server: keep generating to max_tokens, as a 1-bit PTQ model mostly does anyway.
        "ignore_eos": true,
    })
    .to_string();
    let mut stream =
        TcpStream::connect(&args.addr).with_context(|| format!("connect {}", args.addr))?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let auth = args
        .api_key
        .as_ref()
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let started = Instant::now();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        args.addr,
        body.len()
    )?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.contains(" 200 ") {
        bail!("the server answered {}", line.trim());
    }
    let mut token_times = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        // Chunked framing lines are skipped; each data event with text is one token (both
        // servers send one event per token; an event that completes no character has none).
        let Some(data) = line.trim().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let event: serde_json::Value = serde_json::from_str(data).context("a stream event")?;
        if event["choices"][0]["finish_reason"].is_string() && event["choices"][0]["text"] == "" {
            continue;
        }
        if event["choices"][0]["text"].is_string() {
            token_times.push(Instant::now());
        }
    }
    Ok(StreamRun {
        started,
        token_times,
    })
}

/// One round of `n` concurrent streams: (decode tokens/s, end-to-end tokens/s, tokens).
fn round(args: &Args, n: usize) -> Result<(f64, f64, usize)> {
    let runs: Vec<StreamRun> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| scope.spawn(move || one_stream(args, i)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a client thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    let start = runs.iter().map(|r| r.started).min().context("no streams")?;
    let end = runs
        .iter()
        .filter_map(|r| r.token_times.last().copied())
        .max()
        .context("no tokens came back")?;
    // Decode: from the moment every stream has its first token to the end of the round;
    // the tokens that arrived in that window.
    let all_started = runs
        .iter()
        .filter_map(|r| r.token_times.first().copied())
        .max()
        .context("a stream got no token")?;
    let decoded: usize = runs
        .iter()
        .map(|r| r.token_times.iter().filter(|&&t| t > all_started).count())
        .sum();
    let total: usize = runs.iter().map(|r| r.token_times.len()).sum();
    let decode_rate = decoded as f64 / (end - all_started).as_secs_f64().max(1e-9);
    let end_to_end = total as f64 / (end - start).as_secs_f64().max(1e-9);
    Ok((decode_rate, end_to_end, total))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // One warm-up stream: the first request after start pays for page faults of the weights.
    round(&args, 1)?;
    println!(
        "server {} model {} tokens/stream {} reps {}",
        args.addr, args.model, args.tokens, args.reps
    );
    println!("| streams | aggregate decode tok/s, median (best) | per stream | end-to-end tok/s | tokens/round |");
    println!("|---:|---:|---:|---:|---:|");
    // Rounds interleave the stream counts (1, 4, 16, 1, 4, 16, ...): on a shared machine the
    // load from other processes then moves every count alike.
    let mut decode = vec![Vec::new(); args.streams.len()];
    let mut e2e = vec![Vec::new(); args.streams.len()];
    let mut tokens = vec![0; args.streams.len()];
    for _ in 0..args.reps.max(1) {
        for (i, &n) in args.streams.iter().enumerate() {
            let (d, e, t) = round(&args, n)?;
            decode[i].push(d);
            e2e[i].push(e);
            tokens[i] = t;
        }
    }
    for (i, &n) in args.streams.iter().enumerate() {
        let best = decode[i].iter().copied().fold(0.0, f64::max);
        let med = median(decode[i].clone());
        println!(
            "| {n} | {med:.1} ({best:.1}) | {:.1} | {:.1} | {} |",
            med / n as f64,
            median(e2e[i].clone()),
            tokens[i]
        );
    }
    Ok(())
}
