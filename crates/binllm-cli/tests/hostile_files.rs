//! Files a stranger could hand binllm, through the commands a user types: each is refused
//! with an error naming the file, its format and the problem, fast and in little memory
//! (measured on the child process with `wait4`). Pure Rust: these run in both builds.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use binllm_testing::shared::stories260k_dir;
use binllm_testing::synthetic::write_hf_dir;

/// How a finished `binllm` child went: status, stderr, wall time and peak resident memory.
struct Finished {
    status: ExitStatus,
    stderr: String,
    wall: Duration,
    peak_rss_mb: f64,
}

// The child is reaped by `wait4` (which also gives its own peak memory), not `Child::wait`.
#[allow(clippy::zombie_processes)]
fn binllm(args: &[&str]) -> Finished {
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_binllm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binllm starts");
    let pid = child.id() as libc::pid_t;
    let mut stderr_pipe = child.stderr.expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr_pipe, &mut text).unwrap();
        text
    });
    let mut raw_status = 0;
    // SAFETY: zeroed rusage is a valid value; wait4 fills it for this child only (other
    // tests' children are not counted, unlike RUSAGE_CHILDREN).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut raw_status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4 failed");
    Finished {
        status: ExitStatus::from_raw(raw_status),
        stderr: reader.join().unwrap(),
        wall: started.elapsed(),
        // ru_maxrss is in KiB on Linux.
        peak_rss_mb: usage.ru_maxrss as f64 / 1024.0,
    }
}

fn refused(args: &[&str], expect: &[&str]) -> Finished {
    let run = binllm(args);
    assert!(
        !run.status.success(),
        "{args:?} succeeded; stderr: {}",
        run.stderr
    );
    assert_eq!(run.status.code(), Some(1), "{args:?}: {}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    for part in expect {
        assert!(
            run.stderr.contains(part),
            "{args:?}: error lacks {part:?}: {}",
            run.stderr
        );
    }
    run
}

fn tiny_gguf() -> Vec<u8> {
    let path = binllm_testing::shared::repo_root()
        .join("crates/binllm-format/tests/fixtures/gguf/tiny_llama.gguf");
    std::fs::read(path).unwrap()
}

/// The tiny GGUF fixture with `llama.block_count` set to `count` (a u32 right after its key
/// and its type id).
fn gguf_with_block_count(count: u32) -> Vec<u8> {
    let mut bytes = tiny_gguf();
    let key = b"llama.block_count";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(&bytes[at..at + 4], &4u32.to_le_bytes(), "type id u32");
    bytes[at + 4..at + 8].copy_from_slice(&count.to_le_bytes());
    bytes
}

fn packed_stories(dir: &Path) -> PathBuf {
    let out = dir.join("stories.b1");
    support::export_stories_ptq(&out, &[]);
    out
}

#[test]
fn header_counts_in_the_billions_fail_at_once_in_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("block-count.gguf");
    std::fs::write(&gguf, gguf_with_block_count(u32::MAX)).unwrap();

    let hf = dir.path().join("hf");
    let mut config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": false
    });
    write_hf_dir(&config, &hf).unwrap();
    config["num_hidden_layers"] = serde_json::json!(16_000_000);
    std::fs::write(hf.join("config.json"), config.to_string()).unwrap();

    // The binary's own footprint before it reads anything: a few MB for the pure-Rust build,
    // over 100 MB for the libtorch build (the libraries loaded at start-up). What reading the
    // file adds is what must stay small.
    let baseline = binllm(&["--version"]);
    assert!(baseline.status.success(), "{}", baseline.stderr);
    for (path, field) in [
        (&gguf, "num_layers = 4294967295"),
        (&hf, "num_layers = 16000000"),
    ] {
        let run = refused(
            &["inspect", path.to_str().unwrap()],
            &[path.to_str().unwrap(), field, "tensors for 2 layers"],
        );
        assert!(run.wall < Duration::from_secs(1), "took {:?}", run.wall);
        let added = run.peak_rss_mb - baseline.peak_rss_mb;
        assert!(
            added < 100.0,
            "peak memory {:.1} MB, {added:.1} MB more than `binllm --version` ({:.1} MB)",
            run.peak_rss_mb,
            baseline.peak_rss_mb
        );
        println!(
            "{}: {:.1} MB peak ({:.1} MB at start-up), {:?}",
            path.display(),
            run.peak_rss_mb,
            baseline.peak_rss_mb,
            run.wall
        );
    }
}

#[test]
fn a_damaged_packed_file_is_named_as_one_with_its_damage() {
    let dir = tempfile::tempdir().unwrap();
    let good = packed_stories(dir.path());
    let bytes = std::fs::read(&good).unwrap();
    let size = bytes.len();

    let truncated = dir.path().join("truncated.b1");
    std::fs::write(&truncated, &bytes[..size - 100]).unwrap();
    // A flipped byte inside the JSON header: detected as packed all the same, by its key.
    let mut flipped = bytes.clone();
    let colon = flipped[8..].iter().position(|&b| b == b':').unwrap() + 8;
    flipped[colon] = b'!';
    let damaged_header = dir.path().join("damaged-header.dat");
    std::fs::write(&damaged_header, &flipped).unwrap();
    let stub = dir.path().join("stub.b1");
    std::fs::write(&stub, &bytes[..5]).unwrap();

    let cases: [(&Path, Vec<String>); 3] = [
        (
            &truncated,
            vec![
                format!("tensor data ends at byte {size}"),
                format!("the file has {} bytes (truncated)", size - 100),
            ],
        ),
        (
            &damaged_header,
            vec!["header (bytes 8..".into(), "is not valid JSON".into()],
        ),
        (&stub, vec!["the file has 5 bytes".into()]),
    ];
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "Once upon a time there was a fox. ".repeat(20)).unwrap();
    let task = format!("file:{}", text.display());
    for (path, damage) in &cases {
        let p = path.to_str().unwrap();
        for args in [
            vec!["inspect", p],
            vec!["run", "--model", p, "--prompt", "x"],
            vec!["bench", "--model", p],
            vec!["eval", "--model", p, "--tasks", &task],
        ] {
            let mut expect = vec![p, "damaged binllm packed file"];
            expect.extend(damage.iter().map(String::as_str));
            refused(&args, &expect);
        }
    }
}

#[test]
fn commands_given_the_wrong_kind_of_model_say_what_they_got() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("model.gguf");
    std::fs::write(&gguf, tiny_gguf()).unwrap();
    let llama2c = stories260k_dir().join("stories260K.bin");
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    for (path, what) in [
        (gguf.as_path(), "a GGUF file"),
        (llama2c.as_path(), "a llama2.c checkpoint"),
        (hf.as_path(), "a directory (a Hugging Face model?)"),
    ] {
        let p = path.to_str().unwrap();
        refused(
            &["run", "--model", p, "--prompt", "x"],
            &[p, what, "not a binllm packed model", "binllm export --ptq"],
        );
    }
    // And the other way round: a packed file where a pretrained model is expected.
    let packed = packed_stories(dir.path());
    let p = packed.to_str().unwrap();
    refused(
        &[
            "export",
            "--ptq",
            p,
            "--out",
            dir.path().join("again.b1").to_str().unwrap(),
        ],
        &[p, "a binllm packed model (.b1), not a pretrained model"],
    );
}
