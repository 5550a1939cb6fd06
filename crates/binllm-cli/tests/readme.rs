//! The README's commands, run as written, so the README cannot drift from the tool.
//!
//! Every ```sh block in README.md carries a marker on the line before it:
//! `<!-- readme-test: cpu -->` blocks run here, line by line, with this build's `binllm` first
//! on the PATH, in a scratch directory that sees the repository's `models/` and `../shared`
//! where the README expects them. `gpu` blocks need a GPU, `setup` blocks are what CI and
//! the set-up already do, and `server` blocks start `binllm serve`, which runs until stopped
//! (binllm-serve's tests and `serve_cli.rs` run it as those blocks do); all three are listed,
//! not run. A block without a marker fails the test.
#![cfg(feature = "torch")]

use std::path::{Path, PathBuf};
use std::process::Command;

use binllm_testing::shared::{repo_root, shared};

/// One fenced shell block and what its marker says to do with it.
struct Block {
    kind: String,
    line: usize,
    commands: Vec<String>,
}

/// The ```sh blocks of `text`, with continuation lines joined and comments dropped.
fn shell_blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != "```sh" {
            i += 1;
            continue;
        }
        let kind = i
            .checked_sub(1)
            .and_then(|p| lines[p].trim().strip_prefix("<!-- readme-test:"))
            .and_then(|m| m.strip_suffix("-->"))
            .map(|m| m.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_default();
        let start = i + 1;
        let mut commands = Vec::new();
        let mut current = String::new();
        i += 1;
        while i < lines.len() && lines[i].trim() != "```" {
            let line = lines[i].trim();
            i += 1;
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.strip_suffix('\\') {
                Some(head) => current += head,
                None => {
                    current += line;
                    commands.push(std::mem::take(&mut current));
                }
            }
        }
        blocks.push(Block {
            kind,
            line: start,
            commands,
        });
        i += 1;
    }
    blocks
}

/// A scratch directory laid out as a clone: `repo/models` and `shared` link to the real ones,
/// and `bin/binllm` is this build's binary.
fn scratch() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(repo_root().join("models"), repo.join("models")).unwrap();
    std::os::unix::fs::symlink(shared(""), dir.path().join("shared")).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_binllm"), bin.join("binllm")).unwrap();
    (dir, repo, bin)
}

fn run(command: &str, cwd: &Path, bin: &Path) {
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let started = std::time::Instant::now();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", command])
        .current_dir(cwd)
        .env("PATH", path)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("bash runs");
    println!(
        "$ {command}   ({:.1} s)\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        out.status.success(),
        "README command failed: {command}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_shell_block_of_the_readme_is_marked() {
    let text = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let blocks = shell_blocks(&text);
    assert!(
        blocks.len() >= 4,
        "the README's shell blocks were not found"
    );
    for b in &blocks {
        assert!(
            ["cpu", "gpu", "setup", "server"].contains(&b.kind.as_str()),
            "README.md line {}: a ```sh block needs a `<!-- readme-test: cpu|gpu|setup|server ... -->` line before it (found {:?})",
            b.line,
            b.kind
        );
    }
    assert!(blocks
        .iter()
        .any(|b| b.kind == "cpu" && b.commands.len() >= 5));
}

#[test]
fn the_readmes_cpu_commands_run_as_written() {
    let models = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        models.exists(),
        "{} missing: run scripts/setup.sh",
        models.display()
    );
    let text = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let (_dir, repo, bin) = scratch();
    let mut ran = 0;
    for block in shell_blocks(&text) {
        if block.kind != "cpu" {
            println!(
                "README.md line {}: {} block not run here ({} commands)",
                block.line,
                block.kind,
                block.commands.len()
            );
            continue;
        }
        for command in &block.commands {
            run(command, &repo, &bin);
            ran += 1;
        }
    }
    assert!(ran >= 5, "only {ran} README commands ran");
    // What the block says it makes, it made.
    for made in [
        "runs/ptq/sign-model.safetensors",
        "smollm2-ptq.b1",
        "eval-ptq.json",
    ] {
        assert!(
            repo.join(made).exists(),
            "{made} missing after the README's commands"
        );
    }
}

#[test]
fn blocks_join_continuations_and_skip_comments() {
    let text = "<!-- readme-test: cpu -->\n```sh\n# a comment\nbinllm a \\\n  --b c\n\nbinllm d\n```\n\n```sh\nx\n```\n";
    let blocks = shell_blocks(text);
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].kind, "cpu");
    assert_eq!(blocks[0].commands, vec!["binllm a --b c", "binllm d"]);
    assert_eq!(blocks[1].kind, "", "no marker");
}
