//! `binllm serve` as a user starts it: on a free loopback port (the address printed), a greedy
//! completion equal to what `binllm run` prints, then Ctrl-C (SIGINT) drains and exits 0.
//! Pure Rust: passes in the `--no-default-features` build too. The HTTP API itself is tested
//! in binllm-serve's tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn binllm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_binllm"))
}

fn export_stories(dir: &Path) -> std::path::PathBuf {
    let s = binllm_testing::shared::stories260k_dir();
    let out = dir.join("stories.b1");
    let status = binllm()
        .args(["export", "--ptq"])
        .arg(s.join("stories260K.bin"))
        .arg("--tokenizer")
        .arg(s.join("tok512.bin"))
        .args(["--head", "q8", "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    out
}

/// One POST with `Connection: close`; the body of the answer (not chunked: a whole answer).
fn post(addr: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

#[test]
fn serve_answers_like_run_and_stops_at_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let model = export_stories(dir.path());
    let prompt = "Once upon a time";
    let run = binllm()
        .arg("run")
        .arg("--model")
        .arg(&model)
        .args(["--prompt", prompt, "--max-tokens", "32", "--threads", "1"])
        .output()
        .unwrap();
    assert!(run.status.success());
    let printed = String::from_utf8(run.stdout).unwrap();
    let completion = printed.strip_prefix(prompt).unwrap().trim_end_matches('\n');

    let mut server = binllm()
        .arg("serve")
        .arg("--model")
        .arg(&model)
        .args(["--port", "0", "--threads", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{line}");

    let body = format!(
        r#"{{"model": "stories", "prompt": "{prompt}", "max_tokens": 32, "temperature": 0}}"#
    );
    let (status, reply) = post(&addr, "/v1/completions", &body);
    assert_eq!(status, 200, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["choices"][0]["text"], completion);

    // Ctrl-C: the server drains and exits 0.
    unsafe { libc::kill(server.id() as i32, libc::SIGINT) };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            server.kill().unwrap();
            panic!("binllm serve did not stop within 20 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}
