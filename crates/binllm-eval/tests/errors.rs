//! A missing or malformed data file fails with the file and the line in the message.

use std::path::Path;

use binllm_eval::{PerplexitySet, Task};

/// Writes `files` under a fresh data directory and loads `task` from it.
fn load_error(task: Task, files: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        if name.ends_with(".gz") {
            use std::io::Write;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(content.as_bytes()).unwrap();
            std::fs::write(&path, gz.finish().unwrap()).unwrap();
        } else {
            std::fs::write(&path, content).unwrap();
        }
    }
    match task.load(dir.path()) {
        Ok(v) => panic!("{} loaded {} examples from bad data", task.name(), v.len()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_names(message: &str, file: &str, line: usize, what: &str) {
    assert!(
        message.contains(&format!("{file}:{line}:")),
        "expected {file}:{line} in {message:?}"
    );
    assert!(message.contains(what), "expected {what:?} in {message:?}");
}

const WINO_OK: &str = r#"{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}"#;

#[test]
fn missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let message = format!("{:#}", Task::OpenBookQa.load(dir.path()).unwrap_err());
    assert!(message.contains("openbookqa/test.jsonl"), "{message}");
    let message = format!(
        "{:#}",
        PerplexitySet::WikiText2
            .text(Path::new("/nonexistent"))
            .unwrap_err()
    );
    assert!(
        message.contains("/nonexistent/wikitext-2-raw/wiki.test.raw"),
        "{message}"
    );
}

#[test]
fn bad_json_names_file_and_line() {
    let text = format!("{WINO_OK}\n{WINO_OK}\n{{\"sentence\": oops}}\n");
    let m = load_error(Task::WinoGrande, &[("winogrande/dev.jsonl", &text)]);
    assert_names(&m, "winogrande/dev.jsonl", 3, "malformed JSON");
}

#[test]
fn missing_field_names_file_line_and_field() {
    let text =
        format!("{WINO_OK}\n{{\"sentence\": \"A _ b.\", \"option1\": \"x\", \"answer\": \"2\"}}\n");
    let m = load_error(Task::WinoGrande, &[("winogrande/dev.jsonl", &text)]);
    assert_names(&m, "winogrande/dev.jsonl", 2, "option2");

    let m = load_error(
        Task::BoolQ,
        &[(
            "boolq/dev.jsonl.gz",
            "{\"question\": \"q\", \"title\": \"t\", \"passage\": \"p\"}\n",
        )],
    );
    assert_names(&m, "boolq/dev.jsonl.gz", 1, "answer");
}

#[test]
fn label_out_of_range_names_file_and_line() {
    let m = load_error(
        Task::WinoGrande,
        &[(
            "winogrande/dev.jsonl",
            &WINO_OK.replace("\"answer\": \"1\"", "\"answer\": \"3\""),
        )],
    );
    assert_names(&m, "winogrande/dev.jsonl", 1, "out of range");

    let piqa = "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n";
    let m = load_error(
        Task::Piqa,
        &[
            ("piqa/valid.jsonl", &piqa.repeat(3)),
            ("piqa/valid-labels.lst", "0\n1\n2\n"),
        ],
    );
    assert_names(&m, "piqa/valid-labels.lst", 3, "out of range");

    let arc = r#"{"id": "x", "question": {"stem": "s", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, "answerKey": "E"}"#;
    let m = load_error(
        Task::ArcEasy,
        &[("arc/ARC-Easy/ARC-Easy-Test.jsonl.gz", &format!("\n{arc}\n"))],
    );
    assert_names(&m, "ARC-Easy-Test.jsonl.gz", 2, "answerKey \"E\"");
}

#[test]
fn hellaswag_block_errors_name_the_line() {
    let block = "Label: ctx\n1\na.\nb.\nc.\nd.\n";
    // A block missing one ending: the file is not a multiple of 6 lines.
    let text = format!("{block}{block}Label: ctx\n2\na.\nb.\nc.\n");
    let m = load_error(
        Task::HellaSwag,
        &[("hellaswag/hellaswag_val_full.txt.gz", &text)],
    );
    assert_names(&m, "hellaswag_val_full.txt.gz", 13, "incomplete task block");

    // Label outside 0..3, in the second block.
    let text = format!("{block}Label: ctx\n4\na.\nb.\nc.\nd.\n");
    let m = load_error(
        Task::HellaSwag,
        &[("hellaswag/hellaswag_val_full.txt.gz", &text)],
    );
    assert_names(
        &m,
        "hellaswag_val_full.txt.gz",
        8,
        "gold label 4 out of range",
    );

    // A shifted block: an ending where the label should be.
    let text = format!("{block}Label: ctx\nnot a number\na.\nb.\nc.\nd.\n");
    let m = load_error(
        Task::HellaSwag,
        &[("hellaswag/hellaswag_val_full.txt.gz", &text)],
    );
    assert_names(&m, "hellaswag_val_full.txt.gz", 8, "not a number");
}

#[test]
fn piqa_label_count_mismatch_is_an_error() {
    let piqa = "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n";
    let m = load_error(
        Task::Piqa,
        &[
            ("piqa/valid.jsonl", &piqa.repeat(3)),
            ("piqa/valid-labels.lst", "0\n1\n"),
        ],
    );
    assert!(m.contains("2 labels for 3 questions"), "{m}");
}

#[test]
fn winogrande_without_blank_names_the_line() {
    let m = load_error(
        Task::WinoGrande,
        &[(
            "winogrande/dev.jsonl",
            &WINO_OK.replace("A _ b.", "No blank."),
        )],
    );
    assert_names(&m, "winogrande/dev.jsonl", 1, "no blank");
}
