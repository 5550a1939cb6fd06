//! `binllm serve`'s request handling, end to end: the input's first byte picks the route
//! (chat or completion), the rest is the body, sent over a real socket to a server running
//! in this process on a packed stories260K ($BINLLM_FUZZ_SERVE_MODEL, set by
//! tools/fuzz/run.sh). Every request must get an HTTP answer; a panic anywhere is a finding.
#![no_main]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use binllm_serve::{ServeOptions, Server};
use libfuzzer_sys::fuzz_target;

fn server() -> SocketAddr {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let model = std::env::var("BINLLM_FUZZ_SERVE_MODEL")
                .expect("BINLLM_FUZZ_SERVE_MODEL: a packed model (tools/fuzz/run.sh sets it)");
            let mut options = ServeOptions {
                model: model.into(),
                model_id: Some("fuzz".into()),
                port: 0,
                max_sequences: 4,
                ..ServeOptions::default()
            };
            options.runtime.threads = 1;
            Server::start(&options).expect("the server starts")
        })
        .addr()
}

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let path = if route % 2 == 0 {
        "/v1/completions"
    } else {
        "/v1/chat/completions"
    };
    let mut stream = TcpStream::connect(server()).expect("the server accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("request sent");
    stream.write_all(body).expect("body sent");
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .expect("an answer before the timeout");
    assert!(
        reply.starts_with(b"HTTP/1.1 "),
        "no HTTP answer: {:?}",
        String::from_utf8_lossy(&reply[..reply.len().min(200)])
    );
});
