//! What the serve tests share: a packed stories260K (PTQ, a real 260K-parameter Llama from
//! ../shared) with a small chat template, a server on a free loopback port, and a raw HTTP/1.1
//! client on std's TcpStream (so the tests see exactly the bytes the server sends).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use binllm_format::packed::PackedModel;
use binllm_infer::ptq::{ptq_sign_model, InputScales};
use binllm_serve::{ServeOptions, Server};
use serde_json::Value;

/// A chat template in the usual role-tag style, for a model that ships none.
pub const CHAT_TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// stories260K as a packed PTQ model with `CHAT_TEMPLATE`; `endless` drops its end-of-sequence
/// tokens and widens its context, so that a greedy stream runs until the client stops it.
pub fn stories_packed(dir: &Path, endless: bool) -> PathBuf {
    let pretrained = binllm_testing::shared::stories260k_with_tok512_bin();
    let mut packed: PackedModel = ptq_sign_model(&pretrained, InputScales::None).unwrap();
    packed.chat_template = Some(CHAT_TEMPLATE.to_string());
    let name = if endless {
        packed.config.eos_token_ids.clear();
        packed.config.max_position_embeddings = 1 << 20;
        "stories-endless.b1"
    } else {
        "stories.b1"
    };
    let path = dir.join(name);
    packed.write(&path).unwrap();
    path
}

pub fn start(model: &Path, configure: impl FnOnce(&mut ServeOptions)) -> Server {
    let mut options = ServeOptions {
        model: model.to_path_buf(),
        port: 0,
        max_sequences: 4,
        queue: 8,
        runtime: binllm_infer::RuntimeOptions {
            threads: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    configure(&mut options);
    let server = Server::start(&options).unwrap();
    assert!(server.addr().ip().is_loopback(), "{}", server.addr());
    eprintln!("server on {}", server.addr());
    server
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of a server-sent event stream, in order.
    pub fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                    .to_string()
            })
            .collect()
    }

    /// The error body's fields, checked to be OpenAI's shape.
    pub fn error(&self) -> Value {
        let body = self.json();
        let error = body["error"].clone();
        for field in ["message", "type", "param", "code"] {
            assert!(error.get(field).is_some(), "no {field} in {body}");
        }
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        error
    }
}

/// Writes one request (connection closed after it).
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    stream
}

/// Reads a whole response, undoing chunked transfer encoding.
pub fn read_reply(stream: TcpStream) -> Reply {
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    Reply {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

pub fn read_head(reader: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    (status, headers)
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    read_reply(send(addr, method, path, headers, body))
}

pub fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    request(addr, "POST", path, &[], &body.to_string())
}

pub fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[], "")
}

pub fn health(addr: SocketAddr) -> Value {
    let reply = get(addr, "/health");
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// Polls /health until `done` holds, for at most `limit`.
pub fn wait_for_health(addr: SocketAddr, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let h = health(addr);
        if done(&h) {
            return h;
        }
        assert!(started.elapsed() < limit, "/health never got there: {h}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
