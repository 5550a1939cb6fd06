//! Reading the shared data sets: plain or gzip files, JSON lines, and errors that name the
//! file and the line, so a bad download is found at once.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Reads a whole text file; a name ending in `.gz` is gunzipped.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "{}: cannot read data file (is the shared data set there?)",
            path.display()
        )
    })?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{}: not a valid gzip file", path.display()))?;
        out
    } else {
        bytes
    };
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        anyhow!("{}:{line}: not valid UTF-8", path.display())
    })
}

/// A position in a data file, for error messages: `path:line`.
#[derive(Debug, Clone)]
pub struct Location {
    pub path: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)
    }
}

/// One JSON object per non-blank line, each with its location.
pub fn read_jsonl(path: &Path) -> Result<Vec<(Location, Value)>> {
    let text = read_text(path)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = Location {
            path: path.to_path_buf(),
            line: i + 1,
        };
        let value: Value =
            serde_json::from_str(line).map_err(|e| anyhow!("{at}: malformed JSON: {e}"))?;
        if !value.is_object() {
            bail!("{at}: expected a JSON object");
        }
        rows.push((at, value));
    }
    Ok(rows)
}

/// Typed field access with the location in every error.
pub struct Row<'a> {
    pub at: &'a Location,
    pub value: &'a Value,
}

impl<'a> Row<'a> {
    pub fn new(at: &'a Location, value: &'a Value) -> Self {
        Row { at, value }
    }

    /// `a.b.c` walks nested objects.
    pub fn field(&self, dotted: &str) -> Result<&'a Value> {
        let mut v = self.value;
        for key in dotted.split('.') {
            v = v
                .get(key)
                .ok_or_else(|| anyhow!("{}: missing field {dotted:?}", self.at))?;
        }
        Ok(v)
    }

    pub fn str(&self, dotted: &str) -> Result<&'a str> {
        self.field(dotted)?
            .as_str()
            .ok_or_else(|| anyhow!("{}: field {dotted:?} is not a string", self.at))
    }

    pub fn bool(&self, dotted: &str) -> Result<bool> {
        self.field(dotted)?
            .as_bool()
            .ok_or_else(|| anyhow!("{}: field {dotted:?} is not a boolean", self.at))
    }

    pub fn array(&self, dotted: &str) -> Result<&'a Vec<Value>> {
        self.field(dotted)?
            .as_array()
            .ok_or_else(|| anyhow!("{}: field {dotted:?} is not an array", self.at))
    }
}

/// Lines as Python yields them from a file opened in text mode (universal newlines: "\r\n"
/// and "\r" become "\n"), each keeping its "\n". The Hugging Face `wikitext` script builds
/// its rows from exactly these.
pub fn python_text_lines(text: &str) -> Vec<String> {
    let normalised = text.replace("\r\n", "\n").replace('\r', "\n");
    normalised
        .split_inclusive('\n')
        .map(str::to_string)
        .collect()
}

/// Python's `str.strip()`: Unicode whitespace plus the ASCII separators \x1c..\x1f, which
/// Python counts as whitespace and Rust does not.
pub fn python_strip(s: &str) -> &str {
    s.trim_matches(is_python_space)
}

pub fn python_rstrip(s: &str) -> &str {
    s.trim_end_matches(is_python_space)
}

fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A label such as "3" or "1" parsed as an index below `n`, with the location on error.
pub fn parse_index(text: &str, n: usize, at: &Location, what: &str) -> Result<usize> {
    let v: usize = text
        .trim()
        .parse()
        .map_err(|_| anyhow!("{at}: {what} {text:?} is not a number"))?;
    if v >= n {
        bail!("{at}: {what} {v} out of range (expected 0..{})", n - 1);
    }
    Ok(v)
}
