//! binllm-progress owns one thing: telling the user how far long work has come. On a
//! terminal that is an indicatif bar; when stderr is a file or a pipe (a long job's log, CI),
//! a bar draws nothing, so a plain line is printed instead every few seconds (the task, done
//! / total, rate, time left), also while a single slow step keeps the count still.
//!
//! One type, [`Progress`], for conversion, evaluation and every other long loop, so every
//! command reports alike.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Seconds between log lines when stderr is not a terminal (`BINLLM_PROGRESS_SECONDS`
/// overrides it).
const LOG_INTERVAL_SECONDS: f64 = 10.0;

/// Progress of one task of `len` units.
pub struct Progress {
    bar: ProgressBar,
    log: Option<Arc<LogLines>>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

/// The state behind the plain log lines.
struct LogLines {
    task: String,
    started: Instant,
    interval: Duration,
    state: Mutex<LogState>,
    done: AtomicBool,
}

struct LogState {
    position: u64,
    /// Where counting started (a resumed task starts past 0): the rate counts from here.
    base: u64,
    len: u64,
    message: String,
    last_line: Instant,
}

impl LogLines {
    /// The line for the current state, e.g. `Stage 2: 120/1220 (9.8%), 2.1/s, 8m 43s left`.
    fn line(&self, state: &LogState) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = (state.position - state.base.min(state.position)) as f64 / elapsed.max(1e-9);
        let mut line = format!("{}: {}/{}", self.task, state.position, state.len);
        if state.len > 0 {
            line += &format!(
                " ({:.1}%)",
                100.0 * state.position as f64 / state.len as f64
            );
        }
        line += &format!(", {}/s", human_rate(rate));
        if rate > 0.0 && state.len > state.position {
            let left = (state.len - state.position) as f64 / rate;
            line += &format!(", {} left", human_duration(left));
        }
        if !state.message.is_empty() {
            line += &format!(" | {}", state.message);
        }
        line
    }

    /// Prints a line if the interval has passed since the last one.
    fn maybe_print(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.last_line.elapsed() >= self.interval {
            state.last_line = Instant::now();
            eprintln!("{}", self.line(&state));
        }
    }
}

fn human_rate(rate: f64) -> String {
    match rate {
        r if r >= 1e6 => format!("{:.2}M", r / 1e6),
        r if r >= 1e3 => format!("{:.1}k", r / 1e3),
        r if r >= 10.0 => format!("{r:.0}"),
        r => format!("{r:.2}"),
    }
}

fn human_duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        s if s >= 3600 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

impl Progress {
    /// A bar on a terminal, log lines otherwise.
    pub fn new(len: u64, task: &str) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} ({eta}) {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(task.to_string());
            return Progress {
                bar,
                log: None,
                ticker: None,
            };
        }
        let interval = std::env::var("BINLLM_PROGRESS_SECONDS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .unwrap_or(LOG_INTERVAL_SECONDS);
        Progress::logged(len, task, Duration::from_secs_f64(interval))
    }

    /// Log lines every `interval`, whatever stderr is.
    pub fn logged(len: u64, task: &str, interval: Duration) -> Self {
        let log = Arc::new(LogLines {
            task: task.to_string(),
            started: Instant::now(),
            interval,
            state: Mutex::new(LogState {
                position: 0,
                base: 0,
                len,
                message: String::new(),
                last_line: Instant::now(),
            }),
            done: AtomicBool::new(false),
        });
        // A line also while the count stands still (one slow batch, a long forward pass).
        let ticker = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let nap = interval.min(Duration::from_millis(200));
                while !log.done.load(Ordering::Relaxed) {
                    std::thread::sleep(nap);
                    if !log.done.load(Ordering::Relaxed) {
                        log.maybe_print();
                    }
                }
            })
        };
        Progress {
            bar: ProgressBar::hidden(),
            log: Some(log),
            ticker: Some(ticker),
        }
    }

    /// Reports nothing (tests, `--quiet`).
    pub fn hidden() -> Self {
        Progress {
            bar: ProgressBar::hidden(),
            log: None,
            ticker: None,
        }
    }

    fn update(&self, f: impl FnOnce(&mut LogState)) {
        if let Some(log) = &self.log {
            f(&mut log.state.lock().unwrap_or_else(|e| e.into_inner()));
            log.maybe_print();
        }
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        self.update(|s| s.position += n);
    }

    pub fn set_position(&self, position: u64) {
        self.bar.set_position(position);
        self.update(|s| {
            if s.position == 0 {
                s.base = position;
            }
            s.position = position;
        });
    }

    /// Status shown beside the count (a loss, a phase).
    pub fn set_message(&self, message: impl Into<String>) {
        let message = message.into();
        self.bar.set_message(message.clone());
        if let Some(log) = &self.log {
            log.state.lock().unwrap_or_else(|e| e.into_inner()).message = message;
        }
    }

    /// Prints a line that stays (above the bar on a terminal).
    pub fn println(&self, line: impl AsRef<str>) {
        if self.bar.is_hidden() {
            eprintln!("{}", line.as_ref());
        } else {
            self.bar.println(line.as_ref());
        }
    }

    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear();
        if let Some(log) = &self.log {
            log.done.store(true, Ordering::Relaxed);
        }
    }

    /// The current line of the log form (None for a bar or a hidden progress).
    pub fn log_line(&self) -> Option<String> {
        let log = self.log.as_ref()?;
        let state = log.state.lock().unwrap_or_else(|e| e.into_inner());
        Some(log.line(&state))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(log) = &self.log {
            log.done.store(true, Ordering::Relaxed);
        }
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_say_task_count_rate_and_time_left() {
        let p = Progress::logged(200, "Stage 2", Duration::from_secs(3600));
        p.inc(50);
        p.set_message("loss 3.21");
        std::thread::sleep(Duration::from_millis(20));
        let line = p.log_line().unwrap();
        assert!(line.starts_with("Stage 2: 50/200 (25.0%), "), "{line}");
        assert!(
            line.contains("/s, ") && line.contains(" left | loss 3.21"),
            "{line}"
        );
        p.inc(150);
        let done = p.log_line().unwrap();
        assert!(
            done.starts_with("Stage 2: 200/200 (100.0%)") && !done.contains("left"),
            "{done}"
        );
        assert!(Progress::hidden().log_line().is_none());
        // A resumed task's rate counts what this run did, not what an earlier run did.
        let resumed = Progress::logged(200, "Stage 2", Duration::from_secs(3600));
        resumed.set_position(190);
        std::thread::sleep(Duration::from_millis(50));
        let line = resumed.log_line().unwrap();
        assert!(
            line.ends_with(", 0.00/s"),
            "no rate yet, so no time left: {line}"
        );
    }

    #[test]
    fn durations_and_rates_read_as_people_write_them() {
        assert_eq!(human_duration(42.4), "42s");
        assert_eq!(human_duration(523.0), "8m 43s");
        assert_eq!(human_duration(7300.0), "2h 1m");
        assert_eq!(human_rate(93_028.0), "93.0k");
        assert_eq!(human_rate(2.5e6), "2.50M");
        assert_eq!(human_rate(0.5), "0.50");
    }
}
